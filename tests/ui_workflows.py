"""Make the UI-format example workflows (and their pictures) from the API-format ones.

The ComfyUI frontend itself does the conversion: a real ComfyUI server with this pack,
headless Chromium, ``app.loadApiJson`` (the frontend lays the nodes out), then
``app.graph.serialize()``.  Run it after changing a workflow in
``tests/example_workflows_api/``:

    COMFYUI_ROOT=/path/to/ComfyUI python tests/ui_workflows.py

Writes ``example_workflows/<name>.json`` (the template browser lists them) and
``example_workflows/<name>.jpg`` (its thumbnail, also shown in the README).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(comfy_root: Path, base: Path, port: int, log) -> subprocess.Popen:
    """A real ComfyUI with only this pack among the custom nodes."""
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / "comfyui-pipeline-parallel"
    if not link.exists():
        link.symlink_to(REPO)
    proc = subprocess.Popen(
        [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
         "--base-directory", str(base), "--disable-all-custom-nodes", "--whitelist-custom-nodes",
         "comfyui-pipeline-parallel", "--database-url", "sqlite:///:memory:"],
        cwd=comfy_root, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/object_info", timeout=5)
            return proc
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("ComfyUI exited during start")
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("ComfyUI did not start in 120 s")


QUIET_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False}


def open_app(pw, port: int, width=1600, height=900):
    for key, value in QUIET_SETTINGS.items():  # no template browser or minimap on a first visit
        req = urllib.request.Request(f"http://127.0.0.1:{port}/settings/{key}", data=json.dumps(value).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=10)
    browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    page = browser.new_page(viewport={"width": width, "height": height})
    page.goto(f"http://127.0.0.1:{port}/", wait_until="load", timeout=60000)
    page.wait_for_function("window.app && window.app.graph && window.LiteGraph", timeout=60000)
    page.wait_for_timeout(1000)
    return browser, page


FIT_VIEW = """() => {
  const c = window.app.canvas, nodes = window.app.graph._nodes;
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  for (const n of nodes) {
    x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - 30);
    x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
  }
  const W = c.canvas.width, H = c.canvas.height, m = 40;
  const scale = Math.min((W - 2 * m) / (x1 - x0), (H - 2 * m) / (y1 - y0), 1.0);
  c.ds.scale = scale;
  c.ds.offset = [-x0 + (W / scale - (x1 - x0)) / 2, -y0 + (H / scale - (y1 - y0)) / 2];
  c.setDirty(true, true);
}"""


def convert(page, api: dict) -> dict:
    page.evaluate("async (api) => { await window.app.loadApiJson(api, 'workflow'); }", api)
    page.wait_for_timeout(1500)
    return page.evaluate("() => window.app.graph.serialize()")


def main() -> int:
    sys.path.insert(0, str(TESTS))
    from comfy_env import find_comfy_root
    from playwright.sync_api import sync_playwright

    root = find_comfy_root()
    if root is None:
        sys.exit("ComfyUI not found: set COMFYUI_ROOT")
    out_dir = REPO / "example_workflows"
    out_dir.mkdir(exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="pp-ui-"))
    port = free_port()
    with open(base / "server.log", "wb") as log:
        server = start_server(root, base, port, log)
        try:
            with sync_playwright() as pw:
                browser, page = open_app(pw, port, 2200, 1250)
                for api_file in sorted((TESTS / "example_workflows_api").glob("*.json")):
                    ui = convert(page, json.loads(api_file.read_text()))
                    (out_dir / api_file.name).write_text(json.dumps(ui, indent=1) + "\n")
                    page.evaluate(FIT_VIEW)
                    page.wait_for_timeout(800)
                    shot = base / f"{api_file.stem}.png"
                    page.screenshot(path=str(shot))
                    from PIL import Image
                    Image.open(shot).convert("RGB").save(out_dir / f"{api_file.stem}.jpg", quality=85)
                    print("wrote", out_dir / api_file.name, out_dir / f"{api_file.stem}.jpg")
                browser.close()
        finally:
            server.kill()
            server.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
