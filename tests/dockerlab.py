"""A real Docker engine for the tests, in its own network namespace.

``DockerLab`` starts dockerd the way ../shared/swarm-lab/lib.sh does, but with
its own names and address ranges so it never collides with another engine (or
a running swarm-lab) on the machine:

    root netns   bridge mt<pid>br 198.18.200.1/24, routes to each node's docker
                 subnets via the node, guard route "unreachable 198.18.0.0/15"
    node i       netns mtest<pid>n<i>, veth eth0 198.18.200.(10+i)/24
                 docker0 (--bip)        198.18.(201+5(i-1)).1/24
                 local pools            the next four /24s (compose networks, docker_gwbridge)
                 swarm pool             198.19.128.0/17 (only if the node inits a swarm)
                 dockerd + its own containerd, data under /var/lib/mtest/<pid>/node<i>,
                 sockets under /run/mtest/<pid>/node<i> (unix socket: docker.sock)

The test process stays in the root netns: it talks to each engine over its unix
socket and reaches containers at their 198.18.x.x addresses through the node
(the node's DOCKER-USER chain accepts what comes in on eth0).  Nothing in the
lab has a default route, so nothing can leave the machine.

Everything is removed by ``close()``: at the end of the session, at interpreter
exit (atexit), on SIGTERM, and leftovers of an earlier run that was killed are
removed when the next lab starts (any mtest<pid> whose pid is gone).  All labs
use the same addresses, so a lab holds the machine-wide lock /run/mtest.lock
while it is open: test sessions running at the same time on one machine take
turns instead of stealing each other's routes.

Fixtures (import into a test module, or list this module in pytest_plugins):
``docker_lab`` (session) -> DockerLab.  Node setup is parametrised by the node
index so the cluster tests can start several nodes and join them.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

PREFIX = "mtest"
RUN_BASE = Path("/run/mtest")
VAR_BASE = Path("/var/lib/mtest")
CACHE = Path("/var/tmp/mtest-cache")
LOG_DIR = Path("/var/tmp/mtest-logs")
LINK_PREFIX = "198.18.200"
GUARD = "198.18.0.0/15"
SWARM_POOL = "198.19.128.0/17"
IMAGE = "meshtest/busybox:latest"
# nodes 1-3 are the usual lab; 4 and 5 (198.18.200.14/15, docker subnets 198.18.216-225.0/24) exist only
# while a test needs more swarm managers (tests/test_cluster_managers_lab.py), which removes them again
MAX_NODES = 5
# every lab uses the same addresses: labs of concurrent test sessions on one machine take turns
LOCK_FILE = Path("/run/mtest.lock")
LOCK_TIMEOUT = float(os.environ.get("MTEST_LOCK_TIMEOUT", "1200"))


class LabError(RuntimeError):
    """The lab could not be set up (missing tool, dockerd did not start, ...)."""


def _run(
    *args: str, check: bool = True, timeout: float = 60, input: bytes | None = None
) -> subprocess.CompletedProcess:
    try:
        res = subprocess.run(list(args), capture_output=True, timeout=timeout, input=input)
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{' '.join(args)}: timed out after {timeout}s") from exc
    if check and res.returncode != 0:
        raise LabError(f"{' '.join(args)}: exit {res.returncode}: {res.stderr.decode(errors='replace').strip()}")
    return res


def _quiet(*args: str, timeout: float = 30) -> bool:
    try:
        return subprocess.run(list(args), capture_output=True, timeout=timeout).returncode == 0
    except (subprocess.TimeoutExpired, OSError):
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pids_mentioning(needle: str) -> list[int]:
    """PIDs whose command line contains ``needle`` (a path of ours; never matched by program name)."""
    out = []
    me = os.getpid()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == me:
            continue
        try:
            if needle.encode() in (d / "cmdline").read_bytes():
                out.append(int(d.name))
        except OSError:
            continue
    return out


def _umount_below(base: Path) -> None:
    b = str(base)
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return
    points = [ln.split()[4] for ln in lines if len(ln.split()) > 4]
    for m in sorted((p for p in points if p == b or p.startswith(b + "/")), reverse=True):
        _quiet("umount", "-l", m)


def ensure_tools() -> None:
    """Install docker.io / busybox-static / iproute2 / iptables with apt-get when missing (CI on a fresh machine)."""
    need = []
    if shutil.which("dockerd") is None or shutil.which("docker") is None:
        need.append("docker.io")
    if shutil.which("busybox") is None:
        need.append("busybox-static")
    if shutil.which("ip") is None:
        need.append("iproute2")
    if shutil.which("iptables") is None:
        need.append("iptables")
    if shutil.which("nsenter") is None or shutil.which("unshare") is None:
        need.append("util-linux")
    if not need:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise LabError(f"missing {', '.join(need)} and cannot install them (needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=300, check=False)
    res = subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *need],
        env=env,
        capture_output=True,
        timeout=600,
        check=False,
    )
    if res.returncode != 0:
        raise LabError(f"apt-get install {' '.join(need)} failed: {res.stderr.decode(errors='replace')[-500:]}")


def lab_unavailable_reason() -> str | None:
    """Why an engine lab cannot run here (None if it can)."""
    if os.geteuid() != 0:
        return "the Docker lab needs root (network namespaces, dockerd)"
    if not Path("/proc/self/ns/net").exists():
        return "no network namespace support"
    if Path("/run/containerd/containerd.sock").is_socket():
        # dockerd 20.10 would use that shared containerd, whose containers live in the root netns
        return "a system containerd is running (/run/containerd/containerd.sock)"
    return None


@dataclass
class Node:
    """One dockerd in its own netns.  ``host`` is the DOCKER_HOST for it."""

    index: int
    lab: DockerLab
    netns: str
    veth: str
    addr: str
    subnets: tuple[str, ...]  # /24s: docker0 first, then the address pools
    run_dir: Path
    var_dir: Path
    log_path: Path
    hostname: str
    live_restore: bool = False
    proc: subprocess.Popen | None = None

    @property
    def sock(self) -> str:
        return str(self.run_dir / "docker.sock")

    @property
    def host(self) -> str:
        return f"unix://{self.sock}"

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "docker.pid"

    @property
    def cgroup_parent(self) -> str:
        return f"/{self.lab.name}-node{self.index}"

    def __repr__(self) -> str:
        return f"<Node {self.index} {self.netns} {self.addr} sock={self.sock} up={self.alive()}>"

    # -- CLI --------------------------------------------------------------------------
    def docker(self, *args: str, timeout: float = 60, check: bool = True, input: bytes | None = None) -> str:
        """Run the docker CLI against this node; returns stdout (stripped)."""
        res = _run("docker", "-H", self.host, *args, timeout=timeout, check=check, input=input)
        return res.stdout.decode(errors="replace").strip()

    def docker_json(self, *args: str, timeout: float = 60) -> object:
        return json.loads(self.docker(*args, timeout=timeout))

    def exec_netns(self, *args: str, timeout: float = 30, check: bool = True) -> str:
        """Run a command in the node's network namespace (not in a container)."""
        res = _run("nsenter", f"--net=/run/netns/{self.netns}", "--", *args, timeout=timeout, check=check)
        return res.stdout.decode(errors="replace").strip()

    # -- lifecycle --------------------------------------------------------------------
    def pid(self) -> int | None:
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            return None
        return pid if comm == "dockerd" else None

    def ping(self, timeout: float = 1.0) -> bool:
        """GET /_ping over the unix socket."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                s.connect(self.sock)
                s.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
            return data.startswith(b"HTTP/1.") and data.rstrip().endswith(b"OK")
        except OSError:
            return False

    def alive(self) -> bool:
        return self.pid() is not None and self.ping()

    def start(self, timeout: float = 60) -> None:
        """Start dockerd (keeps data-root: a restart finds its containers)."""
        if self.alive():
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.var_dir / "data").mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._write_config()
        pools = [a for s in self.subnets[1:] for a in ("--default-address-pool", f"base={s},size=24")]
        args = [
            "--config-file", str(self.var_dir / "daemon.json"),
            "--data-root", str(self.var_dir / "data"),
            "--exec-root", str(self.run_dir / "exec"),
            "--pidfile", str(self.pidfile),
            "-H", self.host,
            "--bip", self.subnets[0].replace(".0/24", ".1/24"),
            *pools,
            "--cgroup-parent", self.cgroup_parent,
            "--swarm-default-advertise-addr", self.addr,
            "--containerd-namespace", f"{self.lab.name}n{self.index}",
            "--containerd-plugins-namespace", f"{self.lab.name}n{self.index}-plugins",
            "--label", f"mtest.node={self.index}",
        ]  # fmt: skip
        log = open(self.log_path, "ab")
        try:
            # nsenter --net (not "ip netns exec": that remounts /sys and hides the cgroup
            # mounts from dockerd); unshare --uts gives the node its own hostname
            self.proc = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{self.netns}", "--", "unshare", "--uts", "--",
                 "/bin/sh", "-c", 'hostname "$0" && exec dockerd "$@"', self.hostname, *args],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            )  # fmt: skip
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while not self.ping(0.5):
            if self.proc.poll() is not None:
                raise LabError(f"node{self.index}: dockerd exited ({self.proc.returncode}); see {self.log_path}")
            if time.monotonic() > deadline:
                raise LabError(f"node{self.index}: dockerd did not answer within {timeout}s; see {self.log_path}")
            time.sleep(0.1)
        # let the test process (root netns) reach containers through the node: new
        # connections coming in on eth0 are otherwise dropped by dockerd's FORWARD rules
        if not _quiet("nsenter", f"--net=/run/netns/{self.netns}", "--",
                      "iptables", "-C", "DOCKER-USER", "-i", "eth0", "-j", "ACCEPT"):  # fmt: skip
            self.exec_netns("iptables", "-I", "DOCKER-USER", "1", "-i", "eth0", "-j", "ACCEPT")

    def _kill_container_procs(self) -> None:
        _kill_cgroup_procs(self.cgroup_parent)

    def stop(self, *, fast: bool = False, timeout: float = 30) -> None:
        """Stop dockerd.  ``fast``: SIGKILL the containers first (no stop timeouts)."""
        pid = self.pid()
        if pid is None and self.proc is not None and self.proc.poll() is None:
            pid = self.proc.pid
        if pid is not None:
            if fast:
                self._kill_container_procs()
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _pid_alive(pid) and time.monotonic() < deadline:
                if fast:
                    self._kill_container_procs()
                if self.proc is not None and self.proc.pid == pid:
                    self.proc.poll()
                time.sleep(0.1)
            if _pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
            self.proc = None

    def _write_config(self) -> None:
        cfg = {"deprecated-key-path": str(self.var_dir / "key.json"), "live-restore": self.live_restore}
        (self.var_dir / "daemon.json").write_text(json.dumps(cfg))

    def set_live_restore(self, enabled: bool, timeout: float = 15) -> None:
        """Switch live-restore on a running node (dockerd reloads it on SIGHUP; no restart)."""
        if enabled == self.live_restore:
            return
        pid = self.pid()
        if pid is None:
            raise LabError(f"node{self.index}: dockerd is not running")
        self.live_restore = enabled
        self._write_config()
        os.kill(pid, signal.SIGHUP)
        want = "true" if enabled else "false"
        deadline = time.monotonic() + timeout
        while self.docker("info", "--format", "{{.LiveRestoreEnabled}}", check=False) != want:
            if time.monotonic() > deadline:
                raise LabError(f"node{self.index}: live-restore did not become {want} (a swarm node cannot have it)")
            time.sleep(0.1)

    def restart(self) -> None:
        """Stop dockerd gracefully and start it again (with live-restore the containers keep running)."""
        self.stop()
        self.start()

    def teardown(self) -> None:
        self.stop(fast=True)
        _cleanup_node_leftovers(self.run_dir, self.var_dir, self.cgroup_parent)
        _quiet("ip", "netns", "del", self.netns)
        _quiet("ip", "link", "del", self.veth)


def _kill_cgroup_procs(cgroup_parent: str) -> None:
    """SIGKILL every process in the cgroups below ``cgroup_parent`` (a node's containers)."""
    for f in Path("/sys/fs/cgroup").glob(f"*{cgroup_parent}/**/cgroup.procs"):
        try:
            for line in f.read_text().split():
                with contextlib.suppress(OSError, ValueError):
                    os.kill(int(line), signal.SIGKILL)
        except OSError:
            continue


def _cleanup_node_leftovers(run_dir: Path, var_dir: Path, cgroup_parent: str) -> None:
    # containerd and shims of this node mention its exec-root on their command line
    left = _pids_mentioning(str(run_dir / "exec"))
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _kill_cgroup_procs(cgroup_parent)
    _umount_below(run_dir)
    _umount_below(var_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.rmtree(var_dir, ignore_errors=True)
    for d in sorted(Path("/sys/fs/cgroup").glob(f"*{cgroup_parent}"), reverse=True):
        for sub in sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                sub.rmdir()
        with contextlib.suppress(OSError):
            d.rmdir()


def cleanup_stale_labs() -> list[str]:
    """Remove what earlier, killed test runs left behind (their pid is gone).  Returns their names."""
    names: set[str] = set()
    for line in _run("ip", "netns", "list", check=False).stdout.decode().splitlines():
        m = re.match(rf"^({PREFIX}(\d+))n\d+\b", line)
        if m:
            names.add(m.group(1))
    for base in (RUN_BASE, VAR_BASE):
        if base.is_dir():
            names.update(f"{PREFIX}{d.name}" for d in base.iterdir() if d.name.isdigit())
    links = _run("ip", "-o", "link", "show", check=False).stdout.decode()
    for m in re.finditer(r"^\d+: mt(\d+)br[:@]", links, re.M):
        names.add(f"{PREFIX}{m.group(1)}")
    removed = []
    guard_was_ours = False
    for name in sorted(names):
        pid = int(name[len(PREFIX) :])
        if _pid_alive(pid):
            continue
        removed.append(name)
        guard_was_ours = guard_was_ours or (RUN_BASE / str(pid) / "added-guard").exists()
        for netns_line in _run("ip", "netns", "list", check=False).stdout.decode().splitlines():
            ns = netns_line.split()[0] if netns_line.strip() else ""
            m = re.match(rf"^{name}n(\d+)$", ns)
            if not m:
                continue
            i = int(m.group(1))
            run_dir, var_dir = RUN_BASE / str(pid) / f"node{i}", VAR_BASE / str(pid) / f"node{i}"
            _stop_stale_dockerd(run_dir)
            _cleanup_node_leftovers(run_dir, var_dir, f"/{name}-node{i}")
            _quiet("ip", "netns", "del", ns)
            _quiet("ip", "link", "del", f"mt{pid}h{i}")
        for base in (RUN_BASE / str(pid), VAR_BASE / str(pid)):
            for node_dir in base.glob("node*") if base.is_dir() else ():
                _stop_stale_dockerd(RUN_BASE / str(pid) / node_dir.name)
                i = node_dir.name[4:]
                _cleanup_node_leftovers(
                    RUN_BASE / str(pid) / node_dir.name, VAR_BASE / str(pid) / node_dir.name, f"/{name}-node{i}"
                )
            _umount_below(base)
            shutil.rmtree(base, ignore_errors=True)
        _remove_bridge(f"mt{pid}br")
    if guard_was_ours and not guard_route_needed():
        _quiet("ip", "route", "del", "unreachable", GUARD)
    return removed


def _stop_stale_dockerd(run_dir: Path) -> None:
    try:
        pid = int((run_dir / "docker.pid").read_text().strip())
        if Path(f"/proc/{pid}/comm").read_text().strip() == "dockerd":
            os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError):
        pass


def _remove_bridge(bridge: str) -> None:
    while _quiet("iptables", "-C", "FORWARD", "-i", bridge, "-o", bridge, "-j", "ACCEPT"):
        if not _quiet("iptables", "-D", "FORWARD", "-i", bridge, "-o", bridge, "-j", "ACCEPT"):
            break
    _quiet("ip", "link", "del", bridge)


def _prune_logs(max_age: float = 86400.0) -> None:
    """dockerd logs of earlier runs are kept for a day (for post-mortems), then removed."""
    if not LOG_DIR.is_dir():
        return
    now = time.time()
    for f in LOG_DIR.glob(f"{PREFIX}*.log"):
        with contextlib.suppress(OSError):
            if now - f.stat().st_mtime > max_age:
                f.unlink()


def _busybox_rootfs_tar() -> Path:
    """A registry-free image rootfs: static busybox + applet links + /www/index.html (cached)."""
    bb = shutil.which("busybox")
    if bb is None:
        raise LabError("busybox not found (apt-get install busybox-static)")
    bb_path = Path(bb).resolve()
    CACHE.mkdir(parents=True, exist_ok=True)
    tar_path = CACHE / "busybox-rootfs.tar"
    if tar_path.exists() and tar_path.stat().st_mtime >= bb_path.stat().st_mtime:
        return tar_path
    applets = _run(str(bb_path), "--list").stdout.decode().split()
    with tempfile.TemporaryDirectory() as tmp:
        r = Path(tmp)
        for d in ("bin", "etc", "www", "tmp", "root", "proc", "sys", "dev", "usr"):
            (r / d).mkdir()
        (r / "tmp").chmod(0o1777)
        shutil.copy2(bb_path, r / "bin" / "busybox")
        for a in applets:
            if a != "busybox" and "/" not in a:
                (r / "bin" / a).symlink_to("busybox")
        (r / "sbin").symlink_to("bin")
        (r / "usr" / "bin").symlink_to("../bin")
        (r / "usr" / "sbin").symlink_to("../bin")
        (r / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
        (r / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
        (r / "www" / "index.html").write_text("hello from meshtest/busybox\n")
        tmp_tar = tar_path.with_suffix(".tmp")
        with tarfile.open(tmp_tar, "w") as tf:
            for p in sorted(r.iterdir()):
                tf.add(p, arcname=p.name)
        tmp_tar.replace(tar_path)
    return tar_path


_open_labs: set[DockerLab] = set()


class DockerLab:
    """Test engines in network namespaces.  ``node(i)`` starts node i on first use."""

    def __init__(self) -> None:
        reason = lab_unavailable_reason()
        if reason:
            raise LabError(reason)
        ensure_tools()
        self.pid = os.getpid()
        self.name = f"{PREFIX}{self.pid}"
        self.bridge = f"mt{self.pid}br"
        self.run_root = RUN_BASE / str(self.pid)
        self.var_root = VAR_BASE / str(self.pid)
        self.nodes: dict[int, Node] = {}
        self.image_id: str | None = None
        self.stale_removed: list[str] = []
        self._added_guard = False
        self._open = False
        self._host_lock_fd: int | None = None
        # reentrant: close() may run from the SIGTERM handler while the main thread is inside node()
        self._lock = threading.RLock()
        self._image_archive = self.run_root / "image.tar"
        self._install_signal_handlers()
        self.open()

    @property
    def _closed(self) -> bool:
        return not self._open

    def open(self) -> None:
        """Take the machine-wide lab lock, remove leftovers of killed runs, set up the bridge.

        Called by the constructor, and by ``node()`` after a ``close()`` (the lab can be
        re-opened; its nodes then start afresh).  Every lab uses the same addresses, so
        labs of concurrent test sessions on one machine take turns (``LOCK_TIMEOUT``)."""
        with self._lock:
            if self._open:
                return
            self._acquire_host_lock()
            self._open = True
            atexit.register(self.close)
            try:
                self.stale_removed = cleanup_stale_labs()
                _prune_logs()
                self.nodes = {}
                self.image_id = None
                self._added_guard = False
                self._setup_bridge()
            except BaseException:
                self.close()
                raise

    def _acquire_host_lock(self) -> None:
        others = [lab for lab in _open_labs if lab is not self]
        if others:
            # flock would make this process wait for itself
            raise LabError("this process already has a Docker lab open: use tests.dockerlab.shared_lab()")
        RUN_BASE.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + LOCK_TIMEOUT
        announced = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not announced:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                    print(
                        f"dockerlab: waiting for the Docker lab of pid {holder} (another test session)", file=sys.stderr
                    )
                    announced = True
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise LabError(
                        f"another test session holds {LOCK_FILE} for more than {LOCK_TIMEOUT:.0f}s"
                    ) from None
                time.sleep(0.5)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{self.pid}\n".encode(), 0)
        self._host_lock_fd = fd
        _open_labs.add(self)

    def _release_host_lock(self) -> None:
        _open_labs.discard(self)
        fd, self._host_lock_fd = self._host_lock_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __repr__(self) -> str:
        return f"<DockerLab {self.name} nodes={sorted(self.nodes)}>"

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGTERM)

        def on_term(signum, frame):  # pragma: no cover - exercised by killing a test run
            self.close()
            if callable(previous):
                previous(signum, frame)
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, on_term)

    # -- network ----------------------------------------------------------------------
    def _setup_bridge(self) -> None:
        if not _quiet("ip", "link", "show", self.bridge):
            _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "replace", f"{LINK_PREFIX}.1/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        if not guard_route_present():
            _run("ip", "route", "add", "unreachable", GUARD)
            self._added_guard = True
            # so that the cleanup of a killed run knows the guard was ours
            self.run_root.mkdir(parents=True, exist_ok=True)
            (self.run_root / "added-guard").touch()
        # with br_netfilter, frames bridged between node veths pass the root FORWARD chain
        if not _quiet("iptables", "-C", "FORWARD", "-i", self.bridge, "-o", self.bridge, "-j", "ACCEPT"):
            _quiet("iptables", "-I", "FORWARD", "1", "-i", self.bridge, "-o", self.bridge, "-j", "ACCEPT")

    def _make_node(self, i: int, live_restore: bool) -> Node:
        if not 1 <= i <= MAX_NODES:
            raise LabError(f"node index must be 1..{MAX_NODES}, got {i}")
        base = 201 + 5 * (i - 1)
        return Node(
            index=i,
            lab=self,
            netns=f"{self.name}n{i}",
            veth=f"mt{self.pid}h{i}",
            addr=f"{LINK_PREFIX}.{10 + i}",
            subnets=tuple(f"198.18.{base + k}.0/24" for k in range(5)),
            run_dir=self.run_root / f"node{i}",
            var_dir=self.var_root / f"node{i}",
            log_path=LOG_DIR / f"{self.name}-node{i}.log",
            hostname=f"{self.name}-node{i}",
            live_restore=live_restore,
        )

    def _setup_node_net(self, n: Node) -> None:
        if not _quiet("ip", "netns", "exec", n.netns, "true"):
            _run("ip", "netns", "add", n.netns)
        _run("ip", "netns", "exec", n.netns, "ip", "link", "set", "lo", "up")
        if not _quiet("ip", "link", "show", n.veth):
            _quiet("ip", "netns", "exec", n.netns, "ip", "link", "del", "eth0")
            _run("ip", "link", "add", n.veth, "type", "veth", "peer", "name", "eth0", "netns", n.netns)
        _run("ip", "link", "set", n.veth, "master", self.bridge, "up")
        _run("ip", "netns", "exec", n.netns, "ip", "addr", "replace", f"{n.addr}/24", "dev", "eth0")
        _run("ip", "netns", "exec", n.netns, "ip", "link", "set", "eth0", "up")
        for s in n.subnets:
            _run("ip", "route", "replace", s, "via", n.addr, "dev", self.bridge)

    # -- nodes ------------------------------------------------------------------------
    def node(self, i: int = 1, *, live_restore: bool | None = None) -> Node:
        """Node i, started (network, dockerd, test image) on first use.

        ``live_restore``: containers survive a dockerd restart (not possible on a swarm
        node); None keeps the node's current setting (off for a new node).  A running
        node is switched with a config reload, not a restart.
        """
        with self._lock:
            self.open()
            n = self.nodes.get(i)
            if n is None:
                n = self._make_node(i, bool(live_restore))
                self.nodes[i] = n
                self._setup_node_net(n)
                n.start()
                self._load_image(n)
            elif not n.alive():
                n.start()
            if live_restore is not None:
                n.set_live_restore(live_restore)
            return n

    def remove_node(self, i: int) -> None:
        """Remove node i entirely (dockerd, its data, netns, veth and routes); a later ``node(i)`` starts
        it afresh.  Make it leave its swarm first (``swarm_leave``): this only forces its own side."""
        with self._lock:
            n = self.nodes.pop(i, None)
            if n is None:
                return
            with contextlib.suppress(LabError):
                if n.alive() and n.docker("info", "--format", "{{.Swarm.LocalNodeState}}", check=False) == "active":
                    n.docker("swarm", "leave", "--force", check=False, timeout=30)
            n.teardown()
            for s in n.subnets:
                _quiet("ip", "route", "del", s, "via", n.addr, "dev", self.bridge)

    def _load_image(self, n: Node) -> None:
        """The same image (same ID) on every node: import once, then save/load."""
        if self._image_archive.exists():
            n.docker("load", "-q", "-i", str(self._image_archive), timeout=120)
        else:
            tar_path = _busybox_rootfs_tar()
            n.docker("import", "-c", 'CMD ["/bin/sh"]', str(tar_path), IMAGE, timeout=120)
            self._image_archive.parent.mkdir(parents=True, exist_ok=True)
            n.docker("save", "-o", str(self._image_archive), IMAGE, timeout=120)
        image_id = n.docker("image", "inspect", "--format", "{{.Id}}", IMAGE)
        if self.image_id is not None and image_id != self.image_id:
            raise LabError(f"node{n.index}: image id {image_id} differs from {self.image_id}")
        self.image_id = image_id

    def swarm_init(self, i: int) -> str:
        """``docker swarm init`` on node i (advertised on its veth address); returns the node id."""
        n = self.nodes[i]
        if n.docker("info", "--format", "{{.Swarm.LocalNodeState}}") != "active":
            n.docker(
                "swarm", "init", "--advertise-addr", n.addr, "--listen-addr", f"{n.addr}:2377",
                "--default-addr-pool", SWARM_POOL, "--default-addr-pool-mask-length", "24",
                timeout=120,
            )  # fmt: skip
        return n.docker("info", "--format", "{{.Swarm.NodeID}}")

    def swarm_join(self, i: int, manager: int, *, as_manager: bool = False) -> str:
        """Node i joins the swarm of node ``manager`` (a worker unless ``as_manager``); returns its node id."""
        m, n = self.nodes[manager], self.node(i)
        if n.docker("info", "--format", "{{.Swarm.LocalNodeState}}") != "active":
            token = m.docker("swarm", "join-token", "-q", "manager" if as_manager else "worker")
            n.docker(
                "swarm", "join", "--token", token, "--advertise-addr", n.addr, "--listen-addr", f"{n.addr}:2377",
                f"{m.addr}:2377", timeout=120,
            )  # fmt: skip
        node_id = n.docker("info", "--format", "{{.Swarm.NodeID}}")
        deadline = time.monotonic() + 60
        while m.docker("node", "inspect", "--format", "{{.Status.State}}", node_id, check=False) != "ready":
            if time.monotonic() > deadline:
                raise LabError(f"node{i} did not become ready in the swarm of node{manager}")
            time.sleep(0.2)
        return node_id

    def swarm_leave(self, i: int, manager: int) -> None:
        """Node i leaves its swarm and is removed from the manager's node list."""
        n, m = self.nodes[i], self.nodes[manager]
        node_id = n.docker("info", "--format", "{{.Swarm.NodeID}}", check=False)
        n.docker("swarm", "leave", "--force", check=False, timeout=60)
        if node_id:
            m.docker("node", "rm", "--force", node_id, check=False, timeout=60)

    # -- teardown ---------------------------------------------------------------------
    def close(self) -> None:
        """Remove everything this lab created.  Safe to call twice, and from atexit / signals."""
        with self._lock:
            if not self._open:
                return
            self._open = False
            try:
                self._teardown()
            finally:
                self._release_host_lock()
                with contextlib.suppress(Exception):
                    atexit.unregister(self.close)

    def _teardown(self) -> None:
        for n in list(self.nodes.values()):
            try:
                if n.alive() and n.docker("info", "--format", "{{.Swarm.LocalNodeState}}", check=False) == "active":
                    # leave quickly: a swarm-mode dockerd otherwise waits on shutdown
                    n.docker("swarm", "leave", "--force", check=False, timeout=30)
            except LabError:
                pass
            n.teardown()
        _remove_bridge(self.bridge)
        for base in (self.run_root, self.var_root):
            _umount_below(base)
            shutil.rmtree(base, ignore_errors=True)
        if self._added_guard and not guard_route_needed():
            _quiet("ip", "route", "del", "unreachable", GUARD)
        self.nodes = {}


def guard_route_present() -> bool:
    routes = _run("ip", "route", "show", check=False).stdout.decode()
    return bool(re.search(rf"^unreachable {re.escape(GUARD)}\b", routes, re.M))


def guard_route_needed() -> bool:
    """True while a lab bridge (ours or the swarm-lab's) still exists."""
    links = _run("ip", "-o", "link", "show", check=False).stdout.decode()
    return bool(re.search(r"^\d+: (swlab0|mt\d+br)[:@]", links, re.M))


def leftovers(name: str) -> list[str]:
    """What of lab ``name`` still exists (netns, links, dirs, processes); empty when clean."""
    out = []
    pid = name[len(PREFIX) :]
    out += [ln for ln in _run("ip", "netns", "list", check=False).stdout.decode().splitlines() if ln.startswith(name)]
    links = _run("ip", "-o", "link", "show", check=False).stdout.decode()
    out += [m.group(0) for m in re.finditer(rf"^\d+: mt{pid}(br|h\d+)", links, re.M)]
    out += [str(p) for p in (RUN_BASE / pid, VAR_BASE / pid) if p.exists()]
    out += [f"pid {p}" for p in _pids_mentioning(str(RUN_BASE / pid) + "/")]
    return out


_shared: DockerLab | None = None
_shared_lock = threading.Lock()


def shared_lab() -> DockerLab:
    """The one DockerLab of this process (node names derive from the pid, so there can be only one)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = DockerLab()
        else:
            _shared.open()
        return _shared


def close_shared_lab() -> None:
    """Tear down this process's lab now (it re-opens on the next ``node()``), e.g. to let a child
    process run a lab of its own."""
    with _shared_lock:
        if _shared is not None:
            _shared.close()


@pytest.fixture(scope="session")
def docker_lab():
    """The session's DockerLab (skips the test when no engine lab can run here).

    Test modules that import this fixture each get a fixture definition of their
    own, but all of them share one lab (``shared_lab()``); it is closed at the end
    of the session (and at exit)."""
    reason = lab_unavailable_reason()
    if reason:
        pytest.skip(reason)
    try:
        lab = shared_lab()
    except LabError as exc:
        pytest.fail(f"the Docker lab could not start: {exc}")
    yield lab
    # every importing module's fixture finalizes at session end; the first one closes
    lab.close()
