"""Model-patch nodes that act on the sampling loop, carried to the last rank.

Some nodes add no weights but change how ComfyUI samples: EasyCache and LazyCache skip
whole model calls when the output changes little; the context-window nodes cut a long
video into overlapping windows and call the model once per window.  They live in the
MODEL as wrappers, callbacks and option objects of the ComfyUI process, which cannot
travel; what they were made from can.  ``describe`` reads the nodes' settings off the
MODEL (JSON); on the last rank ``apply`` runs the same nodes' own code on the sampler's
model, so ComfyUI's implementation wraps the pipeline exactly as it wraps one model:
a skipped model call is a skipped pipeline pass, a window is a pass on a shorter latent.

Anything else a node hooked into the MODEL (a wrapper, callback, attachment, injection
such as a bypass LoRA, weight wrapper or hook patch) is refused with its name: dropping it
silently would sample something else.
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
        out.append(context_windows(model, handler))
    for what, table in (("wrapper", getattr(model, "wrappers", {})), ("callback", getattr(model, "callbacks", {}))):
        for kind, by_key in table.items():
            for key, fns in by_key.items():
                if fns and key not in KNOWN_KEYS:
                    raise UnsupportedPatch(f"the MODEL has a {kind} {what} '{key}' from a model-patch node that PP "
                                           f"KSampler cannot run on the workers: remove that node, or use the stock "
                                           f"KSampler")
    for key, injections in (getattr(model, "injections", {}) or {}).items():
        if injections:
            what = "a bypass LoRA (Load LoRA (Bypass))" if key == "bypass_lora" else f"injections '{key}'"
            raise UnsupportedPatch(f"the MODEL has {what}, which PP KSampler cannot apply on split stages: use the "
                                   f"ordinary Load LoRA node, or the stock KSampler")
    if getattr(model, "weight_wrapper_patches", None):
        raise UnsupportedPatch(f"the MODEL has weight wrappers {sorted(model.weight_wrapper_patches)[:3]} from a "
                               f"model-patch node that PP KSampler cannot run on the workers: remove that node")
    if getattr(model, "hook_patches", None):
        raise UnsupportedPatch("the MODEL has hook patches (hooked LoRA or scheduled weights, from the 'Create "
                               "Hook' nodes) that PP KSampler cannot run on the workers: remove those nodes, or "
                               "use the stock KSampler")
    for key in getattr(model, "attachments", {}) or {}:
        raise UnsupportedPatch(f"the MODEL has an attachment '{key}' from a model-patch node that PP KSampler cannot "
                               f"carry to the workers: remove that node, or use the stock KSampler")
    if getattr(model, "additional_models", None):
        raise UnsupportedPatch(f"the MODEL brings additional models {list(model.additional_models)} (a ControlNet, "
                               f"an IP adapter?) that PP KSampler cannot run: remove that node")
    return out


def context_windows(model, handler) -> dict:
    """The settings of a context-window handler as the context-window node takes them (its
    ``execute`` parameters, read off the handler), checked by building the handler again
    from them: a setting the node does not take, or one read wrongly, is refused by name."""
    import inspect

    from comfy_extras.nodes_context_windows import ContextWindowsManualNode
    if type(handler).__name__ != "IndexListContextHandler":
        raise UnsupportedPatch(f"the MODEL has a context handler '{type(handler).__name__}' PP KSampler "
                               f"does not know: remove the node that added it")
    spec = {"kind": "ContextWindows"}
    for name in inspect.signature(ContextWindowsManualNode.execute).parameters:
        if name in ("cls", "model"):
            continue
        value = getattr(handler, name)
        if isinstance(value, (list, tuple)):  # index lists: the node takes "0,1"
            value = ",".join(str(i) for i in value)
        elif not isinstance(value, (bool, int, float, str)) and hasattr(value, "name"):  # schedule, fuse method
            value = value.name
        spec[name] = value
    again = apply(model.clone(), [spec]).model_options["context_handler"]
    differ = [k for k, v in vars(handler).items() if not callable(v) and k != "callbacks" and not k.startswith("_")
              and not _same(v, getattr(again, k, None))]
    if differ:
        raise UnsupportedPatch(f"the context-window settings {differ} cannot be carried to the workers: remove the "
                               f"context-window node, or use the stock KSampler")
    return spec


def _same(a, b) -> bool:
    if hasattr(a, "name") and hasattr(b, "name") and not isinstance(a, (str, int, float)):
        return a.name == b.name
    return a == b


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
