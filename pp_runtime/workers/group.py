"""The persistent worker group, host side (the ComfyUI process or a test).

``WorkerGroup`` is the local backend and holds everything that does not depend on where
the workers run: the job loop, message dispatch, streaming, interrupt, status and
failure handling.  A backend changes only how workers are launched, watched and torn
down (``_launch``, ``_check_alive``, ``_first_dead``, ``_cause``, ``_kill``,
``_wait_exit``, ``alive``, ``pids``); the Ray backend (``ray_backend.py``) is a
subclass.  Workers of every backend run the same ``worker.Worker`` loop over a
transport with ``send_bytes``/``recv_bytes``.

One worker process per device, started as ``python -m pp_runtime.workers.worker`` with an
explicit environment.  Control runs over a loopback listener authenticated with a random
key per group (given to each worker on its stdin, never on the command line);
torch.distributed meets through a file in a private folder, so nothing listens on a
public address (gloo and NCCL are pinned to the loopback interface).  The group
stays up between jobs and keeps the placed model.  While a job runs the host watches
every worker: a dead process or a reported error fails the job within a fraction of a
second with the rank and cause, and the group is torn down (the next job starts a fresh
one).  Interrupts go to every rank; the last ranks stop at the next step boundary and the
group stays usable.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Listener
from pathlib import Path

import torch

from . import wire
from .environment import ENV_FLAGS, check_platform, comfy_flags, loopback_interface, visible_device
from .health import Watchdog
from ..engine.topology import Topology


log = logging.getLogger("pp_runtime")


PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])


class WorkerError(RuntimeError):
    def __init__(self, rank: int, device: str, cause: str, node: str | None = None):
        where = f"rank {rank} on node {node} ({device})" if node else f"rank {rank} ({device})"
        super().__init__(f"pipeline worker {where} failed: {cause}")
        self.rank, self.device, self.cause, self.node = rank, device, cause, node


class Interrupted(RuntimeError):
    pass


def parse_devices(devices) -> list[str]:
    """'cuda:0,cuda:1' / 'cpu,cpu' / 'auto' / a list -> device strings, checked."""
    if isinstance(devices, str):
        text = devices.strip().lower()
        if text in ("", "auto"):
            import torch
            n = torch.cuda.device_count()
            if n < 2:
                raise ValueError(f"devices 'auto' found {n} CUDA device(s); pipeline parallelism needs at "
                                 f"least 2: list devices explicitly, e.g. 'cpu,cpu' to try it on the CPU")
            return [f"cuda:{i}" for i in range(n)]
        devices = [d.strip() for d in text.split(",") if d.strip()]
    out = []
    for d in devices:
        if d == "cuda":
            d = "cuda:0"
        if d != "cpu" and not (d.startswith("cuda:") and d[5:].isdigit()):
            raise ValueError(f"device '{d}' is not understood; use 'cpu' or 'cuda:N'")
        if d.startswith("cuda:"):
            import torch
            if int(d[5:]) >= torch.cuda.device_count():
                seen = {v: os.environ[v] for v in ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES") if os.environ.get(v)}
                raise ValueError(f"device '{d}' does not exist: ComfyUI sees {torch.cuda.device_count()} CUDA "
                                 f"device(s){' (' + ', '.join(f'{k}={v}' for k, v in seen.items()) + ')' if seen else ''}")
        out.append(d)
    cuda = [d for d in out if d != "cpu"]
    if cuda and len(cuda) != len(out):
        raise ValueError(f"devices {out} mix cpu and cuda; use one kind")
    if len(set(cuda)) != len(cuda):
        raise ValueError(f"devices {out} name a GPU twice; each rank needs its own GPU")
    if not out:
        raise ValueError("no devices given")
    return out


def worker_env(device: str, world: int, extra_paths=(), cpu_threads: int | None = None) -> dict:
    """A worker's environment: one visible GPU (the parent's ``device``, mapped through the
    parent's own visibility), the caching allocator, loopback-only networking, and
    ComfyUI's flags that change what a stage computes (``environment.py``)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF", "CUDA_VISIBLE_DEVICES",
                                "HIP_VISIBLE_DEVICES"))}
    # ComfyUI's root before the pack's: ComfyUI's own top-level modules (nodes.py, utils/, ...)
    # must win over the pack's folders of the same names (nodes/).
    paths = [*extra_paths, PACKAGE_PARENT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    lo = loopback_interface()
    env.update({
        "PYTHONPATH": os.pathsep.join(paths),
        "PYTHONUNBUFFERED": "1",
        # Not ComfyUI's cudaMallocAsync: the caching allocator, growing segments in place.
        "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
        # Rendezvous, gloo and NCCL bootstrap on loopback only.
        "GLOO_SOCKET_IFNAME": env.get("GLOO_SOCKET_IFNAME", lo),
        "NCCL_SOCKET_IFNAME": env.get("NCCL_SOCKET_IFNAME", lo),
        "NCCL_NVLS_ENABLE": "0",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
        ENV_FLAGS: json.dumps(comfy_flags()),
        # With ComfyUI's root on the path, a worker imports its model code on start, not in the
        # first prompt (the host meanwhile prepares the job: the file's header, the conditioning).
        "PP_PRELOAD_COMFY": "1" if extra_paths else "0",
    })
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["OMP_NUM_THREADS"] = str(cpu_threads or max(1, (os.cpu_count() or 1) // world))
    else:
        var, value = visible_device(int(device.split(":")[1]))
        env[var] = value
    return env


class WorkerGroup:
    backend = "local"
    parse = staticmethod(parse_devices)  # a backend's own device spec

    def __init__(self, devices, startup_timeout: float = 180.0, extra_paths=(), cpu_threads: int | None = None):
        self.devices = self.parse(devices)
        self.world = len(self.devices)
        self.startup_timeout = startup_timeout
        self.extra_paths = list(extra_paths)
        self.cpu_threads = cpu_threads
        self.state = "not started"
        self.failure: str | None = None
        self.progress: tuple[int, int | None] | None = None  # (steps done, total) while a job runs
        self.procs: list[subprocess.Popen] = []
        self.conns: list = []
        self.info: list[dict] = []
        self.logs: list[Path] = []
        self._inbox: queue.Queue = queue.Queue()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._start_lock = threading.Lock()  # one start at a time (a background start, a prompt's)
        self.held: list[dict] = []  # per rank, {placement key: patches id} after its last job
        self._kept: list[dict] = []  # per rank, {tensor name: (tensor, version)} it keeps from its last job

    # -- lifecycle -----------------------------------------------------------------
    def start(self) -> "WorkerGroup":
        with self._start_lock:
            return self._start()

    def start_in_background(self) -> None:
        """Start the workers (and their import of ComfyUI's model code) while the ComfyUI
        process goes on with the graph (its text encoders); a prompt's ``start`` waits for it,
        and a failure here is met again, and reported, by that prompt."""
        if self.state in ("idle", "running") or self._start_lock.locked():
            return

        def start():
            try:
                self.start()
            except Exception:
                pass
        threading.Thread(target=start, name="pp-group-start", daemon=True).start()

    def _start(self) -> "WorkerGroup":
        if self.state in ("idle", "running"):
            return self
        self.state, self.failure = "starting", None
        self._inbox = queue.Queue()  # a new group never sees a message of the old one
        self.held, self._kept = [], []
        try:
            self._launch()
        except BaseException:
            self._kill()
            self.state = "failed"
            raise
        self.state = "idle"
        return self

    def _error(self, rank: int, cause: str) -> WorkerError:
        return WorkerError(rank, self.devices[rank], cause, node=self._node(rank))

    def _node(self, rank: int) -> str | None:
        """The machine a rank runs on, where the backend spans several (None: this one)."""
        return None

    def _launch(self) -> None:
        """Start the workers; fill ``conns`` and ``info`` and start a ``_read`` thread per rank."""
        check_platform()
        key = secrets.token_bytes(32)
        listener = Listener(("127.0.0.1", 0), authkey=key)
        port = listener.address[1]
        self.logdir = logdir = Path(tempfile.mkdtemp(prefix="pp-workers-"))  # 0700: logs, rendezvous file
        store = logdir / "rendezvous"
        self.procs, self.conns, self.logs, self.info = [], [None] * self.world, [], [None] * self.world
        try:
            for rank, dev in enumerate(self.devices):
                log = logdir / f"rank{rank}.log"
                self.logs.append(log)
                device_arg = "cpu" if dev == "cpu" else "cuda:0"  # each worker sees one GPU
                with open(log, "wb") as out:  # the child keeps its own descriptor
                    proc = subprocess.Popen(
                        [sys.executable, "-m", "pp_runtime.workers.worker", "--rank", str(rank), "--world", str(self.world),
                         "--control-port", str(port), "--store", str(store), "--device", device_arg],
                        stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
                        env=worker_env(dev, self.world, self.extra_paths, self.cpu_threads),
                        cwd=logdir)  # not the pack's folder: `-m` puts the cwd first on sys.path
                proc.stdin.write(key.hex().encode() + b"\n")
                proc.stdin.close()
                self.procs.append(proc)
            self._accept(listener)
        finally:
            listener.close()

    def _accept(self, listener):
        accepted: queue.Queue = queue.Queue()

        def accept_all():
            for _ in range(self.world):
                try:
                    accepted.put(listener.accept())
                except Exception as e:  # wrong key or listener closed
                    accepted.put(e)
        threading.Thread(target=accept_all, daemon=True).start()
        deadline = time.monotonic() + self.startup_timeout
        pending = set(range(self.world))
        while pending:
            self._check_alive(starting=True)
            if time.monotonic() > deadline:
                raise self._error(min(pending),
                                  f"did not start within {self.startup_timeout:.0f} s")
            try:
                conn = accepted.get(timeout=0.1)
            except queue.Empty:
                continue
            if isinstance(conn, Exception):
                raise conn
            while not conn.poll(0.1):  # 'ready' comes after torch.distributed is up
                self._check_alive(starting=True)
                if time.monotonic() > deadline:
                    raise self._error(min(pending), "did not join the group in time")
            msg, _ = wire.recv(conn)
            rank = msg["rank"]
            self.conns[rank], self.info[rank] = conn, msg
            pending.discard(rank)
            threading.Thread(target=self._read, args=(rank, conn, self._inbox), daemon=True).start()

    @staticmethod
    def _read(rank, conn, inbox):
        while True:
            try:
                msg, tensors = wire.recv(conn)
            except (EOFError, OSError):
                inbox.put(({"op": "eof", "rank": rank}, {}))
                return
            inbox.put((msg, tensors))

    def _cause(self, rank: int) -> str:
        """Why a worker process is gone, as the user reads it: the signal or exit code (its
        log stays in the worker's log file and the ComfyUI log)."""
        code = self.procs[rank].poll()
        if code is None:
            return "closed its control connection"
        if code < 0:
            name = signal.Signals(-code).name
            hint = " (the kernel's out-of-memory killer sends it when host RAM runs out)" if name == "SIGKILL" else ""
            return f"was killed by signal {name}{hint}"
        return f"exited with code {code}"

    def _log_tail(self, rank: int, lines: int = 20) -> str:
        try:
            return "\n".join(self.logs[rank].read_text(errors="replace").strip().splitlines()[-lines:])
        except (OSError, IndexError):
            return ""

    def _hang(self, rank: int, cause: str):
        """A worker hangs the group: kill it and the rest, say which rank and why."""
        log.warning("pipeline worker rank %s hangs: %s; its log:\n%s", rank, cause, self._log_tail(rank))
        self._fail(rank, cause)
        raise self._error(rank, cause)

    def _first_dead(self, grace: float = 0.0):
        deadline = time.monotonic() + grace
        while True:
            for rank, p in enumerate(self.procs):
                if p.poll() is not None and p.returncode != 1:  # 1: exited after reporting an error
                    return rank
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def _check_alive(self, starting=False):
        for rank, p in enumerate(self.procs):
            if p.poll() is not None:
                cause = self._cause(rank)
                self._fail(rank, cause)
                raise self._error(rank, cause)

    def _fail(self, rank, cause):
        self.failure = f"rank {rank} ({self.devices[rank]}): {cause}"
        self._kill()
        self.state = "failed"

    def _kill(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for c in self.conns:
            if c is not None:
                try:
                    c.close()
                except OSError:
                    pass

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._start_lock:  # not while a background start is launching workers
            self._shutdown(timeout)

    def _shutdown(self, timeout: float) -> None:
        if self.state in ("idle", "running"):
            for c in self.conns:
                try:
                    wire.send(c, {"op": "shutdown"})
                except OSError:
                    pass
            self._wait_exit(timeout)
        self._kill()
        self.state = "stopped"
        if getattr(self, "logdir", None) is not None:
            shutil.rmtree(self.logdir, ignore_errors=True)

    def _wait_exit(self, timeout: float) -> None:
        """After 'shutdown' went out: wait up to ``timeout`` s for the workers to leave."""
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass

    def status(self) -> dict:
        """JSON-able state for the ComfyUI frontend and tests."""
        last = getattr(self, "last_run", None) or {}
        ranks = []
        for r, dev in enumerate(self.devices):
            info = (self.info[r] if r < len(self.info) and self.info[r] else {}) if self._started() else {}
            done = (last.get("ranks") or [None] * self.world)[r] or {}
            ranks.append({"rank": r, "device": dev, "name": info.get("name"), "node": info.get("node"),
                          "pid": info.get("pid") if self.alive else None,
                          "stage": done.get("stage"), "pp_rank": done.get("pp_rank"), "cfg_rank": done.get("cfg_rank"),
                          "sp_rank": done.get("sp_rank"), "mem": done.get("mem") or info.get("mem"), "seconds": done.get("seconds"),
                          "loaded": done.get("loaded"), "passes": done.get("passes"), "comfy": done.get("comfy"),
                          "patch_pipelining": done.get("patch_pipelining")})
        step, total = self.progress if self.state == "running" and self.progress else (None, None)
        return {"devices": self.devices, "backend": self.backend, "state": self.state, "failure": self.failure,
                "layout": last.get("layout"), "layout_reason": last.get("layout_reason"), "split": last.get("split"),
                "model": last.get("family"), "progress": {"step": step, "total": total} if step is not None else None,
                "ranks": ranks}

    def _started(self) -> bool:
        return bool(self.procs)

    @property
    def alive(self) -> bool:
        return self.state in ("idle", "running") and all(p.poll() is None for p in self.procs)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    # -- jobs ------------------------------------------------------------------------
    def _broadcast(self, msg, tensors=None, ranks=None):
        for r in (range(self.world) if ranks is None else ranks):
            wire.send(self.conns[r], msg, tensors)

    def _dispatch(self, msg: dict, tensors: dict, rank_tensors) -> int:
        """Send a job: the shared tensors only to the ranks that use them (the job's
        ``tensors_to``: every rank, the first or the last stage of each pipeline), each
        distinct payload encoded once; ``rank_tensors(r)`` adds what only rank r needs.

        Tensors named with one of the job's ``reuse_prefixes`` (conditioning: ComfyUI hands
        the same objects to every prompt whose text did not change) are not sent again to a
        rank that got the same tensor object, unmodified, with its previous job: the message
        names them under ``reuse`` and the worker takes the ones it kept.  Returns the bytes sent."""
        spec = msg["job_spec"]
        to = spec.get("tensors_to", "all")
        layout = spec.get("layout")
        prefixes = tuple(spec.get("reuse_prefixes") or ())
        topo = Topology.of_layout(self.world, layout) if layout else None
        if len(self._kept) != self.world:
            self._kept = [{} for _ in range(self.world)]
        encoded: dict[tuple, bytes] = {}
        sent = 0
        for r in range(self.world):
            coords = topo.coords_of(r) if topo else {"pp": 0, "sp": 0}
            wants = (to == "all" or (to == "first" and coords["pp"] == 0)  # "last": each pipeline's driver
                     or (to == "last" and topo is not None and coords["pp"] == topo.pp_size - 1 and coords["sp"] == 0))
            shared = dict(tensors) if wants else {}
            kept = self._kept[r]
            stamps = {k: _stamp(v) for k, v in shared.items() if prefixes and k.startswith(prefixes)}
            reuse = sorted(k for k in stamps if k in kept and kept[k][0] is shared[k] and kept[k][1] == stamps[k])
            self._kept[r] = {k: (shared[k], stamps[k]) for k in stamps}
            for k in reuse:
                del shared[k]
            extra = rank_tensors(r) if rank_tensors is not None else {}
            out = {**msg, "reuse": reuse} if reuse else msg
            if extra:
                data = wire.encode(out, {**shared, **extra})
            else:
                key = (wants, tuple(reuse))
                if key not in encoded:
                    encoded[key] = wire.encode(out, shared)
                data = encoded[key]
            self.conns[r].send_bytes(data)
            sent += len(data)
        return sent

    def interrupt(self, job_id: str) -> None:
        self._broadcast({"op": "interrupt", "job": job_id})

    def release(self) -> None:
        """Drop the placed model on every worker (frees device memory)."""
        self._call({"op": "release"}, "released")

    def _call(self, msg, reply_op):
        with self._lock:
            job_id = f"job{next(self._ids)}"
            self._broadcast({**msg, "job": job_id})
            got = 0
            while got < self.world:
                m, _ = self._next(job_id)
                if m["op"] == reply_op:
                    got += 1

    def _next(self, job_id, timeout=0.1):
        """Next message of this job; raises WorkerError on a dead or failing worker."""
        while True:
            try:
                msg, tensors = self._inbox.get(timeout=timeout)
            except queue.Empty:
                self._check_alive()
                return None, None
            if msg["op"] == "eof":
                rank = msg["rank"]
                time.sleep(0.2)  # let the exit status settle
                cause = self._cause(rank)
                log.warning("pipeline worker rank %s %s; its log:\n%s", rank, cause, self._log_tail(rank))
                self._fail(rank, cause)
                raise self._error(rank, cause)
            if msg["op"] == "error":
                rank, cause = msg["rank"], msg["error"]
                log.warning("pipeline worker rank %s failed: %s\n%s", rank, cause, msg.get("traceback", ""))
                dead = self._first_dead(grace=1.0)  # a peer's death surfaces as a comm error here
                if dead is not None and dead != rank:
                    rank, cause = dead, self._cause(dead) + f" (rank {msg['rank']} then saw: {msg['error']})"
                self._fail(rank, cause)
                raise self._error(rank, cause)
            if msg.get("job") == job_id or msg["op"] == "beat":  # a beat: the process lives, whatever job
                return msg, tensors                              # it is finishing (a park after its 'done')

    def run(self, job: dict, tensors: dict | None = None, on_step=None, should_interrupt=None,
            rank_tensors=None) -> dict:
        """Run one job on every rank; stream steps to ``on_step(step, total, latents)``.

        Returns {"latents", "interrupted", "ranks": per-rank done messages, "spans"}.
        Raises ``WorkerError`` (group torn down) if a worker dies or fails.
        """
        if self.state not in ("idle",):
            self.start()
        host = {"run": time.monotonic()}
        with self._lock:
            self.state, self.progress = "running", (0, None)
            job_id = f"job{next(self._ids)}"
            ranks, spans, result, interrupt_sent, raised = {}, [], None, False, None
            watchdog = Watchdog(self.world)
            if self._holds_patches(job):  # every rank has this stage with these patches: no tensors
                rank_tensors = None
            host["sent_bytes"] = self._dispatch({"op": "run", "job": job_id, "job_spec": job}, tensors or {},
                                                rank_tensors)
            host["dispatched"] = time.monotonic()
            while len(ranks) < self.world:
                if not interrupt_sent and (raised is not None or (should_interrupt is not None and should_interrupt())):
                    self.interrupt(job_id)
                    interrupt_sent = True
                    watchdog.interrupted()
                msg, t = self._next(job_id)
                if msg is None:
                    hang = watchdog.check(set(range(self.world)) - set(ranks))
                    if hang is not None:
                        self._hang(*hang)
                    continue
                if msg["op"] == "beat":
                    watchdog.beat(msg["rank"], msg["activity"])
                    continue
                if msg["op"] == "step":
                    watchdog.step()
                    host.setdefault("first_step", time.monotonic())
                    host["last_step"] = time.monotonic()
                    self.progress = (msg["step"] + 1, msg["total"])
                if msg["op"] == "step" and on_step is not None and raised is None:
                    try:
                        on_step(msg["step"], msg["total"], _latents(t))
                    except BaseException as e:  # e.g. ComfyUI's interrupt from its progress bar:
                        raised = e              # stop the workers cleanly, then re-raise
                    continue
                elif msg["op"] == "timings":
                    spans.extend(msg["spans"])
                elif msg["op"] == "done":
                    ranks[msg["rank"]] = msg
                    spans.extend(msg.pop("spans"))
                    if any(k == "latents" or k.startswith("latents#") for k in t):
                        result = _latents(t)
            self.state = "idle"
            host["done"] = time.monotonic()
            self.held = [ranks[r].get("held") or {} for r in range(self.world)]
        self.last_run = {"ranks": [ranks[r] for r in range(self.world)], "spans": spans, "host_phases": host,
                         "layout": job.get("layout"), "layout_reason": job.get("layout_reason"),
                         "split": job.get("split"), "family": job.get("family"),
                         "model": job.get("model"), "split_inputs": job.get("split_inputs"),
                         "finished": time.time()}
        if raised is not None:
            raise raised
        return {"latents": result, "interrupted": any(r["interrupted"] for r in ranks.values()),
                "layout": job.get("layout"), "layout_reason": job.get("layout_reason"),
                "ranks": [ranks[r] for r in range(self.world)], "spans": spans, "host_phases": host}

    def device_memory(self, caps: list[int] | None = None) -> list[int] | None:
        """Bytes each rank may use for its stage: its memory cap where one is set, else (a GPU)
        its device's free memory plus what the worker itself holds, at the worker's last
        report (so the ComfyUI process's own models and other programs on that GPU count).
        None when a rank has neither (CPU workers without a cap)."""
        out = []
        for r in range(self.world):
            cap = (caps or [0] * self.world)[r]
            if cap:
                out.append(int(cap))
                continue
            last = ((getattr(self, "last_run", None) or {}).get("ranks") or [None] * self.world)[r] or {}
            mem = last.get("mem") or ((self.info[r] if r < len(self.info) else None) or {}).get("mem") or {}
            if mem.get("kind") == "cuda":
                out.append(int(mem["total"] - mem["used"] + mem.get("reserved", 0)))
            else:
                return None
        return out

    def _holds_patches(self, job: dict) -> bool:
        """Every rank already holds this job's stage with the job's weight patches."""
        pid = job.get("patches_id")
        if not pid or len(self.held) != self.world:
            return False
        from .placement import placement_key
        key = placement_key(job)
        return all(h.get(key) == pid for h in self.held)


def _stamp(t):
    """What tells that a tensor kept by identity was not changed in place: its version
    counter, or, for an inference tensor (ComfyUI runs its nodes in inference mode, where
    tensors have none), the sum of its elements."""
    try:
        return ("version", t._version)
    except RuntimeError:
        return ("sum", torch.sum(t.detach(), dtype=torch.float64).item() if t.is_floating_point()
                else int(t.detach().to(torch.int64).sum()))


def _latents(tensors: dict):
    """A message's latents: the tensor, or the list of its parts when the worker sent a
    nested latent (``latents#0``, ``latents#1``: LTX-2's, MiniMax-H3's video + audio); None."""
    if "latents" in tensors:
        return tensors["latents"]
    parts = sorted((int(k.rpartition("#")[2]), v) for k, v in tensors.items() if k.startswith("latents#"))
    return [v for _, v in parts] or None
