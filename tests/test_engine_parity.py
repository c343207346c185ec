"""Tier 1: multi-process pipeline runs equal a single-process run of the same code.

Real gloo groups of separate worker processes.  Tolerance 1e-5 in fp32 (absolute, on
latents of magnitude ~1-10; the DPM++ cases grow larger and are compared relative to
their scale): the stages run the same kernels on the same micro-batches with the same
thread count as the reference, so results are expected bit-identical; the tolerance only
leaves room for kernels whose reduction order depends on the batch of a micro-batch.
"""
import pytest
import torch

from engine_util import DIT, TOY, as_tensors, conditioning, run_parity

TOL = 1e-5
STEPS = 4

CASES = [
    # id, world, sampling overrides
    ("pp2-seqcfg-euler", 2, dict(scheduler="flow_euler", guidance_scale=3.5, cfg_mode="sequential")),
    ("pp2-seqcfg-euler_sde", 2, dict(scheduler="flow_euler_sde", guidance_scale=3.5, cfg_mode="sequential")),
    ("pp2-nocfg-unipc", 2, dict(scheduler="unipc_flow", guidance_scale=1.0, cfg_mode="off")),
    ("pp2-batched-dpmpp2m", 2, dict(scheduler="dpmpp_2m", guidance_scale=2.0, cfg_mode="batched")),
    ("pp3-uneven-seqcfg-dpmpp2m", 3, dict(scheduler="dpmpp_2m", guidance_scale=3.0, split="manual", manual="1,3,2")),
    ("pp3-uneven-seqcfg-dpmpp2m_sde", 3, dict(scheduler="dpmpp_2m_sde", guidance_scale=3.0, split="manual",
                                              manual="3,1,2")),
    ("cfgpar2-euler", 2, dict(scheduler="flow_euler", guidance_scale=4.0, cfg_mode="cfg_parallel")),
    ("cfgpar2-euler_sde", 2, dict(scheduler="flow_euler_sde", guidance_scale=4.0, cfg_mode="cfg_parallel")),
    ("pp2xcfg2-euler", 4, dict(scheduler="flow_euler", guidance_scale=3.5, cfg_mode="cfg_parallel")),
    ("pp2xcfg2-dpmpp2m_sde", 4, dict(scheduler="dpmpp_2m_sde", guidance_scale=3.5, cfg_mode="cfg_parallel")),
]


@pytest.mark.parametrize("name,world,kw", CASES, ids=[c[0] for c in CASES])
def test_parity(cpu_group, name, world, kw):
    pos, neg = conditioning()
    job, res, ref, steps = run_parity(cpu_group(world), TOY, pos, neg, latent_shape=[1, 4, 4, 4], steps=STEPS,
                                      seed=11, **kw)
    diff = ((res["latents"] - ref).abs().max() / ref.abs().max().clamp(min=1.0)).item()
    print(f"{name}: layout {job['layout']} split {job['split']} max|diff| {diff:.2e}")
    assert not res["interrupted"]
    assert steps == list(range(STEPS))
    assert ref.abs().max() > 0.1  # a real result, not zeros
    assert diff <= TOL
    ranks = res["ranks"]
    assert [r["stage"] for r in ranks[:job["layout"]["pp"]]] == [list(r) for r in _ranges(job["split"])]


def _ranges(counts):
    out, a = [], 0
    for c in counts:
        out.append((a, a + c))
        a += c
    return out


def test_pp4_batch4_eight_micro_batches(cpu_group):
    """PP4 with 8 micro-batches per step: middle stages pass received tensors on unchanged
    while later micro-batches arrive into the same receive buffers (a regression test for
    buffer reuse under a send still in flight)."""
    pos, neg = conditioning(batch=4)
    job, res, ref, _ = run_parity(cpu_group(4), TOY, pos, neg, latent_shape=[4, 4, 4, 4], steps=STEPS, seed=6,
                                  scheduler="flow_euler", guidance_scale=3.0, cfg_mode="sequential")
    diff = (res["latents"] - ref).abs().max().item()
    print(f"pp4 batch4 seqcfg (8 micro-batches): layout {job['layout']} max|diff| {diff:.2e}")
    assert job["layout"] == {"cfg": 1, "pp": 4, "sp": 1} and diff <= TOL


@pytest.mark.parametrize("cfg_mode,world", [("sequential", 2), ("cfg_parallel", 4)])
def test_batch2_parity_and_micro_batches(cpu_group, cfg_mode, world):
    """Batch 2 runs as 2 (or 4 with sequential CFG) micro-batches through the pipeline."""
    pos, neg = conditioning(batch=2)
    job, res, ref, _ = run_parity(cpu_group(world), TOY, pos, neg, latent_shape=[2, 4, 4, 4], steps=STEPS, seed=5,
                                  scheduler="flow_euler_sde", guidance_scale=3.0, cfg_mode=cfg_mode)
    diff = (res["latents"] - ref).abs().max().item()
    print(f"batch2 {cfg_mode}: max|diff| {diff:.2e}")
    assert res["latents"].shape == (2, 4, 4, 4) and diff <= TOL
    # The per-rank timeline shows every micro-batch of every step computed on every stage.
    per_pipeline = 4 if cfg_mode == "sequential" else 2
    computes = [s for s in res["spans"] if s["kind"] == "compute" and s["rank"] == 0]
    assert len(computes) == per_pipeline * STEPS
    units = {(s["entry"]["branch"], s["entry"]["micro_batch"]) for s in computes}  # the plan's units
    assert units == ({("cond", 0), ("cond", 1), ("uncond", 2), ("uncond", 3)} if cfg_mode == "sequential"
                     else {("cond", 0), ("cond", 1)})


def test_output_slice_and_cfg_normalize(cpu_group):
    """Edit-model shape: packed latents with reference tokens dropped by output_slice."""
    model = {**DIT, "kwargs": {**DIT["kwargs"], "packed": True, "in_channels": 4, "patch": 1}}
    g = torch.Generator().manual_seed(1)
    ref_tokens = torch.randn(1, 3, 4, generator=g)
    pos = {"context": torch.randn(1, 5, 32, generator=g), "ref": ref_tokens}
    neg = {"context": torch.randn(1, 5, 32, generator=g), "ref": ref_tokens}
    job, res, ref, _ = run_parity(cpu_group(2), model, pos, neg, latent_shape=[1, 16, 4], steps=STEPS, seed=2,
                                  scheduler="flow_euler", guidance_scale=4.0, cfg_normalize=True, output_slice=16)
    diff = (res["latents"] - ref).abs().max().item()
    print(f"output_slice+cfg_normalize: max|diff| {diff:.2e}")
    assert res["latents"].shape == (1, 16, 4) and diff <= TOL


def test_schema_sent_once_per_shape(cpu_group):
    """Tensor-dict schemas cross the wire once per peer and shape, not every step."""
    pos, neg = conditioning()
    job, res, _, _ = run_parity(cpu_group(2), TOY, pos, neg, latent_shape=[1, 4, 4, 4], steps=6, seed=1,
                                scheduler="flow_euler", guidance_scale=3.0)
    # 6 steps x 2 micro-batches of activations (rank 0) and 6 latents messages (rank 1) went
    # by; a first job of this shape sends each schema once, a repeated job none at all.
    assert [r["schemas_sent"] for r in res["ranks"]] in ([1, 1], [0, 0])
    again = cpu_group(2).run(job, as_tensors(pos, neg))
    assert [r["schemas_sent"] for r in again["ranks"]] == [0, 0]
