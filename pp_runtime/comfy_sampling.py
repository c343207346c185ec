"""ComfyUI's own sampling, on the last rank, over a pipeline.

The last rank of each pipeline runs ``comfy.sample.sample`` unchanged (the stock
KSampler's path: sigmas, noise from the seed, conditioning -> model inputs, CFG, every
sampler) on a ModelPatcher whose ``diffusion_model`` is a ``PipelineProxy``.  Each call
of the proxy is one *pass*: its inputs (already prepared by ComfyUI's ``_apply_model``)
go to rank 0 as one tensor dict, rank 0 cuts them into micro-batches and runs embed +
its blocks on each, activations flow rank to rank, and the last rank runs its blocks +
head per micro-batch and returns the concatenated output to the sampler.  Rank 0 and the
middle ranks just loop "receive -> my stage -> send" until a STOP comes down the
pipeline, which the last rank sends when sampling ends (done or interrupted).

CFG-parallel (a CFG group of 2): both last ranks run the same sampler in lockstep; in
each pass pipeline 0 computes the cond rows and pipeline 1 the uncond rows, and the last
ranks exchange their rows (broadcast over the CFG group) so both hold the full output.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from . import comfy_bridge as cb
from .comm import PipelineStopped
from .jobs import Split
from .timeline import Timeline

ROWS = "__rows"  # micro-batch sizes of a pass, in order
BRANCH = "__branch"  # cond (0) / uncond (1) of each row


# -- placement -----------------------------------------------------------------------
class ComfyStage:
    """ComfyUI's model for this rank: meta everywhere except this stage's weights."""

    def __init__(self, spec: dict, counts: list[int], topo, device):
        hwm0 = _peak_rss()
        start, end = Split(tuple(counts)).ranges[topo.pp_rank]
        self.range = (start, end)
        self.dtype = cb.dtype_of(spec["dtype"])
        self.base, prefix = cb.meta_base_model(spec["path"], self.dtype, cb.dtype_of(spec.get("manual_cast")))
        self.adapter = cb.adapter_for(self.base.diffusion_model)
        prefixes = self.adapter.stage_prefixes(start, end, topo.is_first, topo.is_last)
        self.bytes_read = cb.load_stage_weights(self.base.diffusion_model, spec["path"], prefix, prefixes, device)
        self.base.model_sampling.to(device)
        # What placing this stage cost in host RAM at its peak (measured, for the tests and the panel).
        self.load_peak_growth = _peak_rss() - hwm0
        self.device, self.stage = device, topo.pp_rank
        self.where = torch.device(device)
        self.backup: dict[str, torch.Tensor] = {}  # unpatched weights of the keys patched now
        self.patches_id = ""

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
        return True


def _peak_rss() -> int:
    """This process's peak resident set (VmHWM), in bytes; 0 where /proc is absent."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return 0


# -- pass inputs <-> one tensor dict ----------------------------------------------------
def encode_pass(x, timestep, context, kwargs: dict, rows: list[int], branch: list[int]) -> dict:
    out = {"x": x, "timestep": timestep, ROWS: torch.tensor(rows), BRANCH: torch.tensor(branch)}
    if context is not None:
        out["context"] = context
    for k, v in kwargs.items():
        if v is None:
            continue
        if torch.is_tensor(v):
            out[f"t.{k}"] = v
        elif isinstance(v, (list, tuple)) and all(torch.is_tensor(e) for e in v):
            for j, e in enumerate(v):
                out[f"l.{k}.{j}"] = e
        elif isinstance(v, bool):
            out[f"b.{k}"] = torch.tensor(v)
        elif isinstance(v, int):
            out[f"i.{k}"] = torch.tensor(v, dtype=torch.int64)
        elif isinstance(v, float):
            out[f"f.{k}"] = torch.tensor(v, dtype=torch.float64)
        elif isinstance(v, str):  # e.g. ref_latents_method (Kontext / Qwen edit)
            out[f"s.{k}"] = torch.tensor(list(v.encode()), dtype=torch.uint8)
        else:
            raise cb.CarryError(f"model input '{k}' ({type(v).__name__}) cannot cross a stage boundary")
    return out


def decode_pass(msg: dict):
    """-> list of (model kwargs, branch list) per micro-batch."""
    rows = msg[ROWS].tolist()
    branch = msg[BRANCH].tolist()
    total = sum(rows)
    lists: dict[str, list] = {}
    kw = {}
    for key, v in msg.items():
        if key in (ROWS, BRANCH):
            continue
        kind, _, name = key.partition(".")
        if key in ("x", "timestep", "context"):
            kw[key] = v
        elif kind == "t":
            kw[name] = v
        elif kind == "l":
            n, _, j = name.rpartition(".")
            lists.setdefault(n, []).append((int(j), v))
        elif kind in ("b", "i", "f"):
            kw[name] = v.item()
        elif kind == "s":
            kw[name] = bytes(v.tolist()).decode()
    for n, items in lists.items():
        kw[n] = [v for _, v in sorted(items, key=lambda e: e[0])]
    out, a = [], 0
    for r in rows:
        def cut(v, a=a, r=r):
            if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == total and (a, r) != (0, total):
                return v[a:a + r]
            if isinstance(v, list):
                return [cut(e) for e in v]
            return v
        out.append(({k: cut(v) for k, v in kw.items()}, branch[a:a + r]))
        a += r
    return out


# -- the ranks ------------------------------------------------------------------------
class ComfyPipelineRunner:
    def __init__(self, ctx, stage: ComfyStage, micro_batch_size: int = 1, batched: bool = False):
        self.ctx, self.stage = ctx, stage
        self.topo, self.p2p = ctx.topo, ctx.p2p
        self.micro_batch_size = micro_batch_size
        self.batched = batched
        self.timeline = Timeline(ctx.device, ctx.topo.rank)
        self.passes = 0

    def _forward(self, inputs_or_state: dict, label: str, transformer_options: dict | None = None):
        a, (start, end), topo = self.stage.adapter, self.stage.range, self.topo
        with self.timeline.span("compute", label):
            if topo.is_first:
                state = a.embed(**inputs_or_state, transformer_options=transformer_options or {})
            else:
                a.transformer_options = {}
                state = inputs_or_state
            state = a.run_blocks(start, end, state)
            return a.head(state) if topo.is_last else state

    # rank 0 and middle ranks --------------------------------------------------------
    def serve(self) -> None:
        """Receive -> my stage -> send, until STOP."""
        topo, p2p = self.topo, self.p2p
        src = topo.last_rank if topo.is_first else topo.prev_rank
        try:
            while True:
                self.timeline.step = self.passes
                with self.timeline.span("wait", "pass" if topo.is_first else "activations"):
                    msg = p2p.irecv_tensor_dict(src).wait()
                if topo.is_first:
                    for i, (kw, branch) in enumerate(decode_pass(msg)):
                        opts = {"cond_or_uncond": branch}
                        p2p.isend_tensor_dict(self._forward(kw, _label(branch, i), opts), topo.next_rank)
                    self.passes += 1
                else:
                    p2p.isend_tensor_dict(self._forward(msg, "mb"), topo.next_rank)
                    self.passes += 1
        except PipelineStopped:
            if topo.next_rank is not None and topo.next_rank != topo.last_rank:
                p2p.isend_stop(topo.next_rank)
        finally:
            p2p.flush()

    # last rank ----------------------------------------------------------------------
    def run_pass(self, x, timestep, context=None, control=None, transformer_options={}, **kwargs):
        if control is not None:
            raise cb.CarryError("ControlNet is not supported by PP KSampler yet")
        topo = self.topo
        self.timeline.step = self.passes
        self.passes += 1
        rows = x.shape[0]
        cou = list(transformer_options.get("cond_or_uncond") or [0])
        per = rows // len(cou)
        branch = [cou[r // per] for r in range(rows)]
        mine = [r for r in range(rows) if topo.cfg_size == 1 or branch[r] == topo.cfg_rank]
        out_mine = self._run_rows(mine, branch, x, timestep, context, kwargs) if mine else None
        if topo.cfg_size == 1:
            return out_mine
        return self._exchange(rows, branch, mine, out_mine)

    def _run_rows(self, mine, branch, x, timestep, context, kwargs):
        idx = torch.tensor(mine, device=x.device)
        n = len(mine)
        pick = (lambda v: v.index_select(0, idx.to(v.device))
                if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == x.shape[0] and n != x.shape[0] else v)
        kw = {k: ([pick(e) for e in v] if isinstance(v, list) else pick(v)) for k, v in kwargs.items()}
        x, timestep, context = pick(x), pick(timestep), pick(context)
        size = n if self.batched else self.micro_batch_size
        sizes = [min(size, n - a) for a in range(0, n, size)]
        my_branch = [branch[r] for r in mine]
        if self.topo.pp_size == 1:
            msg = encode_pass(x, timestep, context, kw, sizes, my_branch)
            outs = [self._forward(kwm, _label(b, i), {"cond_or_uncond": b})
                    for i, (kwm, b) in enumerate(decode_pass(msg))]
            return torch.cat(outs)
        p2p, topo = self.p2p, self.topo
        p2p.isend_tensor_dict(encode_pass(x, timestep, context, kw, sizes, my_branch), topo.first_rank)
        outs = []
        for i in range(len(sizes)):
            with self.timeline.span("wait", f"mb{i}"):
                state = p2p.irecv_tensor_dict(topo.prev_rank).wait()
            outs.append(self._forward(state, f"mb{i}"))
        return torch.cat(outs)

    def _exchange(self, rows, branch, mine, out_mine):
        """Both last ranks of a CFG group end with the full output, rows in order."""
        ctx, topo = self.ctx, self.topo
        self.p2p.flush()  # nothing point-to-point in flight across a collective
        group_ranks = topo.cfg_ranks
        full = None
        for c in range(topo.cfg_size):
            rows_c = [r for r in range(rows) if branch[r] == c]
            if not rows_c:
                continue
            shape = torch.zeros(8, dtype=torch.int64)
            if c == topo.cfg_rank:
                shape[0] = out_mine.dim()
                shape[1:1 + out_mine.dim()] = torch.tensor(out_mine.shape)
            dist.broadcast(shape, src=group_ranks[c], group=ctx.cfg_cpu_group)
            dims = shape[1:1 + int(shape[0])].tolist()
            buf = out_mine.float().contiguous() if c == topo.cfg_rank else torch.empty(
                dims, dtype=torch.float32, device=ctx.device)
            dist.broadcast(buf, src=group_ranks[c], group=ctx.cfg_group)
            if full is None:
                full = torch.empty([rows] + dims[1:], dtype=torch.float32, device=ctx.device)
            full[torch.tensor(rows_c, device=ctx.device)] = buf
        return full

    def stop_agreed(self, local: bool) -> bool:
        if self.topo.cfg_size == 1:
            return local
        flag = torch.tensor([1 if local else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.ctx.cfg_cpu_group)
        return bool(flag.item())

    def end(self) -> None:
        """Last rank: sampling is over; let the other stages of this pipeline go."""
        if self.topo.pp_size > 1:
            self.p2p.isend_stop(self.topo.first_rank)
        if self.p2p is not None:
            self.p2p.flush()


def _label(branch, i):
    names = {0: "cond", 1: "uncond"}
    return "+".join(sorted({names.get(b, str(b)) for b in branch})) + f"[{i}]"


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

    def forward(self, x, timestep, context=None, control=None, transformer_options={}, **kwargs):
        return self.runner.run_pass(x, timestep, context, control, transformer_options, **kwargs)


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
        patcher = comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=device)
        carry = job["carry"]
        for k, v in carry["options"].items():
            patcher.model_options[k] = v
        if carry["model_sampling"] is not None:
            ms_t = {k[3:]: v for k, v in tensors.items() if k.startswith("ms.")}
            patcher.add_object_patch("model_sampling", cb.unpack_model_sampling(carry["model_sampling"], ms_t))
        s = job["sampling"]
        cond = job["conditioning"]
        positive = cb.unpack_conditioning("positive", cond["positive"], tensors)
        negative = cb.unpack_conditioning("negative", cond["negative"], tensors)
        latent_image = comfy.sample.fix_empty_latent_channels(patcher, tensors["latent.samples"])
        if s["disable_noise"]:
            noise = torch.zeros(latent_image.size(), dtype=latent_image.dtype, layout=latent_image.layout)
        else:
            noise = comfy.sample.prepare_noise(latent_image, s["seed"], job["latent"].get("batch_index"))

        def callback(step, x0, x, total_steps):
            if runner.stop_agreed(should_stop()):
                raise PipelineStopped("interrupted")
            on_step(step, total_steps, x0)

        return comfy.sample.sample(
            patcher, noise, s["steps"], s["cfg"], s["sampler_name"], s["scheduler"], positive, negative,
            latent_image, denoise=s["denoise"], disable_noise=s["disable_noise"], start_step=s.get("start_step"),
            last_step=s.get("last_step"), force_full_denoise=s.get("force_full_denoise", False),
            noise_mask=tensors.get("latent.noise_mask"), callback=callback, disable_pbar=True, seed=s["seed"])
    finally:
        base.diffusion_model = real_dm
        runner.end()
