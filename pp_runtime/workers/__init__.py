"""The worker group and where it runs.

* local (default): one process per device on this machine — ``group.WorkerGroup``.
* ray: one actor per device on a Ray cluster — ``ray_backend.RayWorkerGroup`` (Ray is an
  optional dependency, imported only when this backend is used).
* ``registry.shared_group`` picks the backend and keeps one group per devices across prompts.

Both run the same ``worker.Worker`` loop; the host side shares ``WorkerGroup``'s job loop,
streaming, interrupt and failure handling.
"""
