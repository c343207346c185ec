"""Tier 2: what changed in ComfyUI between the releases people run (v0.8 -> v0.33), handled.

Each test names the change it covers; on the tree where the change is absent it checks
that the pack still does what that tree's stock KSampler does.  No server (the server
tests run these paths end to end: test_server_families' LTX-2 previews, test_server_patches'
context windows).
"""
from __future__ import annotations

import pytest
import torch

from comfy_env import require_comfy

COMFY_ROOT = require_comfy()

import comfy.sample  # noqa: E402
import family_zoo as zoo  # noqa: E402
from make_models import cached_model_files  # noqa: E402

from pp_runtime.comfy import carry
from pp_runtime.comfy import loading  # noqa: E402
from pp_runtime.comfy import model_patches  # noqa: E402
from pp_runtime.comfy.job import LATENT_HINTS, check_latent, sampler_output  # noqa: E402


# -- v0.11: empty-latent nodes say which downscale ratio they assumed ------------------------
def test_empty_latent_is_fixed_with_its_downscale_ratio_as_stock_does():
    """EmptyLatentImage (v0.11+) adds ``downscale_ratio_spacial`` (8); the stock KSampler hands
    it to ``fix_empty_latent_channels``, which resizes the latent for Flux 2 (16x): the pack's
    latent must be the one stock samples, and its LATENT output loses the hints."""
    import inspect
    import nodes
    model = zoo.model(zoo.BY_NAME["flux2"])
    latent = nodes.EmptyLatentImage().generate(128, 128, 1)[0]
    takes = inspect.signature(comfy.sample.fix_empty_latent_channels).parameters
    stock = comfy.sample.fix_empty_latent_channels(
        model, latent["samples"], **{k: latent.get(k) for k in LATENT_HINTS if k in takes})
    ours = check_latent(model, latent)
    assert ours.shape == stock.shape and torch.equal(ours, stock)
    if "downscale_ratio_spacial" in latent:  # v0.33: the hint changes the size (the bug: twice stock's)
        assert ours.shape[-1] == 128 // 16
    out = sampler_output(latent, ours)
    assert not set(out) & set(LATENT_HINTS) and out["samples"] is ours


def test_add_noise_off_uses_comfyuis_empty_noise():
    from pp_runtime.comfy.sampler import empty_noise
    import comfy.nested_tensor
    nested = comfy.nested_tensor.NestedTensor([torch.ones(1, 4, 2, 2, 2), torch.ones(1, 8, 4, 16)])
    noise = empty_noise(nested)
    assert getattr(noise, "is_nested", False) == hasattr(comfy.sample, "prepare_empty_noise")
    flat = empty_noise(torch.ones(1, 4, 8, 8))
    assert flat.shape == (1, 4, 8, 8) and not flat.any()


# -- v0.2x: context windows gained settings ------------------------------------------------
def test_context_window_settings_all_travel():
    """latent_retain_index_list and causal_window_fix (v0.33) were reset to their defaults on
    the workers; every setting the node takes now travels, and one it does not take is refused."""
    from comfy_extras.nodes_context_windows import ContextWindowsManualNode
    import inspect
    model = zoo.model(zoo.BY_NAME["wan21_t2v"])
    takes = inspect.signature(ContextWindowsManualNode.execute).parameters
    extra = {k: v for k, v in (("latent_retain_index_list", "0"), ("causal_window_fix", False)) if k in takes}
    patched = ContextWindowsManualNode.execute(model, context_length=3, context_overlap=1,
                                               context_schedule="standard_static", context_stride=1,
                                               closed_loop=False, fuse_method="pyramid", dim=2, freenoise=False,
                                               cond_retain_index_list="0", **extra).result[0]
    spec, = model_patches.describe(patched)
    again = model_patches.apply(zoo.model(zoo.BY_NAME["wan21_t2v"]), [spec]).model_options["context_handler"]
    handler = patched.model_options["context_handler"]
    for k, v in vars(handler).items():
        if not callable(v) and not k.startswith("_") and k != "callbacks":
            assert model_patches._same(v, getattr(again, k)), k
    if extra:
        assert again.latent_retain_index_list == [0] and again.causal_window_fix is False
    handler.something_new = 1
    with pytest.raises(model_patches.UnsupportedPatch, match="something_new"):
        model_patches.describe(patched)


# -- v0.11+: ways to patch a MODEL that the workers cannot run ------------------------------
@pytest.mark.parametrize("what,match", [("injections", "bypass LoRA"), ("weight_wrapper_patches", "weight wrappers"),
                                        ("hook_patches", "hook patches")])
def test_patches_the_workers_cannot_run_are_refused_by_name(what, match):
    model = zoo.model(zoo.BY_NAME["wan21_t2v"])
    if not hasattr(model, what):
        pytest.skip(f"this ComfyUI's ModelPatcher has no {what}")
    key = "bypass_lora" if what == "injections" else "diffusion_model.blocks.0.ffn.0.weight"
    getattr(model, what)[key] = [object()]
    with pytest.raises(model_patches.UnsupportedPatch, match=match):
        model_patches.describe(model)


# -- v0.2x: CLIP vision outputs carry image sizes (Z-Image omni reads them) ------------------
def test_clip_vision_image_sizes_travel():
    import comfy.clip_vision
    clip = comfy.clip_vision.Output()
    clip["image_embeds"] = torch.randn(1, 8)
    clip["image_sizes"] = [torch.Size([3, 224, 224])]
    meta, tensors = carry.pack_conditioning("positive", [[torch.zeros(1, 2, 4), {"clip_vision_output": clip}]])
    (_, opts), = carry.unpack_conditioning("positive", carry.json_roundtrip(meta), tensors)
    back = opts["clip_vision_output"]
    assert back.image_sizes == [torch.Size([3, 224, 224])] and isinstance(back.image_sizes[0], torch.Size)
    assert torch.equal(back.image_embeds, clip.image_embeds)
    clip["processor"] = object()
    with pytest.raises(carry.CarryError, match="processor"):
        carry.pack_conditioning("positive", [[torch.zeros(1, 2, 4), {"clip_vision_output": clip}]])


# -- v0.33 DynamicVRAM: ComfyUI's layers make their weights only when loaded -----------------
def test_meta_model_under_dynamic_vram_keeps_every_weight():
    """With comfy-aimdo on (ComfyUI's default on NVIDIA), a model built on the meta device by
    PP Load Diffusion Model had no Linear weights: the split counted only the norms and a
    LoRA found no key (silently lost).  The meta model keeps every weight of the file."""
    import comfy.lora
    mem = pytest.importorskip("comfy.memory_management")
    if not hasattr(mem, "aimdo_enabled"):
        pytest.skip("this ComfyUI has no DynamicVRAM")
    path = str(cached_model_files()["wan21_t2v"])
    plain = loading.load_on_disk(path)
    mem.aimdo_enabled = True
    try:
        dynamic = loading.load_on_disk(path)
    finally:
        mem.aimdo_enabled = False
    keys = lambda m: set(m.model.diffusion_model.state_dict())  # noqa: E731
    assert keys(dynamic) == keys(plain)
    assert comfy.lora.model_lora_keys_unet(dynamic.model, {}) == comfy.lora.model_lora_keys_unet(plain.model, {})
    a, b = loading.model_profile(plain.model.diffusion_model), loading.model_profile(dynamic.model.diffusion_model)
    assert a["block_bytes"] == b["block_bytes"] and a["costs"] == b["costs"]


def test_workers_keep_the_model_compiler_off():
    """ComfyUI >= 0.34 wraps forwards in comfy-aimdo graph calls (begin ... end) unless
    --disable-comfy-compiler; a stage leaves the forward at its boundary, so a worker always
    sets that flag, even when the ComfyUI process carries it off (on a tree without the flag,
    as v0.33, the attribute is made for the test)."""
    from comfy.cli_args import args
    from pp_runtime.workers.environment import apply_comfy_flags
    had = hasattr(args, "disable_comfy_compiler")
    old = getattr(args, "disable_comfy_compiler", None)
    try:
        args.disable_comfy_compiler = False
        apply_comfy_flags({"disable_comfy_compiler": False})
        assert args.disable_comfy_compiler is True
    finally:
        if had:
            args.disable_comfy_compiler = old
        else:
            del args.disable_comfy_compiler
