import sys
from pathlib import Path

import pytest

# Test helpers are plain modules of this folder (not a ``tests`` package: ComfyUI has a
# ``tests`` package of its own, which would shadow ours once ComfyUI is on sys.path).
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
for p in (str(TESTS), str(ROOT)):
    if p not in sys.path:
        sys.path.insert(0, p)

from pp_runtime.workers.group import WorkerGroup  # noqa: E402

_GROUPS: dict[str, WorkerGroup] = {}


@pytest.fixture(scope="session")
def cpu_group():
    """Worker groups of N CPU processes, started once per session and reused across tests."""
    def get(n: int) -> WorkerGroup:
        key = ",".join(["cpu"] * n)
        g = _GROUPS.get(key)
        if g is None or not g.alive:
            g = _GROUPS[key] = WorkerGroup(key, cpu_threads=1, extra_paths=[str(TESTS)]).start()
        return g
    yield get
    for g in _GROUPS.values():
        g.shutdown()


# Tier 3: the one ComfyUI server of the session (a fixture defined here, so that every test
# module shares it), and per-test wall times at the end of the run.
from server_util import comfy_server, pytest_terminal_summary, release_server_groups  # noqa: E402,F401


@pytest.fixture(autouse=True)
def _server_test_timing(request):
    """Tier 3 (test_server_* modules): wall time per test, listed at the end of the run."""
    if not request.module.__name__.startswith("test_server"):
        yield
        return
    import time
    from server_util import TIMINGS
    failed_before = request.session.testsfailed
    t0 = time.monotonic()
    yield
    wall = time.monotonic() - t0
    outcome = "failed" if request.session.testsfailed > failed_before else "passed"
    TIMINGS.append((request.node.nodeid.split("::", 1)[-1], wall, outcome))
    print(f"\n[{request.node.name}] {wall:.1f}s")
