"""The per-step plan, kept as data.

A step is a list of micro-batches (which CFG branch, which batch items) pushed through
S stages in order.  Every rank derives the same plan from the same few numbers, so it
can be printed, tested, simulated and drawn without running a model.  ``actions(stage)``
is what one rank executes; ``schedule()`` is the ideal timeline (unit time per stage
and micro-batch) used for the M*S/(M+S-1) bound and the web panel.
"""
from __future__ import annotations

from dataclasses import dataclass

BRANCHES = ("cond", "uncond")


@dataclass(frozen=True)
class MicroBatch:
    index: int
    branches: tuple[str, ...]  # ("cond",), ("uncond",) or ("cond", "uncond") for batched CFG
    items: tuple[int, int]  # batch slice [start, stop)

    @property
    def label(self) -> str:
        name = "+".join(self.branches)
        return f"{name}[{self.items[0]}:{self.items[1]}]"


@dataclass(frozen=True)
class StepPlan:
    stages: int
    micro_batches: tuple[MicroBatch, ...]

    @property
    def num_micro_batches(self) -> int:
        return len(self.micro_batches)

    def actions(self, stage: int) -> list[tuple[str, int]]:
        """What rank ``stage`` of a pipeline does, in order: recv / forward / send."""
        out = []
        for mb in self.micro_batches:
            if stage > 0:
                out.append(("recv", mb.index))
            out.append(("forward", mb.index))
            if stage < self.stages - 1:
                out.append(("send", mb.index))
        return out

    def schedule(self) -> list[tuple[int, int, int]]:
        """(time slot, stage, micro-batch) with unit cost per stage: the pipeline fill."""
        return [(m + s, s, m) for m in range(self.num_micro_batches) for s in range(self.stages)]

    @property
    def ideal_speedup(self) -> float:
        """Step speedup over one device when the pipeline drains every step."""
        m, s = self.num_micro_batches, self.stages
        return m * s / (m + s - 1)

    def __str__(self) -> str:
        slots = max(t for t, _, _ in self.schedule()) + 1
        grid = [["." * 12 for _ in range(slots)] for _ in range(self.stages)]
        for t, s, m in self.schedule():
            grid[s][t] = f"{self.micro_batches[m].label:<12}"[:12]
        rows = [f"stage {s}: " + " ".join(row) for s, row in enumerate(grid)]
        return "\n".join([f"{self.num_micro_batches} micro-batches x {self.stages} stages, "
                          f"ideal speedup {self.ideal_speedup:.2f}x"] + rows)


def make_plan(stages: int, batch: int, branches: tuple[str, ...] = ("cond",),
              micro_batch_size: int = 1, batched_cfg: bool = False) -> StepPlan:
    """Micro-batches for one step: every batch chunk of every branch, cond first.

    ``branches`` is ("cond",) without CFG or in a CFG-parallel pipeline that runs one
    branch, ("cond", "uncond") for sequential CFG.  ``batched_cfg`` runs both branches
    of a chunk as one micro-batch (cond and uncond concatenated, as ComfyUI batches).
    """
    if batch < 1 or micro_batch_size < 1:
        raise ValueError(f"batch ({batch}) and micro_batch_size ({micro_batch_size}) must be >= 1")
    chunks = [(i, min(i + micro_batch_size, batch)) for i in range(0, batch, micro_batch_size)]
    groups = [tuple(branches)] if batched_cfg else [(b,) for b in branches]
    mbs = [MicroBatch(0, g, c) for g in groups for c in chunks]
    return StepPlan(stages, tuple(MicroBatch(i, mb.branches, mb.items) for i, mb in enumerate(mbs)))
