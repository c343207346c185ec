"""Tier 4: the web panel in real headless Chromium against a real ComfyUI server.

The session's ComfyUI server (tests/server_util.py: this pack + the tests-only node pack
with ``PPTestConditioning``, tiny model files in models/diffusion_models) is driven
through the frontend: the panel is opened from the sidebar, the example workflow
(tests/example_workflows_api/wan21_t2v_pp.json, adapted: the tiny Wan 2.1 file, random
conditioning instead of the text encoder, a small latent, ``cpu,cpu``, SaveLatent instead
of the VAE) is loaded with the frontend's ``loadApiJson`` and queued with the frontend's
own Queue button path (``app.queuePrompt``).  Then the panel must show 2 ranks with their
block ranges and a timeline with bars for every rank, the PP Stage Split node its split
bar, and the buttons release and shut the group down.  The "not started", "starting"
and "failed" states are checked by feeding the panel ``pp.status`` events.

Screenshots: test-artifacts/browser/*.png.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from server_util import ARTIFACTS, MODEL_NAMES, TIMINGS

REPO = Path(__file__).resolve().parents[1]
SHOTS = ARTIFACTS / "browser"
RUN_TIMEOUT = 240  # s: the first prompt starts the worker group (2 processes on a busy 2-core box)


def example_graph() -> dict:
    """The Wan 2.1 example workflow, made runnable on the tiny test model without encoders."""
    g = json.loads((REPO / "tests" / "example_workflows_api" / "wan21_t2v_pp.json").read_text())
    g["1"]["inputs"]["unet_name"] = MODEL_NAMES["wan21_t2v"]
    del g["2"], g["11"], g["13"]
    for nid, seed in (("3", 1), ("4", 2)):
        g[nid] = {"class_type": "PPTestConditioning", "_meta": g[nid].get("_meta", {}),
                  "inputs": {"seed": seed, "length": 8, "dim": 4096, "pooled_dim": 0, "scale": 1.0}}
    g["5"]["inputs"].update(width=64, height=64, length=5)
    g["7"]["inputs"]["devices"] = "cpu,cpu"
    g["10"]["inputs"].update(steps=6, seed=7)
    g["12"] = {"class_type": "SaveLatent", "_meta": {"title": "Save Latent"},
               "inputs": {"samples": ["10", 0], "filename_prefix": "latents/pp_browser"}}
    return g


def _status_of(page) -> dict:
    return page.evaluate("() => window.ppPanel.store.status")


@pytest.fixture(scope="module")
def browser_page(comfy_server):
    pw_mod = pytest.importorskip("playwright.sync_api", reason="tier 4 (browser): playwright is not installed")
    from ui_workflows import CHROMIUM, open_app

    if not os.path.exists(CHROMIUM):
        pytest.skip(f"tier 4 (browser): no Chromium at {CHROMIUM} (set CHROMIUM)")
    comfy_server.require_nodes("PPKSampler", "PPStageSplit", "PPTestConditioning", "SaveLatent")
    SHOTS.mkdir(parents=True, exist_ok=True)
    with pw_mod.sync_playwright() as pw:
        browser, page = open_app(pw, comfy_server.port, 1800, 1050)
        # Every uncaught exception in the page (the panel's, or the frontend's because of the
        # panel) and every console error logged from the pack's scripts.
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(f"{e}\n{getattr(e, 'stack', '')}"))
        page.on("console", lambda m: errors.append(f"console: {m.text} ({m.location.get('url')})")
                if m.type == "error" and "/extensions/" in (m.location.get("url") or "") else None)
        try:
            yield page, errors
        finally:
            browser.close()


def test_panel_end_to_end(comfy_server, browser_page):
    t_test = time.monotonic()
    page, errors = browser_page
    srv = comfy_server
    page.wait_for_function("() => window.ppPanel && window.app.extensionManager", timeout=30000)

    # -- the sidebar tab opens the panel -------------------------------------------------
    button = page.locator('.side-bar-button[aria-label^="Pipeline parallel"]')
    assert button.count() == 1, "no sidebar button for the panel"
    button.click()
    page.wait_for_selector(".pp-panel .pp-title", timeout=15000)
    page.wait_for_function("() => window.ppPanel.store.status !== null", timeout=15000)
    status = _status_of(page)
    if not [g for g in status["groups"] if g["state"] not in ("not started", "stopped")]:
        # nothing ran in this server yet (tier 4 runs first in a full session)
        if not status["groups"]:
            assert page.locator(".pp-not-started").is_visible()
        assert status["state"] == "not started"
        page.locator(".pp-panel").screenshot(path=str(SHOTS / "panel_not_started.png"))

    # -- starting and failed, as the server would push them --------------------------------
    fake = {"state": "started", "groups": [
        {"key": "cuda:0,cuda:1", "devices": ["cuda:0", "cuda:1"], "backend": "local", "state": "starting",
         "display_state": "starting", "failure": None, "layout": None, "split": None, "model": None,
         "progress": None, "parked": False, "layout_text": None, "model_file": None,
         "ranks": [{"rank": r, "device": f"cuda:{r}", "name": None, "pid": None, "stage": None, "pp_rank": None,
                    "cfg_rank": None, "mem": None, "blocks": None} for r in range(2)]},
        {"key": "cuda:2,cuda:3", "devices": ["cuda:2", "cuda:3"], "backend": "local", "state": "failed",
         "display_state": "failed: rank 1 (cuda:3): was killed by signal SIGKILL",
         "failure": "rank 1 (cuda:3): was killed by signal SIGKILL: CUDA out of memory", "layout": None,
         "split": None, "model": None, "progress": None, "parked": False, "layout_text": None, "model_file": None,
         "ranks": [{"rank": r, "device": f"cuda:{r + 2}", "name": "NVIDIA H100", "pid": None, "stage": None,
                    "pp_rank": None, "cfg_rank": None, "mem": None, "blocks": None} for r in range(2)]}]}
    page.evaluate("(d) => window.comfyAPI.api.api.dispatchCustomEvent('pp.status', d)", fake)
    page.wait_for_selector(".pp-group[data-state='failed'] .pp-failure", timeout=5000)
    assert "starting" in page.locator(".pp-group[data-state='starting'] .pp-state").inner_text()
    assert "SIGKILL" in page.locator(".pp-group[data-state='failed'] .pp-failure").inner_text()
    assert page.locator(".pp-group[data-state='failed'] .pp-release").is_disabled()
    page.locator(".pp-panel").screenshot(path=str(SHOTS / "panel_starting_failed.png"))
    page.evaluate("() => window.ppPanel.refresh()")

    # -- the example workflow, loaded and queued by the frontend ----------------------------
    graph = example_graph()
    page.evaluate("async (g) => { await window.app.loadApiJson(g, 'wan21_t2v_pp (tiny model)'); }", graph)
    page.wait_for_timeout(1000)
    split_id = page.evaluate("() => window.app.graph._nodes.find(n => n.type === 'PPStageSplit')?.id")
    assert split_id is not None
    # the split bar knows the connected model (the PP loader's file) before anything ran
    page.wait_for_function(
        f"() => window.app.graph.getNodeById({split_id}).__ppSplit?.data?.counts?.length === 2", timeout=30000)
    split = page.evaluate(f"() => window.app.graph.getNodeById({split_id}).__ppSplit.data")
    assert split["counts"] == [1, 1] and split["model"]["num_blocks"] == 2, split
    assert len(split["bytes"]) == 2 and all(b > 0 for b in split["bytes"]), split

    t0 = time.time()
    page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
    # live progress reaches the panel while sampling (best effort: the tiny model is quick)
    page.wait_for_function(
        "(t0) => { const t = window.ppPanel.store.timeline; return t && t.available && t.finished > t0; }",
        arg=t0, timeout=RUN_TIMEOUT * 1000)
    page.wait_for_function(
        "() => (window.ppPanel.store.status?.groups || []).some(g => g.key === 'cpu,cpu' && g.state === 'idle')",
        timeout=30000)
    page.wait_for_timeout(500)

    # -- what the panel shows ------------------------------------------------------------
    grp = page.locator(".pp-group[data-key='cpu,cpu']")
    rows = grp.locator(".pp-rank-row")
    assert rows.count() == 2
    assert "blocks 0–0" in rows.nth(0).locator(".pp-stage").inner_text()
    assert "blocks 1–1" in rows.nth(1).locator(".pp-stage").inner_text()
    for r in range(2):
        assert "/" in rows.nth(r).locator(".pp-mem").inner_text()  # used / total
    assert "idle" in grp.locator(".pp-state").inner_text()
    assert "WanAdapter" in grp.inner_text() or "Wan" in grp.inner_text()
    bars = {r: page.locator(f".pp-timeline rect.pp-bar-compute[data-rank='{r}']").count() for r in range(2)}
    assert bars[0] > 0 and bars[1] > 0, bars
    waits = page.locator(".pp-timeline rect.pp-bar-wait").count()
    tl = page.evaluate("() => window.ppPanel.store.timeline")
    assert tl["summary"]["stages"] == 2 and tl["summary"]["micro_batches"] == 2, tl["summary"]
    assert abs(tl["summary"]["ideal_speedup"] - 4 / 3) < 1e-3
    assert tl["summary"]["measured_step_ms"] > 0 and tl["summary"]["ideal_step_ms"] > 0
    assert page.locator(".pp-measured").inner_text().endswith("ms")
    split = page.evaluate(f"() => window.app.graph.getNodeById({split_id}).__ppSplit.data")
    assert split["counts"] == [1, 1]

    page.locator(".pp-panel").screenshot(path=str(SHOTS / "panel.png"))
    _fit_view(page)
    page.screenshot(path=str(SHOTS / "ui_with_panel.png"))

    # -- strategy change redraws the split bar ----------------------------------------------
    page.evaluate(f"""() => {{ const n = window.app.graph.getNodeById({split_id});
        const w = n.widgets.find(w => w.name === 'manual'); w.value = '2,0'; w.callback?.(w.value);
        const s = n.widgets.find(w => w.name === 'strategy'); s.value = 'manual'; s.callback?.(s.value); }}""")
    page.wait_for_function(f"() => window.app.graph.getNodeById({split_id}).__ppSplit.data?.strategy === 'manual'",
                           timeout=15000)
    assert page.evaluate(f"() => window.app.graph.getNodeById({split_id}).__ppSplit.data.error")  # empty stage

    # -- buttons: release, then shut down --------------------------------------------------
    grp.locator(".pp-release").click()
    page.wait_for_function(
        "() => (window.ppPanel.store.status?.groups || []).some(g => g.key === 'cpu,cpu' && g.parked)",
        timeout=30000)
    assert "parked" in page.locator(".pp-group[data-key='cpu,cpu'] .pp-state").inner_text()
    status, body = srv.pp_status()
    assert status == 200 and [g for g in body["groups"] if g["key"] == "cpu,cpu"][0]["parked"]
    page.locator(".pp-group[data-key='cpu,cpu'] .pp-shutdown").click()
    page.wait_for_function(
        "() => (window.ppPanel.store.status?.groups || []).some(g => g.key === 'cpu,cpu' && g.state === 'stopped')",
        timeout=30000)
    page.locator(".pp-panel").screenshot(path=str(SHOTS / "panel_stopped.png"))
    assert not errors, errors
    assert waits > 0  # rank 1 waits for rank 0's activations at least once per step
    TIMINGS.append(("test_browser.py::test_panel_end_to_end", time.monotonic() - t_test, "passed"))


FIT = """() => {
  const c = window.app.canvas;
  const nodes = window.app.graph._nodes.filter(n => ["PPStageSplit", "PPKSampler", "PPWorkerGroup", "PPCFGMode"].includes(n.type));
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  for (const n of nodes) {
    x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - 30);
    x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
  }
  const r = c.canvas.getBoundingClientRect(), panel = document.querySelector('.pp-panel');
  const left = panel ? panel.getBoundingClientRect().right - r.left : 0;
  const W = c.canvas.width / (window.devicePixelRatio || 1) - left, H = c.canvas.height / (window.devicePixelRatio || 1), m = 30;
  // readable widgets (LiteGraph drops detail below ~0.6): fit the width, crop the bottom
  const scale = Math.max(0.7, Math.min((W - 2 * m) / (x1 - x0), (H - 2 * m - 60) / (y1 - y0), 1.0));
  c.ds.scale = scale;
  c.ds.offset = [-x0 + (left + m) / scale, -y0 + (m + 80) / scale];
  c.setDirty(true, true);
}"""


ARRANGE = """() => {  // for the picture: the split and CFG nodes beside the sampler
  const g = window.app.graph, by = (t) => g._nodes.find(n => n.type === t);
  const k = by("PPKSampler"), sp = by("PPStageSplit"), cfg = by("PPCFGMode"), grp = by("PPWorkerGroup");
  const x = k.pos[0] + k.size[0] + 60;
  sp.pos = [x, k.pos[1] + 140]; cfg.pos = [x, sp.pos[1] + sp.size[1] + 70];
  grp.pos = [k.pos[0], k.pos[1] + k.size[1] + 70];
  g.setDirtyCanvas(true, true);
}"""


def _fit_view(page):
    page.evaluate(ARRANGE)
    page.evaluate(FIT)
    page.wait_for_timeout(600)
