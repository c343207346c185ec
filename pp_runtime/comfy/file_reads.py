"""A stage's tensors from a safetensors file onto its GPU: large reads, in the file's order,
into a few pinned host buffers, each copied to the device while the next ones are read.

Host RAM holds ``buffers x chunk`` bytes at most (no copy of the stage, no memory map);
tensors next to each other in the file are read together (gaps of other stages' tensors up
to ``gap`` bytes are read through rather than seeked over); reads run on threads, ahead of
the copies (file reads release the GIL), and the copies are asynchronous (pinned memory), so
the file, the host memory and the PCIe link work at once.  A buffer is read into again only
once the device has finished copying out of it (a CUDA event per buffer).
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

CHUNK = 64 << 20
BUFFERS = 6
THREADS = 3
GAP = 1 << 20


@dataclass
class Chunk:
    """One read: file bytes ``[start, end)``; ``pieces``: (key, offset in the chunk, offset in
    the tensor, bytes)."""
    start: int
    end: int
    pieces: list = field(default_factory=list)


def plan_chunks(spans: list[tuple[str, int, int]], chunk: int = CHUNK, gap: int = GAP) -> list[Chunk]:
    """The reads for tensors at file byte ranges ``spans`` (key, begin, end): in file order,
    each at most ``chunk`` bytes, a tensor larger than that split over several, neighbours
    (at most ``gap`` bytes apart) in one."""
    out: list[Chunk] = []
    for key, begin, end in sorted(spans, key=lambda s: s[1]):
        pos = begin
        while pos < end:
            cur = out[-1] if out else None
            if cur is None or pos - cur.end > gap or pos < cur.end or cur.start + chunk - pos <= 0:
                cur = Chunk(pos, pos)
                out.append(cur)
            n = min(end - pos, cur.start + chunk - pos)
            cur.pieces.append((key, pos - cur.start, pos - begin, n))
            cur.end = pos + n
            pos += n
    return out


def _read_exactly(fd: int, buf: torch.Tensor, offset: int, name: str) -> None:
    view, done = memoryview(buf.numpy()), 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            from .carry import CarryError
            raise CarryError(f"{name} ends at byte {offset + done}, inside a tensor it lists")
        done += n


def read_to_device(path: str, base: int, tensors: dict[str, tuple], device,
                   chunk: int = CHUNK, buffers: int = BUFFERS, threads: int = THREADS, gap: int = GAP):
    """Yield (key, tensor on ``device`` in the file's dtype) for ``tensors`` (key -> dtype, shape,
    begin, end: byte offsets after the header, which ends at ``base``), each as soon as its
    last bytes are copied.  On a CUDA device the copies are asynchronous on the current
    stream (use the tensors on it, as ComfyUI's loading does); elsewhere synchronous."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    for key in [k for k, (_, _, b, e) in tensors.items() if e == b]:  # nothing to read
        dtype, shape = tensors.pop(key)[:2]
        yield key, torch.empty(shape, dtype=dtype, device=device)
    spans = [(k, base + b, base + e) for k, (_, _, b, e) in tensors.items()]
    chunks = plan_chunks(spans, chunk, gap)
    if not chunks:
        return
    size = max(c.end - c.start for c in chunks)
    pool = [torch.empty(size, dtype=torch.uint8, pin_memory=cuda) for _ in range(min(buffers, len(chunks)))]
    done = [None] * len(pool)  # per buffer: the event after its last copies (CUDA)
    dest = {k: torch.empty(e - b, dtype=torch.uint8, device=device) for k, (_, _, b, e) in tensors.items()}
    left = {k: e - b for k, (_, _, b, e) in tensors.items()}
    name = os.path.basename(path)
    fd = os.open(path, os.O_RDONLY)
    lock = threading.Lock()

    def read(i: int) -> torch.Tensor:
        j = i % len(pool)
        with lock:
            event = done[j]
        if event is not None:
            event.synchronize()  # the device has copied the previous chunk out of this buffer
        c = chunks[i]
        buf = pool[j][: c.end - c.start]
        _read_exactly(fd, buf, c.start, name)
        return buf

    try:
        with ThreadPoolExecutor(max_workers=max(1, min(threads, len(pool)))) as ex:
            pending = {i: ex.submit(read, i) for i in range(len(pool))}
            for i, c in enumerate(chunks):
                buf = pending.pop(i).result()
                ready = []
                for key, at, into, n in c.pieces:
                    dest[key][into: into + n].copy_(buf[at: at + n], non_blocking=cuda)
                    left[key] -= n
                    if not left[key]:
                        ready.append(key)
                if cuda:
                    event = torch.cuda.Event()
                    event.record()
                    with lock:
                        done[i % len(pool)] = event
                if i + len(pool) < len(chunks):
                    pending[i + len(pool)] = ex.submit(read, i + len(pool))
                for key in ready:
                    dtype, shape = tensors[key][:2]
                    yield key, dest.pop(key).view(dtype).reshape(shape)
    finally:
        os.close(fd)
