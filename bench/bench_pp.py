"""Pipeline-parallel vs one GPU, same engine, same model code, same run.

    python bench/bench_pp.py --devices cuda:0,cuda:1            # Flux.1-dev size, 1024², 20 steps
    python bench/bench_pp.py --smoke                             # tiny Flux on cpu,cpu, a minute
    python bench/bench_pp.py --model wan14b --steps 4 --warm-steps 1   # Wan 2.1 14B size, 480x832, 33 frames
    python bench/bench_pp.py --model wan14b --smoke              # tiny Wan on cpu,cpu

The one-GPU baseline is the engine itself with one worker (``WorkerGroup("cuda:0")``:
the same worker process, loop and model code, PP=1).  Every variant is run once to place
the model and warm up (``--warm-steps``), then timed over ``--steps`` steps.  Prints a
table and writes one JSON (``--out``) with the card, torch and NCCL versions, per-variant
ms/step, peak memory per rank, overheads, the timeline of one step per rank, the ratios
to one GPU and the correctness check.  See bench/README.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench import flux_model, wan_model  # noqa: E402
from bench.flux_model import comfy_root  # noqa: E402
from pp_runtime.group import WorkerGroup  # noqa: E402
from pp_runtime.jobs import prepare_denoise_job  # noqa: E402
from pp_runtime.plan import make_plan  # noqa: E402

# Targets of the issue: ratio to one GPU (throughput), memory ratio, overheads, parity.
TARGETS = {"pp2_seqcfg": (">=", 1.30), "pp2_nocfg": (">=", 0.97), "cfgpar2": (">=", 1.90),
           "pp2_batch4_seqcfg": (">=", 1.70), "mem_pp2_by_memory": ("<=", 0.60),
           # four GPUs (--devices cuda:0,cuda:1,cuda:2,cuda:3 --variants four)
           "pp4_seqcfg": (">=", 1.50), "pp2cfg2": (">=", 2.50), "pp4_batch4_seqcfg": (">=", 2.60),
           "mem_pp4": ("<=", 0.32)}
HOST_OVERHEAD_MAX = 0.02
WARM_FIRST_STEP_MAX_S = 1.0
REL_L2_MAX = 1e-2

# model config -> the module with its factory (``build``), ``CONFIGS`` and ``input_dims``
MODEL_MODULES = {**{k: flux_model for k in flux_model.CONFIGS}, **{k: wan_model for k in wan_model.CONFIGS}}
# the variants a Wan run does by default (a 14B forward over ~14k tokens takes ~1 s: keep it short)
WAN_DEFAULT_VARIANTS = ["1gpu_seqcfg", "pp2_seqcfg_by_memory", "pp2_seqcfg", "cfgpar2"]


def is_wan(config: str) -> bool:
    return MODEL_MODULES[config] is wan_model


def parse_size(size: str | None, config: str) -> tuple[int, int]:
    """``--size``: '1024' (square) or 'HxW' (480x832); default 1024 for Flux, 480x832 for Wan."""
    if size is None:
        return (480, 832) if is_wan(config) else (1024, 1024)
    h, _, w = str(size).lower().partition("x")
    return int(h), int(w or h)


# name: (group, job options).  group "one": a one-worker group on the first device; "pp": all devices.
VARIANTS = {
    "1gpu_seqcfg":        ("one", dict(cfg_mode="sequential", batch=1)),
    "1gpu_batchedcfg":    ("one", dict(cfg_mode="batched", batch=1)),
    "1gpu_nocfg":         ("one", dict(cfg_mode="off", batch=1)),
    "1gpu_b4_batchedcfg": ("one", dict(cfg_mode="batched", batch=4, micro_batch_size=4)),
    "1gpu_b4_seqcfg":     ("one", dict(cfg_mode="sequential", batch=4, micro_batch_size=4)),
    "pp2_seqcfg_by_memory": ("pp", dict(cfg_mode="sequential", batch=1, split="by_memory")),
    "pp2_seqcfg":         ("pp", dict(cfg_mode="sequential", batch=1)),
    "pp2_nocfg":          ("pp", dict(cfg_mode="off", batch=1)),
    "pp2_b4_seqcfg":      ("pp", dict(cfg_mode="sequential", batch=4, micro_batch_size=1)),
    "cfgpar2":            ("pp", dict(cfg_mode="cfg_parallel", batch=1)),
    # with four devices in the "pp" group: PP4 (sequential CFG) and PP2 x CFG2 (cfg_parallel)
    "pp4_seqcfg_by_memory": ("pp", dict(cfg_mode="sequential", batch=1, split="by_memory")),
    "pp4_seqcfg":         ("pp", dict(cfg_mode="sequential", batch=1)),
    "pp4_b4_seqcfg":      ("pp", dict(cfg_mode="sequential", batch=4, micro_batch_size=1)),
    "pp2cfg2":            ("pp", dict(cfg_mode="cfg_parallel", batch=1)),
}
FOUR_GPU_VARIANTS = ["1gpu_seqcfg", "1gpu_b4_batchedcfg", "1gpu_b4_seqcfg", "pp4_seqcfg_by_memory", "pp4_seqcfg",
                     "pp2cfg2", "pp4_b4_seqcfg"]
# (variant, its one-GPU baseline(s): the fastest of them is the baseline) -> ratio key
RATIOS = {
    "pp2_seqcfg": ("pp2_seqcfg", ["1gpu_seqcfg"]),
    "pp2_nocfg": ("pp2_nocfg", ["1gpu_nocfg"]),
    "cfgpar2": ("cfgpar2", ["1gpu_seqcfg"]),
    "pp2_batch4_seqcfg": ("pp2_b4_seqcfg", ["1gpu_b4_batchedcfg", "1gpu_b4_seqcfg"]),
    "pp4_seqcfg": ("pp4_seqcfg", ["1gpu_seqcfg"]),
    "pp2cfg2": ("pp2cfg2", ["1gpu_seqcfg"]),
    "pp4_batch4_seqcfg": ("pp4_b4_seqcfg", ["1gpu_b4_batchedcfg", "1gpu_b4_seqcfg"]),
}
EXTRA_RATIOS = {
    "pp2_seqcfg_vs_best_1gpu_cfg": ("pp2_seqcfg", ["1gpu_seqcfg", "1gpu_batchedcfg"]),
    "cfgpar2_vs_best_1gpu_cfg": ("cfgpar2", ["1gpu_seqcfg", "1gpu_batchedcfg"]),
    "pp2_seqcfg_by_memory": ("pp2_seqcfg_by_memory", ["1gpu_seqcfg"]),
}
# (variant, reference variant) for the latents check
PARITY = {"pp4_seqcfg": "1gpu_seqcfg", "pp4_seqcfg_by_memory": "1gpu_seqcfg", "pp2cfg2": "1gpu_seqcfg",
          "pp4_b4_seqcfg": "1gpu_b4_seqcfg", "pp2_seqcfg": "1gpu_seqcfg", "pp2_seqcfg_by_memory": "1gpu_seqcfg", "cfgpar2": "1gpu_seqcfg",
          "pp2_nocfg": "1gpu_nocfg", "pp2_b4_seqcfg": "1gpu_b4_seqcfg", "1gpu_batchedcfg": "1gpu_seqcfg",
          "1gpu_b4_batchedcfg": "1gpu_b4_seqcfg"}


def log(*a):
    print(*a, flush=True)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def environment(devices: list[str]) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "host": platform.node(),
           "cuda": torch.version.cuda, "nccl": None, "driver": None, "card": None, "gpus": None}
    try:
        v = torch.cuda.nccl.version()
        env["nccl"] = ".".join(str(x) for x in v) if isinstance(v, tuple) else str(v)
    except Exception as e:  # CPU-only builds
        env["nccl"] = f"n/a ({type(e).__name__})"
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout
            rows = [r.split(", ") for r in out.strip().splitlines()]
            env["driver"] = rows[0][1] if rows else None
            env["gpu_list"] = [f"{r[0]} ({r[2]})" for r in rows]
            topo = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=30).stdout
            env["topology"] = topo.strip().splitlines()[:4]
        except Exception:
            pass
    return env


def engine_rev() -> str | None:
    """The engine's git revision (``PP_BENCH_ENGINE_REV`` when run from a copy)."""
    if os.environ.get("PP_BENCH_ENGINE_REV"):
        return os.environ["PP_BENCH_ENGINE_REV"]
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "pp_runtime"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev + ("+uncommitted pp_runtime changes" if dirty else "")) or None
    except Exception:
        return None


class Bench:
    def __init__(self, args):
        self.a = args
        self.devices = [d.strip() for d in args.devices.split(",")]
        self.mod = MODEL_MODULES[args.model]
        self.wan = is_wan(args.model)
        dims = self.mod.input_dims(args.model)
        self.dims = dims
        h, w = args.hw
        self.lat = [dims["latent_channels"], h // 8, w // 8]
        if self.wan:  # Wan 2.1 VAE: 4x temporal compression, first frame alone
            self.lat.insert(1, (args.frames - 1) // 4 + 1)
        self.model_spec = {"factory": f"{self.mod.__name__}:build", "kwargs": {"config": args.model, "seed": 0},
                           "dtype": args.dtype}
        self.stats = Path(tempfile.mkdtemp(prefix="pp-bench-"))
        os.environ["PP_BENCH_STATS"] = str(self.stats)  # the workers inherit it
        self.results: dict = {}
        self.latents: dict = {}
        self.groups: dict = {}
        self.skipped: list = []

    # -- inputs: fixed conditioning, same for every variant ------------------------------
    def tensors(self, batch: int, cfg: bool) -> dict:
        g = torch.Generator().manual_seed(1234)
        dt = getattr(torch, self.a.dtype)
        d = self.dims
        pos_ctx = torch.randn(4, self.a.txt_tokens, d["context_dim"], generator=g).to(dt)
        neg_ctx = torch.randn(4, self.a.txt_tokens, d["context_dim"], generator=g).to(dt)
        rep = lambda t: t.repeat(-(-batch // 4), *[1] * (t.dim() - 1))[:batch].contiguous()  # noqa: E731
        if self.wan:  # Wan t2v: the text context only (umT5 width 4096)
            out = {"positive.context": rep(pos_ctx)}
            if cfg:
                out["negative.context"] = rep(neg_ctx)
            return out
        pos_y = torch.randn(4, d["y_dim"], generator=g).to(dt)
        neg_y = torch.randn(4, d["y_dim"], generator=g).to(dt)
        out = {"positive.context": rep(pos_ctx), "positive.y": rep(pos_y),
               "positive.guidance": torch.full((batch,), self.a.flux_guidance)}
        if cfg:
            out.update({"negative.context": rep(neg_ctx), "negative.y": rep(neg_y),
                        "negative.guidance": torch.full((batch,), self.a.flux_guidance)})
        return out

    def job(self, world: int, opts: dict, steps: int) -> dict:
        cfg_mode = opts["cfg_mode"]
        return prepare_denoise_job(world, self.model_spec, latent_shape=[opts["batch"], *self.lat], steps=steps,
                                   seed=self.a.seed, scheduler="flow_euler",
                                   guidance_scale=1.0 if cfg_mode == "off" else self.a.cfg_scale,
                                   cfg_mode=cfg_mode, split=opts.get("split", "balanced"),
                                   micro_batch_size=opts.get("micro_batch_size", 1))

    def group(self, kind: str) -> WorkerGroup:
        if kind in self.groups:
            return self.groups[kind]
        for k in list(self.groups):  # one group at a time: the one-GPU group frees its card first
            self.groups.pop(k).shutdown()
        devs = self.devices[:1] if kind == "one" else self.devices
        g = WorkerGroup(",".join(devs), extra_paths=[str(comfy_root())],
                        cpu_threads=self.a.cpu_threads if devs[0] == "cpu" else None)
        t0 = time.perf_counter()
        g.start()
        g.bench_started = time.perf_counter()
        g.bench_start_s = g.bench_started - t0
        g.bench_first = True
        self.card = g.info[0]["name"]
        log(f"group {kind} {devs}: up in {g.bench_start_s:.2f} s ({', '.join(i['name'] for i in g.info)})")
        self.groups[kind] = g
        return g

    def set_epoch(self, tag: str):
        for f in self.stats.glob("mem_*.json"):
            f.unlink()
        (self.stats / "epoch").write_text(tag)
        time.sleep(0.01)

    def read_memory(self, group: WorkerGroup, tag: str) -> list[dict | None]:
        by_pid = {}
        for f in self.stats.glob("mem_*.json"):
            try:
                rec = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            if rec.get("tag") == tag:
                by_pid[rec["pid"]] = rec
        return [by_pid.get(pid) for pid in group.pids]

    def timed(self, group: WorkerGroup, job: dict, tensors: dict) -> dict:
        stamps = []
        t_call = time.perf_counter()
        res = group.run(job, tensors, on_step=lambda i, n, lat: stamps.append(time.perf_counter()))
        t_ret = time.perf_counter()
        res["host"] = {"t_call": t_call, "stamps": stamps, "t_return": t_ret}
        return res

    # -- one variant ---------------------------------------------------------------------
    def run_variant(self, name: str):
        kind, opts = VARIANTS[name]
        if kind == "pp" and len(self.devices) < 2:
            log(f"skip {name}: needs 2+ devices")
            return
        g = self.group(kind)
        cfg = opts["cfg_mode"] != "off"
        tensors = self.tensors(opts["batch"], cfg)
        steps = self.a.steps
        warm_job = self.job(g.world, opts, self.a.warm_steps)
        job = self.job(g.world, opts, steps)
        log(f"-- {name}: layout pp{job['layout']['pp']} x cfg{job['layout']['cfg']}, split {job['split']}, "
            f"batch {opts['batch']}, micro-batch size {job['micro_batch_size']}, cfg {opts['cfg_mode']}")
        # warm: places the model if this layout/split is new, warms kernels and buffers
        warm = self.timed(g, warm_job, tensors)
        cold = None
        if g.bench_first:  # the group's very first job: cold start = processes + placement + first step
            g.bench_first = False
            cold = {"group_start_s": g.bench_start_s,
                    "placement_s": max(r["load_seconds"] for r in warm["ranks"]),
                    "group_start_to_first_step_s": warm["host"]["stamps"][0] - g.bench_started + g.bench_start_s,
                    "first_job_to_first_step_s": warm["host"]["stamps"][0] - warm["host"]["t_call"]}
        placement_s = max(r["load_seconds"] for r in warm["ranks"]) if any(r["loaded"] for r in warm["ranks"]) \
            else None
        tag = f"{name}-{time.time_ns()}"
        self.set_epoch(tag)
        res = self.timed(g, job, tensors)
        mem = self.read_memory(g, tag)
        assert not any(r["loaded"] for r in res["ranks"]), "timed run re-placed the model"
        self.results[name] = self.summarise(name, job, opts, res, mem, cold, placement_s)
        lat = res["latents"]
        self.latents[name] = lat.float() if lat is not None else None
        r = self.results[name]
        log(f"   {r['ms_per_step']:.1f} ms/step (steady {r['ms_per_step_steady']:.1f}), "
            f"first step {r['first_step_s'] * 1e3:.0f} ms, "
            f"peak {', '.join(f'{m:.2f}' for m in r['peak_gb']) if r['peak_gb'] else '-'} GB, "
            f"host overhead {r['overhead']['fraction'] * 100:.2f}%, finite {r['finite']}")

    def summarise(self, name, job, opts, res, mem, cold, placement_s) -> dict:
        h = res["host"]
        st, steps = h["stamps"], len(h["stamps"])
        total = h["t_return"] - h["t_call"]
        diffs = [b - a for a, b in zip(st, st[1:])]
        steady = statistics.median(diffs) if diffs else total
        mean_stream = (st[-1] - st[0]) / (steps - 1) if steps > 1 else total
        spans = res["spans"]
        ranks = sorted({s["rank"] for s in spans})
        # per rank: compute and wait per step, from the device timeline
        per_rank = {}
        for r in ranks:
            rs = [s for s in spans if s["rank"] == r]
            comp = sum(s["t1_ms"] - s["t0_ms"] for s in rs if s["kind"] == "compute")
            wait = sum(s["t1_ms"] - s["t0_ms"] for s in rs if s["kind"] == "wait")
            loop = max(s["t1_ms"] for s in rs) - min(s["t0_ms"] for s in rs)
            starts = {}
            for s in rs:
                starts[s["step"]] = min(starts.get(s["step"], s["t0_ms"]), s["t0_ms"])
            ks = sorted(starts)
            periods = [starts[b] - starts[a] for a, b in zip(ks, ks[1:])]
            per_rank[r] = {"compute_ms_per_step": comp / steps, "wait_ms_per_step": wait / steps,
                           "loop_ms": loop, "busy_fraction": comp / loop if loop else None,
                           "step_period_ms_median": statistics.median(periods) if periods else None}
        mid = steps // 2
        timeline = {}
        for r in ranks:
            rs = sorted((s for s in spans if s["rank"] == r and s["step"] == mid), key=lambda s: s["t0_ms"])
            nxt = [s for s in spans if s["rank"] == r and s["step"] == mid + 1]
            base = rs[0]["t0_ms"] if rs else 0.0
            timeline[str(r)] = {
                "spans": [{"kind": s["kind"], "label": s["label"], "t0_ms": round(s["t0_ms"] - base, 2),
                           "t1_ms": round(s["t1_ms"] - base, 2)} for s in rs],
                "to_next_step_ms": round(min(s["t0_ms"] for s in nxt) - base, 2) if nxt else None}
        # the step period on the device clock (rank 0's step starts), immune to message batching
        dev_period = max(p["step_period_ms_median"] or 0.0 for p in per_rank.values()) / 1e3 or steady
        # overheads: outside the loop (host -> workers -> first step, and back), and inside
        outside = max(0.0, total - steps * dev_period)
        inloop = None
        if job["layout"]["pp"] == 1 and job["layout"]["cfg"] == 1:
            # one worker: the step period not covered by model compute is host/sampler/streaming work
            inloop = max(0.0, steps * (dev_period - per_rank[ranks[0]]["compute_ms_per_step"] / 1e3))
        overhead = {"outside_loop_s": outside, "in_loop_noncompute_s": inloop,
                    "fraction": (outside + (inloop or 0.0)) / total,
                    "dispatch_s": total - max(r["seconds"] for r in res["ranks"]),
                    "first_step_s": st[0] - h["t_call"], "after_last_step_s": h["t_return"] - st[-1]}
        plan = make_plan(job["layout"]["pp"], opts["batch"],
                         ("cond", "uncond") if opts["cfg_mode"] in ("sequential", "batched") else ("cond",),
                         job["micro_batch_size"], opts["cfg_mode"] == "batched")
        lat = res["latents"]
        return {
            "group": VARIANTS[name][0], "layout": job["layout"], "split": job["split"], "batch": opts["batch"],
            "cfg_mode": opts["cfg_mode"], "micro_batch_size": job["micro_batch_size"],
            "micro_batches_per_step": plan.num_micro_batches, "ideal_speedup_pp": plan.ideal_speedup,
            "steps": steps, "total_s": total, "ms_per_step": total / steps * 1e3,
            "ms_per_step_steady": dev_period * 1e3, "ms_per_step_stream_median": steady * 1e3,
            "ms_per_step_stream_mean": mean_stream * 1e3,
            "first_step_s": st[0] - h["t_call"],
            "peak_gb": [m["peak_allocated"] / 1e9 if m else None for m in mem] if any(mem) else None,
            "peak_reserved_gb": [m["peak_reserved"] / 1e9 if m else None for m in mem] if any(mem) else None,
            "memory_raw": mem,
            "per_rank": per_rank, "timeline_mid_step": timeline, "overhead": overhead,
            "cold_start": cold, "placement_s": placement_s,
            "rank_seconds": [r["seconds"] for r in res["ranks"]],
            "schemas_sent": [r["schemas_sent"] for r in res["ranks"]],
            "finite": bool(torch.isfinite(lat.float()).all()) if lat is not None else None,
            "latent_rms": float(lat.float().pow(2).mean().sqrt()) if lat is not None else None,
        }

    def run(self, names, after_variant=None, deadline=None):
        """``after_variant()`` after each variant (writes partial results); ``deadline``
        (perf_counter) skips a variant unless the longest one so far still fits before it."""
        try:
            longest = 0.0
            for n in names:
                if deadline is not None and time.perf_counter() + longest * 1.1 > deadline:
                    log(f"skip {n}: would pass the deadline (--deadline-s; longest variant so far {longest:.0f} s)")
                    self.skipped.append(n)
                    continue
                t0 = time.perf_counter()
                self.run_variant(n)
                longest = max(longest, time.perf_counter() - t0)
                if after_variant is not None:
                    after_variant()
        finally:
            for g in self.groups.values():
                g.shutdown()
            self.groups.clear()
            shutil.rmtree(self.stats, ignore_errors=True)

    # -- report --------------------------------------------------------------------------
    def ratios(self) -> tuple[dict, dict]:
        R = self.results

        def ratio(v, bases):
            bs = [R[b]["ms_per_step"] for b in bases if b in R]
            return (min(bs) / R[v]["ms_per_step"]) if v in R and bs else None

        ratios = {k: ratio(v, b) for k, (v, b) in RATIOS.items()}
        a, b = R.get("pp2_seqcfg_by_memory"), R.get("1gpu_seqcfg")
        ratios["mem_pp2_by_memory"] = (max(x for x in a["peak_gb"] if x) / b["peak_gb"][0]
                                       if a and b and a["peak_gb"] and b["peak_gb"] else None)
        a4 = R.get("pp4_seqcfg_by_memory")
        ratios["mem_pp4"] = (max(x for x in a4["peak_gb"] if x) / b["peak_gb"][0]
                             if a4 and b and a4["peak_gb"] and b["peak_gb"] else None)
        extra = {k: ratio(v, b) for k, (v, b) in EXTRA_RATIOS.items()}
        steady = {}
        for k, (v, bases) in {**RATIOS, **EXTRA_RATIOS}.items():
            bs = [R[x]["ms_per_step_steady"] for x in bases if x in R]
            steady[k] = min(bs) / R[v]["ms_per_step_steady"] if v in R and bs else None
        bal = R.get("pp2_seqcfg")
        if bal and b and bal["peak_gb"] and b["peak_gb"]:
            extra["mem_pp2_balanced"] = max(x for x in bal["peak_gb"] if x) / b["peak_gb"][0]
        extra["steady_state"] = steady
        return ratios, extra

    def parity(self) -> dict:
        out = {}
        for v, ref in PARITY.items():
            if self.latents.get(v) is not None and self.latents.get(ref) is not None:
                out[f"{v}_vs_{ref}"] = rel_l2(self.latents[v], self.latents[ref])
        return out

    def report(self, env: dict) -> dict:
        ratios, extra = self.ratios()
        parity = self.parity()
        R = self.results
        checks = {}
        for k, (op, thr) in TARGETS.items():
            v = ratios.get(k)
            checks[k] = None if v is None else (v >= thr if op == ">=" else v <= thr)
        ovh = {k: r["overhead"]["fraction"] for k, r in R.items()}
        checks["host_overhead"] = max(ovh.values()) <= HOST_OVERHEAD_MAX if ovh else None
        warm_first = {k: r["first_step_s"] for k, r in R.items()}
        first = next((R[k]["first_step_s"] for k in ("pp2_seqcfg", "pp4_seqcfg") if k in R), None)
        checks["warm_first_step"] = first <= WARM_FIRST_STEP_MAX_S if first is not None else None
        pp_par = {k: v for k, v in parity.items() if not k.startswith("1gpu")}
        checks["parity"] = max(pp_par.values()) <= REL_L2_MAX if pp_par else None
        cold = {R[k]["group"]: R[k]["cold_start"] for k in R if R[k]["cold_start"]}
        cfg = self.mod.CONFIGS[self.a.model]
        nparams = getattr(self, "_nparams", None)
        if nparams is None:
            try:
                with torch.device("meta"):
                    m = self.mod.build(self.a.model)
                nparams = self._nparams = sum(p.numel() for p in m.model.parameters())
            except Exception:
                pass
        h, w = self.a.hw
        img_tokens = (self.lat[-2] // 2) * (self.lat[-1] // 2) * (self.lat[1] if self.wan else 1)
        if self.wan:
            model = {"class": "comfy.ldm.wan.model.WanModel (Wan 2.1 t2v)", "config": self.a.model, "params": nparams,
                     "dim": cfg["dim"], "ffn_dim": cfg["ffn_dim"], "heads": cfg["num_heads"],
                     "blocks": cfg["num_layers"], "text_dim": cfg["text_dim"], "freq_dim": cfg["freq_dim"],
                     "patch_size": list(cfg["patch_size"]), "qk_norm": cfg["qk_norm"],
                     "cross_attn_norm": cfg["cross_attn_norm"], "frames": self.a.frames}
        else:
            model = {"class": "comfy.ldm.flux.model.Flux", "config": self.a.model, "params": nparams,
                     "hidden": cfg["hidden_size"], "heads": cfg["num_heads"], "double_blocks": cfg["depth"],
                     "single_blocks": cfg["depth_single_blocks"], "guidance_embed": cfg["guidance_embed"]}
        model.update({"dtype": self.a.dtype, "weights": "random, seeded per parameter name",
                      "latent": [1, *self.lat], "img_tokens": img_tokens, "txt_tokens": self.a.txt_tokens,
                      "size_px": h if h == w else f"{h}x{w}"})
        gpus = len(self.devices)
        return {
            "card": (env.get("gpu_list") or [self.card or "cpu"])[0] if env.get("gpu_list") else (self.card or "cpu"),
            "gpus": gpus, "devices": self.devices, "torch": env["torch"], "nccl": env["nccl"],
            "cuda": env["cuda"], "driver": env.get("driver"), "python": env["python"],
            "topology": env.get("topology"),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "engine_rev": engine_rev(),
            "model": model,
            "sampling": {"scheduler": "flow_euler (diffusers FlowMatchEulerDiscreteScheduler, shift 3.0)",
                         "steps": self.a.steps, "warm_steps": self.a.warm_steps, "cfg_scale": self.a.cfg_scale,
                         **({} if self.wan else {"flux_guidance": self.a.flux_guidance})},
            "variants_skipped": list(self.skipped),
            "ratios": ratios, "ratios_extra": extra, "targets": {k: list(v) for k, v in TARGETS.items()},
            "checks": checks, "parity_rel_l2": parity,
            "host_overhead_fraction": ovh, "warm_first_step_s": warm_first, "cold_start": cold,
            "variants": R,
        }

    card = None
    skipped: list = []


def print_table(rep: dict):
    R = rep["variants"]
    log("")
    log(f"{rep['card']} x{rep['gpus']}  torch {rep['torch']}  NCCL {rep['nccl']}  "
        f"model {rep['model']['config']} ({(rep['model']['params'] or 0) / 1e9:.2f} B params, "
        f"{rep['model']['dtype']}), "
        f"{rep['model']['size_px']}px, {rep['model']['img_tokens']}+{rep['model']['txt_tokens']} tokens, "
        f"{rep['sampling']['steps']} steps")
    log(f"{'variant':<22}{'layout':>8}{'split':>9}{'mb':>4}{'ms/step':>10}{'steady':>9}{'1st step':>10}"
        f"{'peak GB/rank':>16}{'ovh %':>7}")
    for k, r in R.items():
        lay = f"pp{r['layout']['pp']}xcfg{r['layout']['cfg']}"
        pk = "/".join(f"{x:.1f}" for x in r["peak_gb"] if x is not None) if r["peak_gb"] else "-"
        log(f"{k:<22}{lay:>8}{','.join(map(str, r['split'])):>9}{r['micro_batches_per_step']:>4}"
            f"{r['ms_per_step']:>10.1f}{r['ms_per_step_steady']:>9.1f}{r['first_step_s'] * 1e3:>9.0f}ms"
            f"{pk:>16}{r['overhead']['fraction'] * 100:>7.2f}")
    log("")
    log(f"{'ratio to one GPU':<26}{'measured':>10}{'steady':>9}{'target':>10}  ok")
    st = rep["ratios_extra"].get("steady_state", {})
    for k, v in rep["ratios"].items():
        op, thr = rep["targets"][k]
        ok = rep["checks"].get(k)
        log(f"{k:<26}{(f'{v:.3f}' if v is not None else '-'):>10}"
            f"{(f'{st[k]:.3f}' if st.get(k) is not None else '-'):>9}{op + str(thr):>10}  "
            f"{'-' if ok is None else ('PASS' if ok else 'MISS')}")
    for k, v in rep["ratios_extra"].items():
        if k != "steady_state" and v is not None:
            log(f"{k:<26}{v:>10.3f}{(f'{st[k]:.3f}' if st.get(k) is not None else '-'):>9}")
    log("")
    for k, v in rep["parity_rel_l2"].items():
        log(f"rel-L2 {k:<48}{v:.3e}")
    ovh = rep["host_overhead_fraction"]
    if ovh:
        worst = max(ovh, key=ovh.get)
        log(f"host overhead: max {ovh[worst] * 100:.2f}% ({worst}); warm first step pp2_seqcfg "
            f"{rep['warm_first_step_s'].get('pp2_seqcfg', float('nan')) * 1e3:.0f} ms")
    for g, c in rep["cold_start"].items():
        log(f"cold start ({g}): processes up {c['group_start_s']:.2f} s, placement {c['placement_s']:.2f} s, "
            f"group start to first step {c['group_start_to_first_step_s']:.2f} s")
    lp = rep.get("launch_probe") or {}
    for part in ("whole", "pp2_stage0"):
        if part in lp:
            r = lp[part]
            log(f"launch probe {part:<11}: CPU launch {r['launch_ms']:.1f} ms, GPU fed {r['gpu_fed_ms']:.1f} ms, "
                f"from a synced start {r['synced_ms']:.1f} ms")
    log("checks: " + ", ".join(f"{k}={'-' if v is None else ('PASS' if v else 'MISS')}"
                               for k, v in rep["checks"].items()))


def launch_probe(a, device: str) -> dict | None:
    """bench/launch_probe.py in its own process on ``device`` (the worker groups are down)."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "probe.json"
        env = {k: v for k, v in os.environ.items() if k != "PP_BENCH_STATS"}
        cmd = [sys.executable, str(REPO / "bench" / "launch_probe.py"), "--device", device, "--model", a.model,
               "--size", str(a.hw[0]), "--txt-tokens", str(a.txt_tokens), "--dtype", a.dtype, "--out", str(out)]
        log("-- launch probe: " + " ".join(cmd[1:]))
        r = subprocess.run(cmd, env=env, cwd=str(REPO), text=True, capture_output=True, timeout=600)
        log(r.stdout.strip() or r.stderr.strip()[-2000:])
        return json.loads(out.read_text()) if out.exists() else {"error": r.stderr.strip()[-2000:]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", default=None, help="e.g. cuda:0,cuda:1 (default) or cpu,cpu")
    ap.add_argument("--model", default="flux1-dev", choices=sorted(MODEL_MODULES))
    ap.add_argument("--size", default=None,
                    help="image size in pixels, N or HxW (latent = size/8); default 1024 (Flux), 480x832 (Wan)")
    ap.add_argument("--frames", type=int, default=33, help="Wan: video frames (latent frames = (frames-1)/4+1)")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="skip the remaining variants once the longest so far would end past this many seconds")
    ap.add_argument("--txt-tokens", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warm-steps", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--cfg-scale", type=float, default=3.5, help="true CFG scale (cond/uncond combine)")
    ap.add_argument("--flux-guidance", type=float, default=3.5, help="Flux.1-dev guidance embedding input")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--variants", default="all", help="comma-separated subset of: " + ", ".join(VARIANTS))
    ap.add_argument("--cpu-threads", type=int, default=1, help="threads per CPU worker")
    ap.add_argument("--out", default=None, help="result JSON (default bench/results/<card>_<model>_<size>.json)")
    ap.add_argument("--launch-probe", action="store_true",
                    help="after the variants, time the CPU launch vs GPU time of one forward (bench/launch_probe.py)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny Flux (or tiny Wan with --model wan*) on cpu,cpu, float32, 4 steps, 128px, 8 text "
                         "tokens (checks the harness)")
    a = ap.parse_args(argv)
    if a.smoke:
        a.devices = a.devices or "cpu,cpu"
        wan = is_wan(a.model)
        a.model, a.size, a.txt_tokens, a.steps, a.dtype = ("wan-tiny" if wan else "tiny"), "128", 8, 4, "float32"
        if wan:
            a.size, a.frames = "64x96", 9
    a.hw = parse_size(a.size, a.model)
    if a.devices is None:
        a.devices = "cuda:0,cuda:1" if torch.cuda.device_count() >= 2 else "cpu,cpu"
    if a.variants == "all" and is_wan(a.model):
        a.variants = ",".join(WAN_DEFAULT_VARIANTS)
    if a.variants == "four":
        a.variants = ",".join(FOUR_GPU_VARIANTS)
    names = ([n for n in VARIANTS if n not in FOUR_GPU_VARIANTS[3:]] if a.variants == "all"
             else [v.strip() for v in a.variants.split(",") if v.strip()])
    for n in names:
        if n not in VARIANTS:
            ap.error(f"unknown variant {n}")
    b = Bench(a)
    env = environment(b.devices)
    size = f"{a.hw[0]}x{a.hw[1]}" + (f"x{a.frames}" if is_wan(a.model) else "") if a.hw[0] != a.hw[1] \
        or is_wan(a.model) else str(a.hw[0])
    log(f"bench: {a.model} {size}px {a.steps} steps {a.dtype} on {a.devices}; torch {env['torch']}, "
        f"NCCL {env['nccl']}, driver {env.get('driver')}; variants {', '.join(names)}")
    t0 = time.perf_counter()
    deadline = t0 + a.deadline_s if a.deadline_s else None
    outp = [Path(a.out)] if a.out else []

    def write(rep):
        if not outp:
            outp.append(REPO / "bench" / "results" / (
                f"{len(b.devices)}x{rep['card'].split(' (')[0].replace(' ', '_')}_{a.model}_{size}.json"))
        outp[0].parent.mkdir(parents=True, exist_ok=True)
        outp[0].write_text(json.dumps(rep, indent=1, default=str) + "\n")

    def partial():  # after each variant: a timeout still leaves the numbers so far
        try:
            rep = b.report(env)
            rep["partial"] = True
            rep["bench_wall_s"] = time.perf_counter() - t0
            write(rep)
        except Exception as e:  # never lose the run over the partial report
            log(f"(partial report failed: {type(e).__name__}: {e})")

    b.run(names, after_variant=partial, deadline=deadline)
    rep = b.report(env)
    if a.launch_probe and b.devices[0].startswith("cuda") and not is_wan(a.model):
        rep["launch_probe"] = launch_probe(a, b.devices[0])
    rep["bench_wall_s"] = time.perf_counter() - t0
    write(rep)
    out = outp[0]
    print_table(rep)
    log(f"wrote {out} ({rep['bench_wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
