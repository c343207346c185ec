"""Benchmark model: ComfyUI's own Flux class (``comfy.ldm.flux.model.Flux``), random weights.

``build`` is a model factory for ``pp_runtime.jobs`` (spec ``{"factory":
"bench.flux_model:build", "kwargs": {"config": "flux1-dev"}, "dtype": "bfloat16"}``):

* without ``stage`` (the host's ``model_profile``) it builds the whole model on the
  meta device, in float32 (what ``model_profile`` assumes), costing nothing;
* with ``stage=(start, end, is_first, is_last)`` (a worker's ``build_stage``) it builds
  only that stage: the model is constructed on the meta device, the blocks, embedders
  and head the stage does not run are replaced by empty ``nn.Identity`` modules (so the
  global block indices stay), and only what is left is materialised on ``device``
  (``to_empty``) and initialised there.

Every parameter is drawn from its own generator, seeded from the parameter's full name
(``double_blocks.3.img_attn.qkv.weight``), so a block gets the same weights whichever
stage builds it: a PP2 run and a one-GPU run hold identical weights block for block.
Weights are ``N(0, 1/fan_in)`` (biases ``N(0, 0.02)``, norm scales ``1 + N(0, 0.02)``),
which keeps the activations of 57 blocks finite and O(1) in bf16.

``FluxBench`` is the ``FluxStaged`` adapter plus the two input conversions ComfyUI's
``model_base`` does before calling the diffusion model: the engine passes diffusers'
timestep (a 0-dim tensor in [0, 1000]) where ComfyUI's Flux wants sigma per batch item
in [0, 1], and the latents in float32 (the scheduler's dtype) where the model wants its
own dtype.  It also has ``eval``/``requires_grad_`` (``build_stage`` calls them), and,
when ``PP_BENCH_STATS`` names a folder, records this process's peak device memory per
job into it (see ``MemoryProbe``).
"""
from __future__ import annotations

import gc
import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]

_FLUX1 = dict(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072,
              mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56],
              theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True, txt_ids_dims=[])

CONFIGS = {
    # Flux.1-dev: 11.9 B parameters, 19 double + 38 single blocks, guidance embedding.
    "flux1-dev": dict(_FLUX1),
    # Same structure, tiny: for the CPU smoke run and tests.
    "tiny": dict(_FLUX1, in_channels=4, out_channels=4, vec_in_dim=16, context_in_dim=32, hidden_size=64,
                 num_heads=2, depth=2, depth_single_blocks=3, axes_dim=[8, 12, 12]),
}

# What the bench feeds each config: latent channels, text tokens default, context and y widths.
def input_dims(config: str) -> dict:
    c = CONFIGS[config]
    return {"latent_channels": c["in_channels"], "context_dim": c["context_in_dim"], "y_dim": c["vec_in_dim"]}


def comfy_root() -> Path:
    """A ComfyUI source tree: $COMFYUI_ROOT, <repo>/.carry/ComfyUI, or the ComfyUI this
    pack is installed in (<ComfyUI>/custom_nodes/<pack>), or a sibling ../ComfyUI."""
    cands = [Path(os.environ["COMFYUI_ROOT"])] if os.environ.get("COMFYUI_ROOT") else []
    cands += [REPO / ".carry" / "ComfyUI", REPO.parents[1], REPO.parent / "ComfyUI"]
    for c in cands:
        if (c / "comfy" / "model_management.py").is_file():
            return c.resolve()
    raise RuntimeError("ComfyUI not found: set COMFYUI_ROOT to a ComfyUI source tree "
                       f"(looked in {', '.join(str(c) for c in cands)})")


def import_comfy(cpu: bool, module: str = "comfy.ldm.flux.model", cls: str = "Flux"):
    """Import ComfyUI's ops and a model class (Flux by default).  ``cpu``: ComfyUI's CPU mode (the host, which only
    builds on the meta device, and CPU workers); else its CUDA mode (GPU workers).  Either
    way attention is PyTorch's SDPA, as ComfyUI picks on NVIDIA."""
    root = str(comfy_root())
    if root not in sys.path:
        sys.path.insert(0, root)
    from comfy.cli_args import args
    if "comfy.model_management" not in sys.modules:  # args are read once, at its import
        args.cpu = bool(cpu)
        args.use_pytorch_cross_attention = True
    import comfy.model_management  # noqa: F401
    import importlib

    import comfy.ops
    return comfy.ops, getattr(importlib.import_module(module), cls)


def _param_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def init_weights(module: nn.Module, seed: int, is_scale=lambda name: name.endswith("scale")) -> None:
    """Seeded per parameter name: N(0, 1/fan_in) matrices, 1 + N(0, 0.02) norm scales
    (``is_scale``), N(0, 0.02) biases."""
    for name, p in module.named_parameters():
        g = torch.Generator(device=p.device)
        g.manual_seed(_param_seed(seed, name))
        w = torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32)
        if p.dim() >= 2:
            w *= p[0].numel() ** -0.5  # N(0, 1/fan_in)
        elif is_scale(name):
            w = w.mul_(0.02).add_(1.0)
        else:
            w *= 0.02
        p.copy_(w)
        del w
    for name, b in module.named_buffers():
        raise RuntimeError(f"unexpected buffer {name}: the bench only initialises parameters")


class MemoryProbe:
    """Peak device memory of this worker per job, written to ``$PP_BENCH_STATS``.

    The host writes a tag into ``$PP_BENCH_STATS/epoch`` before a timed job; at the first
    model call after the tag changed the probe resets the peak counters, and after every
    call it writes ``mem_<pid>.json`` when the peak grew (a few writes per job, all in the
    first step).  Only allocator counters are read: no device synchronisation.
    """

    def __init__(self, device: torch.device, stage):
        self.dir = os.environ.get("PP_BENCH_STATS")
        self.on = bool(self.dir) and torch.device(device).type == "cuda"
        self.stage = list(stage) if stage else None
        self.tag, self.mtime, self.written = None, None, None

    def enter(self):
        if not self.on:
            return
        try:
            m = os.stat(os.path.join(self.dir, "epoch")).st_mtime_ns
        except FileNotFoundError:
            return
        if m != self.mtime:
            self.mtime = m
            with open(os.path.join(self.dir, "epoch")) as f:
                self.tag = f.read().strip()
            torch.cuda.reset_peak_memory_stats()
            self.written = None

    def leave(self):
        if not self.on or self.tag is None:
            return
        peak = torch.cuda.max_memory_allocated()
        if peak != self.written:
            self.written = peak
            rec = {"tag": self.tag, "pid": os.getpid(), "stage": self.stage, "peak_allocated": peak,
                   "peak_reserved": torch.cuda.max_memory_reserved(),
                   "allocated_now": torch.cuda.memory_allocated()}
            path = os.path.join(self.dir, f"mem_{os.getpid()}.json")
            with open(path + ".tmp", "w") as f:
                json.dump(rec, f)
            os.replace(path + ".tmp", path)


class BenchStage:
    """What the bench adds to a family adapter: the memory probe around each stage call,
    and the ``nn.Module``-like calls ``build_stage`` makes on what a factory returns.
    Mixed in before the adapter class (``class FluxBench(BenchStage, FluxStaged)``)."""

    def __init__(self, model, dtype, stage, device):
        super().__init__(model)
        self.dtype = dtype
        self.probe = MemoryProbe(device, stage)

    def run_blocks(self, start, end, state):
        self.probe.enter()
        out = super().run_blocks(start, end, state)
        self.probe.leave()
        return out

    def head(self, state):
        out = super().head(state)
        self.probe.leave()
        return out

    def eval(self):
        self.model.eval()
        return self

    def requires_grad_(self, flag: bool = True):
        self.model.requires_grad_(flag)
        return self

    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())


_BENCH_CLS = None


def _bench_cls():
    """``FluxBench``, made once (it subclasses ``FluxStaged``, importable only once ComfyUI is)."""
    global _BENCH_CLS
    if _BENCH_CLS is not None:
        return _BENCH_CLS
    from pp_runtime.models.flux import FluxStaged

    class FluxBench(BenchStage, FluxStaged):
        def embed(self, x, timestep, context, y=None, guidance=None, **kwargs):
            self.probe.enter()
            x = x.to(self.dtype)  # AsyncLatents: waits here for the latents
            t = timestep.to(device=x.device, dtype=torch.float32) / 1000.0  # diffusers t -> sigma
            if t.dim() == 0:
                t = t.expand(x.shape[0])
            context = context.to(self.dtype)
            y = y.to(self.dtype) if y is not None else None
            guidance = guidance.to(torch.float32) if guidance is not None else None
            return super().embed(x, t, context, y=y, guidance=guidance, **kwargs)

    _BENCH_CLS = FluxBench
    return FluxBench


def build(config: str = "flux1-dev", seed: int = 0, stage=None, device=None, dtype=None, **overrides):
    params = {**CONFIGS[config], **overrides}
    if stage is None:  # the host: whole model on the meta device, float32, nothing allocated
        ops, Flux = import_comfy(cpu=True)
        model = Flux(device="meta", operations=ops.disable_weight_init, **params)
        return _make_bench(model, torch.float32, None, "meta")
    device = torch.device(device)
    dtype = dtype or torch.float32
    # A model placed before this one may still sit in a reference cycle: free it first, so
    # the device holds one placed model (and the peak-memory figures are this one's).
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    ops, Flux = import_comfy(cpu=device.type != "cuda")
    start, end, first, last = stage
    model = Flux(device="meta", dtype=dtype, operations=ops.disable_weight_init, **params)
    nd = len(model.double_blocks)
    for i in range(nd):
        if not start <= i < end:
            model.double_blocks[i] = nn.Identity()
    for j in range(len(model.single_blocks)):
        if not start <= nd + j < end:
            model.single_blocks[j] = nn.Identity()
    if not first:  # embedders live on the first stage only
        for name in ("img_in", "time_in", "vector_in", "guidance_in", "txt_in", "txt_norm",
                     "double_stream_modulation_img", "double_stream_modulation_txt", "single_stream_modulation"):
            if getattr(model, name, None) is not None:
                setattr(model, name, nn.Identity())
    if not last and hasattr(model, "final_layer"):
        model.final_layer = nn.Identity()
    model.to_empty(device=device)
    init_weights(model, seed)
    return _make_bench(model, dtype, stage, device)


def _make_bench(model, dtype, stage, device):
    return _bench_cls()(model, dtype, stage, device)
