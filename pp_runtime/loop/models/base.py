"""The contract between the engine's own denoising loop and a staged model (the toy DiT).

ComfyUI's models do not implement it: they are staged inside their own forward
(``pp_runtime/staging.py``).

A staged model is cut as *embed -> blocks[start:end] -> head*.  Stage k of S runs
``embed`` only if it is the first stage, ``run_blocks(start, end, state)`` for the
blocks it owns, and ``head`` only if it is the last.  ``state`` is the dict of tensors
that crosses a stage boundary: it must hold tensors only (the engine sends it with
``isend_tensor_dict``), and everything a later stage needs must be in it.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

State = dict[str, torch.Tensor]


@runtime_checkable
class StagedModel(Protocol):
    num_blocks: int

    def embed(self, **inputs) -> State:
        """First stage: model inputs (latents, timestep, conditioning) -> boundary state."""

    def run_blocks(self, start: int, end: int, state: State) -> State:
        """Blocks ``start .. end-1`` (global block indices)."""

    def head(self, state: State) -> torch.Tensor:
        """Last stage: boundary state -> model output (same layout as the unsplit forward)."""

    def block_costs(self) -> list[float]:
        """Relative compute cost of each block (for the balanced split)."""

    def block_bytes(self) -> list[int]:
        """Parameter bytes of each block (for the by_memory split)."""


def module_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())
