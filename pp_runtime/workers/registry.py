"""The worker groups shared across prompts and nodes: one per devices and backend.

The backend factory: the local backend (``group.WorkerGroup``) or the Ray backend
(``ray_backend.RayWorkerGroup``, Ray imported only when used), side by side.
"""
from __future__ import annotations

import atexit

from .group import WorkerGroup, parse_devices




# -- groups shared across prompts and nodes ---------------------------------------------
_SHARED: dict[tuple, WorkerGroup] = {}


def shared_group(devices, extra_paths=(), backend: str = "local", ray_address: str = "") -> WorkerGroup:
    """The one group for these devices on this backend (started on first use, kept across
    prompts).  ``backend='ray'``: actors on the Ray cluster at ``ray_address`` (needs Ray)."""
    backend = (backend or "local").strip().lower()
    if backend == "local":
        key = ("local", tuple(parse_devices(devices)))
        make = lambda: WorkerGroup(list(key[1]), extra_paths=extra_paths)  # noqa: E731
    elif backend == "ray":
        from .ray_backend import RayWorkerGroup, normalize_address, parse_ray_devices
        key = ("ray", normalize_address(ray_address), parse_ray_devices(devices))
        make = lambda: RayWorkerGroup(devices, ray_address=ray_address, extra_paths=extra_paths)  # noqa: E731
    else:
        raise ValueError(f"backend '{backend}' is unknown; use 'local' or 'ray'")
    group = _SHARED.get(key)
    if group is None or group.state == "stopped":
        group = _SHARED[key] = make()
    return group


def shared_groups() -> list[WorkerGroup]:
    return list(_SHARED.values())


def shutdown_all() -> None:
    for g in _SHARED.values():
        try:
            g.shutdown()
        except Exception:  # at exit a backend's runtime (Ray) may already be gone
            pass


atexit.register(shutdown_all)
