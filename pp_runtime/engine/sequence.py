"""Sequence parallelism: the collectives of one stage's shards.

With SP degree P, each of a stage's P ranks runs every block on its shard of the token
sequence (shard r: its chunk of every segment, e.g. of the text and of the image tokens;
``shard_spans``).  Everything in a block acts on each token alone except self-attention,
where each rank keeps its queries and attends to the keys/values of the whole sequence:
``gather_kv`` collects them from every shard, in the sequence's own token order, so the
attention is the unsplit one, row for row (exact; shards of unequal length are padded only
on the wire).  ``ulysses`` is the other exact exchange (DeepSpeed-Ulysses): an all-to-all
turns token shards of every head into every token of a group of heads, the attention runs
on those, and a second all-to-all turns the result back; it moves 2/P of all-gather's
bytes at P ranks (the same at 2) and needs the heads to divide by P.  ``agree`` is the stop
decision the ranks take together before each block, so none of them enters a collective
the others have left (Cancel).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def ranges(total: int, count: int) -> list[tuple[int, int]]:
    """``count`` contiguous ranges of nearly equal size covering ``total`` tokens."""
    cuts = [round(i * total / count) for i in range(count + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def shard_spans(segments: list[int], count: int) -> list[list[tuple[int, int]]] | None:
    """Per shard, its token ranges in the joint sequence (one chunk of every segment); None
    when a segment has fewer tokens than shards (some shard would hold none of it)."""
    if count < 1 or min(segments) < count:
        return None
    offsets = [sum(segments[:j]) for j in range(len(segments))]
    chunks = [ranges(n, count) for n in segments]
    return [[(offsets[j] + chunks[j][p][0], offsets[j] + chunks[j][p][1]) for j in range(len(segments))]
            for p in range(count)]


class SequenceGroup:
    """The SP ranks of this rank's stage (``ctx.sp_group``, ``ctx.sp_cpu_group``)."""

    def __init__(self, ctx):
        self.group, self.cpu_group = ctx.sp_group, ctx.sp_cpu_group
        self.size, self.rank = ctx.topo.sp_size, ctx.topo.sp_rank
        self._order: dict = {}  # (spans, dim size) -> the index that puts gathered tokens in order
        # In a collective this rank waits for its shard peers (the next one named), as in a
        # point-to-point receive: the host's watchdog then names the shard that is stuck.
        self.watch = getattr(getattr(ctx, "p2p", None), "watch", None)
        self.peer = ctx.topo.sp_ranks[(self.rank + 1) % self.size]

    def _collective(self, fn, *args, **kwargs):
        if self.watch is not None:
            self.watch(self.peer)
        try:
            return fn(*args, **kwargs)
        finally:
            if self.watch is not None:
                self.watch(None)

    def agree(self, local: bool) -> bool:
        """Stop now?  Every shard of the stage decides alike (a collective on the CPU group)."""
        flag = torch.tensor([1 if local else 0])
        self._collective(dist.all_reduce, flag, op=dist.ReduceOp.MAX, group=self.cpu_group)
        return bool(flag.item())

    def exchange(self, choice: str, heads: int) -> str:
        """The exchange a call uses: ``all_gather`` or ``ulysses`` (``auto``: Ulysses where it
        moves fewer bytes, more than 2 ranks, and the heads divide)."""
        if choice == "ulysses":
            if heads % self.size:
                raise ValueError(f"Ulysses needs the attention heads ({heads}) to divide by sequence_parallel "
                                 f"{self.size}: use attention_exchange all_gather_kv or auto")
            return "ulysses"
        if choice == "auto" and self.size > 2 and heads % self.size == 0:
            return "ulysses"
        return "all_gather"

    def _where(self, spans: list, width: int, total: int, device) -> torch.Tensor | None:
        """For each token of the sequence, its place among the shards laid end to end (each
        ``width`` long, or its own length with ``width`` 0); None where that is the identity."""
        key = (tuple(tuple(s) for s in spans), width, total, str(device))
        if key not in self._order:
            where, at = [0] * total, 0
            for r, s in enumerate(spans):
                at = r * width if width else at
                for a, b in s:
                    where[a:b] = range(at, at + b - a)
                    at += b - a
            self._order[key] = None if where == list(range(total)) else torch.tensor(where, device=device)
        return self._order[key]

    def ulysses(self, attend, q, k, v, heads: int, dim: int, spans: list, total: int, mask=None,
                out_heads_first: bool = False):
        """This shard's attention output by Ulysses: ``attend(q, k, v, heads, mask)`` runs
        ComfyUI's attention on [batch, heads, tokens, dim] tensors (every token, ``heads / P``
        heads); q/k/v come as [B, n, H*D] (``dim`` 1) or [B, H, n, D] (``dim`` 2); the output is
        given back as the caller's attention would (``out_heads_first``: [B, H, n, D])."""
        P = self.size
        sizes = [sum(b - a for a, b in s) for s in spans]
        n = sizes[self.rank]
        if dim == 1:  # [B, n, H*D] -> [n, B, H, D]
            B, D = q.shape[0], q.shape[-1] // heads
            canon = [t.reshape(B, n, heads, -1).permute(1, 0, 2, 3) for t in (q, k, v)]
        else:  # [B, H, n, D]
            B, D = q.shape[0], q.shape[-1]
            canon = [t.permute(2, 0, 1, 3) for t in (q, k, v)]
        g = heads // P
        # [n, 3, B, H, D] -> per destination rank its head group: [P * n, 3, B, g, D]
        qkv = torch.stack(canon, 1).reshape(n, 3, B, P, g, D).permute(3, 0, 1, 2, 4, 5).reshape(P * n, 3, B, g, D)
        got = qkv.new_empty((total, 3, B, g, D))
        self._collective(dist.all_to_all_single, got, qkv.contiguous(), sizes, [n] * P, group=self.group)  # shard order
        where = self._where(spans, 0, total, got.device) if mask is not None else None
        if where is not None:  # token order, for the mask
            got = got.index_select(0, where)
        if mask is not None and mask.dim() == 4 and mask.shape[1] == heads:
            mask = mask.narrow(1, self.rank * g, g)
        qh, kh, vh = (got[:, j].permute(1, 2, 0, 3) for j in range(3))  # [B, g, total, D]
        out = attend(qh, kh, vh, g, mask)  # [B, g, total, D]
        out = out.permute(2, 0, 1, 3)  # [total, B, g, D]
        if where is not None:  # back to shard order
            out = out.index_select(0, torch.argsort(where))
        back = out.new_empty((P * n, B, g, D))
        self._collective(dist.all_to_all_single, back, out.contiguous(), [n] * P, sizes, group=self.group)
        full = back.reshape(P, n, B, g, D).permute(2, 0, 3, 1, 4).reshape(B, heads, n, D)  # [B, H, n, D]
        return full if out_heads_first else full.permute(0, 2, 1, 3).reshape(B, n, heads * D)

    def gather_kv(self, k: torch.Tensor, v: torch.Tensor, dim: int, spans: list, total: int):
        """The whole sequence's keys and values (``dim``: the token dimension) from every
        shard's (``spans[r]``: shard r's token ranges), in token order."""
        sizes = [sum(b - a for a, b in s) for s in spans]
        width = max(sizes)
        kv = torch.stack((k, v))  # one collective for both
        d = dim + 1
        if kv.shape[d] < width:  # unequal shards: padded on the wire only
            pad = list(kv.shape)
            pad[d] = width - kv.shape[d]
            kv = torch.cat((kv, kv.new_zeros(pad)), d)
        parts = [torch.empty_like(kv) for _ in range(self.size)]
        self._collective(dist.all_gather, parts, kv.contiguous(), group=self.group)
        joined = torch.cat(parts, d)  # shard after shard, each padded to ``width``
        index = self._where(spans, width, total, joined.device)
        if index is not None:
            joined = joined.index_select(d, index)
        elif joined.shape[d] != total:
            joined = joined.narrow(d, 0, total)
        return joined[0], joined[1]
