"""Control-plane messages: a JSON header, then the tensors' raw bytes.

Sent over ``multiprocessing.connection`` after its HMAC handshake with the group's
random key (or a Ray actor's methods), using only ``send_bytes``/``recv_bytes``:
nothing on this channel is ever unpickled, so even a peer that got past the handshake
cannot run code here.  Layout: ``<u32 header length><header JSON><tensor bytes>``, the
header being ``{"msg": ..., "t": [[name, dtype, shape, offset, nbytes], ...]}``.  A
tensor is copied once into the message and once out of it (a conditioning of 18 MB
costs a few milliseconds each way, where safetensors' save/load copied it four times).
"""
from __future__ import annotations

import json
import struct
import warnings

import torch

# The dtypes a message may carry (a header naming any other is refused).
DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128,
    *(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)))}


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    t = t.contiguous()
    return t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


def encode(msg: dict, tensors: dict[str, torch.Tensor] | None = None) -> bytes | bytearray:
    entries, raws, offset = [], [], 0
    for name, t in (tensors or {}).items():
        raw = _bytes_of(t)
        entries.append([name, str(t.dtype).removeprefix("torch."), list(t.shape), offset, raw.numel()])
        raws.append(raw)
        offset += raw.numel()
    head = json.dumps({"msg": msg, "t": entries}).encode()
    start = 4 + len(head)
    out = bytearray(start + offset)
    struct.pack_into("<I", out, 0, len(head))
    out[4:start] = head
    if offset:
        body = torch.frombuffer(out, dtype=torch.uint8, offset=start, count=offset)
        for (_, _, _, off, n), raw in zip(entries, raws):
            body[off:off + n].copy_(raw)
    return out


def decode(data: bytes | bytearray) -> tuple[dict, dict[str, torch.Tensor]]:
    (n,) = struct.unpack_from("<I", data)
    head = json.loads(bytes(data[4:4 + n]).decode())
    start, size = 4 + n, len(data) - 4 - n
    tensors = {}
    for name, dtype, shape, off, nbytes in head["t"]:
        if dtype not in DTYPES or off < 0 or nbytes < 0 or off + nbytes > size:
            raise ValueError(f"malformed control message: tensor {name!r} ({dtype}, {nbytes} bytes at {off})")
        t = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            with warnings.catch_warnings():  # a read-only view of the message, copied at once
                warnings.simplefilter("ignore", UserWarning)
                t.copy_(torch.frombuffer(data, dtype=torch.uint8, offset=start + off, count=nbytes))
        tensors[name] = t.view(DTYPES[dtype]).reshape(shape)
    return head["msg"], tensors


def peek(data: bytes | bytearray) -> dict:
    """A message's JSON part, without copying its tensors."""
    (n,) = struct.unpack_from("<I", data)
    return json.loads(bytes(data[4:4 + n]).decode())["msg"]


def send(conn, msg: dict, tensors: dict | None = None) -> None:
    conn.send_bytes(encode(msg, tensors))


def recv(conn) -> tuple[dict, dict]:
    return decode(conn.recv_bytes())
