"""The sequence-parallel attention exchange on one GPU, against ComfyUI's attention on the whole sequence.

What a stage runs inside each self-attention under sequence parallelism, checked at the real
sizes before any multi-GPU run (so that run only measures speed): P processes share one
device, each holding one shard of the tokens (``shard_spans`` of the family's segments, the
cut a stage makes); each calls ComfyUI's attention function through ComfyUI's own wrapper
with the pack's ``optimized_attention_override`` (``StageForward._shard_attention``: the
all-gather K/V or the Ulysses exchange, on a real process group), and its rows are compared
with the same function on the whole sequence in the same process, bf16.  The collectives run
on gloo (CUDA tensors, staged through the host): NCCL refuses two ranks on one GPU, and the
exchange's arithmetic does not depend on the transport.

Per case (a family's heads, head size, token segments at a common size), degree (2, 4),
exchange (all_gather_kv, ulysses) and kernel (ComfyUI's default pick, every registered
attention function that imports: pytorch, sage, flash, comfy_kitchen_int8, split, sub_quad;
pytorch under the SDPA flash / efficient / cuDNN backends): the rel-L2 and max |diff| of the
shards' rows against the whole-sequence call (``sp_vs_whole``), and, for scale, the
whole-sequence call's own bf16 error against an fp32 reference (``whole_vs_fp32``) and the
shards' (``sp_vs_fp32``).

    COMFYUI_ROOT=/path/to/ComfyUI python bench/sp_attention.py --device cuda:0 --out out.json
    COMFYUI_ROOT=/path/to/ComfyUI python bench/sp_attention.py --smoke   # tiny shapes on CPU
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name: (token segments in the family's joint order, heads, head size, q/k/v layout, mask)
#   layout 2: [B, H, N, D] with skip_reshape (Flux, HunyuanVideo, Lumina 2 / Z-Image);
#   layout 1: [B, N, H*D] (Wan, Qwen-Image, LTX-Video); mask "key": an additive mask over the
#   keys (padding of the text), as Qwen-Image's and Lumina's text masks are
CASES = {
    "flux_1024": ([512, 4096], 24, 128, 2, None),                    # Flux.1 dev 1024x1024: text | image
    "wan14b_480x832x33": ([14040], 40, 128, 1, None),                 # 9 x 30 x 52 latent patches
    "wan14b_1280x720x81": ([75600], 40, 128, 1, None),                # 21 x 45 x 80
    "hunyuan_video_1280x720x33": ([32400, 256], 24, 128, 2, None),    # image | text
    "qwen_image_1024": ([83, 4096], 24, 128, 1, "key"),               # text | image, uneven shards
    "ltxv_768x512x97": ([4992], 32, 64, 1, None),                     # 13 x 16 x 24
    "z_image_1024": ([4096, 160], 30, 128, 2, "key"),                 # image | caption (30 heads)
}
SMOKE = {"flux_small": ([7, 25], 4, 16, 2, None), "wan_small": ([75], 4, 16, 1, None),
         "qwen_small": ([5, 36], 4, 16, 1, "key"), "zimage_small": ([36, 6], 6, 16, 2, "key")}
BIG = 40000  # tokens over which only the fast kernels run (split / sub_quad take minutes there)


def log(*a):
    print(*a, flush=True)


def _comfy(root: str, cpu: bool):
    sys.path.insert(0, root)
    from comfy.cli_args import args as comfy_args  # ComfyUI's defaults (and --cpu for the smoke run)
    comfy_args.cpu = cpu
    import comfy.ldm.modules.attention as attention
    return attention


def _pack():
    """The pack as ComfyUI imports it (a package), without its nodes."""
    pkg = types.ModuleType("pack")
    pkg.__path__ = [str(ROOT)]
    sys.modules["pack"] = pkg
    from pack.pp_runtime.comfy.staging import StageForward
    from pack.pp_runtime.engine.sequence import SequenceGroup, shard_spans
    from pack.pp_runtime.comfy.token_patches import take
    return StageForward, SequenceGroup, shard_spans, take


def kernels(attention, device: str, total: int):
    """(name, ComfyUI attention function, context) for every kernel to check."""
    out = [("optimized", attention.optimized_attention, contextlib.nullcontext)]
    for name, fn in sorted(attention.REGISTERED_ATTENTION_FUNCTIONS.items()):
        if total > BIG and name in ("split", "sub_quad"):
            continue
        out.append((name, fn, contextlib.nullcontext))
    if device.startswith("cuda"):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        for label, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                               ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            out.append((f"pytorch[sdpa_{label}]", attention.attention_pytorch, lambda b=backend: sdpa_kernel([b])))
    return out


def _stats(a, b, group):
    """rel-L2 and max |a - b| over every shard's rows (sums reduced over the group)."""
    import torch
    import torch.distributed as dist
    d = (a.float() - b.float())
    s = torch.tensor([d.pow(2).sum().item(), b.float().pow(2).sum().item()], dtype=torch.float64)
    m = torch.tensor([d.abs().max().item()], dtype=torch.float64)
    dist.all_reduce(s, group=group)
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    return {"rel_l2": (s[0] / s[1]).sqrt().item(), "max_abs": m.item()}


def worker(rank: int, world: int, port: int, args, queue):
    import torch
    import torch.distributed as dist
    attention = _comfy(args.comfy_root, args.smoke)
    StageForward, SequenceGroup, shard_spans, take = _pack()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cpu = dist.new_group(backend="gloo")
    device = torch.device(args.device)
    ctx = types.SimpleNamespace(sp_group=dist.group.WORLD, sp_cpu_group=cpu,
                                topo=types.SimpleNamespace(sp_size=world, sp_rank=rank, sp_ranks=list(range(world))))
    sp = SequenceGroup(ctx)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    rows = []
    for case, (segments, heads, hd, layout, mask_kind) in (SMOKE if args.smoke else CASES).items():
        if args.cases and case not in args.cases.split(","):
            continue
        total = sum(segments)
        shards = shard_spans(segments, world)
        spans = shards[rank]
        g = torch.Generator(device=device).manual_seed(sum(map(ord, case)))  # the same tensors on every rank
        shape = (args.batch, heads, total, hd) if layout == 2 else (args.batch, total, heads * hd)
        q, k, v = (torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in range(3))
        mask = None
        if mask_kind == "key":  # the last tenth of the text tokens masked out (additive)
            mask = torch.zeros((args.batch, 1, 1, total), device=device, dtype=dtype)
            text = 0 if case.startswith("qwen") else len(segments) - 1
            a = sum(segments[:text])
            n = max(1, segments[text] // 10)
            mask[..., a + segments[text] - n: a + segments[text]] = -10000.0
        kw = {"skip_reshape": True} if layout == 2 else {}
        qs, ks, vs = (take(t, layout, spans) for t in (q, k, v))
        ref32 = attention.attention_pytorch(q.float(), k.float(), v.float(), heads, mask=None if mask is None else
                                            mask.float(), **kw)
        ref32 = take(ref32, 1, spans)
        for kname, fn, context in kernels(attention, args.device, total):
            if args.kernels and kname not in args.kernels.split(","):
                continue
            row = {"case": case, "tokens": total, "segments": segments, "heads": heads, "head_dim": hd,
                   "sp": world, "kernel": kname, "dtype": str(dtype).split(".")[-1], "batch": args.batch}
            try:
                with context():
                    whole = take(fn(q, k, v, heads, mask=mask, **kw), 1, spans)
                    torch.cuda.synchronize() if device.type == "cuda" else None
            except Exception as e:  # a kernel that does not take these inputs here: said, not hidden
                row["error"] = f"whole sequence: {type(e).__name__}: {str(e)[:200]}"
                rows.append(row)
                continue
            row["whole_vs_fp32"] = _stats(whole, ref32, cpu)
            for exchange in ("all_gather_kv", "ulysses"):
                r = dict(row, exchange=exchange)
                stage = types.SimpleNamespace(_pass=types.SimpleNamespace(spans=spans, shards=shards, total=total,
                                                                          block=0),
                                              sp=sp, sp_exchange=exchange, family=types.SimpleNamespace(name=case))

                def override(func, *a, **k):
                    return StageForward._shard_attention(stage, func, layout, a, k)
                try:
                    with context():
                        t0 = time.perf_counter()
                        out = fn(qs, ks, vs, heads, mask=mask, transformer_options={
                            "optimized_attention_override": override}, **kw)
                        torch.cuda.synchronize() if device.type == "cuda" else None
                        r["seconds"] = time.perf_counter() - t0
                except Exception as e:  # e.g. Ulysses with heads that do not divide: the pack's message
                    r["refused"] = str(e)[:300]
                    rows.append(r)
                    continue
                r["sp_vs_whole"] = _stats(out, whole, cpu)
                r["sp_vs_fp32"] = _stats(out, ref32, cpu)
                r["bitwise_equal"] = bool(torch.equal(out, whole))
                flag = torch.tensor([0 if r["bitwise_equal"] else 1])
                dist.all_reduce(flag, group=cpu)
                r["bitwise_equal"] = flag.item() == 0
                rows.append(r)
                if rank == 0:
                    log(f"{case:28s} sp{world} {exchange:13s} {kname:22s} sp vs whole rel-L2 "
                        f"{r['sp_vs_whole']['rel_l2']:.2e} max {r['sp_vs_whole']['max_abs']:.2e}  "
                        f"(whole vs fp32 {row['whole_vs_fp32']['rel_l2']:.2e}, sp vs fp32 "
                        f"{r['sp_vs_fp32']['rel_l2']:.2e}){'  bitwise' if r['bitwise_equal'] else ''}")
        del q, k, v, qs, ks, vs, ref32
        torch.cuda.empty_cache() if device.type == "cuda" else None
    if rank == 0:
        queue.put(rows)
    dist.destroy_process_group()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--degrees", default="2,4")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    ap.add_argument("--kernels", default="", help="comma-separated kernel names (default: all that import)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, fp32, on the CPU")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    args.comfy_root = os.environ.get("COMFYUI_ROOT") or str(ROOT.parent.parent)
    if args.smoke:
        args.device = "cpu"
    import torch
    import torch.multiprocessing as mp
    result = {"device": args.device, "card": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "transport": "gloo (one device)",
              "rows": []}
    attention = _comfy(args.comfy_root, args.smoke)
    result["comfy_default_attention"] = attention.optimized_attention.__name__
    result["registered"] = sorted(attention.REGISTERED_ATTENTION_FUNCTIONS)
    ctx = mp.get_context("spawn")
    for world in [int(d) for d in args.degrees.split(",")]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        queue = ctx.SimpleQueue()
        procs = [ctx.Process(target=worker, args=(r, world, port, args, queue)) for r in range(world)]
        for p in procs:
            p.start()
        rows = queue.get()
        for p in procs:
            p.join()
        if any(p.exitcode for p in procs):
            raise SystemExit(f"a rank of sp{world} failed: exit codes {[p.exitcode for p in procs]}")
        result["rows"].extend(rows)
    checked = [r for r in result["rows"] if "sp_vs_whole" in r]
    result["summary"] = {
        "checked": len(checked), "refused": [f"{r['case']} sp{r['sp']} {r['exchange']} {r['kernel']}: {r['refused']}"
                                             for r in result["rows"] if "refused" in r],
        "kernel_errors": sorted({f"{r['kernel']}: {r['error']}" for r in result["rows"] if "error" in r}),
        "max_sp_vs_whole_rel_l2": max((r["sp_vs_whole"]["rel_l2"] for r in checked), default=None),
        "bitwise_equal": sum(r["bitwise_equal"] for r in checked),
        "max_sp_vs_fp32_over_whole_vs_fp32": max((r["sp_vs_fp32"]["rel_l2"] / max(r["whole_vs_fp32"]["rel_l2"], 1e-12)
                                                  for r in checked if r["whole_vs_fp32"]["rel_l2"] > 1e-5),
                                                 default=None)}
    log(json.dumps(result["summary"], indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        log(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
