"""The ComfyUI side of ``test_ray_two_hosts.py``: runs inside the head "host" (a network
namespace), joins the Ray cluster there as the README's ComfyUI process does (``ray_address``
= the head's address) and runs PP KSampler's jobs (the tiny Wan 2.1 model through ComfyUI's
sampler path) on the pack's Ray backend, answering the test's commands.

Protocol: one JSON command per line on stdin; one JSON answer per line on stdout, prefixed
with ``@@`` (anything else on stdout is log).  Events while a command runs (``{"event": ...}``)
are answers too.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

TESTS = Path(__file__).resolve().parent
sys.path[:0] = [str(TESTS), str(TESTS.parent)]

from comfy_env import import_comfy  # noqa: E402

ROOT, WHY = import_comfy()
if ROOT is None:
    raise SystemExit(WHY)

import comfy.sample  # noqa: E402
import comfy.sd  # noqa: E402
import torch  # noqa: E402

from pp_runtime.workers.ray_backend import RayWorkerGroup  # noqa: E402
from pp_runtime.comfy.job import prepare_comfy_job  # noqa: E402
from pp_runtime.workers.group import WorkerError  # noqa: E402

ADDRESS = os.environ["PP_TEST_RAY_ADDRESS"]
MODEL = comfy.sd.load_diffusion_model(os.environ["PP_TEST_MODEL"])
_g = torch.Generator().manual_seed(0)
POS = [[torch.randn(1, 6, 4096, generator=_g), {}]]
NEG = [[torch.randn(1, 6, 4096, generator=_g), {}]]
EMPTY = {"samples": torch.zeros(1, 16, 1, 8, 8)}
MODES = {2: "sequential", 4: "cfg_parallel"}
_groups: dict[int, RayWorkerGroup] = {}


def say(obj) -> None:
    sys.stdout.write("@@" + json.dumps(obj) + "\n")
    sys.stdout.flush()


def group(world: int) -> RayWorkerGroup:
    g = _groups.get(world)
    if g is not None and g.state not in ("failed", "stopped"):
        return g
    for other in list(_groups.values()):  # one group at a time: the cluster has 4 CPUs
        other.shutdown()
    _groups.clear()
    g = _groups[world] = RayWorkerGroup(
        f"cpu x {world}", ray_address=ADDRESS, placement="spread", cpus_per_actor=1, cpu_threads=1,
        extra_paths=[str(ROOT), str(TESTS)], port_range=os.environ.get("PP_RAY_PORT_RANGE", ""),
        startup_timeout=float(os.environ.get("PP_TEST_STARTUP_S", 120)))
    return g


def job(world: int, steps: int = 3, seed: int = 3):
    return prepare_comfy_job(world, MODEL, POS, NEG, EMPTY, seed=seed, steps=steps, cfg=3.5, sampler_name="euler",
                             scheduler="simple", cfg_mode={"mode": MODES[world]})


def stock(steps: int = 3, seed: int = 3) -> torch.Tensor:
    noise = comfy.sample.prepare_noise(EMPTY["samples"], seed)
    return comfy.sample.sample(MODEL, noise, steps, 3.5, "euler", "simple", POS, NEG, EMPTY["samples"], seed=seed,
                               disable_pbar=True)


def rel_l2(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def parity(world: int) -> dict:
    j, tensors, rank_tensors = job(world)
    g = group(world)
    t0 = time.monotonic()
    res = g.run(j, tensors, rank_tensors=rank_tensors)
    st = g.status()
    return {"rel_l2": rel_l2(res["latents"], stock()), "layout": j["layout"], "split": j["split"],
            "nodes": g.nodes, "rendezvous": st["rendezvous"], "seconds": time.monotonic() - t0,
            "stages": [r.get("stage") for r in st["ranks"]], "pids": g.pids}


def interrupt() -> dict:
    g = group(2).start()
    pids, seen = g.pids, []
    j, tensors, rank_tensors = job(2, steps=400)
    res = g.run(j, tensors, rank_tensors=rank_tensors, on_step=lambda i, n, x: seen.append(i),
                should_interrupt=lambda: len(seen) >= 2)
    after = parity(2)
    return {"interrupted": res["interrupted"], "steps_seen": len(seen), "same_pids": after["pids"] == pids,
            "rel_l2_after": after["rel_l2"], "nodes": g.nodes}


def repeat(n: int) -> dict:
    g = group(2)
    walls = []
    for i in range(n):
        j, tensors, rank_tensors = job(2, seed=i)
        t0 = time.monotonic()
        g.run(j, tensors, rank_tensors=rank_tensors)
        walls.append(time.monotonic() - t0)
    return {"walls": walls, "pids": g.pids}


def lost(fresh: bool = False) -> dict:
    """A long prompt; once it streams steps, tell the test (which cuts the worker host away).
    ``fresh``: on a new group (placed on the nodes there are now)."""
    for other in list(_groups.values()) if fresh else ():
        other.shutdown()
    g = group(2).start()
    nodes = g.nodes
    j, tensors, rank_tensors = job(2, steps=5000)
    told = []

    def on_step(i, n, x):
        if i >= 2 and not told:
            told.append(time.monotonic())
            say({"event": "running", "step": i, "nodes": nodes})
    t0 = time.monotonic()
    try:
        g.run(j, tensors, rank_tensors=rank_tensors, on_step=on_step)
    except WorkerError as e:
        return {"error": str(e), "rank": e.rank, "node": e.node, "nodes": nodes, "state": g.state,
                "seconds": time.monotonic() - t0}
    return {"finished": True}


def alive_nodes() -> dict:
    import ray
    return {"nodes": sorted(n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive"))}


def main() -> None:
    say({"event": "ready", "comfy": str(ROOT)})
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            what = cmd["cmd"]
            if what == "parity":
                out = parity(cmd["world"])
            elif what == "interrupt":
                out = interrupt()
            elif what == "repeat":
                out = repeat(cmd["n"])
            elif what == "alive_nodes":
                out = alive_nodes()
            elif what == "lost":
                out = lost(cmd.get("fresh", False))
            elif what == "quit":
                break
            else:
                out = {"error": f"unknown command {what}"}
        except Exception as e:
            out = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        say({"done": cmd["cmd"], **out})
    for g in _groups.values():
        g.shutdown()


if __name__ == "__main__":
    main()
