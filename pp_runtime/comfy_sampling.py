"""ComfyUI's own sampling, on the last rank, over a pipeline.

The last rank of each pipeline runs ``comfy.sample.sample`` unchanged (the stock
KSampler's path: sigmas, noise from the seed, conditioning -> model inputs, CFG, every
sampler) on a ModelPatcher whose ``diffusion_model`` is a ``PipelineProxy``.  Each call
of the proxy is one *pass*: its inputs (already prepared by ComfyUI's ``_apply_model``)
go to every other rank of the pipeline as one tensor dict; every rank cuts them into the
same micro-batches and runs ComfyUI's own forward on each, with only its own blocks
(``staging.StageForward``): rank 0 from the inputs, the others from the hidden state the
previous rank sends; the last rank's forward runs on into the head, and its outputs,
concatenated, are the proxy's return value.  The other ranks loop "receive a pass -> my
stage per micro-batch -> send" until a STOP comes on the pass channel, which the last rank
sends when sampling ends (done or cancelled).

Cancel: every rank checks between its blocks.  A rank that stops mid-pass sends STOP in
place of its next output and sends nothing more; a rank that receives STOP passes it on;
a rank that has stopped still receives what its predecessor sends for this pass (up to
the pass's micro-batches, or its STOP), so every send has its receive.  The last rank
then ends sampling and sends the final STOP on the pass channel.

CFG-parallel (a CFG group of 2): both last ranks run the same sampler in lockstep; in
each pass pipeline 0 computes the cond rows and pipeline 1 the uncond rows; the last
ranks agree on whether the pass was cancelled, then exchange their rows (broadcast over
the CFG group) so both hold the full output.
"""
from __future__ import annotations

import functools
import inspect
import json
import time

import torch
import torch.distributed as dist

from . import comfy_bridge as cb
from . import sampling_patches
from .comm import PipelineStopped
from .families import family_for
from .jobs import Split
from .patches import PatchCall, auto_count, check_inputs
from .staging import StageCancelled, StageForward, stage_prefixes
from .timeline import Timeline

ROWS = "__rows"  # micro-batch sizes of a pass, in order
BRANCH = "__branch"  # cond (0) / uncond (1) of each row
PATCHES = "__patches"  # patch pipelining: M patches per micro-batch, -1 an exact pass that fills the cache


# -- placement -----------------------------------------------------------------------
class ComfyStage:
    """ComfyUI's model for this rank: meta everywhere except this stage's weights (its
    blocks and the shared non-block weights)."""

    def __init__(self, spec: dict, counts: list[int], topo, device):
        hwm0 = _peak_rss()
        start, end = Split(tuple(counts)).ranges[topo.pp_rank]
        self.range = (start, end)
        self.dtype = cb.dtype_of(spec["dtype"])
        cb.check_stamp(spec)  # every rank reads the file the job was built for
        self.base, layout = cb.meta_base_model(spec["path"], self.dtype, cb.dtype_of(spec.get("manual_cast")),
                                               spec.get("config"), real_buffers=True)
        dm = self.base.diffusion_model
        self.family = family_for(dm)
        prefixes = stage_prefixes(dm, self.family, start, end, topo.is_first, topo.is_last)
        self.bytes_read = cb.load_stage_weights(dm, spec["path"], layout, prefixes, device)
        self.base.model_sampling.to(device)
        # Buffers the model computes itself (not in the file) go to the device; saved ones of
        # other stages' blocks (allocated by the constructor, never filled) are dropped.
        saved = cb.saved_names(dm)
        for name, buf in list(dm.named_buffers()):
            if name in saved and not name.startswith(tuple(prefixes)):
                _set_buffer(dm, name, buf.to("meta"))
            elif not buf.is_meta and buf.device != torch.device(device):
                _set_buffer(dm, name, buf.to(device))
        self.forward = StageForward(dm, self.family, start, end, topo.is_first, topo.is_last)
        # What placing this stage cost in host RAM at its peak (measured, for the tests and the panel).
        self.load_peak_growth = _peak_rss() - hwm0
        self.device, self.stage = device, topo.pp_rank
        self.where = torch.device(device)
        self.backup: dict[str, torch.Tensor] = {}  # unpatched weights of the keys patched now
        self.patches_id = ""
        # The last rank's MODEL for ComfyUI's sampler: one per placed stage, kept across jobs
        # (each job samples with a clone of it, as stock samples with clones of the loader's
        # MODEL), so ComfyUI's model management never finds a dead entry of an earlier job.
        self.patcher = None

    @property
    def parked(self) -> bool:
        return self.where.type != self.device.type

    def to(self, where: torch.device) -> None:
        """Move this stage's weights (only those: the rest of the model is meta) to ``where``:
        host RAM to park them, the device to use them again."""
        import comfy.utils
        tensors = [(n, p) for n, p in self.base.named_parameters() if not p.is_meta]
        for name, p in tensors:
            comfy.utils.set_attr_param(self.base, name, p.data.to(where))
        self.backup = {k: v.to(where) for k, v in self.backup.items()}
        self.where = torch.device(where)
        self.forward.graphs.clear()  # captured patch calls read the weights where they were

    def apply_patches(self, job: dict, tensors: dict) -> bool:
        """Weight patches (LoRA) for this stage's keys, with ComfyUI's own patch math.

        The base weights stay in memory unpatched (``backup``), so a new LoRA or strength
        re-patches from them: nothing is read from disk again.  Returns whether it patched.
        """
        if job.get("patches_id", "") == self.patches_id:
            return False
        import comfy.model_patcher
        import comfy.utils
        for key, weight in self.backup.items():
            comfy.utils.set_attr_param(self.base, key, weight)
        self.backup = {}
        patches = cb.unpack_weight_patches(job.get("patches", {}), tensors, self.stage)
        if patches:
            patcher = comfy.model_patcher.ModelPatcher(self.base, load_device=self.device,
                                                       offload_device=self.device)
            patcher.patches = patches
            for key in patches:
                patcher.patch_weight_to_device(key, device_to=self.device)
            self.backup = {k: v.weight for k, v in patcher.backup.items()}
        self.patches_id = job.get("patches_id", "")
        self.forward.graphs.clear()  # new weight tensors
        return True


def _set_buffer(module, name: str, value) -> None:
    owner, _, leaf = name.rpartition(".")
    (module.get_submodule(owner) if owner else module)._buffers[leaf] = value


def _peak_rss() -> int:
    """This process's peak resident set (VmHWM), in bytes; 0 where /proc is absent."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return 0


# -- pass inputs <-> one tensor dict ----------------------------------------------------
# What of ComfyUI's per-call transformer_options the stages see (the rest are callables of
# the ComfyUI process, refused when the job is built, or set by the forward itself).
PASS_OPTIONS = ("sigmas", "sample_sigmas")
# Entries of dict model inputs that are not sent: host objects the model rebuilds itself from
# the rest (MiniMax-H3's PackedLayout: _forward builds it when absent; the same output).
REBUILT = {"minimax_payload": ("layout", "_text_token_tags_list")}


def rows_of(x) -> int:
    """Batch rows of a model input: a tensor, or LTX-2's [video, audio] list."""
    return (x[0] if isinstance(x, (list, tuple)) else x).shape[0]


def encode_pass(x, timestep, context, kwargs: dict, rows: list[int], branch: list[int],
                options: dict | None = None, patches: int = 0) -> dict:
    """A pass as one tensor dict: per-row tensors are cut into micro-batches by the receiver
    (``r.`` keys, or a leading dimension equal to the pass's rows), ``w.`` keys are whole.
    Keys say what a value was: ``t.`` tensor, ``l.``/``u.`` list/tuple of tensors, ``b.``/``i.``/
    ``f.``/``s.`` bool/int/float/str, ``n.`` list of numbers, ``j.`` a dict (its pytree spec and
    plain leaves as JSON; its tensors ``jt.<name>.<j>``), whole, without what ``REBUILT`` names."""
    total = sum(rows)
    out = {ROWS: torch.tensor(rows), BRANCH: torch.tensor(branch)}
    if patches:
        out[PATCHES] = torch.tensor([patches])
    for k, v in {"x": x, "timestep": timestep, "context": context, **kwargs}.items():
        if v is None:
            continue
        if torch.is_tensor(v):
            out[f"t.{k}"] = v
        elif isinstance(v, (list, tuple)) and v and all(torch.is_tensor(e) for e in v):
            for j, e in enumerate(v):
                out[f"{'u' if isinstance(v, tuple) else 'l'}.{k}.{j}"] = e
        elif isinstance(v, bool):
            out[f"b.{k}"] = torch.tensor(v)
        elif isinstance(v, int):
            out[f"i.{k}"] = torch.tensor(v, dtype=torch.int64)
        elif isinstance(v, float):
            out[f"f.{k}"] = torch.tensor(v, dtype=torch.float64)
        elif isinstance(v, (list, tuple)) and v and all(isinstance(e, (int, float)) and not isinstance(e, bool)
                                                      for e in v):  # e.g. vace_strength
            dtype = torch.int64 if all(isinstance(e, int) for e in v) else torch.float64
            out[f"n.{k}"] = torch.tensor(list(v), dtype=dtype)
        elif isinstance(v, str):  # e.g. ref_latents_method (Kontext / Qwen edit)
            out[f"s.{k}"] = torch.tensor(list(v.encode()), dtype=torch.uint8)
        elif isinstance(v, dict):  # e.g. MiniMax-H3's minimax_payload
            v = {n: e for n, e in v.items() if n not in REBUILT.get(k, ())}
            spec = cb.pack_tree(v, f"jt.{k}", out, f"model input '{k}'")
            out[f"j.{k}"] = torch.tensor(list(json.dumps(spec).encode()), dtype=torch.uint8)
        else:
            raise cb.CarryError(f"model input '{k}' ({type(v).__name__}) cannot cross a stage boundary")
    for k in PASS_OPTIONS:
        v = (options or {}).get(k)
        if not torch.is_tensor(v):
            continue
        if k == "sigmas" and v.dim() == 1 and v.shape[0] and total % v.shape[0] == 0:
            out[f"r.o.{k}"] = v.repeat(total // v.shape[0])  # one per row, like the timestep
        else:
            out[f"w.o.{k}"] = v
    return out


def decode_pass(msg: dict):
    """-> list of (model kwargs, branch list, transformer options) per micro-batch."""
    rows = msg[ROWS].tolist()
    branch = msg[BRANCH].tolist()
    total = sum(rows)
    seqs: dict[tuple, list] = {}
    kw, opts, row_opts, trees = {}, {}, {}, {}
    for key, v in msg.items():
        if key in (ROWS, BRANCH, PATCHES):
            continue
        kind, _, name = key.partition(".")
        if kind == "t":
            kw[name] = v
        elif kind in ("l", "u"):
            n, _, j = name.rpartition(".")
            seqs.setdefault((kind, n), []).append((int(j), v))
        elif kind in ("b", "i", "f"):
            kw[name] = v.item()
        elif kind == "s":
            kw[name] = bytes(v.tolist()).decode()
        elif kind == "n":
            kw[name] = v.tolist()
        elif kind == "j":
            trees[name] = json.loads(bytes(v.tolist()).decode())
        elif kind == "r":
            row_opts[name.removeprefix("o.")] = v
        elif kind == "w":
            opts[name.removeprefix("o.")] = v
    for (kind, n), items in seqs.items():
        values = [v for _, v in sorted(items, key=lambda e: e[0])]
        kw[n] = tuple(values) if kind == "u" else values
    for n, spec in trees.items():  # a dict input: whole in every micro-batch (``cut`` leaves dicts alone)
        kw[n] = cb.unpack_tree(spec, f"jt.{n}", msg)
    out, a = [], 0
    for r in rows:
        def cut(v, a=a, r=r):
            if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == total and (a, r) != (0, total):
                return v[a:a + r]
            if isinstance(v, (list, tuple)):
                return type(v)(cut(e) for e in v)
            return v
        mb_opts = {**opts, **{k: v[a:a + r] for k, v in row_opts.items()}, "cond_or_uncond": branch[a:a + r]}
        out.append(({k: cut(v) for k, v in kw.items()}, branch[a:a + r], mb_opts))
        a += r
    return out


def units(msg: dict, micro_batches: list) -> list:
    """A pass's work on every rank, in order: (micro-batch index, kwargs, branch, options,
    patches.PatchCall or None); with patches, M units per micro-batch."""
    mode = int(msg[PATCHES].item()) if PATCHES in msg else 0
    out = []
    for i, (kw, branch, opts) in enumerate(micro_batches):
        key = tuple(branch)
        if mode > 1:
            out += [(i, kw, branch, opts, PatchCall("patch", key, p, mode)) for p in range(mode)]
        else:
            out.append((i, kw, branch, opts, PatchCall("fill", key) if mode == -1 else None))
    return out


def cat_outputs(outs: list):
    """Micro-batch outputs in row order: tensors, or LTX-2's [video, audio] lists."""
    if isinstance(outs[0], (list, tuple)):
        return [torch.cat([o[j] for o in outs]) for j in range(len(outs[0]))]
    return torch.cat(outs)


# -- the ranks ------------------------------------------------------------------------
class ComfyPipelineRunner:
    def __init__(self, ctx, stage: ComfyStage, micro_batch_size: int = 1, batched: bool = False,
                 cancelled=None, options: dict | None = None, on_block=None, patches: dict | None = None):
        self.ctx, self.stage = ctx, stage
        # Patch pipelining (opt-in): M patches per pass after `warmup` exact steps (M 0: from the
        # token count, ``patches.auto_count``).
        self.patches_on = bool(patches)
        self.patch_count = int((patches or {}).get("count") or 0)
        self.patch_warmup = int((patches or {}).get("warmup") or 0)
        self.patched_passes = 0
        self.step = 0  # last rank: the sampler's step (its callback counts them; no device sync)
        self._filled = None  # the last pass's shape: the caches hold its keys/values
        stage.forward.begin_job(self.patches_on)
        self.topo, self.p2p = ctx.topo, ctx.p2p
        self.micro_batch_size = micro_batch_size
        self.batched = batched
        self.options = dict(options or {})  # the job's carried transformer options (plain values)
        self.timeline = Timeline(ctx.device, ctx.topo.rank)
        self.passes = 0
        self.first_pass = None  # monotonic time the first pass began here
        stage.forward.cancelled = cancelled or (lambda: False)
        stage.forward.on_block = on_block

    def _forward(self, kw: dict, opts: dict, state_in, label: str, patch=None):
        if self.first_pass is None:
            self.first_pass = time.monotonic()
        kw = dict(kw)
        args = (kw.pop("x"), kw.pop("timestep"))  # positional, as ComfyUI's BaseModel passes them
        with self.timeline.span("compute", label):
            return self.stage.forward(args, {**kw, "transformer_options": {**self.options, **opts}}, state_in, patch)

    def _others(self) -> list[int]:
        """The ranks of this pipeline that the last rank sends each pass to."""
        return self.topo.pp_ranks[:-1]

    # every rank but the last -----------------------------------------------------------
    def serve(self) -> None:
        """Receive a pass -> my stage per micro-batch -> send, until the final STOP."""
        topo, p2p = self.topo, self.p2p
        try:
            while True:
                self.timeline.step = self.passes
                with self.timeline.span("wait", "pass"):
                    msg = p2p.irecv_tensor_dict(topo.last_rank).wait()  # PipelineStopped: sampling ended
                self.passes += 1
                if not self._serve_pass(units(msg, decode_pass(msg))):
                    # This run is over (cancelled): the last rank's final STOP ends the loop.
                    p2p.irecv_tensor_dict(topo.last_rank).wait()
                    raise RuntimeError("the last rank sent another pass after the run was cancelled")
        except PipelineStopped:
            pass
        finally:
            p2p.flush()

    def _serve_pass(self, work) -> bool:
        """One pass on a non-last rank (its ``units``); False if the run stopped during it."""
        topo, p2p = self.topo, self.p2p
        sent_stop = False
        if work and work[0][4] is not None and work[0][4].mode == "patch":
            self.patched_passes += 1
        for i, kw, branch, opts, patch in work:
            state = None
            if not topo.is_first:
                with self.timeline.span("wait", _label(branch, i, patch)):
                    try:
                        state = p2p.irecv_tensor_dict(topo.prev_rank).wait()
                    except PipelineStopped:  # the previous rank stopped: nothing more comes from it
                        if not sent_stop:
                            p2p.isend_stop(topo.next_rank)
                        return False
            if sent_stop:
                continue  # stopped: only receive what the previous rank still sends
            try:
                out = self._forward(kw, opts, state, _label(branch, i, patch), patch)
            except StageCancelled:
                p2p.isend_stop(topo.next_rank)
                sent_stop = True
                if topo.is_first:
                    return False
                continue
            p2p.isend_tensor_dict(out, topo.next_rank)
        return not sent_stop

    # last rank ----------------------------------------------------------------------
    def run_pass(self, x, timestep, context=None, control=None, transformer_options={}, **kwargs):
        if control is not None:
            raise cb.CarryError("ControlNet is not supported by PP KSampler yet")
        topo = self.topo
        self.timeline.step = self.passes
        self.passes += 1
        rows = rows_of(x)
        cou = list(transformer_options.get("cond_or_uncond") or [0])
        per = rows // len(cou)
        branch = [cou[r // per] for r in range(rows)]
        mine = [r for r in range(rows) if topo.cfg_size == 1 or branch[r] == topo.cfg_rank]
        out_mine, stopped = None, False
        if mine:
            out_mine, stopped = self._run_rows(mine, branch, x, timestep, context, kwargs, transformer_options)
        if self.stop_agreed(stopped):
            raise PipelineStopped("cancelled")
        if topo.cfg_size == 1:
            return out_mine
        return self._exchange(rows, branch, mine, out_mine)

    def _run_rows(self, mine, branch, x, timestep, context, kwargs, options):
        """This pipeline's rows through its stages; (output, stopped)."""
        total, n = rows_of(x), len(mine)
        idx = torch.tensor(mine)

        def pick(v):
            if isinstance(v, (list, tuple)):
                return type(v)(pick(e) for e in v)
            if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == total and n != total:
                return v.index_select(0, idx.to(v.device))
            return v
        kw = {k: pick(v) for k, v in kwargs.items()}
        x, timestep, context = pick(x), pick(timestep), pick(context)
        size = n if self.batched else self.micro_batch_size
        sizes = [min(size, n - a) for a in range(0, n, size)]
        my_branch = [branch[r] for r in mine]
        mode = self._patch_mode((rows_of_shape(x), tuple(sizes), tuple(my_branch)), kw)
        msg = encode_pass(x, timestep, context, kw, sizes, my_branch, options, patches=mode)
        p2p, topo = self.p2p, self.topo
        if topo.pp_size > 1:
            for r in self._others():
                p2p.isend_tensor_dict(msg, r)
        outs, pending, cancelled = [], [], False
        for i, kwm, b, opts, patch in units(msg, decode_pass(msg)):
            state = None
            if topo.pp_size > 1:
                with self.timeline.span("wait", _label(b, i, patch)):
                    try:
                        state = p2p.irecv_tensor_dict(topo.prev_rank).wait()
                    except PipelineStopped:
                        return None, True
            if cancelled:
                continue  # receive what the previous rank still sends for this pass
            try:
                out = self._forward(kwm, opts, state, _label(b, i, patch), patch)
                if patch is None or patch.mode != "patch":
                    outs.append(out)
                    continue
                # The last block's output for this patch.  A copy: blocks that add in place (Flux's)
                # return the received state's own buffer, which the next patches' receives reuse.
                pending.append({k: v.clone() for k, v in out.items()})
                if patch.index == patch.count - 1:  # ComfyUI's head on the patches joined
                    head = PatchCall("head", patch.branch, count=patch.count, outputs=pending)
                    outs.append(self._forward(kwm, opts, None, _label(b, i) + " head", head))
                    pending = []
            except StageCancelled:
                cancelled = True
        return (None, True) if cancelled else (cat_outputs(outs), False)

    def _patch_mode(self, shape, kwargs) -> int:
        """Patches for this pass (M), or -1 (exact, filling the caches), or 0 (patches off).
        Patched once the step reaches ``warmup`` and the previous pass had this pass's shape
        (its keys/values are in the caches); every pass leaves them filled for the next."""
        if not self.patches_on:
            return 0
        ready, self._filled = self._filled == shape, shape
        if ready and self.step >= self.patch_warmup:
            check_inputs(self.stage.forward.family, self.stage.forward.model, kwargs)
            self.patched_passes += 1
            return self.patch_count or auto_count(self.stage.forward.tokens, self.topo.pp_size)
        return -1

    def _exchange(self, rows, branch, mine, out_mine):
        """Both last ranks of a CFG group end with the full output, rows in order (the output
        is a tensor, or LTX-2's [video, audio] list: up to 4 parts of up to 8 dimensions)."""
        ctx, topo = self.ctx, self.topo
        self.p2p.flush()  # nothing point-to-point in flight across a collective
        group_ranks = topo.cfg_ranks
        full, listed = None, None
        for c in range(topo.cfg_size):
            rows_c = [r for r in range(rows) if branch[r] == c]
            if not rows_c:
                continue
            header = torch.zeros(1 + 4 * 9, dtype=torch.int64)
            if c == topo.cfg_rank:
                parts = out_mine if isinstance(out_mine, (list, tuple)) else [out_mine]
                header[0] = len(parts) if isinstance(out_mine, (list, tuple)) else -1
                for j, t in enumerate(parts):
                    header[1 + 9 * j] = t.dim()
                    header[2 + 9 * j: 2 + 9 * j + t.dim()] = torch.tensor(t.shape)
            dist.broadcast(header, src=group_ranks[c], group=ctx.cfg_cpu_group)
            listed = int(header[0]) > 0
            count = int(header[0]) if listed else 1
            if full is None:
                full = [None] * count
            for j in range(count):
                dims = header[2 + 9 * j: 2 + 9 * j + int(header[1 + 9 * j])].tolist()
                mine_j = (out_mine[j] if listed else out_mine) if c == topo.cfg_rank else None
                buf = mine_j.float().contiguous() if mine_j is not None else torch.empty(
                    dims, dtype=torch.float32, device=ctx.device)
                dist.broadcast(buf, src=group_ranks[c], group=ctx.cfg_group)
                if full[j] is None:
                    full[j] = torch.empty([rows] + dims[1:], dtype=torch.float32, device=ctx.device)
                full[j][torch.tensor(rows_c, device=ctx.device)] = buf
        return full if listed else full[0]

    def stop_agreed(self, local: bool) -> bool:
        if self.topo.cfg_size == 1:
            return local
        self.p2p.flush()
        flag = torch.tensor([1 if local else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.ctx.cfg_cpu_group)
        return bool(flag.item())

    def end(self) -> None:
        """Last rank: sampling is over; let the other stages of this pipeline go."""
        if self.topo.pp_size > 1:
            for r in self._others():
                self.p2p.isend_stop(r)
        if self.p2p is not None:
            self.p2p.flush()


def _label(branch, i, patch=None):
    names = {0: "cond", 1: "uncond"}
    label = "+".join(sorted({names.get(b, str(b)) for b in branch})) + f"[{i}]"
    if patch is not None and patch.mode == "patch":
        label += f" p{patch.index + 1}/{patch.count}"
    return label


def rows_of_shape(x) -> tuple:
    """A model input's shape (LTX-2: the shapes of its parts)."""
    if isinstance(x, (list, tuple)):
        return tuple(tuple(e.shape) for e in x)
    return tuple(x.shape)


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


def empty_noise(latent_image):
    """The stock sampler's noise with add_noise off: ComfyUI's ``prepare_empty_noise`` (which
    knows nested latents), or zeros where this ComfyUI has no such function."""
    import comfy.sample
    if hasattr(comfy.sample, "prepare_empty_noise"):
        return comfy.sample.prepare_empty_noise(latent_image)
    return torch.zeros(latent_image.size(), dtype=latent_image.dtype, layout=latent_image.layout)


def sample_on_last_rank(runner: ComfyPipelineRunner, stage: ComfyStage, job: dict, tensors: dict,
                        on_step, should_stop):
    """Run ComfyUI's KSampler path with the proxy; returns the samples (or raises PipelineStopped)."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sample

    device = runner.ctx.device
    base = stage.base
    real_dm = base.diffusion_model
    base.diffusion_model = PipelineProxy(runner, real_dm, stage.dtype)
    try:
        if stage.patcher is None:
            stage.patcher = comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=device)
        patcher = stage.patcher.clone()
        carry = job["carry"]
        for k, v in carry["options"].items():
            patcher.model_options[k] = v
        patcher.model_options["transformer_options"].update(carry.get("transformer_options") or {})
        if carry["model_sampling"] is not None:
            ms_t = {k[3:]: v for k, v in tensors.items() if k.startswith("ms.")}
            patcher.add_object_patch("model_sampling", cb.unpack_model_sampling(carry["model_sampling"], ms_t))
        patcher = sampling_patches.apply(patcher, carry.get("sampling_patches") or [])  # EasyCache, windows ...
        s = job["sampling"]
        cond = job["conditioning"]
        positive = cb.unpack_conditioning("positive", cond["positive"], tensors)
        negative = cb.unpack_conditioning("negative", cond["negative"], tensors)
        latent_image = cb.latent_from_parts("latent.samples", tensors)  # fixed by the host (comfy_job.fixed_latent)
        if s["disable_noise"]:
            noise = empty_noise(latent_image)
        else:
            noise = comfy.sample.prepare_noise(latent_image, s["seed"], job["latent"].get("batch_index"))

        def callback(step, x0, x, total_steps):
            runner.step = step + 1  # the next model call belongs to the next step
            if runner.stop_agreed(should_stop()):
                raise PipelineStopped("interrupted")
            on_step(step, total_steps, x0)

        return comfy.sample.sample(
            patcher, noise, s["steps"], s["cfg"], s["sampler_name"], s["scheduler"], positive, negative,
            latent_image, denoise=s["denoise"], disable_noise=s["disable_noise"], start_step=s.get("start_step"),
            last_step=s.get("last_step"), force_full_denoise=s.get("force_full_denoise", False),
            noise_mask=cb.latent_from_parts("latent.noise_mask", tensors), callback=callback, disable_pbar=True,
            seed=s["seed"])
    finally:
        base.diffusion_model = real_dm
        runner.end()
