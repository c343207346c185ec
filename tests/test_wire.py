"""The control channel's message format: every tensor kind the pack sends comes back equal,
and a header that points outside the message or names an unknown dtype is refused (the
channel is authenticated, but a bad message must not read memory it does not own)."""
import json
import struct

import pytest
import torch

from pp_runtime.workers import wire


def test_round_trip_every_kind():
    t = {"f32": torch.randn(2, 3, 4), "bf16": torch.randn(5, 7).to(torch.bfloat16), "scalar": torch.tensor(2.5),
         "empty": torch.zeros(0, 3), "transposed": torch.randn(4, 6).t(), "bool": torch.tensor([True, False]),
         "i64": torch.arange(9).reshape(3, 3), "f16": torch.randn(3).half()}
    msg, back = wire.decode(wire.encode({"op": "x", "n": [1, 2]}, t))
    assert msg == {"op": "x", "n": [1, 2]}
    for k, v in t.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v), k
    back["f32"].add_(1)  # the decoded tensors are the receiver's own (writable) memory
    assert wire.decode(wire.encode({"op": "y"})) == ({"op": "y"}, {})


def _message(entries, body=b"\0" * 16):
    head = json.dumps({"msg": {"op": "x"}, "t": entries}).encode()
    return struct.pack("<I", len(head)) + head + body


@pytest.mark.parametrize("entry, why", [
    (["a", "float32", [8], 0, 32], "past the end"),
    (["a", "float32", [2], 12, 8], "past the end"),
    (["a", "float32", [1], -4, 4], "negative offset"),
    (["a", "object", [1], 0, 8], "unknown dtype"),
])
def test_malformed_header_is_refused(entry, why):
    with pytest.raises(ValueError, match="malformed control message"):
        wire.decode(_message([entry]))


def test_peek_reads_the_json_part_only():
    data = wire.encode({"op": "error", "rank": 1}, {"x": torch.zeros(1000)})
    assert wire.peek(data) == {"op": "error", "rank": 1}
