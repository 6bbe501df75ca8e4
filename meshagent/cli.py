"""The ``mesh`` command: the composition root that wires a table source to the data plane.

    mesh run [--config FILE | --docker [HOST]] [--workers N] [--admin ADDR] [--grace SECONDS] [--max-fds N]
             [--log-level L] [--log-format text|json] [--access-log] [--no-metrics] [--node NAME]
             [--watch-interval S] [--handover PATH] [--handover-timeout S]
    mesh run --cluster --token-file FILE [--docker HOST] [--control-port P] [--tunnel-port P]
             [--advertise ADDR] [--bind ADDR] [--control-wait S] [--admin ADDR] [--grace S] ...
    mesh check --config FILE
    mesh demo ...
    mesh --version

Every option of ``run`` and ``check`` can also come from the environment as MESH_<OPTION> (MESH_CONFIG,
MESH_WORKERS, MESH_ADMIN, MESH_ACCESS_LOG=1, MESH_DOCKER=1 or MESH_DOCKER=unix:///path ...); a flag on the
command line wins over the environment.

Exit codes: 0 done (including a clean drain after SIGTERM/SIGINT), 2 usage or configuration error (the
message on stderr names file:line), 1 runtime failure.

Process model: with ``--workers 1`` (default) this process runs the data plane itself.  With N > 1 it owns
the table source and the admin API and runs N worker processes (meshagent/workers.py).

Signals: SIGTERM / SIGINT stop accepting, drain open connections for up to ``--grace`` seconds, exit 0.
SIGHUP reloads the config file (the file is also watched; see meshagent/reload.py).  SIGUSR2 (not in
cluster mode) starts the same command line as a new process (a new PID, this one's child) that takes the
listening sockets over (meshagent/handover.py); this process then drains and exits 0.

Upgrades without a refused connection: ``--handover PATH`` (MESH_HANDOVER) names a unix socket.  An agent
started while another serves PATH takes that one's listening sockets over (data plane, admin API, cluster
tunnel and control), then the old one stops accepting and drains; see docs/upgrades.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NoReturn

from mesh import __version__
from mesh.errors import ConfigError
from mesh.routing import RoutingTable

__all__ = ["build_parser", "main"]

log = logging.getLogger("meshagent")

ENV_PREFIX = "MESH_"
EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2
DEFAULT_ADMIN = "127.0.0.1:9901"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


class UsageError(Exception):
    """Bad flags or environment variables: exit 2 with the message."""


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return v


def _seconds(text: str) -> float:
    from mesh.config import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_seconds(text: str) -> float:
    v = _seconds(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a duration > 0, got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (without environment defaults; ``main`` applies those)."""
    parser = argparse.ArgumentParser(
        prog="mesh",
        description="A userspace ingress routing mesh and load balancer for Docker.",
        epilog="Every option can also be set as MESH_<OPTION> in the environment (flags win).",
    )
    parser.add_argument("--version", action="version", version=f"mesh {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    run = sub.add_parser("run", help="run the routing mesh", description="Run the routing mesh.")
    src = run.add_mutually_exclusive_group()
    src.add_argument("--config", metavar="FILE", help="static config file (.yaml, .yml or .toml), reloaded on change")
    src.add_argument(
        "--docker",
        metavar="HOST",
        nargs="?",
        const="",
        default=None,
        help="discover services from Docker (default engine, as the docker CLI finds it: $DOCKER_HOST, $DOCKER_CONTEXT, the current docker context, /var/run/docker.sock)",
    )
    run.add_argument("--workers", type=_positive_int, default=1, metavar="N", help="data-plane processes (default 1)")
    run.add_argument(
        "--admin",
        metavar="ADDR",
        default=DEFAULT_ADMIN,
        help=f"admin API address, host:port or port (default {DEFAULT_ADMIN}; 'off' to disable)",
    )
    run.add_argument(
        "--grace",
        type=_seconds,
        default=10.0,
        metavar="SECONDS",
        help="on SIGTERM/SIGINT, how long open connections may finish (default 10)",
    )
    run.add_argument("--max-fds", type=_positive_int, default=None, metavar="N", help="raise RLIMIT_NOFILE to N")
    run.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    run.add_argument("--log-format", choices=("text", "json"), default="text")
    run.add_argument("--access-log", action="store_true", help="log one line per closed connection")
    run.add_argument("--no-metrics", action="store_true", help="serve no /metrics (the admin API's other paths stay)")
    run.add_argument(
        "--node", metavar="NAME", default=None, help="this node's name (prefer its endpoints; cluster mode)"
    )
    cl = run.add_argument_group("cluster mode (one agent per swarm node; see docs/cluster.md)")
    cl.add_argument("--cluster", action="store_true", help="follow the swarm through its managers' agents")
    cl.add_argument("--token-file", metavar="FILE", default=None, help="shared cluster token (a Docker secret)")
    # ports and the wait are checked by meshagent.cluster.ClusterSettings.check(), naming the flag
    cl.add_argument("--control-port", type=int, default=None, metavar="PORT", help="manager control port (7480)")
    cl.add_argument("--tunnel-port", type=int, default=None, metavar="PORT", help="agent tunnel port (7481)")
    cl.add_argument("--advertise", default=None, metavar="ADDR", help="this node's address (default: Swarm.NodeAddr)")
    cl.add_argument("--bind", default=None, metavar="ADDR", help="address of the control and tunnel servers (0.0.0.0)")
    cl.add_argument(
        "--status",
        default=None,
        metavar="HOST:PORT",
        help="deprecated: the admin API (--admin) serves GET /v1/cluster/status; "
        "--status HOST:PORT with the default --admin moves the admin API there",
    )
    cl.add_argument("--control-wait", type=_seconds, default=None, metavar="S", help="long-poll wait (20)")
    # TLS on the control port (docs/cluster.md, "The control channel's TLS"): every node gets the same flags
    cl.add_argument("--control-tls-ca", default=None, metavar="FILE", help="CA of the managers' certificate: TLS on")
    cl.add_argument("--control-tls-cert", default=None, metavar="FILE", help="control certificate (served by managers)")
    cl.add_argument("--control-tls-key", default=None, metavar="FILE", help="the control certificate's key")
    cl.add_argument("--control-tls-name", default=None, metavar="NAME", help="name in that certificate (mesh-control)")
    cl.add_argument("--control-tls-mutual", action="store_true", help="managers require client certificates too")
    run.add_argument(
        "--handover",
        metavar="PATH",
        default=None,
        help="unix socket for hitless upgrades: take the listening sockets over from the agent serving PATH "
        "(if any), then serve PATH for the next one (docs/upgrades.md)",
    )
    run.add_argument(
        "--handover-timeout",
        type=_positive_seconds,
        default=5.0,
        metavar="SECONDS",
        help="how long the old agent may take to answer a handover before this one binds normally (default 5)",
    )
    run.add_argument(
        "--watch-interval",
        type=_positive_seconds,
        default=1.0,
        metavar="SECONDS",
        help="how often the config file is checked for changes (default 1)",
    )

    check = sub.add_parser("check", help="validate a config file and print its routing table")
    check.add_argument("--config", metavar="FILE", required=False, help="config file to check")

    demo = sub.add_parser("demo", help="run the demo (see `mesh demo --help`)", add_help=False)
    demo.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _apply_env(sub: argparse.ArgumentParser, env: dict[str, str]) -> None:
    """Turn MESH_<OPTION> variables into defaults of ``sub``, converted and checked like the flag."""
    for action in sub._actions:
        long = next((o for o in action.option_strings if o.startswith("--")), None)
        if long is None or action.dest in ("help",):
            continue
        name = ENV_PREFIX + long[2:].upper().replace("-", "_")
        if name not in env:
            continue
        raw = env[name]
        if isinstance(action, argparse._StoreTrueAction):
            if raw.strip().lower() not in _TRUE + _FALSE:
                raise UsageError(f"{name}: expected one of 1, true, yes, on, 0, false, no, off; got {raw!r}")
            value: Any = raw.strip().lower() in _TRUE
        elif action.nargs == "?":
            value = action.const if raw.strip().lower() in _TRUE else raw
            if raw.strip().lower() in _FALSE:
                continue
        else:
            value = raw
            if action.type is not None:
                try:
                    value = action.type(raw)
                except (argparse.ArgumentTypeError, ValueError) as exc:
                    raise UsageError(f"{name}: {exc}") from None
            if action.choices is not None and value not in action.choices:
                choices = ", ".join(map(str, action.choices))
                raise UsageError(f"{name}: expected one of {choices}; got {raw!r}")
        sub.set_defaults(**{action.dest: value})


def parse_args(argv: Sequence[str], env: dict[str, str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` with MESH_* defaults from ``env``.  Raises ``UsageError`` or ``SystemExit`` (argparse)."""
    parser = build_parser()
    env = dict(os.environ if env is None else env)
    subs = _subparsers(parser)
    for name in ("run", "check"):
        _apply_env(subs[name], env)
    args = parser.parse_args(list(argv))
    if args.command == "run" and args.config and args.docker is not None:
        # One came from the environment, the other from a flag (argparse only sees flags): the flag wins.
        flags = set(argv)
        if "--docker" in flags or any(a.startswith("--docker=") for a in flags):
            args.config = None
        else:
            args.docker = None
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mesh`` console script and ``python -m meshagent``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["worker"]:
        return _worker_command(argv[1:])
    if argv[:1] == ["demo"]:
        return _demo(argv[1:])
    try:
        args = parse_args(argv)
    except UsageError as exc:
        print(f"mesh: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # argparse: --help, --version, or a usage error (already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command == "check":
        return _check(args)
    if args.command == "run":
        args.argv = argv  # what SIGUSR2 re-executes
        return _run_command(args)
    return EXIT_USAGE


# -- check / demo ---------------------------------------------------------------------------------------


def _check(args: argparse.Namespace) -> int:
    from mesh.config import load_config
    from meshagent.reload import summarize

    if not args.config:
        print("mesh check: --config FILE (or MESH_CONFIG) is required", file=sys.stderr)
        return EXIT_USAGE
    try:
        table = load_config(args.config)
    except ConfigError as exc:
        print(f"mesh: {exc}", file=sys.stderr)
        return EXIT_USAGE
    n_routes = sum(1 for _ in table.routes())
    print(summarize(table))
    print(f"{args.config}: OK, {len(table.services)} services, {n_routes} listeners, digest {table.digest}")
    return EXIT_OK


def _demo(argv: list[str]) -> int:
    try:
        from meshagent import demo
    except ImportError as exc:
        print(f"mesh demo is not available in this installation ({exc})", file=sys.stderr)
        return EXIT_RUNTIME
    return int(demo.main(argv) or 0)


# -- run ------------------------------------------------------------------------------------------------


def _run_loop(coro_fn: Callable[[], Any]) -> Any:
    """Run ``coro_fn()`` on uvloop (the product's loop; ``mesh.loop`` falls back to asyncio without it)."""
    from mesh.loop import run

    return run(coro_fn())


def _run_cluster(args: argparse.Namespace, admin_addr: tuple[str, int] | None) -> int:
    """``mesh run --cluster``: the cluster-mode agent of one swarm node (meshagent/cluster.py)."""
    from meshagent.cluster import ClusterSettings, run_cluster_agent

    if args.config:
        print("mesh: --cluster follows the swarm; it takes no --config", file=sys.stderr)
        return EXIT_USAGE
    if not args.token_file:
        print("mesh: --cluster needs --token-file FILE (or MESH_TOKEN_FILE)", file=sys.stderr)
        return EXIT_USAGE
    if args.status:
        try:
            admin_addr = _status_as_admin(args.status, args.admin, admin_addr)
        except UsageError as exc:
            print(f"mesh: {exc}", file=sys.stderr)
            return EXIT_USAGE
    given = {
        "docker": args.docker or None,
        "control_port": args.control_port,
        "tunnel_port": args.tunnel_port,
        "advertise": args.advertise,
        "bind": args.bind,
        "control_wait": args.control_wait,
        "grace": args.grace,
        "control_tls_ca": args.control_tls_ca,
        "control_tls_cert": args.control_tls_cert,
        "control_tls_key": args.control_tls_key,
        "control_tls_name": args.control_tls_name,
        "control_tls_mutual": args.control_tls_mutual,
    }
    settings = ClusterSettings(token_file=args.token_file, **{k: v for k, v in given.items() if v is not None})
    _raise_nofile(args.max_fds)
    try:
        return int(
            _run_loop(
                lambda: run_cluster_agent(
                    settings,
                    admin=admin_addr,
                    metrics=not args.no_metrics,
                    handover=args.handover,
                    handover_timeout=args.handover_timeout,
                    workers=args.workers,
                    worker_args=_worker_args(args),
                )
            )
        )
    except (ConfigError, OSError) as exc:  # bad settings or token file, not a swarm node, a port in use
        print(f"mesh: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _status_as_admin(status: str, admin: str, admin_addr: tuple[str, int] | None) -> tuple[str, int]:
    """``--status HOST:PORT`` (the agent's old status server): the admin API now serves /v1/cluster/status,
    so it names where the admin API listens (also with --admin off: the old command line served a status).
    With an --admin other than the default and off, that is a conflict."""
    from mesh.routing import parse_hostport

    try:
        addr = parse_hostport(status)
    except ValueError as exc:
        raise UsageError(f"--status: {exc}") from None
    if admin_addr is not None and admin != DEFAULT_ADMIN and admin_addr != addr:
        raise UsageError(
            f"--status {status} and --admin {admin}: the admin API serves /v1/cluster/status now; give only --admin"
        )
    log.warning("--status is deprecated: the admin API serves /v1/cluster/status; use --admin %s", status)
    return addr


def _raise_nofile(max_fds: int | None) -> None:
    from mesh.limits import raise_nofile

    try:
        log.info("open files limit: %d", raise_nofile(max_fds))
    except (OSError, ValueError) as exc:
        log.warning("cannot raise the open-files limit to %s: %s", max_fds, exc)


def _run_command(args: argparse.Namespace) -> int:
    from mesh.logs import setup_logging

    setup_logging(args.log_level, args.log_format, access_log=args.access_log)
    admin_addr: tuple[str, int] | None = None
    if args.admin and args.admin.strip().lower() not in ("off", "none", "no", "false", "0"):
        from mesh.admin import parse_admin_address

        try:
            admin_addr = parse_admin_address(args.admin)
        except ConfigError as exc:
            print(f"mesh: {exc}", file=sys.stderr)
            return EXIT_USAGE

    if args.cluster:
        return _run_cluster(args, admin_addr)

    source: Any
    if args.config:
        from meshagent.reload import ConfigSource

        source = ConfigSource(args.config, interval=args.watch_interval, workers=args.workers)
        try:
            table = source.load_initial()
        except ConfigError as exc:
            print(f"mesh: {exc}", file=sys.stderr)
            return EXIT_USAGE
        log.info("loaded %s: %d services", args.config, len(table.services))
    else:
        try:
            source = _docker_source(args.docker)
        except ConfigError as exc:
            print(f"mesh: {exc}", file=sys.stderr)
            return EXIT_USAGE

    _raise_nofile(args.max_fds)
    try:
        return _run_loop(lambda: _serve(args, source, admin_addr))
    except ConfigError as exc:  # e.g. the admin address is in use
        log.error("%s", exc)
        print(f"mesh: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception:
        log.exception("mesh run failed")
        return EXIT_RUNTIME


class _DockerSource:
    """Docker discovery (``discovery.watch``) with the same shape as ``ConfigSource``."""

    def __init__(self, host_arg: str | None, url: str) -> None:
        self.host_arg = host_arg
        self.url = url
        self.publish: Callable[[RoutingTable], Any] | None = None  # set before start()
        self.watcher: Any = None
        self.metrics: Any = None  # mesh.metrics.DiscoveryMetrics, set by the composition root

    async def start(self) -> None:
        """Nothing to do: the first table comes from the watcher's first listing in ``run()``."""

    async def _on_table(self, table: RoutingTable, info: Any = None) -> None:
        assert self.publish is not None
        await self.publish(table)

    def _on_watcher(self, watcher: Any) -> None:
        self.watcher = watcher

    async def run(self) -> None:
        from discovery import watch

        log.info("following the Docker engine at %s", self.url)
        hooks = self.metrics.hooks() if self.metrics is not None else {}
        await watch(self.host_arg or None, self._on_table, on_watcher=self._on_watcher, **hooks)

    def poke(self) -> None:
        log.info("SIGHUP: the Docker source follows events; nothing to reload")

    def stop(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()


def _docker_source(host_arg: str | None) -> _DockerSource:
    """The Docker table source; with no --docker (``host_arg`` None) only if a local engine answers."""
    from discovery import HostError, probe, resolve_docker_host

    try:
        url = resolve_docker_host(host_arg or None).url
    except HostError as exc:
        raise ConfigError(f"--docker: {exc}") from exc
    if _run_loop(lambda: probe(host_arg or None, timeout=3.0)) is None:
        if host_arg is None:
            raise ConfigError(
                f"no --config given and no Docker engine answers at {url}; "
                "pass --config FILE or start Docker (or point --docker / DOCKER_HOST at one)"
            )
        raise ConfigError(f"--docker: no Docker engine answers at {url}")
    return _DockerSource(host_arg, url)


def force_exit(sig: signal.Signals, pids: Iterable[int | None] = ()) -> NoReturn:
    """Exit at once (code 128 + signal number), after SIGKILL to ``pids`` (the workers): what a second
    SIGTERM/SIGINT during the drain does.  Open connections are cut by the kernel closing the sockets."""
    log.warning("%s again: exiting now, without waiting for open connections", sig.name)
    for pid in pids:
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:
            pass
    os._exit(128 + int(sig))


async def _serve(args: argparse.Namespace, source: Any, admin_addr: tuple[str, int] | None) -> int:
    from mesh.admin import AdminServer, MeshState, WorkerPoolState
    from mesh.listener import INHERITED
    from mesh.metrics import DiscoveryMetrics, make_registry
    from meshagent.handover import Offer, Upgrades, close_listeners, server_sockets, start_admin

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    got: list[str] = []

    def on_stop(sig: signal.Signals) -> None:
        if stop.is_set():
            # A second SIGTERM/SIGINT while draining: the operator means "now" (the reliability issue).
            force_exit(sig, pids=pool.pids() if pool is not None else ())
        log.info("%s: stop accepting, draining open connections for up to %.1fs", sig.name, args.grace)
        got.append(sig.name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop, sig)
    loop.add_signal_handler(signal.SIGHUP, source.poke)

    pool = mesh = admin = None

    def offers() -> list[Offer]:
        found = pool.listening_sockets() if pool is not None else mesh.listening_sockets()
        out = [Offer(kind, host, port, role, sock) for kind, host, port, role, sock in found]
        if admin is not None and admin_addr is not None and admin_addr[1]:
            out += [Offer("stream", admin_addr[0], admin_addr[1], "admin", s) for s in server_sockets(admin)]
        return out

    async def stop_accepting() -> None:
        if pool is not None:
            pool.stop_accepting()
        if mesh is not None:
            mesh.stop_accepting()
        if admin is not None:
            close_listeners(admin)

    upgrades: Upgrades | None = None
    if args.handover:
        upgrades = Upgrades(args.handover, offers, stop_accepting, timeout=args.handover_timeout)
        await upgrades.takeover()

    if args.workers > 1:
        from meshagent.workers import WorkerPool

        worker_args = _worker_args(args)
        if args.node:
            worker_args += ["--node", args.node]
        pool = WorkerPool(args.workers, worker_args)
        if upgrades is not None and upgrades.contested:
            pool.rebind_max = 2.0
        state: Any = WorkerPoolState(pool)
        inner_publish = pool.publish
    else:
        from mesh.runtime import Mesh
        from meshagent.workers import _make_mesh

        mesh = _make_mesh(Mesh, node=args.node, access_log=args.access_log, reuse_port=False)
        if upgrades is not None and upgrades.contested:
            mesh.rebind_max = 2.0
        state = MeshState(mesh)
        inner_publish = mesh.apply

    first_table = asyncio.Event()

    async def publish(table: RoutingTable) -> None:
        await inner_publish(table)
        first_table.set()

    registry = None
    if isinstance(source, _DockerSource):
        source.metrics = DiscoveryMetrics()
        registry = make_registry(discovery=source.metrics)
    admin = (
        AdminServer(
            state,
            *admin_addr,
            registry=registry,
            metrics=not args.no_metrics,
            discovery=getattr(source, "metrics", None),
        )
        if admin_addr is not None
        else None
    )
    admin_retry = None
    if admin is not None:
        assert admin_addr is not None
        sock = INHERITED.take("stream", *admin_addr) if admin_addr[1] else None
        # ConfigError (address in use) -> exit 2 before anything else runs (unless an old agent holds it)
        admin_retry = await start_admin(admin, sock, upgrades)
    rc = EXIT_OK
    source_task: asyncio.Task[None] | None = None
    tasks: list[asyncio.Task[Any]] = []
    reexec = _Reexec(args, lambda: upgrades)

    async def serving() -> None:
        """Once this agent serves its first table: the old agent (if any) may stop; serve --handover PATH."""
        await first_table.wait()
        if pool is not None:
            await pool.wait_ready()  # every worker accepts on the sockets
        if upgrades is not None:
            await upgrades.complete()

    try:
        if pool is not None:
            await pool.start()
        source.publish = publish
        await source.start()
        source_task = asyncio.create_task(source.run(), name="table-source")
        tasks.append(asyncio.create_task(serving(), name="handover-complete"))
        loop.add_signal_handler(signal.SIGUSR2, reexec.trigger, upgrades_factory(args, offers, stop_accepting))
        waiters = [asyncio.create_task(stop.wait()), asyncio.create_task(reexec.finished.wait())]
        if upgrades is not None:
            waiters.append(asyncio.create_task(upgrades.finished.wait()))
        if pool is not None:
            waiters.append(asyncio.create_task(pool.failed.wait()))
        done, _ = await asyncio.wait([*waiters, source_task], return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            w.cancel()
        handed = (upgrades is not None and upgrades.finished.is_set()) or reexec.finished.is_set()
        if handed:
            log.info("the listening sockets were handed over: draining for up to %.1fs, then exiting", args.grace)
        elif source_task in done and not stop.is_set():
            exc = source_task.exception()
            log.error("the table source stopped unexpectedly: %r", exc)
            rc = EXIT_RUNTIME
        elif pool is not None and pool.failed.is_set() and not stop.is_set():
            log.error("a worker keeps crashing; exiting")
            rc = EXIT_RUNTIME
        if upgrades is not None and stop.is_set():
            await upgrades.wait_pending()
    finally:
        loop.remove_signal_handler(signal.SIGUSR2)
        for t in (*tasks, admin_retry):
            if t is not None:
                t.cancel()
        source.stop()
        if source_task is not None:
            source_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await source_task
        if upgrades is not None:
            await upgrades.close()
        await reexec.close()
        if admin is not None:
            await admin.stop()
        if pool is not None:
            await pool.shutdown(args.grace)
        if mesh is not None:
            await mesh.shutdown(args.grace)
        INHERITED.close_all()
    log.info("stopped")
    return rc


def _worker_args(args: argparse.Namespace) -> list[str]:
    """What every worker process is started with (``python -m meshagent worker ...``)."""
    out = ["--grace", str(args.grace), "--log-level", args.log_level, "--log-format", args.log_format]
    if args.access_log:
        out.append("--access-log")
    return out


def upgrades_factory(args: argparse.Namespace, offers: Callable[[], Any], stop_accepting: Callable[[], Any]) -> Any:
    """For SIGUSR2 without --handover: an ``Upgrades`` serving a fresh private path."""

    def make(path: str) -> Any:
        from meshagent.handover import Upgrades

        return Upgrades(path, offers, stop_accepting, timeout=args.handover_timeout)

    return make


class _Reexec:
    """SIGUSR2: start this command line again as a new process that takes the sockets over.

    The new process is this one's child (a new PID; once this one exits it is re-parented to init or the
    nearest subreaper).  It finds this agent at --handover PATH, or, without one, at a private path given
    to it as MESH_HANDOVER (it then serves that path for the next SIGUSR2)."""

    def __init__(self, args: argparse.Namespace, current: Callable[[], Any]) -> None:
        self.args = args
        self.current = current
        self.own: Any = None  # the Upgrades this serves when --handover was not given
        self.pid: int | None = None
        self.finished = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def trigger(self, make: Callable[[str], Any]) -> None:
        if self._task is not None and not self._task.done():
            log.warning("SIGUSR2: a new process (pid %s) is already taking over; ignored", self.pid)
            return
        self._task = asyncio.get_running_loop().create_task(self._run(make), name="sigusr2")

    async def _run(self, make: Callable[[str], Any]) -> None:
        import tempfile

        upgrades = self.current()
        if upgrades is None:
            if self.own is None:
                path = os.path.join(tempfile.mkdtemp(prefix="mesh-handover-"), "agent.sock")
                self.own = make(path)
            upgrades = self.own
        await upgrades.serve()
        if upgrades.server is None:
            log.error("SIGUSR2: cannot serve a handover socket; not restarting")
            return
        env = dict(os.environ, MESH_HANDOVER=upgrades.path)
        argv = [sys.executable, "-m", "meshagent", *getattr(self.args, "argv", ["run"])]
        try:
            self.pid = os.posix_spawn(sys.executable, argv, env)  # noqa: ASYNC221 (returns at once)
        except OSError as exc:
            log.error("SIGUSR2: cannot start a new process: %s", exc)
            return
        log.info("SIGUSR2: started pid %d with the same command line; it takes the listening sockets over "
                 "through %s, then this process (pid %d) drains and exits", self.pid, upgrades.path, os.getpid())  # fmt: skip
        while not upgrades.finished.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(upgrades.finished.wait(), 0.5)
            pid, status = os.waitpid(self.pid, os.WNOHANG)  # noqa: ASYNC222 (WNOHANG: never blocks)
            if pid:
                log.error("SIGUSR2: the new process (pid %d) exited with %s before taking over; still serving",
                          self.pid, os.waitstatus_to_exitcode(status))  # fmt: skip
                return
        if upgrades is self.own:  # with --handover, the Upgrades' own ``finished`` ends this process
            self.finished.set()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self.own is not None:
            await self.own.close()


# -- worker (internal) ------------------------------------------------------------------------------------


class _WorkerTag(logging.Filter):
    """Adds ``worker=<index>`` to every record of a worker process, so interleaved logs stay readable."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "worker"):
            record.worker = self.index
        return True


def _worker_command(argv: list[str]) -> int:
    """``python -m meshagent worker --control-fd FD ...``: started by WorkerPool, not by users."""
    from mesh.logs import setup_logging
    from meshagent.workers import worker_main

    p = argparse.ArgumentParser(prog="mesh worker", description="internal: one data-plane worker process")
    p.add_argument("--control-fd", type=int, required=True)
    p.add_argument("--sockets-fd", type=int, default=None)
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--grace", type=_seconds, default=10.0)
    p.add_argument("--log-level", default="info")
    p.add_argument("--log-format", default="text")
    p.add_argument("--node", default=None)
    p.add_argument("--access-log", action="store_true")
    p.add_argument("--token-file", default=None)  # cluster mode: the token that seals tunnel headers
    try:
        args = p.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    handler = setup_logging(args.log_level, args.log_format, access_log=args.access_log)
    handler.addFilter(_WorkerTag(args.index))
    return _run_loop(
        lambda: worker_main(
            args.control_fd,
            args.index,
            grace=args.grace,
            node=args.node,
            access_log=args.access_log,
            sockets_fd=args.sockets_fd,
            token_file=args.token_file,
        )
    )
