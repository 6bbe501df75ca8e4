#!/usr/bin/env python3
"""Build the stack's images without a registry and without ``docker build``.

    python3 compose/build_offline.py OUT_DIR            # from the repository root
    docker load -i OUT_DIR/images.tar                   # on EVERY swarm node

Writes ``OUT_DIR/images.tar`` (the ``docker save`` format: one archive, three images
that share their layers) and ``OUT_DIR/images.json`` (tag -> image id).  The images:

- ``mesh-agent:latest``      this project and its dependencies (compose/Dockerfile's
                             ENTRYPOINT/CMD), on a copy of the Python that runs this script;
- ``mesh-demo-web:latest``   compose/demo (its Dockerfile's CMD, EXPOSE and HEALTHCHECK);
- ``mesh-demo-redis:latest`` the host's redis-server (Debian's package) and its libraries.

Nothing is pulled: the base is a static busybox (Debian's busybox-static), the Python
layer is the running interpreter, its standard library and the shared libraries that it,
its extension modules and the installed wheels' extension modules load (``ldd``), plus
libgcc_s (glibc dlopens it to cancel threads).  The wheels come from ``pip wheel`` of
the repository on this host (``--wheels DIR`` takes a prepared wheel directory instead,
for a host without a package index).  Layers are tarred with fixed owners and times, so
the same inputs give the same image ids; Python files are compiled to unchecked-hash
.pyc files so the agent starts without compiling.

The instructions the images need from the Dockerfiles (ENTRYPOINT, CMD, ENV, EXPOSE,
WORKDIR, HEALTHCHECK) are read from compose/Dockerfile and compose/demo/Dockerfile, so
the two ways of building cannot drift apart; FROM, COPY and RUN are what this script does
instead (a copy of the host's Python in place of python:3.11-slim, pip install from wheels).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EPOCH = 1700000000  # every file's mtime in the layers (reproducible image ids)
CREATED = "2023-11-14T22:13:20Z"  # the same instant, for the image configs
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
AGENT_TAG = "mesh-agent:latest"
WEB_TAG = "mesh-demo-web:latest"
REDIS_TAG = "mesh-demo-redis:latest"
# parts of the standard library an image does not need
STDLIB_SKIP = {"test", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "site-packages", "dist-packages",
               "__pycache__", "unittest/test", "distutils/tests"}  # fmt: skip

DYNLOAD_SKIP = re.compile(r"^(_tkinter|_test\w*|_ctypes_test|_xxtestfuzz|xxlimited\w*|xxsubtype)\.cpython-.*\.so$")


class BuildError(RuntimeError):
    pass


# -- Dockerfile instructions ---------------------------------------------------------------------------
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)$")
_UNIT_NS = {"ms": 10**6, "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9}


def _duration_ns(text: str, where: str) -> int:
    m = _DURATION.match(text)
    if not m:
        raise BuildError(f"{where}: bad duration {text!r} (e.g. 2s, 500ms)")
    return int(float(m.group(1)) * _UNIT_NS[m.group(2)])


def _exec_form(text: str, where: str) -> list[str]:
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BuildError(f"{where}: only the exec form (a JSON list of strings) is supported, got {text!r}")
    return value


def dockerfile_config(path: Path) -> dict:
    """The image config parts of a Dockerfile: Entrypoint, Cmd, Env, ExposedPorts, WorkingDir, Healthcheck."""
    cfg: dict = {}
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        lineno, line = i + 1, lines[i].strip()
        i += 1
        while line.endswith("\\") and i < len(lines):
            line = line[:-1] + " " + lines[i].strip()
            i += 1
        if not line or line.startswith("#"):
            continue
        instr, _, rest = line.partition(" ")
        instr, rest, where = instr.upper(), rest.strip(), f"{path}:{lineno}"
        if instr == "ENTRYPOINT":
            cfg["Entrypoint"] = _exec_form(rest, where)
        elif instr == "CMD":
            cfg["Cmd"] = _exec_form(rest, where)
        elif instr == "WORKDIR":
            cfg["WorkingDir"] = rest
        elif instr == "EXPOSE":
            for p in rest.split():
                cfg.setdefault("ExposedPorts", {})[p if "/" in p else f"{p}/tcp"] = {}
        elif instr == "ENV":
            for kv in shlex.split(rest):
                if "=" not in kv:
                    raise BuildError(f"{where}: ENV needs KEY=VALUE, got {kv!r}")
                cfg.setdefault("Env", []).append(kv)
        elif instr == "HEALTHCHECK":
            hc: dict = {}
            words = rest.split(" ")
            while words and words[0].startswith("--"):
                opt, _, val = words.pop(0)[2:].partition("=")
                key = {"interval": "Interval", "timeout": "Timeout", "start-period": "StartPeriod",
                       "retries": "Retries"}.get(opt)  # fmt: skip
                if key is None:
                    raise BuildError(f"{where}: unknown HEALTHCHECK option --{opt}")
                hc[key] = int(val) if key == "Retries" else _duration_ns(val, where)
            body = " ".join(words).strip()
            if body.upper() == "NONE":
                hc = {"Test": ["NONE"]}
            elif body.upper().startswith("CMD "):
                hc["Test"] = ["CMD", *_exec_form(body[4:].strip(), where)]
            else:
                raise BuildError(f"{where}: HEALTHCHECK needs CMD [exec form] or NONE")
            cfg["Healthcheck"] = hc
    return cfg


# -- filesystem trees -----------------------------------------------------------------------------------
class Tree:
    """Files for one layer: image path -> (host path | bytes | symlink target | None for a directory, mode)."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[str, object, int]] = {}

    def dir(self, path: str, mode: int = 0o755) -> None:
        parts = path.strip("/").split("/")
        for k in range(1, len(parts) + 1):
            p = "/".join(parts[:k])
            if p and p not in self.entries:
                self.entries[p] = ("dir", None, mode if k == len(parts) else 0o755)

    def file(self, path: str, src: Path | bytes, mode: int | None = None) -> None:
        path = path.strip("/")
        if "/" in path:
            self.dir(os.path.dirname(path))
        if isinstance(src, Path):
            mode = stat.S_IMODE(src.stat().st_mode) if mode is None else mode
        self.entries[path] = ("file", src, 0o644 if mode is None else mode)

    def link(self, path: str, target: str) -> None:
        path = path.strip("/")
        if "/" in path:
            self.dir(os.path.dirname(path))
        self.entries[path] = ("link", target, 0o777)

    def copy_tree(self, src: Path, dest: str, skip=frozenset()) -> None:
        """Copy a host directory (files, symlinks) to ``dest`` in the image; ``skip``: relative paths left out."""
        for dirpath, dirnames, filenames in os.walk(src):
            rel = os.path.relpath(dirpath, src)
            rel = "" if rel == "." else rel
            dirnames[:] = [d for d in dirnames if os.path.join(rel, d) not in skip and d != "__pycache__"]
            self.dir(os.path.join(dest, rel))
            for name in [*filenames, *(d for d in dirnames if os.path.islink(os.path.join(dirpath, d)))]:
                host = Path(dirpath, name)
                target = os.path.join(dest, rel, name)
                if host.is_symlink():
                    self.link(target, os.readlink(host))
                elif host.is_file():
                    self.file(target, host)

    def tar_bytes(self) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for path in sorted(self.entries):
                kind, src, mode = self.entries[path]
                ti = tarfile.TarInfo(path)
                ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = EPOCH, mode, 0, 0, "", ""
                if kind == "dir":
                    ti.type = tarfile.DIRTYPE
                    tf.addfile(ti)
                elif kind == "link":
                    ti.type, ti.linkname = tarfile.SYMTYPE, str(src)
                    tf.addfile(ti)
                else:
                    data = src if isinstance(src, bytes) else Path(src).read_bytes()
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
        return buf.getvalue()


def _ldd(paths: list[Path]) -> set[str]:
    """Absolute paths of the shared libraries the ELF files ``paths`` load (as the dynamic loader finds them)."""
    libs: set[str] = set()
    for p in paths:
        res = subprocess.run(["ldd", str(p)], capture_output=True, text=True, check=False)
        for line in res.stdout.splitlines():
            line = line.strip()
            if "=> not found" in line:
                raise BuildError(f"{p}: {line} on this host")
            m = re.match(r"^\S+ => (/\S+) \(0x", line) or re.match(r"^(/\S+) \(0x", line)
            if m:
                libs.add(m.group(1))
    return libs


def _elf_files(tree: Tree) -> list[Path]:
    out = []
    for path, (kind, src, _) in tree.entries.items():
        if (
            kind == "file"
            and isinstance(src, Path)
            and (path.endswith(".so") or ".so." in path or src.stat().st_mode & 0o111)
        ):
            with open(src, "rb") as f:
                if f.read(4) == b"\x7fELF":
                    out.append(src)
    return out


def add_libraries(tree: Tree, below: set[str], extra: tuple[str, ...] = ()) -> None:
    """Add to ``tree`` the shared libraries its ELF files load, except those in ``below`` (lower layers)."""
    for lib in sorted(_ldd(_elf_files(tree)) | set(extra)):
        if lib.strip("/") not in below and lib.strip("/") not in tree.entries:
            tree.file(lib, Path(os.path.realpath(lib)))


def _find_lib(name: str) -> str:
    out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=False).stdout
    m = re.search(rf"^\s+{re.escape(name)} \(libc6,x86-64\) => (\S+)$", out, re.M)
    if not m:
        raise BuildError(f"{name} not found on this host (ldconfig -p)")
    return m.group(1)


def base_tree() -> Tree:
    """busybox (static) with its applets, /etc basics, /tmp, CA certificates."""
    bb = shutil.which("busybox")
    if bb is None:
        raise BuildError("busybox not found (apt-get install busybox-static)")
    bb_path = Path(bb).resolve()
    t = Tree()
    for d in ("bin", "etc", "root", "proc", "sys", "dev", "usr/bin", "usr/local/bin", "var/run"):
        t.dir(d)
    t.dir("tmp", 0o1777)
    t.file("bin/busybox", bb_path, 0o755)
    applets = subprocess.run([str(bb_path), "--list"], capture_output=True, text=True, check=True).stdout.split()
    for a in applets:
        if a != "busybox" and "/" not in a:
            t.link(f"bin/{a}", "busybox")
    t.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
    t.file("etc/group", b"root:x:0:\nnogroup:x:65534:\n")
    t.file("etc/nsswitch.conf", b"hosts: files dns\n")
    ca = Path("/etc/ssl/certs/ca-certificates.crt")
    if ca.exists():
        t.file("etc/ssl/certs/ca-certificates.crt", ca.resolve(), 0o644)
    if _elf_files(t):
        add_libraries(t, set())
    return t


def python_tree(below: set[str]) -> tuple[Tree, str, str]:
    """The running interpreter + its standard library + their libraries; returns (tree, exe, purelib)."""
    exe = os.path.realpath(sys.executable)
    stdlib = sysconfig.get_paths()["stdlib"]
    platstdlib = sysconfig.get_paths()["platstdlib"]
    purelib = sysconfig.get_paths()["purelib"]
    t = Tree()
    t.file(exe, Path(exe), 0o755)
    skip = {s for s in STDLIB_SKIP} | {
        os.path.relpath(p, stdlib) for p in Path(stdlib).glob("config-*")
    }  # fmt: skip
    t.copy_tree(Path(stdlib), stdlib, skip)
    if platstdlib != stdlib:
        t.copy_tree(Path(platstdlib), platstdlib, skip)
    for path in [p for p in t.entries if DYNLOAD_SKIP.match(os.path.basename(p))]:
        del t.entries[path]  # Tk (and its X11 libraries), the interpreter's own test modules
    t.dir(purelib)
    for name in ("python3", "python"):
        t.link(f"usr/local/bin/{name}", exe)
    add_libraries(t, below, extra=(_find_lib("libgcc_s.so.1"),))
    return t, exe, purelib


def compile_tree(tree: Tree, root: Path) -> None:
    """Write every .py of ``tree`` to ``root``, compile them (unchecked-hash .pyc, reproducible) and add the
    __pycache__ files to the tree."""
    pys = [(p, src) for p, (kind, src, _) in tree.entries.items() if kind == "file" and p.endswith(".py")]
    if not pys:
        return
    for p, src in pys:
        dest = root / p
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(src if isinstance(src, bytes) else Path(src).read_bytes())
    listing = root / ".files"
    listing.write_text("\n".join(str(root / p) for p, _ in pys) + "\n")
    res = subprocess.run(
        [sys.executable, "-m", "compileall", "-q", "-j", "0", "--invalidation-mode", "unchecked-hash",
         "-s", str(root), "-i", str(listing)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    # files that do not compile (py2 leftovers, templates) are simply left without a .pyc
    del res
    for pyc in root.rglob("__pycache__/*.pyc"):
        rel = pyc.relative_to(root).as_posix()
        tree.file(rel, pyc.read_bytes(), 0o644)


def site_tree(wheels: Path, purelib: str, exe: str, below: set[str], reqs: list[str], work: Path) -> Tree:
    """pip install (from ``wheels`` only) of ``reqs`` into ``purelib``; the ``mesh`` script in /usr/local/bin."""
    target = work / "site"
    res = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--find-links", str(wheels),
         "--no-compile", "--no-warn-script-location", "--target", str(target), *reqs],
        capture_output=True, text=True, check=False, env={**os.environ, "PIP_CONSTRAINT": ""},
    )  # fmt: skip
    if res.returncode != 0:
        raise BuildError(f"pip install from {wheels} failed:\n{res.stderr[-2000:]}")
    shutil.rmtree(target / "bin", ignore_errors=True)  # the scripts are written below, for the image's paths
    t = Tree()
    t.copy_tree(target, purelib)
    t.file("usr/local/bin/mesh", f"#!{exe}\nimport sys\nfrom meshagent.cli import main\nsys.exit(main())\n".encode(),
           0o755)  # fmt: skip
    add_libraries(t, below)
    compile_tree(t, work / "compile-site")
    return t


def demo_tree(below: set[str], work: Path) -> Tree:
    t = Tree()
    t.file("app.py", ROOT / "compose" / "demo" / "app.py", 0o644)
    return t


def redis_tree(below: set[str]) -> Tree:
    server = shutil.which("redis-server")
    if server is None:
        raise BuildError("redis-server not found on this host (apt-get install redis-server)")
    t = Tree()
    t.file("usr/bin/redis-server", Path(server).resolve(), 0o755)
    t.dir("data")
    add_libraries(t, below)
    return t


# -- the archive ----------------------------------------------------------------------------------------
class Archive:
    """Images in the ``docker save`` format (manifest.json + config json + one layer.tar per layer)."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}  # archive path -> bytes
        self.manifest: list[dict] = []
        self.ids: dict[str, str] = {}

    def layer(self, tree: Tree) -> tuple[str, str]:
        data = tree.tar_bytes()
        diff = hashlib.sha256(data).hexdigest()
        self.blobs.setdefault(f"{diff}/layer.tar", data)
        return f"sha256:{diff}", f"{diff}/layer.tar"

    def image(self, tag: str, layers: list[tuple[str, str, str]], config: dict) -> str:
        """``layers``: (diff id, archive path, what made it)."""
        cfg = {
            "architecture": "amd64",
            "os": "linux",
            "created": CREATED,
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": [d for d, _, _ in layers]},
            "history": [{"created": CREATED, "created_by": why} for _, _, why in layers],
        }
        raw = json.dumps(cfg, sort_keys=True, separators=(",", ":")).encode()
        digest = hashlib.sha256(raw).hexdigest()
        self.blobs[f"{digest}.json"] = raw
        self.manifest.append({"Config": f"{digest}.json", "RepoTags": [tag], "Layers": [p for _, p, _ in layers]})
        self.ids[tag] = f"sha256:{digest}"
        return self.ids[tag]

    def write(self, path: Path) -> None:
        self.blobs["manifest.json"] = json.dumps(self.manifest, sort_keys=True).encode()
        tmp = path.with_suffix(".tmp")
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
            for name in sorted(self.blobs):
                ti = tarfile.TarInfo(name)
                ti.size, ti.mtime, ti.mode = len(self.blobs[name]), EPOCH, 0o644
                tf.addfile(ti, io.BytesIO(self.blobs[name]))
        tmp.replace(path)


PROJECT_FILES = ("pyproject.toml", "README.md")
PROJECT_PACKAGES = ("mesh", "discovery", "meshagent", "cluster")  # pyproject's [tool.setuptools.packages.find]


def project_wheels(dest: Path, work: Path) -> None:
    """``pip wheel`` of this repository and its dependencies into ``dest`` (needs the package index).  The
    wheel is built from a clean copy of the sources: an in-tree build reuses ./build, where a module removed
    from the sources would live on."""
    src = work / "src"
    src.mkdir()
    for name in PROJECT_FILES:
        shutil.copy2(ROOT / name, src / name)
    for pkg in PROJECT_PACKAGES:
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(dest), str(src)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if res.returncode != 0:
        raise BuildError(f"pip wheel {ROOT} failed:\n{res.stderr[-2000:]}")


def _merge(config: dict, extra_env: list[str]) -> dict:
    out = dict(config)
    env = [PATH_ENV, *extra_env]
    keys = {e.split("=", 1)[0] for e in config.get("Env", [])}
    out["Env"] = [e for e in env if e.split("=", 1)[0] not in keys] + config.get("Env", [])
    return out


def build(out: Path, wheels: Path | None = None) -> dict[str, str]:
    out.mkdir(parents=True, exist_ok=True)
    arch = Archive()
    with tempfile.TemporaryDirectory(prefix="mesh-offline-") as tmp:
        work = Path(tmp)
        if wheels is None:
            wheels = work / "wheels"
            project_wheels(wheels, work)
        base = base_tree()
        base_layer = (*arch.layer(base), "busybox (static), /etc basics, CA certificates")
        below = set(base.entries)
        py, exe, purelib = python_tree(below)
        compile_tree(py, work / "compile-py")
        py_layer = (*arch.layer(py), f"python {sys.version.split()[0]} copied from {exe} with its libraries")
        below_py = below | set(py.entries)

        site = site_tree(wheels, purelib, exe, below_py, ["docker-routing-mesh"], work)
        agent_cfg = _merge(dockerfile_config(ROOT / "compose" / "Dockerfile"), ["PYTHONUNBUFFERED=1"])
        agent_cfg.setdefault("WorkingDir", "/")
        arch.image(AGENT_TAG, [base_layer, py_layer, (*arch.layer(site), "pip install docker-routing-mesh")],
                   agent_cfg)  # fmt: skip

        web_cfg = _merge(dockerfile_config(ROOT / "compose" / "demo" / "Dockerfile"), ["PYTHONUNBUFFERED=1"])
        arch.image(WEB_TAG, [base_layer, py_layer, (*arch.layer(demo_tree(below_py, work)), "COPY app.py /app.py")],
                   web_cfg)  # fmt: skip

        redis_cfg = {
            "Env": [PATH_ENV],
            "Cmd": ["redis-server", "--protected-mode", "no", "--save", "", "--appendonly", "no"],
            "ExposedPorts": {"6379/tcp": {}},
            "WorkingDir": "/data",
        }
        arch.image(REDIS_TAG, [base_layer, (*arch.layer(redis_tree(below)), "redis-server with its libraries")],
                   redis_cfg)  # fmt: skip
        arch.write(out / "images.tar")
    (out / "images.json").write_text(json.dumps(arch.ids, indent=1, sort_keys=True) + "\n")
    return arch.ids


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="directory for images.tar and images.json")
    ap.add_argument("--wheels", type=Path, help="a directory of prepared wheels (default: pip wheel of the repo)")
    args = ap.parse_args(argv)
    try:
        ids = build(args.out, args.wheels)
    except BuildError as exc:
        print(f"build_offline: {exc}", file=sys.stderr)
        return 1
    for tag, image_id in sorted(ids.items()):
        print(f"{tag} {image_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
