"""The agent stack and the demo stack, deployed with ``docker stack deploy`` on the swarm lab.

Built on ``tests.swarmlab`` (3 nodes, node 2 the manager) but without its host-process
agents: the agents run as the global service of compose/stack.yml, in the image that
compose/build_offline.py makes without a registry.

- ``build_images()``: runs compose/build_offline.py once per content (key: the build script,
  the project's sources, compose/, the interpreter and the host binaries copied), cached in
  ``/var/tmp/mtest-cache/stack-images/<key>`` (the harness's cache; the newest two kept).
- ``StackLab``: loads the images on every node (``docker load``), writes the lab copies of
  the stack files (``LAB_DIFFERENCES``), creates the token secret and deploys the stacks with
  the commands of docs/deploy.md, against the manager's engine.
- ``HttpLoad``: a closed-loop HTTP load over the nodes' published port, bounded in count and
  time, that keeps every request's outcome, so failures and per-node outages can be counted.

The agents' admin API is on 127.0.0.1:9901 of each node (the stack's setting), read from
inside the node's network namespace.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import yaml

from tests.dockerlab import CACHE, LabError
from tests.swarmlab import ALL_NODES, SwarmLab, SwarmLabError

ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = ROOT / "compose" / "build_offline.py"
IMAGE_CACHE = CACHE / "stack-images"
STACK_FILE = ROOT / "compose" / "stack.yml"
DEMO_FILE = ROOT / "compose" / "demo-stack.yml"
ADMIN = "127.0.0.1:9901"  # compose/stack.yml's --admin
DEMO_PORT = 8080  # demo-stack.yml's mesh.publish of web
AGENT_TAG, WEB_TAG, REDIS_TAG = "mesh-agent:latest", "mesh-demo-web:latest", "mesh-demo-redis:latest"

# What the lab's copies of the stack files change, and why (the test's docstring and docs/deploy.md list them too).
LAB_DIFFERENCES = (
    "images: MESH_IMAGE, DEMO_WEB_IMAGE and DEMO_REDIS_IMAGE are the image ids (sha256:...) of the images built by "
    "compose/build_offline.py and loaded on every node: with a tag, every task would first try a pull",
    "the agent's docker socket: every lab node's dockerd has its own socket path on the one host, so the bind "
    "mount's source is /run/mtest/<pid>/docker-sockets/{{.Node.Hostname}}.sock (a swarm template; a symlink per "
    "node to its socket) instead of /var/run/docker.sock",
    "the visualizer service is left out: dockersamples/visualizer cannot be had without a registry",
)


class StackLabError(RuntimeError):
    pass


# -- images -----------------------------------------------------------------------------------------
def _key_inputs() -> list[Path]:
    files = [BUILD_SCRIPT, ROOT / "pyproject.toml", ROOT / "README.md"]
    files += sorted(p for p in (ROOT / "compose").rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    for pkg in ("mesh", "discovery", "meshagent", "cluster"):
        files += sorted(p for p in (ROOT / pkg).rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    return files


def build_key() -> str:
    """Digest of everything the images are made of."""
    h = hashlib.sha256()
    for p in _key_inputs():
        h.update(str(p.relative_to(ROOT)).encode() + b"\0" + p.read_bytes() + b"\0")
    h.update(sys.version.encode())
    for binary in (os.path.realpath(sys.executable), shutil.which("busybox"), shutil.which("redis-server")):
        if binary:
            st = os.stat(binary)
            h.update(f"{binary} {st.st_size} {st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def ensure_redis_server() -> None:
    """redis-server on the host (Debian's package; the redis image is made from it)."""
    if shutil.which("redis-server"):
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise LabError("redis-server is missing and cannot be installed (needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=300, check=False)
    res = subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "redis-server"],
                         env=env, capture_output=True, timeout=600, check=False)  # fmt: skip
    if res.returncode != 0 or not shutil.which("redis-server"):
        raise LabError(f"apt-get install redis-server failed: {res.stderr.decode(errors='replace')[-500:]}")


@dataclass
class Images:
    archive: Path
    ids: dict[str, str]  # tag -> image id
    seconds: float  # build time (0 when cached)
    cached: bool


def build_images(timeout: float = 900) -> Images:
    """The stack's images (compose/build_offline.py), built once per content and cached."""
    ensure_redis_server()
    key = build_key()
    out = IMAGE_CACHE / key
    if (out / "images.json").exists() and (out / "images.tar").exists():
        return Images(out / "images.tar", json.loads((out / "images.json").read_text()), 0.0, True)
    IMAGE_CACHE.mkdir(parents=True, exist_ok=True)
    tmp = IMAGE_CACHE / f".{key}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.monotonic()
    try:
        res = subprocess.run([sys.executable, str(BUILD_SCRIPT), str(tmp)], capture_output=True, text=True,
                             timeout=timeout, check=False, cwd=ROOT)  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"compose/build_offline.py did not finish within {timeout}s") from exc
    if res.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise LabError(f"compose/build_offline.py failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    seconds = time.monotonic() - t0
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    # keep the newest two builds (another branch's images may be wanted again soon)
    builds = sorted((d for d in IMAGE_CACHE.iterdir() if d.is_dir() and not d.name.startswith(".")),
                    key=lambda d: d.stat().st_mtime, reverse=True)  # fmt: skip
    for old in builds[2:]:
        shutil.rmtree(old, ignore_errors=True)
    return Images(out / "images.tar", json.loads((out / "images.json").read_text()), seconds, False)


# -- load -------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    t: float  # start, monotonic
    node: int
    ok: bool
    host: str = ""  # the replica that answered
    visits: int | None = None
    error: str = ""


@dataclass
class LoadReport:
    ok: int = 0
    failed: int = 0
    seconds: float = 0.0
    errors: Counter = field(default_factory=Counter)  # "node i: reason" -> count
    by_node: Counter = field(default_factory=Counter)  # node -> answered
    replicas: Counter = field(default_factory=Counter)  # hostname -> answered
    outage: dict[int, float] = field(default_factory=dict)  # node -> longest run of failures (s)
    failing: dict[int, tuple[float, float]] = field(default_factory=dict)  # node -> first, last failure (s from start)

    def __str__(self) -> str:
        out = {i: round(s, 2) for i, s in sorted(self.outage.items())}
        return (f"{self.ok} ok, {self.failed} failed in {self.seconds:.1f}s; per node {dict(self.by_node)}; "
                f"outage per node (s) {out}; failing (first, last s) {self.failing}; errors {dict(self.errors)}")  # fmt: skip


_ANSWER = re.compile(r"^Hello from (\S+)! Visits: (\d+|unknown.*)$")


def http_get(addr: str, port: int, path: str = "/", timeout: float = 3.0) -> tuple[int, str]:
    """One HTTP/1.0 GET; returns (status, body).  Raises OSError (ConnectionError for an empty answer)."""
    with socket.create_connection((addr, port), timeout=timeout) as s:
        s.settimeout(timeout)
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n".encode())
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    data = b"".join(chunks)
    if not data:
        raise ConnectionError("empty answer (closed before any byte)")
    head, _, body = data.partition(b"\r\n\r\n")
    m = re.match(rb"^HTTP/1\.[01] (\d{3})", head)
    if not m:
        raise ConnectionError(f"not an HTTP answer: {data[:60]!r}")
    return int(m.group(1)), body.decode(errors="replace")


def demo_answer(body: str) -> tuple[str, int | None]:
    """ "Hello from <host>! Visits: N" -> (host, N); N is None when the app could not reach redis."""
    m = _ANSWER.match(body.strip())
    if not m:
        raise ValueError(f"not the demo's answer: {body[:120]!r}")
    return m.group(1), int(m.group(2)) if m.group(2).isdigit() else None


class HttpLoad:
    """Closed-loop GET / over (node, addr, port) targets from ``threads`` threads, bounded by
    ``max_requests`` and ``max_seconds``.  A request fails when it gets no full HTTP answer
    (refused, reset, timed out, empty) or a status other than 200."""

    def __init__(self, targets: list[tuple[int, str, int]], *, threads: int = 6, max_requests: int = 20000,
                 max_seconds: float = 60.0, timeout: float = 3.0) -> None:  # fmt: skip
        self.targets = targets
        self.threads = threads
        self.max_requests = max_requests
        self.max_seconds = max_seconds
        self.timeout = timeout
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._issued = 0
        self._workers: list[threading.Thread] = []
        self._t0 = 0.0

    def start(self) -> HttpLoad:
        self._t0 = time.monotonic()
        for k in range(self.threads):
            t = threading.Thread(target=self._work, args=(k,), daemon=True)
            t.start()
            self._workers.append(t)
        return self

    def _work(self, k: int) -> None:
        n = k
        deadline = self._t0 + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            with self._lock:
                if self._issued >= self.max_requests:
                    return
                self._issued += 1
            node, addr, port = self.targets[n % len(self.targets)]
            n += 1
            t = time.monotonic()
            try:
                status, body = http_get(addr, port, timeout=self.timeout)
                if status != 200:
                    raise ConnectionError(f"HTTP {status}")
                host, visits = demo_answer(body)
                out = Outcome(t, node, True, host, visits)
            except (OSError, ValueError) as exc:
                out = Outcome(t, node, False, error=type(exc).__name__)
            with self._lock:
                self.outcomes.append(out)

    def requests(self) -> int:
        with self._lock:
            return len(self.outcomes)

    def wait_requests(self, n: int, timeout: float = 30) -> None:
        """Until ``n`` requests are done (the load is under way before the action it measures)."""
        deadline = time.monotonic() + timeout
        while self.requests() < n:
            if time.monotonic() > deadline:
                raise StackLabError(f"the load made {self.requests()} of {n} requests in {timeout}s")
            time.sleep(0.05)

    def stop(self) -> LoadReport:
        self._stop.set()
        for t in self._workers:
            t.join(timeout=self.timeout + 5)
        rep = LoadReport(seconds=time.monotonic() - self._t0)
        with self._lock:
            outcomes = sorted(self.outcomes, key=lambda o: o.t)
        for o in outcomes:
            if o.ok:
                rep.ok += 1
                rep.by_node[o.node] += 1
                rep.replicas[o.host] += 1
            else:
                rep.failed += 1
                rep.errors[f"node{o.node}: {o.error}"] += 1
                first = rep.failing.get(o.node, (o.t - self._t0,))[0]
                rep.failing[o.node] = (round(first, 2), round(o.t - self._t0, 2))
        rep.outage = outages(outcomes)
        return rep


def outages(outcomes: list[Outcome]) -> dict[int, float]:
    """Per node, the longest time from a failed request's start to the next successful one's start
    (0 when no request to it failed)."""
    out: dict[int, float] = {}
    for node in sorted({o.node for o in outcomes}):
        first_fail = None
        longest = 0.0
        for o in (o for o in outcomes if o.node == node):
            if not o.ok and first_fail is None:
                first_fail = o.t
            elif o.ok and first_fail is not None:
                longest = max(longest, o.t - first_fail)
                first_fail = None
        if first_fail is not None:  # still failing at the end
            longest = max(longest, max(o.t for o in outcomes) - first_fail)
        out[node] = longest
    return out


def _instant(text: str) -> datetime:
    """An engine timestamp (RFC 3339, nanoseconds) as a datetime (microseconds)."""
    m = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$", text)
    if not m:
        raise StackLabError(f"not an engine timestamp: {text!r}")
    frac = (m.group(2) or "0")[:6].ljust(6, "0")
    return datetime.fromisoformat(f"{m.group(1)}.{frac}{'+00:00' if m.group(3) == 'Z' else m.group(3)}")


# -- the stacks -------------------------------------------------------------------------------------
def stack_uses_handover(path: Path = STACK_FILE) -> bool:
    """compose/stack.yml upgrades the agent hitlessly: start-first, MESH_HANDOVER set, /run/mesh bind-mounted."""
    svc = yaml.safe_load(path.read_text())["services"]["agent"]
    order = ((svc.get("deploy") or {}).get("update_config") or {}).get("order")
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    mounts = [v if isinstance(v, str) else f"{v.get('source')}:{v.get('target')}" for v in svc.get("volumes") or []]
    return order == "start-first" and bool(env.get("MESH_HANDOVER")) and any(":/run/mesh" in m for m in mounts)


class StackLab:
    """The stacks of compose/ on a ``SwarmLab`` (set up, without host-process agents)."""

    def __init__(self, sl: SwarmLab, images: Images) -> None:
        self.sl = sl
        self.images = images
        self.dir = sl.lab.run_root / "stack"
        self.sockets = sl.lab.run_root / "docker-sockets"
        self.stacks: list[str] = []
        self.secret = False

    @property
    def manager(self):
        return self.sl.manager

    def load_images(self) -> float:
        """``docker load`` of the archive on every node; returns the seconds it took."""
        t0 = time.monotonic()
        for i in ALL_NODES:
            n = self.sl.nodes[i]
            n.docker("load", "-q", "-i", str(self.images.archive), timeout=300)
            for tag, image_id in self.images.ids.items():
                got = n.docker("image", "inspect", "--format", "{{.Id}}", tag)
                if got != image_id:
                    raise StackLabError(f"node {i}: {tag} is {got}, built {image_id}")
        return time.monotonic() - t0

    def write_copies(self) -> tuple[Path, Path]:
        """The lab's copies of compose/stack.yml and compose/demo-stack.yml (``LAB_DIFFERENCES``)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.sockets.mkdir(parents=True, exist_ok=True)
        for i in ALL_NODES:
            n = self.sl.nodes[i]
            link = self.sockets / f"{n.hostname}.sock"
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
            link.symlink_to(n.sock)
        stack = yaml.safe_load(STACK_FILE.read_text())
        vols = stack["services"]["agent"]["volumes"]
        socks = [v for v in vols if isinstance(v, dict) and v.get("target") == "/var/run/docker.sock"]
        if len(socks) != 1:
            raise StackLabError(f"{STACK_FILE}: expected one bind mount of /var/run/docker.sock, got {vols}")
        socks[0]["source"] = str(self.sockets / "{{.Node.Hostname}}.sock")
        demo = yaml.safe_load(DEMO_FILE.read_text())
        if demo["services"].pop("visualizer", None) is None:
            raise StackLabError(f"{DEMO_FILE}: no visualizer service to leave out")
        stack_copy, demo_copy = self.dir / "stack.yml", self.dir / "demo-stack.yml"
        stack_copy.write_text(yaml.safe_dump(stack, sort_keys=False))
        demo_copy.write_text(yaml.safe_dump(demo, sort_keys=False))
        return stack_copy, demo_copy

    def docker(self, *args: str, env: dict[str, str] | None = None, timeout: float = 120, check: bool = True,
               input: bytes | None = None) -> str:  # fmt: skip
        """The docker CLI against the manager, with ``env`` added (the stack files' variables)."""
        res = subprocess.run(["docker", "-H", self.manager.host, *args], capture_output=True, timeout=timeout,
                             env={**os.environ, **(env or {})}, input=input, check=False)  # fmt: skip
        if check and res.returncode != 0:
            raise StackLabError(f"docker {' '.join(args)}: exit {res.returncode}: "
                                f"{res.stderr.decode(errors='replace').strip()}")  # fmt: skip
        return res.stdout.decode(errors="replace").strip()

    def create_token(self) -> None:
        # docs/deploy.md: openssl rand -hex 32 | docker secret create mesh_token -
        if shutil.which("openssl"):
            token = subprocess.run(["openssl", "rand", "-hex", "32"], capture_output=True, check=True).stdout
        else:  # the same 64 hex digits
            token = (secrets.token_hex(32) + "\n").encode()
        self.docker("secret", "create", "mesh_token", "-", input=token)
        self.secret = True

    def deploy(self, name: str, path: Path, env: dict[str, str]) -> None:
        self.docker("stack", "deploy", "-c", str(path), name, env=env, timeout=180)
        self.stacks.append(name)

    def admin(self, i: int, path: str, timeout: float = 2.0) -> str | None:
        """GET http://127.0.0.1:9901<path> from inside node i's network namespace (None: no answer)."""
        n = self.sl.nodes[i]
        res = subprocess.run(
            ["nsenter", f"--net=/run/netns/{n.netns}", "--", "curl", "-sf", "--max-time", str(timeout),
             f"http://{ADMIN}{path}"],
            capture_output=True, timeout=timeout + 5, check=False,
        )  # fmt: skip
        return res.stdout.decode(errors="replace") if res.returncode == 0 else None

    def status(self, i: int) -> dict | None:
        text = self.admin(i, "/v1/cluster/status")
        try:
            return json.loads(text) if text else None
        except ValueError:
            return None

    def endpoints(self, i: int, service: str) -> list[dict] | None:
        st = self.status(i)
        if not st or not st.get("table"):
            return None
        for svc in st["table"]["services"]:
            if svc["name"] == service:
                return svc["routes"][0]["endpoints"]
        return None

    def wait(self, cond, timeout: float, what: str, interval: float = 0.2) -> float:
        t0 = time.monotonic()
        while not cond():
            if time.monotonic() - t0 > timeout:
                raise StackLabError(f"timed out after {timeout}s waiting for {what}\n{self.diagnostics()}")
            time.sleep(interval)
        return time.monotonic() - t0

    def running_tasks(self, service: str) -> int:
        return len(self.sl.running_tasks(service))

    def wait_demo(self, replicas: int, timeout: float = 120) -> float:
        """Until swarm runs ``replicas`` web tasks and every agent routes to exactly those."""

        def done() -> bool:
            tasks = self.sl.running_tasks("demo_web")
            if len(tasks) != replicas:
                return False
            for i in ALL_NODES:
                eps = self.endpoints(i, "demo_web")
                if eps is None or sorted(e["id"] for e in eps if e["state"] == "running") != sorted(tasks):
                    return False
            return True

        return self.wait(done, timeout, f"demo_web with {replicas} replicas on every agent")

    def start_to_running(self, task_ids: set[str]) -> dict[str, float]:
        """Running task id -> seconds from its container's start to the task's "running" state: swarm
        reports a task with a HEALTHCHECK running only once the check passed."""
        index = {node_id: i for i, node_id in self.sl.node_ids.items()}
        out = {}
        for t in self.sl.inspect(sorted(task_ids)):
            st = t.get("Status") or {}
            cid = (st.get("ContainerStatus") or {}).get("ContainerID")
            if st.get("State") != "running" or not cid or t.get("NodeID") not in index:
                continue
            c = json.loads(self.sl.nodes[index[t["NodeID"]]].docker("container", "inspect", cid))[0]
            out[t["ID"]] = (_instant(st["Timestamp"]) - _instant(c["State"]["StartedAt"])).total_seconds()
        return out

    def exit_codes(self, service: str, since: float, until: float) -> dict[str, str]:
        """Container id -> exit code of the ``service`` containers that died between ``since`` and ``until``
        (unix times), from every node's events."""
        out = {}
        for n in self.sl.nodes.values():
            text = n.docker("events", "--since", f"{since:.3f}", "--until", f"{until:.3f}", "--filter", "event=die",
                            "--filter", f"label=com.docker.swarm.service.name={service}", "--format", "{{json .}}",
                            timeout=30)  # fmt: skip
            for line in text.splitlines():
                ev = json.loads(line)
                out[ev["id"][:12]] = ev["Actor"]["Attributes"].get("exitCode", "?")
        return out

    def agents_replaced(self, before: set[str]) -> bool:
        """Every node runs a mesh_agent task that is not one of ``before``, and the update completed."""
        tasks = self.sl.running_tasks("mesh_agent")
        if len(tasks) != len(ALL_NODES) or set(tasks) & before or len({n for n, _ in tasks.values()}) != len(tasks):
            return False
        state = self.docker("service", "inspect", "--format", "{{if .UpdateStatus}}{{.UpdateStatus.State}}{{end}}",
                            "mesh_agent", check=False)  # fmt: skip
        return state == "completed"

    def agent_logs(self) -> str:
        """Every mesh_agent task's output (old tasks' too); the agent logs to stderr, which the CLI passes on
        as its own stderr."""
        res = subprocess.run(["docker", "-H", self.manager.host, "service", "logs", "--raw", "mesh_agent"],
                             capture_output=True, timeout=60, check=False)  # fmt: skip
        text = (res.stdout + res.stderr).decode(errors="replace")
        if res.returncode != 0 or ("handover" not in text and "mesh" not in text):
            raise StackLabError(f"docker service logs mesh_agent: exit {res.returncode}: {text[-2000:]}")
        return text

    def diagnostics(self) -> str:
        out = [self.docker("service", "ls", check=False)]
        for svc in ("mesh_agent", "demo_web", "demo_redis"):
            out.append(self.docker("service", "ps", "--no-trunc", svc, check=False))
        out.append("--- mesh_agent logs (tail)\n" + "\n".join(self.agent_logs().splitlines()[-40:]))
        return "\n".join(out)

    def close(self) -> None:
        for name in reversed(self.stacks):
            self.docker("stack", "rm", name, check=False, timeout=120)
        # the stacks' tasks and networks go asynchronously: wait (bounded) before the swarm is taken apart
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            left = [
                n.docker(what, "ls", "-q", "--filter", "label=com.docker.stack.namespace", check=False)
                for n in self.sl.nodes.values()
                for what in ("container", "network")
            ]
            if not any(left):
                break
            time.sleep(0.5)
        self.stacks.clear()
        if self.secret:
            self.docker("secret", "rm", "mesh_token", check=False)
            self.secret = False


__all__ = [
    "LAB_DIFFERENCES",
    "HttpLoad",
    "Images",
    "LoadReport",
    "StackLab",
    "StackLabError",
    "SwarmLabError",
    "build_images",
    "demo_answer",
    "http_get",
    "stack_uses_handover",
]
