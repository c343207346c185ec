"""The one-command demo (``python -m pp_runtime.demo``, README *See it work*): inside a
ComfyUI it runs PP KSampler's path against the stock KSampler's on ComfyUI's own model
classes and says OK (exit 0); without one it exits 2 and says how to point it at ComfyUI."""
import os
import subprocess
import sys

import pytest

from comfy_env import REPO, find_comfy_root, require_comfy


def _demo(comfy_root, *args):
    env = dict(os.environ, COMFYUI_ROOT=str(comfy_root))
    return subprocess.run([sys.executable, "-m", "pp_runtime.demo", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_demo_matches_stock_ksampler():
    root = require_comfy()  # skips (fails under PP_REQUIRE_COMFY=1) without ComfyUI
    r = _demo(root)
    out = r.stdout + r.stderr
    print(out)
    assert r.returncode == 0, out
    assert f"found at {root}" in r.stdout
    assert "4 steps streamed back, placed model reused: True" in r.stdout
    assert "(OK" in r.stdout and "MISMATCH" not in r.stdout


def test_demo_without_comfyui_exits_2(tmp_path, monkeypatch):
    monkeypatch.delenv("COMFYUI_ROOT", raising=False)
    if find_comfy_root() is not None:  # the pack sits in a ComfyUI tree: the demo would find it
        pytest.skip(f"this pack is inside a ComfyUI tree ({find_comfy_root()}): the demo cannot miss it")
    r = _demo(tmp_path)  # an empty folder
    assert r.returncode == 2, r.stdout + r.stderr
    assert "ComfyUI not found" in r.stderr and str(tmp_path) in r.stderr
    assert "set COMFYUI_ROOT" in r.stderr and "ComfyUI/custom_nodes" in r.stderr
