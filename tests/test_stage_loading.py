"""Tier 2: each worker holds only its stage; two models stay placed; residency.

Real ComfyUI model files (random weights, ComfyUI's own classes and loader), real worker
processes.  Memory is measured, not assumed: the host's resident set around
``load_on_disk`` (PP Load Diffusion Model) and each worker's peak resident set (VmHWM)
around placing its stage.
"""
import os
import re

import pytest
import torch

from comfy_env import require_comfy

COMFY_ROOT = require_comfy()

import comfy.sample  # noqa: E402
import comfy.sd  # noqa: E402
from make_models import cached_model_files, make_wan21_t2v  # noqa: E402
from wan_files import wan_file  # noqa: E402

from pp_runtime.comfy.loading import load_on_disk  # noqa: E402
from pp_runtime.comfy.job import prepare_comfy_job  # noqa: E402
from pp_runtime.workers.group import WorkerGroup  # noqa: E402

TOL = 1e-4
OVERHEAD = 24 << 20  # allowed peak-RSS growth beyond the stage's own bytes while placing it
EMPTY = {"samples": torch.zeros(1, 16, 1, 8, 8)}


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _file_bytes(path, keep) -> int:
    """Bytes of the tensors of a safetensors file whose names ``keep`` accepts."""
    import json
    import struct
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()
               if k != "__metadata__" and keep(k))


def size_tensors(path) -> int:
    return _file_bytes(path, lambda k: True)


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
        # every block read once, by its stage; the small shared weights (embedders) by every stage
        shared = _file_bytes(big_wan, lambda k: not k.startswith(("blocks.", "head.")))
        print(f"shared (non-block) weights: {shared / 2**20:.1f} MiB per stage")
        assert sum(r["bytes_read"] for r in res["ranks"]) == size_tensors(big_wan) + (workers - 1) * shared
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
        # first run loads; 'release' drops it, so the second loads again; 'park' keeps the stage
        # (its weights are read again from the file, not placed anew)
        assert loaded == [True, True, False, False]
    finally:
        group.shutdown()


def test_park_frees_the_weights_and_the_next_prompt_is_exact_with_its_lora():
    """'park' frees each stage's weights after the prompt (on a CPU worker: its host RAM) and
    keeps the stage; the next prompt reads them again from the file and applies its LoRA again
    (the host sends the patches again): the result equals stock's, with and without the LoRA."""
    model = comfy.sd.load_diffusion_model(str(cached_model_files()["wan21_t2v"]))
    lora = comfy.sd.load_lora_for_models(model, None, _lora_for(model, ("self_attn.q.weight", "ffn.0.weight")),
                                         0.8, 0)[0]
    pos, neg = _conds()
    lat = EMPTY["samples"]
    group = WorkerGroup("cpu,cpu", extra_paths=[str(COMFY_ROOT)])
    try:
        for i, (m, residency) in enumerate(((lora, "park"), (lora, "park"), (model, "park"), (lora, "keep"))):
            noise = comfy.sample.prepare_noise(lat, 1)
            ref = comfy.sample.sample(m, noise, 2, 3.0, "euler", "simple", pos, neg, lat, seed=1, disable_pbar=True)
            job, t, rt = prepare_comfy_job(2, m, pos, neg, EMPTY, seed=1, steps=2, cfg=3.0, sampler_name="euler",
                                           scheduler="simple")
            job["residency"] = residency
            res = group.run(job, t, rank_tensors=rt)
            held = group.held
            diff = (res["latents"] - ref).abs().max().item()
            print(f"{residency} lora={m is lora}: max|diff| {diff:.2e}")
            assert diff <= TOL
            # placed by the first prompt; after a park every rank read its stage again (its weights had been freed)
            assert [(r["loaded"], r["reread"]) for r in res["ranks"]] == [(i == 0, i > 0)] * 2
            assert all(r["bytes_read"] > 0 for r in res["ranks"])
            if residency == "park":  # the host knows the patches are gone with the weights
                assert all(set(h.values()) == {""} for h in held)
    finally:
        group.shutdown()


def _lora_for(model, names, seed=0, rank=4):
    """A LoRA state dict (lora_up/lora_down/alpha) for the named weights of the diffusion model."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, p in model.model.diffusion_model.named_parameters():
        if name.endswith(names) and p.dim() == 2:
            base = "diffusion_model." + name[: -len(".weight")]
            sd[f"{base}.lora_up.weight"] = torch.randn(p.shape[0], rank, generator=g) * 0.05
            sd[f"{base}.lora_down.weight"] = torch.randn(rank, p.shape[1], generator=g) * 0.05
            sd[f"{base}.alpha"] = torch.tensor(float(rank))
    return sd


def _stock_vs_pp(model, pp_model, pos, neg, latent, **kw):
    noise = comfy.sample.prepare_noise(latent, kw["seed"])
    ref = comfy.sample.sample(model, noise, kw["steps"], kw["cfg"], kw["sampler_name"], kw["scheduler"], pos, neg,
                              latent, seed=kw["seed"], disable_pbar=True)
    group = WorkerGroup("cpu,cpu", extra_paths=[str(COMFY_ROOT)])
    try:
        job, t, rt = prepare_comfy_job(2, pp_model, pos, neg, {"samples": latent}, **kw)
        res = group.run(job, t, rank_tensors=rt)
    finally:
        group.shutdown()
    return (res["latents"] - ref).abs().max().item(), ref


def test_flux_fp8_file_with_lora_0_8():
    """The Flux test file stores fp8_e4m3fn weights; a LoRA at strength 0.8 on it, stock
    loader + LoraLoaderModelOnly's path against PP Load Diffusion Model + the same LoRA."""
    path = str(cached_model_files()["flux1_dev"])
    stock = comfy.sd.load_diffusion_model(path)
    lora = _lora_for(stock, ("img_attn.qkv.weight", "linear1.weight"))
    stock_lora = comfy.sd.load_lora_for_models(stock, None, lora, 0.8, 0)[0]
    pp_lora = comfy.sd.load_lora_for_models(load_on_disk(path), None, lora, 0.8, 0)[0]
    g = torch.Generator().manual_seed(3)
    pos = [[torch.randn(1, 8, 4096, generator=g), {"pooled_output": torch.randn(1, 768, generator=g)}]]
    neg = [[torch.randn(1, 8, 4096, generator=g), {"pooled_output": torch.randn(1, 768, generator=g)}]]
    diff, ref = _stock_vs_pp(stock_lora, pp_lora, pos, neg, torch.zeros(1, 16, 8, 8), seed=2, steps=2, cfg=2.0,
                             sampler_name="euler", scheduler="simple")
    print(f"Flux fp8 file + LoRA 0.8: max|diff| {diff:.2e} (|x| max {ref.abs().max().item():.1f})")
    assert len(lora) > 0 and diff <= TOL


def test_fp8_weight_dtype_option():
    """weight_dtype fp8_e4m3fn (weights stored in fp8 on the device, computed in a wider
    dtype), as the stock loader offers it, on an fp32 file."""
    path = str(cached_model_files()["wan21_t2v"])
    stock = comfy.sd.load_diffusion_model(path, model_options={"dtype": torch.float8_e4m3fn})
    pp = load_on_disk(path, torch.float8_e4m3fn)
    assert pp.model.pp_source["dtype"] == "float8_e4m3fn"
    pos, neg = _conds(5)
    diff, _ = _stock_vs_pp(stock, pp, pos, neg, EMPTY["samples"], seed=4, steps=2, cfg=3.0, sampler_name="euler",
                           scheduler="simple")
    print(f"Wan, weight_dtype fp8_e4m3fn: max|diff| {diff:.2e}")
    assert diff <= TOL


def test_wan21_image_to_video(tmp_path):
    """Wan 2.1 i2v: the image latent and mask in the conditioning (WanImageToVideo) and
    CLIP vision features (clip_vision_output) reach the model on the workers."""
    import comfy.clip_vision
    path = wan_file("i2v")
    model = comfy.sd.load_diffusion_model(str(path))
    assert type(model.model).__name__ == "WAN21" and model.model.diffusion_model.img_emb is not None
    g = torch.Generator().manual_seed(8)
    clip = comfy.clip_vision.Output()
    clip["penultimate_hidden_states"] = torch.randn(1, 257, 1280, generator=g)
    extra = {"concat_latent_image": torch.randn(1, 16, 2, 8, 8, generator=g),
             "concat_mask": torch.cat([torch.zeros(1, 1, 1, 8, 8), torch.ones(1, 1, 1, 8, 8)], dim=2),
             "clip_vision_output": clip}
    pos, neg = _conds(6)
    pos, neg = [[pos[0][0], dict(extra)]], [[neg[0][0], dict(extra)]]
    diff, _ = _stock_vs_pp(model, model, pos, neg, torch.zeros(1, 16, 2, 8, 8), seed=4, steps=2, cfg=3.0,
                           sampler_name="uni_pc", scheduler="simple")
    print(f"Wan 2.1 i2v: max|diff| {diff:.2e}")
    assert diff <= TOL


def test_wan22_ti2v_5b_image_to_video(tmp_path):
    """Wan 2.2 5B (48 latent channels, per-frame timesteps): image-to-video with the first
    frame given through the latent's noise mask (Wan22ImageToVideoLatent)."""
    path = wan_file("wan22_5b")
    model = comfy.sd.load_diffusion_model(str(path))
    assert type(model.model).__name__ == "WAN22"
    g = torch.Generator().manual_seed(9)
    latent = torch.zeros(1, 48, 2, 8, 8)
    latent[:, :, :1] = torch.randn(1, 48, 1, 8, 8, generator=g)
    mask = torch.ones(1, 1, 2, 8, 8)
    mask[:, :, :1] = 0.0
    pos, neg = _conds(7)
    noise = comfy.sample.prepare_noise(latent, 4)
    ref = comfy.sample.sample(model, noise, 2, 3.0, "euler", "simple", pos, neg, latent, noise_mask=mask, seed=4,
                              disable_pbar=True)
    group = WorkerGroup("cpu,cpu", extra_paths=[str(COMFY_ROOT)])
    try:
        job, t, rt = prepare_comfy_job(2, model, pos, neg, {"samples": latent, "noise_mask": mask}, seed=4, steps=2,
                                       cfg=3.0, sampler_name="euler", scheduler="simple")
        res = group.run(job, t, rank_tensors=rt)
    finally:
        group.shutdown()
    diff = (res["latents"] - ref).abs().max().item()
    print(f"Wan 2.2 5B i2v: max|diff| {diff:.2e}")
    assert diff <= TOL and (res["latents"][:, :, :1] - latent[:, :, :1]).abs().max() < 1e-5  # first frame kept


def test_free_the_host_copy_after_handing_over():
    """A MODEL from the stock loader: after the first job the ComfyUI process may drop its
    weights (free_host_weights); later jobs read the handed-over copy."""
    model = comfy.sd.load_diffusion_model(str(cached_model_files()["wan21_t2v"]))
    pos, neg = _conds(3)
    noise = comfy.sample.prepare_noise(EMPTY["samples"], 2)
    ref = comfy.sample.sample(model, noise, 2, 3.0, "euler", "simple", pos, neg, EMPTY["samples"], seed=2,
                              disable_pbar=True)
    group = WorkerGroup("cpu,cpu", extra_paths=[str(COMFY_ROOT)])
    try:
        for free in (True, False):
            job, t, rt = prepare_comfy_job(2, model, pos, neg, EMPTY, seed=2, steps=2, cfg=3.0, sampler_name="euler",
                                           scheduler="simple", free_host_copy=free)
            res = group.run(job, t, rank_tensors=rt)
            assert (res["latents"] - ref).abs().max() <= TOL
            assert all(p.is_meta for p in model.model.diffusion_model.parameters())  # no weights left here
    finally:
        group.shutdown()


def test_comfyui_scaled_fp8_file(tmp_path):
    """ComfyUI's scaled-fp8 files (fp8 weights with a per-layer ``scale_weight`` and a
    ``scaled_fp8`` marker): the workers load them into ComfyUI's quantized layers, as the
    stock loader does, straight from the file."""
    from safetensors.torch import load_file, save_file
    sd = load_file(str(cached_model_files()["wan21_t2v"]))
    out = {}
    for k, v in sd.items():
        if k.startswith("blocks.") and k.endswith(".weight") and v.dim() == 2:
            scale = v.abs().max() / 448.0
            out[k] = (v / scale).to(torch.float8_e4m3fn)
            out[k[: -len(".weight")] + ".scale_weight"] = scale.reshape(1).float()
        else:
            out[k] = v
    out["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    path = tmp_path / "wan_scaled_fp8.safetensors"
    save_file(out, str(path))
    stock = comfy.sd.load_diffusion_model(str(path))
    assert stock.model.model_config.quant_config  # ComfyUI sees quantized layers
    pos, neg = _conds(4)
    diff, ref = _stock_vs_pp(stock, load_on_disk(str(path)), pos, neg, EMPTY["samples"], seed=1, steps=2, cfg=3.0,
                             sampler_name="euler", scheduler="simple")
    plain = comfy.sd.load_diffusion_model(str(cached_model_files()["wan21_t2v"]))
    noise = comfy.sample.prepare_noise(EMPTY["samples"], 1)
    unquantized = comfy.sample.sample(plain, noise, 2, 3.0, "euler", "simple", pos, neg, EMPTY["samples"], seed=1,
                                      disable_pbar=True)
    print(f"Wan scaled fp8: max|diff| {diff:.2e} (the fp8 rounding itself: "
          f"{(ref - unquantized).abs().max().item():.2e})")
    assert diff <= TOL


@pytest.mark.parametrize("dtype,prefix", [(torch.bfloat16, "model.diffusion_model."), (torch.float16, "")])
def test_bf16_fp16_and_prefixed_files(tmp_path, dtype, prefix):
    """Files as users have them: bf16 / fp16 weights, keys with a checkpoint's
    ``model.diffusion_model.`` prefix; the stock loader and the workers read them alike."""
    from safetensors.torch import load_file, save_file
    sd = load_file(str(cached_model_files()["wan21_t2v"]))
    path = tmp_path / "wan.safetensors"
    save_file({prefix + k: v.to(dtype) for k, v in sd.items()}, str(path))
    pos, neg = _conds(5)
    diff, _ = _stock_vs_pp(comfy.sd.load_diffusion_model(str(path)), load_on_disk(str(path)), pos, neg,
                           EMPTY["samples"], seed=3, steps=2, cfg=3.0, sampler_name="euler", scheduler="simple")
    print(f"Wan {dtype} file, prefix {prefix!r}: max|diff| {diff:.2e}")
    assert diff <= TOL


def _in_memory(model):
    """A MODEL whose weights ComfyUI cannot trace to a file (as a merged or trained one): the
    stock loader's, with its record of the file it came from (ComfyUI >= 0.2x) removed."""
    if hasattr(model, "cached_patcher_init"):
        model.cached_patcher_init = None
    return model


def test_stock_model_from_a_file_is_read_from_that_file(tmp_path):
    """ComfyUI records the file a stock-loader MODEL came from: the workers read that file
    (nothing exported), with the MODEL's LoRA patches as the only thing that crosses."""
    from pp_runtime.comfy import export
    path = str(cached_model_files()["wan21_t2v"])
    model = comfy.sd.load_diffusion_model(path)
    if getattr(model, "cached_patcher_init", None) is None:
        pytest.skip("this ComfyUI does not record the file a MODEL came from (cached_patcher_init)")
    pos, neg = _conds(1)
    folder = tmp_path / "exports"
    job = prepare_comfy_job(2, model, pos, neg, EMPTY, seed=1, steps=1, cfg=3.0, sampler_name="euler",
                            scheduler="simple", export_dir=str(folder))[0]
    assert job["model"]["path"] == path and not folder.exists()
    assert export.loaded_from_file(_in_memory(comfy.sd.load_diffusion_model(path))) is None


def test_stock_model_export_is_reused_kept_on_its_device_and_removed(tmp_path):
    """A MODEL whose weights are in memory only is exported once per weights into the given
    folder: the same MODEL again, or a new MODEL object with the same weights, writes nothing
    and does not unload the MODEL from ComfyUI's memory management; the file goes when no
    MODEL uses it; an export left by a dead process is removed by the next export."""
    import gc

    import comfy.model_management as mm
    from pp_runtime.comfy import export
    path = str(cached_model_files()["wan21_t2v"])
    pos, neg = _conds(1)
    folder = tmp_path / "exports"
    folder.mkdir()
    stale = folder / f"{export.EXPORT_PREFIX}999999-0123456789ab.safetensors"  # a crashed process's (no such pid)
    stale.write_bytes(b"x")

    def job(model):
        return prepare_comfy_job(2, model, pos, neg, EMPTY, seed=1, steps=1, cfg=3.0, sampler_name="euler",
                                 scheduler="simple", export_dir=str(folder))[0]["model"]["path"]

    a = _in_memory(comfy.sd.load_diffusion_model(path))
    mm.load_models_gpu([a])  # as after a stock KSampler run
    first = job(a)
    assert not stale.exists() and os.path.dirname(first) == str(folder)
    mtime = os.stat(first).st_mtime_ns
    mm.load_models_gpu([a])
    assert job(a) == first and os.stat(first).st_mtime_ns == mtime
    assert any(lm.model is a for lm in mm.current_loaded_models), "the MODEL was unloaded for an export it had"
    b = _in_memory(comfy.sd.load_diffusion_model(path))  # a new MODEL object, the same weights
    assert job(b) == first and os.stat(first).st_mtime_ns == mtime
    c = _in_memory(comfy.sd.load_diffusion_model(str(make_wan21_t2v(tmp_path / "other.safetensors", seed=9))))
    other = job(c)
    assert other != first
    mm.unload_all_models()
    del a, b, c
    gc.collect()
    assert not os.path.exists(first) and not os.path.exists(other), "an export outlived every MODEL using it"


def test_export_is_streamed_said_and_bounded_by_the_disk(tmp_path, caplog):
    """An export is written a tensor at a time (what the workers read equals the MODEL's
    weights, bit for bit), says its size and folder in the log, and is refused with what to
    do when the folder's disk cannot hold it (asked for more than the real free space)."""
    import logging
    import shutil

    from safetensors.torch import load_file

    from pp_runtime.comfy import export
    from pp_runtime.comfy.carry import CarryError
    model = _in_memory(comfy.sd.load_diffusion_model(str(cached_model_files()["wan21_t2v"])))
    with caplog.at_level(logging.INFO):
        path = export.export_weights(model.model, str(tmp_path))
    assert re.search(r"writing its weights once, [0-9.]+ GB, to " + re.escape(str(tmp_path)), caplog.text)
    got, want = load_file(path), model.model.diffusion_model.state_dict()
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k].view(torch.uint8), want[k].contiguous().view(torch.uint8)) for k in want)
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(CarryError, match=r"whose disk has [0-9.]+ GB free: load the model with PP Load"):
        export.check_room(str(tmp_path), free)
    export.check_room(str(tmp_path), 1 << 20)
