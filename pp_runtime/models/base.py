"""The contract between the engine and a model family.

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


class ComfyAdapter:
    """What an adapter over a ComfyUI model adds: which weights each stage holds.

    ``EMBED`` and ``HEAD`` name the model's top-level submodules run by ``embed`` and
    ``head``; ``block_prefix(i)`` names block i's.  A stage loads only the weights under
    its prefixes, and ``unplaced`` proves every weight of the model has a stage.
    """
    EMBED: tuple[str, ...] = ()
    HEAD: tuple[str, ...] = ()

    def block_prefix(self, i: int) -> str:
        raise NotImplementedError

    def stage_prefixes(self, start: int, end: int, first: bool, last: bool) -> list[str]:
        out = [self.block_prefix(i) for i in range(start, end)]
        if first:
            out += [f"{name}." for name in self.EMBED]
        if last:
            out += [f"{name}." for name in self.HEAD]
        return out

    def unplaced(self) -> list[str]:
        """Weight names no stage would load (must be empty)."""
        prefixes = self.stage_prefixes(0, self.num_blocks, True, True)
        names = [n for n, _ in self.model.named_parameters()] + [n for n, _ in self.model.named_buffers()]
        return [n for n in names if not n.startswith(tuple(prefixes))]


def module_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())
