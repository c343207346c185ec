"""Model files in the key layouts of released checkpoints (tier 2).

The other tests write their files from the running ComfyUI's own classes, so they never see
what users download: BFL-format Flux.1 / Flux.2 / Chroma files keep their QK norms as
``*_norm.scale`` (ComfyUI >= 0.14 builds ``RMSNorm``s and renames them when it loads a
file), HunyuanVideo files keep Tencent's names, Wan and Qwen-Image files come with the
checkpoint prefix, and a diffusers-format file has fused projections split apart.  For each,
the stages PP Load Diffusion Model places (a 2-stage split, both stages) must hold exactly
the tensors the stock loader loads from the same file.

Each layout is checked first: ComfyUI's own key handling turns it back into the class's keys
(``process_unet_state_dict`` / ``convert_diffusers_mmdit``), and it differs from them (else the
case would test nothing; on ComfyUI < 0.14 the Flux classes write BFL's names themselves).
"""
from __future__ import annotations

import pytest
import torch

from comfy_env import require_comfy

require_comfy()

import family_zoo as zoo  # noqa: E402
from pp_runtime.comfy import loading as cb  # noqa: E402
from pp_runtime.comfy.families import family_for  # noqa: E402
from pp_runtime.comfy.staging import block_modules, stage_prefixes  # noqa: E402
from pp_runtime.engine.split import Split  # noqa: E402


def bfl(sd: dict) -> dict:
    """Black Forest Labs' layout (Flux.1, Flux.2, Chroma): QK norm scales named ``.scale``."""
    return {(k[: -len(".weight")] + ".scale" if k.endswith("_norm.weight") else k): v for k, v in sd.items()}


# ComfyUI's HunyuanVideo names -> Tencent's (the inverse of supported_models.HunyuanVideo's
# process_unet_state_dict); the order matters: the MLP renames first.
_TENCENT = (("mlp.0.", "mlp.fc1."), ("mlp.2.", "mlp.fc2."),
            ("txt_in.t_embedder.in_layer.", "txt_in.t_embedder.mlp.0."),
            ("txt_in.t_embedder.out_layer.", "txt_in.t_embedder.mlp.2."),
            ("txt_in.c_embedder.in_layer.", "txt_in.c_embedder.linear_1."),
            ("txt_in.c_embedder.out_layer.", "txt_in.c_embedder.linear_2."),
            ("_in.in_layer.", "_in.mlp.0."), ("_in.out_layer.", "_in.mlp.2."),
            ("_mod.lin.", "_mod.linear."), (".modulation.lin.", ".modulation.linear."),
            ("_attn.qkv.", "_attn_qkv."), ("_attn.proj.", "_attn_proj."),
            ("_attn.norm.query_norm.weight", "_attn_q_norm.weight"), ("_attn.norm.key_norm.weight", "_attn_k_norm.weight"),
            ("_attn.norm.query_norm.scale", "_attn_q_norm.weight"), ("_attn.norm.key_norm.scale", "_attn_k_norm.weight"),
            (".norm.query_norm.weight", ".q_norm.weight"), (".norm.key_norm.weight", ".k_norm.weight"),
            (".norm.query_norm.scale", ".q_norm.weight"), (".norm.key_norm.scale", ".k_norm.weight"))


def tencent(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        for a, b in _TENCENT:
            k = k.replace(a, b)
        out[k] = v
    return out


def checkpoint_prefix(sd: dict) -> dict:
    """A checkpoint-style file: every key under ``model.diffusion_model.``."""
    return {f"model.diffusion_model.{k}": v for k, v in sd.items()}


def diffusers_sd3(sd: dict) -> dict:
    """The diffusers layout of an SD3 MMDiT, built from ComfyUI's own key map (its fused qkv
    cut in three, its final modulation's halves swapped back)."""
    import comfy.utils
    depth = sd["x_embedder.proj.weight"].shape[0] // 64
    blocks = len({k.split(".")[1] for k in sd if k.startswith("joint_blocks.")})
    out = {}
    for dk, t in comfy.utils.mmdit_to_diffusers({"depth": depth, "num_blocks": blocks}, output_prefix="").items():
        key, offset, fun = (t, None, None) if isinstance(t, str) else (t[0], t[1], t[2] if len(t) > 2 else None)
        if key not in sd:
            continue
        w = sd[key] if offset is None else sd[key].narrow(*offset)
        out[dk] = (fun(w) if fun is not None else w).contiguous()
    return out


# case -> (layout, what it stands for)
LAYOUTS = {
    "flux1_dev": (bfl, "a BFL-format Flux.1 file"),
    "flux2": (bfl, "a BFL-format Flux.2 file"),
    "chroma": (bfl, "a Chroma file"),
    "hunyuan_video": (tencent, "Tencent's HunyuanVideo file"),
    "wan21_t2v": (checkpoint_prefix, "a Wan file with the checkpoint prefix"),
    "qwen_image": (checkpoint_prefix, "a Qwen-Image file with the checkpoint prefix"),
    "sd3": (diffusers_sd3, "a diffusers-format SD3 transformer"),
}


def _stock_state_dict(case, path, handled):
    """What the stock loader loads from the file: ComfyUI's diffusion-model loader where it
    detects the tiny model; else ComfyUI's own loading of the file's state dict after its
    key handling into the case's model (``load_model_weights``: process_unet_state_dict,
    then load_state_dict)."""
    import comfy.sd
    if case.detectable:
        return comfy.sd.load_diffusion_model(str(path)).model.diffusion_model.state_dict()
    cfg = zoo.config(case)
    cfg.set_inference_dtype(torch.float32, None)
    base = cfg.get_model({}, "", device="cpu")
    base.load_model_weights(dict(handled), "")
    return base.diffusion_model.state_dict()


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_stages_hold_what_the_stock_loader_loads(tmp_path, name):
    from safetensors.torch import save_file
    case = zoo.BY_NAME[name]
    layout, what = LAYOUTS[name]
    sd = zoo.state_dict(case, seed=3)
    released = layout(sd)
    if name not in ("flux1_dev", "flux2", "chroma"):  # (ComfyUI < 0.14's classes write BFL's names themselves)
        assert set(released) != set(sd), f"{what}: the layout equals the class's own keys, nothing is tested"
    # The layout is one ComfyUI's key handling turns into the class's keys.
    config, handled = cb.stock_key_handling({k: v for k, v in released.items()}, {})
    cfg = config or zoo.config(case)
    assert set(cfg.process_unet_state_dict(dict(handled))) == set(sd), f"{what}: not a layout ComfyUI loads"

    path = tmp_path / f"released_{name}.safetensors"
    save_file({k: v.contiguous() for k, v in released.items()}, str(path))
    stock = _stock_state_dict(case, path, handled)

    spec = None if case.detectable else cb.pack_config(zoo.config(case))
    base, _ = cb.meta_base_model(str(path), torch.float32, None, spec, real_buffers=True)
    fam = family_for(base.diffusion_model)
    n = len(block_modules(base.diffusion_model, fam))
    ranges = Split((n // 2, n - n // 2)).ranges
    loaded = set()
    for i, (a, b) in enumerate(ranges):
        base, file_layout = cb.meta_base_model(str(path), torch.float32, None, spec, real_buffers=True)
        dm = base.diffusion_model
        prefixes = stage_prefixes(dm, fam, a, b, i == 0, i == len(ranges) - 1)
        cb.load_stage_weights(dm, str(path), file_layout, prefixes, "cpu")
        for k, v in dm.state_dict().items():
            if k.startswith(tuple(prefixes)) and k in stock:
                assert not v.is_meta, f"{what}: stage {i} did not load {k}"
                assert torch.equal(v, stock[k].to(v.dtype)), f"{what}: stage {i}'s {k} differs from the stock loader's"
                loaded.add(k)
    missing = sorted(set(stock) - loaded)
    assert not missing, f"{what}: no stage loaded {missing[:5]}"
    if name == "sd3":  # the fused projections are built from three file tensors: converted as stock does
        assert file_layout.derived, "the diffusers file's fused qkv should be derived"
