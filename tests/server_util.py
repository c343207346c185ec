"""Tier 3 harness: one real ComfyUI server per test session, with this pack loaded.

The server runs from the ComfyUI source tree (``tests/comfy_env.find_comfy_root``) with
``--base-directory`` pointing at a temporary folder, so nothing inside the ComfyUI tree
is touched::

    <base>/custom_nodes/comfyui-pipeline-parallel -> this repository
    <base>/custom_nodes/pp_test_nodes             -> tests/comfy_test_nodes (PPTestConditioning)
    <base>/models/diffusion_models/pp_tiny_*.safetensors -> tests/make_models.py cache
    <base>/output, <base>/user, <base>/input, <base>/temp

and ``--cpu --listen 127.0.0.1 --port <free> --disable-auto-launch --preview-method
latent2rgb --database-url sqlite:///:memory: --disable-all-custom-nodes
--whitelist-custom-nodes <both folders>``.  Its stdout/stderr go to
``test-artifacts/comfy_server.log``; the tail of that log is attached to every harness
failure (timeouts, a server that exits, missing nodes).

Use from a test module::

    def test_x(comfy_server):      # the session fixture, registered by tests/conftest.py
        res = comfy_server.run(graph, timeout=60)   # submit + follow the websocket
        assert res.status == "success", res.describe()
        lat = comfy_server.read_latent(res, node_id="6")

The websocket follower is aiohttp (ComfyUI's own dependency) on a background thread;
it announces ``supports_preview_metadata`` so preview frames arrive as binary event 4
with the id of the node that sent them.
"""
from __future__ import annotations

import asyncio
import copy
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
WORKFLOWS = TESTS / "workflows"
ARTIFACTS = REPO / "test-artifacts"
PACK_NAME = "comfyui-pipeline-parallel"
TEST_PACK_NAME = "pp_test_nodes"
# Stable names under models/diffusion_models (the workflow JSON files use these).
MODEL_NAMES = {"wan21_t2v": "pp_tiny_wan21_t2v.safetensors",
               "flux1_dev": "pp_tiny_flux1_dev.safetensors"}
TERMINAL = ("execution_success", "execution_error", "execution_interrupted")
STARTUP_TIMEOUT = float(os.environ.get("PP_TEST_SERVER_STARTUP_TIMEOUT", "180"))

# Per-test wall times, printed by tests/conftest.py's terminal summary.
TIMINGS: list[tuple[str, float, str]] = []


# ---------------------------------------------------------------------------------------
# workflows
# ---------------------------------------------------------------------------------------

def load_workflow(name: str) -> dict:
    """An API-format graph from tests/workflows/ (a fresh copy)."""
    with open(WORKFLOWS / name) as f:
        g = json.load(f)
    return copy.deepcopy(g)


def find_nodes(graph: dict, class_type: str) -> list[str]:
    return [k for k, v in graph.items() if v.get("class_type") == class_type]


def node_id(graph: dict, class_type: str) -> str:
    """The id of the only node of that class in the graph."""
    ids = find_nodes(graph, class_type)
    assert len(ids) == 1, f"expected one {class_type} node, found {ids}"
    return ids[0]


def inputs(graph: dict, class_type: str) -> dict:
    """The inputs dict of the only node of that class (edit it in place)."""
    return graph[node_id(graph, class_type)]["inputs"]


# ---------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------

@dataclass
class Preview:
    event: int               # 1/2 (plain JPEG/PNG) or 4 (with metadata)
    node_id: str | None       # from the metadata of event 4
    nbytes: int
    image: bytes = b""        # the encoded image

    @property
    def size(self) -> tuple[int, int] | None:
        """(width, height) of the preview image."""
        import io
        from PIL import Image
        try:
            return Image.open(io.BytesIO(self.image)).size
        except Exception:
            return None


@dataclass
class RunResult:
    prompt_id: str | None
    http_status: int
    http_body: object
    status: str = "rejected"          # success | error | interrupted | rejected | timeout
    events: list = field(default_factory=list)     # (type, data) JSON messages, in order
    previews: list = field(default_factory=list)   # Preview
    times: list = field(default_factory=list)      # arrival time of each event (monotonic)
    t_submit: float = 0.0
    wall: float = 0.0
    log_tail: str = ""

    # -- views -----------------------------------------------------------------------
    def of_type(self, t: str) -> list[dict]:
        return [d for (ty, d) in self.events if ty == t]

    def progress(self, node: str | None = None) -> list[dict]:
        return [d for d in self.of_type("progress") if node is None or str(d.get("node")) == str(node)]

    def progress_times(self, node: str | None = None) -> list[float]:
        return [t for (ty, d), t in zip(self.events, self.times)
                if ty == "progress" and (node is None or str(d.get("node")) == str(node))]

    def event_time(self, t: str) -> float | None:
        for (ty, _), tm in zip(self.events, self.times):
            if ty == t:
                return tm
        return None

    def executing(self) -> list:
        return [d.get("node") for d in self.of_type("executing")]

    def previews_of(self, node: str | None) -> list[Preview]:
        return [p for p in self.previews if node is None or p.node_id in (None, str(node))]

    @property
    def error(self) -> dict | None:
        errs = self.of_type("execution_error")
        return errs[0] if errs else None

    def error_text(self) -> str:
        """Everything the server said about a failure (HTTP 400 body or execution_error)."""
        if self.http_status != 200:
            return json.dumps(self.http_body) if not isinstance(self.http_body, str) else self.http_body
        e = self.error
        if e:
            return f"{e.get('exception_type')}: {e.get('exception_message')} (node {e.get('node_id')} {e.get('node_type')})"
        return ""

    def describe(self) -> str:
        s = f"prompt {self.prompt_id}: status={self.status} http={self.http_status} wall={self.wall:.1f}s"
        if self.http_status != 200:
            s += f"\nbody: {json.dumps(self.http_body)[:4000]}"
        e = self.error
        if e:
            tb = "".join(e.get("traceback") or [])[-3000:]
            s += (f"\nexecution_error in node {e.get('node_id')} ({e.get('node_type')}): "
                  f"{e.get('exception_type')}: {e.get('exception_message')}\n{tb}")
        if self.log_tail and self.status not in ("success",):
            s += f"\n--- server log tail ---\n{self.log_tail}"
        return s


# ---------------------------------------------------------------------------------------
# websocket follower
# ---------------------------------------------------------------------------------------

class WSFollower:
    """Collects every websocket message of one client id on a background thread."""

    def __init__(self, base_url: str, client_id: str):
        self.url = base_url.replace("http://", "ws://") + f"/ws?clientId={client_id}"
        # ("json", type, data, t) | ("bin", event, Preview, t); t = time.monotonic() on arrival
        self.messages: list = []
        self.cv = threading.Condition()
        self.connected = threading.Event()
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="pp-test-ws", daemon=True)

    def start(self, timeout: float = 30) -> "WSFollower":
        self._thread.start()
        if not self.connected.wait(timeout):
            raise RuntimeError(f"websocket {self.url} did not connect in {timeout}s: {self.error!r}")
        return self

    def _run(self):
        try:
            asyncio.run(self._main())
        except BaseException as e:  # reported through .error and the waiters
            self.error = e
        finally:
            with self.cv:
                self.cv.notify_all()

    async def _main(self):
        import aiohttp

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(self.url, heartbeat=30, max_msg_size=0) as ws:
                await ws.send_str(json.dumps({"type": "feature_flags",
                                              "data": {"supports_preview_metadata": True}}))
                self.connected.set()
                stop_task = asyncio.ensure_future(self._stop.wait())
                while True:
                    recv = asyncio.ensure_future(ws.receive())
                    done, _ = await asyncio.wait({recv, stop_task}, return_when=asyncio.FIRST_COMPLETED)
                    if stop_task in done:
                        recv.cancel()
                        break
                    msg = recv.result()
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        d = json.loads(msg.data)
                        self._add(("json", d.get("type"), d.get("data") or {}, time.monotonic()))
                    elif msg.type == aiohttp.WSMsgType.BINARY:
                        self._add(("bin",) + _parse_binary(msg.data) + (time.monotonic(),))
                    elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING,
                                      aiohttp.WSMsgType.ERROR):
                        raise RuntimeError(f"websocket closed: {msg!r}")

    def _add(self, item):
        with self.cv:
            self.messages.append(item)
            self.cv.notify_all()

    def mark(self) -> int:
        with self.cv:
            return len(self.messages)

    def wait_for(self, pred, start: int, timeout: float):
        """Wait until pred(message) holds for a message at index >= start; its index or None."""
        deadline = time.monotonic() + timeout
        i = start
        with self.cv:
            while True:
                while i < len(self.messages):
                    if pred(self.messages[i]):
                        return i
                    i += 1
                left = deadline - time.monotonic()
                if left <= 0 or self.error is not None or not self._thread.is_alive():
                    return None
                self.cv.wait(min(left, 0.5))

    def slice(self, a: int, b: int | None = None) -> list:
        with self.cv:
            return list(self.messages[a:b])

    def stop(self):
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            try:
                self._loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:
                pass
        self._thread.join(5)


def _parse_binary(data: bytes):
    event = struct.unpack(">I", data[:4])[0]
    node, image = None, b""
    if event == 4 and len(data) >= 8:
        n = struct.unpack(">I", data[4:8])[0]
        try:
            meta = json.loads(data[8:8 + n])
            node = meta.get("node_id")
            node = None if node is None else str(node)
        except ValueError:
            pass
        image = data[8 + n:]
    elif event == 1 and len(data) >= 8:
        event = struct.unpack(">I", data[4:8])[0]  # 1 = JPEG, 2 = PNG (plain preview)
        image = data[8:]
    return event, Preview(event=event, node_id=node, nbytes=len(data), image=image)


# ---------------------------------------------------------------------------------------
# the server
# ---------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, comfy_root: Path, models: dict[str, Path], base: Path, log_path: Path):
        self.comfy_root = Path(comfy_root)
        self.base = Path(base)
        self.log_path = Path(log_path)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.client_id = uuid.uuid4().hex
        self.proc: subprocess.Popen | None = None
        self.ws: WSFollower | None = None
        self.object_info: dict = {}
        self._log = None
        self._layout(models)

    # -- setup / teardown ----------------------------------------------------------
    def _layout(self, models):
        for d in ("custom_nodes", "models/diffusion_models", "output", "input", "temp", "user"):
            (self.base / d).mkdir(parents=True, exist_ok=True)
        os.symlink(REPO, self.base / "custom_nodes" / PACK_NAME)
        os.symlink(TESTS / "comfy_test_nodes", self.base / "custom_nodes" / TEST_PACK_NAME)
        for key, name in MODEL_NAMES.items():
            os.symlink(Path(models[key]).resolve(), self.base / "models" / "diffusion_models" / name)

    @property
    def output_dir(self) -> Path:
        return self.base / "output"

    def command(self) -> list[str]:
        return [sys.executable, str(self.comfy_root / "main.py"),
                "--base-directory", str(self.base),
                "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                "--disable-auto-launch", "--preview-method", "latent2rgb",
                # a flag that changes the kernels (CPU default: sub-quadratic attention): the
                # workers must run with it too (test_server_e2e checks /pp/status)
                "--use-pytorch-cross-attention",
                "--output-directory", str(self.output_dir),
                "--user-directory", str(self.base / "user"),
                "--database-url", "sqlite:///:memory:",
                "--disable-all-custom-nodes",
                "--whitelist-custom-nodes", PACK_NAME, TEST_PACK_NAME]

    def start(self) -> "ComfyServer":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        self._log.write("$ " + " ".join(self.command()) + "\n")
        self._log.flush()
        env = dict(os.environ, PYTHONUNBUFFERED="1", COMFYUI_ROOT=str(self.comfy_root))
        # Own session: teardown can find (and end) anything the server left behind.
        self.proc = subprocess.Popen(self.command(), cwd=str(self.comfy_root), env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        t0 = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.proc.returncode} during startup\n"
                                   f"{self.log_tail()}")
            try:
                status, body = self.get("/object_info", timeout=10)
                if status == 200:
                    self.object_info = body
                    break
            except OSError:
                pass
            if time.monotonic() - t0 > STARTUP_TIMEOUT:
                raise RuntimeError(f"ComfyUI did not answer /object_info in {STARTUP_TIMEOUT:.0f}s\n"
                                   f"{self.log_tail()}")
            time.sleep(0.5)
        self.startup_s = time.monotonic() - t0
        self.ws = WSFollower(self.url, self.client_id).start()
        return self

    def stop(self):
        if self.ws is not None:
            self.ws.stop()
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.post("/interrupt", {}, timeout=5)
            except OSError:
                pass
            self.proc.send_signal(signal.SIGINT)   # ComfyUI's own clean shutdown path
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
        leftovers = self._session_leftovers()
        if leftovers:
            # Workers must exit with the host process (DESIGN §5); say so, then clean up.
            msg = f"processes left behind by the ComfyUI server after exit: {leftovers}"
            print(msg, file=sys.stderr)
            if self._log:
                self._log.write(f"\n[harness] {msg}\n")
            for pid in leftovers:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        if self._log:
            self._log.close()

    def _session_leftovers(self) -> list[int]:
        """Pids still in the server's session (it was started as a session leader)."""
        if self.proc is None:
            return []
        sid = self.proc.pid
        out = []
        for p in Path("/proc").iterdir():
            if not p.name.isdigit():
                continue
            try:
                fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[3]) == sid and int(p.name) != sid and fields[0] != "Z":
                    out.append(int(p.name))
            except (OSError, IndexError, ValueError):
                pass
        return out

    def log_tail(self, n: int = 80) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no server log)"
        return "\n".join(lines[-n:])

    # -- HTTP ----------------------------------------------------------------------
    def _request(self, method, path, body=None, timeout=30):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw, status = r.read(), r.status
        except urllib.error.HTTPError as e:
            raw, status = e.read(), e.code
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode(errors="replace")

    def get(self, path, timeout=30):
        return self._request("GET", path, timeout=timeout)

    def post(self, path, body, timeout=30):
        return self._request("POST", path, body, timeout=timeout)

    def has_nodes(self, *class_types: str) -> list[str]:
        """Those of class_types the server does not know (refreshes /object_info)."""
        status, info = self.get("/object_info")
        if status == 200:
            self.object_info = info
        return [c for c in class_types if c not in self.object_info]

    def node_inputs(self, class_type: str, **given) -> dict:
        """A node's inputs for an API graph: ``given``, and for every other input this server's
        node has (required and optional), its default from /object_info; inputs the node does
        not have are dropped (a setting of another ComfyUI release).  Link inputs (no
        default) must be given."""
        info = self.object_info[class_type]["input"]
        out = {}
        for section in ("required", "optional"):
            for name, spec in (info.get(section) or {}).items():
                if name in given:
                    out[name] = given[name]
                elif len(spec) > 1 and isinstance(spec[1], dict) and "default" in spec[1]:
                    out[name] = spec[1]["default"]
        return out

    def require_nodes(self, *class_types: str):
        missing = self.has_nodes(*class_types)
        if missing:
            pytest.fail(f"nodes not registered by the server: {missing} (did the pack import? "
                        f"see {self.log_path})\n{self.log_tail(40)}")

    # -- the client API ------------------------------------------------------------
    def submit(self, graph: dict, extra_data: dict | None = None) -> tuple[int, object]:
        """POST /prompt; (HTTP status, parsed body).  ``extra_data``: e.g. {"preview_method": "taesd"}."""
        body = {"prompt": graph, "client_id": self.client_id}
        if extra_data:
            body["extra_data"] = extra_data
        return self.post("/prompt", body)

    def history(self, prompt_id: str, timeout: float = 10.0) -> dict:
        """The prompt's history entry.  ComfyUI records it just after it sends
        ``execution_success``, so a prompt that just ended may need a moment to appear."""
        deadline = time.monotonic() + timeout
        while True:
            status, body = self.get(f"/history/{prompt_id}")
            assert status == 200, (status, body)
            entry = (body or {}).get(prompt_id)
            if entry or time.monotonic() > deadline:
                return entry or {}
            time.sleep(0.05)

    def interrupt(self) -> int:
        return self.post("/interrupt", {})[0]

    def pp_status(self):
        """GET /pp/status: (HTTP status, body) — the pack's worker-group report."""
        return self.get("/pp/status", timeout=10)

    def run(self, graph: dict, timeout: float = 120, on_event=None, extra_data: dict | None = None) -> RunResult:
        """Submit and follow the websocket until the prompt's terminal event.

        ``on_event(index, message)`` is called for each new message while waiting (for
        tests that act mid-run, e.g. interrupt); it may return True to stop calling.
        A timeout interrupts the server, waits a little for the prompt to end, and
        returns status "timeout" (a test must then fail: never a hang).
        """
        ws = self.ws
        start = ws.mark()
        t0 = time.monotonic()
        status, body = self.submit(graph, extra_data)
        pid = body.get("prompt_id") if status == 200 and isinstance(body, dict) else None
        res = RunResult(prompt_id=pid, http_status=status, http_body=body, t_submit=t0)
        if pid is None:
            res.wall = time.monotonic() - t0
            res.log_tail = self.log_tail(40)
            return res

        def terminal(m):
            return m[0] == "json" and m[1] in TERMINAL and m[2].get("prompt_id") == pid

        end = None
        if on_event is None:
            end = ws.wait_for(terminal, start, timeout)
        else:
            deadline = t0 + timeout
            i, watching = start, True
            while end is None and time.monotonic() < deadline:
                j = ws.wait_for(lambda m: True, i, min(0.5, max(0.0, deadline - time.monotonic())))
                if j is None:
                    continue
                m = ws.slice(j, j + 1)[0]
                if terminal(m):
                    end = j
                    break
                if watching and on_event(j, m):
                    watching = False
                i = j + 1
        res.wall = time.monotonic() - t0
        if end is None:
            res.status = "timeout"
            self.interrupt()
            ws.wait_for(terminal, start, 30)
            res.log_tail = self.log_tail(80)
            msgs = ws.slice(start)
        else:
            msgs = ws.slice(start, end + 1)
            res.status = msgs[-1][1].replace("execution_", "")
        for m in msgs:
            if m[0] == "json":
                res.events.append((m[1], m[2]))
                res.times.append(m[3])
            else:
                res.previews.append(m[2])
        if res.status != "success":
            res.log_tail = res.log_tail or self.log_tail(60)
        return res

    def latent_files(self, prompt_id: str, node: str) -> list[Path]:
        """The .latent files a SaveLatent node wrote for this prompt (from /history)."""
        h = self.history(prompt_id)
        out = (h.get("outputs") or {}).get(str(node)) or {}
        files = []
        for item in out.get("latents", []):
            d = Path(folder_for(self.output_dir, item.get("type", "output"), self.base))
            files.append(d / item.get("subfolder", "") / item["filename"])
        return files

    def read_latent(self, res: RunResult, node: str | None = None):
        """The ``latent_tensor`` that the (only) SaveLatent node of this run wrote."""
        import safetensors.torch

        assert res.status == "success", res.describe()
        h = self.history(res.prompt_id)
        outputs = h.get("outputs") or {}
        if node is None:
            cands = [k for k, v in outputs.items() if v.get("latents")]
            assert len(cands) == 1, f"expected one SaveLatent output, got {list(outputs)}"
            node = cands[0]
        files = self.latent_files(res.prompt_id, node)
        assert files, f"no .latent output for node {node} in history: {outputs}"
        return safetensors.torch.load_file(str(files[-1]))["latent_tensor"]


def run_ok_or_fail(srv: ComfyServer, graph: dict, timeout: float):
    """Run a graph; the test fails with everything the server said unless it succeeded."""
    res = srv.run(graph, timeout=timeout)
    assert res.status == "success", res.describe()
    return res


def folder_for(output_dir: Path, kind: str, base: Path) -> Path:
    return {"output": output_dir, "temp": base / "temp", "input": base / "input"}.get(kind, output_dir)


# ---------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """One real ComfyUI server (CPU) with this pack and the test nodes, for the session.

    Skips (with the reason) when ComfyUI is not importable; fails when it is but the
    server does not come up.
    """
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    from comfy_env import import_comfy

    root, reason = import_comfy()
    if root is None:
        from comfy_env import must_run
        if must_run():
            pytest.fail(f"tier 3 (server end to end) cannot run: {reason}", pytrace=False)
        pytest.skip(f"tier 3 (server end to end): {reason}")
    from make_models import cached_model_files

    models = cached_model_files()
    base = tmp_path_factory.mktemp("comfy_base")
    srv = ComfyServer(root, models, base, ARTIFACTS / "comfy_server.log")
    try:
        srv.start()
    except Exception as e:
        srv.stop()
        pytest.fail(f"ComfyUI server did not start: {e}", pytrace=False)
    print(f"\n[tier 3] ComfyUI {root} on {srv.url} (up in {srv.startup_s:.1f}s), log {srv.log_path}")
    ACTIVE.append(srv)
    try:
        yield srv
    finally:
        ACTIVE.clear()
        srv.stop()
        shutil.rmtree(base, ignore_errors=True)


ACTIVE: list = []  # the session's server, once started


@pytest.fixture(scope="module", autouse=True)
def release_server_groups():
    """After each test module, the server shuts its worker groups down (POST /pp/shutdown):
    one 2-core, 24 GB machine runs the whole suite, and a module's placed models are of no
    use to the next one."""
    yield
    for srv in ACTIVE:
        try:
            srv.post("/pp/shutdown", {}, timeout=60)
        except OSError:
            pass


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Per-test wall times of the tier-3 tests (conftest.py re-exports this hook)."""
    if not TIMINGS:
        return
    tr = terminalreporter
    tr.write_sep("-", "tier 3 (server end to end): wall time per test")
    for name, wall, outcome in TIMINGS:
        tr.write_line(f"{wall:7.1f}s  {outcome:7s}  {name}")
    tr.write_line(f"{sum(w for _, w, _ in TIMINGS):7.1f}s  total")
