"""What the staging costs in weights, per family, at the models' real sizes.

Every rank holds its own blocks plus the family's non-block weights (embedders, text and
time projections, modulation tables; the head only on the last rank): this prints, for
the released sizes of each family, the model's bytes in bf16, the non-block bytes every
rank holds on top of its blocks, and the bytes per rank with two and four stages.  The
models are built by ComfyUI's own classes on the meta device (nothing is allocated), from
the configs ComfyUI's detection derives for the released checkpoints.

    python bench/family_table.py            # a Markdown table
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name, comfy.supported_models class, unet_config (as detection derives it for the release)
RELEASES = [
    ("MiniMax-H3 (33B)", "MiniMaxH3", dict(image_model="minimax_h3")),  # ComfyUI >= 0.30: the class's defaults
    ("Flux.1 dev (12B)", "Flux", dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768,
                                        context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=19,
                                        depth_single_blocks=38, axes_dim=[16, 56, 56], theta=10000, patch_size=2,
                                        qkv_bias=True, guidance_embed=True, txt_ids_dims=[])),
    ("Flux.2 dev (32B)", "Flux2", dict(image_model="flux2", in_channels=128, out_channels=128, vec_in_dim=None,
                                         context_in_dim=15360, hidden_size=6144, mlp_ratio=3.0, num_heads=48,
                                         depth=8, depth_single_blocks=48, axes_dim=[32, 32, 32, 32], theta=2000,
                                         patch_size=1, qkv_bias=False, guidance_embed=True, global_modulation=True,
                                         mlp_silu_act=True, ops_bias=False, default_ref_method="index",
                                         ref_index_scale=10.0, txt_ids_dims=[3])),
    ("Chroma (8.9B)", "Chroma", dict(image_model="chroma", in_channels=64, out_channels=64, vec_in_dim=None,
                                       context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=19,
                                       depth_single_blocks=38, axes_dim=[16, 56, 56], theta=10000, patch_size=2,
                                       qkv_bias=True, in_dim=64, out_dim=3072, hidden_dim=5120, n_layers=5,
                                       txt_ids_dims=[])),
    ("Wan 2.1 t2v 14B", "WAN21_T2V", dict(image_model="wan2.1", model_type="t2v", dim=5120, out_dim=16, num_heads=40,
                                          ffn_dim=13824, num_layers=40, patch_size=(1, 2, 2), freq_dim=256,
                                          window_size=(-1, -1), qk_norm=True, cross_attn_norm=True, eps=1e-6,
                                          in_dim=16)),
    ("Wan 2.1 i2v 14B", "WAN21_I2V", dict(image_model="wan2.1", model_type="i2v", dim=5120, out_dim=16, num_heads=40,
                                          ffn_dim=13824, num_layers=40, patch_size=(1, 2, 2), freq_dim=256,
                                          window_size=(-1, -1), qk_norm=True, cross_attn_norm=True, eps=1e-6,
                                          in_dim=36)),
    ("Wan 2.1 VACE 14B", "WAN21_Vace", dict(image_model="wan2.1", model_type="vace", dim=5120, out_dim=16,
                                            num_heads=40, ffn_dim=13824, num_layers=40, patch_size=(1, 2, 2),
                                            freq_dim=256, window_size=(-1, -1), qk_norm=True, cross_attn_norm=True,
                                            eps=1e-6, in_dim=16, vace_layers=8, vace_in_dim=96)),
    ("Wan 2.2 ti2v 5B", "WAN22_T2V", dict(image_model="wan2.1", model_type="t2v", dim=3072, out_dim=48, num_heads=24,
                                          ffn_dim=14336, num_layers=30, patch_size=(1, 2, 2), freq_dim=256,
                                          window_size=(-1, -1), qk_norm=True, cross_attn_norm=True, eps=1e-6,
                                          in_dim=48)),
    ("Qwen-Image (20B)", "QwenImage", dict(image_model="qwen_image", in_channels=64, num_layers=60)),
    ("HunyuanVideo 1.0 (13B)", "HunyuanVideo",
     dict(image_model="hunyuan_video", in_channels=16, out_channels=16, patch_size=[1, 2, 2], vec_in_dim=768,
          axes_dim=[16, 56, 56], meanflow=False, context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0, num_heads=24,
          depth=20, depth_single_blocks=40, theta=256, qkv_bias=True, byt5=False, guidance_embed=True,
          use_cond_type_embedding=False, vision_in_dim=None, meanflow_sum=False)),
    ("LTX-Video 13B", "LTXV", dict(image_model="ltxv", num_layers=48, attention_head_dim=128, cross_attention_dim=4096,
                                   caption_channels=4096, in_channels=128)),
    ("SD3.5 Large (8B)", "SD3", dict(in_channels=16, patch_size=2, out_channels=16, depth=38, input_size=None,
                                     adm_in_channels=2048, num_patches=36864, pos_embed_max_size=192,
                                     pos_embed_scaling_factor=None, qk_norm="rms", x_block_self_attn_layers=[],
                                     context_embedder_config={"target": "torch.nn.Linear",
                                                              "params": {"in_features": 4096, "out_features": 2432}})),
    ("Z-Image (6B)", "ZImage", dict(image_model="lumina2", patch_size=2, in_channels=16, dim=3840, cap_feat_dim=2560,
                                    n_layers=30, qk_norm=True, n_heads=30, n_kv_heads=30, axes_dims=[32, 48, 48],
                                    axes_lens=[1536, 512, 512], rope_theta=256.0, ffn_dim_multiplier=8.0 / 3.0,
                                    z_image_modulation=True, time_scale=1000.0, pad_tokens_multiple=32)),
    ("Lumina 2 (2.6B)", "Lumina2", dict(image_model="lumina2", patch_size=2, in_channels=16, dim=2304,
                                        cap_feat_dim=2304, n_layers=26, qk_norm=True, n_heads=24, n_kv_heads=8,
                                        axes_dims=[32, 32, 32], axes_lens=[300, 512, 512], rope_theta=10000.0,
                                        ffn_dim_multiplier=4.0)),
    ("HiDream I1 (17B)", "HiDream", dict(image_model="hidream", attention_head_dim=128, axes_dims_rope=[64, 32, 32],
                                          caption_channels=[4096, 4096], max_resolution=[128, 128], in_channels=16,
                                          llama_layers=list(range(32)) + [31] * 16, num_attention_heads=20,
                                          num_routed_experts=4, num_activated_experts=2, num_layers=16,
                                          num_single_layers=32, out_channels=16, patch_size=2, text_emb_dim=2048)),
    ("Mochi (10B)", "GenmoMochi", dict(image_model="mochi_preview", depth=48, patch_size=2, num_heads=24,
                                       hidden_size_x=3072, hidden_size_y=1536, mlp_ratio_x=4.0, mlp_ratio_y=4.0,
                                       learn_sigma=False, in_channels=12, qk_norm=True, qkv_bias=False, out_bias=True,
                                       attn_drop=0.0, patch_embed_bias=True, posenc_preserve_area=True,
                                       timestep_mlp_bias=True, attend_to_padding=False, timestep_scale=1000.0,
                                       use_t5=True, t5_feat_dim=4096, t5_token_length=256, rope_theta=10000.0)),
    ("AuraFlow (6.8B)", "AuraFlow", dict(cond_seq_dim=2048, max_seq=9216, n_double_layers=4, n_layers=36)),
    ("Kandinsky 5 lite video (2B)", "Kandinsky5", dict(image_model="kandinsky5", model_dim=1792,
                                                       axes_dims=(16, 24, 24), time_dim=512, ff_dim=7168,
                                                       visual_embed_dim=132, num_text_blocks=2,
                                                       num_visual_blocks=32)),
    ("Cosmos Predict2 2B", "CosmosT2IPredict2",
     dict(image_model="cosmos_predict2", max_img_h=240, max_img_w=240, max_frames=128, in_channels=16,
          out_channels=16, patch_spatial=2, patch_temporal=1, model_channels=2048, concat_padding_mask=True,
          crossattn_emb_channels=1024, pos_emb_cls="rope3d", pos_emb_learnable=True, pos_emb_interpolation="crop",
          min_fps=1, max_fps=30, use_adaln_lora=True, adaln_lora_dim=256, num_blocks=28, num_heads=16,
          extra_per_block_abs_pos_emb=False, rope_h_extrapolation_ratio=4.0, rope_w_extrapolation_ratio=4.0,
          rope_t_extrapolation_ratio=1.0, extra_h_extrapolation_ratio=1.0, extra_w_extrapolation_ratio=1.0,
          extra_t_extrapolation_ratio=1.0, rope_enable_fps_modulation=False)),
]


def main():
    root = os.environ.get("COMFYUI_ROOT") or str(ROOT.parents[1])
    sys.path.insert(0, root)
    from comfy.cli_args import args
    args.cpu = True
    import torch
    import comfy.supported_models as sm

    from pp_runtime.comfy.families import family_for
    from pp_runtime.comfy.staging import profile
    from pp_runtime.engine.split import split_blocks

    print("| model | family | blocks | model (bf16) | non-block, every rank | head, last rank | per rank, PP2 | PP4 |")
    print("|---|---|---|---|---|---|---|---|")
    gb = 2 / 1e9  # bf16 bytes per parameter, in GB (the meta model is float32: 4 bytes each)
    for name, cls, unet in RELEASES:
        if not hasattr(sm, cls):
            print(f"| {name} | (not in this ComfyUI) |")
            continue
        cfg = getattr(sm, cls)(unet)
        cfg.set_inference_dtype(torch.float32, None)
        dm = cfg.get_model({}, "", device="meta").diffusion_model
        fam = family_for(dm)
        p = profile(dm, fam)
        el = 4  # float32 on the meta device
        total = sum(t.numel() for t in dm.parameters())
        shared, head = p["shared_bytes"] / el, p["last_bytes"] / el
        per = []
        for stages in (2, 4):
            sp = split_blocks("by_memory", p["num_blocks"], stages, block_bytes=p["block_bytes"],
                              first_bytes=p["first_bytes"] + p["shared_bytes"],
                              last_bytes=p["last_bytes"] + p["shared_bytes"])
            worst = max(sum(p["block_bytes"][a:b]) / el + shared + (head if i == stages - 1 else 0)
                        for i, (a, b) in enumerate(sp.ranges))
            per.append(f"{worst * gb:.1f} GB ({worst / total:.0%})")
        print(f"| {name} | {fam.name} | {p['num_blocks']} | {total * gb:.1f} GB | {shared * gb:.2f} GB "
              f"({shared / total:.1%}) | {head * gb:.2f} GB | {per[0]} | {per[1]} |")


if __name__ == "__main__":
    main()
