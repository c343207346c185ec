"""Model-patch nodes that act on the sampling loop, carried to the last rank.

Some nodes add no weights but change how ComfyUI samples: EasyCache and LazyCache skip
whole model calls when the output changes little; the context-window nodes cut a long
video into overlapping windows and call the model once per window.  They live in the
MODEL as wrappers, callbacks and option objects of the ComfyUI process, which cannot
travel; what they were made from can.  ``describe`` reads the nodes' settings off the
MODEL (JSON); on the last rank ``apply`` runs the same nodes' own code on the sampler's
model, so ComfyUI's implementation wraps the pipeline exactly as it wraps one model:
a skipped model call is a skipped pipeline pass, a window is a pass on a shorter latent.

Anything else a node hooked into the MODEL (a wrapper, callback or attachment of another
kind) is refused with its name: dropping it silently would sample something else.
"""
from __future__ import annotations

# wrapper/callback keys the nodes below add (comfy_extras/nodes_easycache.py, comfy/context_windows.py)
KNOWN_KEYS = {"easycache": "EasyCache", "lazycache": "LazyCache",
              "ContextWindows_prepare_sampling": "context windows", "ContextWindows_sampler_sample": "context windows"}


class UnsupportedPatch(ValueError):
    pass


def describe(model) -> list[dict]:
    """The sampling patches of a ModelPatcher as JSON; refuses what cannot be carried."""
    out = []
    opts = model.model_options.get("transformer_options", {})
    holder = opts.get("easycache")
    if holder is not None:
        kind = type(holder).__name__.replace("Holder", "")  # EasyCache / LazyCache
        if kind not in ("EasyCache", "LazyCache"):
            raise UnsupportedPatch(f"the MODEL has a cache '{type(holder).__name__}' PP KSampler does not know")
        out.append({"kind": kind, "reuse_threshold": holder.reuse_threshold, "start_percent": holder.start_percent,
                    "end_percent": holder.end_percent, "verbose": bool(holder.verbose)})
    handler = model.model_options.get("context_handler")
    if handler is not None:
        if type(handler).__name__ != "IndexListContextHandler":
            raise UnsupportedPatch(f"the MODEL has a context handler '{type(handler).__name__}' PP KSampler "
                                   f"does not know: remove the node that added it")
        out.append({"kind": "ContextWindows", "context_length": handler.context_length,
                    "context_overlap": handler.context_overlap, "context_schedule": handler.context_schedule.name,
                    "context_stride": handler.context_stride, "closed_loop": bool(handler.closed_loop),
                    "fuse_method": handler.fuse_method.name, "dim": handler.dim, "freenoise": bool(handler.freenoise),
                    "cond_retain_index_list": ",".join(str(i) for i in handler.cond_retain_index_list),
                    "split_conds_to_windows": bool(handler.split_conds_to_windows)})
    for what, table in (("wrapper", getattr(model, "wrappers", {})), ("callback", getattr(model, "callbacks", {}))):
        for kind, by_key in table.items():
            for key, fns in by_key.items():
                if fns and key not in KNOWN_KEYS:
                    raise UnsupportedPatch(f"the MODEL has a {kind} {what} '{key}' from a model-patch node that PP "
                                           f"KSampler cannot run on the workers: remove that node, or use the stock "
                                           f"KSampler")
    for key in getattr(model, "attachments", {}) or {}:
        raise UnsupportedPatch(f"the MODEL has an attachment '{key}' from a model-patch node that PP KSampler cannot "
                               f"carry to the workers: remove that node, or use the stock KSampler")
    if getattr(model, "additional_models", None):
        raise UnsupportedPatch(f"the MODEL brings additional models {list(model.additional_models)} (a ControlNet, "
                               f"an IP adapter?) that PP KSampler cannot run: remove that node")
    return out


def apply(patcher, specs: list[dict]):
    """On the last rank: the same nodes' code on the sampler's ModelPatcher; returns it."""
    for spec in specs:
        params = {k: v for k, v in spec.items() if k != "kind"}
        if spec["kind"] in ("EasyCache", "LazyCache"):
            from comfy_extras.nodes_easycache import EasyCacheNode, LazyCacheNode
            node = EasyCacheNode if spec["kind"] == "EasyCache" else LazyCacheNode
            patcher = node.execute(patcher, **params).result[0]
        elif spec["kind"] == "ContextWindows":
            from comfy_extras.nodes_context_windows import ContextWindowsManualNode
            patcher = ContextWindowsManualNode.execute(patcher, **params).result[0]
        else:
            raise UnsupportedPatch(f"unknown sampling patch {spec['kind']}")
    return patcher
