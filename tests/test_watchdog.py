"""Tier 2: the host's watchdog on real worker processes, and the error text of a dead worker.

A worker stuck inside a block (as in a GPU kernel that never returns: its main thread is
blocked, its heartbeat goes on) is simulated with ``PP_TEST_HANG=rank:block:n`` (the only
fault injection in the pack: a stuck kernel cannot be produced on a CPU).  A stopped
process (SIGSTOP) and a killed one (SIGKILL) are real.
"""
from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from comfy_env import require_comfy

COMFY_ROOT = require_comfy()

import comfy.sd  # noqa: E402
from make_models import cached_model_files  # noqa: E402

from pp_runtime.comfy.job import prepare_comfy_job  # noqa: E402
from pp_runtime.workers.group import WorkerError, WorkerGroup  # noqa: E402


@pytest.fixture(scope="module")
def wan():
    model = comfy.sd.load_diffusion_model(str(cached_model_files()["wan21_t2v"]))
    g = torch.Generator().manual_seed(0)
    return model, [[torch.randn(1, 6, 4096, generator=g), {}]], [[torch.randn(1, 6, 4096, generator=g), {}]]


def _job(wan, steps):
    model, pos, neg = wan
    return prepare_comfy_job(2, model, pos, neg, {"samples": torch.zeros(1, 16, 1, 8, 8)}, seed=1, steps=steps,
                             cfg=3.0, sampler_name="euler", scheduler="simple")


def _group(monkeypatch, hang: str, **bounds):
    monkeypatch.setenv("PP_TEST_HANG", hang)
    for k, v in bounds.items():
        monkeypatch.setenv(k, str(v))
    return WorkerGroup("cpu,cpu", cpu_threads=1, extra_paths=[str(COMFY_ROOT)])


def test_stuck_worker_is_found_after_cancel(wan, monkeypatch):
    """Rank 1 blocks forever inside block 1 in the 3rd pass; Cancel; within the grace the
    host names rank 1 and what it was stuck on, kills the group; the next job works."""
    group = _group(monkeypatch, "1:1:2", PP_CANCEL_GRACE_S=3)
    try:
        job, t, rt = _job(wan, 40)
        seen, t_cancel = [], []

        def should_interrupt():  # Cancel 1 s after the first step: rank 1 is stuck by then
            if seen and not t_cancel and time.monotonic() > seen[0] + 1.0:
                t_cancel.append(time.monotonic())
            return bool(t_cancel)
        with pytest.raises(WorkerError) as err:
            group.run(job, t, rank_tensors=rt, on_step=lambda i, n, x: seen.append(time.monotonic()),
                      should_interrupt=should_interrupt)
        took = time.monotonic() - t_cancel[0]
        print(f"[stuck+cancel] {took:.1f} s after Cancel: {err.value}")
        assert err.value.rank == 1 and "stuck computing block 1" in str(err.value) and took < 10
        monkeypatch.delenv("PP_TEST_HANG")
        job, t, rt = _job(wan, 2)
        assert group.run(job, t, rank_tensors=rt)["latents"] is not None
    finally:
        group.shutdown()


def test_stuck_worker_is_found_without_cancel(wan, monkeypatch):
    """No Cancel: once steps have completed, a step that takes far longer than the slowest
    one so far (here: PP_STEP_WATCHDOG_S=4) fails the job, naming the stuck rank."""
    group = _group(monkeypatch, "1:1:4", PP_STEP_WATCHDOG_S=4)
    try:
        job, t, rt = _job(wan, 40)
        t0 = time.monotonic()
        with pytest.raises(WorkerError) as err:
            group.run(job, t, rank_tensors=rt)
        print(f"[stuck] {time.monotonic() - t0:.1f} s: {err.value}")
        assert err.value.rank == 1 and "made no progress" in str(err.value) and "block 1" in str(err.value)
    finally:
        group.shutdown()


def _signal_at_step_1(wan, rank, sig):
    """Run a long job on a fresh group, send ``sig`` to ``rank`` after step 1: (the error, the
    seconds from the signal to the error)."""
    group = WorkerGroup("cpu,cpu", cpu_threads=1, extra_paths=[str(COMFY_ROOT)])
    try:
        job, t, rt = _job(wan, 400)
        sent = []

        def on_step(i, n, x):
            if i == 1 and not sent:
                os.kill(group.pids[rank], sig)
                sent.append(time.monotonic())
        with pytest.raises(WorkerError) as err:
            group.run(job, t, rank_tensors=rt, on_step=on_step)
        return err.value, time.monotonic() - sent[0]
    finally:
        group.shutdown()


def test_stopped_worker_without_cancel(wan, monkeypatch):
    """SIGSTOP: the worker's heartbeat stops; after PP_SILENT_S the job fails naming it."""
    monkeypatch.setenv("PP_SILENT_S", "4")
    err, took = _signal_at_step_1(wan, 0, signal.SIGSTOP)
    print(f"[sigstop] {took:.1f} s: {err}")
    assert err.rank == 0 and "no heartbeat" in str(err) and took < 10


def test_slow_residency_step_is_not_a_hang(wan, monkeypatch):
    """Rank 0 takes 4 s over its residency step after each job (as parking a 24 GB stage in
    host RAM took on an H200), the next job already sent: its heartbeat, still tagged with the
    job it is finishing, keeps it alive for the next one (with PP_SILENT_S 2 the host called it
    hung before), and both jobs give the same latent."""
    group = _group(monkeypatch, "0:after:4", PP_SILENT_S=2)
    try:
        job, t, rt = _job(wan, 2)
        job["residency"] = "park"
        first = group.run(job, t, rank_tensors=rt)["latents"]
        t0 = time.monotonic()
        second = group.run(job, t, rank_tensors=rt)["latents"]
        took = time.monotonic() - t0
        print(f"[slow residency] the next job took {took:.1f} s")
        assert took > 3 and torch.equal(first, second)
    finally:
        group.shutdown()


def test_killed_worker_message_is_the_cause_not_its_log(wan):
    err, _ = _signal_at_step_1(wan, 1, signal.SIGKILL)
    text = str(err)
    print(f"[sigkill] {text}")
    assert text.startswith("pipeline worker rank 1 (cpu) failed: was killed by signal SIGKILL")
    assert "|" not in text and "\n" not in text  # one line: no log lines glued on


def test_exception_message_names_the_frame(wan):
    """A worker's exception: its type, message and the frame it came from, in one line."""
    model, pos, neg = wan
    group = WorkerGroup("cpu,cpu", cpu_threads=1, extra_paths=[str(COMFY_ROOT)])
    try:
        job, t, rt = _job(wan, 2)
        job["model"]["stamp"] = {"size": 1, "mtime_ns": 1}  # as if the file changed after the job was built
        with pytest.raises(WorkerError) as err:
            group.run(job, t, rank_tensors=rt)
        text = str(err.value)
        print(f"[exception] {text}")
        assert "CarryError: " in text and "changed on disk" in text and "(at loading.py:" in text
        assert "\n" not in text
    finally:
        group.shutdown()
