"""ComfyUI models across the process boundary.

Both sides use ComfyUI's own model code (``comfy.*``, no server modules):

* the ComfyUI process turns a MODEL, conditioning and a LATENT into a job: a weights
  file (the loader's own file, or an export of a MODEL that is already in memory), the
  dtypes the stock loader chose, the model-sampling object patch (ModelSamplingFlux/SD3
  shift ...) and the conditioning as tensors + JSON.  What cannot be carried is refused
  here, before any worker work, with the name of what to remove.
* a worker detects the model config from the file's header alone, builds ComfyUI's model
  class on the meta device, and loads only the tensors of its own stage, in the dtype the
  stock loader would use, straight onto its device.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import struct
import tempfile
import weakref
from dataclasses import dataclass

import torch

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class CarryError(ValueError):
    """Something on the MODEL or conditioning that pipeline-parallel sampling cannot carry."""


def dtype_name(dtype) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def dtype_of(name):
    return None if name is None else getattr(torch, name)


# -- staging -------------------------------------------------------------------------
_PROFILES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def model_profile(diffusion_model) -> dict:
    """The family of a ComfyUI diffusion model and what the split needs to know of it
    (refused here, with the reason, if the model cannot be staged); once per model object."""
    if diffusion_model not in _PROFILES:
        _PROFILES[diffusion_model] = _model_profile(diffusion_model)
    return _PROFILES[diffusion_model]


def _model_profile(diffusion_model) -> dict:
    from .families import UnsupportedModel, family_for
    from .staging import profile, unplaced
    try:
        fam = family_for(diffusion_model)
    except UnsupportedModel as e:
        raise CarryError(str(e)) from None
    missing = unplaced(diffusion_model, fam)
    if missing:
        raise CarryError(f"the {fam.name} staging table places no stage for weights {missing[:5]}")
    return profile(diffusion_model, fam)


def stage_prefixes(diffusion_model, ranges: list[tuple[int, int]]) -> list[list[str]]:
    """Per stage, the weight-name prefixes it loads (its blocks and the shared weights)."""
    from .families import family_for
    from .staging import stage_prefixes as prefixes
    fam = family_for(diffusion_model)
    last = len(ranges) - 1
    return [prefixes(diffusion_model, fam, a, b, i == 0, i == last) for i, (a, b) in enumerate(ranges)]


# -- model from a file header ---------------------------------------------------------
def header_state_dict(path: str, small: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file as a meta tensor (shapes and dtypes, no data),
    except tensors of at most ``small`` elements, which are read (quantization scales).
    Plain reads of the header and of those few bytes: the file is never memory-mapped."""
    header = read_header(path)
    out, few = {}, []
    for k, info in header.items():
        if k == "__metadata__":
            continue
        if small and math.prod(info["shape"]) <= small:
            few.append(k)
        else:
            out[k] = torch.empty(info["shape"], dtype=_DTYPES[info["dtype"]], device="meta")
    for k, t in read_tensors(path, few):
        out[k] = t.clone()
    return out


def read_header(path: str) -> dict:
    """A safetensors file's header, checked before anything relies on it: a file that is not
    safetensors, or that ends before the last tensor its header describes (an interrupted
    download or copy), is refused with its name."""
    name = os.path.basename(path)
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise CarryError(f"cannot read the model file {name}: {e}") from None
    with open(path, "rb") as f:
        raw = f.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        try:
            if not 2 <= n <= min(size - 8, 1 << 28):
                raise ValueError("no safetensors header")
            header = json.loads(f.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, AttributeError):
            raise CarryError(f"{name} is not a safetensors file (or its header is damaged): pick a .safetensors "
                             f"diffusion model") from None
    if 8 + n + end > size:
        raise CarryError(f"{name} is truncated: it has {size:,} bytes, its header describes {8 + n + end:,} "
                         f"(an unfinished download or copy?): download or copy it again")
    return header


def file_stamp(path: str) -> dict:
    """What identifies this version of a file: a file replaced under the same name gets
    another stamp, so no rank ever mixes the old file's weights with the new one's."""
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def check_stamp(src: dict) -> None:
    """The file is still the one the job was built for (size and modification time)."""
    stamp = src.get("stamp")
    if stamp and file_stamp(src["path"]) != stamp:
        raise CarryError(f"{os.path.basename(src['path'])} changed on disk after ComfyUI read it: queue the prompt "
                         f"again (PP Load Diffusion Model re-reads a changed file)")


def file_metadata(path: str) -> dict:
    return read_header(path).get("__metadata__") or {}


@dataclass
class FileLayout:
    """A diffusion-model file as ComfyUI's stock loader sees it, computed from its header
    alone.  ``sd``: the state dict after the loader's key handling (prefix, old quantized
    layouts, diffusers names): what detection and ``get_model`` read; ``load``: what
    ``load_model_weights`` loads after the model config's ``process_unet_state_dict``
    (e.g. released Flux/Chroma/HunyuanVideo files' ``*_norm.scale`` -> ``.weight`` since
    ComfyUI 0.14).  Big tensors stay meta.  ``sources[k]``: where key ``k`` of ``load`` is
    in the file: ``(file key, None)``, or ``(file key, (shape, stride, offset))`` for a view
    of a file tensor (a fused projection split in three); absent: no file tensor (made by
    the conversion, real in ``load``, or built from several: ``derived``)."""
    config: object
    sd: dict
    load: dict
    sources: dict
    derived: set


def stock_key_handling(sd: dict, metadata: dict):
    """ComfyUI's own key handling of its diffusion-model loader
    (``comfy.sd.load_diffusion_model_state_dict``), step by step with its functions: old
    quantized layouts converted, the checkpoint prefix stripped, the model detected, a
    diffusers-format file converted.  -> (model config or None, sd)."""
    import comfy.utils
    from comfy import model_detection
    sd, metadata = comfy.utils.convert_old_quants(dict(sd), "", metadata=metadata)
    prefix = model_detection.unet_prefix_from_state_dict(sd)
    stripped = comfy.utils.state_dict_prefix_replace(sd, {prefix: ""}, filter_keys=True)
    if stripped:
        sd, metadata = comfy.utils.convert_old_quants(stripped, "", metadata=metadata)
    config = model_detection.model_config_from_unet(sd, "", metadata=metadata)
    if config is None:
        converted = model_detection.convert_diffusers_mmdit(sd, "")
        if converted is not None:
            sd, config = converted, model_detection.model_config_from_unet(converted, "")
    return config, sd


def file_layout(path: str, config_spec: dict | None = None) -> FileLayout:
    """The file's ``FileLayout``; ``config_spec``: a carried model config (``pack_config``)
    to use instead of the detected one."""
    import comfy.utils
    read_header(path)
    raw = header_state_dict(path, small=16)
    config, sd = stock_key_handling(raw, file_metadata(path))
    if config_spec is not None:
        config = unpack_config(config_spec)
        quant = comfy.utils.detect_layer_quantization(sd, "")
        if quant:
            config.quant_config = quant
    if config is None:
        raise CarryError(f"ComfyUI cannot detect a diffusion model in {os.path.basename(path)}: its tensor names "
                         f"match no model ComfyUI knows (a LoRA, a VAE or a text encoder?): pick a diffusion model")
    load = config.process_unet_state_dict(dict(sd))
    # Where each tensor came from: ComfyUI's handling renames (the same tensor object) or
    # slices (a view of it); anything else was built, from nothing or from several.
    origin = {id(t): k for k, t in raw.items() if t.is_meta}
    sources, derived = {}, set()
    for k, t in load.items():
        if not t.is_meta:
            continue
        if id(t) in origin:
            sources[k] = (origin[id(t)], None)
        elif t._base is not None and id(t._base) in origin:
            sources[k] = (origin[id(t._base)], (tuple(t.shape), tuple(t.stride()), t.storage_offset()))
        else:
            derived.add(k)
    return FileLayout(config, sd, load, sources, derived)


def detect(path: str):
    """(model_config, state dict) as ComfyUI's diffusion-model loader detects them."""
    layout = file_layout(path)
    return layout.config, layout.sd


def stock_dtypes(config, sd, weight_dtype=None):
    """The (weight dtype, manual cast dtype) ComfyUI's stock loader picks for this file."""
    import comfy.model_management as mm
    import comfy.utils
    quantized = getattr(config, "quant_config", None) is not None
    unet_dtype = weight_dtype or mm.unet_dtype(model_params=comfy.utils.calculate_parameters(sd),
                                               supported_dtypes=list(config.supported_inference_dtypes),
                                               weight_dtype=None if quantized else comfy.utils.weight_dtype(sd))
    manual = mm.unet_manual_cast(None if quantized else unet_dtype, mm.get_torch_device(),
                                 config.supported_inference_dtypes)
    return unet_dtype, manual


def pack_config(model_config) -> dict | None:
    """The model config of a MODEL as JSON (its ``comfy.supported_models`` class and
    ``unet_config``), so that the workers build exactly the class the ComfyUI process has
    (a stock-loader MODEL may have been detected with file metadata an export does not
    keep).  None where it cannot be carried: the workers then detect from the file."""
    import comfy.supported_models as sm
    name = type(model_config).__name__
    if getattr(sm, name, None) is not type(model_config):
        return None

    def enc(v):
        if isinstance(v, torch.dtype):
            return {"__dtype__": dtype_name(v)}
        if isinstance(v, tuple):
            return {"__tuple__": [enc(x) for x in v]}
        if isinstance(v, list):
            return [enc(x) for x in v]
        if isinstance(v, dict):
            return {str(k): enc(x) for k, x in v.items()}
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        raise TypeError(type(v).__name__)
    try:
        return {"class": name, "unet_config": enc(model_config.unet_config)}
    except TypeError:
        return None


def unpack_config(spec: dict):
    import comfy.supported_models as sm

    def dec(v):
        if isinstance(v, dict) and "__dtype__" in v:
            return dtype_of(v["__dtype__"])
        if isinstance(v, dict) and "__tuple__" in v:
            return tuple(dec(x) for x in v["__tuple__"])
        if isinstance(v, dict):
            return {k: dec(x) for k, x in v.items()}
        if isinstance(v, list):
            return [dec(x) for x in v]
        return v
    return getattr(sm, spec["class"])(dec(spec["unet_config"]))


def meta_base_model(path: str, dtype, manual_cast, config: dict | None = None, real_buffers: bool = False):
    """ComfyUI's BaseModel for the file, its diffusion model on the meta device, and the
    file's ``FileLayout``: the carried ``config`` (``pack_config``), else the one ComfyUI's
    detection finds in the file.

    ``real_buffers`` (a worker, which runs the model): buffers are built for real on the CPU
    (``parameters_on_meta``).  Only in a worker process: the construction hook is
    process-wide, and the ComfyUI process builds stock models on other threads."""
    layout = file_layout(path, config)
    model_config = layout.config
    model_config.set_inference_dtype(dtype, manual_cast)
    if not real_buffers:
        base = model_config.get_model(layout.sd, "", device="meta")
        _lazy_weights_on_meta(base.diffusion_model, layout.load, dtype)
        return base, layout
    with parameters_on_meta():
        base = model_config.get_model(layout.sd, "", device="cpu")
    return base, layout


def _lazy_weights_on_meta(model, load: dict, dtype) -> None:
    """With DynamicVRAM (comfy-aimdo on: ComfyUI's default on NVIDIA GPUs) ComfyUI's layers
    make their weights only when a state dict is loaded into them; a model built on the
    meta device then has none, and its state dict (the LoRA key map, the split's sizes)
    misses every layer.  Give such a layer meta weights of the file's shapes, in the dtype
    it would hold."""
    for name, module in model.named_modules():
        for attr, lazy in (("weight", hasattr(module, "weight_comfy_model_dtype")),
                           ("bias", getattr(module, "comfy_need_lazy_init_bias", False))):
            src = load.get(f"{name}.{attr}" if name else attr)
            if lazy and getattr(module, attr, None) is None and src is not None:
                held = getattr(module, f"{attr}_comfy_model_dtype", None) or dtype or src.dtype
                setattr(module, attr, torch.nn.Parameter(torch.empty(src.shape, dtype=held, device="meta"),
                                                         requires_grad=False))


@contextlib.contextmanager
def parameters_on_meta():
    """Build a model with every parameter on the meta device but its buffers real, on the
    CPU: buffers that a model computes in its constructor and does not save
    (``persistent=False``, e.g. Cosmos' RoPE ranges) cannot be read from the file.  A
    parameter is allocated (uninitialised, untouched) only for the moment of its creation."""
    register = torch.nn.Module.register_parameter

    def to_meta(module, name, param):
        if param is not None and not param.is_meta:
            param = torch.nn.Parameter(param.data.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)
    torch.nn.Module.register_parameter = to_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def read_tensors(path: str, keys: list[str]):
    """Yield (key, CPU tensor) for ``keys`` of a safetensors file, read with plain file reads
    into fresh buffers: no memory map, so host RAM holds only what is being loaded."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        for key in keys:
            info = header[key]
            begin, end = info["data_offsets"]
            buf = torch.empty(end - begin, dtype=torch.uint8)
            f.seek(8 + n + begin)
            if f.readinto(buf.numpy()) != end - begin:
                raise CarryError(f"{os.path.basename(path)} ends inside tensor '{key}'")
            yield key, buf.view(_DTYPES[info["dtype"]]).reshape(info["shape"])


def load_stage_weights(diffusion_model, path: str, layout: FileLayout, prefixes: list[str], device) -> int:
    """Read only this stage's tensors from the file into the meta model, with the stock
    loader's key handling (``layout``) and in the dtype it would use (quantized layers keep
    their stored form and go through ComfyUI's own layer loading), one tensor at a time
    onto ``device``; returns the bytes read.

    A file whose conversion builds tensors from several (a diffusers-format file: fused
    projections concatenated) is converted as the stock loader does, from the whole file,
    and this stage keeps its part."""
    load = layout.load
    wanted = [k for k in load if k.startswith(tuple(prefixes))]
    params = dict(list(diffusion_model.named_parameters()) + list(diffusion_model.named_buffers()))
    saved = saved_names(diffusion_model)  # not the buffers a model computes itself
    missing = [n for n in params if n in saved and n.startswith(tuple(prefixes)) and n not in load]
    if missing:
        raise CarryError(f"{os.path.basename(path)} has no tensor {missing[0]!r} (and "
                         f"{len(missing) - 1} more) for this stage, after ComfyUI's key handling")
    quant_layers = {k[: -len(".comfy_quant")] for k in wanted if k.endswith(".comfy_quant")}
    for name, module in diffusion_model.named_modules():  # quantized layers load onto their factory device
        if name and f"{name}.".startswith(tuple(prefixes)) and isinstance(getattr(module, "factory_kwargs", None), dict):
            module.factory_kwargs["device"] = device

    def place(k, t):
        if k.endswith(".comfy_quant"):  # a quantized layer's config: ComfyUI (>= 0.2x) reads it on the host
            return t
        keep = k.rsplit(".", 1)[0] in quant_layers or k not in params
        return t.to(device=device) if keep else t.to(device=device, dtype=params[k].dtype)

    out, nbytes = {k: place(k, load[k]) for k in wanted if not load[k].is_meta}, 0
    if any(k in layout.derived for k in wanted):
        for k, t in converted_file(path, layout).items():
            if k in wanted and load[k].is_meta:
                nbytes += t.numel() * t.element_size()
                out[k] = place(k, t)
    else:
        users: dict[str, list] = {}
        for k in wanted:
            if load[k].is_meta:
                fkey, view = layout.sources[k]
                users.setdefault(fkey, []).append((k, view))
        for fkey, t in read_tensors(path, list(users)):
            nbytes += t.numel() * t.element_size()
            for k, view in users[fkey]:
                out[k] = place(k, t if view is None else t.as_strided(*view))
    # Module by module: a quantized layer outside this stage must not be asked to load.
    for pre in prefixes:
        if not pre.endswith("."):  # a top-level tensor of its own (e.g. a marker buffer)
            if pre in out and pre in diffusion_model._buffers:
                diffusion_model._buffers[pre] = out[pre]
            elif pre in out:
                diffusion_model._parameters[pre] = torch.nn.Parameter(out[pre], requires_grad=False)
            continue
        part = {k[len(pre):]: v for k, v in out.items() if k.startswith(pre)}
        if part:
            diffusion_model.get_submodule(pre.rstrip(".")).load_state_dict(part, strict=False, assign=True)
    return nbytes


def converted_file(path: str, layout: FileLayout) -> dict:
    """The whole file through the stock loader's key handling, for real: for files whose
    conversion builds tensors (``FileLayout.derived``).  Host RAM holds the converted
    model for the moment of placement."""
    import comfy.utils
    sd, metadata = comfy.utils.load_torch_file(path, return_metadata=True)
    _, sd = stock_key_handling(sd, metadata)
    return layout.config.process_unet_state_dict(sd)


def saved_names(model) -> set[str]:
    """Names of the parameters and saved buffers of a model (its state dict's keys, without
    asking quantized layers that have not been loaded yet for their state)."""
    out = {n for n, _ in model.named_parameters()}
    for prefix, module in model.named_modules():
        for name, buf in module._buffers.items():
            if buf is not None and name not in module._non_persistent_buffers_set:
                out.add(f"{prefix}.{name}" if prefix else name)
    return out


# -- a MODEL already in memory (stock loader), handed to the workers as a file ----------------
_EXPORTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # diffusion model -> export path
_USERS: dict[str, int] = {}  # export path -> live MODELs that use it
EXPORT_PREFIX = "pp-export-"


def unpatch_in_place(base) -> None:
    """ComfyUI patches weights (LoRA) in place when it loads a MODEL for its own sampler;
    unload the loaded MODELs on this BaseModel whose weights are patched, so that its
    weights are the file's again.  A MODEL loaded without weight patches stays loaded."""
    if getattr(base, "current_weight_patches_uuid", None) is None:
        return
    unload_from_comfy(base)
    if getattr(base, "current_weight_patches_uuid", None) is not None:
        raise CarryError("the MODEL's weights are patched in place and cannot be read unpatched; "
                         "load it again with Load Diffusion Model")


def loaded_from_file(model) -> str | None:
    """The diffusion-model file a stock-loader MODEL's weights are, untouched: ComfyUI records
    how it made a patcher (``cached_patcher_init``: ``comfy.sd.load_diffusion_model`` with
    the file and options), so the workers can read that file as the stock loader did; None
    where it did not (an older ComfyUI, a merged or an in-memory model) or with loader
    options that change the weights (custom operations)."""
    import comfy.sd
    init = getattr(model, "cached_patcher_init", None)
    if not init or init[0] is not comfy.sd.load_diffusion_model or len(init) > 2:
        return None
    args = init[1]
    path, options = args[0], (args[1] if len(args) > 1 else {}) or {}
    if set(options) - {"dtype", "fp8_optimizations"} or not isinstance(path, str) or not os.path.isfile(path):
        return None
    return path


def unload_from_comfy(base) -> None:
    """Unload the loaded MODELs on this BaseModel from ComfyUI's model management (their
    device copies, the weights a dynamic MODEL patched)."""
    import comfy.model_management as mm
    for i in range(len(mm.current_loaded_models) - 1, -1, -1):
        lm = mm.current_loaded_models[i]
        if lm.model is not None and lm.model.model is base:
            lm.model_unload()
            mm.current_loaded_models.pop(i)


def weights_fingerprint(diffusion_model) -> str:
    """Identifies a model's weights: names, shapes, dtypes and 16 values of every tensor
    (read where they are, in place).  Two MODEL objects loaded from the same file match."""
    import hashlib
    h = hashlib.sha256()
    for k, v in diffusion_model.state_dict().items():
        h.update(f"{k}:{tuple(v.shape)}:{v.dtype};".encode())
        if v.numel() and not v.is_meta:
            flat = v.detach().reshape(-1)
            k = min(16, flat.numel())
            idx = (torch.arange(k, dtype=torch.int64) * (flat.numel() - 1) // max(k - 1, 1)).to(flat.device)
            h.update(flat[idx].to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:24]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_exports(folder: str) -> None:
    """Exports left by a ComfyUI process that is gone (a crash: atexit never ran)."""
    for name in os.listdir(folder):
        parts = name.split("-")
        if name.startswith(EXPORT_PREFIX) and len(parts) > 3 and parts[2].isdigit() and not _pid_alive(int(parts[2])):
            try:
                os.remove(os.path.join(folder, name))
            except OSError:
                pass


def _release_export(path: str) -> None:
    _USERS[path] = _USERS.get(path, 1) - 1
    if _USERS[path] <= 0:
        _USERS.pop(path, None)
        try:
            os.remove(path)
        except OSError:
            pass


def export_weights(base, folder: str | None = None) -> str:
    """A MODEL already in memory (stock loader): its unpatched weights as one safetensors
    file that the workers read stage by stage.

    Written into ``folder`` (the nodes pass ComfyUI's temp directory, which ComfyUI empties
    at every start; default: the system's), once per weights: a MODEL object already
    exported returns at once, without touching the MODEL (it is not moved off the GPU); a
    new MODEL object with the same weights finds the same file by fingerprint.  The file is
    removed when no MODEL uses it any more, at exit, and (a crash) by the next process that
    exports into the folder."""
    from safetensors.torch import save_file
    diffusion_model = base.diffusion_model
    path = _EXPORTS.get(diffusion_model)
    if path and os.path.exists(path):
        return path
    unpatch_in_place(base)
    folder = folder or os.path.join(tempfile.gettempdir(), "pp-exports")
    os.makedirs(folder, exist_ok=True)
    _remove_stale_exports(folder)
    path = os.path.join(folder, f"{EXPORT_PREFIX}{os.getpid()}-{weights_fingerprint(diffusion_model)}.safetensors")
    if not os.path.exists(path):
        sd = {k: v.detach().to("cpu").contiguous() for k, v in diffusion_model.state_dict().items()}
        tmp = path + ".partial"
        save_file(sd, tmp)
        os.replace(tmp, path)  # a reader never sees half a file
        atexit.register(_remove_quietly, path)
    _EXPORTS[diffusion_model] = path
    _USERS[path] = _USERS.get(path, 0) + 1
    weakref.finalize(diffusion_model, _release_export, path)
    return path


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


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
    (``sampling_patches.py``).  Refused with the name of what added them: other object
    patches, callable sampler options, attention or block patches, unknown wrappers.
    """
    from . import sampling_patches
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
        patches = sampling_patches.describe(model)
    except sampling_patches.UnsupportedPatch as e:
        raise CarryError(str(e)) from None
    meta, tensors = {"options": options, "transformer_options": transformer_options, "model_sampling": None,
                     "sampling_patches": patches}, {}
    ms = model.object_patches.get("model_sampling") if hasattr(model, "object_patches") else None
    if ms is not None:
        meta["model_sampling"], ms_tensors = pack_model_sampling(ms)
        tensors.update({f"ms.{k}": v for k, v in ms_tensors.items()})
    return meta, tensors


def pack_model_sampling(ms) -> tuple[dict, dict]:
    import comfy.model_sampling as cms
    bases = [b.__name__ for b in type(ms).__mro__[1:]
             if b.__module__ == cms.__name__ and b.__name__ != "object"]
    if not bases:
        raise CarryError(f"model sampling {type(ms).__name__} is not built from comfy.model_sampling classes")
    scalars = {k: v for k, v in vars(ms).items()
               if not k.startswith("_") and isinstance(v, (int, float, bool, str)) and k != "training"}
    return {"bases": bases, "scalars": scalars}, {k: v for k, v in ms.state_dict().items()}


def unpack_model_sampling(meta: dict, tensors: dict):
    import comfy.model_sampling as cms
    # The direct bases, in MRO order, minus those already implied by an earlier one.
    classes = [getattr(cms, n) for n in meta["bases"]]
    direct = [c for c in classes if not any(c is not o and issubclass(o, c) for o in classes)]
    cls = type("ModelSamplingCarried", tuple(direct), {})
    ms = cls.__new__(cls)
    torch.nn.Module.__init__(ms)
    for k, v in meta["scalars"].items():
        setattr(ms, k, v)
    for k, v in tensors.items():
        ms.register_buffer(k, v)
    return ms


# -- weight patches (LoRA and friends) -----------------------------------------------------
DM = "diffusion_model."


def _pack_value(v, name, tensors):
    if torch.is_tensor(v):
        tensors[name] = v
        return {"t": "tensor", "k": name}
    if v is None or isinstance(v, (bool, int, float, str)):
        return {"t": "value", "v": v}
    if isinstance(v, (list, tuple)):
        return {"t": "tuple" if isinstance(v, tuple) else "list",
                "v": [_pack_value(e, f"{name}.{i}", tensors) for i, e in enumerate(v)]}
    import comfy.weight_adapter as wa
    if isinstance(v, wa.WeightAdapterBase) and type(v).__name__ in dir(wa):
        return {"t": "adapter", "cls": type(v).__name__, "keys": sorted(v.loaded_keys),
                "w": _pack_value(tuple(v.weights), f"{name}.w", tensors)}
    raise CarryError(f"a weight patch holds {type(v).__name__}, which PP KSampler cannot carry")


def _unpack_value(spec, tensors):
    t = spec["t"]
    if t == "tensor":
        return tensors[spec["k"]]
    if t == "value":
        return spec["v"]
    if t in ("tuple", "list"):
        items = [_unpack_value(e, tensors) for e in spec["v"]]
        return tuple(items) if t == "tuple" else items
    import comfy.weight_adapter as wa
    return getattr(wa, spec["cls"])(set(spec["keys"]), _unpack_value(spec["w"], tensors))


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
        entries, tensors = [], {}
        for j, (strength_patch, data, strength_model, offset, function) in enumerate(plist):
            if function is not None:
                raise CarryError(f"weight patch for '{key}' has a custom function; PP KSampler cannot carry it")
            entries.append({"strength_patch": strength_patch, "strength_model": strength_model,
                            "offset": offset, "data": _pack_value(data, f"wp.{key}.{j}", tensors)})
        for i in stages:
            per_stage[i].update(tensors)
        meta[key] = {"stages": stages, "entries": entries}
    return meta, per_stage


def unpack_weight_patches(meta: dict, tensors: dict, stage: int) -> dict:
    """{key: [patch tuples]} for this stage, as ModelPatcher.patches holds them."""
    out = {}
    for key, spec in meta.items():
        if stage not in spec["stages"]:
            continue
        out[key] = [(e["strength_patch"], _unpack_value(e["data"], tensors), e["strength_model"],
                     tuple(e["offset"]) if e["offset"] is not None else None, None) for e in spec["entries"]]
    return out


# -- conditioning ---------------------------------------------------------------------
def pack_tree(value, prefix: str, tensors: dict, what: str) -> dict:
    """Nested lists / tuples / dicts of tensors and plain values (MiniMax-H3's keyframes and
    references, its model input ``minimax_payload``) as JSON: torch's pytree spec and one
    description per leaf.  The tensors go into ``tensors`` as ``<prefix>.<j>``, each tensor
    object once (a keyframe's latent is also in the payload's ``cond_video_latents``)."""
    from torch.utils import _pytree as pytree
    leaves, spec = pytree.tree_flatten(value)
    seen, described = {}, []
    for leaf in leaves:
        if torch.is_tensor(leaf):
            j = seen.setdefault(id(leaf), len(seen))
            tensors[f"{prefix}.{j}"] = leaf
            described.append({"t": j})
        elif leaf is None or isinstance(leaf, (bool, int, float, str)):
            described.append({"v": leaf})
        else:
            raise CarryError(f"{what} holds {type(leaf).__name__}, which PP KSampler cannot carry to the workers")
    try:
        dumped = pytree.treespec_dumps(spec)
    except Exception as e:  # e.g. a dict with tuple keys, a custom pytree node
        raise CarryError(f"{what} has a structure PP KSampler cannot carry to the workers ({e})") from None
    return {"spec": dumped, "leaves": described}


def unpack_tree(packed: dict, prefix: str, tensors: dict):
    """The inverse of ``pack_tree``."""
    from torch.utils import _pytree as pytree
    leaves = [tensors[f"{prefix}.{d['t']}"] if "t" in d else d["v"] for d in packed["leaves"]]
    return pytree.tree_unflatten(leaves, pytree.treespec_loads(packed["spec"]))


def _is_tree(v) -> bool:
    """A list/tuple of dicts (MiniMax-H3's ``minimax_keyframes`` / ``minimax_refs``), carried
    with ``pack_tree``."""
    return isinstance(v, (list, tuple)) and bool(v) and all(isinstance(x, dict) for x in v)


def pack_conditioning(name: str, conditioning) -> tuple[list, dict]:
    """CONDITIONING ([[tensor, {options}], ...]) as JSON + tensors named '<name>.<i>.<key>'."""
    meta, tensors = [], {}
    for i, (cond, opts) in enumerate(conditioning):
        tensors[f"{name}.{i}.cond"] = cond
        entry = {}
        for k, v in opts.items():
            key = f"{name}.{i}.{k}"
            if torch.is_tensor(v):
                tensors[key] = v
                entry[k] = {"t": "tensor"}
            elif isinstance(v, (list, tuple)) and v and all(torch.is_tensor(x) for x in v):
                for j, x in enumerate(v):
                    tensors[f"{key}.{j}"] = x
                entry[k] = {"t": "tensors", "n": len(v)}
            elif v is None or isinstance(v, (bool, int, float, str)):
                entry[k] = {"t": "value", "v": v}
            elif isinstance(v, (list, tuple)) and all(isinstance(x, (bool, int, float, str)) for x in v):
                entry[k] = {"t": "tuple" if isinstance(v, tuple) else "list", "v": list(v)}
            elif type(v).__name__ == "Output" and type(v).__module__ == "comfy.clip_vision":
                entry[k] = _pack_clip_vision(name, k, v, key, tensors)  # CLIP vision (Wan i2v, Z-Image omni)
            elif _is_tree(v):  # MiniMax-H3's keyframes (MiniMaxH3AddGuide) and references (ReferenceToVideo)
                entry[k] = {"t": "tree", **pack_tree(v, key, tensors, f"the {name} conditioning's '{k}'")}
            elif k == "control":
                raise CarryError("the conditioning has a ControlNet (Apply ControlNet); PP KSampler does not "
                                 "run ControlNets yet: remove it or use the stock KSampler")
            else:
                raise CarryError(f"the {name} conditioning has '{k}' ({type(v).__name__}), which PP KSampler "
                                 f"cannot carry to the workers: remove the node that added it")
        meta.append(entry)
    return meta, tensors


def _pack_clip_vision(name: str, k: str, v, key: str, tensors: dict) -> dict:
    """A CLIP vision output: its tensors, its lists of image sizes (``image_sizes``, ComfyUI
    0.3x), its plain values; anything else is refused by name."""
    spec = {"t": "clip_vision_output", "keys": [], "sizes": {}, "values": {}}
    for a, x in vars(v).items():
        if torch.is_tensor(x):
            tensors[f"{key}.{a}"] = x
            spec["keys"].append(a)
        elif isinstance(x, (list, tuple)) and all(isinstance(e, torch.Size) for e in x):
            spec["sizes"][a] = [list(e) for e in x]
        elif _plain(x):
            spec["values"][a] = x
        else:
            raise CarryError(f"the {name} conditioning's '{k}' (CLIP vision output) has '{a}' "
                             f"({type(x).__name__}), which PP KSampler cannot carry to the workers: remove the "
                             f"node that added it")
    return spec


def unpack_conditioning(name: str, meta: list, tensors: dict) -> list:
    out = []
    for i, entry in enumerate(meta):
        opts = {}
        for k, spec in entry.items():
            key = f"{name}.{i}.{k}"
            if spec["t"] == "tensor":
                opts[k] = tensors[key]
            elif spec["t"] == "tensors":
                opts[k] = [tensors[f"{key}.{j}"] for j in range(spec["n"])]
            elif spec["t"] == "tuple":
                opts[k] = tuple(spec["v"])
            elif spec["t"] == "tree":
                opts[k] = unpack_tree(spec, key, tensors)
            elif spec["t"] == "clip_vision_output":
                import comfy.clip_vision
                clip = comfy.clip_vision.Output()
                for a in spec["keys"]:
                    clip[a] = tensors[f"{key}.{a}"]
                for a, sizes in spec.get("sizes", {}).items():
                    clip[a] = [torch.Size(x) for x in sizes]
                for a, x in spec.get("values", {}).items():
                    clip[a] = x
                opts[k] = clip
            else:
                opts[k] = spec["v"]
        out.append([tensors[f"{name}.{i}.cond"], opts])
    return out


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


def load_on_disk(path: str, weight_dtype=None):
    """A MODEL for pipeline-parallel sampling whose weights stay in the file: ComfyUI's own
    model class on the meta device (shapes, latent format, model sampling), no tensors
    read.  The workers load their stages from ``path``."""
    import comfy.model_management as mm
    import comfy.model_patcher

    config, sd = detect(path)
    dtype, manual = stock_dtypes(config, sd, weight_dtype)
    base, _ = meta_base_model(path, dtype, manual)
    model_profile(base.diffusion_model)  # a family that cannot be staged is refused here, with what to use
    base.pp_source = {"path": os.path.abspath(path), "dtype": dtype_name(dtype), "manual_cast": dtype_name(manual),
                      "config": pack_config(config), "stamp": file_stamp(path)}

    class OnDiskModelPatcher(comfy.model_patcher.ModelPatcher):
        def _refuse(self, *args, **kwargs):
            raise RuntimeError("this MODEL comes from PP Load Diffusion Model: its weights stay on disk for the "
                               "pipeline workers. Connect it to PP KSampler, or load it with the stock "
                               "Load Diffusion Model node for other samplers")
        load = patch_model = partially_load = _refuse

    return OnDiskModelPatcher(base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())
