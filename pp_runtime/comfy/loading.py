"""Reading a model file as ComfyUI's loader does, and placing one stage's weights.

The ComfyUI process detects the model config from the file's header alone and builds
ComfyUI's model class on the meta device (PP Load Diffusion Model: no tensor read); a
worker does the same, then reads only the tensors of its own stage, through ComfyUI's own
key handling, in the dtype the stock loader would use, straight onto its device.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import weakref
from dataclasses import dataclass

import torch

from ..engine import tree
from .carry import CarryError


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


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

    tensors: dict = {}
    try:  # the one encoding (a config of plain values: one with tensors is not carried)
        packed = tree.pack(model_config.unet_config, "config", tensors, "the model config")
    except tree.TreeError:
        return None
    return None if tensors else {"class": name, "unet_config": packed}


def unpack_config(spec: dict):
    import comfy.supported_models as sm
    return getattr(sm, spec["class"])(tree.unpack(spec["unet_config"], "config", {}))


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


def read_tensors(path: str, keys: list[str], device=None):
    """Yield (key, tensor) for ``keys`` of a safetensors file, without a memory map, so host
    RAM holds only what is being loaded: onto a CUDA ``device`` through a few pinned buffers,
    read ahead of asynchronous copies (``file_reads``); otherwise on the CPU, each read with
    plain file reads into its own fresh buffer."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        if device is not None and torch.device(device).type == "cuda":
            from .file_reads import read_to_device
            spans = {k: (_DTYPES[header[k]["dtype"]], header[k]["shape"], *header[k]["data_offsets"]) for k in keys}
            yield from read_to_device(path, 8 + n, spans, device)
            return
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
            return t.cpu()
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
        for fkey, t in read_tensors(path, list(users), device):
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
