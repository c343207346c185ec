"""Process topology: the world as a mesh of parallel degrees.

One object per process derives everything from the degrees, in a fixed order
(outermost first): ``("cfg", "pp")``.  Ranks along the innermost dimension are
contiguous, so a pipeline is a run of consecutive ranks and a CFG group links the
same stage of different pipelines.  More dimensions can be added to ``ORDER``
without touching callers: they ask for ``group_ranks(dim)``, never compute ranks.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

ORDER = ("cfg", "pp")  # outermost -> innermost


class TopologyError(ValueError):
    pass


@dataclass(frozen=True)
class Topology:
    degrees: dict = field(hash=False)
    rank: int = 0

    @classmethod
    def build(cls, world_size: int, pp: int | None = None, cfg: int = 1, rank: int = 0) -> "Topology":
        if cfg < 1:
            raise TopologyError(f"cfg degree must be >= 1, got {cfg}")
        if pp is None:
            if world_size % cfg:
                raise TopologyError(
                    f"CFG-parallel needs the number of devices ({world_size}) to be a multiple of {cfg}; "
                    f"use an even number of devices or another CFG mode")
            pp = world_size // cfg
        if pp < 1 or pp * cfg != world_size:
            raise TopologyError(f"pp {pp} x cfg {cfg} = {pp * cfg} processes, but the group has {world_size}")
        if not 0 <= rank < world_size:
            raise TopologyError(f"rank {rank} outside a world of {world_size}")
        return cls({"cfg": cfg, "pp": pp}, rank)

    # -- mesh arithmetic: the only place where ranks are computed -----------------
    @property
    def world_size(self) -> int:
        return math.prod(self.degrees[d] for d in ORDER)

    def _strides(self) -> dict:
        strides, s = {}, 1
        for d in reversed(ORDER):
            strides[d] = s
            s *= self.degrees[d]
        return strides

    def coords_of(self, rank: int) -> dict:
        st = self._strides()
        return {d: (rank // st[d]) % self.degrees[d] for d in ORDER}

    def rank_of(self, coords: dict) -> int:
        st = self._strides()
        return sum(coords[d] * st[d] for d in ORDER)

    def all_groups(self, dim: str) -> list[list[int]]:
        """Every group along ``dim`` (in a fixed order: all ranks must create them alike)."""
        others = [d for d in ORDER if d != dim]
        groups = []
        for fixed in itertools.product(*(range(self.degrees[d]) for d in others)):
            base = dict(zip(others, fixed))
            groups.append([self.rank_of({**base, dim: i}) for i in range(self.degrees[dim])])
        return groups

    def group_ranks(self, dim: str, rank: int | None = None) -> list[int]:
        rank = self.rank if rank is None else rank
        return next(g for g in self.all_groups(dim) if rank in g)

    # -- what a rank asks ---------------------------------------------------------
    @property
    def coords(self) -> dict:
        return self.coords_of(self.rank)

    @property
    def pp_size(self) -> int:
        return self.degrees["pp"]

    @property
    def cfg_size(self) -> int:
        return self.degrees["cfg"]

    @property
    def pp_rank(self) -> int:
        return self.coords["pp"]

    @property
    def cfg_rank(self) -> int:
        return self.coords["cfg"]

    @property
    def is_first(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def pp_ranks(self) -> list[int]:
        return self.group_ranks("pp")

    @property
    def cfg_ranks(self) -> list[int]:
        return self.group_ranks("cfg")

    @property
    def first_rank(self) -> int:
        return self.pp_ranks[0]

    @property
    def last_rank(self) -> int:
        return self.pp_ranks[-1]

    @property
    def prev_rank(self) -> int | None:
        return None if self.is_first else self.pp_ranks[self.pp_rank - 1]

    @property
    def next_rank(self) -> int | None:
        return None if self.is_last else self.pp_ranks[self.pp_rank + 1]

    @property
    def is_output_rank(self) -> bool:
        """The one rank that reports results to the host: last stage of CFG pipeline 0."""
        return self.is_last and self.cfg_rank == 0
