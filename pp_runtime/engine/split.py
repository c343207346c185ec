"""Stage split: which consecutive blocks each stage owns.

``balanced`` evens out compute (per-block costs, divided by a per-device speed weight
for mixed GPUs), ``by_memory`` evens out bytes (the first stage also holds the
embedders, the last the head), ``even`` evens out block counts, ``manual`` takes the
counts from the user ("27,30").  Contiguous partitions are found exactly by dynamic
programming: minimise the largest stage.
"""
from __future__ import annotations

from dataclasses import dataclass

STRATEGIES = ("balanced", "even", "by_memory", "manual")


class SplitError(ValueError):
    pass


@dataclass(frozen=True)
class Split:
    counts: tuple[int, ...]
    strategy: str = "manual"

    @property
    def ranges(self) -> list[tuple[int, int]]:
        out, start = [], 0
        for c in self.counts:
            out.append((start, start + c))
            start += c
        return out

    @property
    def num_blocks(self) -> int:
        return sum(self.counts)

    def describe(self) -> str:
        return ", ".join(f"stage {i}: blocks {a}-{b - 1}" for i, (a, b) in enumerate(self.ranges))


def parse_manual(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(x) for x in str(text).replace(" ", "").split(",") if x != "")
    except ValueError:
        raise SplitError(f"manual split '{text}' must be comma-separated block counts, e.g. '27,30'") from None
    if not counts:
        raise SplitError("manual split is empty: give blocks per stage, e.g. '27,30'")
    return counts


def _min_max_partition(weights: list[float], stages: int, stage_scale: list[float],
                       extra: list[float]) -> tuple[int, ...]:
    """Contiguous partition of ``weights`` into ``stages`` non-empty parts minimising
    max over stages of (extra[s] + sum) / stage_scale[s]."""
    n = len(weights)
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    inf = float("inf")
    # best[s][i]: best max cost putting blocks [0, i) into stages [0, s)
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for i in range(s, n - (stages - s) + 1):
            for j in range(s - 1, i):
                cost = max(best[s - 1][j], (extra[s - 1] + prefix[i] - prefix[j]) / stage_scale[s - 1])
                if cost < best[s][i] - 1e-12:
                    best[s][i], cut[s][i] = cost, j
    counts, i = [], n
    for s in range(stages, 0, -1):
        j = cut[s][i]
        counts.append(i - j)
        i = j
    return tuple(reversed(counts))


def _gb(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def split_blocks(strategy: str, num_blocks: int, stages: int, *, costs: list[float] | None = None,
                 block_bytes: list[int] | None = None, first_bytes: int = 0, last_bytes: int = 0,
                 shared_bytes: int = 0, capacities: list[int] | None = None, reserve: int = 0,
                 devices: list[str] | None = None, device_weights: list[float] | None = None,
                 manual: str | None = None) -> Split:
    """The split of ``num_blocks`` blocks into ``stages`` stages.

    ``by_memory`` with ``capacities`` (bytes each stage's device may use: its free memory,
    or the worker's memory cap) fills the devices in proportion to what each can take after
    ``reserve`` (activations) — a 32 GB and a 24 GB card get 4:3 of the weights — and
    refuses with the numbers when the model cannot fit.  Every stage holds ``shared_bytes``
    (the non-block weights), the first also ``first_bytes``, the last ``last_bytes``."""
    if strategy not in STRATEGIES:
        raise SplitError(f"split strategy '{strategy}' is unknown; use one of {', '.join(STRATEGIES)}")
    if stages < 1:
        raise SplitError(f"need at least one stage, got {stages}")
    if stages > num_blocks:
        raise SplitError(f"{stages} stages but the model has only {num_blocks} blocks: "
                         f"use at most {num_blocks} devices in the pipeline")
    weights = list(device_weights) if device_weights else [1.0] * stages
    if len(weights) != stages or min(weights) <= 0:
        raise SplitError(f"device weights {weights} must be {stages} positive numbers")

    if strategy == "manual":
        counts = parse_manual(manual or "")
        if len(counts) != stages:
            raise SplitError(f"manual split '{manual}' has {len(counts)} stages, the group has {stages} "
                             f"pipeline stages")
        if any(c < 1 for c in counts):
            raise SplitError(f"manual split '{manual}' has an empty stage: every stage needs at least one block")
        if sum(counts) != num_blocks:
            raise SplitError(f"manual split '{manual}' has {sum(counts)} blocks, the model has {num_blocks}")
        return Split(counts, "manual")
    if strategy == "even":
        base, rest = divmod(num_blocks, stages)
        return Split(tuple(base + (1 if s < rest else 0) for s in range(stages)), "even")
    if strategy == "balanced":
        w = list(costs) if costs else [1.0] * num_blocks
        extra = [0.0] * stages
    else:  # by_memory
        if not block_bytes:
            raise SplitError("by_memory needs the parameter bytes of each block")
        w = [float(b) for b in block_bytes]
        extra = [float(shared_bytes)] * stages
        extra[0] += first_bytes
        extra[-1] += last_bytes
        if capacities is not None:
            # activations (ComfyUI's estimate) and a tenth of the device for everything else
            # a sampling process allocates (buffers, kernels' workspaces, fragmentation)
            room = [0.9 * c - reserve for c in capacities]
            if len(room) != stages or min(room) <= 0:
                worst = min(range(len(room)), key=lambda i: room[i])
                raise SplitError(_does_not_fit(worst, capacities, reserve, extra[worst], devices, None))
            counts = _min_max_partition(w, stages, room, extra)
            sp = Split(counts, strategy)
            for i, (a, b) in enumerate(sp.ranges):
                need = extra[i] + sum(w[a:b])
                if need > room[i]:
                    raise SplitError(_does_not_fit(i, capacities, reserve, need, devices, sum(w) + sum(extra)))
            return sp
    if len(w) != num_blocks:
        raise SplitError(f"{len(w)} block weights given for {num_blocks} blocks")
    return Split(_min_max_partition(w, stages, weights, extra), strategy)


def _does_not_fit(i, capacities, reserve, need, devices, total) -> str:
    where = f"rank {i}" + (f" ({devices[i]})" if devices else "")
    msg = (f"the model does not fit: {where} would hold {_gb(need)} of weights, but it has {_gb(capacities[i])} "
           f"(its free memory or memory cap) and keeps {_gb(reserve + 0.1 * capacities[i])} of that for "
           f"activations and workspace")
    if total is not None:
        msg += f" (the whole model: {_gb(total)} over {len(capacities)} devices with {_gb(sum(capacities))})"
    return msg + ". Add a GPU, use an fp8 weight dtype (half the bytes), raise the memory cap, or a lower resolution"
