import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pp_runtime.group import WorkerGroup  # noqa: E402

_GROUPS: dict[str, WorkerGroup] = {}


@pytest.fixture(scope="session")
def cpu_group():
    """Worker groups of N CPU processes, started once per session and reused across tests."""
    def get(n: int) -> WorkerGroup:
        key = ",".join(["cpu"] * n)
        g = _GROUPS.get(key)
        if g is None or not g.alive:
            g = _GROUPS[key] = WorkerGroup(key, cpu_threads=1).start()
        return g
    yield get
    for g in _GROUPS.values():
        g.shutdown()
