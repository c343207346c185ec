"""Control-plane messages: a JSON header and an optional safetensors blob of tensors.

Sent over ``multiprocessing.connection`` after its HMAC handshake with the group's
random key, using only ``send_bytes``/``recv_bytes``: nothing on this channel is ever
unpickled, so even a peer that got past the handshake cannot run code here.
"""
from __future__ import annotations

import json
import struct

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save


def encode(msg: dict, tensors: dict[str, torch.Tensor] | None = None) -> bytes:
    head = json.dumps(msg).encode()
    blob = b""
    if tensors:
        blob = st_save({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()})
    return struct.pack("<I", len(head)) + head + blob


def decode(data: bytes) -> tuple[dict, dict[str, torch.Tensor]]:
    (n,) = struct.unpack_from("<I", data)
    msg = json.loads(data[4:4 + n].decode())
    blob = data[4 + n:]
    return msg, (st_load(bytes(blob)) if blob else {})


def send(conn, msg: dict, tensors: dict | None = None) -> None:
    conn.send_bytes(encode(msg, tensors))


def recv(conn) -> tuple[dict, dict]:
    return decode(conn.recv_bytes())
