"""The pass plan: what one model call does on every rank, kept as data.

A *pass* is one call of the model (one ComfyUI ``apply_model``, one step of the seed's
loop per branch group).  Its inputs have rows (batch items of the cond and uncond
branches, in the caller's order); the plan cuts them into *units*, each one micro-batch
pushed through every stage of one pipeline: which rows, which CFG branch each row is,
which pipeline (CFG group rank) computes it, which token patch (patch pipelining).  Every
rank of a pipeline executes its units in plan order (``engine.executor``): rank 0 from the
inputs, the others from the hidden state their predecessor sends; the last rank keeps the
outputs, and with a CFG group of several pipelines the last ranks exchange them so each
holds the whole pass's output.

The plan is built once per pass where the model call is made (the last rank, from what
ComfyUI's guider asks) and travels to the other ranks with the inputs (``to_data`` /
``from_data``: plain JSON-able data).  Sequential CFG, CFG-parallel, batched CFG,
batch micro-batches and patch pipelining are plans, not branches of rank code.
``actions`` is what one rank does, ``schedule`` the ideal timeline (unit cost per stage
and unit) behind the M·S/(M+S−1) bound and the web panel.
"""
from __future__ import annotations

from dataclasses import dataclass

BRANCH_NAMES = {0: "cond", 1: "uncond"}
# Patch modes of a pass: exact (no token patches), exact filling the patch caches for the
# next pass, or M patches (``Unit.patches`` > 1).
EXACT, FILL = 0, -1


@dataclass(frozen=True)
class Unit:
    index: int  # order of the unit in its pipeline's part of the pass (the panel's micro-batch)
    pipeline: int  # CFG group rank of the pipeline that computes it
    micro_batch: int  # which micro-batch (rows) of that pipeline; its patches share it
    rows: tuple[int, ...]  # rows of the pass's inputs, consecutive within the pipeline's rows
    branch: tuple[int, ...]  # CFG branch of each row: cond (0), uncond (1)
    patch: int = -1  # token patch of the micro-batch, -1: its whole sequence
    patches: int = EXACT  # M (> 1) patches per micro-batch, EXACT, or FILL
    shards: int = 1  # sequence parallelism: the unit's tokens cut in this many shards, one per SP
    #                  rank of each stage (shard r on SP rank r; its self-attention sees every shard)

    @property
    def branch_name(self) -> str:
        return "+".join(BRANCH_NAMES.get(b, str(b)) for b in sorted(set(self.branch)))

    @property
    def last_patch(self) -> bool:
        return self.patches <= 1 or self.patch == self.patches - 1

    @property
    def label(self) -> str:
        label = f"{self.branch_name}[{self.micro_batch}]"
        return label + (f" p{self.patch + 1}/{self.patches}" if self.patches > 1 else "")

    def entry(self) -> dict:
        """What a timeline span of this unit carries (the panel draws from it)."""
        return {"mb": self.index, "micro_batch": self.micro_batch, "branch": self.branch_name,
                "pipeline": self.pipeline, "patch": self.patch + 1 if self.patches > 1 else None,
                "patches": self.patches if self.patches > 1 else None,
                "shards": self.shards if self.shards > 1 else None}


@dataclass(frozen=True)
class PassPlan:
    stages: int  # pipeline stages (pp degree)
    pipelines: int  # CFG group size (cfg degree)
    rows: int  # rows of the pass's inputs
    units: tuple[Unit, ...]

    def for_pipeline(self, pipeline: int) -> tuple[Unit, ...]:
        return tuple(u for u in self.units if u.pipeline == pipeline)

    def rows_of(self, pipeline: int) -> list[int]:
        """The pass rows a pipeline computes, in its order (each micro-batch's once)."""
        seen: dict[int, None] = {}
        for u in self.for_pipeline(pipeline):
            seen.update(dict.fromkeys(u.rows))
        return list(seen)

    @property
    def patch_mode(self) -> int:
        return self.units[0].patches if self.units else EXACT

    @property
    def gathers(self) -> bool:
        """Do the last ranks exchange their outputs (several pipelines)?"""
        return self.pipelines > 1

    def actions(self, stage: int, pipeline: int = 0) -> list[tuple[str, int]]:
        """What rank ``stage`` of ``pipeline`` does, in order: recv / forward / send of its
        units (by ``index``); the last stage ends with a gather across pipelines."""
        out = []
        for u in self.for_pipeline(pipeline):
            if stage > 0:
                out.append(("recv", u.index))
            out.append(("forward", u.index))
            if stage < self.stages - 1:
                out.append(("send", u.index))
        if stage == self.stages - 1 and self.gathers:
            out.append(("gather", -1))
        return out

    def schedule(self, pipeline: int = 0) -> list[tuple[int, int, int]]:
        """(time slot, stage, unit) with unit cost per stage: the pipeline fill."""
        units = self.for_pipeline(pipeline)
        return [(m + s, s, m) for m in range(len(units)) for s in range(self.stages)]

    @property
    def ideal_speedup(self) -> float:
        """Step speedup over one device when the pipeline drains every pass."""
        m, s = len(self.for_pipeline(0)), self.stages
        return m * s / (m + s - 1) if m else 1.0

    def __str__(self) -> str:
        units = self.for_pipeline(0)
        slots = max((t for t, _, _ in self.schedule()), default=-1) + 1
        grid = [["." * 12 for _ in range(slots)] for _ in range(self.stages)]
        for t, s, m in self.schedule():
            grid[s][t] = f"{units[m].label:<12}"[:12]
        rows = [f"stage {s}: " + " ".join(row) for s, row in enumerate(grid)]
        return "\n".join([f"{len(units)} units x {self.stages} stages, "
                          f"ideal speedup {self.ideal_speedup:.2f}x"] + rows)

    # -- as data -------------------------------------------------------------------------
    def to_data(self) -> dict:
        return {"stages": self.stages, "pipelines": self.pipelines, "rows": self.rows,
                "units": [[u.index, u.pipeline, u.micro_batch, list(u.rows), list(u.branch), u.patch, u.patches,
                           u.shards] for u in self.units]}

    @classmethod
    def from_data(cls, data: dict) -> "PassPlan":
        units = tuple(Unit(i, c, m, tuple(r), tuple(b), p, n, s) for i, c, m, r, b, p, n, s in data["units"])
        return cls(int(data["stages"]), int(data["pipelines"]), int(data["rows"]), units)


def plan_pass(branch: list[int] | tuple[int, ...], *, stages: int, pipelines: int = 1,
              micro_batch_size: int = 1, patches: int = EXACT, order: list[int] | None = None,
              shards: int = 1) -> PassPlan:
    """The plan of a pass whose rows have the CFG branches ``branch`` (in row order).

    With one pipeline every row is its; with a CFG group of two, pipeline ``c`` computes
    the rows of branch ``c``.  A pipeline's rows are cut, in order (``order``: another
    order of the rows, e.g. items first for batched CFG), into micro-batches of
    ``micro_batch_size`` rows; with ``patches`` M > 1 each micro-batch is M units, one per
    token patch.  ``shards`` > 1: every unit runs on each SP rank of a stage, on its shard.
    """
    if shards > 1 and patches > 1:
        raise ValueError("sequence parallelism and patch pipelining do not combine: use one of them")
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if pipelines not in (1, 2):
        raise ValueError(f"a CFG group of {pipelines} is not supported; use 1 or 2")
    rows = list(order) if order is not None else list(range(len(branch)))
    units = []
    for c in range(pipelines):
        mine = [r for r in rows if pipelines == 1 or branch[r] == c]
        index = 0
        for m, a in enumerate(range(0, len(mine), micro_batch_size)):
            chunk = tuple(mine[a:a + micro_batch_size])
            for p in (range(patches) if patches > 1 else (-1,)):
                units.append(Unit(index, c, m, chunk, tuple(branch[r] for r in chunk), p, patches, shards))
                index += 1
    return PassPlan(stages, pipelines, len(branch), tuple(units))
