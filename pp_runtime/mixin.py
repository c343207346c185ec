"""vLLM-Omni's pipeline-parallel denoising semantics.

All ranks run the whole denoising loop.  Per step, micro-batches (CFG branches, batch
chunks) flow rank 0 -> ... -> last as tensor dicts; the last rank owns the output head,
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
import torch.distributed as dist

from .comm import AsyncLatents, PipelineStopped
from .plan import StepPlan, make_plan
from .timeline import Timeline


class CFGParallelMixin:
    """Which CFG branches this pipeline runs, the gather across the CFG group, the combine."""

    def cfg_branches(self, do_true_cfg: bool) -> tuple[str, ...]:
        topo = self.pp.topo
        if not do_true_cfg:
            return ("cond",)
        if topo.cfg_size == 1:
            return ("cond", "uncond")
        if topo.cfg_size == 2:
            return (("cond", "uncond")[topo.cfg_rank],)
        raise ValueError(f"a CFG group of {topo.cfg_size} is not supported; use 1 or 2")

    def gather_cfg_branches(self, local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Last ranks of a CFG-parallel layout: (cond, uncond) everywhere, identical."""
        self.pp.p2p.flush()  # no P2P in flight across a collective
        parts = [torch.empty_like(local) for _ in range(self.pp.topo.cfg_size)]
        dist.all_gather(parts, local.contiguous(), group=self.pp.cfg_group)
        return parts[0], parts[1]

    @staticmethod
    def combine_cfg_noise(cond: torch.Tensor, uncond: torch.Tensor, true_cfg_scale: float,
                          cfg_normalize: bool) -> torch.Tensor:
        comb = uncond + true_cfg_scale * (cond - uncond)
        if cfg_normalize:  # Qwen-Image: keep the norm of the cond prediction
            comb = comb * (torch.linalg.vector_norm(cond, dim=-1, keepdim=True)
                           / torch.linalg.vector_norm(comb, dim=-1, keepdim=True))
        return comb


class PipelineParallelMixin(CFGParallelMixin):
    micro_batch_size: int = 1
    batched_cfg: bool = False

    def step_plan(self, do_true_cfg: bool, batch: int) -> StepPlan:
        return make_plan(self.pp.topo.pp_size, batch, self.cfg_branches(do_true_cfg),
                         self.micro_batch_size, self.batched_cfg and do_true_cfg and self.pp.topo.cfg_size == 1)

    # -- forward through the pipeline -----------------------------------------------
    def _timeline(self) -> Timeline:
        tl = getattr(self, "timeline", None)
        if tl is None:
            tl = self.timeline = Timeline(self.pp.device, self.pp.topo.rank)
        return tl

    def _stage_forward(self, state_or_inputs: dict, label: str):
        topo, model = self.pp.topo, self.transformer
        start, end = self.stage_range
        with self._timeline().span("compute", label):
            state = model.embed(**state_or_inputs) if topo.is_first else state_or_inputs
            state = model.run_blocks(start, end, state)
            return model.head(state) if topo.is_last else state

    def run_plan(self, plan: StepPlan, inputs_for) -> dict[int, torch.Tensor] | None:
        """Push every micro-batch of ``plan`` through this rank's stage.

        ``inputs_for(mb)`` gives the model inputs of a micro-batch (rank 0 only).
        Returns {micro-batch index: output} on the last rank, None elsewhere.  The receive
        of the next micro-batch is posted before this one is computed.
        """
        topo, p2p = self.pp.topo, self.pp.p2p
        outputs = {}
        mbs = plan.micro_batches
        ahead = p2p.irecv_tensor_dict(topo.prev_rank) if not topo.is_first and mbs else None
        try:
            for i, mb in enumerate(mbs):
                if topo.is_first:
                    x = inputs_for(mb)
                else:
                    with self._timeline().span("wait", mb.label):
                        x = ahead.wait()
                    ahead = p2p.irecv_tensor_dict(topo.prev_rank) if i + 1 < len(mbs) else None
                out = self._stage_forward(x, mb.label)
                if topo.is_last:
                    outputs[mb.index] = out
                else:
                    p2p.isend_tensor_dict(out, topo.next_rank)
        except PipelineStopped:
            self._forward_stop()
            raise
        return outputs if topo.is_last else None

    def _forward_stop(self) -> None:
        """Pass a STOP on down the pipeline, up to (not including) the last rank that sent it."""
        topo = self.pp.topo
        if topo.next_rank is not None and topo.next_rank != topo.last_rank:
            self.pp.p2p.isend_stop(topo.next_rank)
        if self.pp.p2p is not None:
            self.pp.p2p.flush()

    # -- the seed's two entry points -------------------------------------------------
    def predict_noise_maybe_with_cfg(self, do_true_cfg, true_cfg_scale, positive_kwargs, negative_kwargs,
                                     cfg_normalize=True, output_slice=None):
        """Noise prediction on last ranks (None elsewhere), CFG combined if ``do_true_cfg``."""
        topo = self.pp.topo
        batch = getattr(self, "batch_size", None) or self._batch_size(positive_kwargs)
        plan = self.step_plan(do_true_cfg, batch)
        kwargs = {"cond": positive_kwargs, "uncond": negative_kwargs}

        def inputs_for(mb):
            parts = [_slice_batch(kwargs[b], mb.items, batch) for b in mb.branches]
            return parts[0] if len(parts) == 1 else _concat_batch(parts)

        if topo.pp_size == 1:  # same plan, no communication
            outputs = {mb.index: self._stage_forward(inputs_for(mb), mb.label) for mb in plan.micro_batches}
        else:
            outputs = self.run_plan(plan, inputs_for)
        if not topo.is_last:
            return None

        per_branch = {}
        for mb in plan.micro_batches:
            out = outputs[mb.index]
            chunks = out.chunk(len(mb.branches)) if len(mb.branches) > 1 else (out,)
            for b, c in zip(mb.branches, chunks):
                per_branch.setdefault(b, []).append(c[:, :output_slice] if output_slice is not None else c)
        preds = {b: torch.cat(v) for b, v in per_branch.items()}
        if not do_true_cfg:
            return preds["cond"]
        if topo.cfg_size > 1:
            cond, uncond = self.gather_cfg_branches(preds[self.cfg_branches(True)[0]])
        else:
            cond, uncond = preds["cond"], preds["uncond"]
        return self.combine_cfg_noise(cond, uncond, true_cfg_scale, cfg_normalize)

    def scheduler_step_maybe_with_cfg(self, noise_pred, t, latents, do_true_cfg,
                                      per_request_scheduler=None, generator=None):
        """Last ranks step; rank 0 gets ``AsyncLatents``; middle ranks get None."""
        topo = self.pp.topo
        scheduler = per_request_scheduler if per_request_scheduler is not None else self.scheduler
        if topo.is_last:
            extra = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
            latents = scheduler.step(noise_pred, t, latents, return_dict=False, **extra)[0]
            stop = self._stop_agreed()
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

    def _stop_agreed(self) -> bool:
        """Last ranks: stop now?  Both pipelines of a CFG group decide alike."""
        stop = bool(getattr(self, "should_stop", lambda: False)())
        if self.pp.topo.cfg_size > 1:
            flag = torch.tensor([1 if stop else 0])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.pp.cfg_cpu_group)
            stop = bool(flag.item())
        return stop

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
