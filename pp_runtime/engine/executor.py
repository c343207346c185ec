"""The one executor: every rank runs a pass plan the same way.

For its pipeline's units, in plan order, a rank receives the hidden state from its
predecessor (rank 0: none, its stage starts from the pass's inputs), runs its stage
(``forward(unit, state)``), and sends the result on; the last rank keeps the outputs,
joins a micro-batch's token patches with ``head`` (patch pipelining), and with a CFG group
of several pipelines exchanges the outputs with the other last ranks (``gather``).  The
receive of the next unit is posted before the current one is computed.

Where the inputs come from is the caller's: ComfyUI's sampler makes the model call on
the last rank, which sends the plan and the inputs to the other stages of its pipeline
on the *pass channel* (``send_pass`` / ``serve``); the seed's mixin API has the inputs on
rank 0 and every rank derives the same plan.

Cancel (``StageCancelled`` from a stage, checked between blocks): a rank that stops sends
STOP in place of its next output and nothing more; a rank that receives STOP passes it
on; a rank that has stopped still receives what its predecessor sends for this pass
(up to the pass's units, or its STOP), so every send has its receive.  Across a CFG group
the last ranks agree (``agree_stop``) before anything else is exchanged.
"""
from __future__ import annotations

import json

import torch
import torch.distributed as dist

from .comm import PipelineStopped
from .plan import PassPlan

_HEADER = 4096  # bytes of the JSON that says what a gathered output looks like


class StageCancelled(BaseException):
    """Raised by a stage between its blocks when the job was cancelled.  (A BaseException,
    so that no ``except Exception`` in model code can swallow it.)"""


def _cat(outs: list):
    """Unit outputs in row order: tensors, or lists of tensors (LTX-2's [video, audio])."""
    if isinstance(outs[0], (list, tuple)):
        return [torch.cat([o[j] for o in outs]) for j in range(len(outs[0]))]
    return torch.cat(outs) if len(outs) > 1 else outs[0]


class Executor:
    def __init__(self, ctx, timeline, forward, head=None, last_listens: bool = True):
        """``forward(unit, state)``: this rank's stage on a unit (``state``: the received
        hidden state, None on rank 0); ``head(unit, outputs)``: the last stage's head on the
        outputs of a micro-batch's token patches.  ``last_listens``: a STOP within a pass is
        passed on to the last rank too (ComfyUI's sampler: a stage was cancelled, the last
        rank is in the pass); False where a STOP within a pass means the last rank has
        already stopped (the seed's loop: it stops at a step boundary)."""
        self.ctx, self.topo, self.p2p = ctx, ctx.topo, ctx.p2p
        self.timeline, self.forward, self.head = timeline, forward, head
        self.last_listens = last_listens

    def _stop_next(self) -> None:
        topo = self.topo
        if topo.next_rank is not None and (self.last_listens or topo.next_rank != topo.last_rank):
            self.p2p.isend_stop(topo.next_rank)

    # -- one pass ----------------------------------------------------------------------
    def run(self, plan: PassPlan):
        """This rank's part of ``plan``: (output, stopped).  The output (last rank only) is
        its pipeline's units' outputs concatenated in plan order (the rows of
        ``plan.rows_of(pipeline)``); None elsewhere or when the run stopped."""
        topo, p2p, tl = self.topo, self.p2p, self.timeline
        units = plan.for_pipeline(topo.cfg_rank if plan.pipelines > 1 else 0)
        first, last = topo.is_first, topo.is_last
        outs, pending, stopped = [], [], False
        ahead = p2p.irecv_tensor_dict(topo.prev_rank) if units and not first else None
        for n, unit in enumerate(units):
            state = None
            if not first:
                with tl.span("wait", unit.label, unit.entry()):
                    try:
                        state = ahead.wait()
                    except PipelineStopped:  # the previous rank stopped: nothing more comes from it
                        if not stopped:
                            self._stop_next()
                        return None, True
                ahead = p2p.irecv_tensor_dict(topo.prev_rank) if n + 1 < len(units) else None
            if stopped:
                continue  # receive what the previous rank still sends for this pass
            try:
                with tl.span("compute", unit.label, unit.entry()):
                    out = self.forward(unit, state)
                if last and unit.patches > 1:
                    # A copy: blocks that add in place (Flux's) return the received state's own
                    # buffer, which the next units' receives reuse.
                    pending.append({k: v.clone() for k, v in out.items()})
                    if unit.last_patch:
                        with tl.span("compute", unit.label + " head", {**unit.entry(), "head": True}):
                            out = self.head(unit, pending)
                        pending = []
                    else:
                        continue
            except StageCancelled:
                stopped = True
                self._stop_next()
                if first:
                    return None, True
                continue
            if last:
                outs.append(out)
            else:
                p2p.isend_tensor_dict(out, topo.next_rank)
        if stopped or not last:
            return None, stopped
        return (_cat(outs) if outs else None), False

    def collect(self, plan: PassPlan, mine):
        """The last rank's output of the whole pass, rows in pass order: gathered across the
        CFG group, or this pipeline's rows put back in order."""
        if plan.gathers:
            return self.gather(plan, mine)
        rows = plan.rows_of(0)
        if rows == list(range(plan.rows)):
            return mine
        back = torch.tensor(sorted(range(len(rows)), key=rows.__getitem__))
        pick = lambda t: t.index_select(0, back.to(t.device))  # noqa: E731
        return [pick(t) for t in mine] if isinstance(mine, (list, tuple)) else pick(mine)

    # -- the last ranks of a CFG group -------------------------------------------------
    def agree_stop(self, local: bool) -> bool:
        """Stop now?  The last ranks of a CFG group decide alike (a collective)."""
        if self.topo.cfg_size == 1:
            return local
        self.p2p.flush()  # nothing point-to-point in flight across a collective
        flag = torch.tensor([1 if local else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.ctx.cfg_cpu_group)
        return bool(flag.item())

    def gather(self, plan: PassPlan, mine):
        """Every last rank of the CFG group ends with the whole pass's output, rows in pass
        order, from each pipeline's ``mine`` (a tensor, or a list of tensors)."""
        ctx, topo = self.ctx, self.topo
        self.p2p.flush()
        full, listed = None, False
        for c in range(plan.pipelines):
            rows_c = plan.rows_of(c)
            if not rows_c:
                continue
            header = torch.zeros(_HEADER, dtype=torch.uint8)
            if c == topo.cfg_rank:
                parts = mine if isinstance(mine, (list, tuple)) else [mine]
                spec = json.dumps({"listed": isinstance(mine, (list, tuple)),
                                   "parts": [[list(t.shape), str(t.dtype).removeprefix("torch.")] for t in parts]})
                data = spec.encode()
                if len(data) > _HEADER:
                    raise RuntimeError(f"a model output of {len(parts)} parts is too large a structure to gather")
                header[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            dist.broadcast(header, src=topo.cfg_ranks[c], group=ctx.cfg_cpu_group)
            spec = json.loads(header.numpy().tobytes().rstrip(b"\0").decode())
            listed = spec["listed"]
            if full is None:
                full = [torch.empty([plan.rows] + shape[1:], dtype=getattr(torch, dt), device=ctx.device)
                        for shape, dt in spec["parts"]]
            index = torch.tensor(rows_c, device=ctx.device)
            for j, (shape, dt) in enumerate(spec["parts"]):
                if c == topo.cfg_rank:
                    buf = (mine[j] if listed else mine).contiguous()
                else:
                    buf = torch.empty(shape, dtype=getattr(torch, dt), device=ctx.device)
                dist.broadcast(buf, src=topo.cfg_ranks[c], group=ctx.cfg_group)
                full[j][index] = buf.to(full[j].dtype)
        return full if listed else full[0]

    # -- the pass channel: the last rank gives the other stages each pass ----------------
    def send_pass(self, msg: dict) -> None:
        for r in self.topo.pp_ranks[:-1]:
            self.p2p.isend_tensor_dict(msg, r)

    def serve(self, on_pass) -> int:
        """Not the last rank: ``on_pass(msg)`` for each pass the last rank sends (it returns
        whether the run stopped during it), until its final STOP.  Returns the passes."""
        topo, p2p, passes = self.topo, self.p2p, 0
        try:
            while True:
                self.timeline.step = passes
                with self.timeline.span("wait", "pass", {"pass": True}):
                    msg = p2p.irecv_tensor_dict(topo.last_rank).wait()  # PipelineStopped: sampling ended
                passes += 1
                if on_pass(msg):
                    # This run is over (cancelled): the last rank's final STOP ends the loop.
                    p2p.irecv_tensor_dict(topo.last_rank).wait()
                    raise RuntimeError("the last rank sent another pass after the run was cancelled")
        except PipelineStopped:
            return passes
        finally:
            p2p.flush()

    def end(self) -> None:
        """Last rank: sampling is over; let the other stages of this pipeline go."""
        if self.topo.pp_size > 1:
            for r in self.topo.pp_ranks[:-1]:
                self.p2p.isend_stop(r)
        if self.p2p is not None:
            self.p2p.flush()

