"""The engine's denoising loop: the seed's loop shape, run identically on every rank.

``PPDenoiser`` is what a worker runs for a diffusers-scheduler job, and what the tests
run in one process as the reference (PP=1, CFG=1 through the same code).  Rank 0 and
the last rank draw the same initial noise from the request's seed; the last rank keeps
drawing from that generator for stochastic schedulers, exactly as one process would.
"""
from __future__ import annotations

import torch

from ..engine.comm import AsyncLatents, PipelineStopped
from ..engine.context import PPContext
from ..engine.mixin import PipelineParallelMixin
from .schedulers import make_scheduler
from ..engine.timeline import Timeline


class PPDenoiser(PipelineParallelMixin):
    def __init__(self, pp: PPContext, transformer, stage_range: tuple[int, int],
                 micro_batch_size: int = 1, batched_cfg: bool = False, should_stop=None):
        self.pp = pp
        self.transformer = transformer
        self.stage_range = tuple(stage_range)
        self.micro_batch_size = micro_batch_size
        self.batched_cfg = batched_cfg
        self._should_stop = should_stop or (lambda: False)
        self._final_step = False
        self.timeline = Timeline(pp.device, pp.topo.rank)

    def should_stop(self) -> bool:
        # Never stop after the last step: the other ranks have already left the loop.
        return not self._final_step and self._should_stop()

    def denoise(self, *, latent_shape, positive: dict, negative: dict | None, steps: int, seed: int,
                scheduler: str = "flow_euler", guidance_scale: float = 1.0, cfg: bool = True,
                cfg_normalize: bool = False, output_slice: int | None = None, on_step=None):
        """Run the loop.  Returns the final latents on last ranks (and rank 0), else None.

        Raises ``PipelineStopped`` on every rank if the last rank stopped early.
        """
        topo, device = self.pp.topo, self.pp.device
        sched = make_scheduler(scheduler, steps)
        do_true_cfg = bool(cfg) and guidance_scale != 1.0  # known to every rank from the job
        if do_true_cfg and topo.is_first and negative is None:
            raise ValueError("CFG needs negative conditioning on the first stage")
        self.batch_size = int(latent_shape[0])
        latents = generator = None
        if topo.is_first or topo.is_last:
            generator = torch.Generator("cpu").manual_seed(int(seed))
            noise = torch.randn(tuple(latent_shape), generator=generator, dtype=torch.float32)
            latents = (noise * getattr(sched, "init_noise_sigma", 1.0)).to(device)
        positive = {k: v.to(device) for k, v in (positive or {}).items()} if topo.is_first else None
        negative = {k: v.to(device) for k, v in (negative or {}).items()} if topo.is_first and negative else None
        timesteps = sched.timesteps
        try:
            for i, t in enumerate(timesteps):
                self.timeline.step = i
                self._final_step = i == len(timesteps) - 1
                pos = neg = None
                if topo.is_first:
                    tt = t.to(device)
                    pos = {**positive, "x": latents, "timestep": tt}
                    neg = {**negative, "x": latents, "timestep": tt} if do_true_cfg else None
                noise_pred = self.predict_noise_maybe_with_cfg(do_true_cfg, guidance_scale, pos, neg,
                                                               cfg_normalize=cfg_normalize,
                                                               output_slice=output_slice)
                latents = self.scheduler_step_maybe_with_cfg(noise_pred, t, latents, do_true_cfg,
                                                             per_request_scheduler=sched, generator=generator)
                if on_step is not None:
                    on_step(i, len(timesteps), latents if topo.is_last else None)
            if isinstance(latents, AsyncLatents):
                latents = latents.wait()
            return latents.clone() if latents is not None else None
        except PipelineStopped:
            raise
        finally:
            if self.pp.p2p is not None:
                self.pp.p2p.flush()
