"""What of a MODEL, its conditioning and its latent crosses to the workers, and back.

The model-sampling object patch (ModelSamplingFlux/SD3 shift ...), plain model options,
the model patches ``model_patches`` knows, the weight patches (LoRA ...) cut by stage, the
conditioning and latents: JSON + tensors, nested values in the one encoding
(``engine.tree``).  What cannot be carried is refused here, before any worker work, with
the name of what to remove.
"""
from __future__ import annotations

import json
import sys

import torch

from ..engine import tree


class CarryError(ValueError):
    """Something on the MODEL or conditioning that pipeline-parallel sampling cannot carry."""


# -- what a MODEL carries besides weights --------------------------------------------
_KNOWN_OPTION_NODES = {
    "sampler_cfg_function": "a CFG-function node (e.g. RescaleCFG, CFGZeroStar)",
    "sampler_post_cfg_function": "a post-CFG node (e.g. PerpNeg, SAG, CFGNorm)",
    "sampler_pre_cfg_function": "a pre-CFG node",
    "model_function_wrapper": "a model-function wrapper node (e.g. a caching node)",
    "sampler_calc_cond_batch_function": "a cond-batch node",
}


def _plain(v) -> bool:
    """JSON-able data only (numbers, strings, bools, None, and lists/dicts of them)."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return True
    if isinstance(v, (list, tuple)):
        return all(_plain(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _plain(x) for k, x in v.items())
    return False


def model_carry(model) -> tuple[dict, dict]:
    """The parts of a ModelPatcher the workers must reproduce, besides weight patches
    (``pack_weight_patches``): (JSON, tensors).

    Carried: the ``model_sampling`` object patch (ModelSamplingFlux, ModelSamplingSD3, ...),
    plain option flags and plain transformer options (e.g. ``rope_options``), and the
    sampling patches of EasyCache, LazyCache and the context-window nodes
    (``model_patches.py``).  Refused with the name of what added them: other object
    patches, callable sampler options, attention or block patches, unknown wrappers.
    """
    from . import model_patches
    others = [k for k in getattr(model, "object_patches", {}) if k != "model_sampling"]
    if others:
        raise CarryError(f"the MODEL has object patches {others} from a model-patch node; PP KSampler can carry "
                         f"only model_sampling (ModelSamplingFlux/SD3/...): remove that node")
    options, transformer_options = {}, {}
    for k, v in model.model_options.items():
        if k == "transformer_options":
            bad = [n for n, x in v.items() if x and n != "easycache" and not _plain(x)]
            if bad:
                raise CarryError(f"the MODEL has transformer options {bad} (attention or block patches from a "
                                 f"model-patch node); PP KSampler cannot run them on split stages: remove that node")
            transformer_options = {n: x for n, x in v.items() if x and n != "easycache"}
        elif k == "context_handler":
            continue  # a sampling patch
        elif isinstance(v, (bool, int, float, str)) or v is None:
            options[k] = v
        else:
            hint = _KNOWN_OPTION_NODES.get(k, "a model-patch node")
            raise CarryError(f"the MODEL has option '{k}' from {hint}; PP KSampler cannot carry it: remove that node")
    try:
        patches = model_patches.describe(model)
    except model_patches.UnsupportedPatch as e:
        raise CarryError(str(e)) from None
    meta, tensors = {"options": options, "transformer_options": transformer_options, "model_sampling": None,
                     "model_patches": patches}, {}
    ms = model.object_patches.get("model_sampling") if hasattr(model, "object_patches") else None
    if ms is not None:
        meta["model_sampling"], ms_tensors = pack_model_sampling(ms)
        tensors.update(ms_tensors)
    return meta, tensors


def pack_model_sampling(ms) -> tuple[dict, dict]:
    """The model-sampling object (ModelSamplingFlux, ModelSamplingSD3 ...): its
    comfy.model_sampling bases, plain attributes and buffers (tensors named ``ms.<j>``)."""
    import comfy.model_sampling as cms
    bases = [b.__name__ for b in type(ms).__mro__[1:]
             if b.__module__ == cms.__name__ and b.__name__ != "object"]
    if not bases:
        raise CarryError(f"model sampling {type(ms).__name__} is not built from comfy.model_sampling classes")
    scalars = {k: v for k, v in vars(ms).items()
               if not k.startswith("_") and isinstance(v, (int, float, bool, str)) and k != "training"}
    tensors: dict = {}
    return _pack({"bases": bases, "scalars": scalars, "buffers": dict(ms.state_dict())}, "ms", tensors,
                 "the model sampling"), tensors


def unpack_model_sampling(meta: dict, tensors: dict):
    import comfy.model_sampling as cms
    value = tree.unpack(meta, "ms", tensors)
    # The direct bases, in MRO order, minus those already implied by an earlier one.
    classes = [getattr(cms, n) for n in value["bases"]]
    direct = [c for c in classes if not any(c is not o and issubclass(o, c) for o in classes)]
    cls = type("ModelSamplingCarried", tuple(direct), {})
    ms = cls.__new__(cls)
    torch.nn.Module.__init__(ms)
    for k, v in value["scalars"].items():
        setattr(ms, k, v)
    for k, v in value["buffers"].items():
        ms.register_buffer(k, v)
    return ms


# -- ComfyUI's objects in the one encoding (engine.tree's typed nodes) ------------------------
def _encode(v):
    """(type name, plain value) of a ComfyUI object that crosses to the workers, else None."""
    if type(v).__name__ == "Output" and type(v).__module__ == "comfy.clip_vision":
        return "clip_vision_output", dict(vars(v))  # CLIP vision (Wan i2v, Z-Image omni: image_sizes)
    wa = sys.modules.get("comfy.weight_adapter")
    if wa is not None and isinstance(v, wa.WeightAdapterBase) and type(v).__name__ in dir(wa):
        # not its loaded_keys: ComfyUI's loader hands every adapter of a file the one set of all
        # the file's keys (bookkeeping the patch math never reads), so carrying it made a LoRA on
        # every linear cost keys x keys (Flux, 1064 keys: seconds per prompt)
        return "weight_adapter", {"cls": type(v).__name__, "keys": [], "weights": tuple(v.weights)}
    return None


def _decode(name: str, value):
    if name == "clip_vision_output":
        import comfy.clip_vision
        clip = comfy.clip_vision.Output()
        for a, x in value.items():
            clip[a] = x
        return clip
    if name == "weight_adapter":
        import comfy.weight_adapter as wa
        return getattr(wa, value["cls"])(set(value["keys"]), tuple(value["weights"]))
    raise CarryError(f"a carried value of type '{name}' is unknown to this worker")


def _pack(value, prefix: str, tensors: dict, what: str) -> dict:
    try:
        return tree.pack(value, prefix, tensors, what, _encode)
    except tree.TreeError as e:
        raise CarryError(f"{e}: remove the node that added it") from None


def _unpack(packed: dict, prefix: str, tensors: dict):
    return tree.unpack(packed, prefix, tensors, _decode)


# -- weight patches (LoRA and friends) -----------------------------------------------------
DM = "diffusion_model."


def pack_weight_patches(model, stage_prefixes: list[list[str]]) -> tuple[dict, list[dict]]:
    """The MODEL's weight patches (LoRA ...), cut by stage.

    Returns (JSON per key, tensors per stage): stage ``s`` gets only the tensors of the
    keys its weights live under (a block's patches go to its stage; those of the shared
    weights that every stage holds, to every stage), so each worker receives what it uses.
    """
    meta, per_stage = {}, [{} for _ in stage_prefixes]
    for key, plist in model.patches.items():
        if not key.startswith(DM):
            continue
        rel = key[len(DM):]
        stages = [i for i, pre in enumerate(stage_prefixes) if rel.startswith(tuple(pre))]
        if not stages:
            raise CarryError(f"weight patch for '{key}' matches no stage")
        if any(function is not None for *_, function in plist):
            raise CarryError(f"weight patch for '{key}' has a custom function; PP KSampler cannot carry it")
        tensors: dict = {}
        entries = _pack([tuple(p[:4]) for p in plist], f"wp.{key}", tensors, f"the weight patch of '{key}'")
        for i in stages:
            per_stage[i].update(tensors)
        meta[key] = {"stages": stages, "entries": entries}
    return meta, per_stage


def unpack_weight_patches(meta: dict, tensors: dict, stage: int) -> dict:
    """{key: [patch tuples]} for this stage, as ModelPatcher.patches holds them."""
    return {key: [(*p, None) for p in _unpack(spec["entries"], f"wp.{key}", tensors)]
            for key, spec in meta.items() if stage in spec["stages"]}


# -- conditioning ---------------------------------------------------------------------
def pack_conditioning(name: str, conditioning) -> tuple[list, dict]:
    """CONDITIONING ([[tensor, {options}], ...]) as JSON + tensors named '<name>.<i>.<key>.<j>',
    each option in the one encoding (tensors, lists, nested dicts such as MiniMax-H3's
    keyframes and references, CLIP vision outputs); what cannot be carried is refused by name."""
    meta, tensors = [], {}
    for i, (cond, opts) in enumerate(conditioning):
        tensors[f"{name}.{i}.cond"] = cond
        if opts.get("control") is not None:
            raise CarryError("the conditioning has a ControlNet (Apply ControlNet); PP KSampler does not "
                             "run ControlNets yet: remove it or use the stock KSampler")
        meta.append({k: _pack(v, f"{name}.{i}.{k}", tensors, f"the {name} conditioning's '{k}'")
                     for k, v in opts.items()})
    return meta, tensors


def unpack_conditioning(name: str, meta: list, tensors: dict) -> list:
    return [[tensors[f"{name}.{i}.cond"], {k: _unpack(packed, f"{name}.{i}.{k}", tensors)
                                           for k, packed in entry.items()}]
            for i, entry in enumerate(meta)]


def latent_parts(name: str, value) -> dict:
    """A LATENT tensor, or a NestedTensor (LTX-2, MiniMax-H3: video + audio), as named
    tensors: ``{name: tensor}`` or ``{name#0: video, name#1: audio}``; {} for None."""
    if value is None:
        return {}
    if getattr(value, "is_nested", False):
        return {f"{name}#{i}": t for i, t in enumerate(value.unbind())}
    return {name: value}


def latent_from_parts(name: str, tensors: dict, nested=None):
    """The inverse of ``latent_parts``: the tensor, or its parts as a NestedTensor
    (``nested``: the class to build them into; default ComfyUI's); None if absent."""
    if name in tensors:
        return tensors[name]
    parts = sorted((int(k.rpartition("#")[2]), v) for k, v in tensors.items() if k.startswith(name + "#"))
    if not parts:
        return None
    if nested is None:
        from comfy.nested_tensor import NestedTensor as nested
    return nested([v for _, v in parts])


def json_roundtrip(x):
    """Refuse anything the JSON control channel cannot carry, early."""
    return json.loads(json.dumps(x))
