"""Jobs of the seed's diffusers-scheduler loop: validated on the host before any worker starts.

A model is named by a *model spec*: ``{"factory": "module:function", "kwargs": {...},
"dtype": "float32"}``; the factory builds a ``StagedModel`` (deterministically, so every
rank gets the same weights).  The host builds it on the meta device to learn its blocks
and cost without allocating anything, resolves the split and the layout, and rejects
impossible combinations with a message that names what to change.
"""
from __future__ import annotations

import importlib
import inspect

import torch

from ..engine.layout import JobError, choose_layout
from .schedulers import SCHEDULERS
from ..engine.split import Split, split_blocks


def import_factory(path: str):
    module, _, name = path.partition(":")
    if not module or not name:
        raise JobError(f"model factory '{path}' must look like 'package.module:function'")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise JobError(f"cannot import model factory '{path}': {e}") from e


def model_profile(spec: dict) -> dict:
    """Blocks, per-block cost and bytes of a model spec, from a meta-device build."""
    with torch.device("meta"):
        model = import_factory(spec["factory"])(**spec.get("kwargs", {}))
    scale = torch.tensor([], dtype=getattr(torch, spec.get("dtype", "float32"))).element_size() / 4
    return {"num_blocks": model.num_blocks, "costs": model.block_costs(),
            "block_bytes": [int(b * scale) for b in model.block_bytes()],
            "first_bytes": int(getattr(model, "embed_bytes", lambda: 0)() * scale),
            "last_bytes": int(getattr(model, "head_bytes", lambda: 0)() * scale)}


def prepare_denoise_job(world: int, model: dict, *, latent_shape, steps: int, seed: int,
                        scheduler: str = "flow_euler", guidance_scale: float = 1.0, cfg_mode: str = "sequential",
                        cfg_normalize: bool = False, output_slice: int | None = None,
                        split: str = "balanced", manual: str | None = None,
                        device_weights: list[float] | None = None, micro_batch_size: int = 1) -> dict:
    if scheduler not in SCHEDULERS:
        raise JobError(f"scheduler '{scheduler}' is unknown; use one of {', '.join(SCHEDULERS)}")
    if int(steps) < 1:
        raise JobError(f"steps must be at least 1, got {steps}")
    do_cfg = cfg_mode != "off" and guidance_scale != 1.0
    layout = dict(choose_layout(world, cfg_mode, do_cfg).degrees)
    prof = model_profile(model)
    try:
        sp = split_blocks(split, prof["num_blocks"], layout["pp"], costs=prof["costs"],
                          block_bytes=prof["block_bytes"], first_bytes=prof["first_bytes"],
                          last_bytes=prof["last_bytes"], device_weights=device_weights, manual=manual)
    except ValueError as e:
        raise JobError(str(e)) from e
    return {"kind": "denoise", "model": model, "split": list(sp.counts), "layout": layout,
            "sampling": {"latent_shape": [int(s) for s in latent_shape], "steps": int(steps), "seed": int(seed),
                         "scheduler": scheduler, "guidance_scale": float(guidance_scale),
                         "cfg": cfg_mode != "off", "cfg_normalize": bool(cfg_normalize),
                         "output_slice": output_slice},
            "micro_batch_size": int(micro_batch_size), "batched_cfg": cfg_mode == "batched",
            "tensors_to": "first"}  # conditioning: only the first stage of each pipeline embeds it


def build_stage(model_spec: dict, counts: list[int], stage: int, device: torch.device):
    """Build the model and keep only ``stage``'s part, on ``device``.

    A factory that accepts ``stage`` (start, end, is_first, is_last), ``device`` and
    ``dtype`` builds only that part, in place (large models: nothing else is ever
    allocated).  Otherwise the whole model is built on the CPU, pruned, then moved.
    """
    sp = Split(tuple(counts))
    start, end = sp.ranges[stage]
    where = (start, end, stage == 0, stage == len(counts) - 1)
    dtype = getattr(torch, model_spec.get("dtype", "float32"))
    factory = import_factory(model_spec["factory"])
    if "stage" in inspect.signature(factory).parameters:
        model = factory(**model_spec.get("kwargs", {}), stage=where, device=device, dtype=dtype)
    else:
        model = factory(**model_spec.get("kwargs", {}))
        if hasattr(model, "prune"):
            model.prune(*where)
        model = model.to(device=device, dtype=dtype)
    model.eval().requires_grad_(False)
    return model, (start, end)
