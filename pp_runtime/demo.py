"""See it work: a 2-process CPU worker group runs the pipelined loop on a small built-in
DiT with sequential CFG, and the result is compared with one process running the same
code.  ``python -m pp_runtime.demo [--devices cpu,cpu] [--steps 8]``
"""
from __future__ import annotations

import argparse
import time

import torch

from .context import PPContext
from .group import WorkerGroup
from .jobs import build_stage, prepare_denoise_job
from .pipeline import PPDenoiser

MODEL = {"factory": "pp_runtime.models.toy:build",
         "kwargs": {"depth": 8, "dim": 128, "heads": 4, "context_dim": 64, "seed": 0}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", default="cpu,cpu")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--scheduler", default="flow_euler")
    ap.add_argument("--cfg-mode", default="sequential")
    ap.add_argument("--size", type=int, default=32, help="latent height and width")
    args = ap.parse_args(argv)

    g = torch.Generator().manual_seed(0)
    pos = {"context": torch.randn(1, 16, 64, generator=g)}
    neg = {"context": torch.randn(1, 16, 64, generator=g)}
    group = WorkerGroup(args.devices, cpu_threads=1 if "cpu" in args.devices else None)
    job = prepare_denoise_job(group.world, MODEL, latent_shape=[1, 4, args.size, args.size], steps=args.steps,
                              seed=42, scheduler=args.scheduler, guidance_scale=4.0, cfg_mode=args.cfg_mode)
    print(f"model: built-in toy DiT, {MODEL['kwargs']['depth']} blocks; group: {group.devices}; "
          f"layout pp{job['layout']['pp']} x cfg{job['layout']['cfg']}; split {job['split']}")
    t0 = time.perf_counter()
    group.start()
    print(f"worker group up in {time.perf_counter() - t0:.1f} s")
    tensors = {"positive.context": pos["context"], "negative.context": neg["context"]}
    try:
        group.run(job, tensors)  # places the model, warms up
        stamps = []
        res = group.run(job, tensors, on_step=lambda i, n, lat: stamps.append(time.perf_counter()))
        pp_step = (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1)
        print(f"pipeline: {len(stamps)} steps streamed back, placed model reused: "
              f"{not any(r['loaded'] for r in res['ranks'])}")
    finally:
        group.shutdown()

    model, rng = build_stage(MODEL, [sum(job["split"])], 0, torch.device("cpu"))
    single = PPDenoiser(PPContext.single(), model, rng)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' thread count: same kernels, same reduction order
    with torch.inference_mode():
        ref = single.denoise(positive=pos, negative=neg, **job["sampling"])
        t0 = time.perf_counter()
        single.denoise(positive=pos, negative=neg, **job["sampling"])
        one_step = (time.perf_counter() - t0) / args.steps
    torch.set_num_threads(threads)
    diff = (res["latents"] - ref).abs().max().item()
    print(f"parity vs one process: max |diff| = {diff:.3e}  ({'OK' if diff <= 1e-5 else 'MISMATCH'})")
    print(f"time per step: pipeline {pp_step * 1e3:.1f} ms, one process {one_step * 1e3:.1f} ms "
          f"(CPU workers, 1 thread each; the speedup is a GPU matter, see bench/)")
    return 0 if diff <= 1e-5 else 1


if __name__ == "__main__":
    raise SystemExit(main())
