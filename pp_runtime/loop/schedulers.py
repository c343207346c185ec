"""Diffusers schedulers for the engine's own loop, made per request from a name.

Each request gets a fresh scheduler (they keep multistep history), built the same way
on every rank so all ranks agree on the timesteps; only the last rank calls ``step``.
Flow schedulers match flow-matching DiTs (Flux, Wan, Qwen-Image); ``dpmpp_2m`` is the
classic epsilon-prediction DPM-Solver++(2M).  Stochastic variants draw their noise from
the request's generator on the last rank, so they reproduce a single-process run.
"""
from __future__ import annotations

import importlib

SCHEDULERS = {
    # name: (diffusers class, config, stochastic).  diffusers is imported on first use: it is slow
    # to import and a worker that never runs a diffusers job should not pay for it.
    "flow_euler": ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0}, False),
    "flow_euler_sde": ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0, "stochastic_sampling": True}, True),
    "unipc_flow": ("UniPCMultistepScheduler", {"use_flow_sigmas": True, "prediction_type": "flow_prediction",
                                               "flow_shift": 3.0}, False),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, False),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}, True),
}


def make_scheduler(name: str, steps: int, overrides: dict | None = None):
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler '{name}' is unknown; use one of {', '.join(SCHEDULERS)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    cls_name, config, _ = SCHEDULERS[name]
    cls = getattr(importlib.import_module("diffusers"), cls_name)
    scheduler = cls(**{**config, **(overrides or {})})
    scheduler.set_timesteps(steps)
    return scheduler
