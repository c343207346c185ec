"""The Ray backend across two hosts: two Linux network namespaces on this machine, each
with its own address on a link the test makes between them (and nothing else: no route
out, so no traffic can go anywhere but loopback and that link).

The head namespace runs ``ray start --head`` and the worker namespace ``ray start
--address=...``, with the README's commands and port settings (``--node-ip-address``,
``--min-worker-port``/``--max-worker-port``, ``PP_RAY_PORT_RANGE``) and Ray's token
authentication (a token the test makes).  The ComfyUI side (``ray_hosts_driver.py``) runs
in the head namespace and joins with ``ray_address`` = the head's address (Ray Client,
``ray://``, with token authentication did not start its per-client server on Ray 2.60:
the README says so).  It runs PP KSampler's jobs, the tiny Wan 2.1 model through
ComfyUI's sampler path, on the pack's Ray backend:

* PP2 with one stage per host (placement ``spread``) and PP2 x CFG2 across both hosts
  equal ComfyUI's stock sampling in one process (rel-L2 <= 1e-5; CPU actors);
* Cancel across hosts, then the next prompt on the same actors;
* 10 prompts in a row: no growth in processes, listening ports or connections;
* nothing listens outside loopback and the namespaces' own link;
* a lost host (every process of the worker namespace killed mid-prompt): the prompt fails
  within the README's time with the rank and node; the next prompt runs on what is left.

Needs root (network namespaces) and Ray; skipped with the reason otherwise.  Everything the
test makes (namespaces, link, Ray's temp folders, processes) is removed at the end, also
on failure, and a watchdog tears it all down if the module runs past its time limit.
"""
from __future__ import annotations

import json
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from comfy_env import find_comfy_root

TESTS = Path(__file__).resolve().parent
TOL = 1e-5
TIME_LIMIT_S = 290  # the whole module (the issue: under 5 minutes)
LOST_NODE_S = 10    # README: a lost host fails the prompt within this time
SILENT_S = 15       # README: PP_SILENT_S, a rank without heartbeats fails the prompt after this

try:
    import ray  # noqa: F401
    RAY = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
except ImportError:
    RAY = None


def _netns_reason() -> str | None:
    if RAY is None:
        return "Ray is not installed (pip install -r requirements-ray.txt)"
    if shutil.which("ip") is None:
        return "no 'ip' command (Debian: apt-get install iproute2)"
    if sys.platform != "linux" or os.geteuid() != 0:
        return "network namespaces need root on Linux"
    name = f"ppchk{os.getpid() % 100000}"
    r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if r.returncode != 0:
        return f"cannot create a network namespace here: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


REASON = _netns_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")


def sh(*cmd, ns=None, check=True, timeout=60, env=None):
    full = (["ip", "netns", "exec", ns] if ns else []) + [str(c) for c in cmd]
    r = subprocess.run(full, capture_output=True, text=True, timeout=timeout, env=env)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(full)} failed ({r.returncode}): {r.stderr.strip()[-800:]}")
    return r.stdout


class Hosts:
    """Two namespaces ('head', 'worker') on a veth link; a Ray cluster over them; the driver."""

    def __init__(self):
        n = os.getpid() % 250 + 1
        tag = f"pp{os.getpid() % 100000}"
        self.ns = {"head": f"{tag}h", "worker": f"{tag}w"}
        self.link = {"head": f"{tag}h0", "worker": f"{tag}w0"}
        self.addr = {"head": f"10.254.{n}.1", "worker": f"10.254.{n}.2"}
        self.tmp = Path(tempfile.mkdtemp(prefix="pp-ray-hosts-"))
        self.token = self.tmp / "token"
        self.driver = None
        self.answers: queue.Queue = queue.Queue()
        self.torn_down = False
        self._lock = threading.Lock()

    # -- the hosts ----------------------------------------------------------------------
    def make(self):
        head, worker = self.ns["head"], self.ns["worker"]
        for ns in (head, worker):
            sh("ip", "netns", "add", ns)
        a, b = self.link["head"], self.link["worker"]
        sh("ip", "link", "add", a, "type", "veth", "peer", "name", b)
        for ns, dev, ip in ((head, a, self.addr["head"]), (worker, b, self.addr["worker"])):
            sh("ip", "link", "set", dev, "netns", ns)
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", ns, "link", "set", dev, "up")

    def env(self) -> dict:
        self.token.write_text(secrets.token_hex(32))
        self.token.chmod(0o600)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token), PP_RAY_PORT_RANGE="29500-29509",
                   RAY_USAGE_STATS_ENABLED="0")
        return env

    COMMON = ["--min-worker-port=20000", "--max-worker-port=20199", "--num-cpus=2",
              "--object-store-memory=100000000", "--disable-usage-stats"]

    def start_ray(self, env):
        self.ray_env = env
        sh(RAY, "start", "--head", f"--node-ip-address={self.addr['head']}", "--port=6379",
           "--include-dashboard=false", f"--temp-dir={self.tmp / 'head'}", *self.COMMON,
           ns=self.ns["head"], env=env, timeout=90)
        self.join_worker("worker")

    def join_worker(self, temp: str):
        sh(RAY, "start", f"--address={self.addr['head']}:6379", f"--node-ip-address={self.addr['worker']}",
           f"--temp-dir={self.tmp / temp}", *self.COMMON, ns=self.ns["worker"], env=self.ray_env, timeout=90)

    def start_driver(self, env, model):
        env = dict(env, PP_TEST_RAY_ADDRESS=f"{self.addr['head']}:6379", PP_TEST_MODEL=str(model),
                   PYTHONUNBUFFERED="1", PP_TEST_STARTUP_S="90")
        log = open(self.tmp / "driver.log", "w")
        self.driver = subprocess.Popen(["ip", "netns", "exec", self.ns["head"], sys.executable,
                                        str(TESTS / "ray_hosts_driver.py")], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, stderr=log, text=True, env=env)

        def read():
            for line in self.driver.stdout:
                if line.startswith("@@"):
                    self.answers.put(json.loads(line[2:]))
            self.answers.put({"eof": True})
        threading.Thread(target=read, daemon=True).start()
        assert self.wait(lambda a: a.get("event") == "ready", 120)

    # -- talking to the driver ------------------------------------------------------------
    def wait(self, pred, timeout):
        deadline = time.monotonic() + timeout
        while True:
            try:
                a = self.answers.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"the driver did not answer within {timeout} s; its log:\n{self.driver_log()}")
            if a.get("eof"):
                raise RuntimeError(f"the driver exited; its log:\n{self.driver_log()}")
            if pred(a):
                return a

    def ask(self, timeout=150, **cmd):
        self.driver.stdin.write(json.dumps(cmd) + "\n")
        self.driver.stdin.flush()
        a = self.wait(lambda a: a.get("done") == cmd["cmd"], timeout)
        if "traceback" in a:
            raise AssertionError(f"{a['error']}\n{a['traceback']}")
        return a

    def driver_log(self) -> str:
        try:
            return (self.tmp / "driver.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    # -- what runs where ---------------------------------------------------------------------
    def pids(self, host) -> list[int]:
        return [int(p) for p in sh("ip", "netns", "pids", self.ns[host], check=False).split()]

    def sockets(self, host, state="listening") -> list[tuple[str, str]]:
        """(local address, process) of the namespace's TCP sockets in ``state``."""
        out = sh("ss", "-Htnp", "state", state, ns=self.ns[host], check=False)
        rows = []
        for line in out.splitlines():
            parts = line.split()
            local = parts[2] if state == "listening" else parts[2]
            rows.append((local, parts[-1] if "users:" in parts[-1] else ""))
        return rows

    def kill_host(self, host):
        for p in self.pids(host):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def teardown(self):
        with self._lock:
            if self.torn_down:
                return
            self.torn_down = True
        if self.driver is not None and self.driver.poll() is None:
            try:
                self.driver.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.driver.stdin.flush()
                self.driver.wait(timeout=20)
            except Exception:
                pass
        for host in ("worker", "head"):
            for _ in range(3):  # ray's daemons may start a child while we kill
                self.kill_host(host)
                time.sleep(0.2)
        if self.driver is not None:
            try:
                self.driver.kill()
            except OSError:
                pass
        for ns in self.ns.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # removes the veth pair too
        shutil.rmtree(self.tmp, ignore_errors=True)


def _listeners() -> set[str]:
    """Local addresses of the TCP listeners of this machine's own (root) namespace."""
    return {line.split()[2] for line in sh("ss", "-Htln").splitlines() if line.strip()}


@pytest.fixture(scope="module")
def hosts():
    from make_models import cached_model_files
    if find_comfy_root() is None:
        pytest.skip("ComfyUI not found (COMFYUI_ROOT)")
    model = cached_model_files()["wan21_t2v"]
    h = Hosts()
    h.root_listeners = _listeners()
    watchdog = threading.Timer(TIME_LIMIT_S, h.teardown)  # bounded in time, whatever hangs
    watchdog.daemon = True
    watchdog.start()
    t0 = time.monotonic()
    try:
        h.make()
        env = h.env()
        h.start_ray(env)
        h.start_driver(env, model)
        print(f"two hosts {h.addr}, Ray cluster and driver up in {time.monotonic() - t0:.1f} s")
        yield h
    finally:
        watchdog.cancel()
        h.teardown()
        assert not any(ns in sh("ip", "netns", "list") for ns in h.ns.values()), "a namespace was left behind"
        assert not h.tmp.exists()


def test_pp2_one_stage_per_host_equals_stock(hosts):
    a = hosts.ask(cmd="parity", world=2)
    print(f"PP2 across hosts: rel-L2 {a['rel_l2']:.2e}, nodes {a['nodes']}, rendezvous {a['rendezvous']}, "
          f"{a['seconds']:.1f} s (incl. actor start)")
    assert a["rel_l2"] <= TOL
    assert a["layout"] == {"pp": 2, "cfg": 1, "sp": 1}
    assert sorted(a["nodes"]) == sorted(hosts.addr.values())  # spread: one stage on each host
    assert a["rendezvous"].startswith(f"tcp://{a['nodes'][0]}:") and 29500 <= int(a["rendezvous"].rsplit(":", 1)[1]) <= 29509


def test_pp2_x_cfg2_across_hosts_equals_stock(hosts):
    a = hosts.ask(cmd="parity", world=4)
    print(f"PP2 x CFG2 across hosts: rel-L2 {a['rel_l2']:.2e}, nodes {a['nodes']}")
    assert a["rel_l2"] <= TOL
    assert a["layout"] == {"pp": 2, "cfg": 2, "sp": 1}
    assert sorted(a["nodes"]) == sorted([hosts.addr["head"]] * 2 + [hosts.addr["worker"]] * 2)


def test_cancel_across_hosts_then_next_prompt(hosts):
    a = hosts.ask(cmd="interrupt")
    print(f"cancel across hosts: {a}")
    assert sorted(a["nodes"]) == sorted(hosts.addr.values()), "spread: one stage on each host"
    assert a["interrupted"] and 2 <= a["steps_seen"] < 400
    assert a["same_pids"] and a["rel_l2_after"] <= TOL


def test_ten_prompts_no_growth_and_no_public_listener(hosts):
    hosts.ask(cmd="repeat", n=1)

    def snapshot():
        return {h: (len(hosts.pids(h)), len(hosts.sockets(h)), len(hosts.sockets(h, "established")))
                for h in ("head", "worker")}
    before = snapshot()
    a = hosts.ask(cmd="repeat", n=10)
    time.sleep(1.0)
    after = snapshot()
    print(f"10 prompts: {[round(w, 2) for w in a['walls']]} s; (processes, listening, connections) "
          f"before {before} after {after}")
    for h in before:
        assert after[h][0] <= before[h][0], f"processes grew on the {h} host"
        assert after[h][1] <= before[h][1], f"listening sockets grew on the {h} host"
        assert after[h][2] <= before[h][2] + 2, f"connections grew on the {h} host"
    allowed = {"*", "0.0.0.0", "[::]", "127.0.0.1", "[::1]", "[::ffff:127.0.0.1]"}
    allowed |= set(hosts.addr.values()) | {f"[::ffff:{ip}]" for ip in hosts.addr.values()}
    for h in ("head", "worker"):
        for local, proc in hosts.sockets(h):
            assert local.rsplit(":", 1)[0] in allowed, f"{h} host: {proc} listens on {local}"
    outside = [a for a in _listeners() - hosts.root_listeners
               if a.rsplit(":", 1)[0] not in ("127.0.0.1", "[::1]", "[::ffff:127.0.0.1]")]
    assert not outside, f"new listeners outside the namespaces: {outside}"


def test_lost_host_fails_the_prompt_with_rank_and_node_then_next_prompt_runs(hosts):
    hosts.driver.stdin.write(json.dumps({"cmd": "lost"}) + "\n")
    hosts.driver.stdin.flush()
    ev = hosts.wait(lambda a: a.get("event") == "running", 150)
    assert hosts.addr["worker"] in ev["nodes"], f"no rank on the worker host: {ev['nodes']}"
    worker_rank = ev["nodes"].index(hosts.addr["worker"])
    t_cut = time.monotonic()
    hosts.kill_host("worker")  # every Ray process of the worker host: the machine is gone
    a = hosts.wait(lambda a: a.get("done") == "lost", LOST_NODE_S + 30)
    took = time.monotonic() - t_cut
    print(f"lost host reported after {took:.1f} s: {a.get('error')}")
    assert "error" in a and took <= LOST_NODE_S
    assert a["rank"] == worker_rank and a["node"] == hosts.addr["worker"]
    assert f"rank {worker_rank} on node {hosts.addr['worker']}" in a["error"]
    assert a["state"] == "failed"
    b = hosts.ask(cmd="parity", world=2, timeout=200)  # what is left: the head host's 2 CPUs
    print(f"next prompt on what is left: nodes {b['nodes']}, rel-L2 {b['rel_l2']:.2e}")
    assert b["nodes"] == [hosts.addr["head"]] * 2 and b["rel_l2"] <= TOL


def test_cut_link_fails_the_prompt_with_rank_and_node_then_next_prompt_runs(hosts):
    """The worker host unreachable without closing anything (a cut cable: its link down, its
    processes alive): no error reaches anyone, the watchdog names the silent rank."""
    hosts.join_worker("worker2")  # the worker host again (the test above killed it)
    deadline = time.monotonic() + 60
    while hosts.addr["worker"] not in hosts.ask(cmd="alive_nodes")["nodes"]:
        assert time.monotonic() < deadline, "the worker host did not rejoin the cluster within 60 s"
        time.sleep(0.5)
    hosts.driver.stdin.write(json.dumps({"cmd": "lost", "fresh": True}) + "\n")
    hosts.driver.stdin.flush()
    ev = hosts.wait(lambda a: a.get("event") == "running", 150)
    assert hosts.addr["worker"] in ev["nodes"], f"no rank on the worker host: {ev['nodes']}"
    worker_rank = ev["nodes"].index(hosts.addr["worker"])
    t_cut = time.monotonic()
    sh("ip", "-n", hosts.ns["worker"], "link", "set", hosts.link["worker"], "down")
    a = hosts.wait(lambda a: a.get("done") == "lost", SILENT_S + 60)
    took = time.monotonic() - t_cut
    print(f"cut link reported after {took:.1f} s: {a.get('error')}")
    assert "error" in a and took <= SILENT_S + 10
    assert a["rank"] == worker_rank and a["node"] == hosts.addr["worker"]
    assert f"rank {worker_rank} on node {hosts.addr['worker']}" in a["error"]
    assert "no heartbeat" in a["error"] and "unreachable or down" in a["error"]
    t_next = time.monotonic()
    b = hosts.ask(cmd="parity", world=2, timeout=150)  # waits until Ray declares the node lost
    print(f"next prompt on what is left after {time.monotonic() - t_next:.1f} s: nodes {b['nodes']}, "
          f"rel-L2 {b['rel_l2']:.2e}")
    assert b["nodes"] == [hosts.addr["head"]] * 2 and b["rel_l2"] <= TOL
