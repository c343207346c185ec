"""Worker process: ``python -m pp_runtime.worker``, one per device.

Started by the host's ``WorkerGroup`` with its environment set explicitly.  Reads the
group key from stdin, connects back to the host's loopback listener (HMAC handshake),
joins torch.distributed, then serves jobs until told to stop.  A reader thread takes
interrupts while a job runs; if the host goes away the worker exits (no orphans).  Any
error in a job is reported with this rank and its traceback, then the worker exits: the
other ranks may be mid-communication, so the host tears the whole group down.
"""
from __future__ import annotations

import argparse
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
from .comm import PipelineStopped
from .context import PPContext
from .jobs import build_stage, placement_key
from .pipeline import PPDenoiser



class Worker:
    def __init__(self, rank: int, world: int, device: torch.device, conn):
        self.rank, self.world, self.device, self.conn = rank, world, device, conn
        self.inbox: queue.Queue = queue.Queue()
        self.interrupt_job: str | None = None
        self.current_job: str | None = None
        self.placed: dict[str, tuple] = {}  # placement key -> (model, stage range)
        self.handlers = {"run": self.run_job, "release": self.release}

    def read_control(self):
        while True:
            try:
                msg, tensors = wire.recv(self.conn)
            except (EOFError, OSError):
                os._exit(0)  # the host is gone: never outlive it
            if msg["op"] == "interrupt":
                self.interrupt_job = msg.get("job")
            else:
                self.inbox.put((msg, tensors))

    def send(self, msg, tensors=None):
        wire.send(self.conn, {"rank": self.rank, **msg}, tensors)

    def serve(self):
        threading.Thread(target=self.read_control, daemon=True).start()
        while True:
            msg, tensors = self.inbox.get()
            if msg["op"] == "shutdown":
                self.send({"op": "bye"})
                return
            try:
                self.handlers[msg["op"]](msg, tensors)
            except Exception as e:  # report, then leave: the group is torn down
                self.send({"op": "error", "job": msg.get("job"), "error": f"{type(e).__name__}: {e}",
                           "traceback": traceback.format_exc()})
                sys.stdout.flush()
                os._exit(1)

    def release(self, msg, tensors):
        self.placed.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.send({"op": "released", "job": msg.get("job")})

    def _place(self, job, ctx):
        key = placement_key(job)
        loaded = key not in self.placed
        if loaded:
            self.placed.clear()  # one placed model per group for now
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            t0 = time.perf_counter()
            if job["kind"] == "comfy_sample":
                from .comfy_sampling import ComfyStage  # ComfyUI only in workers that run its models
                placed = ComfyStage(job["model"], job["split"], ctx.topo, self.device)
            else:
                placed = build_stage(job["model"], job["split"], ctx.topo.pp_rank, self.device)
            self.placed[key] = (placed, time.perf_counter() - t0)
        placed, load_s = self.placed[key]
        return placed, loaded, load_s

    def run_job(self, msg, tensors):
        job = msg["job_spec"]
        if job["kind"] == "comfy_sample":
            import_comfy(self.device)
        ctx = PPContext.for_layout(job["layout"]["pp"], job["layout"]["cfg"], self.device)
        placed, loaded, load_s = self._place(job, ctx)
        run = self.run_comfy if job["kind"] == "comfy_sample" else self.run_denoise
        with torch.inference_mode():
            run(msg, tensors, ctx, placed, {"loaded": loaded, "load_seconds": load_s})

    def run_comfy(self, msg, tensors, ctx, stage, info):
        from .comfy_sampling import ComfyPipelineRunner, sample_on_last_rank
        job, job_id = msg["job_spec"], msg["job"]
        topo = ctx.topo
        t_start = time.perf_counter()
        runner = ComfyPipelineRunner(ctx, stage, job.get("micro_batch_size", 1), job.get("batched_cfg", False))

        def on_step(i, total, x0):
            if topo.is_output_rank:
                self.send({"op": "step", "job": job_id, "step": i, "total": total}, {"latents": x0})

        result, interrupted = None, False
        if topo.is_last:
            try:
                result = sample_on_last_rank(runner, stage, job, tensors, on_step,
                                             should_stop=lambda: self.interrupt_job == job_id)
            except PipelineStopped:
                interrupted = True
        else:
            runner.serve()
        done = {"op": "done", "job": job_id, "interrupted": interrupted, **info,
                "seconds": time.perf_counter() - t_start, "spans": runner.timeline.take(wait=True),
                "stage": list(stage.range), "pp_rank": topo.pp_rank, "cfg_rank": topo.cfg_rank,
                "passes": runner.passes}
        out = {"latents": result} if topo.is_output_rank and result is not None else None
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
                self.send({"op": "step", "job": job_id, "step": i, "total": total}, {"latents": latents})
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
                "schemas_sent": (ctx.p2p.schemas_sent if ctx.p2p else 0) - schemas_before}
        out = {"latents": result} if topo.is_output_rank and result is not None else None
        self.send(done, out)


def import_comfy(device: torch.device) -> None:
    """ComfyUI's model code in this process (its root is on PYTHONPATH), CPU mode on CPU workers."""
    if "comfy.model_management" not in sys.modules:
        from comfy.cli_args import args
        args.cpu = device.type == "cpu"
        import comfy.model_management  # noqa: F401


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
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    kw = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend, init_method=f"file://{args.store}", rank=args.rank,
                            world_size=args.world, timeout=timedelta(seconds=args.timeout), **kw)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    wire.send(conn, {"op": "ready", "rank": args.rank, "pid": os.getpid(), "device": str(device), "name": name})
    try:
        Worker(args.rank, args.world, device, conn).serve()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
