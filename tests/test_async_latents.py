"""AsyncLatents: the wait is deferred to first use, happens once, and copies nothing.

Two real processes in a gloo group: rank 1 sends latents late on purpose, rank 0 checks
when it blocks.
"""
import os
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pp_runtime.engine.comm import AsyncLatents, TensorDictP2P

DELAY = 0.6


def _p2p():
    return TensorDictP2P("cpu", dist.group.WORLD, dist.new_group(backend="gloo"), dist.new_group(backend="gloo"))


def _worker(rank, store, out):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    p2p = _p2p()
    a = torch.arange(24, dtype=torch.float32).reshape(1, 2, 3, 4)
    if rank == 1:
        for k in range(4):
            time.sleep(DELAY)
            p2p.isend_tensor_dict({"latents": a + k}, 0)
        p2p.flush()
    else:
        r = {}
        # 1. attribute access waits, once
        t0 = time.perf_counter()
        lat = AsyncLatents(p2p.irecv_tensor_dict(1))
        r["post_s"] = time.perf_counter() - t0
        r["waited_after_post"] = lat.waited
        t0 = time.perf_counter()
        r["shape"] = tuple(lat.shape)
        r["first_use_s"] = time.perf_counter() - t0
        r["dtype"] = str(lat.dtype)
        r["to"] = lat.to(torch.float64).sum().item()
        r["cat"] = torch.cat([lat, lat]).shape[0]
        r["mul"] = (2 * lat).sum().item()
        r["waits"] = lat._pending.waits
        # no copy: the tensor is the receive buffer itself
        buf = next(iter(p2p._buffers.values()))[0]["latents"]
        r["same_storage"] = lat.wait().data_ptr() == buf.data_ptr() and lat.wait() is lat.wait()
        # 2. a torch op as the first use waits too
        lat2 = AsyncLatents(p2p.irecv_tensor_dict(1))
        r["waited2_after_post"] = lat2.waited
        mask = torch.zeros(1, 2, 3, 4)
        mask[..., 0] = 1
        t0 = time.perf_counter()
        r["masked"] = (mask * lat2).sum().item()
        r["first_op_s"] = time.perf_counter() - t0
        r["waits2"] = lat2._pending.waits
        # 3. two receives posted, the later one read first: each still gets its own message
        third = AsyncLatents(p2p.irecv_tensor_dict(1))
        fourth = AsyncLatents(p2p.irecv_tensor_dict(1))
        r["fourth"] = fourth.sum().item()
        r["third"] = third.sum().item()
        out.put(r)
    dist.destroy_process_group()


def test_async_latents_defer_wait_once_no_copy():
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    store = os.path.join(tempfile.mkdtemp(), "store")
    procs = [ctx.Process(target=_worker, args=(r, store, out)) for r in range(2)]
    for p in procs:
        p.start()
    r = out.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
    a = torch.arange(24, dtype=torch.float32)
    print(r)
    assert r["post_s"] < DELAY / 3 and r["waited_after_post"] is False  # no wait after posting
    assert r["first_use_s"] > DELAY / 3  # the first attribute access is where it blocked
    assert r["shape"] == (1, 2, 3, 4) and r["dtype"] == "torch.float32"
    assert r["to"] == a.sum().item() and r["cat"] == 2 and r["mul"] == 2 * a.sum().item()
    assert r["waits"] == 1  # several uses, one wait
    assert r["same_storage"]
    assert r["waited2_after_post"] is False and r["first_op_s"] > DELAY / 3 and r["waits2"] == 1
    assert r["masked"] == (a + 1).reshape(1, 2, 3, 4)[..., 0].sum().item()
    assert r["third"] == (a + 2).sum().item() and r["fourth"] == (a + 3).sum().item()
