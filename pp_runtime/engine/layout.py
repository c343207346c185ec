"""The CFG mode -> the layout (pp x cfg) of a worker group; the error of bad input.
"""
from __future__ import annotations



from .topology import Topology


CFG_MODES = ("auto", "sequential", "cfg_parallel", "batched", "off")


class JobError(ValueError):
    """Bad input, found before any GPU work."""


def choose_layout(world: int, cfg_mode: str, do_cfg: bool) -> Topology:
    """The topology (pp x cfg) of a group of ``world`` processes for a CFG mode (built once
    per job; ``dict(topo.degrees)`` is the job's ``layout``).

    ``auto`` takes CFG-parallel only with 4+ devices (PP2 x CFG2 and up), so that on two
    devices the model is still split in two; ``cfg_parallel`` asks for it outright.
    """
    if cfg_mode not in CFG_MODES:
        raise JobError(f"cfg mode '{cfg_mode}' is unknown; use one of {', '.join(CFG_MODES)}")
    want_parallel = do_cfg and (cfg_mode == "cfg_parallel" or (cfg_mode == "auto" and world >= 4 and world % 2 == 0))
    if cfg_mode == "cfg_parallel" and world % 2:
        raise JobError(f"cfg_parallel needs an even number of devices, the group has {world}; "
                       f"add or remove a device, or use cfg mode 'sequential'")
    try:
        return Topology.build(world, cfg=2 if want_parallel else 1)
    except ValueError as e:
        raise JobError(str(e)) from e
