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

# Every flag of ComfyUI's comfy/cli_args.py (v0.8 and v0.33; tests/test_environment.py fails
# on a flag of the running ComfyUI that is in neither table): those a worker takes, and why
# the others stay with the ComfyUI process.
CARRIED_FLAGS = (
    # precision and dtypes of the diffusion model
    "force_fp32", "force_fp16", "fp32_unet", "fp64_unet", "bf16_unet", "fp16_unet", "fp8_e4m3fn_unet",
    "fp8_e5m2_unet", "fp8_e8m0fnu_unet", "fp16_intermediates", "supports_fp8_compute", "fast",
    "force_channels_last", "deterministic",
    # attention kernels
    "use_split_cross_attention", "use_quad_cross_attention", "use_pytorch_cross_attention", "use_sage_attention",
    "use_flash_attention", "use_ck_attention", "disable_xformers", "force_upcast_attention",
    "dont_upcast_attention",
    # kernel backends and graphs
    "enable_triton_backend", "disable_triton_backend", "disable_cuda_graphs", "disable_ipex_optimize",
    # the console's log level (``verbose``: a level name; a list of (level, file) since 0.2x)
    "verbose",
)
NOT_CARRIED = {
    "memory and offloading (a worker holds its whole stage on its device; PP Worker Group's memory_cap_gb "
    "bounds it)": ("lowvram", "novram", "normalvram", "highvram", "gpu_only", "reserve_vram", "vram_headroom",
                   "disable_smart_memory", "async_offload", "disable_async_offload", "disable_pinned_memory",
                   "cuda_malloc", "disable_cuda_malloc", "disable_mmap", "mmap_torch_files", "high_ram",
                   "fast_disk", "force_non_blocking", "enable_dynamic_vram", "disable_dynamic_vram",
                   "disable_nvml_pressure", "cache_classic", "cache_lru", "cache_none", "cache_ram"),
    "devices (a worker's device is its entry of PP Worker Group's devices)": (
        "cpu", "cuda_device", "default_device", "directml", "oneapi_device_selector"),
    "models the ComfyUI process runs (text encoders, VAE)": (
        "bf16_text_enc", "fp16_text_enc", "fp32_text_enc", "fp8_e4m3fn_text_enc", "fp8_e5m2_text_enc",
        "bf16_vae", "fp16_vae", "fp32_vae", "cpu_vae"),
    "the server, its files and its frontend": (
        "listen", "port", "tls_certfile", "tls_keyfile", "enable_cors_header", "max_upload_size",
        "enable_compress_response_body", "base_directory", "extra_model_paths_config", "output_directory",
        "temp_directory", "input_directory", "user_directory", "models_directory", "auto_launch",
        "disable_auto_launch", "dont_print_server", "log_stdout", "front_end_version", "front_end_root",
        "multi_user", "database_url", "comfy_api_base", "disable_api_nodes", "disable_all_custom_nodes",
        "whitelist_custom_nodes", "enable_manager", "disable_manager_ui", "enable_manager_legacy_ui",
        "windows_standalone_build", "quick_test_for_ci", "disable_metadata", "default_hashing_function",
        "preview_method", "preview_size", "enable_assets", "enable_asset_hashing", "feature_flag",
        "list_feature_flags", "debug_hang"),
    # ComfyUI >= 0.34's model compiler (comfy-aimdo graphs around the forward): a stage leaves
    # the forward at its boundary, so a worker never turns it on (worker.import_comfy).
    "the model compiler (always off in a worker)": ("disable_comfy_compiler", "assert_graph_breaks"),
}
ENV_FLAGS = "PP_COMFY_ARGS"


def _log_level(value):
    """``--verbose``'s console level: the value itself (older ComfyUI), or, for a list of
    (level, file or None) outputs (ComfyUI 0.2x and later), ComfyUI's own reading of it."""
    if isinstance(value, (list, tuple)):
        from comfy.cli_args import get_console_log_level
        return get_console_log_level(value)
    return value


def comfy_flags() -> dict:
    """The carried flags of this (ComfyUI) process, as JSON values; {} if ComfyUI's arguments
    were never parsed here."""
    mod = sys.modules.get("comfy.cli_args")
    if mod is None:
        return {}
    out = {}
    for name in CARRIED_FLAGS:
        if not hasattr(mod.args, name):
            continue
        value = getattr(mod.args, name)
        if name == "verbose":
            value = _log_level(value)
        elif isinstance(value, (set, frozenset, list, tuple)):  # --fast: a set of PerformanceFeature
            value = sorted(getattr(v, "value", v) for v in value)
        if isinstance(value, (bool, int, float, str, list)) or value is None:
            out[name] = value
    return out


def apply_comfy_flags(flags: dict) -> None:
    """In a worker, before ComfyUI's model management is imported: set the carried flags
    that this ComfyUI has (a flag of another release is ignored), and keep the model
    compiler off."""
    from comfy.cli_args import args
    for name, value in flags.items():
        if name not in CARRIED_FLAGS or not hasattr(args, name):
            continue
        if name == "fast":
            from comfy.cli_args import PerformanceFeature
            value = {PerformanceFeature(v) for v in (value or []) if v in {f.value for f in PerformanceFeature}}
        elif name == "verbose":
            import logging
            if value:
                logging.getLogger().setLevel(value)
            continue
        setattr(args, name, value)
    if hasattr(args, "disable_comfy_compiler"):
        args.disable_comfy_compiler = True


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
