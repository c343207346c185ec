"""Tier 2: family adapters over ComfyUI's own model classes.

For every split, ``head(run_blocks(...run_blocks(embed(**inputs))...))`` must equal the
unsplit ``model(**inputs)``.  Small models built with ComfyUI's classes, seeded random
weights (every parameter, including the zero-initialised ones), fp32, CPU.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from comfy_env import require_comfy

require_comfy()

import comfy.ops  # noqa: E402
from comfy.ldm.flux.model import Flux  # noqa: E402
from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel  # noqa: E402
from comfy.ldm.wan.model import WanModel  # noqa: E402

from pp_runtime.models.base import module_bytes  # noqa: E402
from pp_runtime.models.flux import FluxStaged  # noqa: E402
from pp_runtime.models.qwen_image import QwenImageStaged  # noqa: E402
from pp_runtime.models.wan import WanStaged  # noqa: E402
from make_models import randomize  # noqa: E402

# Same modules on the same tensors in the same order: expected bit-exact.  The bound
# leaves room only for a kernel choosing a different reduction order for a tensor
# that is laid out differently (e.g. Flux.2 modulations re-stacked for the boundary);
# outputs are O(1), so 1e-6 is ~1e-7 relative in fp32.
TOL = 1e-6

OPS = comfy.ops.disable_weight_init


def splits(n):
    """All 2-stage and 3-stage splits of n blocks, as lists of (start, end)."""
    for k in range(1, n):
        yield [(0, k), (k, n)]
    for k1, k2 in itertools.combinations(range(1, n), 2):
        yield [(0, k1), (k1, k2), (k2, n)]


def clone(v):
    if isinstance(v, torch.Tensor):
        return v.clone()
    if isinstance(v, dict):
        return {k: clone(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(clone(x) for x in v)
    return v


def run_staged(staged, stages, inputs):
    state = staged.embed(**clone(inputs))
    for start, end in stages:
        assert all(isinstance(v, torch.Tensor) for v in state.values()), state.keys()
        state = staged.run_blocks(start, end, state)
    return staged.head(state)


def check_parity(model, staged, inputs):
    with torch.no_grad():
        ref = model(**clone(inputs))
        assert ref.abs().max() > 1e-3  # random weights: a non-trivial output
        for stages in splits(staged.num_blocks):
            out = run_staged(staged, stages, inputs)
            assert out.shape == ref.shape
            diff = (out - ref).abs().max().item()
            assert diff <= TOL, f"split {stages}: max abs diff {diff}"


def check_bytes(staged, model):
    assert len(staged.block_costs()) == len(staged.block_bytes()) == staged.num_blocks
    assert all(c > 0 for c in staged.block_costs())
    total = staged.embed_bytes() + sum(staged.block_bytes()) + staged.head_bytes()
    assert total == module_bytes(model), "every parameter belongs to exactly one of embed/blocks/head"


def add_replace_patch(opts, key):
    """A block-replacement patch (as ComfyUI's patches_replace['dit'] takes) that runs
    the original block and perturbs its image output, so skipping or repeating it shows."""
    def patch(args, extra):
        out = extra["original_block"](args)
        out["img"] = out["img"] * 1.01
        return out
    opts.setdefault("patches_replace", {}).setdefault("dit", {})[key] = patch
    return opts


# --------------------------------------------------------------------------- Wan
WAN_CASES = {
    "t2v": dict(),
    "t2v-blockpatch": dict(patch=True),
    "i2v-clip": dict(model_type="i2v", clip=True),
    "ref_conv": dict(in_dim_ref_conv=4, ref=True),
    "time_dim_concat": dict(tdc=True),
}


@pytest.mark.parametrize("case", list(WAN_CASES))
def test_wan_parity(case):
    cfg = WAN_CASES[case]
    torch.manual_seed(0)
    model = WanModel(model_type=cfg.get("model_type", "t2v"), patch_size=(1, 2, 2), in_dim=4, dim=64,
                     ffn_dim=128, freq_dim=32, text_dim=24, out_dim=4, num_heads=2, num_layers=4,
                     in_dim_ref_conv=cfg.get("in_dim_ref_conv"), operations=OPS, dtype=torch.float32)
    randomize(model, seed=1)
    model.eval()
    g = torch.Generator().manual_seed(2)
    b = 2
    # odd t/h/w: exercises pad_to_patch_size and the final crop
    inputs = dict(x=torch.randn(b, 4, 3, 5, 7, generator=g),
                  timestep=torch.tensor([0.7, 0.2]) * 1000,
                  context=torch.randn(b, 6, 24, generator=g),
                  transformer_options={})
    if cfg.get("clip"):
        inputs["clip_fea"] = torch.randn(b, 5, 1280, generator=g)
    if cfg.get("ref"):
        inputs["reference_latent"] = torch.randn(b, 4, 6, 8, generator=g)
    if cfg.get("tdc"):
        inputs["time_dim_concat"] = torch.randn(b, 4, 1, 5, 7, generator=g)
    if cfg.get("patch"):
        add_replace_patch(inputs["transformer_options"], ("double_block", 2))
    staged = WanStaged(model)
    assert staged.num_blocks == 4
    check_parity(model, staged, inputs)
    check_bytes(staged, model)


# -------------------------------------------------------------------------- Flux
FLUX1 = dict(in_channels=4, out_channels=4, vec_in_dim=8, context_in_dim=16, hidden_size=64,
             mlp_ratio=2.0, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[8, 12, 12],
             theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True, txt_ids_dims=[])
# Flux.2's switches (as comfy/model_detection.py sets them), small sizes
FLUX2 = dict(FLUX1, vec_in_dim=None, axes_dim=[8, 8, 8, 8], mlp_ratio=3.0, theta=2000, patch_size=1,
             qkv_bias=False, global_modulation=True, mlp_silu_act=True, ops_bias=False,
             default_ref_method="index", ref_index_scale=10.0, txt_ids_dims=[3])

FLUX_CASES = {
    "dev-guidance": (FLUX1, dict(guidance=True)),
    "schnell-no-guidance": (dict(FLUX1, guidance_embed=False), dict()),
    "dev-no-pooled-y": (FLUX1, dict(guidance=True, no_y=True)),
    "kontext-ref_latents": (FLUX1, dict(guidance=True, refs=True)),
    "controlnet": (FLUX1, dict(guidance=True, control=True)),
    "blockpatches": (FLUX1, dict(guidance=True, patch=True)),
    "attention_mask": (FLUX1, dict(guidance=True, mask=True)),
    "no-single-blocks": (dict(FLUX1, depth=3, depth_single_blocks=0), dict(guidance=True)),
    "flux2": (FLUX2, dict(guidance=True, refs=True)),
    # Ovis (detected as image_model "flux" with yak_mlp + txt_norm)
    "ovis-yak-txtnorm": (dict(FLUX1, yak_mlp=True, txt_norm=True, txt_ids_dims=[1, 2], vec_in_dim=None), dict()),
}


@pytest.mark.parametrize("case", list(FLUX_CASES))
def test_flux_parity(case):
    params, cfg = FLUX_CASES[case]
    torch.manual_seed(0)
    model = Flux(operations=OPS, dtype=torch.float32, **params)
    randomize(model, seed=1)
    model.eval()
    g = torch.Generator().manual_seed(2)
    b, c = 2, params["in_channels"]
    # odd h/w: exercises padding and the final crop
    inputs = dict(x=torch.randn(b, c, 7, 9, generator=g),
                  timestep=torch.tensor([0.7, 0.2]),
                  context=torch.randn(b, 5, 16, generator=g),
                  transformer_options={})
    if params["vec_in_dim"] and not cfg.get("no_y"):
        inputs["y"] = torch.randn(b, params["vec_in_dim"], generator=g)
    if cfg.get("guidance"):
        inputs["guidance"] = torch.tensor([3.5, 3.5])
    if cfg.get("refs"):
        inputs["ref_latents"] = [torch.randn(b, c, 4, 6, generator=g), torch.randn(b, c, 6, 4, generator=g)]
    img_tokens = ((7 + params["patch_size"] // 2) // params["patch_size"]) * ((9 + params["patch_size"] // 2) // params["patch_size"])
    if cfg.get("control"):
        inputs["control"] = {
            "input": [torch.randn(b, img_tokens, 64, generator=g), None],
            "output": [None, torch.randn(b, img_tokens - 3, 64, generator=g)],
        }
    if cfg.get("mask"):  # additive mask over txt+img tokens, as ComfyUI's Flux.extra_conds passes it
        n = 5 + img_tokens
        inputs["attention_mask"] = 0.5 * torch.randn(b, n, n, generator=g)
    if cfg.get("patch"):
        add_replace_patch(inputs["transformer_options"], ("double_block", 1))
        add_replace_patch(inputs["transformer_options"], ("single_block", 0))
    staged = FluxStaged(model)
    assert staged.num_blocks == params["depth"] + params["depth_single_blocks"]
    check_parity(model, staged, inputs)
    check_bytes(staged, model)


def test_flux_join_happens_once():
    """The txt/img concatenation is done by the stage owning the first single block."""
    model = Flux(operations=OPS, dtype=torch.float32, **FLUX1)
    randomize(model, seed=1)
    staged = FluxStaged(model)
    g = torch.Generator().manual_seed(2)
    inputs = dict(x=torch.randn(1, 4, 8, 8, generator=g), timestep=torch.tensor([0.5]),
                  context=torch.randn(1, 5, 16, generator=g), y=torch.zeros(1, 8), guidance=torch.tensor([3.5]))
    with torch.no_grad():
        s = staged.run_blocks(0, 2, staged.embed(**inputs))
        assert "txt" in s and s["img"].shape[1] == 16          # two streams after the double blocks
        s = staged.run_blocks(2, 3, s)
        assert "txt" not in s and s["img"].shape[1] == 5 + 16  # joined once
        assert int(s["txt_len"]) == 5
        s = staged.run_blocks(3, 4, s)
        assert s["img"].shape[1] == 5 + 16


def test_flux_block_costs_match_per_token_flops():
    """Flux.1 double and single blocks cost about the same per token although the
    double block has far more parameters (its modulation acts on one vector)."""
    model = Flux(operations=OPS, dtype=torch.float32, **dict(FLUX1, mlp_ratio=4.0))
    costs = FluxStaged(model).block_costs()
    assert costs[0] == pytest.approx(costs[-1], rel=0.05)
    assert FluxStaged(model).block_bytes()[0] > 2 * FluxStaged(model).block_bytes()[-1]


def test_unsupported_wrappers_raise():
    import comfy.patcher_extension as pe
    model = WanModel(dim=64, ffn_dim=64, freq_dim=32, text_dim=8, in_dim=4, out_dim=4, num_heads=2,
                     num_layers=1, operations=OPS)
    opts = {}
    pe.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "easycache", lambda *a, **k: None, opts)
    with pytest.raises(NotImplementedError, match="DIFFUSION_MODEL wrappers"):
        WanStaged(model).embed(x=torch.zeros(1, 4, 1, 2, 2), timestep=torch.zeros(1),
                               context=torch.zeros(1, 1, 8), transformer_options=opts)


# -------------------------------------------------------------------- Qwen-Image
# patch size 2 (the class hard-codes it), head dim = sum(axes_dims_rope)
QWEN = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=4, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=(4, 6, 6))

QWEN_CASES = {
    "t2i": (QWEN, dict()),
    # Edit: reference latents of other sizes appended as image tokens, dropped from the output
    "edit-ref_latents": (QWEN, dict(refs=2)),
    "edit-ref_latents_method-offset": (QWEN, dict(refs=2, method="offset")),
    "edit-ref_latents_method-negative_index": (QWEN, dict(refs=1, method="negative_index")),
    # 2511: reference tokens modulated with a zero timestep (temb has 2B rows)
    "edit-2511-index_timestep_zero": (dict(QWEN, default_ref_method="index_timestep_zero"), dict(refs=2)),
    # Layered: additional_t_cond, negative_index refs
    "layered-additional_t_cond": (dict(QWEN, use_additional_t_cond=True, default_ref_method="negative_index"),
                                  dict(refs=1, t_cond=True)),
    "blockpatch": (QWEN, dict(refs=1, patch=True)),
    "double_block-patches": (QWEN, dict(refs=1, block_patch=True)),
    "controlnet": (QWEN, dict(refs=1, control=True)),
    "attention_mask": (QWEN, dict(mask=True)),
}


@pytest.mark.parametrize("case", list(QWEN_CASES))
def test_qwen_image_parity(case):
    params, cfg = QWEN_CASES[case]
    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(operations=OPS, dtype=torch.float32, **params)
    randomize(model, seed=1)
    model.eval()
    g = torch.Generator().manual_seed(2)
    b, c = 2, 4
    # odd h/w: exercises padding and the final crop
    inputs = dict(x=torch.randn(b, c, 1, 7, 9, generator=g),
                  timestep=torch.tensor([0.7, 0.2]),
                  context=torch.randn(b, 5, 24, generator=g),
                  transformer_options={})
    refs = [torch.randn(b, c, 1, 4, 6, generator=g), torch.randn(b, c, 1, 6, 5, generator=g)][:cfg.get("refs", 0)]
    if refs:
        inputs["ref_latents"] = refs
    if cfg.get("method"):
        inputs["ref_latents_method"] = cfg["method"]
    if cfg.get("t_cond"):
        inputs["additional_t_cond"] = torch.tensor([1, 0])
    img_tokens = 4 * 5
    if cfg.get("control"):
        inputs["control"] = {"input": [None, torch.randn(b, img_tokens, 32, generator=g), None,
                                       torch.randn(b, img_tokens - 3, 32, generator=g)]}
    if cfg.get("mask"):
        inputs["attention_mask"] = torch.ones(b, 5)
    if cfg.get("patch"):
        add_replace_patch(inputs["transformer_options"], ("double_block", 1))
        add_replace_patch(inputs["transformer_options"], ("double_block", 3))
    if cfg.get("block_patch"):  # patches["double_block"]: ComfyUI hands them the model input x too
        def p(args):
            return {"img": args["img"] + 0.01 * args["x"].flatten().mean(), "txt": args["txt"] * 0.99}
        inputs["transformer_options"]["patches"] = {"double_block": [p]}
    staged = QwenImageStaged(model)
    assert staged.num_blocks == 4 and staged.unplaced() == []
    check_parity(model, staged, inputs)
    check_bytes(staged, model)
    with torch.no_grad():  # the reference tokens cross the boundary; the head drops exactly them
        state = staged.embed(**clone(inputs))
        ref_tokens = sum((r.shape[-2] // 2) * ((r.shape[-1] + 1) // 2) for r in refs)
        assert int(state["img_tokens"]) == img_tokens
        assert state["img"].shape[1] == img_tokens + ref_tokens
        assert ("timestep_zero_index" in state) == (params.get("default_ref_method") == "index_timestep_zero")


def test_qwen_image_2511_marker_is_placed():
    """The 2511 files' ``__index_timestep_zero__`` buffer goes with the first stage."""
    model = QwenImageTransformer2DModel(operations=OPS, dtype=torch.float32,
                                        **dict(QWEN, default_ref_method="index_timestep_zero"))
    staged = QwenImageStaged(model)
    assert staged.unplaced() == []
    assert "__index_timestep_zero__" in staged.stage_prefixes(0, 2, True, False)
    assert "__index_timestep_zero__" not in staged.stage_prefixes(2, 4, False, True)


# ------------------------------------------- files the stock UNETLoader reads
@pytest.fixture(scope="module")
def model_files():
    from make_models import cached_model_files
    files = cached_model_files()  # written once (~10 s), then reused across sessions
    return {"wan": files["wan21_t2v"], "flux": files["flux1_dev"], "qwen_image": files["qwen_image"]}


def test_loaded_wan21_t2v(model_files):
    import comfy.model_base
    import comfy.sd
    import comfy.supported_models
    patcher = comfy.sd.load_diffusion_model(str(model_files["wan"]))
    assert isinstance(patcher.model, comfy.model_base.WAN21)
    assert type(patcher.model.model_config) is comfy.supported_models.WAN21_T2V
    dm = patcher.model.diffusion_model
    assert type(dm) is WanModel and dm.model_type == "t2v" and len(dm.blocks) == 2
    g = torch.Generator().manual_seed(3)
    inputs = dict(x=torch.randn(1, 16, 2, 6, 6, generator=g).to(dm.dtype), timestep=torch.tensor([500.0]),
                  context=torch.randn(1, 5, 4096, generator=g).to(dm.dtype), transformer_options={})
    check_parity(dm, WanStaged(dm), inputs)


def test_loaded_flux1_dev(model_files):
    import comfy.model_base
    import comfy.sd
    import comfy.supported_models
    patcher = comfy.sd.load_diffusion_model(str(model_files["flux"]))
    assert isinstance(patcher.model, comfy.model_base.Flux)
    assert type(patcher.model.model_config) is comfy.supported_models.Flux  # dev: guidance embed
    dm = patcher.model.diffusion_model
    assert type(dm) is Flux and dm.params.guidance_embed
    assert (len(dm.double_blocks), len(dm.single_blocks), dm.hidden_size) == (1, 1, 3072)
    g = torch.Generator().manual_seed(3)
    dt = next(dm.parameters()).dtype
    inputs = dict(x=torch.randn(1, 16, 8, 8, generator=g).to(dt), timestep=torch.tensor([0.5]),
                  context=torch.randn(1, 4, 4096, generator=g).to(dt), y=torch.randn(1, 768, generator=g).to(dt),
                  guidance=torch.tensor([3.5]), transformer_options={})
    check_parity(dm, FluxStaged(dm), inputs)


def test_loaded_qwen_image(model_files):
    import comfy.model_base
    import comfy.sd
    import comfy.supported_models
    patcher = comfy.sd.load_diffusion_model(str(model_files["qwen_image"]))
    assert isinstance(patcher.model, comfy.model_base.QwenImage)
    assert type(patcher.model.model_config) is comfy.supported_models.QwenImage
    dm = patcher.model.diffusion_model
    assert type(dm) is QwenImageTransformer2DModel
    assert (len(dm.transformer_blocks), dm.inner_dim, dm.default_ref_method) == (2, 3072, "index")
    staged = QwenImageStaged(dm)
    assert staged.unplaced() == []
    g = torch.Generator().manual_seed(3)
    dt = next(dm.parameters()).dtype
    inputs = dict(x=torch.randn(1, 16, 1, 8, 8, generator=g).to(dt), timestep=torch.tensor([0.5]),
                  context=torch.randn(1, 4, 3584, generator=g).to(dt),
                  ref_latents=[torch.randn(1, 16, 1, 6, 4, generator=g).to(dt)], transformer_options={})
    check_parity(dm, staged, inputs)
