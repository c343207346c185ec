"""CPU launch time vs GPU time of one forward (whole model, and the first PP2 stage).

    python bench/launch_probe.py --device cuda:0 [--model flux1-dev --size 1024]

Answers one question the timeline cannot: is the model's Python side fast enough to keep
the GPU fed?  For each part it reports

* ``launch_ms``   CPU time to enqueue the forward (no synchronisation inside it);
* ``gpu_fed_ms``  GPU time of the forward when it was fully enqueued before the GPU reached
                  it (a sleep kernel holds the GPU first): the pure device time;
* ``synced_ms``   wall time of the forward started on an idle GPU right after a
                  synchronisation, as the engine's one-GPU loop does after each step's
                  host sync (streaming the latents): ``synced - gpu_fed`` is what a host
                  sync costs per forward.

``fed_fully_enqueued`` False means the CUDA launch queue filled up during the sleep and
the CPU then waited for the GPU; the GPU was still never idle as long as ``launch_ms``
is well under ``gpu_fed_ms`` (the CPU refills the queue faster than the GPU drains it).

Run by ``bench_pp.py --launch-probe`` in its own process after the variants.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.flux_model import CONFIGS, build, input_dims  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--model", default="flux1-dev", choices=sorted(CONFIGS))
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--txt-tokens", type=int, default=512)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--stage-blocks", type=int, default=28, help="blocks of the first PP2 stage (balanced split)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    torch.cuda.set_device(dev)
    dt = getattr(torch, a.dtype)
    cfg = CONFIGS[a.model]
    n = cfg["depth"] + cfg["depth_single_blocks"]
    m = build(a.model, stage=(0, n, True, True), device=dev, dtype=dt)
    d = input_dims(a.model)
    g = torch.Generator(device=dev).manual_seed(0)
    inputs = dict(x=torch.randn(1, d["latent_channels"], a.size // 8, a.size // 8, generator=g, device=dev, dtype=dt),
                  timestep=torch.tensor(500.0, device=dev),
                  context=torch.randn(1, a.txt_tokens, d["context_dim"], generator=g, device=dev, dtype=dt),
                  y=torch.randn(1, d["y_dim"], generator=g, device=dev, dtype=dt),
                  guidance=torch.full((1,), 3.5, device=dev))

    def whole():
        return m.head(m.run_blocks(0, n, m.embed(**inputs)))

    def stage0():
        return m.run_blocks(0, a.stage_blocks, m.embed(**inputs))

    # cycles of a ~0.5 s sleep kernel (clock rate from the device, kHz)
    rate_khz = getattr(torch.cuda.get_device_properties(dev), "clock_rate", 1_980_000) or 1_980_000
    sleep_cycles = int(rate_khz * 1e3 * 0.5)
    out = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "model": a.model,
           "size": a.size, "txt_tokens": a.txt_tokens, "stage_blocks": a.stage_blocks}
    with torch.inference_mode():
        for name, fn in (("whole", whole), ("pp2_stage0", stage0)):
            fn(), fn()
            torch.cuda.synchronize()
            launch, fed, synced, fed_launch = [], [], [], []
            for _ in range(a.reps):
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                e0.record()
                fn()
                e1.record()
                launch.append((time.perf_counter() - t0) * 1e3)
                torch.cuda.synchronize()
                synced.append((time.perf_counter() - t0) * 1e3)
                # fed: the GPU sleeps while the CPU enqueues the whole forward
                e2, e3 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                torch.cuda._sleep(sleep_cycles)
                t0 = time.perf_counter()
                e2.record()
                fn()
                e3.record()
                fed_launch.append((time.perf_counter() - t0) * 1e3)
                torch.cuda.synchronize()
                fed.append(e2.elapsed_time(e3))
            out[name] = {"launch_ms": statistics.median(launch), "gpu_fed_ms": statistics.median(fed),
                         "synced_ms": statistics.median(synced),
                         "fed_fully_enqueued": max(fed_launch) < 450.0,
                         "launch_ms_all": launch, "gpu_fed_ms_all": fed, "synced_ms_all": synced}
            r = out[name]
            print(f"{name:<11} launch (CPU) {r['launch_ms']:7.1f} ms   GPU fed {r['gpu_fed_ms']:7.1f} ms   "
                  f"from a synced start {r['synced_ms']:7.1f} ms   (fully enqueued: {r['fed_fully_enqueued']})",
                  flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
