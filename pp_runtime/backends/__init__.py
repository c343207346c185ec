"""Where the worker group runs.

* local (default): one process per device on this machine — ``pp_runtime.group.WorkerGroup``.
* ray: one actor per device on a Ray cluster — ``ray_backend.RayWorkerGroup`` (Ray is an
  optional dependency, imported only when this backend is used).

Both run the same ``pp_runtime.worker.Worker`` loop; the host side shares ``WorkerGroup``'s
job loop, streaming, interrupt and failure handling.
"""
