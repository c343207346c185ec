"""The one executor: every rank runs a pass plan the same way.

For its pipeline's units, in plan order, a rank receives the hidden state from its
predecessor (rank 0: none, its stage starts from the pass's inputs), runs its stage
(``forward(unit, state)``), and sends the result on; the last rank keeps the outputs,
joins a micro-batch's token patches with ``head`` (patch pipelining), and with a CFG group
of several pipelines exchanges the outputs with the other last ranks (``gather``).  The
receive of the next unit is posted before the current one is computed.  With sequence
parallelism (``Unit.shards`` > 1) every lane of SP rank r does the same on its shard; the
last stage's shards meet on the pipeline's driver (last stage, shard 0), whose ``head``
joins them into the model output.

Where the inputs come from is the caller's: ComfyUI's sampler makes the model call on
the last rank, which sends the plan and the inputs to the other stages of its pipeline
on the *pass channel* (``send_pass`` / ``serve``; with SP the driver sends to every rank of
its pipeline); the seed's mixin API has the inputs on rank 0 and every rank derives the
same plan.

Cancel (``StageCancelled`` from a stage, checked between blocks): a rank that stops sends
STOP in place of its next output and nothing more; a rank that receives STOP passes it
on; a rank that has stopped still receives what its predecessor sends for this pass
(up to the pass's units, or its STOP), so every send has its receive.  The SP ranks of a
stage stop at one block (the stage agrees before each block: ``staging``), so a last
stage's shard that stops sends the driver STOP for the unit the driver stops at too.
Across a CFG group the drivers agree (``agree_stop``) before anything else is exchanged.
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
        elif topo.next_rank is None and not topo.is_driver:  # a last stage's shard: its output goes to the driver
            self.p2p.isend_stop(topo.driver_rank)

    def _shards(self, unit, own):
        """Driver, SP: every shard's last-block output of ``unit`` (its own first); None when a
        shard sent STOP (then the driver stopped at this unit too)."""
        outs, stopped = [own], False
        for r in self.topo.sp_ranks[1:]:
            try:
                outs.append(self.p2p.irecv_tensor_dict(r).wait())
            except PipelineStopped:
                stopped = True
        return None if stopped or own is None else outs

    # -- one pass ----------------------------------------------------------------------
    def run(self, plan: PassPlan):
        """This rank's part of ``plan``: (output, stopped).  The output (last rank only) is
        its pipeline's units' outputs concatenated in plan order (the rows of
        ``plan.rows_of(pipeline)``); None elsewhere or when the run stopped."""
        topo, p2p, tl = self.topo, self.p2p, self.timeline
        units = plan.for_pipeline(topo.cfg_rank if plan.pipelines > 1 else 0)
        first, last = topo.is_first, topo.is_last
        sharded = topo.sp_size > 1 and bool(units) and units[0].shards > 1
        shard_peer = sharded and last and not topo.is_driver  # sends its last-block output to the driver
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
                            if sharded and topo.is_driver:
                                self._shards(unit, None)  # the shards stop at this unit too
                        return None, True
                ahead = p2p.irecv_tensor_dict(topo.prev_rank) if n + 1 < len(units) else None
            if stopped:
                continue  # receive what the previous rank still sends for this pass
            entry = {**unit.entry(), "shard": topo.sp_rank} if sharded else unit.entry()
            drained = False  # driver, SP: this unit's message of every shard received
            try:
                with tl.span("compute", unit.label, entry):
                    out = self.forward(unit, state)
                if shard_peer:
                    p2p.isend_tensor_dict(out, topo.driver_rank)
                    continue
                if last and sharded:
                    with tl.span("wait", unit.label + " shards", entry):
                        shards, drained = self._shards(unit, out), True
                    if shards is None:
                        raise StageCancelled()
                    with tl.span("compute", unit.label + " head", {**entry, "head": True}):
                        out = self.head(unit, shards)
                elif last and unit.patches > 1:
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
                if sharded and topo.is_driver and not drained:
                    self._shards(unit, None)  # the shards stopped at this block too: their STOPs
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
        for r in self.topo.pass_ranks:
            self.p2p.isend_tensor_dict(msg, r)

    def serve(self, on_pass) -> int:
        """Not the driver: ``on_pass(msg)`` for each pass the driver sends (it returns
        whether the run stopped during it), until its final STOP.  Returns the passes."""
        topo, p2p, passes = self.topo, self.p2p, 0
        try:
            while True:
                self.timeline.step = passes
                with self.timeline.span("wait", "pass", {"pass": True}):
                    msg = p2p.irecv_tensor_dict(topo.driver_rank).wait()  # PipelineStopped: sampling ended
                passes += 1
                if on_pass(msg):
                    # This run is over (cancelled): the driver's final STOP ends the loop.
                    p2p.irecv_tensor_dict(topo.driver_rank).wait()
                    raise RuntimeError("the driver sent another pass after the run was cancelled")
        except PipelineStopped:
            return passes
        finally:
            p2p.flush()

    def end(self) -> None:
        """Driver: sampling is over; let the other ranks of this pipeline go."""
        for r in self.topo.pass_ranks:
            self.p2p.isend_stop(r)
        if self.p2p is not None:
            self.p2p.flush()

