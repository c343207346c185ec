"""Stage adapter for ComfyUI's Qwen-Image model
(``comfy.ldm.qwen_image.model.QwenImageTransformer2DModel``: text-to-image, the Edit
models, 2511's ``index_timestep_zero``, Layered's ``additional_t_cond``).

Unlike Wan and Flux this class has no ``forward_orig``: its whole forward is
``_forward``.  So ``embed`` runs ComfyUI's own ``_forward`` (see ``forward_loop_args``)
with a stand-in block list whose first block stops the run and reports its arguments:
the input preparation (patchify, reference latents appended as extra image tokens,
their RoPE ids by ``ref_latents_method``, the zero-timestep copy of 2511, text and
time embeddings) stays ComfyUI's own code.  ``run_blocks`` mirrors the block loop of
``_forward`` with the model's own blocks; ``head`` mirrors the part after it: the final
layer, then ``[:, :num_embeds]`` (the tokens of the generated image; the reference
tokens after them are dropped exactly where ``_forward`` drops them, with ``num_embeds``
taken from ComfyUI's own ``process_img`` of the input), unpatchify and crop.

What crosses a stage boundary (all tensors; ints as int64 tensors):

* ``img``   [B, Li+Lr, H]  image tokens, reference-latent tokens appended (Lr = 0 for
                           text-to-image): the stream the blocks change.
* ``txt``   [B, Lt, H]     text tokens (the blocks change them too).
* ``temb``  [B|2B, H]      time embedding; 2B rows (timestep, then zero timestep) with
                           ``timestep_zero_index``; modulates every block and the head.
* ``pe``    RoPE table for txt+img(+reference) tokens.
* ``timestep_zero_index`` int64 []  only for ``index_timestep_zero`` with reference
                           latents: first reference token (= ``img_tokens``).
* ``txt_mask``             only if the caller passed ``attention_mask`` (the blocks take
                           it as ``encoder_hidden_states_mask``).
* ``img_tokens`` int64 []  ``num_embeds``: tokens of the generated image;
  ``orig_shape`` int64 [5] the padded input shape (unpatchify); ``out_size`` int64 [2]
  the input's h, w (crop).
* ``control_input_<i>``    ControlNet residual for block i, if a ControlNet is applied
                           (each stage drops those it has added).
* ``x_in``                 the model input, only if ``patches["double_block"]`` are set
                           (ComfyUI hands it to those patches).

Non-tensor per-call input: ``transformer_options`` (``patches_replace["dit"]`` block
replacements, ``double_block`` patches, attention options).  ``embed`` stores the dict it
receives in ``self.transformer_options``; on a rank that does not run ``embed`` the
caller assigns that attribute before ``run_blocks``/``head`` (default: empty dict).  As
in ComfyUI the blocks write ``block_index``/``total_blocks``/``block_type`` into it.
"""
from __future__ import annotations

import torch

from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel

from .base import ComfyAdapter, State, module_bytes
from .wan import check_no_model_wrappers


def _int(v) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.int64)


class _BlockLoopReached(Exception):
    def __init__(self, kwargs):
        super().__init__("block loop reached")
        self.kwargs = kwargs


class _StopBlock:
    def __call__(self, **kwargs):
        raise _BlockLoopReached(kwargs)


class _StopAtBlockLoop:
    """Stands in for the model inside its own ``_forward``: attributes come from the
    model, the block list is one block that stops the run and reports its arguments,
    and the first ``process_img`` (the input's) is recorded for the head."""

    def __init__(self, model):
        self._model = model
        self.transformer_blocks = [_StopBlock()]
        self.image = None

    def __getattr__(self, name):
        return getattr(self._model, name)

    def process_img(self, x, *args, **kwargs):
        out = self._model.process_img(x, *args, **kwargs)
        if self.image is None:
            self.image = (out[0].shape[1], tuple(out[2]))  # (num_embeds, orig_shape)
        return out


def forward_loop_args(model, x, *args, transformer_options={}, **kwargs):
    """Run ComfyUI's ``type(model)._forward`` up to the first block and return that call's
    keyword arguments, plus (num_embeds, orig_shape) of the input.  Block replacements are
    left out of this run (they belong to the blocks, see ``run_blocks``)."""
    stand_in = _StopAtBlockLoop(model)
    opts = {k: v for k, v in transformer_options.items() if k != "patches_replace"}
    try:
        type(model)._forward(stand_in, x, *args, transformer_options=opts, **kwargs)
    except _BlockLoopReached as stop:
        return stop.kwargs, stand_in.image
    raise RuntimeError(f"{type(model).__name__}._forward did not reach its block loop")


class QwenImageStaged(ComfyAdapter):
    EMBED = ("img_in", "txt_norm", "txt_in", "time_text_embed", "pe_embedder")
    HEAD = ("norm_out", "proj_out")
    # top-level buffer (a marker of 2511 files, no data); the first stage holds it
    MARKERS = ("__index_timestep_zero__",)

    def block_prefix(self, i: int) -> str:
        return f"transformer_blocks.{i}."

    def stage_prefixes(self, start: int, end: int, first: bool, last: bool) -> list[str]:
        out = super().stage_prefixes(start, end, first, last)
        if first:
            out += [n for n, _ in self.model.named_buffers() if n in self.MARKERS]
        return out

    def __init__(self, model: QwenImageTransformer2DModel):
        if type(model)._forward is not QwenImageTransformer2DModel._forward:
            raise NotImplementedError(
                f"{type(model).__name__} has its own forward; only comfy.ldm.qwen_image.model."
                "QwenImageTransformer2DModel is supported")
        self.model = model
        self.num_blocks = len(model.transformer_blocks)
        self.transformer_options: dict = {}

    # -- _forward up to the block loop (run by ComfyUI's own code) ----------------------
    def embed(self, x, timestep, context, attention_mask=None, ref_latents=None, additional_t_cond=None,
              transformer_options={}, control=None, **kwargs) -> State:
        check_no_model_wrappers(transformer_options)
        self.transformer_options = transformer_options
        kw, (num_embeds, orig_shape) = forward_loop_args(
            self.model, x, timestep, context, attention_mask, ref_latents, additional_t_cond,
            transformer_options=transformer_options, control=control, **kwargs)

        state = {"img": kw["hidden_states"], "txt": kw["encoder_hidden_states"], "temb": kw["temb"],
                 "pe": kw["image_rotary_emb"], "img_tokens": _int(num_embeds),
                 "orig_shape": _int(list(orig_shape)), "out_size": _int([x.shape[-2], x.shape[-1]])}
        if kw["timestep_zero_index"] is not None:
            state["timestep_zero_index"] = _int(kw["timestep_zero_index"])
        if kw["encoder_hidden_states_mask"] is not None:
            state["txt_mask"] = kw["encoder_hidden_states_mask"]
        if "double_block" in transformer_options.get("patches", {}):
            state["x_in"] = x
        if control is not None:
            for i, add in enumerate(control.get("input") or []):
                if add is not None:
                    state[f"control_input_{i}"] = add
        return state

    # -- _forward's block loop, blocks start..end-1 ---------------------------------------
    def run_blocks(self, start: int, end: int, state: State) -> State:
        m = self.model
        s = dict(state)
        transformer_options = self.transformer_options
        hidden_states, encoder_hidden_states = s["img"], s["txt"]
        temb, image_rotary_emb = s["temb"], s["pe"]
        encoder_hidden_states_mask = s.get("txt_mask")
        timestep_zero_index = int(s["timestep_zero_index"]) if "timestep_zero_index" in s else None

        patches = transformer_options.get("patches", {})
        blocks_replace = transformer_options.get("patches_replace", {}).get("dit", {})

        transformer_options["total_blocks"] = len(m.transformer_blocks)
        transformer_options["block_type"] = "double"
        for i in range(start, end):
            block = m.transformer_blocks[i]
            transformer_options["block_index"] = i
            if ("double_block", i) in blocks_replace:
                def block_wrap(args, block=block):
                    out = {}
                    out["txt"], out["img"] = block(hidden_states=args["img"], encoder_hidden_states=args["txt"], encoder_hidden_states_mask=encoder_hidden_states_mask, temb=args["vec"], image_rotary_emb=args["pe"], timestep_zero_index=timestep_zero_index, transformer_options=args["transformer_options"])
                    return out
                out = blocks_replace[("double_block", i)]({"img": hidden_states, "txt": encoder_hidden_states, "vec": temb, "pe": image_rotary_emb, "transformer_options": transformer_options}, {"original_block": block_wrap})
                hidden_states = out["img"]
                encoder_hidden_states = out["txt"]
            else:
                encoder_hidden_states, hidden_states = block(
                    hidden_states=hidden_states,
                    encoder_hidden_states=encoder_hidden_states,
                    encoder_hidden_states_mask=encoder_hidden_states_mask,
                    temb=temb,
                    image_rotary_emb=image_rotary_emb,
                    timestep_zero_index=timestep_zero_index,
                    transformer_options=transformer_options,
                )

            if "double_block" in patches:
                for p in patches["double_block"]:
                    out = p({"img": hidden_states, "txt": encoder_hidden_states, "x": s["x_in"], "block_index": i, "transformer_options": transformer_options})
                    hidden_states = out["img"]
                    encoder_hidden_states = out["txt"]

            add = s.pop(f"control_input_{i}", None)  # Controlnet
            if add is not None:
                hidden_states[:, :add.shape[1]] += add

        s["img"], s["txt"] = hidden_states, encoder_hidden_states
        return s

    # -- _forward after the loop: final layer, drop the reference tokens, unpatchify ------
    def head(self, state: State) -> torch.Tensor:
        m = self.model
        temb = state["temb"]
        if "timestep_zero_index" in state:
            temb = temb.chunk(2, dim=0)[0]

        hidden_states = m.norm_out(state["img"], temb)
        hidden_states = m.proj_out(hidden_states)

        num_embeds = int(state["img_tokens"])
        orig_shape = state["orig_shape"].tolist()
        h, w = state["out_size"].tolist()
        hidden_states = hidden_states[:, :num_embeds].view(orig_shape[0], orig_shape[-3], orig_shape[-2] // 2, orig_shape[-1] // 2, orig_shape[1], 2, 2)
        hidden_states = hidden_states.permute(0, 4, 1, 2, 5, 3, 6)
        return hidden_states.reshape(orig_shape)[:, :, :, :h, :w]

    # -- split planning --------------------------------------------------------------------
    def block_costs(self) -> list[float]:
        """Matmul FLOPs per token: the blocks are dual-stream (each token goes through the
        image or the text weights), so half the stream parameters; ``img_mod``/``txt_mod``
        act on one vector and are left out.  All blocks have the same shape."""
        def stream_params(b):
            return sum(p.numel() for n, p in b.named_parameters() if n.split(".")[0] not in ("img_mod", "txt_mod"))
        return [stream_params(b) / 2 for b in self.model.transformer_blocks]

    def block_bytes(self) -> list[int]:
        return [module_bytes(b) for b in self.model.transformer_blocks]

    def embed_bytes(self) -> int:
        m = self.model
        return sum(module_bytes(getattr(m, n)) for n in self.EMBED)

    def head_bytes(self) -> int:
        m = self.model
        return sum(module_bytes(getattr(m, n)) for n in self.HEAD if getattr(m, n, None) is not None)


__all__ = ["QwenImageStaged", "forward_loop_args"]
