"""ComfyUI's model calls as pipeline passes, through the one executor.

On the last rank ComfyUI's sampler calls a ``PipelineProxy`` in place of ``diffusion_model``;
each call is one pass: its plan (``engine.plan``: rows, CFG branch, micro-batches, token
patches) is made from what the guider asks, and plan and inputs (already prepared by
ComfyUI's ``_apply_model``) go to the other stages of the pipeline as one message.  Every
rank cuts the inputs into the plan's micro-batches and runs ComfyUI's own forward on each
with only its own blocks (``staging.StageForward``), in the executor's loop; the last
rank's outputs, gathered across a CFG group, are the proxy's return value.
"""
from __future__ import annotations

import functools
import inspect
import time

import torch

from . import carry
from ..engine.comm import PipelineStopped
from ..engine import tree
from ..engine.executor import Executor
from ..engine.plan import EXACT, FILL, PassPlan, Unit, plan_pass
from .token_patches import PatchCall, auto_count, check_inputs
from ..engine.sequence import SequenceGroup
from ..engine.timeline import Timeline


# -- a pass's inputs: one message (pytree leaves + spec), cut into micro-batches ---------
# What of ComfyUI's per-call transformer_options the stages see (the rest are callables of
# the ComfyUI process, refused when the job is built, or set by the forward itself).
PASS_OPTIONS = ("sigmas", "sample_sigmas")


# Entries of dict model inputs that are not sent: host objects the model rebuilds itself from
# the rest (MiniMax-H3's PackedLayout: _forward builds it when absent; the same output).
REBUILT = {"minimax_payload": ("layout", "_text_token_tags_list")}


def rows_of(x) -> int:
    """Batch rows of a model input: a tensor, or LTX-2's [video, audio] list."""
    return (x[0] if isinstance(x, (list, tuple)) else x).shape[0]


def shape_of(x) -> tuple:
    """A model input's shape (LTX-2: the shapes of its parts)."""
    if isinstance(x, (list, tuple)):
        return tuple(tuple(e.shape) for e in x)
    return tuple(x.shape)


def pass_inputs(x, timestep, context, kwargs: dict) -> dict:
    """The model inputs of a pass as one dict, without None entries and what ``REBUILT`` names."""
    out = {}
    for k, v in {"x": x, "timestep": timestep, "context": context, **kwargs}.items():
        if v is None:
            continue
        if isinstance(v, dict) and k in REBUILT:
            v = {n: e for n, e in v.items() if n not in REBUILT[k]}
        out[k] = v
    return out


def pass_options(options: dict | None, rows: int) -> tuple[dict, dict]:
    """(per-row options, whole options) of the transformer options the stages see: a
    ``sigmas`` of one value per branch becomes one per row, cut with the rows."""
    per_row, whole = {}, {}
    for k in PASS_OPTIONS:
        v = (options or {}).get(k)
        if not torch.is_tensor(v):
            continue
        if k == "sigmas" and v.dim() == 1 and v.shape[0] and rows % v.shape[0] == 0:
            per_row[k] = v.repeat(rows // v.shape[0])
        else:
            whole[k] = v
    return per_row, whole


def encode_pass(plan: PassPlan, inputs: dict, per_row: dict, whole: dict) -> dict:
    """A pass for the other stages: the plan and the pipeline's inputs as one tensor dict."""
    try:
        return tree.to_message({"plan": plan.to_data(), "inputs": inputs, "per_row": per_row, "whole": whole},
                               "the model inputs")
    except tree.TreeError as e:
        raise carry.CarryError(f"{e}: it cannot cross a stage boundary") from None


def decode_pass(msg: dict) -> tuple[PassPlan, dict, dict, dict]:
    value = tree.from_message(msg)
    return PassPlan.from_data(value["plan"]), value["inputs"], value["per_row"], value["whole"]


def micro_batches(plan: PassPlan, pipeline: int, inputs: dict, per_row: dict, whole: dict) -> dict:
    """{micro-batch: (model kwargs, transformer options)} of a pipeline's units.  ``inputs``
    hold the pipeline's rows (``plan.rows_of``); a tensor whose leading dimension is that
    count (also inside lists) is cut to the micro-batch's rows, the rest (dicts too) is whole."""
    local = {r: i for i, r in enumerate(plan.rows_of(pipeline))}
    total, out = len(local), {}
    for u in plan.for_pipeline(pipeline):
        if u.micro_batch in out:
            continue
        a, n = local[u.rows[0]], len(u.rows)

        def cut(v, a=a, n=n):
            if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == total and n != total:
                return v[a:a + n]
            if isinstance(v, (list, tuple)):
                return type(v)(cut(e) for e in v)
            return v
        opts = {**whole, **{k: v[a:a + n] for k, v in per_row.items()}, "cond_or_uncond": list(u.branch)}
        out[u.micro_batch] = ({k: cut(v) for k, v in inputs.items()}, opts)
    return out


def patch_call(unit: Unit, sp_rank: int = 0) -> PatchCall | None:
    """What a unit's stage call does with the token sequence: this rank's sequence-parallel
    shard, a token patch, an exact pass filling the patch caches; None: an exact pass."""
    if unit.shards > 1:
        return PatchCall("shard", unit.branch, sp_rank, unit.shards)
    if unit.patches > 1:
        return PatchCall("patch", unit.branch, unit.patch, unit.patches)
    return PatchCall("fill", unit.branch) if unit.patches == FILL else None


# -- the ranks ------------------------------------------------------------------------
class ComfyPipelineRunner:
    """One job's passes on this rank, through the executor: on the last rank each call of
    the proxy (``run_pass``), on the others ``serve``."""

    def __init__(self, ctx, stage, micro_batch_size: int = 1, batched: bool = False,
                 cancelled=None, options: dict | None = None, on_block=None, pipelining: dict | None = None,
                 sequence_exchange: str = "auto"):
        # Patch pipelining (opt-in): M token patches per pass after `warmup` exact steps (M 0: from
        # the token count, ``token_patches.auto_count``).
        self.pipelining = bool(pipelining)
        self.patch_count = int((pipelining or {}).get("count") or 0)
        self.patch_warmup = int((pipelining or {}).get("warmup") or 0)
        self.patched_passes = 0
        self.step = 0  # last rank: the sampler's step (its callback counts them; no device sync)
        self._filled = None  # the last pass's shape: the caches hold its keys/values
        stage.forward.begin_job(self.pipelining)
        self.ctx, self.stage, self.topo = ctx, stage, ctx.topo
        self.micro_batch_size = micro_batch_size
        self.batched = batched
        self.options = dict(options or {})  # the job's carried transformer options (plain values)
        self.timeline = Timeline(ctx.device, ctx.topo.rank)
        self.executor = Executor(ctx, self.timeline, self._forward, self._head)
        self.passes = 0
        self.first_pass = None  # monotonic time the first pass began here
        self._mb: dict = {}  # the current pass's micro-batches: {index: (kwargs, options)}
        stage.forward.cancelled = cancelled or (lambda: False)
        stage.forward.on_block = on_block
        stage.forward.sp = SequenceGroup(ctx) if ctx.topo.sp_size > 1 else None
        stage.forward.sp_exchange = sequence_exchange

    def _forward(self, unit: Unit, state_in, patch=None):
        if self.first_pass is None:
            self.first_pass = time.monotonic()
        kw, opts = self._mb[unit.micro_batch]
        kw = dict(kw)
        args = (kw.pop("x"), kw.pop("timestep"))  # positional, as ComfyUI's BaseModel passes them
        return self.stage.forward(args, {**kw, "transformer_options": {**self.options, **opts}}, state_in,
                                  patch or patch_call(unit, self.topo.sp_rank))

    def _head(self, unit: Unit, outputs: list):
        """ComfyUI's head on a micro-batch's patches or sequence shards joined (the driver)."""
        count = unit.shards if unit.shards > 1 else unit.patches
        return self._forward(unit, None, PatchCall("head", unit.branch, count=count, outputs=outputs))

    # every rank but the last -----------------------------------------------------------
    def serve(self) -> None:
        """Receive a pass -> my stage per unit -> send, until the final STOP."""
        self.passes = self.executor.serve(self._serve_pass)

    def _serve_pass(self, msg: dict) -> bool:
        plan, inputs, per_row, whole = decode_pass(msg)
        self._mb = micro_batches(plan, self._pipeline(plan), inputs, per_row, whole)
        if plan.patch_mode > 1:
            self.patched_passes += 1
        return self.executor.run(plan)[1]

    def _pipeline(self, plan: PassPlan) -> int:
        return self.topo.cfg_rank if plan.pipelines > 1 else 0

    # last rank ----------------------------------------------------------------------
    def run_pass(self, x, timestep, context=None, control=None, transformer_options={}, **kwargs):
        if control is not None:
            raise carry.CarryError("ControlNet is not supported by PP KSampler yet")
        topo = self.topo
        self.timeline.step = self.passes
        self.passes += 1
        plan = self.plan(x, transformer_options, kwargs)
        mine = plan.rows_of(self._pipeline(plan))
        out, stopped = None, False
        if mine:
            inputs = pass_inputs(x, timestep, context, kwargs)
            if len(mine) != plan.rows:
                inputs = _pick_rows(inputs, mine, plan.rows)
            per_row, whole = pass_options(transformer_options, len(mine))
            if topo.pass_ranks:
                self.executor.send_pass(encode_pass(plan, inputs, per_row, whole))
            self._mb = micro_batches(plan, self._pipeline(plan), inputs, per_row, whole)
            out, stopped = self.executor.run(plan)
        if self.executor.agree_stop(stopped):
            raise PipelineStopped("cancelled")
        return self.executor.collect(plan, out)

    def plan(self, x, transformer_options: dict, kwargs: dict) -> PassPlan:
        """This pass's plan, from what ComfyUI's guider asks: the rows' CFG branches
        (``cond_or_uncond``, one per equal run of rows), the job's micro-batching, CFG group
        and patch pipelining."""
        topo, rows = self.topo, rows_of(x)
        cou = list(transformer_options.get("cond_or_uncond") or [0])
        per = rows // len(cou)
        branch = [cou[r // per] for r in range(rows)]
        mine = [r for r in range(rows) if topo.cfg_size == 1 or branch[r] == topo.cfg_rank]
        size = max(1, len(mine)) if self.batched else self.micro_batch_size
        if topo.sp_size > 1:  # sequence parallelism: exact, every pass cut in shards
            check_inputs(self.stage.forward.family, self.stage.forward.model,
                         _pick_rows(dict(kwargs), mine, rows) if len(mine) != rows else kwargs,
                         "sequence parallelism", "use sequence_parallel 1")
            return plan_pass(branch, stages=topo.pp_size, pipelines=topo.cfg_size, micro_batch_size=size,
                             shards=topo.sp_size)
        exact = plan_pass(branch, stages=topo.pp_size, pipelines=topo.cfg_size, micro_batch_size=size)
        units = exact.for_pipeline(self._pipeline(exact))
        mode = self._patch_mode((shape_of(x), len(mine), tuple(len(u.rows) for u in units),
                                 tuple(b for u in units for b in u.branch)), x, mine, kwargs)
        if mode == EXACT:
            return exact
        return plan_pass(branch, stages=topo.pp_size, pipelines=topo.cfg_size, micro_batch_size=size, patches=mode)

    def _patch_mode(self, shape, x, mine, kwargs) -> int:
        """Patches for this pass (M), or FILL (exact, filling the caches), or EXACT (patches off).
        Patched once the step reaches ``warmup`` and the previous pass had this pass's shape
        (its keys/values are in the caches); every pass leaves them filled for the next."""
        if not self.pipelining:
            return EXACT
        ready, self._filled = self._filled == shape, shape
        if ready and self.step >= self.patch_warmup:
            check_inputs(self.stage.forward.family, self.stage.forward.model,
                         _pick_rows(dict(kwargs), mine, rows_of(x)) if len(mine) != rows_of(x) else kwargs)
            self.patched_passes += 1
            return self.patch_count or auto_count(self.stage.forward.tokens, self.topo.pp_size)
        return FILL

    def stop_agreed(self, local: bool) -> bool:
        return self.executor.agree_stop(local)

    def end(self) -> None:
        """Last rank: sampling is over; let the other stages of this pipeline go."""
        self.executor.end()


def _pick_rows(inputs: dict, rows: list[int], total: int) -> dict:
    """The ``rows`` of every per-row tensor (leading dimension ``total``, also inside lists)."""
    idx = torch.tensor(rows)

    def pick(v):
        if isinstance(v, (list, tuple)):
            return type(v)(pick(e) for e in v)
        if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == total:
            return v.index_select(0, idx.to(v.device))
        return v
    return {k: pick(v) for k, v in inputs.items()}


class PipelineProxy(torch.nn.Module):
    """Stands in for ``diffusion_model`` on the last rank: each call is one pipeline pass.

    Attribute reads fall through to the real (mostly meta) model, because ComfyUI's model
    code asks it for shapes (e.g. Wan's ``patch_embedding.weight.shape``).  Neither the
    runner nor the real model is a submodule: ComfyUI's memory management sees no weights.
    """

    def __init__(self, runner: ComfyPipelineRunner, real, dtype):
        super().__init__()
        object.__setattr__(self, "runner", runner)
        object.__setattr__(self, "real", real)
        self.dtype = dtype

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "real"), name)

    def forward(self, *args, **kwargs):
        """One pass; through the model's DIFFUSION_MODEL wrappers (EasyCache: a skipped call
        is a skipped pass) where the model's own forward applies them."""
        real = object.__getattribute__(self, "real")
        forward = type(real).forward
        names = forward.__code__.co_names
        if "new_class_executor" in names and "_forward" in names and hasattr(type(real), "_forward"):
            return forward(_PassAsModel(real, self.runner), *args, **kwargs)
        return _pass_from_args(self.runner, type(real).forward, real, args, kwargs)


@functools.lru_cache(maxsize=None)
def _signature(function):
    return inspect.signature(function)


def _pass_from_args(runner, signature_of, real, args, kwargs):
    """Call ``runner.run_pass`` with a forward's arguments, named as ``signature_of`` names them
    (the first two are the input and the timestep, whatever a family calls them)."""
    signature = _signature(signature_of)
    bound = signature.bind(real, *args, **kwargs)
    params = list(bound.arguments.items())[1:]  # without self
    named = {}
    for name, value in params[2:]:
        param = signature.parameters[name]
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif param.kind is not inspect.Parameter.VAR_POSITIONAL and not (
                param.default is not inspect.Parameter.empty and _same(value, param.default)):
            named[name] = value  # a default passed on by the model's own forward is left to the stages
    x, timestep = params[0][1], params[1][1]
    return runner.run_pass(x, timestep, **named)


def _same(value, default) -> bool:
    if torch.is_tensor(value) or torch.is_tensor(default):
        return value is default
    try:
        return bool(value == default)
    except Exception:
        return False


class _PassAsModel:
    """The real model with its ``_forward`` replaced by a pipeline pass: its own ``forward``
    runs the DIFFUSION_MODEL wrappers around it, as around the real computation."""

    def __init__(self, real, runner):
        object.__setattr__(self, "_real", real)
        object.__setattr__(self, "_runner", runner)

    def __getattr__(self, name):
        return getattr(object.__getattribute__(self, "_real"), name)

    def _forward(self, *args, **kwargs):
        real = object.__getattribute__(self, "_real")
        return _pass_from_args(object.__getattribute__(self, "_runner"), type(real)._forward, real, args, kwargs)
