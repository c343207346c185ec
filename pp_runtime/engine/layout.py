"""The layout of a worker group (cfg x pp x sp) from the user's choices; the error of bad input.

``choose_layout`` turns the CFG mode and a sequence-parallel degree into the topology;
``auto_layout`` picks the degrees itself: among the layouts whose stages fit the devices'
memory it takes the one the cost model says is fastest (``step_cost``), and says why.
"""
from __future__ import annotations

from .topology import Topology


CFG_MODES = ("auto", "sequential", "cfg_parallel", "batched", "off")
SP_DEGREES = (1, 2, 4, 8)
EXCHANGES = ("auto", "all_gather_kv", "ulysses")  # sequence parallelism's attention exchange

# The cost model's efficiencies: speed-up over one GPU / degree.  Sequence parallelism: peers'
# measured exact SP on Flux.1-dev / HunyuanVideo (xDiT Ulysses-2 1.53-1.60x, ParaAttention ring-2
# 1.67x, raylight USP-2 1.76x; 4 GPUs ~3.2x); CFG-parallel 2: this pack's 1.85-1.96x on 2 H100.
SP_EFFICIENCY = {1: 1.0, 2: 0.82, 4: 0.75, 8: 0.65}
CFG_EFFICIENCY = 0.95


class JobError(ValueError):
    """Bad input, found before any GPU work."""


def choose_layout(world: int, cfg_mode: str, do_cfg: bool, sp: int = 1) -> Topology:
    """The topology (cfg x pp x sp) of a group of ``world`` processes for a CFG mode and a
    sequence-parallel degree (built once per job; ``dict(topo.degrees)`` is the job's
    ``layout``).

    ``auto`` takes CFG-parallel only when 4+ devices are left beside the SP degree (PP2 x CFG2
    and up), so that on two devices the model is still split in two; ``cfg_parallel`` asks
    for it outright.
    """
    if cfg_mode not in CFG_MODES:
        raise JobError(f"cfg mode '{cfg_mode}' is unknown; use one of {', '.join(CFG_MODES)}")
    if sp < 1 or world % sp:
        raise JobError(f"sequence_parallel {sp} does not divide the group's {world} devices: use a divisor of "
                       f"{world} (1 turns sequence parallelism off)")
    rest = world // sp
    want_parallel = do_cfg and (cfg_mode == "cfg_parallel" or (cfg_mode == "auto" and rest >= 4 and rest % 2 == 0))
    if cfg_mode == "cfg_parallel" and rest % 2:
        shards = f" and sequence_parallel {sp} (cfg_parallel needs an even count of devices per shard)" if sp > 1 else ""
        raise JobError(f"cfg_parallel needs an even number of devices, the group has {world}{shards}; add or "
                       f"remove a device{', change sequence_parallel' if sp > 1 else ''}, or use cfg mode 'sequential'")
    try:
        return Topology.build(world, cfg=2 if want_parallel else 1, sp=sp)
    except ValueError as e:
        raise JobError(str(e)) from e


def step_cost(cfg: int, pp: int, sp: int, branches: int, batched: bool = False) -> float:
    """A step's time relative to one GPU's (a branch's pass = 1), exact layouts: each pipeline
    pushes its branches through ``pp`` stages as micro-batches (one of both with ``batched``):
    M + pp - 1 slots of a stage's share; its shards split each slot ``sp`` ways; CFG pipelines
    run side by side."""
    rows = max(1, branches // cfg)
    m, size = (1, rows) if batched else (rows, 1)
    t = (m + pp - 1) * size / pp / (sp * SP_EFFICIENCY.get(sp, 0.6))
    return t / CFG_EFFICIENCY if cfg > 1 else t


def auto_layout(world: int, cfg_mode: str, do_cfg: bool, stage_bytes, capacity: int | None,
                sp_refused: str | None) -> tuple[Topology, str]:
    """The fastest layout that fits, and why.  ``stage_bytes(pp)``: bytes the largest stage of
    a ``pp``-stage split holds (weights and activations); ``capacity``: bytes a device may use
    (None: unknown, every layout fits); ``sp_refused``: why this model cannot run sequence
    parallelism (None: it can)."""
    if cfg_mode not in CFG_MODES:
        raise JobError(f"cfg mode '{cfg_mode}' is unknown; use one of {', '.join(CFG_MODES)}")
    branches = 2 if do_cfg else 1
    cfgs = [1]
    if do_cfg and cfg_mode in ("auto", "cfg_parallel"):
        cfgs = [2] if cfg_mode == "cfg_parallel" else [1, 2]
    candidates, too_big = [], []
    for cfg in cfgs:
        for sp in (d for d in range(1, world + 1) if world % (d * cfg) == 0):
            if sp > 1 and (sp_refused or sp not in SP_DEGREES):
                continue
            pp = world // (cfg * sp)
            need = stage_bytes(pp)
            if capacity is not None and need > capacity:
                too_big.append((cfg, pp, sp, need))
                continue
            candidates.append((step_cost(cfg, pp, sp, branches, cfg_mode == "batched"), sp, cfg, pp))
    if not candidates:
        if too_big:
            cfg, pp, sp, need = min(too_big, key=lambda c: c[3])
            raise JobError(f"the model does not fit these {world} devices in any layout: even split in {pp} stages "
                           f"a stage needs {need / 2**30:.1f} GiB, a device has {capacity / 2**30:.1f} GiB; add "
                           f"devices, use a smaller weight dtype, or raise memory_cap_gb")
        raise JobError(f"no layout of {world} devices fits cfg mode '{cfg_mode}'")
    cost, sp, cfg, pp = min(candidates)
    topo = Topology.build(world, pp=pp, cfg=cfg, sp=sp)
    why = [f"estimated {1 / cost:.2f}x one GPU, the fastest of {len(candidates)} layouts that fit"]
    if sp == 1 and sp_refused and world > 1:
        why.append(f"no sequence parallelism: {sp_refused.split(':')[0]}")
    if pp > 1:
        fits_one = capacity is None or stage_bytes(1) <= capacity
        why.append("the model is split in stages" + ("" if fits_one else " because it does not fit one GPU"))
    if cfg > 1:
        why.append("one CFG branch per pipeline")
    if capacity is not None:
        why.append(f"largest stage {stage_bytes(pp) / 2**30:.1f} of {capacity / 2**30:.1f} GiB")
    return topo, f"{topo.name}: " + "; ".join(why)
