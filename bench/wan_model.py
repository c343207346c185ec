"""Benchmark model: ComfyUI's own Wan 2.1 class (``comfy.ldm.wan.model.WanModel``), random weights.

The Wan counterpart of ``flux_model.py``, for the issue's second target (a Wan-2.1-14B-sized
model, 480x832, 33 frames).  ``build`` is a model factory for ``pp_runtime.jobs`` (spec
``{"factory": "bench.wan_model:build", "kwargs": {"config": "wan14b"}, "dtype": "bfloat16"}``):

* without ``stage`` (the host's ``model_profile``) it builds the whole model on the
  meta device, in float32, costing nothing;
* with ``stage=(start, end, is_first, is_last)`` (a worker's ``build_stage``) it builds
  only that stage: constructed on the meta device, the blocks, embedders and head the
  stage does not run are replaced by empty ``nn.Identity`` modules (global block indices
  stay), and only what is left is materialised on ``device`` and initialised there.

The config is what ComfyUI's ``model_detection`` derives from a Wan 2.1 14B t2v checkpoint
(``dim`` 5120, ``ffn_dim`` 13824, 40 blocks, 40 heads of 128, ``text_dim`` 4096,
``freq_dim`` 256, 16 latent channels in and out, patch (1, 2, 2), ``qk_norm``,
``cross_attn_norm``, eps 1e-6, t2v).  Parameters as ComfyUI builds them: bf16, except
the ``patch_embedding`` Conv3d, which ComfyUI creates in float32.

Every parameter is drawn from its own generator seeded from its full name (as in
``flux_model``), so a block has the same weights whichever stage builds it.  Weights
``N(0, 1/fan_in)``, biases ``N(0, 0.02)``, norm weights (RMSNorm of q/k, the affine
LayerNorm before cross-attention) ``1 + N(0, 0.02)``.

``WanBench`` is ``pp_runtime.models.wan.WanStaged`` plus the input conversions ComfyUI's
``model_base.BaseModel._apply_model`` does before calling ``WanModel``: latents to the
model dtype, text context to the model dtype, and the timestep as
``model_sampling.timestep(sigma).float()``.  Wan 2.1 is a FLOW model with
``ModelSamplingDiscreteFlow`` (multiplier 1000), so ComfyUI feeds ``WanModel``
``sigma * 1000`` per batch item.  The engine's diffusers flow scheduler hands the model
its timestep ``t = sigma * 1000`` (``num_train_timesteps`` 1000) as a 0-dim tensor, which
is therefore already what ComfyUI feeds: it is only made float32 and expanded to the
batch (unlike Flux, where ComfyUI feeds sigma = t / 1000).
"""
from __future__ import annotations

import gc

import torch
from torch import nn

from bench import flux_model
from bench.flux_model import BenchStage

_WAN21_14B = dict(model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, dim=5120, ffn_dim=13824,
                  freq_dim=256, text_dim=4096, out_dim=16, num_heads=40, num_layers=40, window_size=(-1, -1),
                  qk_norm=True, cross_attn_norm=True, eps=1e-6, image_model="wan2.1")

CONFIGS = {
    # Wan 2.1 14B t2v: 14.3 B parameters, 40 blocks of dim 5120.
    "wan14b": dict(_WAN21_14B),
    # Same structure, tiny: for the CPU smoke run.
    "wan-tiny": dict(_WAN21_14B, in_dim=4, out_dim=4, dim=64, ffn_dim=128, text_dim=32, num_heads=2, num_layers=4),
}


def input_dims(config: str) -> dict:
    c = CONFIGS[config]
    return {"latent_channels": c["in_dim"], "context_dim": c["text_dim"], "y_dim": None}


def import_comfy(cpu: bool):
    return flux_model.import_comfy(cpu, "comfy.ldm.wan.model", "WanModel")


def init_weights(module: nn.Module, seed: int) -> None:
    """As flux_model's, with Wan's norm scales (RMSNorm / affine LayerNorm ``weight``)."""
    flux_model.init_weights(module, seed, lambda name: "norm" in name.rsplit(".", 2)[-2]
                            and name.endswith("weight"))


_BENCH_CLS = None


def _bench_cls():
    global _BENCH_CLS
    if _BENCH_CLS is not None:
        return _BENCH_CLS
    from pp_runtime.models.wan import WanStaged

    class WanBench(BenchStage, WanStaged):
        def embed(self, x, timestep, context, **kwargs):
            self.probe.enter()
            x = x.to(self.dtype)  # AsyncLatents: waits here for the latents
            # ComfyUI: t = model_sampling.timestep(sigma).float() = sigma * 1000 = the diffusers timestep
            t = timestep.to(device=x.device, dtype=torch.float32)
            if t.dim() == 0:
                t = t.expand(x.shape[0])
            context = context.to(self.dtype)
            return super().embed(x, t, context, **kwargs)

    _BENCH_CLS = WanBench
    return WanBench


def build(config: str = "wan14b", seed: int = 0, stage=None, device=None, dtype=None, **overrides):
    params = {**CONFIGS[config], **overrides}
    if stage is None:  # the host: whole model on the meta device, float32, nothing allocated
        ops, WanModel = import_comfy(cpu=True)
        model = WanModel(device="meta", operations=ops.disable_weight_init, **params)
        return _bench_cls()(model, torch.float32, None, "meta")
    device = torch.device(device)
    dtype = dtype or torch.float32
    gc.collect()  # free a previously placed model first (see flux_model.build)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    ops, WanModel = import_comfy(cpu=device.type != "cuda")
    start, end, first, last = stage
    model = WanModel(device="meta", dtype=dtype, operations=ops.disable_weight_init, **params)
    for i in range(len(model.blocks)):
        if not start <= i < end:
            model.blocks[i] = nn.Identity()
    if not first:  # embedders live on the first stage only
        for name in ("patch_embedding", "text_embedding", "time_embedding", "time_projection", "img_emb", "ref_conv"):
            if getattr(model, name, None) is not None:
                setattr(model, name, nn.Identity())
    if not last:
        model.head = nn.Identity()
    model.to_empty(device=device)
    init_weights(model, seed)
    return _bench_cls()(model, dtype, stage, device)
