"""The staged stage reader (``file_reads``): the bytes of every tensor, whatever the chunking.

The reader a GPU worker places its stage with (pinned buffers, reads ahead of asynchronous
copies) runs here on the CPU with tiny chunks, so that tensors split over several chunks,
several tensors in one chunk, gaps read through and gaps seeked over all occur; every tensor
must equal what safetensors itself reads, bit for bit.
"""
import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from pp_runtime.comfy.carry import CarryError
from pp_runtime.comfy.file_reads import plan_chunks, read_to_device
from pp_runtime.comfy.loading import _DTYPES


def _spans(path, keys):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return 8 + n, {k: (_DTYPES[header[k]["dtype"]], header[k]["shape"], *header[k]["data_offsets"]) for k in keys}


@pytest.fixture
def model_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {f"blocks.{i}.w": torch.randn(17 + 3 * i, 9, generator=g).to(dt)
          for i, dt in enumerate([torch.bfloat16, torch.float32, torch.float16, torch.float8_e4m3fn] * 3)}
    sd["ids"] = torch.arange(37, dtype=torch.int64)
    sd["none"] = torch.zeros(0, 4)
    sd["flag"] = torch.tensor([True, False, True])
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path))
    return str(path), sd


def test_plan_covers_every_byte_once():
    spans = [("a", 0, 2500), ("b", 2500, 2600), ("c", 2700, 2800), ("d", 9000, 9001)]
    chunks = plan_chunks(spans, chunk=1000, gap=150)
    assert all(c.end - c.start <= 1000 for c in chunks)
    got = {}
    for c in chunks:
        for key, at, into, n in c.pieces:
            got.setdefault(key, []).append((c.start + at, into, n))
    for key, begin, end in spans:  # each tensor's bytes, in order, without holes or overlaps
        pos = begin
        for file_at, into, n in got[key]:
            assert file_at == pos and into == pos - begin
            pos += n
        assert pos == end
    assert [k for k, *_ in chunks[2].pieces] == ["a", "b", "c"]  # a gap of 100 read through
    assert [k for k, *_ in chunks[-1].pieces] == ["d"]  # one of 6200 seeked over


@pytest.mark.parametrize("chunk,buffers,threads", [(100, 2, 2), (333, 3, 1), (1 << 20, 6, 3)])
def test_staged_reads_equal_safetensors(model_file, chunk, buffers, threads):
    path, sd = model_file
    keys = [k for k in sd if not k.endswith(("1.w", "5.w"))]  # another stage's tensors left out: gaps
    base, spans = _spans(path, keys)
    ref = load_file(path)
    got = dict(read_to_device(path, base, spans, "cpu", chunk=chunk, buffers=buffers, threads=threads, gap=64))
    assert sorted(got) == sorted(keys)
    for k in keys:
        assert got[k].dtype == ref[k].dtype and got[k].shape == ref[k].shape
        assert torch.equal(got[k].view(torch.uint8), ref[k].view(torch.uint8)), k


def test_a_truncated_file_names_itself(model_file, tmp_path):
    path, sd = model_file
    base, spans = _spans(path, list(sd))
    data = open(path, "rb").read()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 40])
    with pytest.raises(CarryError, match="cut.safetensors ends at byte"):
        list(read_to_device(str(cut), base, spans, "cpu", chunk=128))
