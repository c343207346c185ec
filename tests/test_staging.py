"""Tier 2: the staging mechanism over ComfyUI's own forward, for every family.

For every family of ``family_zoo`` (ComfyUI's own classes, small sizes, seeded weights) the
model is called the way ComfyUI's sampler calls it (the arguments are recorded during a
real ``comfy.sample.sample`` with the family's conditioning, cond and uncond batched), then
the same call is made stage by stage with ``StageForward`` for every 2- and 3-stage split:
the output must equal the unsplit forward.  Then the cases a sampler seldom sends: a
user's block-replacement patch on the cut, ControlNet residuals between blocks, attention
masks, Qwen's ``double_block`` patches, Wan's reference and time-concat inputs.
"""
from __future__ import annotations

import inspect
import itertools

import pytest
import torch
from torch.utils._pytree import tree_map_only

from comfy_env import require_comfy

require_comfy()

import comfy.ops  # noqa: E402
import comfy.sample  # noqa: E402
from comfy.ldm.flux.model import Flux  # noqa: E402
from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel  # noqa: E402
from comfy.ldm.wan.model import WanModel  # noqa: E402

import family_zoo as zoo  # noqa: E402
from make_models import randomize  # noqa: E402
from pp_runtime.comfy.runner import rows_of  # noqa: E402
from pp_runtime.comfy.families import FAMILIES, UnsupportedModel, family_for  # noqa: E402
from pp_runtime.comfy.staging import StageCancelled, StageForward, block_modules, flatten_state, profile, stage_prefixes, unflatten_state, unplaced

# The same modules on the same tensors in the same order: expected bit-exact (measured: 0.0
# for every family).  The bound leaves room only for a kernel picking another reduction
# order; outputs are O(1), so 1e-6 is ~1e-7 relative in fp32.
TOL = 1e-6
OPS = comfy.ops.disable_weight_init


def clone(v):
    return tree_map_only(torch.Tensor, torch.Tensor.clone, v)


def splits(n):
    """All 2-stage and 3-stage splits of n blocks, as lists of (start, end)."""
    for k in range(1, n):
        yield [(0, k), (k, n)]
    for k1, k2 in itertools.combinations(range(1, n), 2):
        yield [(0, k1), (k1, k2), (k2, n)]


def entry(model):
    """What the stages call (the family's ``entry``: MiniMax-H3's ``_forward``), so the unsplit
    reference is the same function."""
    fam = family_for(model)
    return getattr(model, fam.entry) if fam.entry else model


def run_staged(model, stages, args, kwargs):
    fam = family_for(model)
    state = None
    for j, (a, b) in enumerate(stages):
        if state is not None:  # what crosses a boundary: a flat dict of tensors
            assert all(torch.is_tensor(v) for v in state.values()), list(state)
        sf = StageForward(model, fam, a, b, j == 0, j == len(stages) - 1)
        state = sf(clone(args), clone(kwargs), state)
    return state


def max_diff(out, ref) -> float:
    if isinstance(ref, (list, tuple)):
        return max(max_diff(o, r) for o, r in zip(out, ref))
    assert out.shape == ref.shape
    return (out - ref).abs().max().item()


def check_every_split(model, args, kwargs):
    with torch.no_grad():
        ref = entry(model)(*clone(args), **clone(kwargs))
        first = ref[0] if isinstance(ref, (list, tuple)) else ref
        assert first.abs().max() > 1e-3  # random weights: a non-trivial output
        n = len(block_modules(model, family_for(model)))
        for stages in splits(n):
            diff = max_diff(run_staged(model, stages, args, kwargs), ref)
            assert diff <= TOL, f"split {stages}: max abs diff {diff}"


def by_name(fn, args, kwargs):
    """A call's arguments as ComfyUI's BaseModel passes them to the forward (and a rank to its
    stage): the input and the timestep positional, the rest by name (MiniMax-H3's forward
    hands its ``_forward`` ``context`` and ``transformer_options`` positionally)."""
    signature = inspect.signature(fn)
    named = dict(signature.bind(*args, **kwargs).arguments)
    for name, param in signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            named.update(named.pop(name, {}))
    first, second = list(named)[:2]
    return (named.pop(first), named.pop(second)), named


def recorded_calls(case, n=1):
    """The arguments of the diffusion model's first ``n`` calls in a real sampling run (of its
    family's ``entry``, what a stage calls)."""
    model = zoo.model(case)
    dm = model.model.diffusion_model
    method = family_for(dm).entry or "forward"
    calls, forward = [], getattr(dm, method)

    def record(*args, **kwargs):
        if len(calls) < n:
            args, kwargs = by_name(forward, args, kwargs)
            opts = {k: v for k, v in kwargs.get("transformer_options", {}).items()
                    if k in ("cond_or_uncond", "sigmas", "sample_sigmas")}
            calls.append(clone((args, {**kwargs, "transformer_options": opts})))
        return forward(*args, **kwargs)
    setattr(dm, method, record)
    try:
        pos, neg = zoo.conditioning(case)
        lat = zoo.latent(case)
        comfy.sample.sample(model, comfy.sample.prepare_noise(lat, 1), 1, case.cfg, "euler", "simple", pos, neg, lat,
                            seed=1, disable_pbar=True)
    finally:
        delattr(dm, method)
    return dm, calls


@pytest.mark.parametrize("name", [c.name for c in zoo.CASES])
def test_family_staged_forward_equals_comfyui_forward(name):
    case = zoo.BY_NAME[name]
    dm, calls = recorded_calls(case)
    fam = family_for(dm)
    assert unplaced(dm, fam) == []
    args, kwargs = calls[0]
    if case.cfg_batched:
        assert len(kwargs["transformer_options"]["cond_or_uncond"]) == 2, "cond and uncond in one call"
    else:  # batch 1 (MiniMax-H3): ComfyUI calls the model once per branch; every pass has one row
        assert len(kwargs["transformer_options"]["cond_or_uncond"]) == 1 and rows_of(args[0]) == 1
    check_every_split(dm, args, kwargs)


def _family_name(case):
    cfg = zoo.config(case)  # with the settings only this ComfyUI takes (case.newer)
    cfg.set_inference_dtype(torch.float32, None)
    return family_for(cfg.get_model({}, "", device="meta").diffusion_model).name


def test_every_family_has_cases():
    """The zoo builds models of every family in the staging table whose classes this ComfyUI
    has (MiniMax-H3 needs >= 0.33)."""
    from pp_runtime.comfy.families import _cls
    present = {f.name for f in FAMILIES if any(_cls(p) is not None for p in f.classes)}
    assert {_family_name(c) for c in zoo.CASES} == present
    assert {c.name for c in zoo.CASES} == {c.name for c in zoo.ALL_CASES if zoo.available(c)}


def test_profile_accounts_for_every_weight():
    """Blocks + shared + head + first-only bytes = the model; each stage holds its blocks
    and the shared weights; the head only on the last stage, first-only only on the first."""
    for case in zoo.CASES:
        dm = zoo.model(case).model.diffusion_model
        fam = family_for(dm)
        prof = profile(dm, fam)
        total = sum(p.numel() * p.element_size() for p in dm.parameters())
        assert prof["shared_bytes"] + sum(prof["block_bytes"]) + prof["last_bytes"] + prof["first_bytes"] == total, \
            case.name
        assert len(prof["costs"]) == prof["num_blocks"] and min(prof["costs"]) > 0
        n = prof["num_blocks"]
        mid = stage_prefixes(dm, fam, 1, n - 1, False, False)
        assert not any(p.startswith(h) for p in mid for h in fam.head), "head weights on a middle stage"
        assert not any(p.startswith(f) for p in mid for f in fam.first_only)


def test_flux_block_costs_match_per_token_flops():
    """Flux.1 double and single blocks cost about the same per token although the double
    block has far more parameters (two streams; its modulation acts on one vector)."""
    model = Flux(operations=OPS, dtype=torch.float32, **dict(FLUX1, mlp_ratio=4.0), device="meta")
    prof = profile(model, family_for(model))
    assert prof["costs"][0] == pytest.approx(prof["costs"][-1], rel=0.05)
    assert prof["block_bytes"][0] > 2 * prof["block_bytes"][-1]


def test_state_flattening_round_trip():
    v, a = torch.randn(2, 3), torch.randn(2, 5)
    flat = flatten_state({"img": (v, a), "txt": torch.ones(1)})
    assert set(flat) == {"img#0", "img#1", "txt"}
    back = unflatten_state(flat)
    assert isinstance(back["img"], tuple) and back["img"][1] is a and back["txt"].shape == (1,)


def test_cancel_between_blocks():
    """A stage asks before each of its blocks whether to stop, and unwinds with StageCancelled."""
    case = zoo.BY_NAME["wan21_t2v"]
    dm, calls = recorded_calls(case)
    asked = []

    def cancelled():
        asked.append(1)
        return len(asked) >= 2  # run one block, then stop before the second
    sf = StageForward(dm, family_for(dm), 0, 3, True, False, cancelled=cancelled)
    with pytest.raises(StageCancelled), torch.no_grad():
        sf(*clone(calls[0]))
    assert len(asked) == 2


def test_unet_is_refused_with_what_to_use():
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    unet = UNetModel(image_size=32, in_channels=4, model_channels=32, out_channels=4, num_res_blocks=[1, 1],
                     channel_mult=(1, 2), num_head_channels=32, transformer_depth=[0, 0],
                     transformer_depth_output=[0, 0, 0, 0], transformer_depth_middle=-2, device="meta",
                     operations=OPS)
    with pytest.raises(UnsupportedModel, match="UNet.*skip connections.*stock KSampler"):
        family_for(unet)


# ------------------------------------------------------------- what a sampler seldom sends
def add_replace_patch(opts, key):
    """A user's block-replacement patch (as ComfyUI's patches_replace['dit'] takes) that runs
    the original block and perturbs its image output: skipping or repeating it shows."""
    def patch(args, extra):
        out = extra["original_block"](args)
        out["img"] = out["img"] * 1.01
        return out
    opts.setdefault("patches_replace", {}).setdefault("dit", {})[key] = patch
    return opts


def _wan(**kw):
    torch.manual_seed(0)
    model = WanModel(patch_size=(1, 2, 2), in_dim=4, dim=64, ffn_dim=128, freq_dim=32, text_dim=24, out_dim=4,
                     num_heads=2, num_layers=4, operations=OPS, dtype=torch.float32, **kw)
    return randomize(model, seed=1).eval()


WAN_CASES = {
    "blockpatch": dict(patch=True),
    "ref_conv": dict(model=dict(in_dim_ref_conv=4), ref=True),
    "time_dim_concat": dict(tdc=True),
}


@pytest.mark.parametrize("case", list(WAN_CASES))
def test_wan_inputs(case):
    cfg = WAN_CASES[case]
    model = _wan(**cfg.get("model", {}))
    g = torch.Generator().manual_seed(2)
    b = 2
    kwargs = dict(context=torch.randn(b, 6, 24, generator=g), transformer_options={})
    if cfg.get("ref"):
        kwargs["reference_latent"] = torch.randn(b, 4, 6, 8, generator=g)
    if cfg.get("tdc"):
        kwargs["time_dim_concat"] = torch.randn(b, 4, 1, 5, 7, generator=g)
    if cfg.get("patch"):
        add_replace_patch(kwargs["transformer_options"], ("double_block", 2))
    # odd t/h/w: exercises pad_to_patch_size and the final crop
    check_every_split(model, (torch.randn(b, 4, 3, 5, 7, generator=g), torch.tensor([0.7, 0.2]) * 1000), kwargs)


FLUX1 = dict(in_channels=4, out_channels=4, vec_in_dim=8, context_in_dim=16, hidden_size=64,
             mlp_ratio=2.0, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[8, 12, 12],
             theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True, txt_ids_dims=[])

FLUX_CASES = {
    "controlnet": (FLUX1, dict(control=True)),
    "blockpatches-double-and-single": (FLUX1, dict(patch=True)),
    "attention_mask": (FLUX1, dict(mask=True)),
    "no-single-blocks": (dict(FLUX1, depth=3, depth_single_blocks=0), dict()),
    # Ovis (detected as image_model "flux" with yak_mlp + txt_norm)
    "ovis-yak-txtnorm": (dict(FLUX1, yak_mlp=True, txt_norm=True, txt_ids_dims=[1, 2], vec_in_dim=None), dict()),
}


@pytest.mark.parametrize("case", list(FLUX_CASES))
def test_flux_inputs(case):
    params, cfg = FLUX_CASES[case]
    torch.manual_seed(0)
    model = randomize(Flux(operations=OPS, dtype=torch.float32, **params), seed=1).eval()
    g = torch.Generator().manual_seed(2)
    b = 2
    kwargs = dict(context=torch.randn(b, 5, 16, generator=g), guidance=torch.tensor([3.5, 3.5]),
                  transformer_options={})
    if params["vec_in_dim"]:
        kwargs["y"] = torch.randn(b, params["vec_in_dim"], generator=g)
    img_tokens = 4 * 5  # 7 x 9 padded to 8 x 10, patch 2
    if cfg.get("control"):  # residuals after double block 0 and single block 1: a cut right after them too
        kwargs["control"] = {"input": [torch.randn(b, img_tokens, 64, generator=g), None],
                             "output": [None, torch.randn(b, img_tokens - 3, 64, generator=g)]}
    if cfg.get("mask"):  # additive mask over txt+img tokens, as ComfyUI's Flux.extra_conds passes it
        n = 5 + img_tokens
        kwargs["attention_mask"] = 0.5 * torch.randn(b, n, n, generator=g)
    if cfg.get("patch"):
        add_replace_patch(kwargs["transformer_options"], ("double_block", 1))
        add_replace_patch(kwargs["transformer_options"], ("single_block", 0))
    # odd h/w: exercises padding and the final crop
    check_every_split(model, (torch.randn(b, 4, 7, 9, generator=g), torch.tensor([0.7, 0.2])), kwargs)


QWEN = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=4, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=(4, 6, 6))


@pytest.mark.parametrize("case", ["controlnet", "double_block-patches", "blockpatch", "attention_mask",
                                  "2511-index_timestep_zero"])
def test_qwen_image_inputs(case):
    params = dict(QWEN, default_ref_method="index_timestep_zero") if case.startswith("2511") else QWEN
    torch.manual_seed(0)
    model = randomize(QwenImageTransformer2DModel(operations=OPS, dtype=torch.float32, **params), seed=1).eval()
    g = torch.Generator().manual_seed(2)
    b = 2
    kwargs = dict(context=torch.randn(b, 5, 24, generator=g), transformer_options={},
                  ref_latents=[torch.randn(b, 4, 1, 4, 6, generator=g)])
    img_tokens = 4 * 5
    if case == "controlnet":
        kwargs["control"] = {"input": [None, torch.randn(b, img_tokens, 32, generator=g), None,
                                       torch.randn(b, img_tokens - 3, 32, generator=g)]}
    if case == "double_block-patches":  # ComfyUI hands these the model input x too
        def p(args):
            return {"img": args["img"] + 0.01 * args["x"].flatten().mean(), "txt": args["txt"] * 0.99}
        kwargs["transformer_options"]["patches"] = {"double_block": [p]}
    if case == "blockpatch":
        add_replace_patch(kwargs["transformer_options"], ("double_block", 1))
        add_replace_patch(kwargs["transformer_options"], ("double_block", 3))
    if case == "attention_mask":
        kwargs["attention_mask"] = torch.ones(b, 5)
        del kwargs["ref_latents"]
    check_every_split(model, (torch.randn(b, 4, 1, 7, 9, generator=g), torch.tensor([0.7, 0.2])), kwargs)


# ------------------------------------------- files the stock UNETLoader reads (full widths)
@pytest.fixture(scope="module")
def model_files():
    from make_models import cached_model_files
    return cached_model_files()  # written once (~10 s), then reused across sessions


@pytest.mark.parametrize("key,config", [("flux1_dev", "Flux"), ("qwen_image", "QwenImage")])
def test_loaded_full_width_files(model_files, key, config):
    """Flux.1 and Qwen-Image at the widths ComfyUI's detection fixes (3072), loaded from
    files by the stock loader: staged at every split equals the unsplit model."""
    import comfy.sd
    patcher = comfy.sd.load_diffusion_model(str(model_files[key]))
    assert type(patcher.model.model_config).__name__ == config
    dm = patcher.model.diffusion_model
    g = torch.Generator().manual_seed(3)
    dt = next(dm.parameters()).dtype
    if key == "flux1_dev":
        args = (torch.randn(1, 16, 8, 8, generator=g).to(dt), torch.tensor([0.5]))
        kwargs = dict(context=torch.randn(1, 4, 4096, generator=g).to(dt), y=torch.randn(1, 768, generator=g).to(dt),
                      guidance=torch.tensor([3.5]), transformer_options={})
    else:
        args = (torch.randn(1, 16, 1, 8, 8, generator=g).to(dt), torch.tensor([0.5]))
        kwargs = dict(context=torch.randn(1, 4, 3584, generator=g).to(dt), transformer_options={},
                      ref_latents=[torch.randn(1, 16, 1, 6, 4, generator=g).to(dt)])
    check_every_split(dm, args, kwargs)


# ------------------------------------------------------------- MiniMax-H3 (ComfyUI >= 0.33)
def _minimax_or_skip():
    if "minimax_h3" not in zoo.BY_NAME:
        pytest.skip("this ComfyUI has no MiniMax-H3 (comfy.ldm.minimax, ComfyUI >= 0.33)")
    return zoo.BY_NAME["minimax_h3"]


def test_minimax_h3_keyframes_mask_noise_aug_through_the_pass_encoding():
    """H3's fl2va inputs as the sampler sends them: keyframe video+audio cond rows (their own
    segments and RoPE times), condition noise augmentation (a CPU generator seeded from the
    payload: alike on every rank), a denoise mask (per-row timesteps), mixed text tags.  The
    conditioning goes through pack/unpack_conditioning and the call through encode/decode_pass
    as between ranks (``minimax_payload`` without its PackedLayout, which every rank rebuilds):
    staged at every split equals the unsplit ``_forward`` on the original arguments."""
    import comfy.nested_tensor
    from pp_runtime.comfy import carry
    from pp_runtime.comfy.runner import decode_pass, encode_pass, micro_batches, pass_inputs
    from pp_runtime.engine.plan import plan_pass
    from pp_runtime.comfy.token_patches import describe_support
    case = _minimax_or_skip()
    model = zoo.model(case)
    dm = model.model.diffusion_model
    assert "MiniMaxH3" in describe_support(family_for(dm), dm)  # patch pipelining refused by name
    g = torch.Generator().manual_seed(5)
    pos, neg = zoo.conditioning(case)
    kf = [{"resolved_frame_index": 0, "latent": torch.randn(1, 24, 1, 4, 4, generator=g),
           "audio_latent": torch.randn(1, 32, 2, 3, generator=g)}]
    for c in (pos, neg):
        c[0][1].update({"minimax_keyframes": kf, "minimax_visual_cond_noise_aug": 0.9})
    meta, tensors = carry.pack_conditioning("positive", pos)
    back = carry.unpack_conditioning("positive", carry.json_roundtrip(meta), tensors)
    assert back[0][1]["minimax_keyframes"][0]["resolved_frame_index"] == 0
    assert torch.equal(back[0][1]["minimax_keyframes"][0]["audio_latent"], kf[0]["audio_latent"])
    lat = zoo.latent(case)
    vm = torch.ones(1, 1, 2, 4, 4)
    vm[..., :2, :] = 0.3
    mask = comfy.nested_tensor.NestedTensor([vm, torch.ones(1, 1, 2, 8)])
    calls, forward = [], dm._forward

    def record(*args, **kwargs):
        a, k = by_name(forward, args, kwargs)
        calls.append(clone((a, {**k, "transformer_options": {}})))
        return forward(*args, **kwargs)
    dm._forward = record
    try:
        comfy.sample.sample(model, comfy.sample.prepare_noise(lat, 1), 2, 3.0, "euler", "simple", back, neg, lat,
                            noise_mask=mask, seed=7, disable_pbar=True)
    finally:
        del dm._forward
    assert len(calls) == 4  # 2 steps x (cond, uncond): never batched
    (x, t), kwargs = calls[2]  # step 1's cond (sigma < 1)
    payload = kwargs["minimax_payload"]
    assert [s[2] for s in payload["layout"].segments][-2:] == ["audio", "video"]
    assert "cond" in [s[2] for s in payload["layout"].segments] and kwargs["denoise_mask"] is not None
    named = {k: v for k, v in kwargs.items() if k not in ("context", "transformer_options") and v is not None}
    plan = plan_pass([0], stages=2)
    msg = encode_pass(plan, pass_inputs(x, t, kwargs["context"], named), {}, {})
    plan2, inputs, per_row, whole = decode_pass(msg)
    assert plan2 == plan
    ((kw, _),) = micro_batches(plan2, 0, inputs, per_row, whole).values()
    assert "layout" not in kw["minimax_payload"] and kw["minimax_payload"]["seed"] == payload["seed"]
    with torch.no_grad():
        ref = dm._forward(*clone((x, t)), **clone(kwargs))
        assert ref[1].abs().max() > 1e-3
        args2 = (kw.pop("x"), kw.pop("timestep"))
        kw["transformer_options"] = {}
        for stages in splits(len(block_modules(dm, family_for(dm)))):
            diff = max_diff(run_staged(dm, stages, args2, kw), ref)
            assert diff <= TOL, f"split {stages}: max abs diff {diff}"
