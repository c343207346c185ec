"""Interrupts, dead and failing workers, bad input: nothing hangs, the next job works."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from pp_runtime.workers.group import WorkerError, WorkerGroup, parse_devices
from pp_runtime.engine.layout import JobError
from pp_runtime.loop.jobs import prepare_denoise_job
from engine_util import TOY, as_tensors, conditioning, reference

TESTS = os.path.dirname(os.path.abspath(__file__))

POS, NEG = conditioning()
TENSORS = as_tensors(POS, NEG)


def _job(world=2, steps=4, **kw):
    return prepare_denoise_job(world, TOY, latent_shape=kw.pop("latent_shape", [1, 4, 4, 4]), steps=steps, seed=3,
                               scheduler="flow_euler", guidance_scale=3.0, **kw)


def _gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie is gone too (the parent has not reaped it yet)
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] == "Z"


@pytest.mark.parametrize("world", [2, 3])
def test_interrupt_then_next_job_on_same_group(cpu_group, world):
    group = cpu_group(world)
    pids = group.pids
    seen = []
    res = group.run(_job(world, steps=400), TENSORS, on_step=lambda i, n, lat: seen.append(i),
                    should_interrupt=lambda: len(seen) >= 3)
    assert res["interrupted"] and res["latents"] is None
    assert 3 <= len(seen) < 400
    print(f"interrupt requested after step 3, last step streamed: {seen[-1]}")
    job = _job(world)
    again = group.run(job, TENSORS)
    assert group.pids == pids and not again["interrupted"]
    assert not any(r["loaded"] for r in again["ranks"])  # the placed model stayed placed
    assert (again["latents"] - reference(job, POS, NEG)).abs().max() == 0


def test_killed_worker_is_reported_with_rank_then_fresh_group_works():
    group = WorkerGroup("cpu,cpu", cpu_threads=1, extra_paths=[TESTS])
    try:
        group.start()
        old = group.pids
        t_kill = []

        def on_step(i, n, lat):
            if i == 2 and not t_kill:
                os.kill(old[1], signal.SIGKILL)
                t_kill.append(time.monotonic())
        with pytest.raises(WorkerError) as err:
            group.run(_job(steps=2000), TENSORS, on_step=on_step)
        took = time.monotonic() - t_kill[0]
        print(f"dead worker reported after {took:.2f} s: {err.value}")
        assert took < 10
        assert err.value.rank == 1 and "SIGKILL" in str(err.value) and "rank 1" in str(err.value)
        assert group.state == "failed" and all(_gone(p) for p in old)  # torn down, no orphans
        job = _job()
        res = group.run(job, TENSORS)  # starts a fresh group
        assert set(group.pids).isdisjoint(old)
        assert (res["latents"] - reference(job, POS, NEG)).abs().max() == 0
    finally:
        group.shutdown()


def test_worker_exception_names_rank_and_cause_then_next_job_works():
    group = WorkerGroup("cpu,cpu", cpu_threads=1, extra_paths=[TESTS])
    try:
        with pytest.raises(WorkerError) as err:  # 3 latent channels for a 4-channel model
            group.run(_job(latent_shape=[1, 3, 4, 4]), TENSORS)
        assert err.value.rank == 0 and "RuntimeError" in str(err.value)
        res = group.run(_job(), TENSORS)
        assert not res["interrupted"] and res["latents"].shape == (1, 4, 4, 4)
    finally:
        group.shutdown()


@pytest.mark.parametrize("kw,message", [
    (dict(split="manual", manual="2,3"), "manual split '2,3' has 5 blocks, the model has 6"),
    (dict(split="manual", manual="6,0"), "empty stage"),
    (dict(split="manual", manual="1,2,3"), "has 3 stages, the group has 2"),
    (dict(world=7), "7 stages but the model has only 6 blocks"),
    (dict(world=3, cfg_mode="cfg_parallel"), "cfg_parallel needs an even number of devices, the group has 3"),
    (dict(scheduler="nope"), "scheduler 'nope' is unknown"),
    (dict(cfg_mode="sideways"), "cfg mode 'sideways' is unknown"),
])
def test_invalid_input_rejected_before_any_worker_starts(kw, message):
    """The job is refused while it is described, with the message that says what to change.
    (That no group starts or restarts for a refused prompt is checked through the server:
    test_server_e2e.test_invalid_input_fails_cleanly.)"""
    world = kw.pop("world", 2)
    with pytest.raises(JobError, match=message.replace("(", r"\(")):
        prepare_denoise_job(world, TOY, latent_shape=[1, 4, 4, 4], steps=4, seed=0,
                            **{"scheduler": "flow_euler", "guidance_scale": 3.0, **kw})


@pytest.mark.parametrize("devices,message", [
    ("cuda:7", "does not exist"), ("tpu:0", "not understood"), ("", "needs at least 2"),
])
def test_bad_devices_rejected(devices, message):
    if devices == "" and torch.cuda.device_count() >= 2:
        pytest.skip("this machine has GPUs")
    with pytest.raises(ValueError, match=message):
        parse_devices(devices)


def test_clean_shutdown_and_host_death_leave_no_orphans(tmp_path):
    group = WorkerGroup("cpu,cpu").start()
    pids = group.pids
    group.shutdown()
    assert all(_gone(p) for p in pids)
    # A host that dies without shutting down: its workers notice and exit.
    script = ("import sys, time; sys.path.insert(0, %r); from pp_runtime.workers.group import WorkerGroup; "
              "g = WorkerGroup('cpu,cpu').start(); print(*g.pids, flush=True); time.sleep(600)"
              % os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    host = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    workers = [int(p) for p in host.stdout.readline().split()]
    host.kill()
    host.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not all(_gone(p) for p in workers):
        time.sleep(0.1)
    assert all(_gone(p) for p in workers)
