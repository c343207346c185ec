"""Stage adapter for ComfyUI's Flux model (``comfy.ldm.flux.model.Flux``).

Covers what that class runs in ComfyUI v0.8: Flux.1 dev (guidance embed) and schnell
(none), Kontext (``ref_latents``), Flux.2 (``global_modulation``: the modulation is
computed once from ``vec`` instead of inside each block), Flux ControlNet residuals.

Read it beside ``Flux._forward`` / ``forward_orig``: ``embed`` is ``_forward`` (run by
ComfyUI itself up to its ``forward_orig`` call, see ``wan.forward_orig_args``) plus
``forward_orig`` before the double-block loop; ``run_blocks`` is the two loops, with
the txt/img concatenation between them; ``head`` is the rest of ``forward_orig`` and the
unpatchify at the end of ``_forward``.

Global block index ``i < len(double_blocks)`` is double block ``i``, otherwise single
block ``i - len(double_blocks)``.

What crosses a stage boundary (all tensors; ints as int64 tensors):

* while in the double blocks: ``img`` [B, Li, H] and ``txt`` [B, Lt, H] (two streams);
  from the first single block on: ``img`` [B, Lt+Li, H] (= cat(txt, img)) and
  ``txt_len`` int64 [].  The concatenation is done by whichever stage runs the first
  single block (or by the head if the model has no single blocks); a ``txt`` key in
  the state means "not concatenated yet", so it happens exactly once.
* ``vec``   [B, H]       timestep/guidance/pooled-text embedding (``vec_orig``); the
                         blocks (Flux.1) and the final layer are modulated by it.
* ``mod_img``, ``mod_txt`` [6, B, 1, H] and ``mod_single`` [3, B, 1, H]: Flux.2 only,
  the shared modulations (shift, scale, gate) x 2 or x 1, computed once in ``embed``
  (from ``vec``, exactly as forward_orig does) so the big modulation layers live on
  the first stage only.
* ``pe``    RoPE table for txt+img(+reference) tokens.
* ``attn_mask`` only if the caller passed ``attention_mask``.
* ``img_tokens`` int64 [] tokens of the generated image (reference-latent tokens follow
  them and are dropped in the head); ``out_size`` int64 [4]: h_len, w_len (patch grid)
  and h, w of the input, for unpatchify and crop.
* ``control_input_<i>`` / ``control_output_<i>``: ControlNet residuals for double
  block i / single block i, if a ControlNet is applied.  Each stage drops the ones it
  has added, so they travel only as far as the block that uses them.

Non-tensor per-call input: ``transformer_options`` (``patches_replace["dit"]`` block
replacements, ``post_input`` patches, attention options).  ``embed`` stores the dict it
receives in ``self.transformer_options``; on a rank that does not run ``embed`` the
caller assigns that attribute before ``run_blocks``/``head`` (default: empty dict).
As in ComfyUI the blocks write ``block_index``/``total_blocks``/``block_type`` into it.

Blocks modify state tensors in place where ComfyUI's blocks do.
"""
from __future__ import annotations

import torch
from einops import rearrange

from comfy.ldm.flux.layers import ModulationOut, timestep_embedding
from comfy.ldm.flux.model import Flux

from .base import ComfyAdapter, State, module_bytes
from .wan import check_no_model_wrappers, forward_orig_args


def _int(v) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.int64)


def _stack(mods) -> torch.Tensor:
    """(ModulationOut, ModulationOut|None) -> [3 or 6, ...] tensor."""
    return torch.stack([t for m in mods if m is not None for t in (m.shift, m.scale, m.gate)])


def _unstack(t: torch.Tensor):
    return ModulationOut(*t[0:3]), ModulationOut(*t[3:6])


class FluxStaged(ComfyAdapter):
    EMBED = ("img_in", "time_in", "vector_in", "guidance_in", "txt_in", "txt_norm",
             "double_stream_modulation_img", "double_stream_modulation_txt", "single_stream_modulation")
    HEAD = ("final_layer",)

    def block_prefix(self, i: int) -> str:
        nd = len(self.model.double_blocks)
        return f"double_blocks.{i}." if i < nd else f"single_blocks.{i - nd}."

    def __init__(self, model: Flux):
        if (type(model)._forward is not Flux._forward
                or type(model).forward_orig is not Flux.forward_orig):
            raise NotImplementedError(
                f"{type(model).__name__} has its own forward; only comfy.ldm.flux.model.Flux is supported")
        self.model = model
        self.n_double = len(model.double_blocks)
        self.num_blocks = self.n_double + len(model.single_blocks)
        self.transformer_options: dict = {}

    # -- Flux._forward + forward_orig up to the double-block loop ------------------
    def embed(self, x, timestep, context, y=None, guidance=None, ref_latents=None, control=None,
              transformer_options={}, **kwargs) -> State:
        m = self.model
        check_no_model_wrappers(transformer_options)
        self.transformer_options = transformer_options
        bs, c, h_orig, w_orig = x.shape
        patch_size = m.patch_size
        h_len = ((h_orig + (patch_size // 2)) // patch_size)
        w_len = ((w_orig + (patch_size // 2)) // patch_size)
        (img, img_ids, txt, txt_ids, timesteps, y, guidance, control, transformer_options), kw = \
            forward_orig_args(m, x, timestep, context, y, guidance, ref_latents, control,
                              transformer_options, **kwargs)
        attn_mask = kw["attn_mask"]
        img_tokens = h_len * w_len  # _forward: img_tokens = img.shape[1] before the reference latents

        patches = transformer_options.get("patches", {})

        # running on sequences img
        img = m.img_in(img)
        vec = m.time_in(timestep_embedding(timesteps, 256).to(img.dtype))
        if m.params.guidance_embed:
            if guidance is not None:
                vec = vec + m.guidance_in(timestep_embedding(guidance, 256).to(img.dtype))

        if m.vector_in is not None:
            if y is None:
                y = torch.zeros((img.shape[0], m.params.vec_in_dim), device=img.device, dtype=img.dtype)
            vec = vec + m.vector_in(y[:, :m.params.vec_in_dim])

        if m.txt_norm is not None:
            txt = m.txt_norm(txt)
        txt = m.txt_in(txt)

        state = {}
        if m.params.global_modulation:
            state["mod_img"] = _stack(m.double_stream_modulation_img(vec))
            state["mod_txt"] = _stack(m.double_stream_modulation_txt(vec))
            state["mod_single"] = _stack(m.single_stream_modulation(vec))  # forward_orig: after the double blocks

        if "post_input" in patches:
            for p in patches["post_input"]:
                out = p({"img": img, "txt": txt, "img_ids": img_ids, "txt_ids": txt_ids})
                img = out["img"]
                txt = out["txt"]
                img_ids = out["img_ids"]
                txt_ids = out["txt_ids"]

        if img_ids is not None:
            ids = torch.cat((txt_ids, img_ids), dim=1)
            state["pe"] = m.pe_embedder(ids)

        if attn_mask is not None:
            state["attn_mask"] = attn_mask
        if control is not None:
            for kind in ("input", "output"):
                for i, add in enumerate(control.get(kind) or []):
                    if add is not None:
                        state[f"control_{kind}_{i}"] = add

        state.update(img=img, txt=txt, vec=vec, img_tokens=_int(img_tokens),
                     out_size=_int([h_len, w_len, h_orig, w_orig]))
        return state

    # -- between the loops: nan_to_num (fp16) and the txt/img concatenation ---------
    @staticmethod
    def _join(s: State) -> None:
        img, txt = s["img"], s.pop("txt")
        if img.dtype == torch.float16:
            img = torch.nan_to_num(img, nan=0.0, posinf=65504, neginf=-65504)
        s["img"] = torch.cat((txt, img), 1)
        s["txt_len"] = _int(txt.shape[1])

    # -- forward_orig's double and single block loops, global blocks start..end-1 ----
    def run_blocks(self, start: int, end: int, state: State) -> State:
        m = self.model
        s = dict(state)
        transformer_options = self.transformer_options
        blocks_replace = transformer_options.get("patches_replace", {}).get("dit", {})
        pe, attn_mask = s.get("pe"), s.get("attn_mask")
        gm = m.params.global_modulation

        for gi in range(start, end):
            if gi < self.n_double:
                i, block = gi, m.double_blocks[gi]
                img, txt = s["img"], s["txt"]
                vec = (_unstack(s["mod_img"]), _unstack(s["mod_txt"])) if gm else s["vec"]
                transformer_options["total_blocks"] = len(m.double_blocks)
                transformer_options["block_type"] = "double"
                transformer_options["block_index"] = i
                if ("double_block", i) in blocks_replace:
                    def block_wrap(args, block=block):
                        out = {}
                        out["img"], out["txt"] = block(img=args["img"],
                                                       txt=args["txt"],
                                                       vec=args["vec"],
                                                       pe=args["pe"],
                                                       attn_mask=args.get("attn_mask"),
                                                       transformer_options=args.get("transformer_options"))
                        return out

                    out = blocks_replace[("double_block", i)]({"img": img,
                                                               "txt": txt,
                                                               "vec": vec,
                                                               "pe": pe,
                                                               "attn_mask": attn_mask,
                                                               "transformer_options": transformer_options},
                                                              {"original_block": block_wrap})
                    txt = out["txt"]
                    img = out["img"]
                else:
                    img, txt = block(img=img,
                                     txt=txt,
                                     vec=vec,
                                     pe=pe,
                                     attn_mask=attn_mask,
                                     transformer_options=transformer_options)

                add = s.pop(f"control_input_{i}", None)  # Controlnet
                if add is not None:
                    img[:, :add.shape[1]] += add
                s["img"], s["txt"] = img, txt
            else:
                if "txt" in s:
                    self._join(s)
                i, block = gi - self.n_double, m.single_blocks[gi - self.n_double]
                img = s["img"]
                vec = ModulationOut(*s["mod_single"]) if gm else s["vec"]
                transformer_options["total_blocks"] = len(m.single_blocks)
                transformer_options["block_type"] = "single"
                transformer_options["block_index"] = i
                if ("single_block", i) in blocks_replace:
                    def block_wrap(args, block=block):
                        out = {}
                        out["img"] = block(args["img"],
                                           vec=args["vec"],
                                           pe=args["pe"],
                                           attn_mask=args.get("attn_mask"),
                                           transformer_options=args.get("transformer_options"))
                        return out

                    out = blocks_replace[("single_block", i)]({"img": img,
                                                               "vec": vec,
                                                               "pe": pe,
                                                               "attn_mask": attn_mask,
                                                               "transformer_options": transformer_options},
                                                              {"original_block": block_wrap})
                    img = out["img"]
                else:
                    img = block(img, vec=vec, pe=pe, attn_mask=attn_mask, transformer_options=transformer_options)

                add = s.pop(f"control_output_{i}", None)  # Controlnet
                if add is not None:
                    txt_len = int(s["txt_len"])
                    img[:, txt_len: txt_len + add.shape[1], ...] += add
                s["img"] = img
        return s

    # -- forward_orig after the loops, and _forward's unpatchify + crop -------------
    def head(self, state: State) -> torch.Tensor:
        m = self.model
        s = dict(state)
        if "txt" in s:  # a model without single blocks: the concatenation is still due
            self._join(s)
        img = s["img"][:, int(s["txt_len"]):, ...]

        img = m.final_layer(img, s["vec"])  # (N, T, patch_size ** 2 * out_channels)

        out = img[:, :int(s["img_tokens"])]
        h_len, w_len, h_orig, w_orig = s["out_size"].tolist()
        return rearrange(out, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=h_len, w=w_len, ph=m.patch_size, pw=m.patch_size)[:, :, :h_orig, :w_orig]

    # -- split planning ------------------------------------------------------------
    def block_costs(self) -> list[float]:
        """Matmul FLOPs per token, ignoring the (one-vector) per-block modulation.

        A double block has two streams of equal width and each token goes through one
        of them, so per token it costs half its stream parameters; a single block's
        parameters all act on every token.  (For Flux.1 both come to ~113M per token,
        though the double block has 2.4x the parameters.)  Attention adds the same
        cost to every block and is left out.
        """
        def stream_params(b):
            return sum(p.numel() for n, p in b.named_parameters()
                       if n.split(".")[0] not in ("img_mod", "txt_mod", "modulation"))

        return ([stream_params(b) / 2 for b in self.model.double_blocks]
                + [float(stream_params(b)) for b in self.model.single_blocks])

    def block_bytes(self) -> list[int]:
        return ([module_bytes(b) for b in self.model.double_blocks]
                + [module_bytes(b) for b in self.model.single_blocks])

    def embed_bytes(self) -> int:
        m = self.model
        mods = [m.img_in, m.time_in, m.vector_in, m.guidance_in, m.txt_in, m.txt_norm,
                getattr(m, "double_stream_modulation_img", None),
                getattr(m, "double_stream_modulation_txt", None),
                getattr(m, "single_stream_modulation", None)]
        return sum(module_bytes(x) for x in mods if x is not None)

    def head_bytes(self) -> int:
        return module_bytes(self.model.final_layer)


__all__ = ["FluxStaged"]
