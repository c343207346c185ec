"""The worker group on a Ray cluster: one actor per device, same semantics as local.

Ray does placement and lifecycle, torch.distributed the data plane; nothing here manages
machines.  ``RayWorkerGroup`` is a ``WorkerGroup`` whose backend hooks launch, watch and
tear down Ray actors; the job loop, streaming, interrupt, status and failure handling are
``WorkerGroup``'s own, and every actor runs the ordinary ``worker.Worker`` loop
(``ray_actor.py``).

* Connect: ``ray_address`` 'auto' (the cluster this machine is a node of), 'ray://host:10001'
  (Ray Client, needs ``ray[client]``), 'host:6379'; '' uses ``RAY_ADDRESS`` if set, else
  (like 'local') starts a private Ray instance on this machine (no dashboard).  A
  process that is already connected (``ray.init`` done) keeps its connection.
* Place: a placement group of one bundle per rank, ``{"GPU": 1, "CPU": c}`` on GPUs or
  ``{"CPU": c}`` on CPUs (c = ``cpus_per_actor``, default 1, env ``PP_RAY_CPUS_PER_ACTOR``),
  strategy ``pack`` (default), ``spread``, ``strict_pack`` or ``strict_spread`` (env
  ``PP_RAY_PLACEMENT``).  Ranks are numbered node by node, so pipeline neighbours share a
  machine where the placement allows.
* Topology: torch.distributed over TCP, master = rank 0's node address
  (``ray.util.get_node_ip_address()``) and a free port there (in ``PP_RAY_PORT_RANGE``,
  e.g. '29500-29509', if set); NCCL on GPU actors, gloo on CPU actors.  gloo binds to the
  interface that holds the node's Ray address unless ``GLOO_SOCKET_IFNAME`` is set;
  ``GLOO_*``/``NCCL_*`` set in this process are passed to the actors, nothing is pinned
  to loopback.
* Watch: each rank's outbox is long-polled (``take``); a dead actor fails that call at
  once (reported as ``rank N on node <ip>`` with Ray's cause), an actor that does not
  answer for ``heartbeat_timeout`` s (env ``PP_RAY_HEARTBEAT_S``, default 60) is
  declared lost; one whose heartbeats stop (``PP_SILENT_S``) while its node runs no task
  either is on an unreachable node (a cut link).  Then every actor is killed and the
  placement group removed; the next job starts a fresh group once Ray counts the removed
  group's resources free again (at most 5 s: Ray returns them node by node, and a group
  placed before would be placed around them) and has declared an unreachable node lost (at
  most 120 s: Ray counts it alive for about a minute more and would place a stage there).

Devices: 'cpu,cpu' / 'cpu x 4' (CPU actors), 'cuda x 4' / 'cuda,cuda' (GPU actors; Ray
picks the GPUs, so 'cuda:N' is refused), 'auto' (every GPU of the cluster).
"""
from __future__ import annotations

import collections
import importlib.util
import itertools
import json
import math
import os
import queue
import re
import threading
import time

from . import wire
from .environment import ENV_FLAGS, comfy_flags
from .group import PACKAGE_PARENT, WorkerGroup, log

RAY_INSTALL_HINT = 'backend \'ray\' needs Ray: pip install "ray[default]>=2.9"'
PLACEMENTS = ("pack", "spread", "strict_pack", "strict_spread")
PASS_ENV_PREFIXES = ("GLOO_", "NCCL_")  # the user's data-plane settings travel to the actors


class RayUnavailable(RuntimeError):
    pass


# Resources this process's groups gave back (placement groups removed) that Ray may not count
# as free yet: Ray returns them node by node, asynchronously (measured: 0, then 2, then 4 of 4
# CPUs over ~250 ms).  A placement group made meanwhile is placed around them -- SPREAD puts
# every bundle on the node that came back first -- so the next group waits for them (bounded).
_RETURNING: dict = {"want": {}, "until": 0.0}
RETURN_WAIT_S = 5.0


def _note_returning(ray, bundles: list[dict]) -> None:
    try:
        avail = ray.available_resources()
    except Exception:
        return
    want = _RETURNING["want"] if time.monotonic() < _RETURNING["until"] else {}
    for b in bundles:
        for res, amount in b.items():
            want[res] = max(want.get(res, 0.0), avail.get(res, 0.0)) + amount
    _RETURNING.update(want=want, until=time.monotonic() + RETURN_WAIT_S)


def _await_returned(ray) -> None:
    """Until the resources noted by ``_note_returning`` are free again in Ray's view (or the
    cluster no longer has them: a lost node), at most ``RETURN_WAIT_S``."""
    want = _RETURNING["want"]
    while want and time.monotonic() < _RETURNING["until"]:
        avail, total = ray.available_resources(), ray.cluster_resources()
        if all(avail.get(r, 0.0) + 1e-9 >= min(w, total.get(r, 0.0)) for r, w in want.items()):
            break
        time.sleep(0.02)
    _RETURNING.update(want={}, until=0.0)


# Nodes where a rank stopped answering and whose node did not run a task either (a cut link, a
# hung host): Ray keeps such a node alive in its view until its health checks give up (measured:
# ~65 s after the cut), and places stages there meanwhile -- the next group would never start.
_SUSPECT: dict = {}  # node id -> address
SUSPECT_WAIT_S = 120.0
_PROBE = None


def _probe(ray, node_id: str):
    """A task that must run on ``node_id`` (no CPU asked): it finishes only if the node answers."""
    global _PROBE
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    if _PROBE is None:
        _PROBE = ray.remote(num_cpus=0, max_retries=0)(lambda: True)
    return _PROBE.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote()


def _node_alive(ray, node_id: str) -> bool:
    try:
        return any(n["NodeID"] == node_id and n.get("Alive") for n in ray.nodes())
    except Exception:
        return False


def _node_answers(ray, node_id: str, timeout: float) -> bool:
    ref = _probe(ray, node_id)
    ready, _ = ray.wait([ref], timeout=timeout)
    if not ready:
        try:
            ray.cancel(ref, force=True)
        except Exception:
            pass
    return bool(ready)


def _await_suspects(ray) -> None:
    """Until Ray declares each suspect node dead, or it answers again (at most ``SUSPECT_WAIT_S``)."""
    deadline = time.monotonic() + SUSPECT_WAIT_S
    while _SUSPECT:
        node_id, address = _SUSPECT.popitem()
        if not _node_alive(ray, node_id):
            continue
        log.warning("node %s stopped answering; waiting until Ray declares it lost (its health checks take "
                    "about a minute) or it answers again, at most %.0f s, so no stage is placed there",
                    address, max(0.0, deadline - time.monotonic()))
        ref = _probe(ray, node_id)
        while time.monotonic() < deadline and _node_alive(ray, node_id):
            if ray.wait([ref], timeout=0.5)[0]:
                break
        else:
            try:
                ray.cancel(ref, force=True)
            except Exception:
                pass


def ray_available() -> bool:
    return importlib.util.find_spec("ray") is not None


def require_ray():
    try:
        import ray
    except ImportError:
        raise RayUnavailable(RAY_INSTALL_HINT) from None
    return ray


def normalize_address(address) -> str:
    return (address or "").strip()


_COUNT = re.compile(r"^(?:(cpu|cuda|gpu)\s*[x×*]\s*(\d+)|(\d+)\s*[x×*]\s*(cpu|cuda|gpu))$")


def parse_ray_devices(devices) -> tuple[str, int | None]:
    """Device spec for the Ray backend -> (kind 'cpu'|'cuda', count; None = every GPU)."""
    if isinstance(devices, (list, tuple)):
        items = [str(d).strip().lower() for d in devices if str(d).strip()]
    else:
        text = str(devices or "").strip().lower()
        if text in ("", "auto"):
            return ("cuda", None)
        m = _COUNT.match(text)
        if m:
            kind, n = (m.group(1) or m.group(4)), int(m.group(2) or m.group(3))
            if n < 1:
                raise ValueError(f"devices '{devices}' asks for no device")
            return ("cpu" if kind == "cpu" else "cuda", n)
        items = [d.strip() for d in text.split(",") if d.strip()]
    kinds = []
    for d in items:
        if d == "cpu":
            kinds.append("cpu")
        elif d in ("cuda", "gpu"):
            kinds.append("cuda")
        elif re.fullmatch(r"cuda:\d+", d):
            raise ValueError(f"device '{d}': with backend 'ray' GPUs are counted, not named (Ray assigns them): "
                             f"use e.g. 'cuda x {max(2, len(items))}', or 'auto' for every GPU of the cluster")
        else:
            raise ValueError(f"device '{d}' is not understood; with backend 'ray' use 'cpu,cpu', 'cpu x 4', "
                             f"'cuda x 4' or 'auto'")
    if not kinds:
        raise ValueError("no devices given")
    if len(set(kinds)) > 1:
        raise ValueError(f"devices {items} mix cpu and cuda; use one kind")
    return (kinds[0], len(kinds))


def parse_port_range(text) -> tuple[int, int]:
    """'29500-29509' or '29500' -> (lo, hi); '' -> (0, 0): any free port."""
    text = (text or "").strip()
    if not text:
        return (0, 0)
    m = re.fullmatch(r"(\d+)\s*(?:-\s*(\d+))?", text)
    if not m:
        raise ValueError(f"PP_RAY_PORT_RANGE '{text}' is not a port or a range like '29500-29509'")
    lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
    if not 0 < lo <= hi < 65536:
        raise ValueError(f"PP_RAY_PORT_RANGE '{text}' is not a valid port range")
    return (lo, hi)


def describe_death(err) -> str:
    """Ray's (long) actor-death message -> one line with the cause."""
    text = " ".join(str(err).split())
    kind = re.search(r"Worker exit type: (\w+)", text)
    detail = re.search(r"Worker exit detail: (.*?\.)(?: |$)", text)
    if kind or detail:
        why = ": ".join(m.group(1) for m in (kind, detail) if m)
        return (f"its Ray actor died ({why}); killed (signal, OOM killer) or crashed: see the node's Ray logs, "
                f"/tmp/ray/session_latest/logs")
    picks = [s for s in re.split(r"(?<=\.) ", text) if re.search(r"(?i)exit|killed|signal|memory|died|lost", s)]
    return f"its Ray actor died: {' '.join(picks[:2]) or text}"[:600]


def _op(frame: bytes) -> str | None:
    try:
        return wire.peek(frame).get("op")
    except Exception:
        return None


class _HostChannel:
    """The host's end of a rank's control channel: ``send_bytes`` -> ``actor.deliver``,
    ``recv_bytes`` <- long-polled ``actor.take`` (also the liveness probe)."""

    def __init__(self, ray, actor, heartbeat_timeout: float):
        self._ray, self._actor, self._heartbeat = ray, actor, heartbeat_timeout
        self._seq = itertools.count()
        self._buf: collections.deque = collections.deque()
        self.cause: str | None = None
        self.dead = False
        self.reported_error = False  # the worker sent an error report (its exit is expected)
        self.closed = False

    def send_bytes(self, data: bytes) -> None:
        if self.dead or self.closed:
            raise OSError("the worker's actor is gone")
        self._actor.deliver.remote(next(self._seq), data)

    def recv_bytes(self) -> bytes:
        from ray.exceptions import GetTimeoutError, RayActorError
        while not self._buf:
            if self.closed:
                raise EOFError("channel closed")
            try:
                items = self._ray.get(self._actor.take.remote(1.0), timeout=self._heartbeat)
            except GetTimeoutError:
                self.cause = (f"its Ray actor did not answer for {self._heartbeat:.0f} s (node lost, or the "
                              f"process hung)")
            except RayActorError as e:
                self.cause = describe_death(e)
            except Exception as e:  # Ray itself went away
                self.cause = f"lost contact with its Ray actor: {type(e).__name__}: {e}"
            else:
                for it in items:
                    if _op(it) == "error":
                        self.reported_error = True
                self._buf.extend(items)
                continue
            self.dead = True
            raise EOFError(self.cause)
        return self._buf.popleft()

    def close(self) -> None:
        self.closed = True


_ACTOR_CLASS = None


def _actor_class(ray):
    """The Ray actor class, shipped by value: the pack may be imported under any module name
    (ComfyUI loads it by path); the actor imports ``pp_runtime`` from the paths it is given."""
    global _ACTOR_CLASS
    if _ACTOR_CLASS is None:
        from . import ray_actor
        ray.cloudpickle.register_pickle_by_value(ray_actor)
        _ACTOR_CLASS = ray.remote(ray_actor.PPWorkerActor)
    return _ACTOR_CLASS


class RayWorkerGroup(WorkerGroup):
    backend = "ray"

    def __init__(self, devices="auto", ray_address: str = "", placement: str | None = None,
                 cpus_per_actor: float | None = None, startup_timeout: float = 180.0, extra_paths=(),
                 cpu_threads: int | None = None, heartbeat_timeout: float | None = None,
                 port_range: str | None = None, dist_timeout: float = 600.0):
        require_ray()
        self.spec = parse_ray_devices(devices)
        self.ray_address = normalize_address(ray_address)
        self.placement = (placement or os.environ.get("PP_RAY_PLACEMENT") or "pack").strip().lower()
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement '{self.placement}' is unknown; use one of {', '.join(PLACEMENTS)}")
        self.cpus_per_actor = float(cpus_per_actor if cpus_per_actor is not None
                                    else os.environ.get("PP_RAY_CPUS_PER_ACTOR", 1))
        self.heartbeat_timeout = float(heartbeat_timeout if heartbeat_timeout is not None
                                       else os.environ.get("PP_RAY_HEARTBEAT_S", 60))
        self.port_range = parse_port_range(port_range if port_range is not None
                                           else os.environ.get("PP_RAY_PORT_RANGE", ""))
        self.dist_timeout = dist_timeout
        self.actors: list = []
        self.pg = None
        self.rendezvous: str | None = None
        if self.spec[1] is None:  # 'auto': every GPU of the cluster
            ray = self._connect(None)
            n = int(ray.cluster_resources().get("GPU", 0))
            if n < 1:
                raise ValueError(f"devices 'auto' found no GPU in the Ray cluster ({self._where_text()}); "
                                 f"name a count, e.g. 'cpu x 2' to try it on CPUs")
            self.spec = ("cuda", n)
        super().__init__(devices, startup_timeout=startup_timeout, extra_paths=extra_paths, cpu_threads=cpu_threads)

    def parse(self, devices) -> list[str]:
        kind, n = self.spec
        return [kind] * n

    # -- Ray connection ----------------------------------------------------------------
    def _where_text(self) -> str:
        return f"address '{self.ray_address}'" if self.ray_address else "a local Ray instance"

    def _connect(self, world: int | None):
        ray = require_ray()
        if ray.is_initialized():
            return ray
        address = self.ray_address or os.environ.get("RAY_ADDRESS", "")
        try:
            if address in ("", "local"):  # a private instance on this machine
                need = math.ceil((world or 1) * self.cpus_per_actor)
                ray.init(num_cpus=max(os.cpu_count() or 1, need), include_dashboard=False, ignore_reinit_error=True)
            else:
                ray.init(address=address, ignore_reinit_error=True)
        except Exception as e:
            hint = (' (a "ray://" address needs Ray Client: pip install "ray[client]")'
                    if address.startswith("ray://") else "")
            raise RuntimeError(f"cannot connect to the Ray cluster at '{address or 'local'}': "
                               f"{type(e).__name__}: {e}{hint}") from None
        return ray

    def _actor_env(self) -> dict:
        env = {"PYTHONUNBUFFERED": "1",
               # Not ComfyUI's cudaMallocAsync: the caching allocator, growing segments in place.
               "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
               "NCCL_NVLS_ENABLE": "0", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
        env.update({k: v for k, v in os.environ.items() if k.startswith(PASS_ENV_PREFIXES)})
        env[ENV_FLAGS] = json.dumps(comfy_flags())  # ComfyUI's flags, as for local workers
        if self.spec[0] == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
            env["OMP_NUM_THREADS"] = str(self.cpu_threads or max(1, int(self.cpus_per_actor)))
        return env

    # -- backend hooks -------------------------------------------------------------------
    def _launch(self) -> None:
        ray = self._connect(self.world)
        from ray.exceptions import GetTimeoutError
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        kind = self.spec[0]
        bundle = {"CPU": self.cpus_per_actor, **({"GPU": 1} if kind == "cuda" else {})}
        total = ray.cluster_resources()
        for res, amount in bundle.items():
            if total.get(res, 0) + 1e-9 < amount * self.world:
                raise RuntimeError(f"the Ray cluster ({self._where_text()}) has {total.get(res, 0):g} {res}; "
                                   f"{self.world} ranks of {bundle} need {amount * self.world:g}")
        self.info, self.conns = [None] * self.world, [None] * self.world
        _await_suspects(ray)
        _await_returned(ray)
        self.pg = placement_group([dict(bundle) for _ in range(self.world)], strategy=self.placement.upper())
        try:
            ray.get(self.pg.ready(), timeout=self.startup_timeout)
        except GetTimeoutError:
            raise RuntimeError(f"Ray could not place {self.world} bundles of {bundle} ({self.placement}) within "
                               f"{self.startup_timeout:.0f} s; free now: {ray.available_resources()}") from None
        order = self._bundle_order(ray)
        actor_cls = _actor_class(ray)
        env, paths = self._actor_env(), [*self.extra_paths, PACKAGE_PARENT]  # ComfyUI first, as local workers
        self.actors = [
            actor_cls.options(
                num_cpus=self.cpus_per_actor, num_gpus=1 if kind == "cuda" else 0, max_concurrency=8,
                max_restarts=0, runtime_env={"env_vars": env},
                scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=self.pg,
                                                                     placement_group_bundle_index=b),
            ).remote(rank, self.world, kind, paths, self.cpu_threads)
            for rank, b in enumerate(order)]
        deadline = time.monotonic() + self.startup_timeout
        for rank, ref in enumerate([a.where.remote() for a in self.actors]):  # also: the actors are up
            self.info[rank] = self._get(ray, rank, ref, deadline, "did not start")
        try:  # the cluster's own address of each node (the actor's guess may be another interface)
            addresses = {n["NodeID"]: n.get("NodeManagerAddress") for n in ray.nodes()}
        except Exception:
            addresses = {}
        for info in self.info:
            info["node"] = addresses.get(info["node_id"]) or info["node"]
        lo, hi = self.port_range
        port = self._get(ray, 0, self.actors[0].free_port.remote(lo, hi), deadline, "found no rendezvous port")
        host = self.info[0]["node"]
        self.rendezvous = f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"
        self.conns = [_HostChannel(ray, a, self.heartbeat_timeout) for a in self.actors]
        for rank, conn in enumerate(self.conns):
            threading.Thread(target=self._read, args=(rank, conn, self._inbox), name=f"pp-ray-read{rank}",
                             daemon=True).start()
        for rank, a in enumerate(self.actors):
            self._get(ray, rank, a.start.remote(self.rendezvous, self.dist_timeout, self.info[rank]["node"]),
                      deadline, "did not start")
        pending = set(range(self.world))
        while pending:
            if time.monotonic() > deadline:
                raise self._error(min(pending), f"did not join the group within {self.startup_timeout:.0f} s "
                                                f"(rendezvous {self.rendezvous})")
            try:
                msg, _ = self._inbox.get(timeout=0.1)
            except queue.Empty:
                continue
            rank = msg.get("rank")
            if msg["op"] == "ready":
                self.info[rank] = {**self.info[rank], **msg}
                pending.discard(rank)
            elif msg["op"] == "eof":
                raise self._error(rank, self._cause(rank))
            elif msg["op"] == "error":
                raise self._error(rank, msg["error"] + "\n" + msg.get("traceback", ""))

    def _get(self, ray, rank, ref, deadline, what):
        from ray.exceptions import GetTimeoutError, RayActorError
        try:
            return ray.get(ref, timeout=max(1.0, deadline - time.monotonic()))
        except GetTimeoutError:
            raise self._error(rank, f"{what} within {self.startup_timeout:.0f} s") from None
        except RayActorError as e:
            raise self._error(rank, describe_death(e)) from None

    def _bundle_order(self, ray) -> list[int]:
        """Bundle indices in rank order: node by node (first node first), so that pipeline
        neighbours (consecutive ranks) share a machine where the placement allows."""
        try:
            b2n = ray.util.placement_group_table(self.pg).get("bundles_to_node_id", {}) or {}
        except Exception:
            b2n = {}
        first: dict = {}
        for i in range(self.world):
            first.setdefault(b2n.get(i), i)
        return sorted(range(self.world), key=lambda i: (first[b2n.get(i)], i))

    def _node(self, rank: int) -> str | None:
        info = self.info[rank] if rank < len(self.info) else None
        return (info or {}).get("node")

    def _cause(self, rank: int) -> str:
        conn = self.conns[rank] if rank < len(self.conns) else None
        return (conn.cause if conn is not None else None) or "its Ray actor is gone"

    def _check_alive(self, starting=False):
        for rank, c in enumerate(self.conns):
            if c is not None and c.dead and not c.reported_error:  # a reported error is in the inbox
                cause = self._cause(rank)
                self._fail(rank, cause)
                raise self._error(rank, cause)

    def _hang(self, rank: int, cause: str):
        """A rank without heartbeats: its process stopped, or its whole node unreachable."""
        info = self.info[rank] if rank < len(self.info) else None
        if info and info.get("node_id"):
            try:
                import ray
                if not _node_answers(ray, info["node_id"], 5.0):
                    _SUSPECT[info["node_id"]] = info.get("node")
                    cause += f"; its node {info.get('node')} does not run a task either: unreachable or down"
            except Exception:
                pass
        super()._hang(rank, cause)

    def _first_dead(self, grace: float = 0.0, probe_s: float = 3.0):
        """The first rank whose actor is gone.  A rank that reports a broken connection may
        see a lost node before Ray does (Ray notices a dead node only after its health
        checks): so, if no actor is known dead within ``grace``, every actor is asked where
        it runs, and one that does not answer within ``probe_s`` is the lost one."""
        deadline = time.monotonic() + grace
        while True:
            for rank, c in enumerate(self.conns):
                if c is not None and c.dead and not c.reported_error:
                    return rank
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        try:
            import ray
            from ray.exceptions import GetTimeoutError, RayActorError
        except ImportError:
            return None
        refs = [a.where.remote() for a in self.actors]
        end = time.monotonic() + probe_s
        for rank, ref in enumerate(refs):
            conn = self.conns[rank] if rank < len(self.conns) else None
            if conn is None or conn.reported_error:
                continue
            try:
                ray.get(ref, timeout=max(0.1, end - time.monotonic()))
            except GetTimeoutError:
                conn.cause = (f"its Ray actor did not answer within {probe_s:g} s after a peer lost its "
                              f"connection to it (its node is down or unreachable, or its Ray processes were "
                              f"killed)")
                node_id = (self.info[rank] or {}).get("node_id") if rank < len(self.info) else None
                if node_id:
                    _SUSPECT[node_id] = self._node(rank)
            except RayActorError as e:
                conn.cause = describe_death(e)
            except Exception as e:
                conn.cause = f"lost contact with its Ray actor: {type(e).__name__}: {e}"
            else:
                continue
            conn.dead = True
            return rank
        return None

    def _kill(self):
        for c in self.conns:
            if c is not None:
                c.close()
        try:
            import ray
            if not ray.is_initialized():
                return
            for a in self.actors:
                try:
                    ray.kill(a, no_restart=True)
                except Exception:
                    pass
            if self.pg is not None:
                from ray.util.placement_group import remove_placement_group
                _note_returning(ray, self.pg.bundle_specs)
                try:
                    remove_placement_group(self.pg)
                except Exception:
                    pass
        finally:
            self.actors, self.pg = [], None

    def _wait_exit(self, timeout: float) -> None:
        try:
            import ray
            ray.get([a.join.remote(timeout) for a in self.actors], timeout=timeout + 2)
        except Exception:
            pass

    def _started(self) -> bool:
        return bool(self.actors)

    @property
    def alive(self) -> bool:
        return (self.state in ("idle", "running") and bool(self.actors)
                and all(c is not None and not c.dead for c in self.conns))

    @property
    def pids(self) -> list[int]:
        return [(i or {}).get("pid") for i in self.info]

    @property
    def nodes(self) -> list[str | None]:
        return [self._node(r) for r in range(len(self.info))]

    def status(self) -> dict:
        st = super().status()
        st.update(ray_address=self.ray_address or "local", placement=self.placement,
                  rendezvous=self.rendezvous if self.alive else None)
        return st
