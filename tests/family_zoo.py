"""Tiny models of every family ComfyUI ships, built from ComfyUI's own classes, for the tests.

A ``Case`` names ComfyUI's model config class (``comfy.supported_models``), a small
``unet_config`` for it, the latent it samples and the conditioning its nodes would make
(random tensors of the right shapes instead of a text encoder's output).  ``model(case)``
builds the MODEL the way ComfyUI's loader does (``config.get_model`` → ``BaseModel`` with
its diffusion model, wrapped in a ``ModelPatcher``) with seeded random weights;
``write_file(case, path)`` writes its weights as a ``diffusion_models`` file.

``case.detectable``: ComfyUI's model detection (``comfy/model_detection.py``) maps the
file back to the same config class and sizes, so the stock UNETLoader and PP Load
Diffusion Model load it by name.  Families whose detection fixes large sizes (Flux.1's
hidden size 3072, Mochi's 48 blocks, HiDream's 17B, ...) get small sizes here that only
the test node ``PPTestModel`` (a MODEL built in the server from this table) and the
in-process tests can use; their full-size detection is covered by the bigger files of
``make_models.py`` where one fits a CPU test (Flux.1, Qwen-Image).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass(frozen=True)
class Case:
    name: str
    config: str                      # comfy.supported_models class
    unet: dict                       # unet_config (what detection would produce)
    latent: tuple                    # latent shape, batch 1
    context: tuple                   # (tokens, width) of the text conditioning
    options: dict = field(default_factory=dict)   # conditioning options: name -> shape tuple or value
    detectable: bool = False
    cfg: float = 3.0                 # a guidance scale for the CFG tests
    note: str = ""
    requires: str = ""               # "module:Class" a newer ComfyUI has (``available``); "": every one
    newer: tuple = ()                # ("module:Class", {setting: value}): settings only a newer ComfyUI's
    #                                  class (or its params dataclass) takes, set where the running one does
    cfg_batched: bool = True         # False: the model takes batch 1 (ComfyUI calls it per cond/uncond)


def _flux(**kw):
    base = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=32, hidden_size=64,
                mlp_ratio=2.0, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[8, 12, 12], theta=10000,
                patch_size=2, qkv_bias=True, guidance_embed=True, txt_ids_dims=[])
    return {**base, **kw}


def _wan(**kw):
    # dim 128 = one head of 128 (ComfyUI derives num_heads = dim // 128): detectable
    base = dict(image_model="wan2.1", model_type="t2v", dim=128, out_dim=16, num_heads=1, ffn_dim=256,
                num_layers=4, patch_size=(1, 2, 2), freq_dim=256, window_size=(-1, -1), qk_norm=True,
                cross_attn_norm=True, eps=1e-6, in_dim=16)
    return {**base, **kw}


def _hunyuan(**kw):
    # hidden 128 = one head of 128 = sum(axes_dim): detectable
    base = dict(image_model="hunyuan_video", in_channels=16, out_channels=16, patch_size=[1, 2, 2], vec_in_dim=768,
                axes_dim=[16, 56, 56], meanflow=False, context_in_dim=32, hidden_size=128, mlp_ratio=4.0,
                num_heads=1, depth=2, depth_single_blocks=2, theta=256, qkv_bias=True, byt5=False,
                guidance_embed=True, use_cond_type_embedding=False, vision_in_dim=None, meanflow_sum=False)
    return {**base, **kw}


def _minimax(**kw):
    # Detection reads every size from the weights (latents_dim = video_out rows // 4: the 1x2x2
    # patch is fixed).  text_dim != hidden_size, or the token refiner is skipped altogether;
    # rope_inv_freq_len 4 -> rotary dim 24 <= head dim 32.  None: a key detection does not emit.
    base = dict(image_model="minimax_h3", hidden_size=64, num_layers=4, token_refiner_num_layers=1,
                num_attention_heads=2, attention_head_dim=32, ffn_hidden_size=96, latents_dim=24,
                audio_latents_dim=32, text_dim=48, timestep_input_dim=32, time_embed_hidden_size=64,
                time_embed_dim=40, rope_inv_freq_len=4)
    return {k: v for k, v in {**base, **kw}.items() if v is not None}


MINIMAX = "comfy.ldm.minimax.model:MiniMaxH3Model"

ALL_CASES = [
    # -- comfy.ldm.flux ---------------------------------------------------------------
    Case("flux1_dev", "Flux", _flux(), (1, 16, 8, 8), (6, 32), {"pooled_output": (1, 32), "guidance": 3.5}),
    Case("flux1_schnell", "FluxSchnell", _flux(guidance_embed=False), (1, 16, 8, 8), (6, 32),
         {"pooled_output": (1, 32)}, cfg=1.5),
    Case("flux1_kontext", "Flux", _flux(), (1, 16, 8, 8), (6, 32),
         {"pooled_output": (1, 32), "guidance": 2.5, "reference_latents": [(1, 16, 6, 10)]}),
    Case("flux2", "Flux2", dict(image_model="flux2", in_channels=128, out_channels=128, vec_in_dim=None,
                                 context_in_dim=32, hidden_size=64, mlp_ratio=3.0, num_heads=2, depth=2,
                                 depth_single_blocks=2, axes_dim=[8, 8, 8, 8], theta=2000, patch_size=1,
                                 qkv_bias=False, guidance_embed=True, global_modulation=True, mlp_silu_act=True,
                                 ops_bias=False, default_ref_method="index", ref_index_scale=10.0,
                                 txt_ids_dims=[3]),
         (1, 128, 4, 4), (6, 32), {"pooled_output": (1, 32), "guidance": 4.0, "reference_latents": [(1, 128, 3, 5)]}),
    Case("chroma", "Chroma", dict(image_model="chroma", in_channels=64, out_channels=64, context_in_dim=32,
                                   vec_in_dim=None, txt_ids_dims=[],
                                   hidden_size=64, mlp_ratio=2.0, num_heads=2, depth=2, depth_single_blocks=2,
                                   axes_dim=[8, 12, 12], theta=10000, patch_size=2, qkv_bias=True, in_dim=64,
                                   out_dim=64, hidden_dim=96, n_layers=2),
         (1, 16, 8, 8), (6, 32), {"pooled_output": (1, 32)}),
    Case("chroma_radiance", "ChromaRadiance",
         dict(image_model="chroma_radiance", in_channels=3, out_channels=3, context_in_dim=32, hidden_size=64,
              vec_in_dim=None, txt_ids_dims=[],
              mlp_ratio=2.0, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[8, 12, 12], theta=10000,
              patch_size=8, qkv_bias=True, in_dim=64, out_dim=64, hidden_dim=96, n_layers=2, nerf_hidden_size=16,
              nerf_mlp_ratio=2, nerf_depth=2, nerf_max_freqs=4, nerf_tile_size=512, nerf_final_head_type="linear",
              nerf_embedder_dtype=torch.float32, use_x0=False),
         (1, 3, 32, 32), (6, 32), {"pooled_output": (1, 32)},
         newer=(("comfy.ldm.chroma_radiance.model:ChromaRadianceParams", {"use_sequential_txt_ids": True}),)),
    # -- comfy.ldm.wan ----------------------------------------------------------------
    Case("wan21_t2v", "WAN21_T2V", _wan(text_dim=4096), (1, 16, 2, 8, 8), (6, 4096), detectable=True),
    Case("wan21_i2v", "WAN21_I2V", _wan(model_type="i2v", in_dim=36), (1, 16, 2, 8, 8), (6, 4096),
         {"concat_latent_image": (1, 16, 2, 8, 8), "concat_mask": "first_frame", "clip_vision_output": (1, 257, 1280)},
         detectable=True),
    Case("wan21_fun_control", "WAN21_FunControl2V", _wan(model_type="i2v", in_dim=48), (1, 16, 2, 8, 8), (6, 4096),
         {"concat_latent_image": (1, 32, 2, 8, 8)}, detectable=True),
    Case("wan21_vace", "WAN21_Vace", _wan(model_type="vace", num_layers=4, vace_layers=2, vace_in_dim=96),
         (1, 16, 2, 8, 8), (6, 4096), {"vace_frames": [(1, 32, 2, 8, 8)], "vace_mask": [(1, 64, 2, 8, 8)],
                                      "vace_strength": [1.0]}, detectable=True),
    Case("wan21_camera", "WAN21_Camera", _wan(model_type="camera", in_dim=32, in_dim_control_adapter=24),
         (1, 16, 2, 8, 8), (6, 4096), {"camera_conditions": (1, 24, 2, 64, 64), "clip_vision_output": (1, 257, 1280)},
         detectable=True),
    Case("wan22_s2v", "WAN22_S2V", _wan(model_type="s2v"), (1, 16, 2, 8, 8), (6, 4096),
         {"audio_embed": (1, 25, 1024, 8)}, detectable=True),
    Case("wan21_humo", "WAN21_HuMo", _wan(model_type="humo"), (1, 16, 2, 8, 8), (6, 4096),
         {"audio_embed": (1, 2, 8, 5, 1280)}, detectable=True),
    Case("wan22_animate", "WAN22_Animate", _wan(model_type="animate", in_dim=36, num_layers=6), (1, 16, 2, 8, 8),
         (6, 4096), {"clip_vision_output": (1, 257, 1280), "pose_video_latent": (1, 16, 1, 8, 8)}, detectable=True),
    Case("wan22_ti2v_5b", "WAN22_T2V", _wan(in_dim=48, out_dim=48), (1, 48, 2, 8, 8), (6, 4096), detectable=True),
    # -- comfy.ldm.hunyuan_video ------------------------------------------------------
    Case("hunyuan_video", "HunyuanVideo", _hunyuan(), (1, 16, 2, 8, 8), (6, 32),
         {"pooled_output": (1, 768), "guidance": 6.0}, detectable=True),
    Case("hunyuan_video_i2v", "HunyuanVideoI2V", _hunyuan(in_channels=33), (1, 16, 2, 8, 8), (6, 32),
         {"pooled_output": (1, 768), "guidance": 6.0, "concat_latent_image": (1, 16, 2, 8, 8)}, detectable=True),
    Case("hunyuan_video15", "HunyuanVideo15",
         _hunyuan(in_channels=65, out_channels=32, vec_in_dim=None, guidance_embed=False, use_cond_type_embedding=True,
                  vision_in_dim=1152, meanflow_sum=True, byt5=True),
         (1, 32, 2, 8, 8), (6, 32), {"pooled_output": (1, 32), "clip_vision_output": (1, 8, 1152),
                                     "conditioning_byt5small": (1, 5, 1472)},
         detectable=True),
    Case("hunyuan_image21", "HunyuanImage21",
         _hunyuan(in_channels=64, out_channels=64, patch_size=[1, 1], axes_dim=[64, 64], vec_in_dim=None,
                  guidance_embed=True, byt5=True),
         (1, 64, 4, 4), (6, 32), {"guidance": 3.5, "conditioning_byt5small": (1, 5, 1472)}, detectable=True),
    # -- comfy.ldm.lightricks ---------------------------------------------------------
    Case("ltxv", "LTXV", dict(image_model="ltxv", num_layers=4, attention_head_dim=4, cross_attention_dim=128,
                               caption_channels=32, in_channels=128),
         (1, 128, 2, 2, 2), (6, 32), {"frame_rate": 24.0, "attention_mask": "ones"}, detectable=True),
    # LTX-2: video and audio latents sampled together (a NestedTensor LATENT)
    Case("ltx2_av", "LTXAV", dict(image_model="ltxav", num_layers=4, attention_head_dim=4, cross_attention_dim=128,
                                   audio_attention_head_dim=2, audio_cross_attention_dim=64, caption_channels=32,
                                   in_channels=128, audio_in_channels=128,
                                   # v0.33's text connectors (3840 wide by default: 2.8 GB); v0.8 has none
                                   connector_attention_head_dim=16, connector_num_attention_heads=2,
                                   connector_num_layers=1),
         ((1, 128, 2, 2, 2), (1, 8, 4, 16)), (6, 64), {"frame_rate": 24.0, "attention_mask": "ones"},
         detectable=True),
    # -- comfy.ldm.modules.diffusionmodules.mmdit (SD3, SD3.5) ---------------------------
    Case("sd3", "SD3", dict(in_channels=16, patch_size=2, out_channels=16, depth=4, input_size=None,
                             adm_in_channels=32, num_patches=64, pos_embed_max_size=8, pos_embed_scaling_factor=None,
                             context_embedder_config={"target": "torch.nn.Linear",
                                                      "params": {"in_features": 32, "out_features": 256}},
                             x_block_self_attn_layers=[]),
         (1, 16, 8, 8), (6, 32), {"pooled_output": (1, 32)}, detectable=True),
    # -- comfy.ldm.aura ----------------------------------------------------------------
    Case("auraflow", "AuraFlow", dict(cond_seq_dim=32, max_seq=64, n_double_layers=2, n_layers=4, dim=64,
                                       n_heads=2, global_conddim=64, patch_size=2, in_channels=4, out_channels=4),
         (1, 4, 8, 8), (6, 32)),
    # -- comfy.ldm.genmo (Mochi) ----------------------------------------------------------
    Case("mochi", "GenmoMochi", dict(image_model="mochi_preview", depth=4, patch_size=2, num_heads=2,
                                      hidden_size_x=64, hidden_size_y=32, mlp_ratio_x=192.0, mlp_ratio_y=2.0,
                                      learn_sigma=False, in_channels=12, qk_norm=True, qkv_bias=False, out_bias=True,
                                      attn_drop=0.0, patch_embed_bias=True, posenc_preserve_area=True,
                                      timestep_mlp_bias=True, attend_to_padding=False, timestep_scale=1000.0,
                                      use_t5=True, t5_feat_dim=32, t5_token_length=8, rope_theta=10000.0),
         (1, 12, 2, 8, 8), (8, 32), {"attention_mask": "ones"}),
    # -- comfy.ldm.kandinsky5 --------------------------------------------------------------
    Case("kandinsky5", "Kandinsky5", dict(image_model="kandinsky5", model_dim=64, axes_dims=(8, 12, 12),
                                           time_dim=32, ff_dim=128, visual_embed_dim=132, num_text_blocks=1,
                                           num_visual_blocks=4, in_text_dim=32, in_text_dim2=24),
         (1, 16, 2, 8, 8), (6, 32), {"pooled_output": (1, 24)}),
    # -- comfy.ldm.lumina (Lumina 2, Z-Image) ------------------------------------------------
    Case("lumina2", "Lumina2", dict(image_model="lumina2", patch_size=2, in_channels=16, dim=64, cap_feat_dim=32,
                                     n_layers=4, qk_norm=True, n_heads=2, n_kv_heads=1, axes_dims=[8, 12, 12],
                                     axes_lens=[300, 512, 512], rope_theta=10000.0, ffn_dim_multiplier=4.0),
         (1, 16, 8, 8), (6, 32), {"attention_mask": "ones"}),
    Case("z_image", "ZImage", dict(image_model="lumina2", patch_size=2, in_channels=16, dim=256, cap_feat_dim=32,
                                    n_layers=4, qk_norm=True, n_heads=2, n_kv_heads=2, axes_dims=[32, 48, 48],
                                    axes_lens=[1536, 512, 512], rope_theta=256.0, ffn_dim_multiplier=8.0 / 3.0,
                                    z_image_modulation=True, time_scale=1000.0, pad_tokens_multiple=32),
         (1, 16, 8, 8), (6, 32), {"attention_mask": "ones"}),
    # -- comfy.ldm.hidream ----------------------------------------------------------------------
    Case("hidream", "HiDream", dict(image_model="hidream", attention_head_dim=32, axes_dims_rope=[16, 8, 8],
                                     caption_channels=[32, 32], max_resolution=[128, 128], in_channels=16,
                                     llama_layers=[0, 1, 2, 3, 3, 3], num_attention_heads=2, num_routed_experts=2,
                                     num_activated_experts=1, num_layers=2, num_single_layers=3, out_channels=16,
                                     patch_size=2, text_emb_dim=24),
         (1, 16, 8, 8), (6, 32), {"pooled_output": (1, 24), "conditioning_llama3": (1, 4, 6, 32)}),
    # -- comfy.ldm.qwen_image ------------------------------------------------------------------
    Case("qwen_image", "QwenImage", dict(image_model="qwen_image", in_channels=64, num_layers=4, patch_size=2,
                                          out_channels=16, attention_head_dim=32, num_attention_heads=2,
                                          joint_attention_dim=32, axes_dims_rope=(8, 12, 12)),
         (1, 16, 1, 8, 8), (6, 32), cfg=2.5),
    Case("qwen_image_edit", "QwenImage", dict(image_model="qwen_image", in_channels=64, num_layers=4, patch_size=2,
                                               out_channels=16, attention_head_dim=32, num_attention_heads=2,
                                               joint_attention_dim=32, axes_dims_rope=(8, 12, 12)),
         (1, 16, 1, 8, 8), (6, 32), {"reference_latents": [(1, 16, 1, 6, 10)]}, cfg=2.5),
    # -- comfy.ldm.cosmos ------------------------------------------------------------------------
    Case("cosmos_predict2", "CosmosT2IPredict2",
         dict(image_model="cosmos_predict2", max_img_h=240, max_img_w=240, max_frames=128, in_channels=16,
              out_channels=16, patch_spatial=2, patch_temporal=1, model_channels=64, concat_padding_mask=True,
              crossattn_emb_channels=32, pos_emb_cls="rope3d", pos_emb_learnable=True, pos_emb_interpolation="crop",
              min_fps=1, max_fps=30, use_adaln_lora=True, adaln_lora_dim=16, num_blocks=4, num_heads=2,
              extra_per_block_abs_pos_emb=False, rope_h_extrapolation_ratio=4.0, rope_w_extrapolation_ratio=4.0,
              rope_t_extrapolation_ratio=1.0, extra_h_extrapolation_ratio=1.0, extra_w_extrapolation_ratio=1.0,
              extra_t_extrapolation_ratio=1.0, rope_enable_fps_modulation=False),
         (1, 16, 1, 8, 8), (6, 32)),
    Case("cosmos1", "CosmosT2V",
         dict(image_model="cosmos", max_img_h=240, max_img_w=240, max_frames=128, in_channels=16, out_channels=16,
              patch_spatial=2, patch_temporal=1, model_channels=64, block_config="FA-CA-MLP",
              concat_padding_mask=True, pos_emb_cls="rope3d", pos_emb_learnable=False,
              pos_emb_interpolation="crop", block_x_format="THWBD", affline_emb_norm=True, use_adaln_lora=True,
              adaln_lora_dim=16, num_blocks=4, num_heads=2, crossattn_emb_channels=32,
              extra_per_block_abs_pos_emb=True, rope_h_extrapolation_ratio=1.0, rope_w_extrapolation_ratio=1.0,
              rope_t_extrapolation_ratio=2.0, extra_per_block_abs_pos_emb_type="learnable"),
         (1, 16, 2, 8, 8), (6, 32), {"frame_rate": 24.0}),
    # -- comfy.ldm.minimax (MiniMax-H3, ComfyUI >= 0.33) -------------------------------------------
    # video [1,24,T,H,W] + audio [1,32,2,Ta] latents sampled together (a NestedTensor LATENT, as
    # EmptyMiniMaxH3LatentAV makes it: 64x64 px, 5 frames -> T 2, Ta 8); batch 1: cond and uncond
    # are separate model calls.  The text encoder's per-token modality tags ride along.
    Case("minimax_h3", "MiniMaxH3", _minimax(), ((1, 24, 2, 4, 4), (1, 32, 2, 8)), (6, 48),
         {"minimax_token_tags": "tags"}, detectable=True, requires=MINIMAX, cfg_batched=False),
    # the pruned ("curve") checkpoints: an adaln_t_table buffer instead of the time embedder
    Case("minimax_h3_pruned", "MiniMaxH3",
         _minimax(adaln_curve_grid=17, time_embed_dim=8, timestep_input_dim=None, time_embed_hidden_size=None),
         ((1, 24, 2, 4, 4), (1, 32, 2, 8)), (6, 48), {"minimax_token_tags": "tags"}, detectable=True,
         requires=MINIMAX, cfg_batched=False),
]


def available(case: Case) -> bool:
    """The case's model class is in this ComfyUI (MiniMax-H3 needs >= 0.33; older trees skip
    its cases).  With ComfyUI imported (tier 2, the test server) the class is imported;
    before that (collecting a tier-3 module) its source file is looked for."""
    if not case.requires:
        return True
    import importlib
    import sys
    module, _, name = case.requires.partition(":")
    if "comfy.model_management" in sys.modules:
        try:
            return hasattr(importlib.import_module(module), name)
        except ImportError:
            return False
    from comfy_env import find_comfy_root
    root = find_comfy_root()
    return root is not None and (root / (module.replace(".", "/") + ".py")).is_file()


CASES = [c for c in ALL_CASES if available(c)]
BY_NAME = {c.name: c for c in CASES}


# -- building -------------------------------------------------------------------------------
def _seeded(name: str, shape, seed: int) -> torch.Tensor:
    """A value for weight ``name``: seeded from the name, so every copy of the model (a file,
    a stage on a worker, the stock MODEL) has the same weights.  Norm scales near 1, weight
    matrices ~ 1/sqrt(fan_in), the rest small but non-zero: activations stay O(1)."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + sum(map(ord, name)) * 7919 + len(name)) % (2 ** 63))
    r = torch.randn(shape, generator=g, dtype=torch.float32)
    last = name.rsplit(".", 1)[-1]
    if len(shape) == 1 and ("norm" in name or last in ("scale", "weight")):
        return 1 + 0.1 * r
    if last == "weight" and len(shape) >= 2:
        return r / math.sqrt(math.prod(shape[1:]))
    return 0.1 * r


def config(case: Case):
    import comfy.supported_models as sm
    unet = dict(case.unet)
    for path, settings in case.newer:
        unet.update({k: v for k, v in settings.items() if _takes(path, k)})
    return getattr(sm, case.config)(unet)


def _takes(path: str, name: str) -> bool:
    """Whether the running ComfyUI's ``module:Class`` (a dataclass or a class) takes ``name``."""
    import dataclasses
    import importlib
    import inspect
    module, _, cls = path.partition(":")
    try:
        obj = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError):
        return False
    if dataclasses.is_dataclass(obj):
        return name in {f.name for f in dataclasses.fields(obj)}
    return name in inspect.signature(obj).parameters


def state_dict(case: Case, seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """The case's weights, built on the meta device and filled from the seeded generator."""
    cfg = config(case)
    cfg.set_inference_dtype(torch.float32, None)
    base = cfg.get_model({}, "", device="meta")
    sd = base.diffusion_model.state_dict()
    return {k: (_seeded(k, v.shape, seed).to(dtype) if v.is_floating_point() else torch.zeros(v.shape, dtype=v.dtype))
            for k, v in sd.items()}


def num_blocks(case: Case) -> int:
    """Blocks of the case's model, as the staging table counts them."""
    from pp_runtime.comfy.families import family_for
    from pp_runtime.comfy.staging import block_modules
    cfg = config(case)
    cfg.set_inference_dtype(torch.float32, None)
    dm = cfg.get_model({}, "", device="meta").diffusion_model
    return len(block_modules(dm, family_for(dm)))


def model(case: Case, seed: int = 0):
    """A MODEL as ComfyUI's loader makes it, on the CPU, with the case's seeded weights."""
    import comfy.model_management as mm
    import comfy.model_patcher
    cfg = config(case)
    cfg.set_inference_dtype(torch.float32, None)
    base = cfg.get_model({}, "", device="cpu")
    missing, unexpected = base.diffusion_model.load_state_dict(state_dict(case, seed), strict=False, assign=True)
    assert not unexpected and not missing, (missing, unexpected)
    base.eval()
    return comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def write_file(case: Case, path, seed: int = 0, dtype=torch.float32) -> Path:
    """The case's weights as a diffusion_models file (the bare diffusion-model keys)."""
    import os
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    metadata = None
    if case.config in ("LTXV", "LTXAV"):  # LTX files carry their transformer config (model_detection reads it)
        import json
        metadata = {"config": json.dumps({"transformer": {k: v for k, v in case.unet.items() if k != "image_model"}})}
    save_file({k: v.contiguous() for k, v in state_dict(case, seed, dtype).items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def _value(spec, g, latent):
    if isinstance(spec, tuple):
        return torch.randn(spec, generator=g)
    if isinstance(spec, list) and spec and isinstance(spec[0], tuple):
        return [torch.randn(s, generator=g) for s in spec]
    return spec


def conditioning(case: Case, seed: int = 0):
    """(positive, negative) CONDITIONING as the family's nodes would make them: random
    tensors of the right shapes."""
    import comfy.clip_vision
    out = []
    for branch in range(2):
        g = torch.Generator().manual_seed(seed * 2 + branch)
        cond = torch.randn((1,) + tuple(case.context), generator=g)
        opts = {}
        for k, spec in case.options.items():
            if spec == "ones":
                opts[k] = torch.ones(1, case.context[0], dtype=torch.long)
            elif spec == "tags":  # MiniMax-H3's text encoder: 1 text token, 0 vision pad (a run of 2)
                tags = torch.ones(case.context[0], dtype=torch.long)
                tags[1:3] = 0
                opts[k] = tags
            elif spec == "first_frame":
                mask = torch.ones((1, 1) + tuple(case.latent[2:]))  # a video latent's frames
                mask[:, :, :1] = 0.0
                opts[k] = mask
            elif k == "clip_vision_output":
                clip = comfy.clip_vision.Output()
                clip["penultimate_hidden_states"] = torch.randn(spec, generator=g)
                clip["image_embeds"] = torch.randn(spec[0], spec[2], generator=g)
                clip["last_hidden_state"] = torch.randn(spec, generator=g)
                opts[k] = clip
            else:
                opts[k] = _value(spec, g, case.latent)
        out.append([[cond, opts]])
    return out[0], out[1]


def latent(case: Case, batch: int = 1):
    """An empty LATENT tensor for the case (a NestedTensor of several for LTX-2)."""
    if isinstance(case.latent[0], tuple):
        import comfy.nested_tensor
        return comfy.nested_tensor.NestedTensor([torch.zeros((batch,) + tuple(s[1:])) for s in case.latent])
    return torch.zeros((batch,) + tuple(case.latent[1:]))
