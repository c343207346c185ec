"""One staging mechanism for every family: ComfyUI's own forward, its block loop intercepted.

A stage of a pipeline runs the model's unmodified ``diffusion_model`` forward.  Each block
call of the loop is intercepted, through ComfyUI's block-replacement hook
(``transformer_options["patches_replace"]["dit"][(kind, i)]``, whose argument dict is the
state at a block boundary) or, for a loop without that hook, by standing in for the block
module's ``forward``.  On the stage that owns blocks ``start .. end-1``:

* a block before ``start`` passes its (dummy) hidden state through: this rank computed
  the input embeddings from the pass inputs like every rank does, but the hidden state
  it carries into the blocks is not the real one yet;
* the first block reached at or after ``start`` takes the hidden state received from the
  previous stage in place of its own (``state_in``);
* blocks ``start .. end-1`` run, wrapped by any block-replacement patch of the user;
* the first block reached at or after ``end`` hands its input (the hidden state with
  everything the forward did after block ``end-1``: a ControlNet residual, Flux's txt/img
  concatenation between its two loops) to the next stage and stops the forward there;
  the last stage runs on into ComfyUI's head and returns the model output.

So everything the forward does between two blocks is done exactly once on the real state,
by the stage owning the block before it; what the forward computes before the loop (time
and text embeddings, RoPE tables, masks, reference tokens) every rank recomputes from the
pass inputs with its own copy of the small non-block weights.  Only the hidden state
crosses a boundary.  A family is a short table (``families.py``): its block lists, hook
keys, which entries are hidden state, and which modules only the first or last stage runs.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field

import torch

from ..engine.executor import StageCancelled
from .graphs import PatchGraphs
from .token_patches import KVCache, PatchDone, PatchSpec, PatchUnsupported, cut, join, patch_ranges, take


@dataclass(frozen=True)
class BlockList:
    """One loop of blocks of a family.

    ``path``: the ModuleList (or ModuleDict) attribute of the diffusion model.
    ``hook``: the ``patches_replace["dit"]`` kind its loop offers (``"double_block"``), or
    None to stand in for the block modules' ``forward``.
    ``hidden``: the names of the hidden state: keys of the hook's argument dict, or for a
    stand-in the names of the block forward's parameters that carry it.
    ``returns``: stand-in only: the parameter names whose values make up the block's
    return value (one name: the value itself; several: a tuple); default ``hidden``.
    ``cost``: per-token compute of a block relative to its parameter count (0.5 for a
    dual-stream block, whose image and text tokens each go through half the weights).
    ``joint``: for patch pipelining, the hidden-state names in the order the block's
    attention joins their tokens (e.g. Flux's double blocks: txt, then img).
    """
    path: str
    hook: str | None
    hidden: tuple[str, ...]
    returns: tuple[str, ...] = ()
    cost: float = 1.0
    joint: tuple[str, ...] = ()  # patch pipelining: the hidden-state names in the order the
    #                              block's attention joins them into one token sequence


@dataclass(frozen=True)
class Family:
    """A model family: which ComfyUI classes it covers and how their forward is staged."""
    name: str
    classes: tuple[str, ...]          # "module:Class", matched with isinstance
    blocks: tuple[BlockList, ...]
    head: tuple[str, ...] = ()        # top-level modules / parameters only the last stage uses
    first_only: tuple[str, ...] = ()  # module lists whose output only feeds the hidden state:
    #                                   run by the first stage, identity elsewhere
    modulation: tuple[str, ...] = ()  # submodule names acting on one vector per item (left out of costs)
    note: str = ""
    patches: PatchSpec | None = None  # patch pipelining (token_patches.py); None: refused
    entry: str = ""  # the diffusion model's method a stage calls ("": the module, i.e. its forward).
    #                  "_forward" where forward() does work outside the DIFFUSION_MODEL wrappers that
    #                  the last rank's PipelineProxy already does once per pass (MiniMax H3: the audio
    #                  rescale in and out; newer ComfyUI also its malloc_graph_begin/end, which must
    #                  not span a stage boundary, and a denoise-mask multiply)


class StageBoundary(BaseException):
    """Raised inside the forward at the first block after the stage: carries the hidden state.
    (A BaseException, so that no ``except Exception`` in model code can swallow it.)"""

    def __init__(self, state: dict):
        super().__init__("stage boundary")
        self.state = state


class StagingError(RuntimeError):
    pass


# -- the hidden state as a flat tensor dict (what crosses a stage boundary) ------------
def flatten_state(state: dict) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        if torch.is_tensor(v):
            out[k] = v
        elif isinstance(v, (tuple, list)) and all(torch.is_tensor(t) for t in v):
            for j, t in enumerate(v):
                out[f"{k}#{j}"] = t
        else:
            raise StagingError(f"hidden state '{k}' is a {type(v).__name__}; only tensors (or tuples of "
                               f"tensors) can cross a stage boundary")
    return out


def unflatten_state(flat: dict) -> dict:
    out, parts = {}, {}
    for k, v in flat.items():
        name, sep, j = k.rpartition("#")
        if sep and j.isdigit():
            parts.setdefault(name, {})[int(j)] = v
        else:
            out[k] = v
    for name, items in parts.items():
        out[name] = tuple(items[j] for j in range(len(items)))
    return out


# -- which weights a stage holds -----------------------------------------------------------
def block_modules(model: torch.nn.Module, family: Family) -> list[tuple[str, torch.nn.Module, BlockList]]:
    """(weight prefix, module, its list) of every block, in the forward's global order."""
    out = []
    for bl in family.blocks:
        container = model.get_submodule(bl.path)
        for name, module in container.named_children():
            out.append((f"{bl.path}.{name}.", module, bl))
    return out


def _top_level(model) -> list[str]:
    """Names of the model's direct children and direct parameters/buffers."""
    names = [n for n, _ in model.named_children()]
    names += [n for n, _ in model.named_parameters(recurse=False)]
    names += [n for n, _ in model.named_buffers(recurse=False)]
    return names


def _prefix(name: str, model) -> str:
    """Weight-name prefix of a top-level entry: 'final_layer.' for a module, the exact name
    for a parameter or buffer of the model itself."""
    return f"{name}." if name in dict(model.named_children()) else name


def stage_prefixes(model, family: Family, start: int, end: int, first: bool, last: bool) -> list[str]:
    """Weight-name prefixes this stage loads: its blocks, and every non-block weight
    except the head's (last stage only) and the first-only modules' (first stage only)."""
    blocks = block_modules(model, family)
    out = [p for p, _, _ in blocks[start:end]]
    lists = {bl.path for bl in family.blocks}
    for name in _top_level(model):
        if name in lists:
            continue
        if name in family.head and not last:
            continue
        if name in family.first_only and not first:
            continue
        out.append(_prefix(name, model))
    return out


def weight_names(model) -> list[str]:
    return [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]


def unplaced(model, family: Family) -> list[str]:
    """Weight names no stage would load (must be empty)."""
    n = len(block_modules(model, family))
    prefixes = tuple(stage_prefixes(model, family, 0, n, True, True))
    return [w for w in weight_names(model) if not w.startswith(prefixes)]


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def profile(model, family: Family) -> dict:
    """What the split needs: blocks, per-block compute and bytes, and the bytes every stage
    holds besides its blocks (``shared_bytes``), plus those of the head (last stage) and of
    the first-only modules (first stage)."""
    blocks = block_modules(model, family)
    if not blocks:
        raise StagingError(f"{type(model).__name__} has no blocks under {[b.path for b in family.blocks]}")
    mods = tuple(family.modulation)

    def cost(module, bl):
        per_token = sum(p.numel() for n, p in module.named_parameters()
                        if not any(part in mods for part in n.split(".")))
        return float(per_token) * bl.cost

    top = {name: _prefix(name, model) for name in _top_level(model) if name not in {b.path for b in family.blocks}}
    named = dict(model.named_parameters())

    def bytes_under(prefix):
        return _bytes(t for n, t in named.items() if n == prefix or (prefix.endswith(".") and n.startswith(prefix)))

    head = sum(bytes_under(p) for n, p in top.items() if n in family.head)
    first = sum(bytes_under(p) for n, p in top.items() if n in family.first_only)
    shared = sum(bytes_under(p) for n, p in top.items() if n not in family.head and n not in family.first_only)
    return {"num_blocks": len(blocks), "costs": [cost(m, bl) for _, m, bl in blocks],
            "block_bytes": [_bytes(m.parameters()) for _, m, _ in blocks],
            "shared_bytes": shared, "first_bytes": first, "last_bytes": head, "family": family.name}


# -- one rank's part of the forward -----------------------------------------------------------
@dataclass
class _Pass:
    state_in: dict | None
    injected: bool = False
    blocks_run: int = 0
    reached: list = field(default_factory=list)
    patch: object = None     # a patches.PatchCall, or None
    segments: list | None = None  # the joint sequence's segments (e.g. text, image tokens)
    spans: list | None = None     # the patch's token ranges in it (one per segment)
    shards: list | None = None    # sequence parallelism: every shard's spans (this rank's: ``spans``)
    total: int = 0           # the joint sequence's length
    block: int | None = None  # the block running now (for the attention hook)
    calls: int = 0           # attention calls of that block so far
    rebased: dict = field(default_factory=dict)  # token-range arguments cut to the spans, per name


_REPLACE = object()  # _enter's answer in a head pass at the model's last block


class StageForward:
    """Runs blocks ``start .. end-1`` of ``model`` (ComfyUI's diffusion model) inside its own
    forward.  ``cancelled()`` is asked before each of this stage's blocks; when it says yes
    the forward unwinds with ``StageCancelled``."""

    def __init__(self, model: torch.nn.Module, family: Family, start: int, end: int, first: bool, last: bool,
                 cancelled=None):
        self.model, self.family = model, family
        self.start, self.end, self.first, self.last = start, end, first, last
        self.cancelled = cancelled or (lambda: False)
        self.on_block = None  # called with the global index before each of this stage's blocks
        self.blocks = block_modules(model, family)
        self.n_blocks = len(self.blocks)
        self.kv = KVCache()  # patch pipelining: this stage's blocks' keys/values of the last pass
        self.graphs = PatchGraphs()  # patch pipelining: patch calls captured as CUDA graphs
        self.tokens = 0  # the joint sequence's length in the last pass with patches on
        self.offsets: dict[str, int] = {}
        g = 0
        for bl in family.blocks:
            self.offsets[bl.path] = g
            g += len(model.get_submodule(bl.path))
        self.list_at = [bl for _, _, bl in self.blocks]  # the block list of each global block
        self.joint_at = [joint_order(m, bl) for _, m, bl in self.blocks]  # patch pipelining: per block
        self.sp = None  # sequence parallelism: this stage's engine.sequence.SequenceGroup (set per job)
        self.sp_exchange = "auto"  # ... and its attention exchange: auto, all_gather_kv, ulysses
        self._spread: dict = {}  # per-token arguments: (name, groups, tokens) -> token -> group index
        self._pass: _Pass | None = None

    def __call__(self, args: tuple, kwargs: dict, state_in: dict | None = None, patch=None):
        """One micro-batch: ``args``/``kwargs`` are the forward's arguments as ComfyUI's
        ``BaseModel`` passes them (``x, t``; ``context``, ``transformer_options``, ...);
        ``state_in`` the previous stage's hidden state (None on the first stage).  Returns
        the hidden state for the next stage (a flat tensor dict), or on the last stage the
        model output.  ``patch`` (a ``patches.PatchCall``): patch pipelining; on the last
        stage a patch returns the last block's output, and the ``head`` call after the
        patches the model output."""
        if patch is not None and patch.mode in ("patch", "head"):
            if self.kv.prune():  # graphs of an earlier job may read what was dropped
                self.graphs.clear()
            return self.graphs(self._call, args, kwargs, state_in, patch, self._before_replay)
        return self._call(args, kwargs, state_in, patch)

    def begin_job(self, patches: bool) -> None:
        """Patches off: drop the cache and graphs; on: keep them for this job's shapes (its first
        pass refills the cache in place, so captured patch calls stay valid)."""
        if patches:
            self.kv.begin()
        else:
            self.forget()

    def forget(self) -> None:
        """Drop the keys/values cache and the graphs that read it (patches off, weights moved)."""
        self.kv.clear()
        self.graphs.clear()

    def _entry(self):
        """What a stage calls: the model (its forward), or the family's ``entry`` method."""
        return getattr(self.model, self.family.entry) if self.family.entry else self.model

    def _before_replay(self) -> None:
        """What a replayed patch call does before its first block, as an eager one does."""
        if self.cancelled():
            raise StageCancelled()
        if self.on_block is not None:
            self.on_block(self.start)

    def _call(self, args: tuple, kwargs: dict, state_in: dict | None = None, patch=None):
        head = patch is not None and patch.mode == "head"
        if not head and (state_in is None) != self.first:
            raise StagingError("the first stage takes no hidden state; every other stage needs one")
        self._pass = p = _Pass(unflatten_state(state_in) if state_in is not None else None, patch=patch)
        kwargs = dict(kwargs)
        kwargs["transformer_options"] = self._options(kwargs.get("transformer_options") or {})
        try:
            with self._stand_ins():
                out = self._entry()(*args, **kwargs)
        except StageBoundary as b:
            if self.last:
                raise StagingError("the last stage reached a stage boundary") from None
            return flatten_state(b.state)
        except PatchDone as d:
            return d.out
        finally:
            self._pass = None
        if not self.last:
            raise StagingError(f"the forward of {type(self.model).__name__} ended before block {self.end}: "
                               f"blocks after this stage were skipped")
        if not self.first and not p.injected and not head:
            raise StagingError(f"the forward of {type(self.model).__name__} reached none of blocks "
                               f"{self.start}..{self.end - 1}")
        return out

    # -- the interception, shared by hooks and stand-ins --------------------------------
    def _enter(self, g: int, hidden: dict) -> dict | None:
        """Called at the entry of global block ``g`` with its hidden state; returns the hidden
        state to run the block on, or None to pass it through (a block before this stage)."""
        p = self._pass
        patch = p.patch
        if patch is not None and p.segments is None:  # the first block the forward reaches (all ranks
            names = self.joint_at[g]                    # pass it through, full size): the segments
            dim = self.family.patches.token_dim
            p.segments = [hidden[n].shape[dim] for n in names] if len(names) > 1 else [hidden[names[0]].shape[dim]]
            p.total = self.tokens = sum(p.segments)
            if patch.mode == "patch":
                p.spans = patch_ranges(p.segments, patch.count)[patch.index]
            elif patch.mode == "shard":
                p.shards = patch_ranges(p.segments, patch.count, "sequence-parallel shards")
                p.spans = p.shards[patch.index]
        if patch is not None and patch.mode == "head":  # every block passed through; the last
            return _REPLACE if g == self.n_blocks - 1 else None  # one's output: the patches joined
        if g < self.start:
            return None
        if patch is not None and patch.mode in ("patch", "shard") and self.first and not p.injected:
            hidden = cut(hidden, self.joint_at[g], p.segments, p.spans, self.family.patches.token_dim)
            p.injected = True
        if not self.first and not p.injected:
            hidden = {k: p.state_in[k] for k in hidden}
            p.injected = True
        if g >= self.end:
            raise StageBoundary(hidden)
        stop = self.cancelled()
        if patch is not None and patch.mode == "shard":
            stop = self.sp.agree(stop)  # every shard stops at this block, or none: no collective is left half
        if stop:
            raise StageCancelled()
        if self.on_block is not None:
            self.on_block(g)
        p.blocks_run += 1
        p.block, p.calls = g, 0
        return hidden

    def _patch_args(self, args: dict) -> dict:
        """A block's arguments for a patch: its position tables cut to the patch's tokens."""
        p, spec = self._pass, self.family.patches
        for name in spec.unsupported_args:
            if args.get(name) is not None:
                raise PatchUnsupported(f"{self._what()} cannot cut this {self.family.name} model's per-token "
                                       f"block input '{name}': {self._off()}")
        for name, dim in spec.positional:
            t = args.get(name)
            if torch.is_tensor(t) or (isinstance(t, (tuple, list)) and any(torch.is_tensor(e) for e in t)):
                args[name] = self._cut_positional(name, t, dim)
        for name, dim in spec.ranges:
            if args.get(name) is not None:
                args[name] = self._rebased(name, args[name], dim)
        for name, dim, spread in spec.per_token:
            t = args.get(name)
            if not (torch.is_tensor(t) and t.dim() > dim and t.shape[dim] > 1):
                continue
            if spread:  # one row per group of tokens (a frame's): each token's row, then cut
                args[name] = t.index_select(dim, self._token_groups(name, spread, t.shape[dim], p).to(t.device))
            elif t.shape[dim] == p.total:  # one row per token
                args[name] = take(t, dim, p.spans)
            else:
                raise PatchUnsupported(f"{self.family.name}'s '{name}' has {t.shape[dim]} rows for {p.total} tokens: "
                                       f"{self._what()} cannot cut it; {self._off()}")
        return args

    def _rebased(self, name: str, ranges, dim: int) -> list:
        """A block argument of (start, stop, row) token ranges over the whole sequence (MiniMax-H3's
        modulation segments) as ranges over this patch's / shard's tokens, counted from its first;
        a row with one entry per token (a LongTensor along ``dim``) is cut with its range.  Once
        per pass: every block gets the same list."""
        p = self._pass
        held = p.rebased.get(name)
        if held is not None and held[0] is ranges:
            return held[1]
        out, at = [], 0
        for s0, s1 in p.spans:
            for a, b, row in ranges:
                lo, hi = max(a, s0), min(b, s1)
                if lo < hi:
                    if torch.is_tensor(row) and row.dim() > dim:
                        row = row.narrow(dim, lo - a, hi - lo)
                    out.append((at + lo - s0, at + hi - s0, row))
            at += s1 - s0
        if sum(b - a for a, b, _ in out) != at:
            raise PatchUnsupported(f"{self.family.name}'s '{name}' does not cover the {p.total} tokens: "
                                   f"{self._what()} cannot cut it; {self._off()}")
        p.rebased[name] = (ranges, out)
        return out

    def _cut_positional(self, name: str, t, dim: int):
        """A position table (a tensor, or a tuple of them as LTXV's (rotations, split flag)) cut to
        this patch's / shard's tokens."""
        if isinstance(t, (tuple, list)):
            return type(t)(self._cut_positional(name, e, dim) if torch.is_tensor(e) else e for e in t)
        p = self._pass
        if t.shape[dim] != p.total:
            raise PatchUnsupported(f"{self.family.name}'s '{name}' covers {t.shape[dim]} tokens, the "
                                   f"sequence {p.total}: {self._what()} cannot cut it; {self._off()}")
        return take(t, dim, p.spans)

    def _token_groups(self, name: str, spread: str, groups: int, p) -> torch.Tensor:
        """For each token of this pass's patch or shard, the row of a per-group block argument
        (e.g. its frame's) that ComfyUI's own ``spread`` function gives it."""
        key = (name, groups, p.total, tuple(p.spans))
        if key not in self._spread:
            import importlib
            module, _, fn = spread.partition(":")
            rows = torch.arange(groups, dtype=torch.float32).view(1, groups, 1)
            index = getattr(importlib.import_module(module), fn)(rows, torch.empty(1, p.total, 0))
            if index.shape[1] != p.total:
                raise PatchUnsupported(f"{self.family.name}'s '{name}' does not spread over the {p.total} tokens: "
                                       f"{self._what()} cannot cut it; {self._off()}")
            self._spread[key] = take(index[0, :, 0].long(), 0, p.spans)
        return self._spread[key]

    def _what(self) -> str:
        shard = self._pass is not None and self._pass.patch is not None and self._pass.patch.mode == "shard"
        return "sequence parallelism" if shard else "patch pipelining"

    def _off(self) -> str:
        return "use sequence_parallel 1" if self._what() == "sequence parallelism" else "turn patches off"

    def _attention(self, previous):
        """ComfyUI's ``optimized_attention_override`` for patch pipelining: a ``fill`` pass stores
        each block's keys/values; a patch writes its fresh keys/values into them and attends
        over the whole sequence (the patches still to come: the previous pass's)."""
        def override(func, *args, **kwargs):
            inner = func if previous is None else (lambda *a, **k: previous(func, *a, **k))
            p = self._pass
            if p is None or p.patch is None or p.block is None or p.patch.mode not in ("fill", "patch", "shard"):
                return inner(*args, **kwargs)
            call, p.calls = p.calls, p.calls + 1
            if call not in self.family.patches.self_attention:
                return inner(*args, **kwargs)
            q, k, v = args[:3]
            dim = 2 if kwargs.get("skip_reshape") else 1
            if p.patch.mode == "shard":
                return self._shard_attention(inner, dim, args, kwargs)
            key = (p.block, p.patch.branch)
            if p.patch.mode == "fill":
                if self.kv.store(key, k, v):  # a new shape: graphs read the old tensors
                    self.graphs.clear()
                return inner(*args, **kwargs)
            mask = kwargs.get("mask", args[4] if len(args) > 4 else None)
            if mask is not None and (any(s != 1 for s in mask.shape[:-1]) or mask.shape[-1] != p.total):
                raise PatchUnsupported("patch pipelining cannot cut an attention mask (e.g. Qwen-Image's text mask "
                                       "from the conditioning, or a mask over the queries): turn patches off")
            cached = self.kv.kv.get(key)
            n = sum(b - a for a, b in p.spans)
            if cached is None or cached[0].shape[dim] != p.total or k.shape[dim] != n:
                raise PatchUnsupported(f"block {p.block}: no keys/values of the whole sequence for this patch "
                                       f"(cached {None if cached is None else tuple(cached[0].shape)}, patch "
                                       f"{tuple(k.shape)}, tokens {p.spans} of {p.total})")
            ck, cv = cached
            at = 0
            for a, b in p.spans:  # this patch's fresh keys/values into the whole sequence's
                ck.narrow(dim, a, b - a).copy_(k.narrow(dim, at, b - a))
                cv.narrow(dim, a, b - a).copy_(v.narrow(dim, at, b - a))
                at += b - a
            return inner(q, ck, cv, *args[3:], **kwargs)
        return override

    def _shard_attention(self, inner, dim: int, args: tuple, kwargs: dict):
        """Sequence parallelism: this shard's queries over every shard's keys/values (the whole
        sequence, in its order): the unsplit attention's rows for this shard's tokens."""
        p = self._pass
        q, k, v = args[:3]
        n = sum(b - a for a, b in p.spans)
        if k.shape[dim] != n or q.shape[dim] != n:
            raise PatchUnsupported(f"block {p.block}: the attention's sequence ({tuple(k.shape)}) is not this "
                                   f"shard's {n} tokens of {p.total}: sequence parallelism cannot run this "
                                   f"{self.family.name} model; use sequence_parallel 1")
        rest, kwargs = list(args[3:]), dict(kwargs)
        mask = kwargs.get("mask", rest[1] if len(rest) > 1 else None)
        if mask is not None and (mask.shape[-1] != p.total or (mask.dim() > 1 and mask.shape[-2] not in (1, p.total))):
            raise PatchUnsupported(f"sequence parallelism cannot cut an attention mask of shape "
                                   f"{tuple(mask.shape)} over {p.total} tokens; use sequence_parallel 1")
        heads = kwargs.get("heads", rest[0] if rest else None)
        try:
            exchange = self.sp.exchange(self.sp_exchange, int(heads))
        except ValueError as e:
            raise PatchUnsupported(f"{self.family.name}: {e}") from None
        if exchange == "ulysses":
            kwargs.pop("mask", None)
            kwargs.pop("heads", None)
            out_heads_first = bool(kwargs.get("skip_output_reshape"))
            kwargs.update(skip_reshape=True, skip_output_reshape=True)

            def attend(qh, kh, vh, g, m):
                return inner(qh, kh, vh, g, m, *rest[2:], **kwargs)
            return self.sp.ulysses(attend, q, k, v, int(heads), dim, p.shards, p.total, mask, out_heads_first)
        k, v = self.sp.gather_kv(k, v, dim, p.shards, p.total)
        if mask is not None:
            if mask.dim() > 1 and mask.shape[-2] == p.total and p.total > 1:  # one row per query: this shard's
                mask = take(mask, mask.dim() - 2, p.spans)
            if "mask" in kwargs:
                kwargs["mask"] = mask
            else:
                rest[1] = mask
        return inner(q, k, v, *rest, **kwargs)

    def _options(self, opts: dict) -> dict:
        """transformer_options with a block-replacement hook on every block of every hooked list
        (wrapping a user's own replacement of that block, if any)."""
        opts = dict(opts)
        replace = dict(opts.get("patches_replace") or {})
        dit = dict(replace.get("dit") or {})
        for bl in self.family.blocks:
            if bl.hook is None:
                continue
            for i in range(len(self.model.get_submodule(bl.path))):
                dit[(bl.hook, i)] = self._hook(bl, self.offsets[bl.path] + i, dit.get((bl.hook, i)))
        replace["dit"] = dit
        opts["patches_replace"] = replace
        if self._pass is not None and self._pass.patch is not None:
            opts["optimized_attention_override"] = self._attention(opts.get("optimized_attention_override"))
        return opts

    def _hook(self, bl: BlockList, g: int, user):
        def hook(args, extra):
            hidden = self._enter(g, {k: args[k] for k in bl.hidden})
            if hidden is _REPLACE:
                p = self._pass
                return join(p.patch.outputs, self.joint_at[g], p.segments, patch_ranges(p.segments, p.patch.count),
                            self.family.patches.token_dim)
            if hidden is None:
                return {k: args[k] for k in bl.hidden}
            args = {**args, **hidden}
            patching = self._pass.patch is not None and self._pass.patch.mode in ("patch", "shard")
            if patching:
                args = self._patch_args(args)
            out = user(args, extra) if user is not None else extra["original_block"](args)
            if not isinstance(out, dict):  # e.g. Kandinsky 5's original_block returns the tensor
                out = {bl.hidden[0]: out}
            if patching and self.last and g == self.n_blocks - 1:
                raise PatchDone(out)
            return out
        return hook

    @contextlib.contextmanager
    def _stand_ins(self):
        """For loops without the hook (and the first-only lists on later stages): the blocks'
        ``forward`` replaced for the duration of the call (the module tree is untouched)."""
        patched = []
        try:
            for bl in self.family.blocks:
                if bl.hook is not None:
                    continue
                for i, module in enumerate(self.model.get_submodule(bl.path).children()):
                    module.forward = self._stand_in(bl, self.offsets[bl.path] + i, module)
                    patched.append(module)
            if not self.first:
                for name in self.family.first_only:
                    for module in self.model.get_submodule(name).children():
                        module.forward = _identity
                        patched.append(module)
            yield
        finally:
            for module in patched:
                del module.forward

    def _stand_in(self, bl: BlockList, g: int, module):
        signature = inspect.signature(type(module).forward)
        returns = bl.returns or bl.hidden
        real = type(module).forward.__get__(module)

        def forward(*args, **kwargs):
            bound = signature.bind(module, *args, **kwargs)
            bound.apply_defaults()
            hidden = self._enter(g, {k: bound.arguments[k] for k in bl.hidden})
            if hidden is _REPLACE:  # the head pass: the last block's output is the patches' / shards' joined
                p = self._pass
                joined = join(p.patch.outputs, self.joint_at[g], p.segments, patch_ranges(p.segments, p.patch.count),
                            self.family.patches.token_dim)
                out = tuple(joined[k] for k in returns)
            elif hidden is not None:
                bound.arguments.update(hidden)
                patching = self._pass.patch is not None and self._pass.patch.mode in ("patch", "shard")
                if patching:
                    self._patch_args(bound.arguments)
                out = real(*bound.args[1:], **bound.kwargs)
                if patching and self.last and g == self.n_blocks - 1:
                    raise PatchDone(dict(zip(returns, out if isinstance(out, tuple) else (out,))))
                return out
            else:
                out = tuple(bound.arguments[k] for k in returns)
            return out[0] if len(out) == 1 else out
        return forward


def joint_order(block: torch.nn.Module, bl: BlockList) -> tuple[str, ...]:
    """The order in which ``block``'s attention joins its hidden-state tokens: the table's
    (``bl.joint``: the current ComfyUI's), reversed for a block built with
    ``flipped_img_txt`` (ComfyUI < 0.14 built HunyuanVideo's double blocks image first)."""
    return tuple(reversed(bl.joint)) if getattr(block, "flipped_img_txt", False) else bl.joint


def _identity(x, *args, **kwargs):
    return x

