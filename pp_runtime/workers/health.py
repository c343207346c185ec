"""Faults a multi-GPU group really has: hung workers, out of memory, and what the user reads.

Worker side:

* ``Activity``: what this worker is doing right now (placing its stage, computing block g,
  waiting for rank r, idle) and how many blocks it has run; the stage hooks and the
  point-to-point receives update it.  A heartbeat thread sends it to the host every
  ``BEAT_S`` while a job runs: a worker that is stopped (SIGSTOP, a wedged driver holding
  the process) sends nothing; one stuck in a kernel keeps beating, its block count frozen.
* ``describe_failure``: an exception as the user should read it — its cause and the frame it
  came from, or for an allocation that failed, what the rank was placing or computing,
  what it had free, and what to change.
* ``apply_memory_cap``: a per-worker memory cap (PP Worker Group ``memory_cap_gb``): the
  CUDA caching allocator's per-process fraction on a GPU; on a CPU worker the private
  memory the process may add (``RLIMIT_DATA``).

Host side, ``Watchdog``: given the beats and the step times, which rank hangs the group
(``culprit``) and when to give up on it.  Bounds (seconds, environment overrides):
``PP_SILENT_S`` (15) with no heartbeat; ``PP_CANCEL_GRACE_S`` (8) after Cancel for the
group to stop; ``PP_STEP_WATCHDOG_S`` (120, and at least ``PP_STEP_WATCHDOG_FACTOR`` (10)
times the slowest step of the job so far) for a step once one step has completed.
"""
from __future__ import annotations

import os
import threading
import time
import traceback

import torch

BEAT_S = 1.0  # seconds between heartbeats


def bound(name: str, default: float) -> float:
    """A watchdog bound in seconds: the environment's ``name`` if set, else ``default``."""
    return float(os.environ.get(name, default))


class Activity:
    """What the worker does now; written by the main thread, read by the heartbeat thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self.what, self.peer, self.block, self.detail = "idle", None, None, ""
        self.blocks_run = 0
        self.since = time.monotonic()

    def set(self, what: str, peer: int | None = None, block: int | None = None, detail: str = "") -> None:
        with self._lock:
            self.what, self.peer, self.block, self.detail = what, peer, block, detail
            self.since = time.monotonic()

    def on_block(self, g: int) -> None:
        with self._lock:
            self.what, self.peer, self.block = "compute", None, g
            self.blocks_run += 1
            self.since = time.monotonic()

    def waiting(self, peer: int | None) -> None:
        """Called by the point-to-point layer before (peer) and after (None) a blocking receive."""
        with self._lock:
            if peer is None:
                if self.what == "wait":
                    self.what, self.peer = "compute", None
            else:
                self.what, self.peer = "wait", peer
            self.since = time.monotonic()

    def snapshot(self) -> dict:
        with self._lock:
            return {"what": self.what, "peer": self.peer, "block": self.block, "detail": self.detail,
                    "blocks_run": self.blocks_run, "for_s": round(time.monotonic() - self.since, 2)}

    def text(self) -> str:
        s = self.snapshot()
        return describe_activity(s)


def describe_activity(s: dict) -> str:
    if s["what"] == "compute":
        return f"computing block {s['block']}" if s["block"] is not None else "computing"
    if s["what"] == "wait":
        return f"waiting for rank {s['peer']}"
    return s["what"] + (f" {s['detail']}" if s.get("detail") else "")


def start_heartbeat(send, activity: Activity, current_job) -> threading.Thread:
    """Every BEAT_S while ``current_job()`` is set: send the activity to the host."""
    def beat():
        while True:
            time.sleep(BEAT_S)
            job = current_job()
            if job is not None:
                try:
                    send({"op": "beat", "job": job, "activity": activity.snapshot()})
                except Exception:
                    return  # the host is gone; the control reader ends the process
    t = threading.Thread(target=beat, daemon=True, name="pp-heartbeat")
    t.start()
    return t


# -- failures as the user reads them -------------------------------------------------------
def is_oom(e: BaseException) -> bool:
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(e).lower()
    return "out of memory" in text or "can't allocate memory" in text or "cannot allocate memory" in text


def _gb(n) -> str:
    return f"{n / 2**30:.2f} GiB" if n is not None else "?"


def memory_free(device: torch.device, cap: int = 0) -> str:
    """'X free of Y' for the device (CUDA) or the host (CPU), and the cap if one is set."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        used = torch.cuda.memory_reserved(device)
        out = f"{_gb(free)} free of {_gb(total)} on the device, {_gb(used)} held by this worker"
    else:
        avail = total = None
        try:
            with open("/proc/meminfo") as f:
                info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
            avail, total = info.get("MemAvailable"), info.get("MemTotal")
        except (OSError, ValueError, IndexError):
            pass
        out = f"{_gb(avail)} free of {_gb(total)} host RAM"
    if cap:
        out += f"; its memory cap is {_gb(cap)}"
    return out


def last_frame(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    if not tb:
        return ""
    f = tb[-1]
    return f"{os.path.basename(f.filename)}:{f.lineno} in {f.name}"


def describe_failure(e: BaseException, rank: int, device: torch.device, activity: Activity, cap: int = 0) -> dict:
    """The error message for the host: cause first, then where it happened, never log lines."""
    first = (str(e).strip().splitlines() or [""])[0]
    where = last_frame(e)
    if is_oom(e):
        msg = (f"out of memory while {activity.text()}: {type(e).__name__}: {first[:300]} ({memory_free(device, cap)}). "
               f"Change: a split that puts fewer blocks on rank {rank} (PP Stage Split by_memory, or manual), a "
               f"smaller weight dtype (fp8), more GPUs, or a lower resolution / fewer frames")
        return {"error": msg, "kind": "oom", "where": where}
    return {"error": f"{type(e).__name__}: {first}" + (f" (at {where}, while {activity.text()})" if where else ""),
            "kind": "error", "where": where}


# -- a per-worker memory cap ------------------------------------------------------------------
def apply_memory_cap(device: torch.device, cap: int, placed_bytes: int = 0) -> None:
    """``cap`` bytes (0: none) for this worker.  GPU: the caching allocator's fraction of the
    device.  CPU: RLIMIT_DATA (the process's private writable memory) set to what it has
    now plus what the cap leaves after the stages it already holds (``placed_bytes``), so
    an allocation beyond the cap fails (measured: within 10 % of the cap)."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total) if cap else 1.0, device)
        return
    try:
        import resource
    except ImportError:  # not on this platform
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if not cap:
        resource.setrlimit(resource.RLIMIT_DATA, (hard, hard))
        return
    try:  # glibc: blocks of 128 KiB and more always from mmap, so freed memory leaves the count at once
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/status") as f:
            data = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmData:"))
    except (OSError, StopIteration):
        return
    limit = data + max(0, cap - placed_bytes)
    resource.setrlimit(resource.RLIMIT_DATA, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))


# -- host side ---------------------------------------------------------------------------------
class Watchdog:
    """Per job: the last heartbeat of every rank and the step times; says which rank hangs."""

    def __init__(self, world: int):
        now = time.monotonic()
        self.world = world
        self.beats = {r: (now, None) for r in range(world)}
        self.started = now
        self.last_step = None
        self.slowest = 0.0
        self.interrupted_at = None
        self.blocks_at_interrupt: dict[int, int] = {}

    def beat(self, rank: int, activity: dict) -> None:
        self.beats[rank] = (time.monotonic(), activity)

    def step(self) -> None:
        now = time.monotonic()
        if self.last_step is not None:
            self.slowest = max(self.slowest, now - self.last_step)
        self.last_step = now

    def interrupted(self) -> None:
        if self.interrupted_at is None:
            self.interrupted_at = time.monotonic()
            self.blocks_at_interrupt = {r: (a or {}).get("blocks_run", 0) for r, (_, a) in self.beats.items()}

    def check(self, pending: set[int]) -> tuple[int, str] | None:
        """(rank, cause) if the job hangs, else None.  ``pending``: ranks not done yet."""
        now = time.monotonic()
        for r in sorted(pending):
            t, act = self.beats[r]
            if now - t > bound("PP_SILENT_S", 15):
                return r, (f"stopped responding: no heartbeat for {now - t:.0f} s (the process is stopped or "
                           f"wedged{'; it was ' + describe_activity(act) if act else ''})")
        if self.interrupted_at is not None and now - self.interrupted_at > bound("PP_CANCEL_GRACE_S", 8):
            r = self.culprit(pending)
            t, act = self.beats[r]
            if now - t > 3 * BEAT_S:
                return r, (f"stopped responding: no heartbeat for {now - t:.0f} s and it did not stop within "
                           f"{now - self.interrupted_at:.0f} s of Cancel (the process is stopped or wedged"
                           f"{'; it was ' + describe_activity(act) if act else ''})")
            return r, (f"did not stop within {now - self.interrupted_at:.0f} s of Cancel: "
                       f"{self._activity_text(r)}")
        if self.last_step is not None and self.interrupted_at is None:
            limit = max(bound("PP_STEP_WATCHDOG_S", 120), bound("PP_STEP_WATCHDOG_FACTOR", 10) * self.slowest)
            if now - self.last_step > limit:
                r = self.culprit(pending)
                return r, (f"made no progress for {now - self.last_step:.0f} s (the slowest step took "
                           f"{self.slowest:.1f} s): {self._activity_text(r)}")
        return None

    def _activity_text(self, r: int) -> str:
        act = self.beats[r][1]
        return ("stuck " + describe_activity(act)) if act else "it never reported what it was doing"

    def culprit(self, pending: set[int]) -> int:
        """The rank the others wait for: one that does not beat, else one that is computing
        (or placing) without progress, else the end of the chain of 'waiting for rank r'."""
        now = time.monotonic()
        silent = [r for r in sorted(pending) if now - self.beats[r][0] > 3 * BEAT_S]
        if silent:
            return silent[0]
        acts = {r: (self.beats[r][1] or {}) for r in range(self.world)}
        stuck = [r for r in sorted(pending) if acts[r].get("what") in ("compute", "placing")
                 and acts[r].get("blocks_run", 0) == self.blocks_at_interrupt.get(r, acts[r].get("blocks_run", 0))]
        if stuck:
            return stuck[0]
        for start in sorted(pending):
            r, seen = start, set()
            while acts[r].get("what") == "wait" and acts[r].get("peer") is not None and r not in seen:
                seen.add(r)
                r = acts[r]["peer"]
            if acts[r].get("what") != "wait":
                return r
        return min(pending)
