"""What a worker inherits from the ComfyUI process: ComfyUI's flags, the GPUs, the loopback.

* ComfyUI's command-line flags that change what a model computes (attention kernels,
  upcasting, fp8 matmuls, determinism, precision overrides) are carried to every worker and
  set before the worker imports ComfyUI's model management, so a stage runs the kernels
  stock runs.  Memory and offloading flags (``--lowvram``, ``--reserve-vram``, ...) stay
  with the ComfyUI process: a worker holds its whole stage on its device (use PP Worker
  Group's ``memory_cap_gb`` to bound it).  Process, server and path flags do not apply.
* Devices: ``cuda:N`` means the N-th GPU the ComfyUI process sees, so a worker's
  ``CUDA_VISIBLE_DEVICES`` (or ``HIP_VISIBLE_DEVICES`` on ROCm) is the N-th entry of the
  parent's, when the parent's is set (``--cuda-device``, a container, a job scheduler).
* The loopback interface's name (``lo`` on Linux, ``lo0`` on macOS and the BSDs), for gloo.
"""
from __future__ import annotations

import json
import os
import socket
import sys

# ComfyUI flags that change a stage's numbers or kernels (comfy/cli_args.py of v0.8).
CARRIED_FLAGS = ("force_fp32", "force_fp16", "fp32_unet", "fp64_unet", "bf16_unet", "fp16_unet",
                 "force_channels_last", "supports_fp8_compute", "use_split_cross_attention",
                 "use_quad_cross_attention", "use_pytorch_cross_attention", "use_sage_attention",
                 "use_flash_attention", "disable_xformers", "force_upcast_attention", "dont_upcast_attention",
                 "deterministic", "fast", "disable_ipex_optimize", "verbose")
ENV_FLAGS = "PP_COMFY_ARGS"


def comfy_flags() -> dict:
    """The carried flags of this (ComfyUI) process, as JSON values; {} if ComfyUI's arguments
    were never parsed here."""
    mod = sys.modules.get("comfy.cli_args")
    if mod is None:
        return {}
    out = {}
    for name in CARRIED_FLAGS:
        value = getattr(mod.args, name, None)
        if isinstance(value, (set, frozenset, list, tuple)):  # --fast: a set of PerformanceFeature
            value = sorted(getattr(v, "value", v) for v in value)
        if isinstance(value, (bool, int, float, str, list)) or value is None:
            out[name] = value
    return out


def apply_comfy_flags(flags: dict) -> None:
    """In a worker, before ComfyUI's model management is imported: set the carried flags."""
    from comfy.cli_args import args
    for name, value in flags.items():
        if name not in CARRIED_FLAGS:
            continue
        if name == "fast":
            from comfy.cli_args import PerformanceFeature
            value = {PerformanceFeature(v) for v in (value or [])}
        setattr(args, name, value)


def flags_from_env() -> dict:
    text = os.environ.get(ENV_FLAGS)
    return json.loads(text) if text else {}


def visible_device(index: int) -> tuple[str, str]:
    """(variable, value) that makes a worker see the parent's ``cuda:index`` as its only GPU."""
    for var in ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES"):
        value = os.environ.get(var)
        if value is not None and value.strip():
            ids = [v.strip() for v in value.split(",") if v.strip()]
            if index >= len(ids):
                raise ValueError(f"device 'cuda:{index}' does not exist: ComfyUI sees {len(ids)} GPU(s) "
                                 f"({var}={value})")
            return var, ids[index]
    return "CUDA_VISIBLE_DEVICES", str(index)


def loopback_interface() -> str:
    """The name of the loopback network interface of this machine."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except (OSError, AttributeError):  # no if_nameindex (Windows)
        return "lo"
    for name in ("lo", "lo0"):
        if name in names:
            return name
    return next((n for n in names if n.startswith("lo")), "lo")


def check_platform() -> None:
    """The local backend needs torch.distributed's gloo (CPU) or NCCL (GPU) over a loopback
    network: on Windows refuse with what to use instead, before any process starts."""
    if sys.platform.startswith("win"):
        raise ValueError("pipeline-parallel sampling does not run on Windows: torch.distributed has no NCCL there "
                         "and its gloo backend is not supported by this pack. Run ComfyUI under WSL2 or Linux")
