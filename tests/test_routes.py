"""The pack's HTTP routes (/pp/status, /pp/timeline, /pp/split, POST /pp/release) and
the JSON the web panel draws.

* Pure: ``nodes/panel_data.py`` (standard library only, loaded by file path) on group
  states the server can be in (not started, starting, running with progress, idle,
  parked, failed) and on a synthetic two-rank run with known times.  Always runs.
* Server (tier 3): the session's real ComfyUI server; the routes under /pp/ and /api/pp/,
  before and after a PP prompt; GET never changes state.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("pp_panel_data", REPO / "nodes" / "panel_data.py")
pd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pd)


def _status(state, **kw):
    base = {"devices": ["cuda:0", "cuda:1"], "backend": "local", "state": state, "failure": None, "layout": None,
            "split": None, "model": None, "progress": None,
            "ranks": [{"rank": r, "device": f"cuda:{r}", "name": None, "pid": None, "stage": None, "pp_rank": None,
                       "cfg_rank": None, "mem": None} for r in range(2)]}
    base.update(kw)
    return base


# -- pure ----------------------------------------------------------------------------------
def test_group_states():
    assert pd.group_view(_status("not started"))["display_state"] == "not started"
    assert pd.group_view(_status("starting"))["display_state"] == "starting"
    run = pd.group_view(_status("running", progress={"step": 3, "total": 20}))
    assert run["display_state"] == "sampling step 3/20"
    assert pd.group_view(_status("running", progress={"step": 0, "total": None}))["display_state"] == "placing the model"
    failed = pd.group_view(_status("failed", failure="rank 1 (cuda:1): was killed by signal SIGKILL: OOM\nmore"))
    assert failed["display_state"] == "failed: rank 1 (cuda:1): was killed by signal SIGKILL: OOM"
    ranks = [{"rank": r, "device": f"cuda:{r}", "stage": [r * 20, r * 20 + 20], "pp_rank": r, "cfg_rank": 0}
             for r in range(2)]
    idle = pd.group_view(_status("idle", layout={"pp": 2, "cfg": 1}, split=[20, 20], ranks=ranks),
                         model_file="/m/wan.safetensors")
    assert idle["display_state"] == "idle (model placed)" and idle["key"] == "cuda:0,cuda:1"
    assert [r["blocks"] for r in idle["ranks"]] == ["blocks 0–19", "blocks 20–39"]
    assert idle["layout_text"] == "PP2 × CFG1" and idle["model_file"] == "wan.safetensors" and idle["num_blocks"] == 40
    parked = pd.group_view(_status("idle", split=[20, 20], ranks=ranks), parked=True)
    assert parked["display_state"].startswith("parked") and parked["parked"]
    assert pd.status_view([])["state"] == "not started"
    assert pd.status_view([pd.group_view(_status("stopped"))])["state"] == "not started"
    assert pd.status_view([run])["state"] == "started"


# The plan entries the executor records with each span (engine.plan.Unit.entry).
COND = {"mb": 0, "micro_batch": 0, "branch": "cond", "pipeline": 0, "patch": None, "patches": None}
UNCOND = {**COND, "mb": 1, "micro_batch": 1, "branch": "uncond"}


def _synthetic_run(steps=4, clock_skew=1000.0):
    """Two ranks, sequential CFG, unit stage time 10 ms per micro-batch, a perfect pipeline:
    rank 0: cond [0,10] uncond [10,20]; rank 1: cond [10,20] uncond [20,30]; step period 40 ms.
    Rank 1's timeline starts ``clock_skew`` ms later (its spans are on its own origin)."""
    spans = []
    for s in range(steps):
        t = 40.0 * s
        spans += [{"rank": 0, "step": s, "kind": "compute", "label": "cond[0]", "entry": COND, "t0_ms": t,
                   "t1_ms": t + 10},
                  {"rank": 0, "step": s, "kind": "compute", "label": "uncond[1]", "entry": UNCOND, "t0_ms": t + 10,
                   "t1_ms": t + 20},
                  {"rank": 0, "step": s + 1, "kind": "wait", "label": "pass", "entry": {"pass": True},
                   "t0_ms": t + 20, "t1_ms": t + 40}]
        r1 = t - clock_skew
        spans += [{"rank": 1, "step": s, "kind": "wait", "label": "cond[0]", "entry": COND, "t0_ms": r1,
                   "t1_ms": r1 + 10},
                  {"rank": 1, "step": s, "kind": "compute", "label": "cond[0]", "entry": COND, "t0_ms": r1 + 10,
                   "t1_ms": r1 + 20},
                  {"rank": 1, "step": s, "kind": "compute", "label": "uncond[1]", "entry": UNCOND, "t0_ms": r1 + 20,
                   "t1_ms": r1 + 30}]
    done = [{"rank": 0, "pp_rank": 0, "cfg_rank": 0, "stage": [0, 1], "clock0_ms": 5000.0},
            {"rank": 1, "pp_rank": 1, "cfg_rank": 0, "stage": [1, 2], "clock0_ms": 5000.0 + clock_skew}]
    return {"ranks": done, "spans": spans, "layout": {"pp": 2, "cfg": 1}, "split": [1, 1], "family": "X"}


def test_timeline_view_numbers():
    tl = pd.timeline_view(_synthetic_run(steps=5))
    assert tl["available"] and tl["aligned"]
    assert tl["steps"] == [1, 2, 3] and tl["steps_total"] == 5  # full periods, no warm-up step
    assert tl["window_ms"] == pytest.approx(120.0)
    s = tl["summary"]
    assert s["stages"] == 2 and s["micro_batches"] == 2
    assert s["ideal_speedup"] == pytest.approx(4 / 3, abs=1e-4)
    assert s["measured_step_ms"] == pytest.approx(40.0)
    # 40 ms of compute per step over (M+S-1)/(M*S) = 3/4: 30 ms ideal; one device 40 ms
    assert s["ideal_step_ms"] == pytest.approx(30.0)
    assert s["one_device_ms"] == pytest.approx(40.0)
    assert s["efficiency"] == pytest.approx(0.75)
    comp = [b for b in tl["bars"] if b["kind"] == "compute"]
    assert {b["rank"] for b in comp} == {0, 1}
    # rank 1's bars are on rank 0's clock: its cond starts when rank 0's cond ends
    first = {(b["rank"], b["branch"]): b for b in comp if b["step"] == 1}
    assert first[(1, "cond")]["t0"] == pytest.approx(first[(0, "cond")]["t1"])
    assert first[(1, "uncond")]["mb"] == 1 and "patch" not in first[(1, "uncond")]
    assert all(0 <= b["t0"] <= b["t1"] <= tl["window_ms"] + 1e-6 for b in tl["bars"])
    assert [st["step"] for st in tl["step_starts"]] == [1, 2, 3]


def test_timeline_view_empty_and_split_view():
    assert pd.timeline_view(None) == {"available": False, "note": "no run yet: queue a prompt with PP KSampler"}
    assert not pd.timeline_view({"ranks": [{}], "spans": []})["available"]
    v = pd.split_view((2, 3), {"block_bytes": [10, 10, 20, 20, 20], "first_bytes": 5, "last_bytes": 7}, 2)
    assert v["ranges"] == [[0, 2], [2, 5]] and v["bytes"] == [25, 67]
    assert pd.split_view((1, 1), None, 2)["bytes"] is None


# -- through the real server (tier 3) --------------------------------------------------------
from server_util import inputs, load_workflow  # noqa: E402

TINY_WAN = "pp_tiny_wan21_t2v.safetensors"


@pytest.fixture(scope="module")
def srv(comfy_server):
    comfy_server.require_nodes("PPKSampler", "PPTestConditioning")
    return comfy_server


def test_routes_before_and_after_a_run(srv):
    for prefix in ("", "/api"):
        code, body = srv.get(f"{prefix}/pp/status")
        assert code == 200 and set(body) >= {"state", "groups"}, body
        if not body["groups"]:
            assert body["state"] == "not started"
        code, body = srv.get(f"{prefix}/pp/timeline")
        assert code == 200 and "available" in body
    # GET never changes state
    assert srv.get("/pp/release")[0] in (404, 405)
    assert srv.get("/pp/shutdown")[0] in (404, 405)

    # the split of a named model file (no run needed)
    code, sp = srv.get(f"/pp/split?strategy=even&unet_name={TINY_WAN}&devices=cpu,cpu")
    assert code == 200 and sp["error"] is None, sp
    assert sp["counts"] == [1, 1] and sp["ranges"] == [[0, 1], [1, 2]] and sp["stages"] == 2
    assert sp["model"]["num_blocks"] == 2 and len(sp["bytes"]) == 2 and min(sp["bytes"]) > 0
    code, sp = srv.get(f"/pp/split?strategy=manual&manual=2,0&unet_name={TINY_WAN}&devices=cpu,cpu")
    assert code == 200 and "empty stage" in sp["error"]
    code, sp = srv.get("/pp/split?strategy=nope")
    assert code == 200 and "unknown strategy" in sp["error"]
    code, sp = srv.get("/pp/split?strategy=by_memory&unet_name=missing.safetensors&devices=auto")
    assert code == 200 and sp["counts"] is None and "run once" in sp["note"]

    # a PP prompt, then every route reports it
    g = load_workflow("pp_wan_t2v.json")
    inputs(g, "PPKSampler").update(steps=3, seed=3)
    res = srv.run(g, timeout=240)
    assert res.status == "success", res.describe()
    code, body = srv.get("/pp/status")
    grp = [x for x in body["groups"] if x["key"] == "cpu,cpu"][0]
    assert body["state"] == "started" and grp["state"] == "idle" and grp["display_state"] == "idle (model placed)"
    assert grp["layout"] == {"pp": 2, "cfg": 1, "sp": 1} and grp["split"] == [1, 1]
    assert [r["blocks"] for r in grp["ranks"]] == ["blocks 0–0", "blocks 1–1"]
    for r in grp["ranks"]:
        assert r["pid"] and r["mem"]["kind"] == "cpu" and r["mem"]["used"] > 0 and r["mem"]["total"] > r["mem"]["used"]
    code, tl = srv.get("/pp/timeline")
    assert code == 200 and tl["available"] and tl["key"] == "cpu,cpu", tl
    assert {b["rank"] for b in tl["bars"] if b["kind"] == "compute"} == {0, 1}
    assert tl["summary"]["micro_batches"] == 2 and tl["summary"]["measured_step_ms"] > 0
    # the split of the last run's model when none is named
    code, sp = srv.get("/pp/split?strategy=balanced")
    assert code == 200 and sp["counts"] == [1, 1] and "(last run)" in sp["model"]["file"], sp

    # release: parked, workers kept; the next prompt places the model again on them
    pids = [r["pid"] for r in grp["ranks"]]
    code, body = srv.post("/pp/release", {"key": "cpu,cpu"})
    assert code == 200 and body["groups"] == ["cpu,cpu"], body
    grp = [x for x in body["status"]["groups"] if x["key"] == "cpu,cpu"][0]
    assert grp["parked"] and grp["display_state"].startswith("parked")
    assert srv.post("/pp/release", {"key": "cuda:7,cuda:8"})[0] == 404
    inputs(g, "PPKSampler")["seed"] = 4  # a new prompt (ComfyUI would serve the same one from its cache)
    res = srv.run(g, timeout=240)
    assert res.status == "success", res.describe()
    grp = [x for x in srv.get("/pp/status")[1]["groups"] if x["key"] == "cpu,cpu"][0]
    assert not grp["parked"] and [r["pid"] for r in grp["ranks"]] == pids
    assert all(r["loaded"] for r in grp["ranks"])  # placed again after the release
