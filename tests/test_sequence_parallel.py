"""Tier 2: sequence parallelism (SP) is exact: PP KSampler with shards equals the stock KSampler.

ComfyUI's own sampling in this process (``comfy.sample.sample``, what the stock KSampler
node calls) against the job PP KSampler builds with a PP Parallel Layout, run by real CPU
worker groups (gloo): sp2 on 2 processes for every family with a token-cut entry, pp2 x sp2
and cfg2 x sp2 on 4 processes; token counts the degree does not divide (uneven shards); a
Wan 2.2 ti2v latent with a noise mask (per-frame timesteps: the per-token modulation is cut
with the shard); the Ulysses exchange; sp4.  fp32, rel-L2 <= 1e-5.  Also: LoRA per stage,
Cancel within a sharded step and the next prompt, a killed shard, refusals by name, the
auto layout's pick from declared memory.
"""
from __future__ import annotations

import dataclasses
import tempfile

import pytest
import torch

from comfy_env import require_comfy

COMFY_ROOT = require_comfy()

import comfy.sample  # noqa: E402

import family_zoo as zoo  # noqa: E402
from pp_runtime.comfy.job import prepare_comfy_job  # noqa: E402
from pp_runtime.engine.layout import JobError  # noqa: E402
from pp_runtime.workers.group import WorkerGroup  # noqa: E402

TOL = 1e-5
STEPS = 3
EXPORTS = tempfile.mkdtemp(prefix="pp-sp-test-")
FAMILIES = ["flux1_dev", "flux1_kontext", "flux2", "chroma", "wan21_t2v", "wan21_i2v", "wan22_ti2v_5b",
            "hunyuan_video", "hunyuan_video15", "qwen_image", "qwen_image_edit", "lumina2", "z_image", "ltxv",
            "minimax_h3"]
# Token counts an even degree does not divide: Flux 7 text + 25 image tokens, Wan 3 frames of 5x5.
UNEVEN = {"flux1_dev": dict(latent=(1, 16, 10, 10), context=(7, 32)),
          "wan21_t2v": dict(latent=(1, 16, 3, 10, 10), context=(7, 4096)),
          "qwen_image": dict(latent=(1, 16, 1, 10, 10), context=(7, 32))}


@pytest.fixture(scope="module")
def group2():
    g = WorkerGroup("cpu,cpu", extra_paths=[str(COMFY_ROOT)], cpu_threads=1)
    yield g
    g.shutdown()


@pytest.fixture(scope="module")
def group4():
    g = WorkerGroup("cpu,cpu,cpu,cpu", extra_paths=[str(COMFY_ROOT)], cpu_threads=1)
    yield g
    g.shutdown()


def _inputs(name: str, **changes):
    case = zoo.BY_NAME[name]
    case = dataclasses.replace(case, **changes) if changes else case
    return case, zoo.model(case), zoo.conditioning(case), zoo.latent(case)


def _stock(model, pos, neg, lat, cfg, noise_mask=None, steps=STEPS):
    noise = comfy.sample.prepare_noise(lat, 3)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", pos, neg, lat, seed=3,
                               noise_mask=noise_mask, disable_pbar=True)


def _job(world, model, pos, neg, lat, cfg, sp, mode="sequential", noise_mask=None, steps=STEPS, exchange="auto",
         **kw):
    latent = {"samples": lat} if noise_mask is None else {"samples": lat, "noise_mask": noise_mask}
    return prepare_comfy_job(world, model, pos, neg, latent, seed=3, steps=steps, cfg=cfg, sampler_name="euler",
                             scheduler="simple", export_dir=EXPORTS, cfg_mode={"mode": mode},
                             layout={"sequence_parallel": sp, "attention_exchange": exchange}, **kw)


def _pp(group, *a, **k):
    job, tensors, rank_tensors = _job(group.world, *a, **k)
    res = group.run(job, tensors, rank_tensors=rank_tensors)
    return res, job


def _flat(x) -> torch.Tensor:
    """A latent as one tensor (MiniMax-H3's video + audio: a list, or ComfyUI's NestedTensor)."""
    parts = x.tensors if type(x).__name__ == "NestedTensor" else x if isinstance(x, list) else None
    return x if parts is None else torch.cat([t.flatten() for t in parts])


def _rel(a, b) -> float:
    a, b = _flat(a), _flat(b)
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", [n for n in FAMILIES if n in zoo.BY_NAME])
def test_sp2_equals_the_stock_sampler(group2, name):
    case, model, (pos, neg), lat = _inputs(name)
    for cfg in (1.0, case.cfg):
        ref = _stock(model, pos, neg, lat, cfg)
        res, job = _pp(group2, model, pos, neg, lat, cfg, 2)
        rel = _rel(res["latents"], ref)
        print(f"{name} sp2 cfg {cfg}: rel-L2 vs stock {rel:.2e}")
        assert job["layout"] == {"cfg": 1, "pp": 1, "sp": 2}
        assert sorted(r["sp_rank"] for r in res["ranks"]) == [0, 1]
        assert all(r["passes"] == res["ranks"][0]["passes"] > 0 for r in res["ranks"])  # both shards ran each pass
        assert rel <= TOL


@pytest.mark.parametrize("name", list(UNEVEN))
def test_uneven_shards_are_exact(group2, name):
    case, model, (pos, neg), lat = _inputs(name, **UNEVEN[name])
    ref = _stock(model, pos, neg, lat, case.cfg)
    res, _ = _pp(group2, model, pos, neg, lat, case.cfg, 2)
    rel = _rel(res["latents"], ref)
    print(f"{name} uneven {UNEVEN[name]}: rel-L2 {rel:.2e}")
    assert rel <= TOL


@pytest.mark.parametrize("name,latent,cfg", [
    ("wan22_ti2v_5b", (1, 48, 3, 10, 10), 1.0),  # one timestep per frame: the blocks' modulation has a row
    #                                              per frame, spread over the frame's tokens inside the block
    ("ltxv", (1, 128, 3, 3, 3), 3.0),            # one timestep row per token in every block
])
def test_per_frame_and_per_token_timesteps_are_cut_with_the_shard(group2, name, latent, cfg):
    """A first-frame noise mask gives the frames their own timesteps."""
    case, model, (pos, neg), lat = _inputs(name, latent=latent)
    mask = torch.ones(1, 1, *latent[2:])
    mask[:, :, 0] = 0.0
    ref = _stock(model, pos, neg, lat, cfg, noise_mask=mask)
    res, _ = _pp(group2, model, pos, neg, lat, cfg, 2, noise_mask=mask)
    rel = _rel(res["latents"], ref)
    print(f"{name} per-frame timesteps sp2: rel-L2 {rel:.2e}")
    assert rel <= TOL


@pytest.mark.skipif("minimax_h3" not in zoo.BY_NAME, reason="this ComfyUI has no MiniMax-H3 (ComfyUI >= 0.33)")
@pytest.mark.parametrize("world", [2, 4])
def test_minimax_h3_keyframes_text_tags_and_denoise_mask_on_shards(request, world):
    """MiniMax-H3's packed stream [tokens, hidden] cut on dim 0: a keyframe's video + audio rows
    (their own segments), mixed text tags (runs of modulation rows) and a denoise mask (a
    per-token row index in the video segment) give modulation ranges that a shard boundary
    cuts; each shard gets them counted from its first token.  sp2 on 2 processes, pp2 x sp2 on 4."""
    import comfy.nested_tensor
    group = request.getfixturevalue("group2" if world == 2 else "group4")
    case, model, (pos, neg), lat = _inputs("minimax_h3")
    g = torch.Generator().manual_seed(5)
    kf = [{"resolved_frame_index": 0, "latent": torch.randn(1, 24, 1, 4, 4, generator=g),
           "audio_latent": torch.randn(1, 32, 2, 3, generator=g)}]
    for c in (pos, neg):
        c[0][1].update({"minimax_keyframes": kf, "minimax_visual_cond_noise_aug": 0.9})
    vm = torch.ones(1, 1, 2, 4, 4)
    vm[..., :2, :] = 0.3
    mask = comfy.nested_tensor.NestedTensor([vm, torch.ones(1, 1, 2, 8)])
    ref = _stock(model, pos, neg, lat, case.cfg, noise_mask=mask)
    res, job = _pp(group, model, pos, neg, lat, case.cfg, 2, noise_mask=mask)
    rel = _rel(res["latents"], ref)
    print(f"minimax_h3 keyframes + mask {job['layout']}: rel-L2 {rel:.2e}")
    assert job["layout"] == {"cfg": 1, "pp": world // 2, "sp": 2} and rel <= TOL


@pytest.mark.parametrize("name", ["flux1_dev", "wan21_t2v", "qwen_image", "hunyuan_video", "minimax_h3"])
@pytest.mark.parametrize("mode,layout", [("sequential", {"cfg": 1, "pp": 2, "sp": 2}),
                                         ("cfg_parallel", {"cfg": 2, "pp": 1, "sp": 2})])
def test_four_processes_pp2_sp2_and_cfg2_sp2(group4, name, mode, layout):
    if name not in zoo.BY_NAME:
        pytest.skip(f"{name} is not in this ComfyUI")
    case, model, (pos, neg), lat = _inputs(name, **UNEVEN.get(name, {}))
    ref = _stock(model, pos, neg, lat, case.cfg)
    res, job = _pp(group4, model, pos, neg, lat, case.cfg, 2, mode=mode)
    rel = _rel(res["latents"], ref)
    print(f"{name} {layout}: rel-L2 {rel:.2e}")
    assert job["layout"] == layout and rel <= TOL


TWO_HEADS = {"wan21_t2v": dict(num_heads=2), "hunyuan_video": dict(num_heads=2, axes_dim=[16, 24, 24])}


@pytest.mark.parametrize("name", ["flux1_dev", "chroma", "wan21_t2v", "hunyuan_video", "qwen_image", "lumina2"])
def test_ulysses_exchange_is_exact(group2, name):
    """All-to-all heads <-> tokens instead of gathering keys/values (q/k/v as [B, N, H*D] for
    most families, [B, H, N, D] for Lumina's), also with uneven shards."""
    case = zoo.BY_NAME[name]
    unet = {**case.unet, **TWO_HEADS.get(name, {})}  # the zoo's Wan and HunyuanVideo have one head
    case, model, (pos, neg), lat = _inputs(name, unet=unet, **UNEVEN.get(name, {}))
    ref = _stock(model, pos, neg, lat, case.cfg)
    res, job = _pp(group2, model, pos, neg, lat, case.cfg, 2, exchange="ulysses")
    rel = _rel(res["latents"], ref)
    print(f"{name} sp2 ulysses: rel-L2 {rel:.2e}")
    assert job["sequence_exchange"] == "ulysses" and rel <= TOL


@pytest.mark.parametrize("name", ["flux1_dev", "wan21_t2v"])
def test_sp4_on_four_processes(group4, name):
    case, model, (pos, neg), lat = _inputs(name, **UNEVEN[name])
    ref = _stock(model, pos, neg, lat, 1.0)
    res, job = _pp(group4, model, pos, neg, lat, 1.0, 4)  # auto: the tiny models' 2 heads: all-gather
    rel = _rel(res["latents"], ref)
    print(f"{name} sp4: rel-L2 {rel:.2e}")
    assert job["layout"] == {"cfg": 1, "pp": 1, "sp": 4} and rel <= TOL
    with pytest.raises(Exception, match=r"Ulysses needs the attention heads \(\d\) to divide by sequence_parallel 4"):
        _pp(group4, model, pos, neg, lat, 1.0, 4, exchange="ulysses")
    res, _ = _pp(group4, model, pos, neg, lat, 1.0, 4)  # the next prompt works
    assert _rel(res["latents"], ref) <= TOL


def test_eight_processes_cfg2_pp2_sp2():
    """All three dimensions at once on 8 processes: two CFG branches, each a 2-stage pipeline
    of 2 shards (uneven: Flux 7 + 25 tokens, Wan 3 frames of 5 x 5); the driver of each
    pipeline gathers its shards, the CFG combine meets both drivers' outputs."""
    group = WorkerGroup(",".join(["cpu"] * 8), extra_paths=[str(COMFY_ROOT)], cpu_threads=1)
    try:
        for name in ("flux1_dev", "wan21_t2v"):
            case, model, (pos, neg), lat = _inputs(name, **UNEVEN[name])
            ref = _stock(model, pos, neg, lat, case.cfg)
            res, job = _pp(group, model, pos, neg, lat, case.cfg, 2, mode="cfg_parallel")
            rel = _rel(res["latents"], ref)
            print(f"{name} cfg2 x pp2 x sp2: rel-L2 {rel:.2e}")
            assert job["layout"] == {"cfg": 2, "pp": 2, "sp": 2} and rel <= TOL
            ranks = sorted((r["cfg_rank"], r["pp_rank"], r["sp_rank"]) for r in res["ranks"])
            assert ranks == [(c, p, s) for c in range(2) for p in range(2) for s in range(2)]
    finally:
        group.shutdown()


def test_cancel_within_a_sharded_step_then_the_next_prompt(group2):
    case, model, (pos, neg), lat = _inputs("wan21_t2v")
    seen = []
    job, tensors, rank_tensors = _job(2, model, pos, neg, lat, 3.0, 2, steps=500)
    res = group2.run(job, tensors, rank_tensors=rank_tensors, on_step=lambda i, n, x: seen.append(i),
                     should_interrupt=lambda: len(seen) >= 2)
    assert res["interrupted"] and 2 <= len(seen) < 500
    ref = _stock(model, pos, neg, lat, 3.0)
    res, _ = _pp(group2, model, pos, neg, lat, 3.0, 2)
    assert _rel(res["latents"], ref) <= TOL


def test_lora_per_stage_with_shards(group4):
    """A LoRA (ComfyUI's own loader) on pp2 x sp2: each stage's shards patch the same weights."""
    import comfy.sd
    case, model, (pos, neg), lat = _inputs("wan21_t2v")
    dm = model.model.diffusion_model
    g = torch.Generator().manual_seed(1)
    lora = {}
    for key in [k for k in dm.state_dict() if k.endswith("self_attn.q.weight")]:  # every block: both stages
        w = dm.state_dict()[key]
        lora[f"diffusion_model.{key[:-len('.weight')]}.lora_up.weight"] = torch.randn(w.shape[0], 4, generator=g)
        lora[f"diffusion_model.{key[:-len('.weight')]}.lora_down.weight"] = torch.randn(4, w.shape[1], generator=g)
    lora_model = comfy.sd.load_lora_for_models(model, None, lora, 0.8, 0)[0]
    ref = _stock(lora_model, pos, neg, lat, 3.0)
    assert _rel(ref, _stock(model, pos, neg, lat, 3.0)) > 1e-3  # the LoRA changes the result
    res, job = _pp(group4, lora_model, pos, neg, lat, 3.0, 2)
    assert job["layout"] == {"cfg": 1, "pp": 2, "sp": 2} and all(r["patched"] for r in res["ranks"])
    assert _rel(res["latents"], ref) <= TOL


def test_a_killed_shard_fails_the_prompt_naming_it_then_the_next_works():
    import os
    import signal
    from pp_runtime.workers.group import WorkerError
    case, model, (pos, neg), lat = _inputs("wan21_t2v")
    group = WorkerGroup("cpu,cpu", extra_paths=[str(COMFY_ROOT)], cpu_threads=1)
    try:
        group.start()
        old = group.pids

        def on_step(i, n, x):
            if i == 1:
                os.kill(old[1], signal.SIGKILL)  # the driver's peer shard
        job, tensors, rank_tensors = _job(2, model, pos, neg, lat, 3.0, 2, steps=2000)
        with pytest.raises(WorkerError) as err:
            group.run(job, tensors, rank_tensors=rank_tensors, on_step=on_step)
        assert err.value.rank == 1 and "rank 1" in str(err.value)
        res, _ = _pp(group, model, pos, neg, lat, 3.0, 2)  # a fresh group
        assert set(group.pids).isdisjoint(old)
        assert _rel(res["latents"], _stock(model, pos, neg, lat, 3.0)) <= TOL
    finally:
        group.shutdown()


def test_a_hung_shard_is_named_after_cancel_then_the_next_prompt_works(monkeypatch):
    """Shard 1 of the one stage blocks forever before block 1 in the 3rd pass (a GPU kernel
    that never returns; its heartbeat goes on); the driver waits for it in the shards'
    agreement before that block.  Cancel: within the grace the host names rank 1 and what it
    was stuck on; a fresh group's next prompt is exact."""
    import time
    from pp_runtime.workers.group import WorkerError
    monkeypatch.setenv("PP_TEST_HANG", "1:1:2")
    monkeypatch.setenv("PP_CANCEL_GRACE_S", "3")
    case, model, (pos, neg), lat = _inputs("wan21_t2v")
    group = WorkerGroup("cpu,cpu", extra_paths=[str(COMFY_ROOT)], cpu_threads=1)
    try:
        seen, t_cancel = [], []

        def should_interrupt():  # Cancel 1 s after the first step: shard 1 is stuck by then
            if seen and not t_cancel and time.monotonic() > seen[0] + 1.0:
                t_cancel.append(time.monotonic())
            return bool(t_cancel)
        job, tensors, rank_tensors = _job(2, model, pos, neg, lat, 3.0, 2, steps=40)
        with pytest.raises(WorkerError) as err:
            group.run(job, tensors, rank_tensors=rank_tensors, should_interrupt=should_interrupt,
                      on_step=lambda i, n, x: seen.append(time.monotonic()))
        took = time.monotonic() - t_cancel[0]
        print(f"[hung shard] {took:.1f} s after Cancel: {err.value}")
        assert err.value.rank == 1 and "stuck computing block 1" in str(err.value) and took < 10
        monkeypatch.delenv("PP_TEST_HANG")
        res, _ = _pp(group, model, pos, neg, lat, 3.0, 2)
        assert _rel(res["latents"], _stock(model, pos, neg, lat, 3.0)) <= TOL
    finally:
        group.shutdown()


def test_by_memory_split_on_a_sequence_parallel_layout():
    """pp2 x sp2: each stage's weights sit on both of its shards' devices, so a stage may use
    the smaller of the two: a small device among stage 1's shards moves blocks to stage 0,
    a small one among stage 0's moves them to stage 1 (as a pp2 layout of those capacities)."""
    case, model, (pos, neg), lat = _inputs("wan21_t2v")
    big = 8 << 30

    def stage_blocks(memory):
        job, _, _ = _job(4, model, pos, neg, lat, 1.0, 2, split={"strategy": "by_memory"}, device_memory=memory)
        assert job["layout"] == {"cfg": 1, "pp": 2, "sp": 2}
        return job["split"]
    even = stage_blocks([big] * 4)
    from pp_runtime.comfy.loading import model_profile
    prof = model_profile(model.model.diffusion_model)
    small = prof["shared_bytes"] + prof["last_bytes"] + 2 * max(prof["block_bytes"]) + \
        int(model.model.memory_required(list(lat.shape)))
    later_small = stage_blocks([big, big, big, small])   # rank 3: stage 1, shard 1
    early_small = stage_blocks([small, big, big, big])   # rank 0: stage 0, shard 0
    print(f"[by_memory sp2] blocks per stage: even {even}, stage 1 small {later_small}, stage 0 small {early_small}")
    assert later_small[1] < even[1] and early_small[0] < even[0]
    pp2 = prepare_comfy_job(2, model, pos, neg, {"samples": lat}, seed=3, steps=STEPS, cfg=1.0, sampler_name="euler",
                            scheduler="simple", export_dir=EXPORTS, split={"strategy": "by_memory"},
                            device_memory=[big, small])[0]
    assert pp2["split"] == later_small


@pytest.mark.parametrize("name,kw,world,message", [
    ("sd3", {}, 2, "sequence parallelism has no entry for MMDiT"),
    ("ltx2_av", {}, 2, "sequence parallelism cannot run LTXAVModel"),
    ("wan21_vace", {}, 2, "sequence parallelism cannot run VaceWanModel"),
    ("wan21_t2v", {}, 3, "sequence_parallel 2 does not divide the group's 3 devices"),
    ("wan21_t2v", {"patch_pipelining": {"patches": 2, "warmup_steps": 1}}, 2, "do not combine"),
])
def test_refusals_before_any_work(name, kw, world, message):
    if name not in zoo.BY_NAME:
        pytest.skip(f"{name} is not in this ComfyUI")
    case, model, (pos, neg), lat = _inputs(name)
    with pytest.raises(JobError, match=message):
        _job(world, model, pos, neg, lat, case.cfg, 2, **kw)


def test_too_many_shards_fail_the_prompt_with_what_to_change(group2):
    case, model, (pos, neg), lat = _inputs("flux1_dev", context=(1, 32))  # one text token, two shards
    with pytest.raises(Exception, match="use at most 1 sequence-parallel shards"):
        _pp(group2, model, pos, neg, lat, 1.0, 2)
    case, model, (pos, neg), lat = _inputs("flux1_dev")
    res, _ = _pp(group2, model, pos, neg, lat, 1.0, 2)  # the next prompt works
    assert torch.isfinite(res["latents"]).all()


GiB = 2 ** 30


@pytest.mark.parametrize("world,cfg,memory,want,why", [
    (2, 1.0, None, {"cfg": 1, "pp": 1, "sp": 2}, "sp2"),            # CFG 1, fits: shards
    (2, 3.0, None, {"cfg": 2, "pp": 1, "sp": 1}, "cfg2"),           # CFG: one branch per GPU
    (4, 3.0, None, {"cfg": 2, "pp": 1, "sp": 2}, "cfg2 x sp2"),
    (4, 1.0, None, {"cfg": 1, "pp": 1, "sp": 4}, "sp4"),
])
def test_auto_layout_picks_the_fastest_that_fits(world, cfg, memory, want, why):
    case, model, (pos, neg), lat = _inputs("wan21_t2v")
    job, _, _ = _job(world, model, pos, neg, lat, cfg, 0, mode="auto", device_memory=memory)
    assert job["layout"] == want and job["layout_reason"].startswith(why + ":")


def test_auto_layout_splits_a_model_that_does_not_fit_one_device():
    from pp_runtime.comfy.loading import model_profile
    case, model, (pos, neg), lat = _inputs("wan21_t2v")
    prof = model_profile(model.model.diffusion_model)
    blocks = prof["block_bytes"]
    half = len(blocks) // 2
    # the model does not fit one device; a stage of half its blocks does (with the activations)
    cap = (prof["shared_bytes"] + max(sum(blocks[:half]) + prof["first_bytes"], sum(blocks[half:]) + prof["last_bytes"])
           + int(model.model.memory_required(list(lat.shape))))
    assert cap < prof["shared_bytes"] + sum(blocks) + prof["first_bytes"] + prof["last_bytes"]
    job, _, _ = _job(4, model, pos, neg, lat, 1.0, 0, mode="auto", device_memory=[cap] * 4)
    assert job["layout"] == {"cfg": 1, "pp": 2, "sp": 2}, job["layout_reason"]
    assert "does not fit one GPU" in job["layout_reason"]
    with pytest.raises(JobError, match="does not fit these 4 devices in any layout"):
        _job(4, model, pos, neg, lat, 1.0, 0, mode="auto", device_memory=[1] * 4)
