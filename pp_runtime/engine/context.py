"""The process groups of one topology, created once and cached per layout.

``PPContext`` is the communication object a rank hands to the mixins: its topology,
the tensor-dict channels between pipeline neighbours, the CFG groups and the
sequence-parallel groups (device and CPU each).  All ranks must create contexts for the
same layouts in the same order (``torch.distributed.new_group`` is collective), which the
worker guarantees by running the same job on every rank.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .comm import TensorDictP2P
from .topology import Topology

_CONTEXTS: dict[tuple, "PPContext"] = {}
_SHARED: dict[str, object] = {}


def _groups(topo: Topology, dim: str, rank: int):
    """(device group, gloo CPU group) of this rank along ``dim``; (None, None) at degree 1.
    Collective: every rank creates every group of the dimension, in the same order."""
    mine = (None, None)
    if topo.degrees[dim] > 1:
        for ranks in topo.all_groups(dim):
            pair = (dist.new_group(ranks), dist.new_group(ranks, backend="gloo"))
            if rank in ranks:
                mine = pair
    return mine


class PPContext:
    def __init__(self, topo: Topology, device: torch.device, p2p, cfg_group=None, cfg_cpu_group=None,
                 sp_group=None, sp_cpu_group=None):
        self.topo = topo
        self.device = device
        self.p2p = p2p
        self.cfg_group = cfg_group
        self.cfg_cpu_group = cfg_cpu_group
        self.sp_group = sp_group  # the shards of this stage: keys/values are gathered over it
        self.sp_cpu_group = sp_cpu_group  # ... and they agree over it to stop (Cancel) at one block

    @classmethod
    def single(cls, device="cpu") -> "PPContext":
        """A one-process context (PP=1, CFG=1) with no torch.distributed at all."""
        return cls(Topology.build(1), torch.device(device), p2p=None)

    @classmethod
    def for_layout(cls, pp: int, cfg: int, device: torch.device, sp: int = 1) -> "PPContext":
        """Collective on the default group: every rank calls it with the same layout."""
        key = (pp, cfg, sp)
        if key not in _CONTEXTS:
            world, rank = dist.get_world_size(), dist.get_rank()
            topo = Topology.build(world, pp=pp, cfg=cfg, rank=rank, sp=sp)
            if "header" not in _SHARED:  # two CPU groups for P2P metadata, shared by every layout
                _SHARED["header"] = dist.new_group(backend="gloo")
                _SHARED["schema"] = dist.new_group(backend="gloo")
            p2p = TensorDictP2P(device, dist.group.WORLD, _SHARED["header"], _SHARED["schema"])
            cfg_group, cfg_cpu = _groups(topo, "cfg", rank)
            sp_group, sp_cpu = _groups(topo, "sp", rank)
            _CONTEXTS[key] = cls(topo, device, p2p, cfg_group, cfg_cpu, sp_group, sp_cpu)
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
        if topo.is_driver:  # the pass channel: driver -> every other rank of its pipeline
            for r in topo.pass_ranks:
                p2p.isend_tensor_dict(probe, r)
        else:
            p2p.irecv_tensor_dict(topo.driver_rank).wait()
        if topo.is_last and topo.sp_size > 1:  # the last stage's shards -> the driver
            if topo.is_driver:
                for r in topo.sp_ranks[1:]:
                    p2p.irecv_tensor_dict(r).wait()
            else:
                p2p.isend_tensor_dict(probe, topo.driver_rank)
        p2p.flush()
        for group, cpu in ((self.cfg_group, self.cfg_cpu_group), (self.sp_group, self.sp_cpu_group)):
            if group is not None:
                dist.all_reduce(torch.zeros(1, device=self.device), group=group)
                dist.all_reduce(torch.zeros(1), group=cpu)
