"""Tier 2: each worker holds only its stage; two models stay placed; residency.

Real ComfyUI model files (random weights, ComfyUI's own classes and loader), real worker
processes.  Memory is measured, not assumed: the host's resident set around
``load_on_disk`` (PP Load Diffusion Model) and each worker's peak resident set (VmHWM)
around placing its stage.
"""
import os

import pytest
import torch

from comfy_env import require_comfy

COMFY_ROOT = require_comfy()

import comfy.sample  # noqa: E402
import comfy.sd  # noqa: E402
from make_models import cached_model_files, make_wan21_t2v  # noqa: E402

from pp_runtime.comfy_bridge import load_on_disk  # noqa: E402
from pp_runtime.comfy_job import prepare_comfy_job  # noqa: E402
from pp_runtime.group import WorkerGroup  # noqa: E402

TOL = 1e-4
OVERHEAD = 24 << 20  # allowed peak-RSS growth beyond the stage's own bytes while placing it
EMPTY = {"samples": torch.zeros(1, 16, 1, 8, 8)}


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _conds(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 6, 4096, generator=g), {}]], [[torch.randn(1, 6, 4096, generator=g), {}]]


@pytest.fixture(scope="module")
def big_wan(tmp_path_factory):
    # ~145 MB in fp32: several times one worker's stage with 2 or 3 workers.
    return make_wan21_t2v(tmp_path_factory.mktemp("big") / "wan_big.safetensors", dim=512, ffn_dim=2048,
                          num_layers=8, seed=4)


@pytest.mark.parametrize("workers", [2, 3])
def test_stage_local_loading_memory(big_wan, workers):
    size = os.path.getsize(big_wan)
    before = _rss()
    model = load_on_disk(str(big_wan))  # PP Load Diffusion Model: nothing read here
    host_growth = _rss() - before
    pos, neg = _conds()
    group = WorkerGroup(",".join(["cpu"] * workers), extra_paths=[str(COMFY_ROOT)])
    try:
        job, tensors, rank_tensors = prepare_comfy_job(group.world, model, pos, neg, EMPTY, seed=1, steps=2, cfg=3.0,
                                                       sampler_name="euler", scheduler="simple",
                                                       split={"strategy": "by_memory", "manual": ""})
        res = group.run(job, tensors, rank_tensors=rank_tensors)
        print(f"file {size / 2**20:.1f} MiB; host RSS growth {host_growth / 2**20:.1f} MiB")
        for r in res["ranks"]:
            print(f"  rank {r['rank']} blocks {r['stage']}: read {r['bytes_read'] / 2**20:.1f} MiB, peak RSS growth "
                  f"while placing {r['load_peak_growth'] / 2**20:.1f} MiB")
            assert r["load_peak_growth"] <= r["bytes_read"] + OVERHEAD
            assert r["bytes_read"] < 0.7 * size  # a stage, not the model
        assert sum(r["bytes_read"] for r in res["ranks"]) <= size  # every weight read once, by one stage
        assert host_growth < 16 << 20
        # the result is the stock result on the same file
        stock = comfy.sd.load_diffusion_model(str(big_wan))
        noise = comfy.sample.prepare_noise(EMPTY["samples"], 1)
        ref = comfy.sample.sample(stock, noise, 2, 3.0, "euler", "simple", pos, neg, EMPTY["samples"], seed=1,
                                  disable_pbar=True)
        assert (res["latents"] - ref).abs().max() <= TOL
    finally:
        group.shutdown()


def _advanced(model, pos, neg, latent, seed, steps, start, end, add_noise, leftover):
    """What the stock KSamplerAdvanced computes."""
    disable_noise = not add_noise
    noise = (torch.zeros_like(latent) if disable_noise else comfy.sample.prepare_noise(latent, seed))
    return comfy.sample.sample(model, noise, steps, 3.5, "euler", "simple", pos, neg, latent, disable_noise=disable_noise,
                               start_step=start, last_step=end, force_full_denoise=not leftover, seed=seed,
                               disable_pbar=True)


def test_two_model_handoff_both_stay_placed(tmp_path):
    """Wan 2.2's workflow: a high-noise model for the first steps (leftover noise), a
    low-noise model for the rest, on one worker group; both stay placed."""
    high = comfy.sd.load_diffusion_model(str(cached_model_files()["wan21_t2v"]))
    low = comfy.sd.load_diffusion_model(str(make_wan21_t2v(tmp_path / "low.safetensors", seed=11)))
    pos, neg = _conds(2)
    lat = EMPTY["samples"]
    mid = _advanced(high, pos, neg, lat, 5, 4, 0, 2, True, True)
    ref = _advanced(low, pos, neg, mid, 5, 4, 2, 10000, False, False)
    group = WorkerGroup("cpu,cpu", extra_paths=[str(COMFY_ROOT)])
    try:
        for attempt in range(2):
            job, t, rt = prepare_comfy_job(2, high, pos, neg, {"samples": lat}, seed=5, steps=4, cfg=3.5,
                                           sampler_name="euler", scheduler="simple", start_step=0, last_step=2)
            r1 = group.run(job, t, rank_tensors=rt)
            job, t, rt = prepare_comfy_job(2, low, pos, neg, {"samples": r1["latents"]}, seed=5, steps=4, cfg=3.5,
                                           sampler_name="euler", scheduler="simple", disable_noise=True,
                                           start_step=2, last_step=10000, force_full_denoise=True)
            r2 = group.run(job, t, rank_tensors=rt)
            loaded = [r["loaded"] for r in r1["ranks"] + r2["ranks"]]
            print(f"pass {attempt}: loaded {loaded}, max|diff| {(r2['latents'] - ref).abs().max().item():.2e}")
            assert (r1["latents"] - mid).abs().max() <= TOL and (r2["latents"] - ref).abs().max() <= TOL
            assert all(loaded) if attempt == 0 else not any(loaded)
    finally:
        group.shutdown()


def test_residency_release_and_park():
    model = comfy.sd.load_diffusion_model(str(cached_model_files()["wan21_t2v"]))
    pos, neg = _conds()
    group = WorkerGroup("cpu,cpu", extra_paths=[str(COMFY_ROOT)])
    try:
        loaded = []
        for residency in ("release", "park", "keep", "keep"):
            job, t, rt = prepare_comfy_job(2, model, pos, neg, EMPTY, seed=1, steps=2, cfg=3.0, sampler_name="euler",
                                           scheduler="simple")
            job["residency"] = residency
            loaded.append(all(r["loaded"] for r in group.run(job, t, rank_tensors=rt)["ranks"]))
        # first run loads; 'release' drops it, so the second loads again; 'park' keeps it in host RAM
        assert loaded == [True, True, False, False]
    finally:
        group.shutdown()
