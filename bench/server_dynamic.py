"""PP KSampler against the stock KSampler through a real ComfyUI server started with ComfyUI's
defaults on a GPU: DynamicVRAM (comfy-aimdo, which ``main.py`` turns on for NVIDIA) on.

    python bench/server_dynamic.py [--model "Wan 2.1 t2v 14B"] [--steps 6] [--out result.json]

Writes a random-weight model file at the released size (``model_files.write``) and a random
LoRA for it, starts ``main.py`` with only what a user gives (a base folder, a port; no
``--cpu``, no memory, attention or VRAM flags) and this pack in ``custom_nodes``, then queues
through ``/prompt``, same seed and inputs:

* stock: Load Diffusion Model -> LoraLoaderModelOnly 0.8 -> KSampler -> SaveLatent
* pp_stockloader: the same MODEL -> PP KSampler on ``cuda:0`` (the file it came from is read
  by the worker: no export)
* pp_free_host: the same with ``free_host_weights`` (ComfyUI's copy dropped)
* pp_loader: PP Load Diffusion Model -> LoraLoaderModelOnly 0.8 -> PP KSampler

and reports the saved latents' rel-L2 against stock, the wall times, what the server said
about DynamicVRAM, and the worker's ComfyUI runtime from ``/pp/status``.  Needs the server's
packages (aiohttp, SQLAlchemy, alembic, av, the frontend package, pydantic, comfy-aimdo,
comfy-kitchen) and ``COMFYUI_ROOT``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO / "tests"))

MODEL_FILE = "pp_bench_model.safetensors"
DEVICES = "cuda:0"
LORA_FILE = "pp_bench_lora.safetensors"


def log(*a):
    print(*a, flush=True)


SMOKE = dict(image_model="wan2.1", model_type="t2v", dim=256, out_dim=16, num_heads=2, ffn_dim=512, num_layers=2,
             patch_size=(1, 2, 2), freq_dim=256, window_size=(-1, -1), qk_norm=True, cross_attn_norm=True,
             eps=1e-6, in_dim=16)  # --smoke: a tiny Wan 2.1 on the CPU, to try the harness


def write_files(release: str, models: Path, smoke: bool = False) -> tuple[Path, Path]:
    """The model file (released size, random bf16) and a rank-16 LoRA on every block's
    self-attention q/k/v/o (random, small), in ComfyUI's model folders."""
    import torch
    import safetensors.torch
    from model_files import release_model, write
    sys.path.insert(0, os.environ["COMFYUI_ROOT"])
    if smoke:
        from comfy.cli_args import args as comfy_args
        comfy_args.cpu = True
        import comfy.supported_models as sm
        cfg = sm.WAN21_T2V(dict(SMOKE))
        cfg.set_inference_dtype(torch.bfloat16, None)
        dm = cfg.get_model({}, "", device="meta").diffusion_model
    else:
        _, dm = release_model(release)
    path = models / "diffusion_models" / MODEL_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    write(dm, str(path))
    log(f"wrote {path}: {path.stat().st_size / 2**30:.1f} GiB in {time.perf_counter() - t0:.0f} s")
    g = torch.Generator().manual_seed(11)
    lora = {}
    for name, p in dm.named_parameters():
        if p.dim() == 2 and any(f".{a}.weight" in name for a in ("self_attn.q", "self_attn.k", "self_attn.v",
                                                                  "self_attn.o")):
            stem = "diffusion_model." + name[:-len(".weight")]
            lora[f"{stem}.lora_up.weight"] = (torch.randn(p.shape[0], 16, generator=g) * 0.02).to(torch.bfloat16)
            lora[f"{stem}.lora_down.weight"] = (torch.randn(16, p.shape[1], generator=g) * 0.02).to(torch.bfloat16)
    lora_path = models / "loras" / LORA_FILE
    lora_path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(lora, str(lora_path))
    log(f"LoRA: {len(lora) // 2} layers")
    return path, lora_path


def graph(kind: str, steps: int, cfg: float, latent: dict, free_host: bool = False) -> dict:
    loader = ({"class_type": "PPLoadDiffusionModel", "inputs": {"unet_name": MODEL_FILE, "weight_dtype": "default"}}
              if kind == "pp_loader" else
              {"class_type": "UNETLoader", "inputs": {"unet_name": MODEL_FILE, "weight_dtype": "default"}})
    g = {
        "1": loader,
        "2": {"class_type": "PPTestConditioning", "inputs": {"seed": 1, "length": 64, "dim": 4096, "pooled_dim": 0,
                                                              "scale": 1.0}},
        "3": {"class_type": "PPTestConditioning", "inputs": {"seed": 2, "length": 64, "dim": 4096, "pooled_dim": 0,
                                                              "scale": 1.0}},
        "4": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {**latent, "batch_size": 1}},
        "10": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": LORA_FILE,
                                                                "strength_model": 0.8}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": f"latents/{kind}"}},
    }
    sampling = {"model": ["10", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
                "seed": 42, "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "simple",
                "denoise": 1.0}
    if kind == "stock":
        g["5"] = {"class_type": "KSampler", "inputs": sampling}
    else:
        g["7"] = {"class_type": "PPWorkerGroup", "inputs": {"devices": DEVICES, "backend": "local"}}
        g["5"] = {"class_type": "PPKSampler", "inputs": {**sampling, "group": ["7", 0],
                                                          "free_host_weights": bool(free_host)}}
    return g


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="Wan 2.1 t2v 14B")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--size", default="832x480x33", help="width x height x frames")
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="a tiny Wan on CPU workers (--cpu): the harness only")
    args = ap.parse_args()
    if args.smoke:
        global DEVICES
        args.size, args.steps, DEVICES = "64x64x5", 2, "cpu"
    import server_util
    import torch

    w, h, f = (int(v) for v in args.size.split("x"))
    base = Path(tempfile.mkdtemp(prefix="pp-server-dynamic-"))
    path, lora_path = write_files(args.model, base / "models", args.smoke)

    class DefaultsServer(server_util.ComfyServer):
        """main.py as a user starts it: no --cpu, no flags that change memory or kernels."""
        def _layout(self, models):
            for d in ("custom_nodes", "output", "input", "temp", "user"):
                (self.base / d).mkdir(parents=True, exist_ok=True)
            os.symlink(server_util.REPO, self.base / "custom_nodes" / server_util.PACK_NAME)
            os.symlink(server_util.TESTS / "comfy_test_nodes", self.base / "custom_nodes" / server_util.TEST_PACK_NAME)

        def command(self):
            return [sys.executable, str(self.comfy_root / "main.py"), "--base-directory", str(self.base),
                    "--listen", "127.0.0.1", "--port", str(self.port), "--disable-auto-launch"] + \
                (["--cpu"] if args.smoke else [])

    srv = DefaultsServer(Path(os.environ["COMFYUI_ROOT"]), {}, base, base / "comfy_server.log").start()
    result = {"model": args.model, "steps": args.steps, "cfg": args.cfg, "size": [w, h, f],
              "card": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "torch": torch.__version__, "startup_s": srv.startup_s,
              "runs": {}, "rel_l2_vs_stock": {}}
    latents = {}
    try:
        for kind, free in (("stock", False), ("pp_stockloader", False), ("pp_free_host", True), ("pp_loader", False)):
            if kind == "pp_free_host":
                kind_graph = graph("pp_stockloader", args.steps, args.cfg, {"width": w, "height": h, "length": f},
                                   free_host=True)
                kind_graph["6"]["inputs"]["filename_prefix"] = "latents/pp_free_host"
            else:
                kind_graph = graph(kind, args.steps, args.cfg, {"width": w, "height": h, "length": f})
            res = srv.run(kind_graph, timeout=900)
            log(f"{kind}: {res.status} in {res.wall:.1f} s")
            if res.status != "success":
                log(res.describe())
                result["runs"][kind] = {"status": res.status, "error": res.error_text()}
                continue
            latents[kind] = srv.read_latent(res).float()
            result["runs"][kind] = {"status": res.status, "wall_s": res.wall}
        ref = latents.get("stock")
        for kind, lat in latents.items():
            if kind != "stock" and ref is not None:
                result["rel_l2_vs_stock"][kind] = ((lat - ref).norm() / ref.norm()).item()
        _, status = srv.get("/pp/status")
        result["pp_status"] = status
        lines = srv.log_path.read_text(errors="replace").splitlines()
        result["server_log_dynamic_vram"] = [ln for ln in lines if any(
            w_ in ln for w_ in ("aimdo", "DynamicVRAM", "Dynamic VRAM", "dynamic_vram", "ModelPatcherDynamic"))][:20]
        result["server_log_head"] = lines[:40]
    finally:
        srv.stop()
    log(json.dumps({k: v for k, v in result.items() if k not in ("pp_status", "server_log_head")}, indent=1))
    out = args.out or str(BENCH / "results" / "server_dynamic.json")
    with open(out, "w") as fh:
        json.dump(result, fh, indent=1, default=str)
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
