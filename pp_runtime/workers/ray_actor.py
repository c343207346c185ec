"""The Ray actor that hosts one pipeline worker (runs on a cluster node).

Imported by the host only to declare the actor class, and by Ray's worker processes to run
it; module-level imports are stdlib only.  The actor runs the ordinary
``worker.Worker`` loop in a thread, over ``ActorChannel``: a transport made of
Ray actor methods, so the control plane is Ray's own (authenticated by the cluster, no
extra listener):

* host -> worker: the host calls ``deliver(seq, frame)``; frames are handed to the worker
  in ``seq`` order (a threaded actor does not promise to run calls in submission order);
* worker -> host: frames wait in an outbox that the host long-polls with ``take()``; the
  same call is the host's liveness probe (a dead actor fails it at once, a lost node when
  it stops answering).

Frames are the same JSON + safetensors bytes as on the local backend's connection.
"""
from __future__ import annotations

import collections
import os
import socket
import sys
import threading
import time
import traceback


class ActorChannel:
    """``send_bytes``/``recv_bytes``/``close``/``flush`` over the actor's methods."""

    def __init__(self):
        self._in: dict[int, bytes] = {}
        self._next_in = 0
        self._in_cv = threading.Condition()
        self._out: collections.deque = collections.deque()
        self._out_cv = threading.Condition()
        self._takes = 0  # take() calls entered: a new one proves the host got the last batch
        self.closed = False

    # host side of the actor (its methods)
    def deliver(self, seq: int, data: bytes) -> None:
        with self._in_cv:
            self._in[seq] = data
            self._in_cv.notify_all()

    def take(self, timeout: float) -> list[bytes]:
        with self._out_cv:
            self._takes += 1
            self._out_cv.notify_all()
            if not self._out:
                self._out_cv.wait(timeout)
            items = list(self._out)
            self._out.clear()
            return items

    # the worker's side (the transport)
    def recv_bytes(self) -> bytes:
        with self._in_cv:
            while self._next_in not in self._in:
                if self.closed:
                    raise EOFError("control channel closed")
                self._in_cv.wait(1.0)
            self._next_in += 1
            return self._in.pop(self._next_in - 1)

    def send_bytes(self, data) -> None:
        with self._out_cv:
            self._out.append(bytes(data))
            self._out_cv.notify_all()

    def flush(self, timeout: float) -> bool:
        """Wait until the host has received everything sent so far (before the process exits)."""
        deadline = time.monotonic() + timeout
        with self._out_cv:
            while self._out and time.monotonic() < deadline:
                self._out_cv.wait(0.05)
            mark = self._takes
            while self._takes == mark and time.monotonic() < deadline:  # the reply of that take is through
                self._out_cv.wait(0.05)
            return not self._out

    def close(self) -> None:
        self.closed = True
        with self._in_cv:
            self._in_cv.notify_all()


def interface_for_ip(ip: str) -> str | None:
    """The network interface that holds ``ip`` (Linux), e.g. 'eth0', 'lo'."""
    try:
        import fcntl
        import struct
    except ImportError:
        return None
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for _, name in socket.if_nameindex():
            try:
                res = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
            except OSError:
                continue
            if socket.inet_ntoa(res[20:24]) == ip:
                return name
    except OSError:
        return None
    finally:
        s.close()
    return None


class PPWorkerActor:
    """One rank.  Created by ``RayWorkerGroup`` in its placement group bundle."""

    def __init__(self, rank: int, world: int, device: str, paths: list, cpu_threads: int | None):
        for p in reversed(paths):
            if p not in sys.path:
                sys.path.insert(0, p)
        self.rank, self.world, self.device_kind, self.cpu_threads = rank, world, device, cpu_threads
        self.channel = ActorChannel()
        self.thread: threading.Thread | None = None

    def where(self) -> dict:
        import ray
        ctx = ray.get_runtime_context()
        return {"node": ray.util.get_node_ip_address(), "node_id": ctx.get_node_id(), "pid": os.getpid(),
                "host": socket.gethostname(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}

    def free_port(self, lo: int = 0, hi: int = 0) -> int:
        """A free TCP port on this node for the torch.distributed rendezvous (in [lo, hi] if given)."""
        for port in (range(lo, hi + 1) if lo else [0]):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind(("", port))
                except OSError:
                    continue
                return s.getsockname()[1]
        raise RuntimeError(f"no free port in {lo}-{hi} on this node (PP_RAY_PORT_RANGE)")

    def start(self, init_method: str, timeout: float, node: str) -> bool:
        """Join torch.distributed and serve jobs, in a thread (this call returns at once).
        ``node``: this node's address in the Ray cluster."""
        self.thread = threading.Thread(target=self._main, args=(init_method, timeout, node), name="pp-worker",
                                       daemon=True)
        self.thread.start()
        return True

    def _main(self, init_method: str, timeout: float, node: str) -> None:
        from pp_runtime.workers import wire
        try:
            import torch
            from pp_runtime.workers.worker import Worker, join_group
            if self.cpu_threads:
                torch.set_num_threads(self.cpu_threads)
            if not os.environ.get("GLOO_SOCKET_IFNAME"):  # not configured: the interface of Ray's node address
                ifname = interface_for_ip(node)
                if ifname:
                    os.environ["GLOO_SOCKET_IFNAME"] = ifname
            device = torch.device("cuda:0" if self.device_kind == "cuda" else "cpu")  # Ray set the visible GPU
            ready = join_group(self.rank, self.world, device, init_method, timeout)
            ready.update(node=node, gloo_ifname=os.environ.get("GLOO_SOCKET_IFNAME"))
            worker = Worker(self.rank, self.world, device, self.channel)
            self.channel.send_bytes(wire.encode(ready))
        except BaseException as e:  # could not join: report, then leave (the host tears the group down)
            self.channel.send_bytes(wire.encode({"op": "error", "rank": self.rank, "job": None,
                                                 "error": f"{type(e).__name__}: {e}",
                                                 "traceback": traceback.format_exc()}))
            self.channel.flush(5.0)
            os._exit(1)
        try:
            worker.serve()
        finally:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()

    def deliver(self, seq: int, data: bytes) -> None:
        self.channel.deliver(seq, data)

    def take(self, timeout: float = 1.0) -> list:
        return self.channel.take(timeout)

    def join(self, timeout: float) -> bool:
        """Wait for the worker loop to end (after 'shutdown'); True if it did."""
        if self.thread is not None:
            self.thread.join(timeout)
        return self.thread is None or not self.thread.is_alive()

    def ping(self) -> int:
        return os.getpid()
