"""Worker process: ``python -m pp_runtime.workers.worker``, one per device.

Started by the host's ``WorkerGroup`` with its environment set explicitly.  Reads the
group key from stdin, connects back to the host's loopback listener (HMAC handshake),
joins torch.distributed, then serves jobs until told to stop.  A reader thread takes
interrupts while a job runs; if the host goes away the worker exits (no orphans).  Any
error in a job is reported with this rank and its traceback, then the worker exits: the
other ranks may be mid-communication, so the host tears the whole group down.

The control transport is anything with ``send_bytes(b)`` / ``recv_bytes()`` / ``close()``
(``recv_bytes`` raising ``EOFError``/``OSError`` once the host is gone): here a
``multiprocessing`` Connection; on Ray (``ray_actor.py``) a channel made of
actor methods, which also offers ``flush(timeout)`` so that a worker's last message (its
error report) reaches the host before the process exits.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import queue
import sys
import threading
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import Client

import torch
import torch.distributed as dist

from . import wire
from ..engine.comm import PipelineStopped
from ..engine.context import PPContext
from .environment import apply_comfy_flags, comfy_flags, flags_from_env
from .health import Activity, apply_memory_cap, describe_failure, start_heartbeat
from ..loop.jobs import build_stage
from .placement import placement_key
from ..engine.split import Split
from ..loop.denoiser import PPDenoiser



class Worker:
    def __init__(self, rank: int, world: int, device: torch.device, conn):
        """``conn``: the control transport (``send_bytes``/``recv_bytes``/``close``)."""
        self.rank, self.world, self.device, self.conn = rank, world, device, conn
        self.inbox: queue.Queue = queue.Queue()
        self.interrupt_job: str | None = None
        self.current_job: str | None = None
        self.placed: dict[str, tuple] = {}  # placement key -> (model, stage range)
        self.handlers = {"run": self.run_job, "release": self.release}
        self._send_lock = threading.Lock()
        self._steps: queue.Queue = queue.Queue()
        self._pinned: dict[tuple, list] = {}  # pinned host buffers for the step latents, by shape
        self.activity = Activity()
        self.memory_cap = 0
        self.kept: dict[str, torch.Tensor] = {}  # the last job's reusable tensors (its conditioning)
        threading.Thread(target=self._stream, daemon=True).start()
        start_heartbeat(self.send, self.activity, lambda: self.current_job)

    def read_control(self):
        while True:
            try:
                msg, tensors = wire.recv(self.conn)
            except (EOFError, OSError):
                self.exit(0)  # the host is gone: never outlive it
            if msg["op"] == "interrupt":
                self.interrupt_job = msg.get("job")
            else:
                msg["_received"] = time.monotonic()
                self.inbox.put((msg, tensors))

    def send(self, msg, tensors=None):
        with self._send_lock:  # the main thread and the step streamer both send
            wire.send(self.conn, {"rank": self.rank, **msg}, tensors)

    def stream_step(self, msg: dict, latents) -> None:
        """Send a step (and its latents, if any: a tensor, or a NestedTensor of several, e.g.
        LTX-2's video + audio) to the host without stalling the device: non-blocking copies
        into pinned host memory (buffers reused from step to step), sent by the streamer
        thread once the copies are done.  (A plain ``.cpu()`` here would make every step wait
        for the GPU to drain; a new pinned buffer per step costs a cudaHostAlloc each time.)"""
        from ..comfy.carry import latent_parts
        hosts, done = {}, None
        for name, t in latent_parts("latents", latents).items():
            if t.is_cuda:
                free = self._pinned.setdefault((tuple(t.shape), t.dtype), [])
                hosts[name] = free.pop() if free else torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                hosts[name].copy_(t, non_blocking=True)
                done = done or torch.cuda.Event()  # one event, recorded after every part's copy
            else:
                hosts[name] = t.clone()  # the sampler may update it in place
        if done is not None:
            done.record()
        self._steps.put((msg, hosts, done))

    def _stream(self):
        while True:
            msg, hosts, done = self._steps.get()
            if done is not None:
                done.synchronize()
            self.send(msg, hosts or None)
            for host in hosts.values():  # sent (copied into the message): pinned buffers may be reused
                if host.is_pinned():
                    self._pinned[(tuple(host.shape), host.dtype)].append(host)
            self._steps.task_done()

    def serve(self):
        threading.Thread(target=self.read_control, daemon=True).start()
        while True:
            msg, tensors = self.inbox.get()
            if msg["op"] == "shutdown":
                self.send({"op": "bye"})
                return
            self.current_job = msg.get("job") if msg["op"] == "run" else None
            try:
                self.handlers[msg["op"]](msg, tensors)
            except BaseException as e:  # report, then leave: the group is torn down (ComfyUI's
                #                            InterruptProcessingException is a BaseException since 0.20)
                self.send({"op": "error", "job": msg.get("job"), "traceback": traceback.format_exc(),
                           **describe_failure(e, self.rank, self.device, self.activity, self.memory_cap)})
                self.exit(1)
            finally:
                self.current_job = None
                self.activity.set("idle")

    def exit(self, code: int):
        """Leave the process now (other threads may be stuck in a collective)."""
        flush = getattr(self.conn, "flush", None)  # a transport that buffers: let the host take it all
        if flush is not None:
            try:
                flush(5.0)
            except Exception:
                pass
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    def release(self, msg, tensors):
        self.placed.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.send({"op": "released", "job": msg.get("job")})

    MAX_PLACED = 2  # models kept placed at once (e.g. Wan 2.2's high- and low-noise models)

    def _place(self, job, ctx):
        key = placement_key(job)
        loaded = key not in self.placed
        if loaded:
            # The same model under another split or layout is of no further use; beyond
            # that, the least recently used model goes first.
            same_model = json.dumps(job["model"], sort_keys=True)
            for k in [k for k in self.placed if json.loads(k)[0] == json.loads(same_model)]:
                self.placed.pop(k)
            while len(self.placed) >= self.MAX_PLACED:
                self.placed.pop(next(iter(self.placed)))
            gc.collect()  # a model caught in a reference cycle would otherwise keep its memory
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            t0 = time.perf_counter()
            start, end = Split(tuple(job["split"])).ranges[ctx.topo.pp_rank]
            self.activity.set("placing", detail=f"its stage, blocks {start}-{end - 1}")
            if job["kind"] == "comfy_sample":
                from ..comfy.stage import ComfyStage  # ComfyUI only in workers that run its models
                placed = ComfyStage(job["model"], (start, end), ctx.topo, self.device)
            else:
                placed = build_stage(job["model"], job["split"], ctx.topo.pp_rank, self.device)
            self.activity.set("sampling")
            self.placed[key] = (placed, time.perf_counter() - t0)
        self.placed[key] = self.placed.pop(key)  # most recently used last
        placed, load_s = self.placed[key]
        reread = getattr(placed, "parked", False)
        if reread:
            try:
                placed.unpark()  # read again from its file
            except BaseException:  # e.g. the file changed or is gone: the next prompt places it anew
                self.placed.pop(key, None)
                raise
        return placed, loaded, load_s, reread

    def _held(self, job) -> dict:
        """{placement key: weight patches id} of the stages this worker holds once the job's
        residency is applied: the host sends a stage's patch tensors only when they change."""
        held = {k: getattr(placed, "patches_id", "") for k, (placed, _) in self.placed.items()}
        if job.get("residency", "keep") == "release":
            held.pop(placement_key(job), None)
        elif job.get("residency") == "park" and placement_key(job) in held:
            held[placement_key(job)] = ""  # parked: read again unpatched, its patches are sent again
        return held

    def _placed_bytes(self) -> int:
        """Bytes of the stages this worker holds now (for the memory cap on a CPU worker)."""
        total = 0
        for placed, _ in self.placed.values():
            model = placed[0] if isinstance(placed, tuple) else getattr(placed, "base", None)
            if isinstance(model, torch.nn.Module):
                total += sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta)
        return total

    def _with_kept(self, msg, tensors):
        """The job's tensors with those the host did not send again (``reuse``: the same
        objects as in the previous job) taken from what this worker kept."""
        missing = [k for k in msg.get("reuse", []) if k not in self.kept]
        if missing:
            raise RuntimeError(f"the host reused tensors this worker does not have: {missing[:3]}")
        tensors = {**{k: self.kept[k] for k in msg.get("reuse", [])}, **tensors}
        prefixes = tuple(msg["job_spec"].get("reuse_prefixes") or ())
        self.kept = {k: v for k, v in tensors.items() if k.startswith(prefixes)} if prefixes else {}
        return tensors

    def _after(self, job):
        """Residency after a job: keep the stage placed, park it in host RAM, or release it
        (after its 'done': the host may have sent the next job, and hears this rank's
        heartbeat meanwhile)."""
        policy = job.get("residency", "keep")
        self.activity.set("residency", detail=f"({policy} after the job)")
        if _TEST_HANG and _TEST_HANG[:2] == [self.rank, "after"]:
            time.sleep(_TEST_HANG[2])
        key = placement_key(job)
        if policy == "release":
            self.placed.pop(key, None)
        elif policy == "park" and hasattr(self.placed.get(key, (None,))[0], "park"):
            self.placed[key][0].park()
        if policy != "keep" and self.device.type == "cuda":
            torch.cuda.empty_cache()

    def run_job(self, msg, tensors):
        job = msg["job_spec"]
        tensors = self._with_kept(msg, tensors)
        if job["kind"] == "comfy_sample":
            self.activity.set("starting", detail="(importing ComfyUI's model code)")
            import_comfy(self.device)
        t_imported = time.monotonic()
        ctx = PPContext.for_layout(job["layout"]["pp"], job["layout"]["cfg"], self.device, job["layout"].get("sp", 1))
        ctx.p2p.watch = self.activity.waiting if ctx.p2p is not None else None
        caps = job.get("memory_caps") or []
        self.memory_cap = int(caps[self.rank]) if self.rank < len(caps) else 0
        apply_memory_cap(self.device, self.memory_cap, self._placed_bytes())
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)  # 'peak' in the done message: this job's
        t_start = time.monotonic()
        placed, loaded, load_s, reread = self._place(job, ctx)
        run = self.run_comfy if job["kind"] == "comfy_sample" else self.run_denoise
        # Where a job's time goes on this rank (monotonic clock, shared by the processes of
        # one machine): received, started, placed; the runner adds its first pass and end.
        phases = {"received": msg.get("_received"), "imported": t_imported, "started": t_start,
                  "placed": time.monotonic()}
        with torch.inference_mode():
            run(msg, tensors, ctx, placed, {"loaded": loaded, "reread": reread, "load_seconds": load_s, "phases": phases})
        self._after(job)

    def run_comfy(self, msg, tensors, ctx, stage, info):
        from ..comfy.runner import ComfyPipelineRunner
        from ..comfy.sampler import sample_on_last_rank
        job, job_id = msg["job_spec"], msg["job"]
        topo = ctx.topo
        t_start = time.perf_counter()
        weights_patched = stage.apply_weight_patches(job, tensors)  # LoRA
        patch_s = time.perf_counter() - t_start
        runner = ComfyPipelineRunner(ctx, stage, job.get("micro_batch_size", 1), job.get("batched_cfg", False),
                                     cancelled=lambda: self.interrupt_job == job_id,
                                     options=job.get("carry", {}).get("transformer_options"),
                                     on_block=self._on_block, pipelining=job.get("patch_pipelining"),
                                     sequence_exchange=job.get("sequence_exchange", "auto"))

        def on_step(i, total, x0):
            if topo.is_output_rank:
                self.stream_step({"op": "step", "job": job_id, "step": i, "total": total},
                                 x0 if job.get("stream_x0", True) else None)

        result, interrupted = None, False
        if topo.is_driver:
            try:
                result = sample_on_last_rank(runner, stage, job, tensors, on_step,
                                             should_stop=lambda: self.interrupt_job == job_id)
            except PipelineStopped:
                interrupted = True
        else:
            runner.serve()
        info["phases"].update(first_pass=runner.first_pass, end=time.monotonic())
        done = {"op": "done", "job": job_id, "interrupted": interrupted, **info, "held": self._held(job),
                "seconds": time.perf_counter() - t_start, "spans": runner.timeline.take(wait=True),
                "stage": list(stage.range), "pp_rank": topo.pp_rank, "cfg_rank": topo.cfg_rank,
                "sp_rank": topo.sp_rank, "passes": runner.passes, "patched": weights_patched,
                "patch_pipelining": {"patched_passes": runner.patched_passes, "cache_bytes": stage.forward.kv.bytes(),
                                     "graphs": len(stage.forward.graphs.graphs),
                                     "graph_replays": stage.forward.graphs.replays,
                                     "graphs_failed": stage.forward.graphs.failed}
                if job.get("patch_pipelining") else None, "comfy": comfy_runtime(),
                "reread": info["reread"], "bytes_read": stage.bytes_read if info["loaded"] or info["reread"] else 0,
                "load_peak_growth": stage.load_peak_growth if info["loaded"] else 0,
                "load_phases": stage.load_phases if info["loaded"] else None, "patch_seconds": patch_s,
                "mem": mem_info(self.device), "clock0_ms": runner.timeline._t0 * 1e3}
        out = None
        if topo.is_output_rank and result is not None:
            from ..comfy.carry import latent_parts
            out = latent_parts("latents", result)
        self._steps.join()  # every step message before 'done'
        self.send(done, out)

    def run_denoise(self, msg, tensors, ctx, placed, info):
        job, job_id = msg["job_spec"], msg["job"]
        t_start = time.perf_counter()
        model, rng = placed
        topo = ctx.topo
        schemas_before = ctx.p2p.schemas_sent if ctx.p2p else 0
        denoiser = PPDenoiser(ctx, model, rng, job.get("micro_batch_size", 1), job.get("batched_cfg", False),
                              should_stop=lambda: self.interrupt_job == job_id)
        s = job["sampling"]
        positive = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("positive.")}
        negative = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("negative.")} or None

        def on_step(i, total, latents):
            if topo.is_output_rank:
                self.stream_step({"op": "step", "job": job_id, "step": i, "total": total}, latents)
            self.send({"op": "timings", "job": job_id, "spans": denoiser.timeline.take()})

        result, interrupted = None, False
        try:
            result = denoiser.denoise(on_step=on_step, **s, positive=positive, negative=negative)
        except PipelineStopped:
            interrupted = True
        spans = denoiser.timeline.take(wait=True)
        done = {"op": "done", "job": job_id, "interrupted": interrupted, **info,
                "seconds": time.perf_counter() - t_start, "spans": spans,
                "stage": list(rng), "pp_rank": topo.pp_rank, "cfg_rank": topo.cfg_rank,
                "schemas_sent": (ctx.p2p.schemas_sent if ctx.p2p else 0) - schemas_before,
                "mem": mem_info(self.device), "clock0_ms": denoiser.timeline._t0 * 1e3}
        out = {"latents": result} if topo.is_output_rank and result is not None else None
        self._steps.join()  # every step message before 'done'
        self.send(done, out)


    def _on_block(self, g: int) -> None:
        self.activity.on_block(g)
        if _TEST_HANG and _TEST_HANG[:2] == [self.rank, g]:
            _TEST_HANG[2] -= 1
            while _TEST_HANG[2] < 0:  # fault injection for the tests: a kernel that never returns
                time.sleep(1)


# PP_TEST_HANG="rank:block:n": that rank blocks forever before that block the (n+1)-th time it
# reaches it, its heartbeat going on, as a worker stuck in a GPU kernel does; "rank:after:s": that
# rank takes s seconds over its residency step after each job, as parking a large stage in host
# RAM does.  Watchdog tests only.
_TEST_HANG = [v if v == "after" else float(v) if "." in v else int(v) for v in os.environ["PP_TEST_HANG"].split(":")] \
    if os.environ.get("PP_TEST_HANG") else None


def mem_info(device: torch.device) -> dict:
    """Memory of this worker's device, in bytes (for the web panel).  CUDA: the whole
    device's used/total and this process's peak allocation; CPU: this process's resident
    set (and its peak) against the machine's RAM."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return {"kind": "cuda", "used": total - free, "total": total, "reserved": torch.cuda.memory_reserved(device),
                "allocated": torch.cuda.memory_allocated(device), "peak": torch.cuda.max_memory_allocated(device)}
    out = {"kind": "cpu", "used": None, "total": None, "peak": None}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    out["used" if line.startswith("VmRSS") else "peak"] = int(line.split()[1]) * 1024
        with open("/proc/meminfo") as f:
            out["total"] = int(f.readline().split()[1]) * 1024  # MemTotal
    except (OSError, ValueError, IndexError):
        pass
    return out


def comfy_runtime() -> dict:
    """What this worker's ComfyUI runs with: its carried flags and the attention function
    ComfyUI chose (for the panel and the tests: the same as the ComfyUI process's)."""
    import comfy.ldm.modules.attention as attention
    from comfy.cli_args import args
    aimdo = getattr(sys.modules.get("comfy.memory_management"), "aimdo_enabled", False)
    return {"flags": comfy_flags(), "attention": attention.optimized_attention.__name__,
            "dynamic_vram": bool(aimdo), "compiler": not getattr(args, "disable_comfy_compiler", True) and bool(aimdo)}


def import_comfy(device: torch.device) -> None:
    """ComfyUI's model code in this process (its root is on PYTHONPATH), CPU mode on CPU workers."""
    if "comfy.model_management" not in sys.modules:
        from comfy.cli_args import args
        apply_comfy_flags(flags_from_env())  # the ComfyUI process's flags: the same kernels as stock
        args.cpu = device.type == "cpu"
        # All of ComfyUI's model code a worker uses, imported up front: a stage's placement
        # then measures the stage, not the interpreter loading modules.
        import comfy.model_base  # noqa: F401
        import comfy.model_detection  # noqa: F401
        import comfy.model_management  # noqa: F401
        import comfy.model_patcher  # noqa: F401
        import comfy.sample  # noqa: F401
        import comfy.samplers  # noqa: F401

        from ..comfy.stage import ComfyStage  # noqa: F401  (and the staging table it imports)
        from ..comfy.families import import_family_classes
        import_family_classes()  # every family's model code: placing a stage then allocates only the stage


def join_group(rank: int, world: int, device: torch.device, init_method: str, timeout: float) -> dict:
    """torch.distributed for this rank (NCCL on a GPU, gloo on the CPU); returns the 'ready'
    message for the host.  Shared by the local worker process and the Ray actor."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    kw = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout), **kw)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"op": "ready", "rank": rank, "pid": os.getpid(), "device": str(device), "name": name,
            "mem": mem_info(device)}


def main(argv=None):
    ap = argparse.ArgumentParser(description="pipeline-parallel worker (started by WorkerGroup)")
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--control-port", type=int, required=True)
    ap.add_argument("--store", required=True, help="rendezvous file (local backend: no TCP listener)")
    ap.add_argument("--device", required=True)
    ap.add_argument("--timeout", type=float, default=600.0)
    args = ap.parse_args(argv)
    key = bytes.fromhex(sys.stdin.readline().strip())
    conn = Client(("127.0.0.1", args.control_port), authkey=key)
    device = torch.device(args.device)
    t0 = time.monotonic()
    if os.environ.get("PP_PRELOAD_COMFY") == "1":  # ComfyUI's model code before 'ready': a started
        try:                                          # group has it, its first prompt does not wait on it
            import_comfy(device)
        except Exception:  # the first job imports again and reports the error with its rank
            pass
    t_imported = time.monotonic()
    ready = join_group(args.rank, args.world, device, f"file://{args.store}", args.timeout)
    wire.send(conn, {**ready, "import_s": t_imported - t0, "join_s": time.monotonic() - t_imported})
    try:
        Worker(args.rank, args.world, device, conn).serve()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
