"""The engine of the pack (no ComfyUI server modules), in layers that import only downwards:

* ``engine``  — the pipeline engine: topology (cfg × pp), tensor-dict P2P and AsyncLatents
  (comm), the pass plan and the one executor every rank runs, the one encoding of nested
  values (tree), the block split, the per-rank timeline, the seed's mixin API.  No ComfyUI.
* ``comfy``   — ComfyUI-facing: staging (ComfyUI's own forward, its block loop
  intercepted), the families table, stage loading and the export of in-memory MODELs, what
  crosses to the workers (carry), ComfyUI's sampler on the last rank over the pipeline
  (runner, sampler), token patches (patch pipelining) and their CUDA graphs, model patches
  (EasyCache, context windows), the job PP KSampler builds.  Imports ``engine``.
* ``loop``    — the seed's own diffusers-scheduler loop, a thin driver of the mixin API
  (toy staged models for the engine's tests).  Imports ``engine``.
* ``workers`` — the worker group: the host side (group, registry of shared groups), the
  worker process, its control wire, health, environment; the local and Ray backends side
  by side.  Runs jobs of ``comfy`` and ``loop``.
* ``demo``    — ``python -m pp_runtime.demo``: PP KSampler's path against the stock KSampler.
"""
