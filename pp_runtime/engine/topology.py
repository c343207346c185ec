"""Process topology: the world as a mesh of parallel degrees.

One object per process derives everything from the degrees, in a fixed order
(outermost first): ``("cfg", "pp", "sp")``.  Ranks along the innermost dimension are
contiguous: the sequence-parallel (SP) ranks of one stage are neighbours, a pipeline is
the ranks of one CFG index, a CFG group links the same stage and shard of different
pipelines.  A pipeline with SP is ``sp`` lanes: each lane's stage ``s`` sends its shard of
the hidden state to the lane's stage ``s+1``; the last stage's shards meet on the
pipeline's *driver* (last stage, shard 0), the rank that runs ComfyUI's sampler.  Callers
ask for ``group_ranks(dim)``, never compute ranks.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

ORDER = ("cfg", "pp", "sp")  # outermost -> innermost


class TopologyError(ValueError):
    pass


@dataclass(frozen=True)
class Topology:
    degrees: dict = field(hash=False)
    rank: int = 0

    @classmethod
    def build(cls, world_size: int, pp: int | None = None, cfg: int = 1, rank: int = 0, sp: int = 1) -> "Topology":
        if cfg < 1 or sp < 1:
            raise TopologyError(f"cfg and sp degrees must be >= 1, got cfg {cfg}, sp {sp}")
        if pp is None:
            if world_size % (cfg * sp):
                raise TopologyError(
                    f"the number of devices ({world_size}) is not a multiple of {cfg * sp} (cfg {cfg} x sequence "
                    f"parallel {sp}); use a multiple of {cfg * sp} devices, or change the CFG mode or the layout")
            pp = world_size // (cfg * sp)
        if pp < 1 or pp * cfg * sp != world_size:
            shards = f" x sp {sp}" if sp > 1 else ""
            raise TopologyError(f"pp {pp} x cfg {cfg}{shards} = {pp * cfg * sp} processes, "
                                f"but the group has {world_size}")
        if not 0 <= rank < world_size:
            raise TopologyError(f"rank {rank} outside a world of {world_size}")
        return cls({"cfg": cfg, "pp": pp, "sp": sp}, rank)

    @classmethod
    def of_layout(cls, world_size: int, layout: dict, rank: int = 0) -> "Topology":
        """The topology of a job's ``layout`` (``dict(topo.degrees)``)."""
        return cls.build(world_size, pp=layout["pp"], cfg=layout.get("cfg", 1), rank=rank, sp=layout.get("sp", 1))

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

    @property
    def name(self) -> str:
        """The layout in words: its degrees above 1 (``cfg2 x pp2 x sp2``; one device: ``pp1``)."""
        return " x ".join(f"{d}{self.degrees[d]}" for d in ORDER if self.degrees[d] > 1) or "pp1"

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
    def sp_size(self) -> int:
        return self.degrees["sp"]

    @property
    def sp_rank(self) -> int:
        return self.coords["sp"]

    @property
    def sp_ranks(self) -> list[int]:
        return self.group_ranks("sp")

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
        """The last stage of this rank's lane (the rank its lane's hidden state ends on)."""
        return self.pp_ranks[-1]

    @property
    def driver_rank(self) -> int:
        """This pipeline's driver: last stage, shard 0 (it runs ComfyUI's sampler and makes
        every pass; the shards of the last stage meet there)."""
        return self.rank_of({**self.coords, "pp": self.pp_size - 1, "sp": 0})

    @property
    def is_driver(self) -> bool:
        return self.rank == self.driver_rank

    @property
    def pipeline_ranks(self) -> list[int]:
        """Every rank of this rank's pipeline (one CFG index): its stages x shards."""
        return [r for r in range(self.world_size) if self.coords_of(r)["cfg"] == self.cfg_rank]

    @property
    def pass_ranks(self) -> list[int]:
        """The ranks the driver sends each pass to: its pipeline but itself."""
        return [r for r in self.pipeline_ranks if r != self.driver_rank]

    @property
    def prev_rank(self) -> int | None:
        return None if self.is_first else self.pp_ranks[self.pp_rank - 1]

    @property
    def next_rank(self) -> int | None:
        return None if self.is_last else self.pp_ranks[self.pp_rank + 1]

    @property
    def is_output_rank(self) -> bool:
        """The one rank that reports results to the host: the driver of CFG pipeline 0."""
        return self.is_driver and self.cfg_rank == 0
