"""A small built-in DiT for the demo and the engine's tests.

Latents [B, C, H, W] are patchified into tokens, conditioned on a timestep embedding
(adaLN-style scale/shift) and on text tokens (joint attention over text + image, as
Flux and SD3 do), run through ``depth`` transformer blocks and projected back.  With
``packed`` the latents are tokens and reference tokens (``ref``) may follow them, as in
edit models; the head then returns all tokens.  The boundary state is {"img", "txt", "vec", "hw"}: everything a later block or the head
needs, as tensors.  Weights are drawn from a seeded generator, so every rank that builds
the model gets the same weights without any transfer.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .base import module_bytes


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float().reshape(-1, 1) * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.mod = nn.Linear(dim, 4 * dim)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(approximate="tanh"), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        s1, b1, s2, b2 = self.mod(vec).unsqueeze(1).chunk(4, dim=-1)
        h = self.norm1(x) * (1 + s1) + b1
        q, k, v = self.qkv(h).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(a.transpose(1, 2).flatten(2))
        return x + self.mlp(self.norm2(x) * (1 + s2) + b2)


class ToyDiT(nn.Module):
    def __init__(self, in_channels: int = 4, patch: int = 2, dim: int = 64, heads: int = 4, depth: int = 6,
                 context_dim: int = 32, packed: bool = False, seed: int = 0):
        super().__init__()
        self.patch, self.in_channels, self.dim, self.packed = patch, in_channels, dim, packed
        self.img_in = nn.Linear(in_channels * patch * patch, dim)
        self.txt_in = nn.Linear(context_dim, dim)
        self.time_in = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False)
        self.out = nn.Linear(dim, in_channels * patch * patch)
        self.num_blocks = depth
        if not any(p.is_meta for p in self.parameters()):
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in self.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * (0.5 / math.sqrt(p.shape[-1])))

    # -- the staged forward: embed -> blocks -> head -------------------------------
    def embed(self, x, timestep, context, ref=None):
        p = self.patch
        if self.packed:  # latents already as tokens [B, N, C*p*p], as Qwen-Image packs them
            tokens, (b, h, w) = x, (x.shape[0], 0, 0)
        else:
            b, c, h, w = x.shape
            tokens = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
        if ref is not None:  # reference tokens appended after the image (edit models)
            tokens = torch.cat([tokens, ref], dim=1)
        vec = self.time_in(timestep_embedding(timestep.expand(b) if timestep.dim() == 0 else timestep, self.dim))
        return {"img": self.img_in(tokens), "txt": self.txt_in(context), "vec": vec,
                "hw": torch.tensor([h, w], dtype=torch.int64, device=x.device)}

    def run_blocks(self, start, end, state):
        txt_len = state["txt"].shape[1]
        x = torch.cat([state["txt"], state["img"]], dim=1)
        for block in self.blocks[start:end]:
            x = block(x, state["vec"])
        return {**state, "txt": x[:, :txt_len], "img": x[:, txt_len:]}

    def head(self, state):
        h, w = state["hw"].tolist()
        p, c = self.patch, self.in_channels
        out = self.out(self.norm_out(state["img"]))
        if self.packed:  # tokens out, reference tokens included: output_slice drops them
            return out
        b = out.shape[0]
        return out.reshape(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

    def forward(self, x, timestep, context, ref=None):
        return self.head(self.run_blocks(0, self.num_blocks, self.embed(x, timestep, context, ref)))

    # -- what the split needs ---------------------------------------------------------
    def block_costs(self):
        return [float(sum(p.numel() for p in b.parameters())) for b in self.blocks]

    def block_bytes(self):
        return [module_bytes(b) for b in self.blocks]

    def embed_bytes(self):
        return module_bytes(self.img_in) + module_bytes(self.txt_in) + module_bytes(self.time_in)

    def head_bytes(self):
        return module_bytes(self.out)

    def prune(self, start, end, first, last):
        """Drop what this stage does not run (the stage keeps only its own weights)."""
        for i in range(self.num_blocks):
            if not start <= i < end:
                self.blocks[i] = nn.Identity()
        if not first:
            self.img_in = self.txt_in = self.time_in = None
        if not last:
            self.out = None


def build(**kwargs) -> ToyDiT:
    return ToyDiT(**kwargs)
