"""Small Wan files of other kinds for the tests (i2v, Wan 2.2 5B), cached beside make_models' files."""
from pathlib import Path

import torch


def wan_file(kind: str) -> Path:
    """'i2v' (Wan 2.1 image-to-video, 36 input channels, CLIP image embedding) or
    'wan22_5b' (48 latent channels); written once into the test model cache."""
    import comfy.ops
    from comfy.ldm.wan.model import WanModel
    from make_models import _write, test_model_cache
    cfg = {"i2v": dict(model_type="i2v", in_dim=36), "wan22_5b": dict(in_dim=48, out_dim=48)}[kind]
    path = test_model_cache() / f"pp_tiny_wan_{kind}_v1.safetensors"
    if not path.is_file():
        base = dict(model_type="t2v", patch_size=(1, 2, 2), in_dim=16, dim=128, ffn_dim=256, freq_dim=256,
                    text_dim=4096, out_dim=16, num_heads=1, num_layers=2, qk_norm=True, cross_attn_norm=True,
                    eps=1e-6)
        model = WanModel(**{**base, **cfg}, device="meta", operations=comfy.ops.disable_weight_init)
        _write(model, path, torch.float32, 7)
    return path
