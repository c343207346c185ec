"""vLLM-Omni's pipeline-parallel denoising semantics.

All ranks run the whole denoising loop.  Per step, one pass of the executor
(``executor.py``, the one every rank runs for ComfyUI's sampler too): its units (CFG
branches, batch chunks, from ``plan.plan_pass``) flow rank 0 -> ... -> last as tensor dicts; the last rank owns the output head,
combines CFG and steps the scheduler, then sends the new latents back to rank 0, which
gets them as ``AsyncLatents`` and waits only when it first uses them.  Middle ranks
never hold latents.  With a CFG group of 2, each pipeline runs one branch and the last
ranks all-gather and combine identically (and step identically, same generator state).

A class using the mixins provides ``self.pp`` (a ``PPContext``), ``self.transformer``
(a ``StagedModel``), ``self.stage_range`` (start, end), ``self.batch_size`` (known to
every rank from the job; rank 0 could read it from its inputs) and optionally
``self.should_stop()`` (checked on last ranks at step boundaries) and
``self.timeline`` (a ``Timeline``).
"""
from __future__ import annotations

import inspect

import torch

from .comm import AsyncLatents, PipelineStopped
from .executor import Executor
from .plan import PassPlan, plan_pass
from .timeline import Timeline


class CFGParallelMixin:
    """Which CFG branches a pass has, the CFG combine."""

    def cfg_branches(self, do_true_cfg: bool) -> tuple[str, ...]:
        """The branches this pipeline computes (with a CFG group, one each)."""
        topo = self.pp.topo
        if not do_true_cfg:
            return ("cond",)
        if topo.cfg_size == 1:
            return ("cond", "uncond")
        if topo.cfg_size == 2:
            return (("cond", "uncond")[topo.cfg_rank],)
        raise ValueError(f"a CFG group of {topo.cfg_size} is not supported; use 1 or 2")

    @staticmethod
    def combine_cfg_noise(cond: torch.Tensor, uncond: torch.Tensor, true_cfg_scale: float,
                          cfg_normalize: bool) -> torch.Tensor:
        comb = uncond + true_cfg_scale * (cond - uncond)
        if cfg_normalize:  # Qwen-Image: keep the norm of the cond prediction
            comb = comb * (torch.linalg.vector_norm(cond, dim=-1, keepdim=True)
                           / torch.linalg.vector_norm(comb, dim=-1, keepdim=True))
        return comb


class PipelineParallelMixin(CFGParallelMixin):
    """The seed's API over the executor: each call of ``predict_noise_maybe_with_cfg`` is one
    pass whose rows are the batch items of the cond branch, then of the uncond branch."""
    micro_batch_size: int = 1
    batched_cfg: bool = False

    def pass_plan(self, do_true_cfg: bool, batch: int) -> PassPlan:
        """The plan every rank derives alike: rows 0..B-1 cond, B..2B-1 uncond; sequential CFG
        runs each branch's chunks as micro-batches (cond first), batched CFG a chunk's cond and
        uncond items as one, CFG-parallel a branch per pipeline."""
        if batch < 1 or self.micro_batch_size < 1:
            raise ValueError(f"batch ({batch}) and micro_batch_size ({self.micro_batch_size}) must be >= 1")
        topo, size = self.pp.topo, self.micro_batch_size
        branches = 2 if do_true_cfg else 1
        branch = [b for b in range(branches) for _ in range(batch)]
        order, per = None, size
        if self.batched_cfg and do_true_cfg and topo.cfg_size == 1:
            order = [b * batch + i for a in range(0, batch, size) for b in range(2)
                     for i in range(a, min(a + size, batch))]
            per = 2 * size
        # Without CFG in a CFG group, pipeline 0 computes the rows and the others get them gathered.
        return plan_pass(branch, stages=topo.pp_size, pipelines=topo.cfg_size, micro_batch_size=per, order=order)

    # -- forward through the pipeline -----------------------------------------------
    def _timeline(self) -> Timeline:
        tl = getattr(self, "timeline", None)
        if tl is None:
            tl = self.timeline = Timeline(self.pp.device, self.pp.topo.rank)
        return tl

    def _executor(self) -> Executor:
        ex = getattr(self, "_pp_executor", None)
        if ex is None or ex.timeline is not self._timeline():
            ex = self._pp_executor = Executor(self.pp, self._timeline(), self._stage_forward, last_listens=False)
        return ex

    def _stage_forward(self, unit, state):
        topo, model = self.pp.topo, self.transformer
        start, end = self.stage_range
        state = model.embed(**self._inputs_for(unit)) if topo.is_first else state
        state = model.run_blocks(start, end, state)
        return model.head(state) if topo.is_last else state

    def run_pass(self, plan: PassPlan, inputs_for):
        """One pass on this rank (``inputs_for(unit)``: the model inputs of a unit, rank 0);
        the whole pass's output on last ranks, None elsewhere."""
        self._inputs_for = inputs_for
        ex = self._executor()
        try:
            out, stopped = ex.run(plan)
        except PipelineStopped:  # rank 0: the latents it waited for were a STOP
            ex._stop_next()
            stopped = True
        if stopped:
            self.pp.p2p.flush()
            raise PipelineStopped("the last rank ended the run")
        return ex.collect(plan, out) if self.pp.topo.is_last else None

    # -- the seed's two entry points -------------------------------------------------
    def predict_noise_maybe_with_cfg(self, do_true_cfg, true_cfg_scale, positive_kwargs, negative_kwargs,
                                     cfg_normalize=True, output_slice=None):
        """Noise prediction on last ranks (None elsewhere), CFG combined if ``do_true_cfg``."""
        batch = getattr(self, "batch_size", None) or self._batch_size(positive_kwargs)
        plan = self.pass_plan(do_true_cfg, batch)
        kwargs = (positive_kwargs, negative_kwargs)

        def inputs_for(unit):
            parts, rows = [], list(unit.rows)
            while rows:  # runs of consecutive items of one branch
                b, a = divmod(rows[0], batch)
                n = 1
                while n < len(rows) and rows[n] == rows[0] + n and rows[n] // batch == b:
                    n += 1
                parts.append(_slice_batch(kwargs[b], (a, a + n), batch))
                rows = rows[n:]
            return parts[0] if len(parts) == 1 else _concat_batch(parts)

        full = self.run_pass(plan, inputs_for)
        if full is None:
            return None
        if output_slice is not None:
            full = full[:, :output_slice]
        if not do_true_cfg:
            return full
        return self.combine_cfg_noise(full[:batch], full[batch:], true_cfg_scale, cfg_normalize)

    def scheduler_step_maybe_with_cfg(self, noise_pred, t, latents, do_true_cfg,
                                      per_request_scheduler=None, generator=None):
        """Last ranks step; rank 0 gets ``AsyncLatents``; middle ranks get None."""
        topo = self.pp.topo
        scheduler = per_request_scheduler if per_request_scheduler is not None else self.scheduler
        if topo.is_last:
            extra = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
            latents = scheduler.step(noise_pred, t, latents, return_dict=False, **extra)[0]
            stop = self._executor().agree_stop(bool(getattr(self, "should_stop", lambda: False)()))
            if topo.pp_size > 1:
                if stop:
                    self.pp.p2p.isend_stop(topo.first_rank)
                else:
                    self.pp.p2p.isend_tensor_dict({"latents": latents}, topo.first_rank)
            if stop:
                raise PipelineStopped("interrupted")
            return latents
        if topo.is_first:
            return AsyncLatents(self.pp.p2p.irecv_tensor_dict(topo.last_rank))
        return None

    def _batch_size(self, kwargs: dict) -> int:
        for v in kwargs.values():
            if isinstance(v, (torch.Tensor, AsyncLatents)) and v.dim() > 0:
                return v.shape[0]
        raise ValueError("cannot tell the batch size: no batched tensor among the model inputs")


def _slice_batch(kwargs: dict, items: tuple[int, int], batch: int) -> dict:
    """Slice every batched tensor input (leading dim == batch) to the micro-batch's items."""
    a, b = items
    if (a, b) == (0, batch):
        return dict(kwargs)
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, (torch.Tensor, AsyncLatents)) and v.dim() > 0 and v.shape[0] == batch:
            v = v[a:b]
        out[k] = v
    return out


def _concat_batch(parts: list[dict]) -> dict:
    out = {}
    for k in parts[0]:
        vals = [p[k] for p in parts]
        if isinstance(vals[0], (torch.Tensor, AsyncLatents)) and vals[0].dim() > 0:
            out[k] = torch.cat([v.wait() if isinstance(v, AsyncLatents) else v for v in vals])
        else:
            out[k] = vals[0]
    return out
