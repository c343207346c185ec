"""See it work: PP KSampler against the stock KSampler, in your ComfyUI, without a GPU.

Finds ComfyUI ($COMFYUI_ROOT, else the folder two levels above this pack, as in
ComfyUI/custom_nodes/<pack>), writes a tiny random-weight Wan 2.1 file with ComfyUI's own
classes, loads it with the stock loader, and samples it with CFG twice, same seed: the
stock KSampler's path (comfy.sample.sample) in this process, and PP KSampler's (the job it
builds, on a worker group: 2 CPU processes by default).  Exit 0 on parity, 1 otherwise,
2 when ComfyUI is not found.   ``python -m pp_runtime.demo [--devices cpu,cpu] [--steps 4]``
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

PACK = Path(__file__).resolve().parents[1]
TOL = 1e-4  # fp32; the workers run cond and uncond as micro-batches: CPU kernels may reduce in another order


def find_comfy_root() -> Path | None:
    """As the tests find it: $COMFYUI_ROOT, else ComfyUI/custom_nodes/<pack>, else a sibling ComfyUI."""
    env = os.environ.get("COMFYUI_ROOT")
    for c in ([Path(env)] if env else []) + [PACK.parents[1], PACK.parent / "ComfyUI"]:
        if (c / "comfy" / "model_management.py").is_file():
            return c.resolve()
    return None


def tiny_wan21(path: str, blocks: int = 4) -> str:
    """A Wan 2.1 t2v file ComfyUI's loader detects (dim 128: 1 head), seeded random weights."""
    import comfy.ops
    import torch
    from comfy.ldm.wan.model import WanModel
    from safetensors.torch import save_file
    model = WanModel(model_type="t2v", patch_size=(1, 2, 2), in_dim=16, dim=128, ffn_dim=256, freq_dim=256,
                     text_dim=4096, out_dim=16, num_heads=1, num_layers=blocks, qk_norm=True,
                     cross_attn_norm=True, eps=1e-6, device="meta", operations=comfy.ops.disable_weight_init)
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, v in model.state_dict().items():  # activations O(1): norms ~1, matrices ~1/sqrt(fan-in)
        r = torch.randn(v.shape, generator=g)
        if v.dim() == 1 and ("norm" in k or k.endswith("scale")):
            r = 1 + 0.1 * r
        elif k.endswith("weight") and v.dim() >= 2:
            r = r / v[0].numel() ** 0.5
        else:
            r = 0.1 * r
        sd[k] = r.contiguous()
    save_file(sd, path)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", default="cpu,cpu", help="the worker group's devices, e.g. cuda:0,cuda:1")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--cfg-mode", default="sequential", help="as PP CFG Mode: auto, sequential, cfg_parallel, ...")
    ap.add_argument("--sequence-parallel", type=int, default=None,
                    help="as PP Parallel Layout: 2, 4 ... token shards (exact), 0 auto; not given: no layout node")
    args = ap.parse_args(argv)

    root = find_comfy_root()
    if root is None:
        looked = ", ".join([f"$COMFYUI_ROOT ({os.environ.get('COMFYUI_ROOT') or 'not set'})",
                            str(PACK.parents[1]), str(PACK.parent / "ComfyUI")])
        print(f"ComfyUI not found (looked in {looked}): set COMFYUI_ROOT to your ComfyUI folder, or install "
              "this pack into ComfyUI/custom_nodes", file=sys.stderr)
        return 2
    sys.path.insert(0, str(root))  # first: ComfyUI's comfy/utils.py etc. win over same-named packages
    from comfy.cli_args import args as comfy_args
    comfy_args.cpu = True  # before the first import of comfy.model_management
    import comfy.model_management  # noqa: F401
    import comfy.sample
    import comfy.sd
    import torch
    # The pack's modules, once ComfyUI is importable:
    from .comfy.job import prepare_comfy_job
    from .workers.group import WorkerGroup
    from .engine.layout import JobError

    version = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", (root / "comfyui_version.py").read_text()
                        if (root / "comfyui_version.py").is_file() else "")
    print(f"ComfyUI {version.group(1) if version else '(version unknown)'} found at {root}")
    g = torch.Generator().manual_seed(0)
    pos = [[torch.randn(1, 8, 4096, generator=g), {}]]  # what a text encoder node gives: [[cond, options]]
    neg = [[torch.randn(1, 8, 4096, generator=g), {}]]
    latent = {"samples": torch.zeros(1, 16, 1, 16, 16)}  # an empty Wan latent: 1 frame, 128x128 pixels
    seed, cfg, sampler, scheduler = 42, 3.5, "euler", "simple"
    with tempfile.TemporaryDirectory(prefix="pp-demo-") as tmp:
        model = comfy.sd.load_diffusion_model(tiny_wan21(os.path.join(tmp, "tiny_wan21_t2v.safetensors")))
        group = WorkerGroup(args.devices, extra_paths=[str(root)])
        try:
            job, tensors, rank_tensors = prepare_comfy_job(
                group.world, model, pos, neg, latent, seed=seed, steps=args.steps, cfg=cfg, sampler_name=sampler,
                scheduler=scheduler, cfg_mode={"mode": args.cfg_mode}, export_dir=tmp,
                layout=None if args.sequence_parallel is None else {"sequence_parallel": args.sequence_parallel})
        except JobError as e:
            print(f"PP KSampler refuses this job: {e}", file=sys.stderr)
            return 2
        cfg = job["sampling"]["cfg"]  # cfg mode 'off' samples one branch: cfg 1, for the stock path too
        print(f"model: {job['family']} (ComfyUI's stock loader, tiny random weights), {sum(job['split'])} blocks; "
              f"{sampler}/{scheduler}, {args.steps} steps, cfg {cfg}, seed {seed}")
        print(f"group: {group.devices}; layout {job['layout_reason']} (cfg mode {args.cfg_mode}); "
              f"split {job['split']} blocks per stage")
        try:
            t0 = time.perf_counter()
            group.start()
            print(f"worker group up in {time.perf_counter() - t0:.1f} s")
            group.run(job, tensors, rank_tensors=rank_tensors)  # the first prompt places the model
            steps_seen = []
            t0 = time.perf_counter()
            res = group.run(job, tensors, rank_tensors=rank_tensors, on_step=lambda i, n, x0: steps_seen.append(i))
            pp_time = time.perf_counter() - t0
        finally:
            group.shutdown()
        print(f"PP KSampler: {len(steps_seen)} steps streamed back, placed model reused: "
              f"{not any(r['loaded'] for r in res['ranks'])}")
        noise = comfy.sample.prepare_noise(latent["samples"], seed)
        for _ in range(2):  # the second prompt, as for PP: the model already loaded
            t0 = time.perf_counter()
            ref = comfy.sample.sample(model, noise, args.steps, cfg, sampler, scheduler, pos, neg,
                                      latent["samples"], seed=seed, disable_pbar=True)
            stock_time = time.perf_counter() - t0
    diff = (res["latents"] - ref).abs().max().item()
    rel = ((res["latents"] - ref).norm() / ref.norm()).item()
    ok = diff <= TOL and torch.isfinite(ref).all().item()
    print(f"parity vs stock KSampler: max |diff| = {diff:.3e}, rel-L2 = {rel:.3e}  "
          f"({'OK' if ok else 'MISMATCH'}, tolerance {TOL:g} fp32)")
    print(f"time per prompt (second prompt): stock {stock_time * 1e3:.0f} ms, PP {pp_time * 1e3:.0f} ms "
          f"on {','.join(group.devices)}")
    print("the speedup is a GPU matter: CPU workers share this machine's cores; see bench/README.md")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
