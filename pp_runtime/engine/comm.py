"""Tensor-dict point-to-point communication between pipeline stages.

A message is a dict of tensors.  Its *schema* (keys, dtypes, shapes) is sent once per
peer and shape as a small JSON byte string and given an id; after that every message
carries only a fixed three-int header (kind, schema id, schema length) and the raw
tensors, received into reused buffers.  Headers travel on their own CPU (gloo) group,
so a receiver can post header receives ahead and read them without a device sync;
schemas on a second CPU group; data on the data group (NCCL on GPUs, gloo on CPU).
Only fixed-size headers are ever received ahead: schema and data receives are posted
in message order when a receive is resolved.  JSON, not pickle: nothing received is ever unpickled.

Every receive is lazy: ``irecv_tensor_dict`` posts the header receive and returns an
``AsyncIntermediateTensors`` that waits when first read.  ``AsyncLatents`` wraps one of
those as a tensor that waits on first use (attribute access or any torch op).

A header of kind STOP instead of DATA ends a run early (interrupt): the receiver raises
``PipelineStopped`` where it would have used the data, so every rank leaves its loop at
the same place in the sequence of communication calls.
"""
from __future__ import annotations

import json
import time
from collections import defaultdict, deque

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_map

KIND_DATA, KIND_STOP = 1, 2
# Receive buffers per (peer, schema).  A received dict stays valid until two more messages
# of the same schema have arrived from that peer: the loop uses each one within its step.
_RING = 2


class PipelineStopped(Exception):
    """The peer sent STOP where data was expected: the run was ended early."""


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


def _schema_of(tensors: dict, device_type: str) -> tuple:
    """(key, dtype, shape, where) per tensor; where is "h" for a host (CPU) tensor in a dict
    sent between devices of another type (small ints such as sizes: NCCL cannot carry
    them, and the receiver reads them on the host), else "d"."""
    host = lambda t: t.device.type == "cpu" and device_type != "cpu"  # noqa: E731
    return tuple((k, str(t.dtype), tuple(t.shape), "h" if host(t) else "d") for k, t in tensors.items())


class TensorDictP2P:
    """This process's ends of every point-to-point channel, with their caches.

    ``device`` is where received tensors live; ``data_group`` carries tensors,
    ``header_group`` and ``schema_group`` (both CPU/gloo, distinct) carry headers and
    schemas.  Ranks are global ranks.
    """

    def __init__(self, device, data_group, header_group, schema_group):
        self.device = torch.device(device)
        self.data_group = data_group
        self.header_group = header_group
        self.schema_group = schema_group
        self._sent_schemas: dict[int, dict[tuple, int]] = defaultdict(dict)
        self._recv_schemas: dict[int, dict[int, list]] = defaultdict(dict)
        self._buffers: dict[tuple, list] = {}
        self._ring_pos: dict[tuple, int] = defaultdict(int)
        self._pending_sends: list = []  # (work, tensor) pairs kept alive until flushed
        self._unresolved: dict[int, deque] = defaultdict(deque)
        self.schemas_sent = 0  # for tests: how often a schema actually went over the wire
        self.wait_seconds = 0.0
        self.watch = None  # watch(peer) before a blocking receive, watch(None) after (the worker's activity)

    # -- send ------------------------------------------------------------------------
    def isend_tensor_dict(self, tensors: dict[str, torch.Tensor], dst: int) -> None:
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        sig = _schema_of(tensors, self.device.type)
        known = self._sent_schemas[dst]
        payload = None
        if sig not in known:
            known[sig] = len(known) + 1
            payload = torch.frombuffer(bytearray(json.dumps(sig).encode()), dtype=torch.uint8)
            self.schemas_sent += 1
        header = torch.tensor([KIND_DATA, known[sig], 0 if payload is None else payload.numel()],
                              dtype=torch.int64)
        self._post(header, dst, self.header_group)
        if payload is not None:
            self._post(payload, dst, self.schema_group)
        for (_, _, _, where), t in zip(sig, tensors.values()):
            # host tensors go in order on the (CPU) schema group, right after the schema
            self._post(t, dst, self.schema_group if where == "h" else self.data_group)

    def isend_stop(self, dst: int) -> None:
        self._post(torch.tensor([KIND_STOP, 0, 0], dtype=torch.int64), dst, self.header_group)

    def _post(self, tensor, dst, group):
        self._pending_sends.append((dist.isend(tensor, dst, group=group), tensor))
        if len(self._pending_sends) > 64:  # keep the list short without blocking
            self._pending_sends = [(w, t) for w, t in self._pending_sends if not w.is_completed()]

    def _wait_sends_reading(self, tensors) -> None:
        """A stage often passes received tensors on unchanged (``vec``, ``pe`` ...), so a
        send may still be reading a receive buffer that is about to be reused: wait for
        such sends first (gloo sends from the buffer itself, in the background)."""
        ptrs = {t.untyped_storage().data_ptr() for t in tensors}
        still = []
        for work, t in self._pending_sends:
            if t.untyped_storage().data_ptr() in ptrs:
                work.wait()
            else:
                still.append((work, t))
        self._pending_sends = still

    def flush(self) -> None:
        """Wait for every posted send (loop end, error paths, before collectives)."""
        pending, self._pending_sends = self._pending_sends, []
        for work, _ in pending:
            work.wait()

    # -- receive -----------------------------------------------------------------------
    def irecv_tensor_dict(self, src: int) -> "AsyncIntermediateTensors":
        pending = AsyncIntermediateTensors(self, src)
        self._unresolved[src].append(pending)
        return pending

    def _resolve(self, pending: "AsyncIntermediateTensors"):
        # Messages from one peer arrive in order: resolve earlier receives first.
        queue = self._unresolved[pending.src]
        while queue and queue[0] is not pending:
            queue[0].wait_quietly()
        t0 = time.perf_counter()
        if self.watch is not None:
            self.watch(pending.src)
        try:
            pending._header_work.wait()
            kind, schema_id, nbytes = pending._header.tolist()
            if kind == KIND_STOP:
                return None
            schemas = self._recv_schemas[pending.src]
            if nbytes:
                raw = torch.empty(nbytes, dtype=torch.uint8)
                dist.irecv(raw, pending.src, group=self.schema_group).wait()
                schemas[schema_id] = json.loads(bytes(raw.numpy()).decode())
            schema = schemas[schema_id]
            key = (pending.src, schema_id)
            if key not in self._buffers:
                self._buffers[key] = [
                    {k: torch.empty(shape, dtype=_dtype(dt), device="cpu" if where == "h" else self.device)
                     for k, dt, shape, where in schema}
                    for _ in range(_RING)]
            slot = self._ring_pos[key]
            self._ring_pos[key] = (slot + 1) % _RING
            buffers = self._buffers[key][slot]
            self._wait_sends_reading(buffers.values())
            works = [dist.irecv(buffers[k], pending.src, group=self.schema_group if where == "h" else self.data_group)
                     for k, _, _, where in schema]
            for w in works:
                w.wait()
            return buffers
        finally:
            self.wait_seconds += time.perf_counter() - t0
            queue.remove(pending)
            if self.watch is not None:
                self.watch(None)


class AsyncIntermediateTensors:
    """A pending tensor-dict receive; waits once, on first read."""

    def __init__(self, p2p: TensorDictP2P, src: int):
        self.p2p, self.src = p2p, src
        self._header = torch.empty(3, dtype=torch.int64)
        self._header_work = dist.irecv(self._header, src, group=p2p.header_group)
        self._tensors = None
        self._done = False
        self.waits = 0

    def wait(self) -> dict[str, torch.Tensor]:
        self.wait_quietly()
        if self._tensors is None:
            raise PipelineStopped(f"rank {self.src} ended the run")
        return self._tensors

    def wait_quietly(self) -> None:
        if not self._done:
            self._done = True
            self.waits += 1
            self._tensors = self.p2p._resolve(self)


class AsyncLatents:
    """Latents arriving from the last rank, waited for only when first used.

    Returned on rank 0 by the scheduler step.  Any attribute (``.shape``, ``.to``) or
    torch operation (``mask * latents``, ``torch.cat([latents, x])``) waits once and
    then acts on the received tensor itself; ``wait()`` returns that tensor (no copy).
    """

    def __init__(self, pending: AsyncIntermediateTensors, key: str = "latents"):
        object.__setattr__(self, "_pending", pending)
        object.__setattr__(self, "_key", key)
        object.__setattr__(self, "_tensor", None)

    def wait(self) -> torch.Tensor:
        if self._tensor is None:
            object.__setattr__(self, "_tensor", self._pending.wait()[self._key])
        return self._tensor

    @property
    def waited(self) -> bool:
        return self._tensor is not None

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        unwrap = lambda a: a.wait() if isinstance(a, AsyncLatents) else a  # noqa: E731
        return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {}))

    def __getattr__(self, name):
        return getattr(self.wait(), name)

    def __repr__(self):
        return f"AsyncLatents({'waited' if self.waited else 'pending'} from rank {self._pending.src})"

    def __len__(self):
        return len(self.wait())

    def __iter__(self):
        return iter(self.wait())

    def __bool__(self):
        return bool(self.wait())

    def __array__(self, *args, **kwargs):
        return self.wait().__array__(*args, **kwargs)


def _forward_dunder(name):
    def method(self, *args):
        return getattr(self.wait(), name)(*args)
    method.__name__ = name
    return method


for _name in ("add radd sub rsub mul rmul truediv rtruediv floordiv rfloordiv pow rpow matmul rmatmul "
              "neg pos abs getitem setitem eq ne lt le gt ge and or xor float int").split():
    setattr(AsyncLatents, f"__{_name}__", _forward_dunder(f"__{_name}__"))
