"""A 3-node swarm with one cluster-mode mesh agent per node, for the cluster lab tests.

Built on ``tests.dockerlab``: node 2 is the manager (the discovery tests use it as
their swarm manager too), nodes 1 and 3 join as workers.  Each agent runs as a
host process inside its node's network namespace::

    nsenter --net=/run/netns/<node netns> -- python3 -m meshagent run --cluster --admin <node addr>:9901 \\
        --docker unix://<node docker.sock> --token-file <file>

so its published ports, admin API (9901: /metrics, /v1/table, /v1/cluster/status),
tunnel (7481) and control port (7480) are on the node's
address (198.18.200.1x), which the test process reaches over the lab bridge from
198.18.200.1 -- an address that is NOT a cluster node (tunnel refusals).

The replica used by the tests is busybox ``nc`` that answers each connection
with its hostname (= its container's short id) and the first line it received:
with ``mesh.proxy-protocol=v1`` that line is the PROXY header the replica got,
i.e. the client address the mesh passed on.

Load is bounded in count and time (``LoadLoop``).  ``close()`` stops the agents,
removes the services and makes node 1 leave the swarm (the discovery tests want
it standalone); the DockerLab removes everything else at the end of the session.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tests import dockerlab
from tests.dockerlab import LOG_DIR, DockerLab, Node

ROOT = Path(__file__).resolve().parent.parent
MANAGER = 2
WORKERS = (1, 3)
ALL_NODES = (1, 2, 3)
ADMIN_PORT = 9901  # the agents' admin API (/metrics, /v1/table, /v1/cluster/status): `mesh run --cluster --admin ADDR`
TUNNEL_PORT = 7481
CONTROL_PORT = 7480
CLIENT_ADDR = "198.18.200.1"  # the test process, on the lab bridge: not a swarm node

# each connection: "<hostname> <first line received>" (the PROXY v1 line when the service asks for it)
ECHO = ["nc", "-ll", "-p", "80", "-e", "sh", "-c", 'read l; echo "$(hostname) $l"']


class SwarmLabError(RuntimeError):
    pass


def other_labs(own_pid: int) -> list[int]:
    """Pids of other live DockerLabs on this machine.  Every lab uses 198.18.200.0/24 on
    its own bridge, so while another one runs, traffic to the nodes may take its bridge."""
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, check=False).stdout.decode()
    pids = {int(m.group(1)) for m in re.finditer(r"^\d+: mt(\d+)br[:@]", links, re.M)}
    return sorted(p for p in pids if p != own_pid and os.path.exists(f"/proc/{p}"))


def wait_for_other_labs(own_pid: int, timeout: float = 600) -> None:
    """Wait (bounded) until no other DockerLab runs; raise SwarmLabError naming them."""
    deadline = time.monotonic() + timeout
    while others := other_labs(own_pid):
        if time.monotonic() > deadline:
            raise SwarmLabError(f"other Docker labs (pids {others}) still use 198.18.200.0/24 after {timeout}s")
        time.sleep(1.0)


@dataclass
class Agent:
    index: int
    proc: subprocess.Popen
    log_path: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def request(addr: str, port: int, payload: bytes = b"hello\n", timeout: float = 3.0) -> str:
    """One connection: send ``payload``, read until EOF; returns the answer (raises OSError)."""
    with socket.create_connection((addr, port), timeout=timeout) as s:
        s.settimeout(timeout)
        s.sendall(payload)
        chunks = []
        while chunk := s.recv(4096):
            chunks.append(chunk)
    text = b"".join(chunks).decode(errors="replace").strip()
    if not text:
        raise ConnectionError("empty answer (closed before any byte)")
    return text


def parse_answer(text: str) -> tuple[str, list[str]]:
    """ "<hostname> PROXY TCP4 src dst sport dport" -> (hostname, PROXY fields)."""
    parts = text.split()
    return parts[0], parts[1:]


@dataclass
class LoadResult:
    ok: int = 0
    failed: int = 0
    by_target: Counter = field(default_factory=Counter)  # node index -> answered requests
    replicas: Counter = field(default_factory=Counter)  # hostname -> answered requests
    errors: Counter = field(default_factory=Counter)  # "node i: reason" -> count
    seconds: float = 0.0

    def __str__(self) -> str:
        return (
            f"{self.ok} ok, {self.failed} failed in {self.seconds:.1f}s; per node {dict(self.by_target)}; "
            f"errors {dict(self.errors)}"
        )


class LoadLoop:
    """Closed-loop load against several (index, addr, port) targets from a few threads,
    bounded by ``max_requests`` and ``max_seconds``; ``stop()`` ends it early."""

    def __init__(self, targets: list[tuple[int, str, int]], *, threads: int = 6, max_requests: int = 20000,
                 max_seconds: float = 60.0, timeout: float = 3.0) -> None:  # fmt: skip
        self.targets = targets
        self.threads = threads
        self.max_requests = max_requests
        self.max_seconds = max_seconds
        self.timeout = timeout
        self.result = LoadResult()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._issued = 0
        self._workers: list[threading.Thread] = []
        self._t0 = 0.0

    def start(self) -> LoadLoop:
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
            index, addr, port = self.targets[n % len(self.targets)]
            n += 1
            try:
                host, _ = parse_answer(request(addr, port, timeout=self.timeout))
            except OSError as exc:
                with self._lock:
                    self.result.failed += 1
                    self.result.errors[f"node{index}: {type(exc).__name__}"] += 1
                continue
            with self._lock:
                self.result.ok += 1
                self.result.by_target[index] += 1
                self.result.replicas[host] += 1

    def wait(self) -> LoadResult:
        """Until the loop ends on its own (count or time bound reached)."""
        for t in self._workers:
            t.join(timeout=self.max_seconds + self.timeout + 5)
        return self.stop()

    def stop(self) -> LoadResult:
        self._stop.set()
        for t in self._workers:
            t.join(timeout=self.timeout + 5)
        self.result.seconds = time.monotonic() - self._t0
        return self.result

    def requests(self) -> int:
        with self._lock:
            return self.result.ok + self.result.failed


class SwarmLab:
    """Three swarm nodes (``MANAGER`` + ``WORKERS``), optionally more managers, and their agents."""

    def __init__(self, lab: DockerLab, *, extra_managers: tuple[int, ...] = ()) -> None:
        """``extra_managers``: more nodes (4, 5) that join as managers, so that the swarm has several;
        ``close()`` demotes and removes them again (the lab's other tests expect one manager)."""
        self.lab = lab
        self.extra_managers = extra_managers
        self.nodes: dict[int, Node] = {}
        self.node_ids: dict[int, str] = {}
        self.agents: dict[int, Agent] = {}
        self.services: list[str] = []
        self.token_file = lab.run_root / "cluster-token"

    @property
    def manager(self) -> Node:
        return self.nodes[MANAGER]

    def setup(self) -> SwarmLab:
        wait_for_other_labs(self.lab.pid)
        self.nodes[MANAGER] = self.lab.node(MANAGER)
        self.node_ids[MANAGER] = self.lab.swarm_init(MANAGER)
        for i in WORKERS:
            self.nodes[i] = self.lab.node(i, live_restore=False)  # a swarm node cannot live-restore
            self.node_ids[i] = self.lab.swarm_join(i, MANAGER)
        for i in self.extra_managers:
            self.nodes[i] = self.lab.node(i, live_restore=False)
            self.node_ids[i] = self.lab.swarm_join(i, MANAGER, as_manager=True)
        self.token_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        return self

    # -- agents -----------------------------------------------------------------------
    def start_agent(self, i: int, *extra: str) -> Agent:
        n = self.nodes[i]
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        log_path = LOG_DIR / f"{self.lab.name}-agent{i}.log"
        cmd = [
            "nsenter", f"--net=/run/netns/{n.netns}", "--",
            sys.executable, "-m", "meshagent", "run", "--cluster", "--admin", f"{n.addr}:{ADMIN_PORT}",
            "--docker", n.host, "--token-file", str(self.token_file),
            "--control-port", str(CONTROL_PORT), "--tunnel-port", str(TUNNEL_PORT),
            "--control-wait", "5", *extra,
        ]  # fmt: skip
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    start_new_session=True)  # fmt: skip
        agent = Agent(i, proc, log_path)
        self.agents[i] = agent
        deadline = time.monotonic() + 30
        while self.status(i) is None:
            if not agent.alive():
                raise SwarmLabError(f"agent {i} exited ({proc.returncode}):\n{agent.log_tail()}")
            if time.monotonic() > deadline:
                raise SwarmLabError(f"agent {i} did not serve its status within 30s:\n{agent.log_tail()}")
            time.sleep(0.1)
        return agent

    def stop_agent(self, i: int, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
        agent = self.agents.pop(i, None)
        if agent is None or not agent.alive():
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(agent.proc.pid, sig)
        try:
            agent.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(agent.proc.pid, signal.SIGKILL)
            agent.proc.wait(5)

    def metrics(self, i: int, timeout: float = 5.0) -> str:
        """The agent's Prometheus text from its admin API."""
        n = self.nodes[i]
        with urllib.request.urlopen(f"http://{n.addr}:{ADMIN_PORT}/metrics", timeout=timeout) as r:
            return r.read().decode()

    def status(self, i: int, timeout: float = 2.0) -> dict | None:
        """The agent's /v1/cluster/status (on its admin API), or None when it does not answer."""
        url = f"http://{self.nodes[i].addr}:{ADMIN_PORT}/v1/cluster/status"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                return json.loads(resp.read())
        except (OSError, ValueError):
            return None

    def endpoints(self, i: int, service: str) -> list[dict] | None:
        """Endpoints of ``service``'s first route in agent i's applied table (None: not there)."""
        st = self.status(i)
        if not st or not st.get("table"):
            return None
        for svc in st["table"]["services"]:
            if svc["name"] == service:
                return svc["routes"][0]["endpoints"]
        return None

    def wait(self, cond, timeout: float, what: str, interval: float = 0.1) -> float:
        """Poll ``cond()`` until true; returns the seconds it took (raises with ``what``)."""
        t0 = time.monotonic()
        while True:
            if cond():
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                logs = "\n".join(f"--- agent {i}\n{a.log_tail(1500)}" for i, a in self.agents.items())
                raise SwarmLabError(f"timed out after {timeout}s waiting for {what}\n{logs}")
            time.sleep(interval)

    # -- node failures ----------------------------------------------------------------
    def kill_dockerd(self, i: int) -> None:
        """SIGKILL node i's dockerd only: its containers, containerd and agent keep running (a crash)."""
        n = self.nodes[i]
        pid = n.pid()
        if pid is None:
            raise SwarmLabError(f"node {i}: dockerd is not running")
        os.kill(pid, signal.SIGKILL)
        if n.proc is not None and n.proc.pid == pid:
            n.proc.wait(10)
            n.proc = None

    def revive(self, i: int, timeout: float = 60) -> None:
        """Bring a killed node back: its orphaned containers and containerd go (as after a
        reboot), dockerd starts with its swarm state and the node is ready again."""
        n = self.nodes[i]
        n.stop(fast=True)  # kills the orphaned containers
        for pid in dockerlab._pids_mentioning(str(n.run_dir / "exec")):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            n.pidfile.unlink()
        n.start()
        node_id = self.node_ids[i]
        self.wait(
            lambda: self.manager.docker("node", "inspect", "--format", "{{.Status.State}}", node_id, check=False)
            == "ready",
            timeout, f"node {i} to be ready in the swarm again",
        )  # fmt: skip

    def remove_manager(self, i: int) -> None:
        """Demote manager node i (never ``MANAGER``), make it leave, and remove the lab node."""
        if i == MANAGER:
            raise SwarmLabError(f"node {i} holds the lab's swarm; it cannot be removed")
        self.stop_agent(i)
        node_id = self.node_ids.pop(i, None)
        if node_id and self.manager.alive():
            self.manager.docker("node", "demote", node_id, check=False, timeout=60)
            # a manager leaving with --force would cost the raft a member it still counts
            self.wait(
                lambda: self.manager.docker("node", "inspect", "--format", "{{.Spec.Role}}", node_id, check=False)
                == "worker",
                30, f"node {i} to be demoted",
            )  # fmt: skip
        n = self.nodes.pop(i)
        if n.alive():
            n.docker("swarm", "leave", "--force", check=False, timeout=60)
        if node_id and self.manager.alive():
            self.manager.docker("node", "rm", "--force", node_id, check=False, timeout=60)
        self.lab.remove_node(i)

    # -- services ---------------------------------------------------------------------
    def create_service(self, name: str, replicas: int, labels: dict[str, str], *, cmd: list[str] = ECHO,
                       extra: tuple[str, ...] = ()) -> None:  # fmt: skip
        args = ["service", "create", "--detach", "--name", name, "--replicas", str(replicas),
                "--stop-grace-period", "2s", "--update-delay", "0s", "--no-resolve-image"]  # fmt: skip
        for k, v in labels.items():
            args += ["--label", f"{k}={v}"]
        self.manager.docker(*args, *extra, self.lab.image_id, *cmd, timeout=120)
        self.services.append(name)

    def inspect(self, ids: list[str]) -> list[dict]:
        """``docker inspect`` of ``ids`` on the manager; objects removed meanwhile are left out."""
        out = self.manager.docker("inspect", *ids, check=False)
        return json.loads(out) if out.startswith("[") else []

    def running_tasks(self, service: str) -> dict[str, tuple[str, str]]:
        """task id -> (node id, container short id = the replica's hostname) of running tasks."""
        ids = self.manager.docker(
            "service", "ps", "-q", "--filter", "desired-state=running", service, check=False
        ).split()
        if not ids:
            return {}
        out = {}
        for t in self.inspect(ids):
            st = t.get("Status") or {}
            cid = (st.get("ContainerStatus") or {}).get("ContainerID") or ""
            if st.get("State") == "running" and cid:
                out[t["ID"]] = (t["NodeID"], cid[:12])
        return out

    def wait_converged(self, service: str, replicas: int, timeout: float = 60) -> dict[str, tuple[str, str]]:
        """Until swarm runs ``replicas`` tasks and every agent's table lists exactly them."""
        tasks: dict[str, tuple[str, str]] = {}

        def done() -> bool:
            nonlocal tasks
            tasks = self.running_tasks(service)
            if len(tasks) != replicas:
                return False
            for i in self.agents:
                eps = self.endpoints(i, service)
                if eps is None or sorted(e["id"] for e in eps if e["state"] == "running") != sorted(tasks):
                    return False
            return True

        self.wait(done, timeout, f"service {service} with {replicas} replicas on every agent")
        return tasks

    def remove_services(self) -> None:
        for name in self.services:
            self.manager.docker("service", "rm", name, check=False, timeout=60)
        self.services.clear()

    def close(self) -> None:
        for i in list(self.agents):
            self.stop_agent(i)
        try:
            if self.manager.alive():
                self.remove_services()
        finally:
            # Leave the shared lab as the discovery tests expect it: node 1 standalone (live-restore) and
            # node 2 a single-node swarm (its tests join node 3 themselves when they need a worker).
            for i in self.extra_managers:
                if i in self.nodes:
                    with contextlib.suppress(Exception):
                        self.remove_manager(i)
            for i in WORKERS:
                if i in self.nodes:
                    with contextlib.suppress(Exception):
                        self.lab.swarm_leave(i, MANAGER)
            with contextlib.suppress(OSError):
                self.token_file.unlink()
