"""The worker group on Ray: the same jobs, results and failure semantics as the local backend.

One local Ray instance per module (CPU only, 4 logical CPUs), groups of 2 and 4 CPU
actors of half a CPU each, 1 thread each (so results are bit-identical to one process,
as on the local backend).  Skipped only where Ray is not installed
(``pip install -r requirements-ray.txt``); the spec parsing and the missing-Ray message
are tested either way.
"""
import os
import signal
import sys
import time

import pytest

from engine_util import TOY, as_tensors, conditioning, reference, run_parity
from pp_runtime.workers import registry as group_module
from pp_runtime.workers.group import WorkerError, WorkerGroup
from pp_runtime.workers.registry import shared_group
from pp_runtime.loop.jobs import prepare_denoise_job
from pp_runtime.workers import ray_backend
from pp_runtime.workers.ray_backend import RAY_INSTALL_HINT, RayUnavailable, parse_ray_devices

try:
    import ray
except ImportError:
    ray = None

needs_ray = pytest.mark.skipif(ray is None, reason='Ray is not installed: pip install -r requirements-ray.txt '
                                                   '(or pip install "ray[default]>=2.9")')

TESTS = os.path.dirname(os.path.abspath(__file__))
TOL = 1e-5
STEPS = 4
POS, NEG = conditioning()
TENSORS = as_tensors(POS, NEG)


def _job(world=2, steps=4, **kw):
    return prepare_denoise_job(world, TOY, latent_shape=kw.pop("latent_shape", [1, 4, 4, 4]), steps=steps, seed=3,
                               scheduler="flow_euler", guidance_scale=3.0, **kw)


def _group(n):
    return ray_backend.RayWorkerGroup(",".join(["cpu"] * n), cpu_threads=1, extra_paths=[TESTS], cpus_per_actor=0.5)


def _node_address():
    """The local instance's node address as the cluster knows it (Ray never uses loopback)."""
    return ray.nodes()[0]["NodeManagerAddress"]


def _gone(pid, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        with open(f"/proc/{pid}/stat") as f:
            if f.read().split()[2] == "Z":
                return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def ray_groups():
    """A local Ray instance (loopback only) and its groups of N CPU actors, kept for the module."""
    t0 = time.monotonic()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    print(f"local Ray instance up in {time.monotonic() - t0:.1f} s")
    groups = {}

    def get(n):
        g = groups.get(n)
        if g is None or not g.alive:
            t = time.monotonic()
            g = groups[n] = _group(n).start()
            print(f"{n} actors up in {time.monotonic() - t:.1f} s")
        return g
    yield get
    for g in groups.values():
        g.shutdown()
    ray.shutdown()


# -- always (no Ray needed) -------------------------------------------------------------
@pytest.mark.parametrize("spec,expected", [
    ("cpu,cpu", ("cpu", 2)), ("cpu x 4", ("cpu", 4)), ("4x cpu", ("cpu", 4)), ("cuda x 8", ("cuda", 8)),
    ("gpu,gpu", ("cuda", 2)), ("auto", ("cuda", None)), ("", ("cuda", None)), (["cpu", "cpu"], ("cpu", 2)),
])
def test_parse_ray_devices(spec, expected):
    assert parse_ray_devices(spec) == expected


@pytest.mark.parametrize("spec,message", [
    ("cuda:0,cuda:1", "GPUs are counted, not named"), ("tpu x 2", "not understood"), ("cpu,cuda", "mix cpu and cuda"),
    ("cpu x 0", "asks for no device"),
])
def test_parse_ray_devices_rejects(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_ray_devices(spec)


def test_missing_ray_gives_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # 'import ray' now fails as if it were not installed
    assert RAY_INSTALL_HINT == 'backend \'ray\' needs Ray: pip install "ray[default]>=2.9"'
    with pytest.raises(RayUnavailable, match="needs Ray: pip install"):
        ray_backend.RayWorkerGroup("cpu,cpu")
    with pytest.raises(RayUnavailable, match="needs Ray: pip install"):
        shared_group("cpu x 3", backend="ray")


# -- on a local Ray instance --------------------------------------------------------------
CASES = [
    ("pp2-seqcfg-euler", 2, dict(scheduler="flow_euler", guidance_scale=3.5, cfg_mode="sequential")),
    ("pp2xcfg2-euler", 4, dict(scheduler="flow_euler", guidance_scale=3.5, cfg_mode="cfg_parallel")),
    ("pp2xcfg2-dpmpp2m_sde", 4, dict(scheduler="dpmpp_2m_sde", guidance_scale=3.5, cfg_mode="cfg_parallel")),
]


@needs_ray
@pytest.mark.parametrize("name,world,kw", CASES, ids=[c[0] for c in CASES])
def test_parity_on_ray_actors(ray_groups, name, world, kw):
    group = ray_groups(world)
    t0 = time.monotonic()
    job, res, ref, steps = run_parity(group, TOY, POS, NEG, latent_shape=[1, 4, 4, 4], steps=STEPS, seed=11, **kw)
    diff = ((res["latents"] - ref).abs().max() / ref.abs().max().clamp(min=1.0)).item()
    print(f"{name}: layout {job['layout']} split {job['split']} max|diff| {diff:.2e} "
          f"({time.monotonic() - t0:.2f} s incl. reference)")
    assert not res["interrupted"] and steps == list(range(STEPS))
    assert ref.abs().max() > 0.1 and diff <= TOL
    assert job["layout"] == ({"pp": 2, "cfg": 1, "sp": 1} if world == 2 else {"pp": 2, "cfg": 2, "sp": 1})
    st = group.status()
    assert st["backend"] == "ray" and st["state"] == "idle"
    node = _node_address()
    assert [r["node"] for r in st["ranks"]] == [node] * world  # every rank says where it runs
    assert st["rendezvous"].startswith(f"tcp://{node}:")  # rank 0's node
    assert [r["stage"] for r in st["ranks"][:2]] == [[0, job["split"][0]], [job["split"][0], 6]]


@needs_ray
def test_interrupt_then_next_job_on_same_actors(ray_groups):
    group = ray_groups(2)
    pids, seen = group.pids, []
    res = group.run(_job(steps=400), TENSORS, on_step=lambda i, n, lat: seen.append(i),
                    should_interrupt=lambda: len(seen) >= 3)
    assert res["interrupted"] and res["latents"] is None
    assert 3 <= len(seen) < 400
    print(f"interrupt requested after step 3, last step streamed: {seen[-1]}")
    job = _job()
    again = group.run(job, TENSORS)
    assert group.pids == pids and not again["interrupted"] and group.alive
    assert not any(r["loaded"] for r in again["ranks"])  # the placed model stayed placed
    assert (again["latents"] - reference(job, POS, NEG)).abs().max() == 0


@needs_ray
def test_killed_actor_is_reported_with_rank_and_node_then_fresh_group_works(ray_groups):
    ray_groups(2)  # the Ray instance
    group = _group(2)
    try:
        group.start()
        old, pg = group.pids, group.pg
        t_kill = []

        def on_step(i, n, lat):
            if i == 2 and not t_kill:
                os.kill(old[1], signal.SIGKILL)
                t_kill.append(time.monotonic())
        with pytest.raises(WorkerError) as err:
            group.run(_job(steps=2000), TENSORS, on_step=on_step)
        took = time.monotonic() - t_kill[0]
        print(f"dead actor reported after {took:.2f} s: {err.value}")
        assert took < 10
        node = _node_address()
        assert err.value.rank == 1 and err.value.node == node
        assert f"rank 1 on node {node}" in str(err.value) and "actor died" in str(err.value)
        assert group.state == "failed" and not group.alive
        assert all(_gone(p) for p in old)  # torn down: every actor killed ...
        deadline = time.monotonic() + 10
        while ray.util.placement_group_table(pg)["state"] != "REMOVED" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ray.util.placement_group_table(pg)["state"] == "REMOVED"  # ... and the placement group gone
        job = _job()
        res = group.run(job, TENSORS)  # starts a fresh group
        assert set(group.pids).isdisjoint(old)
        assert (res["latents"] - reference(job, POS, NEG)).abs().max() == 0
    finally:
        group.shutdown()
    assert group.state == "stopped" and group.actors == [] and group.pg is None


@needs_ray
def test_next_group_waits_for_the_resources_of_the_last(ray_groups):
    """Ray returns a removed placement group's resources asynchronously (here: the group's CPU
    still taken right after the shutdown); a group placed meanwhile is placed around them (across
    two hosts, 'spread' put both ranks on the host that came back first).  The next group's
    launch waits until they are back."""
    ray_groups(2)  # the Ray instance (and a group of 2 kept for the module)
    ray_backend._await_returned(ray)  # what earlier tests' groups gave back
    free = ray.available_resources().get("CPU", 0)
    group = _group(2).start()
    assert ray.available_resources().get("CPU", 0) == free - 1
    group.shutdown()
    ray_backend._await_returned(ray)  # what the next launch does first
    assert ray.available_resources().get("CPU", 0) == free


@needs_ray
def test_worker_exception_names_rank_and_cause_then_next_job_works(ray_groups):
    group = ray_groups(2)
    with pytest.raises(WorkerError) as err:  # 3 latent channels for a 4-channel model
        group.run(_job(latent_shape=[1, 3, 4, 4]), TENSORS)
    print(err.value)
    assert err.value.rank == 0 and "RuntimeError" in str(err.value) and f"on node {_node_address()}" in str(err.value)
    group = ray_groups(2)  # torn down: a fresh group
    res = group.run(_job(), TENSORS)
    assert not res["interrupted"] and res["latents"].shape == (1, 4, 4, 4)


@needs_ray
def test_shared_group_has_a_backend_dimension():
    local = shared_group("cpu,cpu")
    on_ray = shared_group("cpu,cpu", backend="ray")
    assert isinstance(local, WorkerGroup) and local.backend == "local"
    assert isinstance(on_ray, ray_backend.RayWorkerGroup) and on_ray.backend == "ray"
    assert shared_group("cpu x 2", backend="ray") is on_ray  # same spec, same group
    assert shared_group("cpu,cpu", backend="ray", ray_address="auto") is not on_ray
    assert on_ray.state == "not started" and local.state == "not started"
    with pytest.raises(ValueError, match="unknown"):
        shared_group("cpu,cpu", backend="mpi")
    for key in [k for k, g in group_module._SHARED.items() if g in (local, on_ray) or g.state == "not started"]:
        del group_module._SHARED[key]  # never started: nothing to shut down
