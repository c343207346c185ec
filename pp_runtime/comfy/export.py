"""A stock-loader MODEL's weights for the workers: read from the file it came from, or exported.

A MODEL that ComfyUI loaded from a file (``cached_patcher_init``) is read by the workers
from that file; one that has no file (merged or trained in memory) is written once into
ComfyUI's temp folder as a safetensors file, named by a fingerprint of its weights.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import struct
import tempfile
import weakref

import torch

from .carry import CarryError


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
        state = diffusion_model.state_dict()
        nbytes = sum(v.numel() * v.element_size() for v in state.values())
        check_room(folder, nbytes)
        logging.info("PP KSampler: this MODEL has no file the workers can read (merged or made in memory): "
                     "writing its weights once, %.1f GB, to %s", nbytes / 1e9, folder)
        tmp = path + ".partial"
        try:
            save_streamed(state, tmp)
        except BaseException:
            _remove_quietly(tmp)
            raise
        os.replace(tmp, path)  # a reader never sees half a file
        atexit.register(_remove_quietly, path)
    _EXPORTS[diffusion_model] = path
    _USERS[path] = _USERS.get(path, 0) + 1
    weakref.finalize(diffusion_model, _release_export, path)
    return path


def check_room(folder: str, nbytes: int) -> None:
    """Refuse an export that the folder's disk cannot hold (with 1 GB to spare), saying what to do."""
    free = shutil.disk_usage(folder).free
    if nbytes + (1 << 30) > free:
        raise CarryError(f"handing this MODEL to the workers means writing its weights, {nbytes / 1e9:.1f} GB, "
                         f"to {folder}, whose disk has {free / 1e9:.1f} GB free: load the model with PP Load "
                         f"Diffusion Model (or the stock loader, from its file: no copy), or set PP_EXPORT_DIR "
                         f"to a folder with room")


def save_streamed(state: dict, path: str) -> None:
    """``state`` as a safetensors file, one tensor at a time through host memory (no copy of
    the whole model in this process)."""
    from .loading import _DTYPES
    names = {v: k for k, v in _DTYPES.items()}
    header, at = {}, 0
    for k, v in state.items():
        n = v.numel() * v.element_size()
        header[k] = {"dtype": names[v.dtype], "shape": list(v.shape), "data_offsets": [at, at + n]}
        at += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for v in state.values():
            if v.numel():
                f.write(v.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass
