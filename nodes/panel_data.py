"""What the web panel shows, computed from a worker group's status and its last run.

Plain functions of plain dicts (standard library only, no ComfyUI, no torch), so the
JSON shapes of ``/pp/status``, ``/pp/timeline`` and ``/pp/split`` can be tested without
a server.  ``nodes/routes.py`` serves them and pushes them over ComfyUI's websocket.
"""
from __future__ import annotations

import os
import statistics

def display_state(status: dict, parked: bool = False) -> str:
    """One line for a human: 'not started', 'starting', 'sampling step 3/20', 'idle',
    'parked', 'failed: <reason>', 'stopped'."""
    state = status.get("state") or "not started"
    if state == "running":
        p = status.get("progress") or {}
        if p.get("total"):
            return f"sampling step {p.get('step', 0)}/{p['total']}"
        return "placing the model" if not p.get("step") else f"sampling step {p['step']}"
    if state == "idle":
        return "parked (model released)" if parked else "idle (model placed)"
    if state == "failed":
        reason = (status.get("failure") or "unknown cause").strip().splitlines()
        return "failed: " + (reason[0] if reason else "unknown cause")
    return state


def group_view(status: dict, *, parked: bool = False, model_file: str | None = None,
               finished: float | None = None) -> dict:
    """``WorkerGroup.status()`` plus what the panel needs to draw it."""
    out = dict(status)
    out["key"] = ",".join(status.get("devices") or [])
    out["parked"] = bool(parked)
    out["display_state"] = display_state(status, parked)
    out["model_file"] = os.path.basename(model_file) if model_file else None
    out["last_run_finished"] = finished
    layout = status.get("layout") or {}
    split = status.get("split") or []
    ranges, start = [], 0
    for c in split:
        ranges.append([start, start + c])
        start += c
    out["num_blocks"] = start or None
    for r in out.get("ranks") or []:
        st = r.get("stage")
        if st is None and ranges and r.get("pp_rank") is not None and r["pp_rank"] < len(ranges):
            st = ranges[r["pp_rank"]]
        r["blocks"] = f"blocks {st[0]}–{st[1] - 1}" if st and st[1] > st[0] else None
        if parked:
            r["blocks"] = (r["blocks"] + " (released)") if r["blocks"] else None
    out["layout_text"] = layout_text(layout)
    out["layout_reason"] = status.get("layout_reason")
    return out


def layout_text(layout: dict) -> str | None:
    """'PP2 × CFG1', and '× SP2' with sequence parallelism."""
    if not layout:
        return None
    sp = int(layout.get("sp") or 1)
    return f"PP{layout.get('pp', '?')} × CFG{layout.get('cfg', 1)}" + (f" × SP{sp}" if sp > 1 else "")


def status_view(groups: list[dict]) -> dict:
    live = [g for g in groups if g.get("state") not in ("not started", "stopped")]
    return {"state": "started" if live else "not started", "groups": groups}


# -- the timeline -----------------------------------------------------------------------
def ideal_speedup(micro_batches: int, stages: int) -> float:
    """M·S/(M+S−1): step speedup of S stages over one device with M micro-batches."""
    m, s = micro_batches, stages
    return m * s / (m + s - 1) if m > 0 and s > 0 else 1.0


def timeline_view(last_run: dict | None, max_steps: int = 3) -> dict:
    """Bars of the last ``max_steps`` complete steps of a run, on one clock, and the
    measured vs ideal step time.

    Each rank's spans are relative to its own timeline origin; the done message carries
    that origin on the machine's monotonic clock (``clock0_ms``), which puts every rank
    on one time axis.  ``step`` is the model-call index (one pipeline pass).
    """
    if not last_run or not last_run.get("spans"):
        return {"available": False, "note": "no run yet: queue a prompt with PP KSampler"}
    done = last_run.get("ranks") or []
    world = len(done)
    layout = last_run.get("layout") or {"pp": world, "cfg": 1}
    pp_size = int(layout.get("pp") or world or 1)
    clocks = [d.get("clock0_ms") for d in done]
    aligned = all(c is not None for c in clocks) and bool(clocks)
    base = min(clocks) if aligned else 0.0
    offset = {i: ((clocks[i] - base) if aligned else 0.0) for i in range(world)}
    rank_info = []
    for i, d in enumerate(done):
        rank_info.append({"rank": i, "pp_rank": d.get("pp_rank", i), "cfg_rank": d.get("cfg_rank", 0),
                          "sp_rank": d.get("sp_rank") or 0, "stage": d.get("stage")})
    pipelines: dict[int, list[int]] = {}
    for r in rank_info:
        pipelines.setdefault(r["cfg_rank"] or 0, []).append(r["rank"])
    for c in pipelines:
        pipelines[c].sort(key=lambda rk: (rank_info[rk]["pp_rank"] or 0, rank_info[rk]["sp_rank"]))

    spans = []
    for s in last_run["spans"]:
        r = s.get("rank", 0)
        spans.append({**s, "t0": s["t0_ms"] + offset.get(r, 0.0), "t1": s["t1_ms"] + offset.get(r, 0.0)})
    compute = [s for s in spans if s["kind"] == "compute"]
    by_step: dict[int, dict[int, list]] = {}
    for s in compute:
        by_step.setdefault(s["step"], {}).setdefault(s["rank"], []).append(s)
    complete = sorted(st for st, rk in by_step.items() if len(rk) == world)
    if not complete:
        return {"available": False, "note": "the last run has no complete step"}

    # What each compute span is in the pass plan: its unit (the panel's micro-batch), branch,
    # token patch; the executor records it with the span (``engine.plan.Unit.entry``).
    for s in compute:
        e = s.get("entry") or {}
        s["mb"] = int(e.get("mb") or 0)
        s["branch"] = e.get("branch") or f"mb{s['mb']}"
    for lst in (lst for rk in by_step.values() for lst in rk.values()):
        lst.sort(key=lambda x: x["t0"])

    # Per-step numbers over every complete step (the first is a warm-up and is left out
    # of the medians when there are others).
    start = {st: min(s["t0"] for lst in by_step[st].values() for s in lst) for st in complete}
    end = {st: max(s["t1"] for lst in by_step[st].values() for s in lst) for st in complete}
    per_step = []
    for k, st in enumerate(complete):
        nxt = complete[k + 1] if k + 1 < len(complete) else None
        measured = (start[nxt] - start[st]) if nxt == st + 1 else (end[st] - start[st])
        ideals, m_used = [], 1
        for c, rks in pipelines.items():
            first = by_step[st].get(rks[0], [])
            m = max(1, len(first))
            work = sum(s["t1"] - s["t0"] for r in rks for s in by_step[st].get(r, []))
            stages = len({rank_info[r]["pp_rank"] for r in rks})  # with SP: each stage's shards share its work
            ideals.append(work / ideal_speedup(m, stages) / max(1, len(rks) // stages))
            m_used = m
        one = sum(s["t1"] - s["t0"] for lst in by_step[st].values() for s in lst)
        per_step.append({"step": st, "measured_ms": measured, "ideal_ms": max(ideals), "one_device_ms": one,
                         "micro_batches": m_used, "period": nxt == st + 1})
    # Shown (and summarised): the last few steps that are followed by another step, so
    # each is a full period (bubbles and the sampler's work between passes included),
    # leaving out the first step (warm-up) when there are enough.
    full = [p["step"] for p in per_step if p["period"]]
    if len(full) > max_steps:
        full = full[1:]
    shown = full[-max_steps:] or complete[-max_steps:]
    use = [p for p in per_step if p["step"] in shown]
    measured = statistics.median(p["measured_ms"] for p in use)
    ideal = statistics.median(p["ideal_ms"] for p in use)
    one = statistics.median(p["one_device_ms"] for p in use)
    m = use[-1]["micro_batches"]
    w0 = min(start[st] for st in shown)
    w1 = max(start[st + 1] if st + 1 in start else end[st] for st in shown)
    bars = []
    for s in spans:
        if s["t1"] <= w0 or s["t0"] >= w1:
            continue
        if s["kind"] == "compute" and s["step"] not in shown:
            continue
        bar = {"rank": s["rank"], "step": s["step"], "kind": s["kind"], "label": s["label"],
               "t0": round(max(s["t0"], w0) - w0, 3), "t1": round(min(s["t1"], w1) - w0, 3)}
        if s["kind"] == "compute":
            bar["mb"], bar["branch"] = s["mb"], s["branch"]
            e = s.get("entry") or {}
            if e.get("patch") is not None:  # patch pipelining: which patch of its micro-batch
                bar["patch"] = e["patch"]
            if e.get("shard") is not None:  # sequence parallelism: which shard of the tokens
                bar["shard"] = e["shard"]
            if e.get("head"):
                bar["head"] = True
        bars.append(bar)
    bars.sort(key=lambda b: (b["rank"], b["t0"]))
    return {
        "available": True, "aligned": aligned, "layout": layout, "ranks": rank_info,
        "steps": shown, "steps_total": len(complete), "window_ms": round(w1 - w0, 3),
        "step_starts": [{"step": st, "t": round(start[st] - w0, 3)} for st in shown],
        "bars": bars,
        "summary": {
            "stages": pp_size, "cfg": int(layout.get("cfg") or 1), "sp": int(layout.get("sp") or 1),
            "micro_batches": m,
            "ideal_speedup": round(ideal_speedup(m, pp_size), 4),
            "measured_step_ms": round(measured, 3), "ideal_step_ms": round(ideal, 3),
            "one_device_ms": round(one, 3),
            "efficiency": round(ideal / measured, 4) if measured > 0 else None,
            "speedup_vs_one_device": round(one / measured, 4) if measured > 0 else None,
        },
        "per_step": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in p.items()} for p in per_step],
    }


# -- the split preview --------------------------------------------------------------------
def split_view(counts, profile: dict | None, stages: int, cfg: int = 1) -> dict:
    """Blocks and estimated weight bytes per stage for a split of a profiled model."""
    ranges, start = [], 0
    for c in counts:
        ranges.append([start, start + c])
        start += c
    out = {"counts": list(counts), "ranges": ranges, "stages": stages, "cfg": cfg, "bytes": None}
    if profile:
        bb = profile.get("block_bytes") or []
        per = []
        for s, (a, b) in enumerate(ranges):
            n = sum(bb[a:b])
            if s == 0:
                n += profile.get("first_bytes", 0)
            if s == len(ranges) - 1:
                n += profile.get("last_bytes", 0)
            per.append(int(n))
        out["bytes"] = per
    return out
