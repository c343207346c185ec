"""Per-rank timeline: spans of compute and wait per micro-batch, so bubbles are measured.

On CPU a span is two ``perf_counter`` readings.  On CUDA it is two events on the
current stream, read back only once they have completed, so recording never
synchronises the device inside a step; ``cpu_ms`` is how long the host took to issue it
(a compute span whose ``cpu_ms`` reaches its length: the GPU waited on the CPU).
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch


class Timeline:
    def __init__(self, device: torch.device, rank: int):
        self.cuda = torch.device(device).type == "cuda"
        self.rank = rank
        self.step = 0
        self._open: list = []  # CUDA spans whose events may not have completed yet
        self.spans: list[dict] = []
        self._t0 = time.perf_counter()
        self._e0 = None
        if self.cuda:
            self._e0 = torch.cuda.Event(enable_timing=True)
            self._e0.record()

    @contextmanager
    def span(self, kind: str, label: str, entry: dict | None = None):
        """Time a ``kind`` ("compute", "wait") of ``label``; ``entry``: what it is in the pass
        plan (unit, micro-batch, branch, patch: ``plan.Unit.entry``), which the panel draws."""
        if self.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            c = time.perf_counter()
            a.record()
            yield
            b.record()
            self._open.append((kind, label, entry, self.step, a, b, (time.perf_counter() - c) * 1e3))
        else:
            a = time.perf_counter()
            yield
            b = time.perf_counter()
            self.spans.append(self._row(kind, label, entry, self.step, (a - self._t0) * 1e3, (b - self._t0) * 1e3))

    def _row(self, kind, label, entry, step, t0, t1):
        return {"rank": self.rank, "step": step, "kind": kind, "label": label, "entry": entry,
                "t0_ms": round(t0, 4), "t1_ms": round(t1, 4)}

    def take(self, wait: bool = False) -> list[dict]:
        """Completed spans since the last call (``wait``: all of them, syncing CUDA)."""
        still_open = []
        for item in self._open:
            kind, label, entry, step, a, b, cpu = item
            if wait:
                b.synchronize()
            if b.query():
                row = self._row(kind, label, entry, step, self._e0.elapsed_time(a), self._e0.elapsed_time(b))
                self.spans.append({**row, "cpu_ms": round(cpu, 4)})
            else:
                still_open.append(item)
        self._open = still_open
        out, self.spans = self.spans, []
        return out
