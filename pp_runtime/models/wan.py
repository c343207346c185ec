"""Stage adapter for ComfyUI's Wan 2.1 model (``comfy.ldm.wan.model.WanModel``, t2v/i2v).

Read it beside ``WanModel._forward`` / ``forward_orig`` in ComfyUI: ``embed`` is
``_forward`` (run by ComfyUI itself, see ``forward_orig_args``) plus the part of
``forward_orig`` before the block loop, ``run_blocks`` is that loop, ``head`` is the
part after it plus the crop at the end of ``_forward``.

What crosses a stage boundary (all tensors; ints as int64 tensors):

* ``x``        [B, L, dim]       the token stream, the only thing the blocks change.
* ``e0``       [B, 1|T, 6, dim]  per-block modulation input (``time_projection`` output).
* ``freqs``    [1, L, ...]       RoPE table of this grid (from ``rope_encode``).
* ``context``  [B, Lc, dim]      embedded text (+ CLIP image tokens for i2v): every
                                 block cross-attends to it.
* ``e``        [B, 1|T, dim]     time embedding, needed by the head's modulation.
* ``grid_sizes`` int64 [3]       patch grid (F, H, W) for unpatchify.
* ``out_size`` int64 [3]         the input's (t, h, w), cropped to at the end.
* ``ref_len``  int64 []          reference-latent tokens prepended to ``x`` (removed
                                 in the head); 0 without ``reference_latent``.
* ``context_img_len`` int64 []   only with ``clip_fea`` (i2v): CLIP tokens in ``context``.

``e``/``grid_sizes``/``out_size``/``ref_len`` are small and only the head needs them;
they ride along so that a stage needs nothing but the state it receives.

Non-tensor per-call input: ``transformer_options`` (block-replacement patches,
attention options).  ``embed`` stores the dict it receives in ``self.transformer_options``;
on a rank that does not run ``embed`` the caller assigns that attribute before
``run_blocks``/``head`` (default: empty dict).  As in ComfyUI, the blocks write
``block_index``/``total_blocks``/``block_type`` into it.

Blocks modify state tensors in place where ComfyUI's blocks do.
"""
from __future__ import annotations

import torch

import comfy.ldm.common_dit
import comfy.patcher_extension
from comfy.ldm.wan.model import WanModel, sinusoidal_embedding_1d

from .base import ComfyAdapter, State, module_bytes


class _ForwardOrigCall(Exception):
    def __init__(self, args, kwargs):
        super().__init__("forward_orig reached")
        self.call = (args, kwargs)


class _StopAtForwardOrig:
    """Stands in for the model inside its own ``_forward``: attributes come from the
    model, but the call to ``forward_orig`` stops the run and reports its arguments."""

    def __init__(self, model):
        self._model = model

    def __getattr__(self, name):
        return getattr(self._model, name)

    def forward_orig(self, *args, **kwargs):
        raise _ForwardOrigCall(args, kwargs)


def forward_orig_args(model, *args, **kwargs):
    """Run ComfyUI's ``type(model)._forward(*args, **kwargs)`` up to its call of
    ``forward_orig`` and return that call's ``(args, kwargs)``: the input preparation
    (padding, RoPE ids, reference latents, ...) stays ComfyUI's own code."""
    try:
        type(model)._forward(_StopAtForwardOrig(model), *args, **kwargs)
    except _ForwardOrigCall as stop:
        return stop.call
    raise RuntimeError(f"{type(model).__name__}._forward did not call forward_orig")


def check_no_model_wrappers(transformer_options) -> None:
    """DIFFUSION_MODEL wrappers (e.g. EasyCache) wrap the whole forward; one stage
    cannot run them."""
    wrappers = comfy.patcher_extension.get_all_wrappers(
        comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, transformer_options)
    if wrappers:
        raise NotImplementedError(
            "pipeline-parallel sampling does not support DIFFUSION_MODEL wrappers "
            "(e.g. the EasyCache node); remove them from the model")


def _int(v) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.int64)


class WanStaged(ComfyAdapter):
    EMBED = ("patch_embedding", "text_embedding", "time_embedding", "time_projection", "img_emb", "ref_conv")
    HEAD = ("head",)

    def block_prefix(self, i: int) -> str:
        return f"blocks.{i}."

    def __init__(self, model: WanModel):
        if (type(model)._forward is not WanModel._forward
                or type(model).forward_orig is not WanModel.forward_orig):
            raise NotImplementedError(
                f"{type(model).__name__} has its own forward (VACE, camera, S2V, ...); "
                "only plain Wan 2.1/2.2 t2v/i2v WanModel is supported")
        self.model = model
        self.num_blocks = len(model.blocks)
        self.transformer_options: dict = {}

    # -- WanModel._forward + forward_orig up to the block loop -------------------
    def embed(self, x, timestep, context, clip_fea=None, time_dim_concat=None,
              transformer_options={}, **kwargs) -> State:
        m = self.model
        check_no_model_wrappers(transformer_options)
        self.transformer_options = transformer_options
        bs, c, t, h, w = x.shape
        (x, t_, context), kw = forward_orig_args(
            m, x, timestep, context, clip_fea, time_dim_concat, transformer_options, **kwargs)
        freqs = kw["freqs"]

        # embeddings
        x = m.patch_embedding(x.float()).to(x.dtype)
        grid_sizes = x.shape[2:]
        x = x.flatten(2).transpose(1, 2)

        # time embeddings
        e = m.time_embedding(sinusoidal_embedding_1d(m.freq_dim, t_.flatten()).to(dtype=x[0].dtype))
        e = e.reshape(t_.shape[0], -1, e.shape[-1])
        e0 = m.time_projection(e).unflatten(2, (6, m.dim))

        ref_len = 0
        if m.ref_conv is not None:
            full_ref = kwargs.get("reference_latent", None)
            if full_ref is not None:
                full_ref = m.ref_conv(full_ref).flatten(2).transpose(1, 2)
                x = torch.concat((full_ref, x), dim=1)
                ref_len = full_ref.shape[1]

        # context
        context = m.text_embedding(context)

        state = {}
        if clip_fea is not None:
            if m.img_emb is not None:
                context_clip = m.img_emb(clip_fea)  # bs x 257 x dim
                context = torch.concat([context_clip, context], dim=1)
            state["context_img_len"] = _int(clip_fea.shape[-2])

        state.update(x=x, e0=e0, freqs=freqs, context=context, e=e,
                     grid_sizes=_int(list(grid_sizes)), out_size=_int([t, h, w]), ref_len=_int(ref_len))
        return state

    # -- forward_orig's block loop, blocks start..end-1 ---------------------------
    def run_blocks(self, start: int, end: int, state: State) -> State:
        m = self.model
        transformer_options = self.transformer_options
        x, e0, freqs, context = state["x"], state["e0"], state["freqs"], state["context"]
        context_img_len = int(state["context_img_len"]) if "context_img_len" in state else None

        blocks_replace = transformer_options.get("patches_replace", {}).get("dit", {})
        transformer_options["total_blocks"] = len(m.blocks)
        transformer_options["block_type"] = "double"
        for i in range(start, end):
            block = m.blocks[i]
            transformer_options["block_index"] = i
            if ("double_block", i) in blocks_replace:
                def block_wrap(args, block=block):
                    out = {}
                    out["img"] = block(args["img"], context=args["txt"], e=args["vec"], freqs=args["pe"], context_img_len=context_img_len, transformer_options=args["transformer_options"])
                    return out
                out = blocks_replace[("double_block", i)]({"img": x, "txt": context, "vec": e0, "pe": freqs, "transformer_options": transformer_options}, {"original_block": block_wrap})
                x = out["img"]
            else:
                x = block(x, e=e0, freqs=freqs, context=context, context_img_len=context_img_len, transformer_options=transformer_options)
        return {**state, "x": x}

    # -- forward_orig after the loop, and _forward's crop -------------------------
    def head(self, state: State) -> torch.Tensor:
        m = self.model
        x = m.head(state["x"], state["e"])

        ref_len = int(state["ref_len"])
        if ref_len:
            x = x[:, ref_len:]

        x = m.unpatchify(x, tuple(state["grid_sizes"].tolist()))
        t, h, w = state["out_size"].tolist()
        return x[:, :, :t, :h, :w]

    # -- split planning ------------------------------------------------------------
    def block_costs(self) -> list[float]:
        # All blocks have the same shape: matmul FLOPs per token ~ parameter count.
        return [float(sum(p.numel() for p in b.parameters())) for b in self.model.blocks]

    def block_bytes(self) -> list[int]:
        return [module_bytes(b) for b in self.model.blocks]

    def embed_bytes(self) -> int:
        m = self.model
        mods = [m.patch_embedding, m.text_embedding, m.time_embedding, m.time_projection,
                m.img_emb, m.ref_conv]
        return sum(module_bytes(x) for x in mods if x is not None)

    def head_bytes(self) -> int:
        return module_bytes(self.model.head)


__all__ = ["WanStaged", "forward_orig_args", "check_no_model_wrappers"]
