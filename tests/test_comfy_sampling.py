"""Tier 2: ComfyUI's own samplers over the pipeline equal ComfyUI's stock sampling.

No server: the stock path is ``comfy.sample.sample`` in this process (what the stock
KSampler node calls); the PP path is the job PP KSampler builds, run by a real 2-process
CPU worker group.  Every ``sampler_name`` and every ``scheduler`` of the stock KSampler,
on a tiny random-weight Wan 2.1 file loaded by ComfyUI's own loader.  Tolerance 1e-4
(fp32): the workers split cond/uncond into micro-batches and run 1 thread each, so CPU
kernels may reduce in a different order than the batched stock call (seen: ~1e-5).
"""
import json

import pytest
import torch

from comfy_env import require_comfy

COMFY_ROOT = require_comfy()

import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402
import comfy.sd  # noqa: E402
from make_models import cached_model_files  # noqa: E402

from pp_runtime.comfy.job import prepare_comfy_job  # noqa: E402
from pp_runtime.workers.group import WorkerGroup  # noqa: E402
from pp_runtime.engine.layout import JobError  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module")
def setup():
    model = comfy.sd.load_diffusion_model(str(cached_model_files()["wan21_t2v"]))
    g = torch.Generator().manual_seed(0)
    pos = [[torch.randn(1, 6, 4096, generator=g), {}]]
    neg = [[torch.randn(1, 6, 4096, generator=g), {}]]
    group = WorkerGroup("cpu,cpu", extra_paths=[str(COMFY_ROOT)])
    yield model, pos, neg, group
    group.shutdown()


def _compare(setup, latent, sampler, scheduler, steps=3, cfg=3.5, denoise=1.0, seed=3, **kw):
    model, pos, neg, group = setup
    noise = comfy.sample.prepare_noise(latent["samples"], seed)
    ref = comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, pos, neg, latent["samples"],
                              denoise=denoise, seed=seed, disable_pbar=True)
    job, tensors, rank_tensors = prepare_comfy_job(group.world, model, pos, neg, latent, seed=seed, steps=steps,
                                                   cfg=cfg, sampler_name=sampler, scheduler=scheduler,
                                                   denoise=denoise, **kw)
    steps_seen = []
    res = group.run(job, tensors, rank_tensors=rank_tensors, on_step=lambda i, n, x0: steps_seen.append(i))
    diff = (res["latents"] - ref).abs().max().item()
    return diff, ref, steps_seen


EMPTY = {"samples": torch.zeros(1, 16, 1, 8, 8)}


@pytest.mark.parametrize("sampler", comfy.samplers.KSampler.SAMPLERS)
def test_every_sampler(setup, sampler):
    diff, ref, steps = _compare(setup, EMPTY, sampler, "simple")
    print(f"{sampler}: max|diff| {diff:.2e}")
    assert torch.isfinite(ref).all() and diff <= TOL and steps


@pytest.mark.parametrize("scheduler", comfy.samplers.KSampler.SCHEDULERS)
def test_every_scheduler(setup, scheduler):
    diff, _, _ = _compare(setup, EMPTY, "euler", scheduler)
    print(f"{scheduler}: max|diff| {diff:.2e}")
    assert diff <= TOL


def test_cfg1_batch2_denoise_on_non_empty_latent(setup):
    g = torch.Generator().manual_seed(9)
    latent = {"samples": torch.randn(2, 16, 1, 8, 8, generator=g)}
    for cfg, denoise in ((1.0, 1.0), (3.5, 0.6)):
        diff, _, steps = _compare(setup, latent, "dpmpp_2m", "karras", cfg=cfg, denoise=denoise)
        print(f"cfg {cfg} denoise {denoise} batch 2: max|diff| {diff:.2e}")
        assert diff <= TOL


def test_model_sampling_patch_is_carried(setup):
    """ModelSamplingSD3 with a shift other than Wan's default (8) changes the sigmas: the
    workers must sample with the patch (a dropped patch would give the unpatched result)."""
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3
    model, pos, neg, group = setup
    patched = ModelSamplingSD3().patch(model, shift=2.0)[0]
    diff, ref, _ = _compare((patched, pos, neg, group), EMPTY, "euler", "simple")
    plain, ref_plain, _ = _compare(setup, EMPTY, "euler", "simple")
    print(f"shift 2: max|diff| {diff:.2e}; the shift moved the result by {(ref - ref_plain).abs().max().item():.2e}")
    assert diff <= TOL and plain <= TOL and (ref - ref_plain).abs().max() > 1e-3


@pytest.mark.parametrize("patch,message", [
    (lambda m: m.set_model_sampler_cfg_function(lambda args: args["cond"]), "option 'sampler_cfg_function'"),
    (lambda m: m.add_patches({("diffusion_model.blocks.0.ffn.0.weight", None, lambda w: w): (torch.zeros(1),)}),
     "custom function"),
    (lambda m: m.set_model_attn1_patch(lambda *a: a), "transformer options"),
    (lambda m: m.add_wrapper_with_key("sampler_sample", "some_node", lambda ex, *a, **k: ex(*a, **k)),
     "sampler_sample wrapper 'some_node'"),
    (lambda m: m.add_callback_with_key("on_pre_run", "other_node", lambda *a: None), "on_pre_run callback 'other_node'"),
    (lambda m: m.set_attachments("third_node", object()), "attachment 'third_node'"),
])
def test_uncarriable_model_patch_is_refused(setup, patch, message):
    """What a model-patch node adds and PP KSampler cannot run is refused before any work."""
    model, pos, neg, group = setup
    m = model.clone()
    patch(m)
    with pytest.raises(JobError, match=message):
        prepare_comfy_job(group.world, m, pos, neg, EMPTY, seed=0, steps=2, cfg=2.0, sampler_name="euler",
                          scheduler="simple")


def test_latent_for_another_model_is_refused(setup):
    model, pos, neg, group = setup
    with pytest.raises(JobError, match="LATENT has 4 channels but this WAN21 model expects 16"):
        prepare_comfy_job(group.world, model, pos, neg, {"samples": torch.ones(1, 4, 1, 8, 8)}, seed=0, steps=2,
                          cfg=2.0, sampler_name="euler", scheduler="simple")


def _lora(model, seed=0, rank=4):
    """A LoRA file's state dict for every attention projection of every block."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, p in model.model.diffusion_model.named_parameters():
        if name.endswith(("self_attn.q.weight", "cross_attn.o.weight")):
            base = "diffusion_model." + name[: -len(".weight")]
            sd[f"{base}.lora_up.weight"] = torch.randn(p.shape[0], rank, generator=g) * 0.2
            sd[f"{base}.lora_down.weight"] = torch.randn(rank, p.shape[1], generator=g) * 0.2
            sd[f"{base}.alpha"] = torch.tensor(float(rank))
    return sd


def test_lora_description_grows_with_its_keys_not_their_square(setup):
    """What describes a LoRA's patches to the workers is the same size per key, however
    many keys the file has (ComfyUI gives every adapter the file's whole key set; carried,
    a LoRA on Flux's 1064 linears took seconds to describe per prompt)."""
    from pp_runtime.comfy.carry import pack_weight_patches
    model = setup[0]
    lora = {}
    for name, p in model.model.diffusion_model.named_parameters():  # every 2-D block weight
        if name.startswith("blocks.") and p.dim() == 2:
            base = "diffusion_model." + name[: -len(".weight")]
            lora[f"{base}.lora_up.weight"] = torch.zeros(p.shape[0], 2)
            lora[f"{base}.lora_down.weight"] = torch.zeros(2, p.shape[1])

    def per_key(sd):
        m = comfy.sd.load_lora_for_models(model, None, sd, 0.8, 0)[0]
        meta, _ = pack_weight_patches(m, [["blocks.", ""]])
        return len(meta), len(json.dumps(meta)) / len(meta)
    keys = sorted({k.rsplit(".lora_", 1)[0] for k in lora})
    half = {k: v for k, v in lora.items() if k.rsplit(".lora_", 1)[0] in keys[: len(keys) // 2]}
    (n, whole), (h, part) = per_key(lora), per_key(half)
    print(f"description per key: {part:.0f} bytes with {h} keys, {whole:.0f} with {n}")
    assert n >= 20 and whole <= 1.05 * part


def test_lora_on_the_workers_and_repatch_without_reload(setup):
    """LoRA through the stock path (load_lora_for_models = LoraLoaderModelOnly): each worker
    patches only its stage's keys; a new strength re-patches from weights in memory."""
    model, pos, neg, group = setup
    lora = _lora(model)
    _compare(setup, EMPTY, "euler", "simple")  # the base model placed, no patches
    results = []
    for strength in (0.8, 0.4, None):
        m = model if strength is None else comfy.sd.load_lora_for_models(model, None, lora, strength, 0)[0]
        diff, ref, _ = _compare((m, pos, neg, group), EMPTY, "euler", "simple")
        ranks = group.last_run["ranks"]
        results.append(ref)
        print(f"LoRA strength {strength}: max|diff| {diff:.2e}, patched {[r['patched'] for r in ranks]}, "
              f"base bytes read {[r['bytes_read'] for r in ranks]}")
        assert diff <= TOL
        assert not any(r["loaded"] for r in ranks) and all(r["bytes_read"] == 0 for r in ranks)
        assert all(r["patched"] for r in ranks)  # each change re-patched (or restored) every stage
    assert (results[0] - results[2]).abs().max() > 1e-3  # the LoRA changed the result
    # The same LoRA again: every worker holds it, so its tensors are not sent again.
    m = comfy.sd.load_lora_for_models(model, None, lora, 0.8, 0)[0]
    sent = []
    for _ in range(2):
        diff, _, _ = _compare((m, pos, neg, group), EMPTY, "euler", "simple")
        sent.append(group.last_run["host_phases"]["sent_bytes"])
        assert diff <= TOL
    lora_bytes = sum(v.numel() * v.element_size() for v in lora.values())
    print(f"job bytes sent: {sent[0]} with the LoRA's tensors, {sent[1]} once the workers hold them")
    assert sent[0] - sent[1] >= 0.9 * lora_bytes


def test_unchanged_conditioning_is_not_sent_again(setup):
    """ComfyUI hands the same conditioning objects to every prompt whose text did not change;
    the workers keep them.  An in-place change (the objects ComfyUI makes in inference mode
    have no version counter) is still seen: the result follows the new values."""
    model, _, _, group = setup
    g = torch.Generator().manual_seed(5)
    with torch.inference_mode():  # as ComfyUI's text encoder nodes make them
        pos = [[torch.randn(1, 6, 4096, generator=g), {}]]
        neg = [[torch.randn(1, 6, 4096, generator=g), {}]]
    cond_bytes = 2 * pos[0][0].numel() * 4
    sent = []
    for _ in range(2):
        diff, _, _ = _compare((model, pos, neg, group), EMPTY, "euler", "simple")
        sent.append(group.last_run["host_phases"]["sent_bytes"])
        assert diff <= TOL
    print(f"job bytes sent: {sent[0]}, then {sent[1]} with the same conditioning")
    assert sent[0] - sent[1] >= cond_bytes
    with torch.inference_mode():
        pos[0][0].mul_(-1.0)  # the same object, new values
    diff, ref, _ = _compare((model, pos, neg, group), EMPTY, "euler", "simple")
    assert diff <= TOL, "the workers sampled with the old conditioning"
    assert group.last_run["host_phases"]["sent_bytes"] - sent[1] >= cond_bytes // 2


def test_step_latents_only_when_previews_want_them(setup):
    """Without a previewer (ComfyUI's default --preview-method none) the stock sampler's x0
    goes nowhere, so the workers do not send it every step; with one they do."""
    model, pos, neg, group = setup
    seen = {}
    for stream in (False, True):
        job, tensors, rank_tensors = prepare_comfy_job(group.world, model, pos, neg, EMPTY, seed=1, steps=3, cfg=2.0,
                                                       sampler_name="euler", scheduler="simple")
        job["stream_x0"] = stream
        x0s = []
        group.run(job, tensors, rank_tensors=rank_tensors, on_step=lambda i, n, x0: x0s.append(x0))
        seen[stream] = x0s
    assert len(seen[False]) == 3 and all(x is None for x in seen[False])
    assert len(seen[True]) == 3 and all(x is not None and x.shape == EMPTY["samples"].shape for x in seen[True])


# ------------------------------------------------------------------- Qwen-Image
@pytest.fixture(scope="module")
def qwen(setup):
    """The tiny Qwen-Image file (hidden size 3072 fixed by detection, 2 blocks): the stock
    MODEL from ComfyUI's loader, and the PP path's MODEL from ``load_on_disk`` (PP Load
    Diffusion Model: the workers read their stages from the file, nothing is exported).
    The worker group is the module's."""
    from pp_runtime.comfy.loading import load_on_disk
    path = str(cached_model_files()["qwen_image"])
    stock = comfy.sd.load_diffusion_model(path)
    on_disk = load_on_disk(path)
    g = torch.Generator().manual_seed(0)
    pos = [[torch.randn(1, 6, 3584, generator=g), {}]]
    neg = [[torch.randn(1, 4, 3584, generator=g), {}]]
    yield stock, on_disk, pos, neg, setup[3]


def _reference_latent(conditioning, samples):
    """ComfyUI's ReferenceLatent node (TextEncodeQwenImageEdit does the same):
    ``reference_latents`` appended to every entry's options."""
    from comfy_extras.nodes_edit_model import ReferenceLatent
    return ReferenceLatent.execute(conditioning, {"samples": samples}).result[0]


def _compare_qwen(qwen, pos, neg, latent, sampler="euler", steps=2, cfg=2.5, seed=5):
    stock, on_disk, _, _, group = qwen
    noise = comfy.sample.prepare_noise(latent["samples"], seed)
    ref = comfy.sample.sample(stock, noise, steps, cfg, sampler, "simple", pos, neg, latent["samples"],
                              seed=seed, disable_pbar=True)
    job, tensors, rank_tensors = prepare_comfy_job(group.world, on_disk, pos, neg, latent, seed=seed, steps=steps,
                                                   cfg=cfg, sampler_name=sampler, scheduler="simple")
    assert job["family"] == "QwenImage" and job["split"] == [1, 1]
    res = group.run(job, tensors, rank_tensors=rank_tensors)
    return (res["latents"] - ref).abs().max().item(), ref


def test_qwen_image_t2i(qwen):
    _, _, pos, neg, _ = qwen
    latent = {"samples": torch.zeros(1, 16, 1, 8, 8)}
    diff, ref = _compare_qwen(qwen, pos, neg, latent, steps=3)
    print(f"Qwen-Image t2i: max|diff| {diff:.2e}")
    assert torch.isfinite(ref).all() and ref.abs().max() > 1e-2 and diff <= TOL


@pytest.mark.parametrize("negative_ref", [True, False], ids=["both-branches", "positive-only"])
def test_qwen_image_edit_reference_latent(qwen, negative_ref):
    """Edit: a reference latent (another size than the output) on the conditioning; the model
    appends it as image tokens and drops them from its output.  With the reference on both
    branches ComfyUI batches cond+uncond (``ref_latents`` concatenated); on the positive only,
    it runs them as separate passes."""
    stock, _, pos, neg, _ = qwen
    g = torch.Generator().manual_seed(7)
    ref_latent = torch.randn(1, 16, 1, 6, 10, generator=g)
    pos_e = _reference_latent(pos, ref_latent)
    neg_e = _reference_latent(neg, ref_latent) if negative_ref else neg
    latent = {"samples": torch.zeros(1, 16, 1, 8, 8)}
    diff, ref = _compare_qwen(qwen, pos_e, neg_e, latent)
    noise = comfy.sample.prepare_noise(latent["samples"], 5)
    no_ref = comfy.sample.sample(stock, noise, 2, 2.5, "euler", "simple", pos, neg, latent["samples"], seed=5,
                                 disable_pbar=True)
    effect = (ref - no_ref).abs().max().item()
    print(f"Qwen-Image edit ({'both' if negative_ref else 'positive'}): max|diff| {diff:.2e}, "
          f"reference latent changed the result by {effect:.2e}")
    assert diff <= TOL and effect > 1e-3


# ------------------------------------------------------------------- MiniMax-H3 (ComfyUI >= 0.33)
import family_zoo as zoo  # noqa: E402


@pytest.mark.skipif("minimax_h3" not in zoo.BY_NAME,
                    reason="this ComfyUI has no MiniMax-H3 (comfy.ldm.minimax, ComfyUI >= 0.33)")
def test_minimax_h3_keyframes_lora_previews_and_cancel(setup):
    """MiniMax-H3 (video + audio latents, batch 1: cond and uncond are separate passes) on 2
    stages: an fl2va conditioning (a keyframe's video + audio latents, cond noise augmentation:
    ``minimax_keyframes`` carried to the last rank, ``minimax_payload`` to every rank) with a
    denoise mask, a LoRA on blocks of both stages, the token refiner (last stage only) and the
    head; previews of both streams; a cancel after the first step, then an exact run again."""
    import comfy.nested_tensor
    group = setup[3]
    case = zoo.BY_NAME["minimax_h3"]
    model = zoo.model(case)
    pos, neg = zoo.conditioning(case, 1)
    g = torch.Generator().manual_seed(5)
    pos[0][1].update({"minimax_keyframes": [{"resolved_frame_index": 0,
                                             "latent": torch.randn(1, 24, 1, 4, 4, generator=g),
                                             "audio_latent": torch.randn(1, 32, 2, 3, generator=g)}],
                      "minimax_visual_cond_noise_aug": 0.9})
    vm = torch.ones(1, 1, 2, 4, 4)
    vm[..., :2, :] = 0.3
    mask = comfy.nested_tensor.NestedTensor([vm, torch.ones(1, 1, 2, 8)])
    latent = {"samples": zoo.latent(case), "noise_mask": mask}
    lora = {}
    for name, p in model.model.diffusion_model.named_parameters():
        if name.endswith(("attn.qkv_proj.weight", "mlp.fc2.weight")) or name == "final_layer.video_out.weight":
            base = "diffusion_model." + name[: -len(".weight")]
            lora[f"{base}.lora_up.weight"] = torch.randn(p.shape[0], 4, generator=g) * 0.2
            lora[f"{base}.lora_down.weight"] = torch.randn(4, p.shape[1], generator=g) * 0.2
    patched = comfy.sd.load_lora_for_models(model, None, lora, 0.8, 0)[0]

    def flat(x):
        return torch.cat([t.flatten() for t in (x if isinstance(x, list) else x.unbind())])

    def run(m, steps=3, **kw):
        job, tensors, rank_tensors = prepare_comfy_job(group.world, m, pos, neg, latent, seed=5, steps=steps,
                                                       cfg=3.0, sampler_name="euler", scheduler="simple")
        job["stream_x0"] = True
        return group.run(job, tensors, rank_tensors=rank_tensors, **kw)

    results = {}
    for label, m in (("lora", patched), ("base", model)):
        noise = comfy.sample.prepare_noise(latent["samples"], 5)
        ref = comfy.sample.sample(m, noise, 3, 3.0, "euler", "simple", pos, neg, latent["samples"], seed=5,
                                  noise_mask=latent["noise_mask"], disable_pbar=True)
        x0s = []
        res = run(m, on_step=lambda i, n, x0: x0s.append(x0))
        rel = ((flat(res["latents"]) - flat(ref)).norm() / flat(ref).norm()).item()
        print(f"MiniMax-H3 {label}: rel L2 {rel:.1e}, patched {[r['patched'] for r in res['ranks']]}")
        assert rel <= 1e-5
        assert len(x0s) == 3 and [tuple(t.shape) for t in x0s[-1]] == [(1, 24, 2, 4, 4), (1, 32, 2, 8)]
        results[label] = flat(ref)
    assert (results["lora"] - results["base"]).norm() > 1e-2  # the LoRA changed the result
    seen = []
    res = run(model, steps=6, on_step=lambda i, n, x0: seen.append(i), should_interrupt=lambda: bool(seen))
    assert res["interrupted"] and len(seen) < 6
    again = run(model)
    assert ((flat(again["latents"]) - results["base"]).norm() / results["base"].norm()).item() <= 1e-5
