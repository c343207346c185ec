"""HTTP routes and websocket events of the pack (the web panel's data).

Routes live under /pp/ (ComfyUI mirrors them under /api/pp/).  GET only reads; anything
that changes state is a POST:

* ``GET  /pp/status``    the worker groups (state, devices, memory, stages, progress)
* ``GET  /pp/timeline``  the pipeline timeline of the last run, measured vs ideal step time
* ``GET  /pp/split``     the stage split a strategy gives for a model (the PPStageSplit bar)
* ``POST /pp/release``   drop the placed model on every worker (frees GPU memory)
* ``POST /pp/shutdown``  stop the worker processes (the next prompt starts a fresh group)

Events on ComfyUI's websocket (to every client): ``pp.status`` (the body of
``/pp/status``) whenever a group's state, progress or ranks change, and ``pp.timeline``
(the body of ``/pp/timeline``) after every run.  A watcher thread polls the shared groups
four times a second, so nothing in ``pp_runtime`` knows about the server.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
import weakref

from aiohttp import web
from server import PromptServer

from ..pp_runtime.workers.group import WorkerError, parse_devices
from ..pp_runtime.workers.registry import shared_groups
from ..pp_runtime.engine.layout import JobError, choose_layout
from ..pp_runtime.engine.split import STRATEGIES, split_blocks
from .panel_data import group_view, split_view, status_view, timeline_view

routes = PromptServer.instance.routes
log = logging.getLogger("comfyui-pipeline-parallel")

# group -> its last_run when it was released ("parked": workers up, no model placed)
_parked: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _key(g) -> str:
    return ",".join(g.devices)


def status_json() -> dict:
    groups = []
    for g in shared_groups():
        st = g.status()
        last = getattr(g, "last_run", None)
        parked = st["state"] == "idle" and g in _parked and _parked[g] is last
        model = (last or {}).get("model") or {}
        groups.append(group_view(st, parked=parked, model_file=model.get("path"),
                                 finished=(last or {}).get("finished")))
    return status_view(groups)


def _latest_run():
    runs = [(g, g.last_run) for g in shared_groups() if getattr(g, "last_run", None)]
    return max(runs, key=lambda gr: gr[1].get("finished") or 0) if runs else (None, None)


def timeline_json() -> dict:
    g, last = _latest_run()
    out = timeline_view(last)
    if g is not None:
        out.update(key=_key(g), model=last.get("family"), finished=last.get("finished"),
                   devices=list(g.devices))
    return out


@routes.get("/pp/status")
async def pp_status(request):
    return web.json_response(status_json())


@routes.get("/pp/timeline")
async def pp_timeline(request):
    return web.json_response(timeline_json())


# -- the split preview ------------------------------------------------------------------
_PROFILES: dict[tuple, dict] = {}


def model_profile_of_file(path: str) -> dict:
    """Blocks, per-block costs and bytes of a diffusion-model file (its header only: the
    model is built on the meta device; cached by path, size and mtime)."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _PROFILES:
        from ..pp_runtime.comfy import loading
        model = loading.load_on_disk(path)
        _PROFILES[key] = loading.model_profile(model.model.diffusion_model)
    return _PROFILES[key]


def split_json(strategy: str, manual: str = "", unet_name: str | None = None, devices: str | None = None,
               cfg_mode: str = "auto") -> dict:
    out = {"strategy": strategy, "manual": manual, "model": None, "counts": None, "ranges": None, "bytes": None,
           "stages": None, "cfg": 1, "error": None, "note": None}
    if strategy not in STRATEGIES:
        out["error"] = f"unknown strategy '{strategy}'; use one of {', '.join(STRATEGIES)}"
        return out
    g, last = _latest_run()
    # stages: from the devices of the connected group, else the last run's layout, else 2
    pp, cfg, notes = None, 1, []
    if devices:
        try:
            world = len(parse_devices(devices))
            topo = choose_layout(world, cfg_mode or "auto", True)
            pp, cfg = topo.pp_size, topo.cfg_size
        except (ValueError, JobError) as e:
            notes.append(str(e))
    sp = 1
    if pp is None and last and last.get("layout"):
        pp, cfg, sp = last["layout"]["pp"], last["layout"].get("cfg", 1), last["layout"].get("sp", 1)
    if pp is None:
        pp = 2
        notes.append("assuming 2 stages")
    out["stages"], out["cfg"] = pp, cfg
    # the model: a named file of models/diffusion_models, else the last run's
    path = None
    if unet_name:
        import folder_paths
        path = folder_paths.get_full_path("diffusion_models", unet_name)
        if path is None:
            notes.append(f"model file '{unet_name}' not found")
    elif last and (last.get("model") or {}).get("path"):
        path = last["model"]["path"]
    profile = None
    if path and os.path.exists(path):
        try:
            profile = model_profile_of_file(path)
        except Exception as e:  # a file ComfyUI cannot read as a supported model
            notes.append(f"cannot read the model: {type(e).__name__}: {e}")
    if profile is None:
        if strategy == "manual":
            try:
                from ..pp_runtime.engine.split import parse_manual
                counts = parse_manual(manual)
                out.update(split_view(counts, None, len(counts), cfg))
            except ValueError as e:
                out["error"] = str(e)
        notes.append("connect a model and run once to see blocks and memory per GPU")
        out["note"] = "; ".join(notes)
        return out
    out["model"] = {"family": profile["family"], "num_blocks": profile["num_blocks"],
                    "file": os.path.basename(path) if unet_name else (os.path.basename(path) + " (last run)")}
    capacities, reserve = None, 0
    if strategy == "by_memory":  # the memory the prompt's split counts with
        inputs = (last or {}).get("split_inputs") or {}
        if inputs.get("strategy") == "by_memory" and inputs.get("capacities") and \
                (last.get("model") or {}).get("path") == path and len(inputs["capacities"]) == pp:
            capacities, reserve = inputs["capacities"], inputs.get("reserve") or 0
            notes.append("device memory and activation reserve of the last prompt")
        elif g is not None and g.world == pp * cfg * sp and (memory := g.device_memory()) is not None:
            from ..pp_runtime.comfy.job import stage_capacities
            from ..pp_runtime.engine.topology import Topology
            capacities = stage_capacities(Topology.build(g.world, pp=pp, cfg=cfg, sp=sp), memory)
            notes.append("the group's free device memory; a prompt also reserves its activations")
    try:
        sp = split_blocks(strategy, profile["num_blocks"], pp, costs=profile["costs"],
                          block_bytes=profile["block_bytes"], first_bytes=profile["first_bytes"],
                          last_bytes=profile["last_bytes"], shared_bytes=profile.get("shared_bytes", 0),
                          capacities=capacities, reserve=reserve, manual=manual)
        out.update(split_view(sp.counts, profile, pp, cfg))
    except ValueError as e:
        out["error"] = str(e)
    out["note"] = "; ".join(notes) or None
    return out


@routes.get("/pp/split")
async def pp_split(request):
    q = request.query
    args = (q.get("strategy", "balanced"), q.get("manual", ""), q.get("unet_name") or None,
            q.get("devices") or None, q.get("cfg_mode") or "auto")
    body = await asyncio.get_running_loop().run_in_executor(None, split_json, *args)
    return web.json_response(body)


# -- actions (POST) -----------------------------------------------------------------------
async def _targets(request):
    try:
        body = await request.json() if request.can_read_body else {}
    except (ValueError, json.JSONDecodeError):
        body = {}
    key = (body or {}).get("key")
    return [g for g in shared_groups() if key in (None, "", _key(g))], key


def _act(action: str, groups) -> tuple[int, dict]:
    done, skipped = [], []
    for g in groups:
        if g.state == "running":
            return 409, {"error": f"group {_key(g)} is sampling: cancel the prompt first", **status_json()}
    for g in groups:
        if action == "release":
            if g.state != "idle":
                skipped.append({"key": _key(g), "why": f"state is '{g.state}'"})
                continue
            try:
                g.release()
            except WorkerError as e:
                return 500, {"error": str(e), **status_json()}
            _parked[g] = getattr(g, "last_run", None)
        else:
            g.shutdown()
        done.append(_key(g))
    return 200, {"ok": True, "action": action, "groups": done, "skipped": skipped}


async def _action(request, action):
    groups, key = await _targets(request)
    if key and not groups:
        return web.json_response({"error": f"no worker group for devices '{key}'"}, status=404)
    code, body = await asyncio.get_running_loop().run_in_executor(None, _act, action, groups)
    status = status_json()
    if code == 200:
        body["status"] = status
    push("pp.status", status)
    return web.json_response(body, status=code)


@routes.post("/pp/release")
async def pp_release(request):
    return await _action(request, "release")


@routes.post("/pp/shutdown")
async def pp_shutdown(request):
    return await _action(request, "shutdown")


# -- websocket events -----------------------------------------------------------------------
def push(event: str, data: dict) -> None:
    try:
        PromptServer.instance.send_sync(event, data)
    except Exception:  # no loop yet (import time) or shutting down
        pass


def _watch(period: float = 0.25) -> None:
    last_sig, seen, warned = None, {}, False
    while True:
        time.sleep(period)
        try:
            groups = shared_groups()
            if not groups:
                continue
            status = status_json()
            sig = json.dumps(status, sort_keys=True, default=str)
            if sig != last_sig:
                last_sig = sig
                push("pp.status", status)
            for g in groups:
                run = getattr(g, "last_run", None)
                if run is not None and seen.get(id(g)) is not run:
                    seen[id(g)] = run
                    push("pp.timeline", timeline_json())
        except Exception as e:  # a group changing under us: try again next time
            if not warned:
                log.warning("pp status watcher: %s: %s", type(e).__name__, e)
                warned = True


threading.Thread(target=_watch, name="pp-status-watch", daemon=True).start()
