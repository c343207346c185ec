"""The process groups of one topology, created once and cached per layout.

``PPContext`` is the communication object a rank hands to the mixins: its topology,
the tensor-dict channels between pipeline neighbours, and the CFG groups (device and
CPU).  All ranks must create contexts for the same layouts in the same order
(``torch.distributed.new_group`` is collective), which the worker guarantees by
running the same job on every rank.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .comm import TensorDictP2P
from .topology import Topology

_CONTEXTS: dict[tuple, "PPContext"] = {}
_SHARED: dict[str, object] = {}


class PPContext:
    def __init__(self, topo: Topology, device: torch.device, p2p, cfg_group=None, cfg_cpu_group=None):
        self.topo = topo
        self.device = device
        self.p2p = p2p
        self.cfg_group = cfg_group
        self.cfg_cpu_group = cfg_cpu_group

    @classmethod
    def single(cls, device="cpu") -> "PPContext":
        """A one-process context (PP=1, CFG=1) with no torch.distributed at all."""
        return cls(Topology.build(1), torch.device(device), p2p=None)

    @classmethod
    def for_layout(cls, pp: int, cfg: int, device: torch.device) -> "PPContext":
        """Collective on the default group: every rank calls it with the same layout."""
        key = (pp, cfg)
        if key not in _CONTEXTS:
            world, rank = dist.get_world_size(), dist.get_rank()
            topo = Topology.build(world, pp=pp, cfg=cfg, rank=rank)
            if "header" not in _SHARED:  # two CPU groups for P2P metadata, shared by every layout
                _SHARED["header"] = dist.new_group(backend="gloo")
                _SHARED["schema"] = dist.new_group(backend="gloo")
            p2p = TensorDictP2P(device, dist.group.WORLD, _SHARED["header"], _SHARED["schema"])
            cfg_group = cfg_cpu = None
            for ranks in topo.all_groups("cfg"):
                g = dist.new_group(ranks) if cfg > 1 else None
                c = dist.new_group(ranks, backend="gloo") if cfg > 1 else None
                if rank in ranks:
                    cfg_group, cfg_cpu = g, c
            _CONTEXTS[key] = cls(topo, device, p2p, cfg_group, cfg_cpu)
            _CONTEXTS[key].warm_up()
        return _CONTEXTS[key]

    def warm_up(self) -> None:
        """Set up every link of this layout now, not inside the first step."""
        topo, p2p = self.topo, self.p2p
        probe = {"probe": torch.zeros(1, device=self.device)}
        if topo.next_rank is not None:
            p2p.isend_tensor_dict(probe, topo.next_rank)
        if topo.prev_rank is not None:
            p2p.irecv_tensor_dict(topo.prev_rank).wait()
        if topo.pp_size > 1 and topo.is_last:  # the pass channel: last rank -> every other stage
            for r in topo.pp_ranks[:-1]:
                p2p.isend_tensor_dict(probe, r)
        if topo.pp_size > 1 and not topo.is_last:
            p2p.irecv_tensor_dict(topo.last_rank).wait()
        p2p.flush()
        if self.cfg_group is not None:
            dist.all_reduce(torch.zeros(1, device=self.device), group=self.cfg_group)
            dist.all_reduce(torch.zeros(1), group=self.cfg_cpu_group)
