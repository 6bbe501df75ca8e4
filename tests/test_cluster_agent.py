"""The cluster agent's command line: bad settings exit 2 with a message naming what is wrong."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "meshagent.cluster", "run", "--cluster", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    p = tmp_path / "token"
    p.write_text("0123456789abcdef0123456789abcdef\n")
    p.chmod(0o600)
    return p


def test_missing_token_file_exits_2_naming_it(tmp_path: Path) -> None:
    res = _run("--token-file", str(tmp_path / "nope"))
    assert res.returncode == 2
    assert f"{tmp_path / 'nope'}: cluster token file does not exist" in res.stderr


def test_world_writable_token_file_is_refused(token_file: Path) -> None:
    token_file.chmod(0o666)
    res = _run("--token-file", str(token_file))
    assert res.returncode == 2
    assert "group- or world-writable" in res.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--tunnel-port", "0"), "--tunnel-port must be 1-65535, got 0"),
        (("--control-port", "70000"), "--control-port must be 1-65535, got 70000"),
        (("--status", "nohost"), "--status: expected 'host:port', got 'nohost'"),
        (("--control-wait", "0"), "--control-wait must be > 0, got 0.0"),
    ],
)
def test_bad_settings_exit_2(token_file: Path, args: tuple[str, ...], message: str) -> None:
    res = _run("--token-file", str(token_file), *args)
    assert res.returncode == 2, res.stderr
    assert message in res.stderr


def test_an_engine_that_is_not_a_swarm_node_is_a_clear_error(token_file: Path, tmp_path: Path) -> None:
    # an engine that answers /info but is not in a swarm: a tiny fake over a unix socket
    sock = tmp_path / "docker.sock"
    fake = subprocess.Popen(
        [sys.executable, "-c", FAKE_ENGINE, str(sock)], stdout=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        assert fake.stdout.readline().strip() == "ready"
        res = _run("--token-file", str(token_file), "--docker", f"unix://{sock}")
        assert res.returncode == 2, res.stderr
        assert "is not part of an active swarm" in res.stderr
    finally:
        fake.kill()
        fake.wait(10)
        fake.stdout.close()


FAKE_ENGINE = """
import asyncio, sys
from aiohttp import web

async def main():
    app = web.Application()
    app.router.add_get("/_ping", lambda r: web.Response(text="OK"))
    app.router.add_get("/version", lambda r: web.json_response({"ApiVersion": "1.41"}))
    app.router.add_get("/v1.41/info", lambda r: web.json_response({"Name": "x", "Swarm": {"LocalNodeState": "inactive"}}))
    runner = web.AppRunner(app)
    await runner.setup()
    await web.UnixSite(runner, sys.argv[1]).start()
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""
