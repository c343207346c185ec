"""Small random-weight diffusion models for tests, built with ComfyUI's own classes.

``make_wan21_t2v(path)``, ``make_flux1(path)`` and ``make_qwen_image(path)`` write
safetensors files in the key layout ComfyUI's stock UNETLoader reads (the bare
``diffusion_model`` state dict); ``comfy.sd.load_diffusion_model(path)`` detects them as
Wan 2.1 t2v, Flux.1 dev/schnell and Qwen-Image.  ``randomize(module)`` gives an
in-memory model seeded random weights.

Sizes are bounded by comfy/model_detection.py:
* Wan 2.1: num_heads = dim // 128, patch (1, 2, 2), freq_dim 256, text_dim 4096 (the
  constructor default; detection does not read it); dim, ffn_dim and the block count
  are free, so the file is tiny (dim 128, 1 head, 2 blocks: ~6 MB in fp32).
* Flux.1: 24 heads and axes_dim [16, 56, 56] are fixed, so hidden size is 3072 and
  mlp_ratio 4; only the block counts are free.  1 double + 1 single block is ~540M
  parameters: ~1.08 GB in bf16, ~0.54 GB in float8_e4m3fn (the default here; ComfyUI
  loads fp8 files and casts them to the compute dtype).
* Qwen-Image: detection reads only ``in_channels`` and the block count, so hidden size
  3072 (24 heads x 128), text width 3584 and the 4x MLP are fixed; a block is ~340M
  parameters (1.36 GB in fp32).  2 blocks (the fewest a 2-stage split can cut) and the
  embedders/final layer are ~720M parameters: ~0.72 GB in float8_e4m3fn (the default).

``cached_model_files()`` writes them once into a cache folder and reuses them.

Needs ComfyUI importable (see ``comfy_env.import_comfy``).  Run as a script to write
the files: ``python tests/make_models.py [OUTDIR]``.
"""
from __future__ import annotations

import math
import os
import sys
import tempfile
from pathlib import Path

import torch


def _random(name: str, shape, g: torch.Generator) -> torch.Tensor:
    """Seeded random values that keep activations O(1): norm scales near 1, weight
    matrices ~ 1/sqrt(fan_in), biases and modulation tables small but non-zero."""
    r = torch.randn(shape, generator=g, dtype=torch.float32)
    last = name.rsplit(".", 1)[-1]
    if len(shape) == 1 and ("norm" in name or last == "scale"):
        return 1 + 0.1 * r
    if last == "weight" and len(shape) >= 2:
        return r / math.sqrt(math.prod(shape[1:]))
    return 0.1 * r


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Overwrite every parameter and floating buffer with seeded random values
    (ComfyUI's disable_weight_init ops leave them uninitialised, some are zeros)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if t.is_floating_point():
                t.copy_(_random(name, t.shape, g).to(t.dtype))
    return module


def released_flux_name(key: str) -> str:
    """Black Forest Labs' name of a Flux weight: the QK norms' scales stay ``.scale`` in
    released files (ComfyUI >= 0.14 names them ``.weight`` and renames them when it loads)."""
    return key[: -len(".weight")] + ".scale" if key.endswith("_norm.weight") else key


def _write(model: torch.nn.Module, path, dtype, seed: int, metadata=None, name=lambda k: k) -> Path:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    sd = {name(k): _random(k, v.shape, g).to(dtype).contiguous() for k, v in model.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(sd, str(tmp), metadata=metadata)
    os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    return path


def make_wan21_t2v(path, dim: int = 128, ffn_dim: int = 256, num_layers: int = 2,
                   dtype=torch.float32, seed: int = 0) -> Path:
    """Wan 2.1 text-to-video (16 latent channels, 4096-wide umT5 context)."""
    import comfy.ops
    from comfy.ldm.wan.model import WanModel

    assert dim % 128 == 0, "ComfyUI derives num_heads = dim // 128"
    model = WanModel(model_type="t2v", patch_size=(1, 2, 2), in_dim=16, dim=dim, ffn_dim=ffn_dim,
                     freq_dim=256, text_dim=4096, out_dim=16, num_heads=dim // 128,
                     num_layers=num_layers, qk_norm=True, cross_attn_norm=True, eps=1e-6,
                     device="meta", operations=comfy.ops.disable_weight_init)
    return _write(model, path, dtype, seed)


FLUX1_DETECTED = dict(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
                      hidden_size=3072, mlp_ratio=4.0, num_heads=24, axes_dim=[16, 56, 56],
                      theta=10000, patch_size=2, qkv_bias=True, txt_ids_dims=[])


# What ComfyUI's detection leaves at the constructor defaults (it reads only in_channels
# and the block count): 24 heads x 128 = hidden size 3072, 3584-wide text context.
QWEN_IMAGE_DETECTED = dict(patch_size=2, in_channels=64, out_channels=16, attention_head_dim=128,
                           num_attention_heads=24, joint_attention_dim=3584, axes_dims_rope=(16, 56, 56))


def make_flux1(path, guidance: bool = True, depth: int = 1, depth_single_blocks: int = 1,
               dtype=torch.float8_e4m3fn, seed: int = 0) -> Path:
    """Flux.1 dev (``guidance=True``) or schnell (``guidance=False``), in the released file's
    key layout (BFL's names)."""
    import comfy.ops
    from comfy.ldm.flux.model import Flux

    model = Flux(depth=depth, depth_single_blocks=depth_single_blocks, guidance_embed=guidance,
                 device="meta", operations=comfy.ops.disable_weight_init, **FLUX1_DETECTED)
    return _write(model, path, dtype, seed, name=released_flux_name)


def make_qwen_image(path, num_layers: int = 2, index_timestep_zero: bool = False,
                    dtype=torch.float8_e4m3fn, seed: int = 0) -> Path:
    """Qwen-Image (text-to-image and Edit share this layout); ``index_timestep_zero``
    adds the buffer by which ComfyUI detects Edit 2511."""
    import comfy.ops
    from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel

    model = QwenImageTransformer2DModel(
        num_layers=num_layers, device="meta", operations=comfy.ops.disable_weight_init,
        default_ref_method="index_timestep_zero" if index_timestep_zero else "index", **QWEN_IMAGE_DETECTED)
    return _write(model, path, dtype, seed)


# Bump when the generated contents change (the name keys the cache).
VERSION = 2  # 2: Flux in the released key layout
CACHE_ENV = "PP_TEST_MODEL_CACHE"


def test_model_cache() -> Path:
    """Where generated test model files are kept: ``$PP_TEST_MODEL_CACHE``, else
    ``<tmp>/pp-test-models``, in a subfolder per ComfyUI version and commit (a file is
    written from the running ComfyUI's classes, in its key layout: a run on another
    ComfyUI tree must never read it, nor overwrite it)."""
    from comfy_env import comfy_version
    base = Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "pp-test-models")
    return base / f"comfyui-{comfy_version()}"


def cached_model_files(cache_dir=None) -> dict[str, Path]:
    """The test models, written once into a cache folder and reused across sessions.

    Folder: ``cache_dir``, else ``test_model_cache()``.
    Keys: ``wan21_t2v`` (~4 MB), ``flux1_dev`` (~545 MB, ~10 s to write on 2 cores),
    ``qwen_image`` (~720 MB, ~1 min to write on 2 busy cores).
    """
    d = Path(cache_dir) if cache_dir else test_model_cache()
    files = {"wan21_t2v": (d / f"pp_tiny_wan21_t2v_v{VERSION}.safetensors", make_wan21_t2v),
             "flux1_dev": (d / f"pp_tiny_flux1_dev_v{VERSION}.safetensors", make_flux1),
             "qwen_image": (d / f"pp_tiny_qwen_image_v{VERSION}.safetensors", make_qwen_image)}
    return _LazyFiles(files)


class _LazyFiles(dict):
    """{key: path}; a file is written the first time its key is read, so a test that
    needs only the 4 MB Wan file never pays for the others."""

    def __init__(self, files):
        super().__init__({k: p for k, (p, _) in files.items()})
        self._make = {k: m for k, (_, m) in files.items()}

    def __getitem__(self, key):
        path = super().__getitem__(key)
        if not path.is_file():
            self._make[key](path)
        return path

    def values(self):
        return [self[k] for k in self]

    def items(self):
        return [(k, self[k]) for k in self]


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from comfy_env import import_comfy

    root, reason = import_comfy()
    if root is None:
        sys.exit(reason)
    for p in cached_model_files(sys.argv[1] if len(sys.argv) > 1 else None).values():
        print(p, p.stat().st_size)
