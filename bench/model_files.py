"""Random-weight model files at the released sizes, for the GPU benchmarks.

``write(name, path)`` builds the model of ``family_table.RELEASES`` on the meta device with
ComfyUI's own classes, and streams seeded random bf16 weights into a safetensors file in
the key layout the stock loader reads, one tensor at a time (host RAM holds one tensor,
not the model).  Values: weights N(0, 1/fan_in), norm scales 1 + N(0, 0.02), biases and
the rest N(0, 0.02): activations stay O(1) through all the blocks.  Generated on the GPU
when there is one (fast), from a generator seeded by the tensor's name.
"""
from __future__ import annotations

import json
import math
import os
import struct
import zlib

import torch

DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float8_e4m3fn: "F8_E4M3"}


def release_model(name: str):
    """(model config, diffusion model on the meta device) of a RELEASES entry."""
    import comfy.supported_models as sm
    from family_table import RELEASES
    entry = next((r for r in RELEASES if r[0] == name), None)
    if entry is None:
        raise KeyError(f"no release '{name}' in bench/family_table.py")
    _, cls, unet = entry
    cfg = getattr(sm, cls)(dict(unet))
    cfg.set_inference_dtype(torch.bfloat16, None)
    # Every weight, also under DynamicVRAM (whose layers make theirs only when a file is loaded)
    import sys
    mem = sys.modules.get("comfy.memory_management")
    was = getattr(mem, "aimdo_enabled", False)
    if mem is not None:
        mem.aimdo_enabled = False
    try:
        return cfg, cfg.get_model({}, "", device="meta").diffusion_model
    finally:
        if mem is not None:
            mem.aimdo_enabled = was


def _value(name: str, shape, device, dtype) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(zlib.crc32(name.encode()))
    r = torch.randn(shape, generator=g, device=device, dtype=torch.float32)
    last = name.rsplit(".", 1)[-1]
    if len(shape) == 1 and ("norm" in name or last in ("scale", "weight")):
        r = 1 + 0.02 * r
    elif last == "weight" and len(shape) >= 2:
        r = r / math.sqrt(math.prod(shape[1:]))
    else:
        r = 0.02 * r
    return r.to(dtype)


def write(dm: torch.nn.Module, path: str, dtype=torch.bfloat16, device=None, fp8_matrices: bool = False) -> int:
    """Stream the model's state dict, filled with seeded random values, into ``path``;
    ``fp8_matrices``: the blocks' weight matrices in ComfyUI's scaled-fp8 layout (float8_e4m3fn
    weights, a per-layer ``scale_weight``, the ``scaled_fp8`` marker), as released fp8 files;
    everything else in ``dtype``."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    entries = []  # (key, shape, file dtype, what: "value" | "scale" | "marker")
    for k, v in dm.state_dict().items():
        if not v.is_floating_point():
            entries.append((k, tuple(v.shape), v.dtype, "zeros"))
        elif fp8_matrices and v.dim() == 2 and k.endswith(".weight") and ".blocks." in f".{k}":
            entries.append((k, tuple(v.shape), torch.float8_e4m3fn, "fp8"))
            entries.append((k[: -len(".weight")] + ".scale_weight", (1,), torch.float32, "scale"))
        else:
            entries.append((k, tuple(v.shape), dtype, "value"))
    if fp8_matrices:
        entries.append(("scaled_fp8", (0,), torch.float8_e4m3fn, "zeros"))
    header, offset = {}, 0
    for k, shape, dt, _ in entries:
        n = math.prod(shape) * torch.empty(0, dtype=dt).element_size()
        header[k] = {"dtype": DTYPES.get(dt, "I64"), "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path + ".partial"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for k, shape, dt, what in entries:
            if what == "zeros":
                t = torch.zeros(shape, dtype=dt)
            elif what == "scale":  # N(0, 1/fan_in) weights stored as w / scale in fp8's range
                t = torch.full(shape, 1.0 / 64, dtype=dt)
            elif what == "fp8":
                t = (_value(k, shape, device, torch.float32) * 64).to(dt)
            else:
                t = _value(k, shape, device, dt)
            f.write(t.contiguous().cpu().view(torch.uint8).numpy().tobytes())
    os.replace(tmp, path)
    return offset
