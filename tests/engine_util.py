"""Shared helpers for the engine tests: run a job on a group and the same job in one process."""
import torch

from pp_runtime.engine.context import PPContext
from pp_runtime.loop.jobs import build_stage, prepare_denoise_job
from pp_runtime.loop.denoiser import PPDenoiser

TOY = {"factory": "toy_models:build", "kwargs": {"seed": 7}}
DIT = {"factory": "pp_runtime.loop.models.toy:build", "kwargs": {"depth": 5, "dim": 32, "heads": 2, "seed": 3}}


def conditioning(batch=1, context_dim=8, tokens=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ({"context": torch.randn(batch, tokens, context_dim, generator=g)},
            {"context": torch.randn(batch, tokens, context_dim, generator=g)})


def as_tensors(positive, negative):
    out = {f"positive.{k}": v for k, v in positive.items()}
    out.update({f"negative.{k}": v for k, v in (negative or {}).items()})
    return out


def reference(job, positive, negative):
    """The same job in this process: PP=1, CFG=1, same plan, same code, and the workers'
    thread count (1), so that CPU kernels reduce in the same order."""
    model, rng = build_stage(job["model"], [sum(job["split"])], 0, torch.device("cpu"))
    d = PPDenoiser(PPContext.single(), model, rng, job["micro_batch_size"], job["batched_cfg"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            return d.denoise(positive=positive, negative=negative, **job["sampling"])
    finally:
        torch.set_num_threads(threads)


def run_parity(group, model=TOY, positive=None, negative=None, **kw):
    job = prepare_denoise_job(group.world, model, **kw)
    steps = []
    res = group.run(job, as_tensors(positive, negative), on_step=lambda i, n, lat: steps.append(i))
    ref = reference(job, positive, negative)
    return job, res, ref, steps
