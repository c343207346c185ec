"""The product benchmark: PP KSampler's own code path against the stock KSampler on one GPU.

What a user would pick between, in one run on one machine, same model file and inputs:

* **stock**: ComfyUI's stock loader (``comfy.sd.load_diffusion_model``) and the stock
  KSampler's sampling (``comfy.sample.sample`` with ComfyUI's model management, its
  preview callback), in this process on the first GPU;
* **PP**: the functions the nodes call: PP Load Diffusion Model (``load_on_disk``) and
  PP KSampler (``pp_nodes.pp_sample``) on the pack's worker group.

Per variant: end-to-end time per prompt (warm: the model placed), the steady step (median
interval between step callbacks), the per-prompt overhead (wall - steps x steady), the
time to the first step, peak GPU memory (stock: this process; PP: every worker), the
relative L2 of the final latent against stock; for PP where the time of a prompt goes
(host dispatch, worker receive, first pass, end) and whether ComfyUI's model management
logged "memory leak" in a worker.  Extras on request: the same PP variants run by an
older tree of the pack (``--legacy-tree``, for the staging regression check), EasyCache
on top of PP, the latency of Cancel within a step, a stage that does not fit its capped
worker, and the consumer-card simulation (stock limited to 24 GB with ComfyUI's own
reserve, PP2 with every worker capped at 24 GB and NCCL peer-to-peer off).

    python bench/bench_product.py --devices cuda:0,cuda:1 --model flux --variants core,legacy
    python bench/bench_product.py --devices cuda:0,cuda:1 --model wan14b --variants core,extras
    python bench/bench_product.py --smoke            # tiny Wan on cpu,cpu (about a minute)
    python bench/bench_product.py --smoke --model h3 --devices cuda:0 --variants core,stockloader  # tiny H3, one CPU worker

Writes ``bench/results/<gpus>x<card>_product_<model>.json`` (``--out``) with
``"baseline": "stock"``, ``ratios`` (stock time / PP time) and ``overhead_ms`` (PP's
per-prompt overhead minus stock's, per variant).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

MODELS = {
    # name: (release in family_table, latent shape, context (tokens, width), extra conditioning, cfg, steps)
    "flux": ("Flux.1 dev (12B)", (1, 16, 128, 128), (512, 4096), {"pooled_output": (1, 768), "guidance": 3.5},
             3.5, 20),
    "wan14b": ("Wan 2.1 t2v 14B", (1, 16, 9, 60, 104), (512, 4096), {}, 5.0, 8),
    "wan14b_720p": ("Wan 2.1 t2v 14B", (1, 16, 21, 90, 160), (512, 4096), {}, 5.0, 8),  # 1280x720 x 81 frames
    # an empty 480x832 x 33-frame video + audio latent (MiniMaxH3AV makes the audio part from it)
    "h3": ("MiniMax-H3 (33B)", (1, 32, 9, 30, 52), (256, 5120), {"minimax_token_tags": "tags"}, 5.0, 8),
}
# --smoke: the harness on a tiny model of the family (tests/family_zoo.py), on CPU workers
SMOKES = {"wan14b": ("wan21_t2v", (1, 16, 3, 16, 16), (16, 4096), {}, 5.0, 4),
          "h3": ("minimax_h3", (1, 32, 2, 8, 8), (6, 48), {"minimax_token_tags": "tags"}, 5.0, 3)}


def log(*a):
    print(*a, flush=True)


# -- the pack and ComfyUI -------------------------------------------------------------------
def import_pack(pack_root: Path):
    """The pack's node module as ComfyUI imports it (a package), without its routes (which
    need ComfyUI's server): ``pp_nodes`` and ``pp_runtime`` of ``pack_root``."""
    pkg = types.ModuleType("pack")
    pkg.__path__ = [str(pack_root)]
    sys.modules["pack"] = pkg
    nodes = types.ModuleType("pack.nodes")
    nodes.__path__ = [str(pack_root / "nodes")]
    sys.modules["pack.nodes"] = nodes
    return importlib.import_module("pack.nodes.pp_nodes"), _pack_module("comfy.loading", "comfy_bridge")


def _pack_module(name: str, before: str):
    """``pack.pp_runtime.<name>``, or its name in a tree from before the package was laid out
    by role (``--legacy-tree``)."""
    try:
        return importlib.import_module(f"pack.pp_runtime.{name}")
    except ImportError:
        return importlib.import_module(f"pack.pp_runtime.{before}")


def registry():
    """The pack's shared worker groups (``shared_group``, ``shutdown_all``)."""
    return _pack_module("workers.registry", "group")


class StepClock:
    """Wraps ComfyUI's preview callback (what both samplers call once per step) to time steps."""

    def __init__(self):
        import latent_preview
        self.times: list[float] = []
        original = latent_preview.prepare_callback

        def prepare_callback(model, steps, *a, **k):
            cb = original(model, steps, *a, **k)

            def timed(step, x0, x, total):
                self.times.append(time.perf_counter())
                return cb(step, x0, x, total)
            return timed
        latent_preview.prepare_callback = prepare_callback


_CONDITIONING = {}


def conditioning(spec, seed=0):
    """Random text-encoder outputs, made once and handed to every prompt: ComfyUI caches its
    nodes' outputs, so a prompt whose text did not change (a new seed, a new sampler) gets
    the same conditioning objects, made in inference mode as its nodes make them."""
    import torch
    key = (spec[0], seed)
    if key not in _CONDITIONING:
        _, _, (tokens, width), extra, _, _ = spec
        out = []
        with torch.inference_mode():
            for branch in range(2):
                g = torch.Generator().manual_seed(seed * 2 + branch)
                opts = {k: (torch.randn(v, generator=g) if isinstance(v, tuple) else
                            torch.ones(tokens, dtype=torch.long) if v == "tags" else v) for k, v in extra.items()}
                out.append([[torch.randn(1, tokens, width, generator=g), opts]])
        _CONDITIONING[key] = out
    return _CONDITIONING[key]


def summarize(name, t0, t1, steps, clock_times, extra=None) -> dict:
    times = [t for t in clock_times if t >= t0]
    gaps = [b - a for a, b in zip(times, times[1:])]
    steady = statistics.median(gaps) if gaps else (t1 - t0) / max(steps, 1)
    out = {"wall_s": t1 - t0, "steps": steps, "steady_step_s": steady,
           "overhead_s": (t1 - t0) - steps * steady, "first_step_s": (times[0] - t0) if times else None}
    out.update(extra or {})
    log(f"  {name:28s} wall {out['wall_s']:7.3f} s  step {steady * 1e3:8.1f} ms  overhead {out['overhead_s'] * 1e3:7.1f} ms"
        f"  first step {(out['first_step_s'] or 0) * 1e3:7.1f} ms")
    return out


def _flat(x):
    import torch
    return torch.cat([t.float().flatten() for t in x.unbind()]) if getattr(x, "is_nested", False) else x.float()


def rel_l2(a, b) -> float | None:
    if a is None or b is None:
        return None
    a, b = _flat(a), _flat(b)
    return ((a - b).norm() / b.norm()).item()


def enable_dynamic_vram() -> bool:
    """ComfyUI's DynamicVRAM as its main.py turns it on (comfy-aimdo; the default on NVIDIA since
    v0.2x): the stock loader then returns ModelPatcherDynamic MODELs."""
    import comfy.memory_management
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy_aimdo.control
    if not comfy_aimdo.control.init():
        return False
    try:
        ok = comfy_aimdo.control.init_devices((d.index, 0) for d in mm.get_all_torch_devices())
    except TypeError:
        ok = comfy_aimdo.control.init_devices(d.index for d in mm.get_all_torch_devices())
    if ok:
        comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
        comfy.memory_management.aimdo_enabled = True
    return bool(ok)


def random_lora(model, n_keys=8, rank=16, seed=0) -> dict:
    """A LoRA file's state dict for ``n_keys`` of the model's linear weights (ComfyUI's own key
    map), random up/down matrices: what Load LoRA would read."""
    import comfy.lora
    import torch
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    sd = model.model.diffusion_model.state_dict()
    g = torch.Generator().manual_seed(seed)
    out = {}
    for lora_key, weight_key in list((k, v) for k, v in key_map.items() if isinstance(v, str)
                                     and "blocks." in k and sd.get(v[len("diffusion_model."):]) is not None
                                     and sd[v[len("diffusion_model."):]].dim() == 2)[:n_keys]:
        w = sd[weight_key[len("diffusion_model."):]]
        out[f"{lora_key}.lora_up.weight"] = torch.randn(w.shape[0], rank, generator=g) * 0.01
        out[f"{lora_key}.lora_down.weight"] = torch.randn(rank, w.shape[1], generator=g) * 0.01
    return out


# -- the runs ----------------------------------------------------------------------------------
def run_stock(model, spec, cfg, batch, steps, seed, clock, label):
    """What the stock KSampler node does (nodes.common_ksampler), timed."""
    import comfy.sample
    import latent_preview
    import torch
    latent = torch.zeros((batch,) + tuple(spec[1][1:]))
    pos, neg = conditioning(spec)
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    latent = comfy.sample.fix_empty_latent_channels(model, latent)
    noise = comfy.sample.prepare_noise(latent, seed)
    callback = latent_preview.prepare_callback(model, steps)
    out = comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", pos, neg, latent, denoise=1.0,
                              callback=callback, disable_pbar=True, seed=seed)
    t1 = time.perf_counter()
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return out, summarize(label, t0, t1, steps, clock.times, {"peak_bytes": peak})


def run_pp(pp_nodes, model, group, spec, cfg, batch, steps, seed, clock, label, split="balanced", mode="sequential",
           manual="", patches=None, layout=None, free_host_copy=False):
    import torch
    latent = {"samples": torch.zeros((batch,) + tuple(spec[1][1:]))}
    pos, neg = conditioning(spec)
    t0 = time.perf_counter()
    out = pp_nodes.pp_sample(model, group, pos, neg, latent, seed=seed, steps=steps, cfg=cfg, sampler_name="euler",
                             scheduler="simple", denoise=1.0, split={"strategy": split, "manual": manual},
                             cfg_mode={"mode": mode, "cfg_normalize": False},
                             patch_pipelining=patches, layout=layout, free_host_copy=free_host_copy)[0]["samples"]
    t1 = time.perf_counter()
    shared_group = registry().shared_group
    g = shared_group(group["devices"])
    last = g.last_run
    ranks = last["ranks"]
    host = last.get("host_phases") or {}
    phases = {}
    if host and all(r.get("phases") for r in ranks):  # where the prompt's time went (this tree's workers)
        t_run = host["run"]
        phases = {"host_dispatch_ms": (host["dispatched"] - t_run) * 1e3,
                  "worker_received_ms": [((r["phases"]["received"] or t_run) - t_run) * 1e3 for r in ranks],
                  "worker_imported_ms": [((r["phases"].get("imported") or t_run) - t_run) * 1e3 for r in ranks],
                  "worker_context_ms": [((r["phases"].get("started") or t_run) - t_run) * 1e3 for r in ranks],
                  "worker_placed_ms": [(r["phases"]["placed"] - t_run) * 1e3 for r in ranks],
                  "first_pass_ms": [((r["phases"]["first_pass"] or t_run) - t_run) * 1e3 for r in ranks],
                  "host_first_step_ms": ((host.get("first_step") or t_run) - t_run) * 1e3,
                  "host_done_after_last_step_ms": (host["done"] - (host.get("last_step") or host["done"])) * 1e3,
                  "sent_bytes": host.get("sent_bytes")}
    return out, summarize(label, t0, t1, steps, clock.times, {
        "split": last.get("split"), "layout": last.get("layout"), "layout_reason": last.get("layout_reason"),
        "phases": phases,
        "timeline": timeline_summary(last.get("spans") or [], len(ranks)),
        "peak_bytes_per_rank": [(r.get("mem") or {}).get("peak") for r in ranks],
        "patch_pipelining": [r.get("patch_pipelining") for r in ranks] if patches else None,
        "loaded": [r.get("loaded") for r in ranks], "load_seconds": [r.get("load_seconds") for r in ranks],
        "load_phases": [r.get("load_phases") for r in ranks], "patch_seconds": [r.get("patch_seconds") for r in ranks],
        "load_peak_rss_growth": [r.get("load_peak_growth") for r in ranks], "bytes_read": [r.get("bytes_read") for r in ranks]})


def timeline_summary(all_spans, world) -> list:
    """Per rank, the middle pass of the run: its length on the GPU, the time in compute spans,
    the host time issuing them (``cpu_ms`` >= ``compute_ms``: the GPU waited on the CPU) and
    the time waiting for the previous stage."""
    out = []
    for rank in range(world):
        spans = [s for s in all_spans if s.get("rank") == rank]
        passes = sorted({s["step"] for s in spans if s["kind"] == "compute"})
        if not passes:
            out.append(None)
            continue
        mid = [s for s in spans if s["step"] == passes[len(passes) // 2]]
        comp = [s for s in mid if s["kind"] == "compute"]
        out.append({"pass": passes[len(passes) // 2], "spans": len(comp),
                    "pass_ms": round(max(s["t1_ms"] for s in mid) - min(s["t0_ms"] for s in mid), 2),
                    "compute_ms": round(sum(s["t1_ms"] - s["t0_ms"] for s in comp), 2),
                    "cpu_ms": round(sum(s.get("cpu_ms", 0) for s in comp), 2),
                    "wait_ms": round(sum(s["t1_ms"] - s["t0_ms"] for s in mid if s["kind"] == "wait"), 2)})
    return out


def worker_log_leaks(group) -> int:
    n = 0
    for p in getattr(group, "logs", []):
        try:
            n += Path(p).read_text(errors="replace").count("memory leak")
        except OSError:
            pass
    return n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", default="cuda:0,cuda:1")
    ap.add_argument("--model", choices=list(MODELS), default="flux")
    ap.add_argument("--variants", default="core",
                    help="core, cold, sp, patches, legacy, extras, consumer, stockloader, changes (comma-separated)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=1, help="timed prompts per variant (after one warm-up)")
    ap.add_argument("--pack-root", default=str(ROOT), help="the pack to measure (--legacy-tree: an older one)")
    ap.add_argument("--legacy-tree", default=None, help="an older tree of the pack: also time its PP variants")
    ap.add_argument("--only-pp", action="store_true", help="(internal) PP variants only: the legacy run")
    ap.add_argument("--model-dir", default=os.environ.get("PP_BENCH_MODELS", "/tmp/pp-bench-models"))
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--file-dtype", choices=["bf16", "fp8"], default="bf16",
                    help="the model file's weights: bf16, or fp8 (e4m3) block matrices as released fp8 files")
    ap.add_argument("--dynamic-vram", action="store_true",
                    help="turn on ComfyUI's DynamicVRAM (comfy-aimdo) as its main.py does by default on NVIDIA")
    args = ap.parse_args(argv)

    comfy_root = os.environ.get("COMFYUI_ROOT") or str(ROOT / ".comfy")
    sys.path.insert(0, comfy_root)
    smoke = args.smoke
    from comfy.cli_args import args as comfy_args
    comfy_args.cpu = smoke
    if args.dynamic_vram:  # as ComfyUI's main.py: comfy-aimdo's library first, then ComfyUI's modules
        import comfy_aimdo.control
        comfy_aimdo.control.init()
    import torch
    import comfy.model_management as mm
    import comfy.sd
    import model_files

    dynamic = enable_dynamic_vram() if args.dynamic_vram else False
    log(f"DynamicVRAM: {'on' if dynamic else 'off'}")
    spec = SMOKES.get(args.model, SMOKES["wan14b"]) if smoke else MODELS[args.model]
    steps = args.steps or spec[5]
    cfg_scale = spec[4]
    devices = ",".join("cpu" for _ in args.devices.split(",")) if smoke else args.devices
    world = len(devices.split(","))
    pp_nodes, cb = import_pack(Path(args.pack_root))
    clock = StepClock()

    # -- the model file (released size, random bf16 weights) --------------------------------
    os.makedirs(args.model_dir, exist_ok=True)
    file_model = "wan14b" if args.model == "wan14b_720p" else args.model  # one file, two sizes of video
    path = os.path.join(args.model_dir, f"{'smoke_' if smoke else ''}{file_model}_{args.file_dtype}.safetensors")
    if not os.path.exists(path):
        t = time.perf_counter()
        if smoke:
            sys.path.insert(0, str(ROOT / "tests"))
            import family_zoo
            family_zoo.write_file(family_zoo.BY_NAME[spec[0]], path, dtype=torch.bfloat16)
        else:
            _, dm = model_files.release_model(spec[0])
            model_files.write(dm, path, fp8_matrices=args.file_dtype == "fp8")
        log(f"wrote {path}: {os.path.getsize(path) / 2**30:.1f} GiB in {time.perf_counter() - t:.0f} s")
    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not smoke else "cpu"
    result = {"baseline": "stock", "card": card, "gpus": world, "devices": devices, "torch": torch.__version__,
              "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d"), "pack": args.pack_root,
              "model": {"name": spec[0], "file_gib": os.path.getsize(path) / 2**30, "latent": spec[1],
                        "context": spec[2], "cfg": cfg_scale, "steps": steps, "sampler": "euler/simple"},
              "variants": {}, "ratios": {}, "overhead_ms": {}, "rel_l2": {}, "extras": {},
              "file_dtype": args.file_dtype, "dynamic_vram": dynamic}
    V = result["variants"]
    wanted = set(args.variants.split(","))
    key = args.model if not smoke or args.model in SMOKES else "wan14b"
    P = f"pp{world}"  # every GPU one stage; CP: CFG-parallel, 2 pipelines of world/2 stages
    CP = "cfgpar2" if world == 2 else f"pp{world // 2}xcfg2"
    seed = 3

    def timed(fn, label, *a, **k):
        # placed / loaded, kernels warm; with patches the same steps as the timed prompt: its
        # CUDA graphs are captured then (a graph's key holds the sampler's sigmas: their count)
        # and the timed prompt is a later prompt of the same workflow
        fn(*a, **{**k, "steps": k["steps"] if "patches" in label else 2, "label": label + " (warm-up)"})
        out = None
        runs = []
        for _ in range(args.repeat):
            out, s = fn(*a, **k, label=label)
            runs.append(s)
        best = min(runs, key=lambda r: r["wall_s"])
        V[label] = best
        return out

    # -- stock -----------------------------------------------------------------------------
    stock = {}
    core = "core" in wanted
    if not args.only_pp and (core or "patches" in wanted or "sp" in wanted or "cold" in wanted):
        log("stock KSampler (ComfyUI's loader and sampling, this process, first GPU):")
        t_load = time.perf_counter()
        model = comfy.sd.load_diffusion_model(path)
        result["extras"]["stock_patcher"] = type(model).__name__
        if world == 1:  # the first prompt: the stock loader and a 2-step prompt, from the file
            t_load = time.perf_counter() - t_load
            _, s = run_stock(model, spec, 1.0, 1, 2, seed, clock, "stock_first_prompt")
            V["stock_first_prompt"] = {**s, "load_s": t_load, "first_prompt_s": t_load + s["wall_s"]}
        plan = (("stock_cfg1", 1.0, 1), ("stock_cfg", cfg_scale, 1), ("stock_b2_cfg", cfg_scale, 2))
        if world == 1:
            plan = plan[:2]
        for label, c, b in (plan if core else plan[:2] if "patches" in wanted or "sp" in wanted else ()):
            stock[label] = timed(lambda **k: run_stock(model, spec, k["cfg"], k["batch"], k["steps"], seed, clock,
                                                       k["label"]), label, cfg=c, batch=b, steps=steps)
        mm.unload_all_models()
        del model
        mm.soft_empty_cache()

    # -- PP KSampler --------------------------------------------------------------------------
    pp = {}
    if core or args.only_pp or "patches" in wanted or "sp" in wanted:
        log(f"PP KSampler ({args.pack_root}) on {devices}:")
        model_pp = cb.load_on_disk(path)
        group = {"devices": devices.split(","), "backend": "local", "residency": "keep", "memory_cap_gb": ""}
        plan = [(f"{P}_cfg1", 1.0, 1, "balanced", "sequential"), (f"{P}_seqcfg", cfg_scale, 1, "balanced", "sequential"),
                (CP, cfg_scale, 1, "balanced", "cfg_parallel"), (f"{P}_b2_seqcfg", cfg_scale, 2, "balanced",
                                                                  "sequential"),
                (f"{P}_seqcfg_by_memory", cfg_scale, 1, "by_memory", "sequential")]
        if not core and "patches" not in wanted and not args.only_pp:
            plan = []  # sequence parallelism alone
        elif args.only_pp or not core or world == 1:
            plan = plan[:3] if world >= 4 else plan[:2]  # PP2 x CFG2: the exact reference of its patches
        if world == 1:  # the first prompt on a started group: placement and a 2-step prompt
            start = start_group(pp_nodes, group)
            _, s = run_pp(pp_nodes, model_pp, group, spec, 1.0, 1, 2, seed, clock, "pp1_first_prompt")
            V["pp1_first_prompt"] = {**s, **start, "first_prompt_s": s["wall_s"]}
            result["ratios"][f"cold_{key}_pp1"] = V["stock_first_prompt"]["first_prompt_s"] / s["wall_s"] \
                if "stock_first_prompt" in V else None
        for label, c, b, split, mode in plan:
            pp[label] = timed(lambda **k: run_pp(pp_nodes, model_pp, group, spec, k["cfg"], k["batch"], k["steps"], seed,
                                                 clock, k["label"], split=k["split"], mode=k["mode"]),
                              label, cfg=c, batch=b, split=split, mode=mode, steps=steps)
        if "sp" in wanted:
            sp_variants(result, pp, pp_nodes, model_pp, group, spec, cfg_scale, steps, seed, clock, world, timed)
        if "patches" in wanted:
            patch_variants(result, pp, pp_nodes, model_pp, group, spec, cfg_scale, steps, seed, clock, P, CP, timed)
        shared_group = registry().shared_group
        result["extras"]["worker_log_memory_leak_lines"] = worker_log_leaks(shared_group(group["devices"]))

    # -- ratios ------------------------------------------------------------------------------
    pairs = {f"{key}_{P}_cfg1": ("stock_cfg1", f"{P}_cfg1"), f"{key}_{P}_seqcfg": ("stock_cfg", f"{P}_seqcfg"),
             f"{key}_{P}_patches_cfg1": ("stock_cfg1", f"{P}_patches_cfg1"),
             **{f"{key}_{P}_patches{n}_cfg1": ("stock_cfg1", f"{P}_patches{n}_cfg1") for n in (2, 3, 4, 6, 8, 12, 16)},
             f"{key}_{P}_patches_seqcfg": ("stock_cfg", f"{P}_patches_seqcfg"),
             **{f"{key}_{P}_patches{n}_seqcfg": ("stock_cfg", f"{P}_patches{n}_seqcfg") for n in (2, 3, 4, 6, 8, 12)},
             f"{key}_{CP}": ("stock_cfg", CP), f"{key}_{CP}_patches": ("stock_cfg", f"{CP}_patches"),
             f"{key}_{P}_b2_seqcfg": ("stock_b2_cfg", f"{P}_b2_seqcfg")}
    pairs.update({f"{key}_{label}": (("stock_cfg1" if label.endswith("_cfg1") else "stock_cfg"), label)
                  for label in result.get("sp_variants", [])})
    for name, (s, p) in pairs.items():
        if s in V and p in V:
            result["ratios"][name] = V[s]["wall_s"] / V[p]["wall_s"]
            result["ratios"][name + "_steady"] = V[s]["steady_step_s"] / V[p]["steady_step_s"]
            result["overhead_ms"][p] = (V[p]["overhead_s"] - V[s]["overhead_s"]) * 1e3
            result["rel_l2"][p] = rel_l2(pp.get(p), stock.get(s))
    if f"{P}_seqcfg_by_memory" in V and "stock_cfg" in V and V["stock_cfg"].get("peak_bytes"):
        peaks = [x for x in V[f"{P}_seqcfg_by_memory"]["peak_bytes_per_rank"] if x]
        if peaks:
            result["ratios"][f"mem_{key}_{P}_by_memory"] = max(peaks) / V["stock_cfg"]["peak_bytes"]

    # -- the same PP variants with an older tree of the pack (staging regression check) --------
    if args.legacy_tree and "legacy" in wanted:
        shutdown_all = registry().shutdown_all
        shutdown_all()
        out = os.path.join(args.model_dir, "legacy.json")
        cmd = [sys.executable, str(BENCH / "bench_product.py"), "--devices", devices, "--model", args.model,
               "--pack-root", args.legacy_tree, "--only-pp", "--out", out, "--model-dir", args.model_dir,
               "--repeat", str(args.repeat)] + (["--steps", str(args.steps)] if args.steps else []) + \
              (["--smoke"] if smoke else [])
        log("legacy tree:", " ".join(cmd))
        subprocess.run(cmd, check=True)
        legacy = json.load(open(out))["variants"]
        cmp = {}
        for label in (f"{P}_cfg1", f"{P}_seqcfg", f"{P}_first_prompt"):
            if label in legacy and label in V:
                cmp[label] = {"steady_step_ms_now": V[label]["steady_step_s"] * 1e3,
                              "steady_step_ms_legacy": legacy[label]["steady_step_s"] * 1e3,
                              "step_time_change": V[label]["steady_step_s"] / legacy[label]["steady_step_s"] - 1,
                              "overhead_ms_now": V[label].get("overhead_s", 0) * 1e3,
                              "overhead_ms_legacy": legacy[label].get("overhead_s", 0) * 1e3,
                              "wall_s_now": V[label]["wall_s"], "wall_s_legacy": legacy[label]["wall_s"]}
        result["extras"]["legacy"] = cmp
        log("staging vs legacy adapters:", json.dumps(cmp, indent=1))

    if "cold" in wanted:
        cold(result, pp_nodes, cb, path, spec, devices, clock, seed, key)
    if "changes" in wanted:
        changes(result, pp_nodes, cb, path, spec, devices, clock, seed)
    if "stockloader" in wanted:
        stock_loader_model(result, pp_nodes, path, spec, devices, cfg_scale, steps, clock, seed, stock.get("stock_cfg1"))
    if "extras" in wanted:
        extras(result, pp_nodes, cb, path, spec, devices, cfg_scale, clock, seed, smoke)
    if "consumer" in wanted:
        consumer(result, pp_nodes, cb, path, spec, devices, cfg_scale, steps, clock, seed, smoke)

    out = args.out or str(BENCH / "results" / f"{world}x{card.replace('NVIDIA ', '').replace(' ', '')}"
                          f"_product_{'smoke' if smoke else args.model}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1, default=str)
    log("ratios (stock time / PP time):", json.dumps(result["ratios"], indent=1))
    log("overhead_ms (PP's per-prompt overhead minus stock's):", json.dumps(result["overhead_ms"], indent=1))
    log("rel_l2 vs stock:", json.dumps(result["rel_l2"]))
    log(f"wrote {out}")
    shutdown_all = registry().shutdown_all
    shutdown_all()


def start_group(pp_nodes, group) -> dict:
    """A started group, as the PP Worker Group node leaves it while ComfyUI loads the text
    encoders: workers up, ComfyUI's model code imported in each, torch.distributed joined."""
    g = registry().shared_group(group["devices"], extra_paths=[pp_nodes.COMFY_ROOT])
    t = time.perf_counter()
    g.start()
    return {"group_start_s": time.perf_counter() - t, "worker_import_s": [i.get("import_s") for i in g.info],
            "worker_join_s": [i.get("join_s") for i in g.info]}


# -- the first prompt of each loader ----------------------------------------------------------------
def cold(result, pp_nodes, cb, path, spec, devices, clock, seed, key, steps=2):
    """The first prompt (load + placement + 2 steps, cfg 1) on a fresh group started before it,
    for each loader a user has: PP Load Diffusion Model, the stock Load Diffusion Model's MODEL
    (the workers read the file it came from; its host copy kept), the same with
    free_host_weights; against stock's load + 2 steps (``stock_first_prompt``)."""
    import comfy.model_management as mm
    import comfy.sd
    V = result["variants"]
    stock_first = (V.get("stock_first_prompt") or {}).get("first_prompt_s")
    shutdown_all = registry().shutdown_all
    group = {"devices": devices.split(","), "backend": "local", "residency": "keep", "memory_cap_gb": ""}
    for label, loader, free, ratio in (("cold_pp_loader", cb.load_on_disk, False, ""),
                                       ("cold_stock_loader", comfy.sd.load_diffusion_model, False, "_stockloader"),
                                       ("cold_stock_loader_free_host", comfy.sd.load_diffusion_model, True,
                                        "_stockloader_free_host")):
        shutdown_all()
        mm.unload_all_models()
        mm.soft_empty_cache()
        start = start_group(pp_nodes, group)
        t = time.perf_counter()
        model = loader(path)
        load_s = time.perf_counter() - t
        _, s = run_pp(pp_nodes, model, group, spec, 1.0, 1, steps, seed, clock, label, free_host_copy=free)
        last = registry().shared_group(group["devices"]).last_run
        V[label] = {**s, **start, "load_s": load_s, "first_prompt_s": load_s + s["wall_s"],
                    "model_file": (last.get("model") or {}).get("path")}
        V[label]["exported"] = V[label]["model_file"] != path
        if stock_first:
            result["ratios"][f"cold_{key}_pp1{ratio}"] = stock_first / V[label]["first_prompt_s"]
        log(f"{label}: group start {start['group_start_s']:.2f} s (import {start['worker_import_s']}), load {load_s:.2f} s, "
            f"first prompt {s['wall_s']:.2f} s; stock {stock_first}")
        del model
    shutdown_all()


# -- changing things: another model, a LoRA's strength, another LoRA ---------------------------------
def changes(result, pp_nodes, cb, path, spec, devices, clock, seed, steps=2):
    """What a change between prompts costs, stock against PP (2-step prompts at cfg 1, so the
    change shows): a second model of the same size (a byte copy of the file under another
    name) and back, on PP with each residency (keep: both stay placed; park: the idle one in
    host RAM; release: read again), and a LoRA on every block linear (rank 16) at 0.8, its
    strength changed to 0.5, another LoRA (stock re-patches on its GPU; PP re-patches its
    stages from the unpatched weights it holds, nothing read from disk)."""
    import shutil
    import comfy.model_management as mm
    import comfy.sd
    V, C = result["variants"], result["extras"].setdefault("changes", {})
    other = path.replace(".safetensors", "_copy.safetensors")
    if not os.path.exists(other):
        shutil.copyfile(path, other)
    log("changes, stock (ComfyUI's loader and model management):")
    a = comfy.sd.load_diffusion_model(path)
    run_stock(a, spec, 1.0, 1, steps, seed, clock, "stock A (warm-up)")
    t = time.perf_counter()
    b = comfy.sd.load_diffusion_model(other)
    load_b = time.perf_counter() - t
    _, s = run_stock(b, spec, 1.0, 1, steps, seed, clock, "stock_change_to_b")
    V["stock_change_to_b"] = {**s, "load_s": load_b, "wall_s": load_b + s["wall_s"]}
    _, V["stock_change_back_to_a"] = run_stock(a, spec, 1.0, 1, steps, seed, clock, "stock_change_back_to_a")
    loras = [random_lora(a, n_keys=10**6, seed=i) for i in (1, 2)]
    C["lora_keys"], C["lora_bytes"] = len(loras[0]) // 2, sum(t.numel() * t.element_size() for t in loras[0].values())
    lora_models = {}
    for label, lora, strength in (("lora_first", 0, 0.8), ("lora_strength", 0, 0.5), ("lora_swap", 1, 0.8)):
        m = comfy.sd.load_lora_for_models(a, None, loras[lora], strength, 0.0)[0]
        lora_models[label] = (lora, strength)
        _, V[f"stock_{label}"] = run_stock(m, spec, 1.0, 1, steps, seed, clock, f"stock_{label}")
    del a, b, m
    mm.unload_all_models()
    mm.soft_empty_cache()

    log("changes, PP (PP Load Diffusion Model):")
    shutdown_all = registry().shutdown_all
    ma, mb = cb.load_on_disk(path), cb.load_on_disk(other)
    for residency in ("keep", "park", "release"):
        shutdown_all()
        group = {"devices": devices.split(","), "backend": "local", "residency": residency, "memory_cap_gb": ""}
        run_pp(pp_nodes, ma, group, spec, 1.0, 1, steps, seed, clock, f"pp A, {residency} (placing)")
        V[f"pp_change_to_b_{residency}"] = run_pp(pp_nodes, mb, group, spec, 1.0, 1, steps, seed, clock,
                                                  f"pp_change_to_b_{residency}")[1]
        V[f"pp_change_back_to_a_{residency}"] = run_pp(pp_nodes, ma, group, spec, 1.0, 1, steps, seed, clock,
                                                       f"pp_change_back_to_a_{residency}")[1]
        result["ratios"][f"change_to_b_{residency}"] = V["stock_change_to_b"]["wall_s"] / \
            V[f"pp_change_to_b_{residency}"]["wall_s"]
        result["ratios"][f"change_back_to_a_{residency}"] = V["stock_change_back_to_a"]["wall_s"] / \
            V[f"pp_change_back_to_a_{residency}"]["wall_s"]
    group = {"devices": devices.split(","), "backend": "local", "residency": "keep", "memory_cap_gb": ""}
    for label, (lora, strength) in lora_models.items():
        m = comfy.sd.load_lora_for_models(ma, None, loras[lora], strength, 0.0)[0]
        _, V[f"pp_{label}"] = run_pp(pp_nodes, m, group, spec, 1.0, 1, steps, seed, clock, f"pp_{label}")
        result["ratios"][f"change_{label}"] = V[f"stock_{label}"]["wall_s"] / V[f"pp_{label}"]["wall_s"]
    log("changes (stock time / PP time):", json.dumps({k: v for k, v in result["ratios"].items()
                                                         if k.startswith("change_")}, indent=1))
    shutdown_all()


# -- a stock-loader MODEL (DynamicVRAM where it is on) with a LoRA, handed to PP KSampler ---------
def stock_loader_model(result, pp_nodes, path, spec, devices, cfg_scale, steps, clock, seed, plain=None):
    """The stock Load Diffusion Model's MODEL (a ModelPatcherDynamic under DynamicVRAM) with a
    LoRA at 0.8: the stock KSampler on it, then PP KSampler on the same MODEL, first with its
    host copy kept, then with free_host_weights (the file it came from is read by the workers:
    no export), against stock."""
    import comfy.model_management as mm
    import comfy.sd
    V = result["variants"]
    base = comfy.sd.load_diffusion_model(path)
    lora = random_lora(base)
    model = comfy.sd.load_lora_for_models(base, None, lora, 0.8, 0.0)[0]
    group = {"devices": devices.split(","), "backend": "local", "residency": "keep", "memory_cap_gb": ""}
    ref, V["stockloader_stock_cfg1"] = run_stock(model, spec, 1.0, 1, steps, seed, clock, "stockloader_stock_cfg1")
    out, V["stockloader_pp_cfg1"] = run_pp(pp_nodes, model, group, spec, 1.0, 1, steps, seed, clock,
                                           "stockloader_pp_cfg1")
    pp_nodes_kw = dict(free_host_copy=True)
    import torch
    latent = {"samples": torch.zeros((1,) + tuple(spec[1][1:]))}
    pos, neg = conditioning(spec)
    t0 = time.perf_counter()
    freed = pp_nodes.pp_sample(model, group, pos, neg, latent, seed=seed, steps=steps, cfg=1.0, sampler_name="euler",
                               scheduler="simple", denoise=1.0, split={"strategy": "balanced", "manual": ""},
                               cfg_mode={"mode": "sequential", "cfg_normalize": False}, **pp_nodes_kw)[0]["samples"]
    V["stockloader_pp_free_host"] = summarize("stockloader_pp_free_host", t0, time.perf_counter(), steps, clock.times)
    shared_group = registry().shared_group
    last = shared_group(group["devices"]).last_run
    result["extras"]["stockloader"] = {
        "patcher": type(base).__name__, "lora_keys": len(lora) // 2, "model_file": last.get("model", {}).get("path"),
        "rel_l2_pp_vs_stock": rel_l2(out, ref), "rel_l2_free_host_vs_stock": rel_l2(freed, ref),
        "lora_changed_stock_by": rel_l2(ref, plain),
        "host_weights_left": sum(p.numel() for p in base.model.diffusion_model.parameters() if not p.is_meta)}
    log("stock-loader MODEL:", json.dumps(result["extras"]["stockloader"], default=str))
    mm.unload_all_models()


# -- sequence parallelism (exact): the layouts of the PP Parallel Layout node ------------------------
def sp_layouts(world: int) -> list[tuple[str, float | None, str, int]]:
    """(label, cfg (None: the model's), CFG mode, sequence_parallel) for the layouts that fit
    ``world`` devices: every GPU a shard (sp), two stages of shards (pp2 x sp), CFG-parallel
    pipelines of shards (cfg2 x sp, cfg2 x pp2 x sp), sequential CFG on shards, and the auto
    layout (sequence_parallel 0) at cfg 1 and with CFG."""
    out = []
    if world >= 2:
        out += [(f"sp{world}_cfg1", 1.0, "sequential", world), (f"sp{world}_seqcfg", None, "sequential", world)]
    if world >= 4:
        out += [(f"pp2xsp{world // 2}_cfg1", 1.0, "sequential", world // 2),
                (f"cfg2xsp{world // 2}", None, "cfg_parallel", world // 2)]
    if world >= 8:
        out += [(f"cfg2xpp2xsp{world // 4}", None, "cfg_parallel", world // 4)]
    if world >= 2:
        out += [("auto_cfg1", 1.0, "auto", 0), ("auto_cfg", None, "auto", 0)]
    return out


def sp_variants(result, pp, pp_nodes, model_pp, group, spec, cfg_scale, steps, seed, clock, world, timed):
    """PP KSampler with the PP Parallel Layout node's layouts (``sp_layouts``), timed like the
    exact variants, against stock at the same CFG; the layout each ran (and the auto layout's
    reason) and every worker's peak memory are in the variant."""
    layouts = sp_layouts(world)
    if not layouts:
        log(f"sequence parallelism needs 2+ devices (here {world}): no sp variants")
        return
    log("PP KSampler with sequence parallelism (PP Parallel Layout):")
    result["sp_variants"] = []
    for label, c, mode, degree in layouts:
        choice = {"sequence_parallel": degree, "attention_exchange": "auto"}
        pp[label] = timed(lambda **k: run_pp(pp_nodes, model_pp, group, spec, k["cfg"], 1, k["steps"], seed, clock,
                                             k["label"], mode=mode, layout=choice),
                          label, cfg=cfg_scale if c is None else c, steps=steps)
        result["sp_variants"].append(label)
        v = result["variants"][label]
        log(f"    layout {v.get('layout')}  ({v.get('layout_reason')})  peak GiB per rank "
            f"{[round((b or 0) / 2**30, 1) for b in v.get('peak_bytes_per_rank') or []]}")


# -- patch pipelining (approximate, opt-in) -------------------------------------------------------
def patch_variants(result, pp, pp_nodes, model_pp, group, spec, cfg_scale, steps, seed, clock, P, CP, timed):
    """PP with patches (M = 2 x stages, and ``PP_BENCH_PATCH_COUNTS``, default 8) at cfg 1 and
    sequential CFG, and CFG-parallel with patches on 4+ GPUs, warm-up 1, timed like the exact
    variants; the deviation: rel-L2 of the final latent against exact PP at warm-up 1, 2 and 4
    (random weights: a proxy for a real model's); the keys/values cache per rank."""
    log("PP KSampler with patch pipelining (approximate):")
    dev = result.setdefault("deviation", {})
    cache = result["extras"].setdefault("patch_cache_bytes_per_rank", {})
    extra = [int(n) for n in os.environ.get("PP_BENCH_PATCH_COUNTS", "8").split(",") if n.strip()]
    seq_extra = [int(n) for n in os.environ.get("PP_BENCH_SEQCFG_PATCH_COUNTS", "").split(",") if n.strip()]
    plan = [(f"{P}_patches_cfg1", 1.0, 0, f"{P}_cfg1", "sequential")]
    plan += [(f"{P}_patches{n}_cfg1", 1.0, n, f"{P}_cfg1", "sequential") for n in extra]
    plan += [(f"{P}_patches_seqcfg", cfg_scale, 0, f"{P}_seqcfg", "sequential")]
    plan += [(f"{P}_patches{n}_seqcfg", cfg_scale, n, f"{P}_seqcfg", "sequential") for n in seq_extra]
    if CP in pp:  # 2 pipelines of 2+ stages
        plan += [(f"{CP}_patches", cfg_scale, 0, CP, "cfg_parallel")]
    for label, c, count, exact, mode in plan:
        settings = {"patches": count, "warmup_steps": 1}
        pp[label] = timed(lambda **k: run_pp(pp_nodes, model_pp, group, spec, k["cfg"], 1, k["steps"], seed, clock,
                                             k["label"], mode=mode, patches=settings), label, cfg=c, steps=steps)
        cache[label] = [(r or {}).get("cache_bytes") for r in result["variants"][label]["patch_pipelining"]]
        dev[f"{label}_warmup1"] = rel_l2(pp[label], pp.get(exact))
        if count == 0 and os.environ.get("PP_BENCH_WARMUPS", "2,4"):
            for w in [int(n) for n in os.environ.get("PP_BENCH_WARMUPS", "2,4").split(",")]:
                out, result["variants"][f"{label}_warmup{w}"] = run_pp(
                    pp_nodes, model_pp, group, spec, c, 1, steps, seed, clock, f"{label} warm-up {w}", mode=mode,
                    patches={"patches": 0, "warmup_steps": w})
                dev[f"{label}_warmup{w}"] = rel_l2(out, pp.get(exact))
    dev["note"] = ("rel-L2 of the final latent against exact PP (same split, same run); random full-size weights, "
                   "so a proxy for a trained model's deviation")
    log("deviation against exact PP:", json.dumps(dev, indent=1))


# -- extras: EasyCache on PP, Cancel within a step, a stage that does not fit -------------------
def extras(result, pp_nodes, cb, path, spec, devices, cfg_scale, clock, seed, smoke):
    import comfy.model_management as mm
    import torch
    from comfy_extras.nodes_easycache import EasyCacheNode
    E = result["extras"]
    group = {"devices": devices.split(","), "backend": "local", "residency": "keep", "memory_cap_gb": ""}
    model_pp = cb.load_on_disk(path)
    steps = 20 if not smoke else 8
    log("EasyCache on top of PP (reuse_threshold 0.2, 0.15-0.95):")
    cached = EasyCacheNode.execute(model_pp, 0.2, 0.15, 0.95, False).result[0]
    runs = {}
    for label, m in (("pp2_seqcfg_20steps", model_pp), ("pp2_seqcfg_easycache", cached)):
        run_pp(pp_nodes, m, group, spec, cfg_scale, 1, 2, seed, clock, label + " (warm-up)")
        _, runs[label] = run_pp(pp_nodes, m, group, spec, cfg_scale, 1, steps, seed, clock, label)
    shared_group = registry().shared_group
    passes = shared_group(group["devices"]).last_run["ranks"][-1].get("passes")
    E["easycache"] = {"speedup_on_pp": runs["pp2_seqcfg_20steps"]["wall_s"] / runs["pp2_seqcfg_easycache"]["wall_s"],
                      "passes_with_cache": passes, "passes_without": 2 * steps, **runs}

    log("Cancel within a step:")
    mm.interrupt_current_processing(False)
    step = runs["pp2_seqcfg_20steps"]["steady_step_s"]
    state = {}

    def press():
        while len(clock.times) < state["n0"] + 2:
            time.sleep(0.001)
        time.sleep(0.5 * step)  # the middle of the third step
        state["t"] = time.perf_counter()
        mm.interrupt_current_processing(True)
    state["n0"] = len(clock.times)
    threading.Thread(target=press, daemon=True).start()
    try:
        run_pp(pp_nodes, model_pp, group, spec, cfg_scale, 1, 200, seed, clock, "cancel")
        E["cancel"] = {"error": "the run was not interrupted"}
    except mm.InterruptProcessingException:
        lag = time.perf_counter() - state["t"]
        E["cancel"] = {"step_s": step, "cancel_to_return_s": lag, "fraction_of_step": lag / step}
        log(f"  Cancel mid-step: returned {lag * 1e3:.0f} ms later (a step is {step * 1e3:.0f} ms)")
    mm.interrupt_current_processing(False)

    log("A stage that does not fit its capped worker:")
    n = cb.model_profile(model_pp.model.diffusion_model)["num_blocks"]
    shutdown_all = registry().shutdown_all
    shutdown_all()
    capped = dict(group, memory_cap_gb="6" if not smoke else "0.01")
    try:
        run_pp(pp_nodes, model_pp, capped, spec, cfg_scale, 1, 2, seed, clock, "oom", split="manual",
               manual=f"{n - 1},1")
        E["oom"] = {"error": "it fitted"}
    except Exception as e:
        E["oom"] = {"message": str(e)}
        log("  " + str(e)[:600])
    shutdown_all()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None


# -- consumer cards: 24 GB each, PCIe without peer-to-peer -----------------------------------------
def consumer(result, pp_nodes, cb, path, spec, devices, cfg_scale, steps, clock, seed, smoke):
    import comfy.model_management as mm
    import comfy.sd
    import torch
    shutdown_all = registry().shutdown_all
    C = result["extras"]["consumer_24gb"] = {}
    cap_gb = 24 if not smoke else 0.5
    log(f"consumer cards: stock limited to {cap_gb} GB (ComfyUI's own reserve), PP2 capped at {cap_gb} GB, "
        f"NCCL_P2P_DISABLE=1")
    reserved = mm.EXTRA_RESERVED_VRAM
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        mm.EXTRA_RESERVED_VRAM = total - int(cap_gb * 2**30)  # what --reserve-vram does
    model = comfy.sd.load_diffusion_model(path)
    for label, c in (("stock24_cfg", cfg_scale), ("stock24_cfg1", 1.0)):
        run_stock(model, spec, c, 1, 2, seed, clock, label + " (warm-up)")
        _, C[label] = run_stock(model, spec, c, 1, steps, seed, clock, label)
    mm.unload_all_models()
    del model
    mm.EXTRA_RESERVED_VRAM = reserved
    shutdown_all()
    os.environ["NCCL_P2P_DISABLE"] = "1"
    group = {"devices": devices.split(","), "backend": "local", "residency": "keep", "memory_cap_gb": str(cap_gb)}
    model_pp = cb.load_on_disk(path)
    for label, c in (("pp2_24_seqcfg", cfg_scale), ("pp2_24_cfg1", 1.0)):
        run_pp(pp_nodes, model_pp, group, spec, c, 1, 2, seed, clock, label + " (warm-up)", split="by_memory")
        _, C[label] = run_pp(pp_nodes, model_pp, group, spec, c, 1, steps, seed, clock, label, split="by_memory")
    del os.environ["NCCL_P2P_DISABLE"]
    shutdown_all()
    C["ratio_seqcfg"] = C["stock24_cfg"]["wall_s"] / C["pp2_24_seqcfg"]["wall_s"]
    C["ratio_cfg1"] = C["stock24_cfg1"]["wall_s"] / C["pp2_24_cfg1"]["wall_s"]
    C["not_simulated"] = ("the lent GPUs' own link (NVLink, or PCIe 5) and compute: a consumer card's PCIe 4 x16 "
                          "(about 25 GB/s) makes the stock run's offloading slower, and its slower compute makes "
                          "every step longer for both; peer-to-peer off routes PP's activations through host "
                          "memory, as on such cards")


if __name__ == "__main__":
    main()
