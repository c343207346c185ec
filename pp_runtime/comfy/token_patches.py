"""Patch pipelining (PipeFusion-style): opt-in, approximate, on the split model.

At batch 1 and CFG 1 a pass is one micro-batch, so the stages of a pipeline take turns and
S GPUs are no faster than one.  With patches on, after ``warmup`` exact steps each pass cuts
the model's token sequence into M contiguous patches that go through the stages one after
the other as micro-batches, so the stages overlap.  Inside each block a patch's
self-attention uses the fresh keys/values of itself and of the patches already computed in
this pass, and the previous pass's keys/values for the patches still to come (a cache per
block and CFG branch, on the rank that owns the block).  So it is **not exact**; with
``warmup`` covering every step it is exact PP bit for bit (the cache is only filled).

What a family needs (``PatchSpec`` in its table entry, plus each block list's ``joint``:
the hidden-state names in the order the block's attention joins them):

* its self-attention goes through ComfyUI's attention function with
  ``transformer_options`` (the ``optimized_attention_override`` hook), as the first
  attention call of each block (``self_attention``: which calls, by order);
* its hidden state is [batch, tokens, channels] (or [tokens, channels]: ``token_dim``), so a
  patch is a token range of it;
* its position tables (RoPE) are block arguments cut to the patch (``positional``);
* nothing else in a block indexes tokens (``unsupported_args`` must be None, e.g.
  HunyuanVideo's per-token modulation ranges; exact classes in ``classes``: a subclass
  that adds per-block extras is refused).

The last stage runs each patch to the end of its blocks, then one forward with every block
passed through and the last block's output replaced by the patches' outputs joined, so
ComfyUI's own code after the loop (the head, unpatchify) sees the full sequence.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..engine import sequence


@dataclass(frozen=True)
class PatchSpec:
    positional: tuple[tuple[str, int], ...] = ()   # block arguments cut to the patch: (name, token dim)
    self_attention: tuple[int, ...] = (0,)         # which attention calls of a block attend over the sequence
    unsupported_args: tuple[str, ...] = ()         # block arguments that must be None with patches on
    classes: tuple[str, ...] = ()                  # "module:Class": only these exact classes
    # model inputs patches cannot run: (input, value, the model's attribute that gives the value
    # when the input is absent, the input that must be present for it to matter, why), e.g.
    # Qwen-Image Edit's reference tokens with their own timestep
    unsupported_inputs: tuple[tuple[str, str, str, str, str], ...] = ()
    # block arguments with one row per group of tokens (Wan 2.2 ti2v's per-frame modulation):
    # (name, dim, "module:function": ComfyUI's own function that spreads it over the tokens as the
    # block does, ``f(value, hidden)``); cut to the patch's tokens once spread.  "" for a function:
    # one row per token (cut as is) or one for all (left whole), as LTXV's timestep modulation
    per_token: tuple[tuple[str, int, str], ...] = ()
    # the hidden state's token dim: 1 for [batch, tokens, channels]; 0 for MiniMax-H3's packed
    # [tokens, channels] stream (batch 1)
    token_dim: int = 1
    # block arguments that are lists of (start, stop, row) token ranges over the whole sequence
    # (MiniMax-H3's modulation segments): (name, dim of a row that has one entry per token); the
    # same ranges over the patch's / shard's tokens, counted from its first
    ranges: tuple[tuple[str, int], ...] = ()
    # False: sequence parallelism only (the family is not checked with patch pipelining)
    pipelining: bool = True


class PatchUnsupported(RuntimeError):
    pass


# Patches of fewer tokens than this run the GPU below its speed (measured, H100: Flux 1024²,
# 4608 tokens, is fastest at 4 patches on 2 and on 4 GPUs; 8 patches are slower on both).
TOKENS_PER_PATCH = 1024


def auto_count(tokens: int, stages: int) -> int:
    """The patch count for ``patches: 0``: twice the stages, fewer where patches would get
    smaller than ``TOKENS_PER_PATCH``, at least 2."""
    return max(2, min(2 * stages, tokens // TOKENS_PER_PATCH))


def ranges(total: int, count: int) -> list[tuple[int, int]]:
    """``count`` contiguous ranges of nearly equal size covering ``total`` tokens."""
    if count < 1 or total < count:
        raise PatchUnsupported(f"cannot cut {total} tokens into {count} patches: use at most {total} patches")
    return sequence.ranges(total, count)


def patch_ranges(segments: list[int], count: int, what: str = "patches") -> list[list[tuple[int, int]]]:
    """Per patch (or sequence shard), its token ranges in the joint sequence: one chunk of
    every segment (e.g. of the text tokens and of the image tokens), so that every patch has
    some of each."""
    spans = sequence.shard_spans(segments, count)
    if spans is None:
        raise PatchUnsupported(f"the token sequence has segments of {segments} tokens; each of {count} {what} "
                               f"needs some of every segment: use at most {min(segments)} {what}")
    return spans


def take(t: torch.Tensor, dim: int, spans: list[tuple[int, int]]) -> torch.Tensor:
    """The tokens of ``t`` (along ``dim``) in ``spans``, in order."""
    parts = [t.narrow(dim, a, b - a) for a, b in spans]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _segments_of(names: tuple[str, ...], segments: list[int]) -> list[list[int]]:
    """Which segments each hidden-state name holds: one each (a dual-stream block's image
    and text states), or all of them (a single-stream block's joint state)."""
    if len(names) == len(segments):
        return [[j] for j in range(len(names))]
    if len(names) == 1:
        return [list(range(len(segments)))]
    raise PatchUnsupported(f"hidden state {names} does not match the sequence's {len(segments)} segments")


def cut(hidden: dict, names: tuple[str, ...], segments: list[int], spans: list[tuple[int, int]], dim: int = 1) -> dict:
    """A patch's part of a full hidden state (``dim``: its tokens)."""
    offsets = [sum(segments[:j]) for j in range(len(segments))]
    out = dict(hidden)
    for name, segs in zip(names, _segments_of(names, segments)):
        base = offsets[segs[0]]
        out[name] = take(hidden[name], dim, [(spans[j][0] - base, spans[j][1] - base) for j in segs])
    return out


def join(outputs: list[dict], names: tuple[str, ...], segments: list[int], spans: list[list], dim: int = 1) -> dict:
    """The patches' outputs of one block joined into the full hidden state, in token order."""
    out = dict(outputs[0])
    for name, segs in zip(names, _segments_of(names, segments)):
        parts = []
        for j in segs:  # segment by segment: its chunk from every patch
            for p, o in enumerate(outputs):
                before = sum(spans[p][i][1] - spans[p][i][0] for i in segs if i < j)
                n = spans[p][j][1] - spans[p][j][0]
                parts.append(o[name].narrow(dim, before, n))
        out[name] = torch.cat(parts, dim=dim)
    return out


@dataclass
class PatchCall:
    """What one forward call of a stage does with patches on.

    ``fill``: an exact pass that also stores every block's keys/values;
    ``patch``: patch ``index`` of ``count``;
    ``head``: last stage only, after the patches: the head on the joined ``outputs``."""
    mode: str
    branch: tuple = ()
    index: int = 0
    count: int = 1
    outputs: list = field(default_factory=list)


class PatchDone(BaseException):
    """Raised on the last stage after the model's last block ran on a patch: its output."""

    def __init__(self, out: dict):
        super().__init__("patch done")
        self.out = out


def describe_support(family, diffusion_model, what: str = "patch pipelining", off: str = "turn patches off") -> str | None:
    """Why this model cannot run with patches (or sequence shards: the same cut of its tokens);
    None: it can."""
    spec = getattr(family, "patches", None)
    if spec is not None and not spec.pipelining and what == "patch pipelining":
        spec = None
    if spec is None or not all(bl.joint for bl in family.blocks):
        return (f"{what} has no entry for {family.name} yet (it runs Flux, Chroma, Wan 2.1/2.2, Qwen-Image, Lumina 2, Z-Image and "
                f"HunyuanVideo{'' if what == 'patch pipelining' else ', LTXV and MiniMax-H3'}): {off}")
    if spec.classes:
        name = f"{type(diffusion_model).__module__}:{type(diffusion_model).__name__}"
        if name not in spec.classes:
            return (f"{what} cannot run {type(diffusion_model).__name__}: its blocks take per-token "
                    f"extras that a cut of the tokens would get wrong; it runs "
                    f"{', '.join(c.split(':')[1] for c in spec.classes)}: {off}")
    return None


def check_inputs(family, diffusion_model, kwargs: dict, what: str = "patch pipelining",
                 off: str = "turn patches off") -> None:
    """Refuse a pass whose inputs patches (or sequence shards) cannot cut (before any stage runs it)."""
    import operator
    for name, value, default, present, why in family.patches.unsupported_inputs:
        try:
            fallback = operator.attrgetter(default)(diffusion_model)  # e.g. Flux's "params.default_ref_method"
        except AttributeError:
            fallback = None
        if kwargs.get(present) is not None and kwargs.get(name, fallback) == value:
            raise PatchUnsupported(f"{what} cannot run {family.name} with {name} '{value}' ({why}): {off}")


class KVCache:
    """Per rank: each (block, branch) keys and values of the last pass, full length."""

    def __init__(self):
        self.kv: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.fresh: set | None = None  # keys stored since ``begin()`` (None: not tracking)

    def begin(self) -> None:
        """A new job: what it does not store again is dropped at its first patch (``prune``)."""
        self.fresh = set()

    def prune(self) -> bool:
        """Drop what this job has not stored (another shape or CFG branch of an earlier job);
        True when something was dropped."""
        if self.fresh is None:
            return False
        stale = [k for k in self.kv if k not in self.fresh]
        for k in stale:
            del self.kv[k]
        self.fresh = None
        return bool(stale)

    def store(self, key, k: torch.Tensor, v: torch.Tensor) -> bool:
        """Keep a full pass's keys/values, in place when they fit (captured patch calls read
        these very tensors); True when new tensors were made."""
        if self.fresh is not None:
            self.fresh.add(key)
        held = self.kv.get(key)
        if held is not None and all(h.shape == t.shape and h.dtype == t.dtype and h.device == t.device
                                    for h, t in zip(held, (k, v))):
            held[0].copy_(k)
            held[1].copy_(v)
            return False
        self.kv[key] = (k.detach().clone(), v.detach().clone())
        return True

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for kv in self.kv.values() for t in kv)

    def clear(self) -> None:
        self.kv.clear()
