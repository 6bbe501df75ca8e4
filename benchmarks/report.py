"""Turn raw runs into medians, spreads, ratios, target checks, a text table, a JSON document and a PNG plot;
compare a run with the last committed one.

The JSON document (``benchmarks/results/<date>_<commit>.json``; the HTTP suite's ``http-<date>_<commit>.json``,
with ``settings.suite`` "http")::

    {"schema": 1, "date": ..., "commit": ..., "dirty": bool, "command": "...", "machine": {...},
     "settings": {...}, "skipped": {peer_or_workload: reason}, "runs": [one dict per measurement],
     "summary": {workload: {peer: {metric: {"median", "min", "max", "n"}}}},
     "ratios": {workload: {subject: {other: median ratio of requests/s}}},
     "added_latency_ms": {peer: p50 at 1 connection minus direct's},
     "targets": [{"name", "value", "limit", "ok"}]}
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import statistics
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.proc import REPO

SCHEMA = 1
THROUGHPUT_METRICS = ("rps", "mbps", "p50_ms", "p90_ms", "p99_ms", "p999_ms", "errors")
IDLE_METRICS = ("bytes_per_conn", "connections")
CONVERGENCE_METRICS = ("p50_ms", "p99_ms", "samples")


# -- facts ----------------------------------------------------------------------------------------------------


def _cmd(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(list(argv), capture_output=True, text=True, timeout=10, cwd=REPO, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else ""


def git_commit() -> tuple[str, bool]:
    """(short commit, whether the harness or the product have uncommitted changes)."""
    commit = _cmd(["git", "rev-parse", "--short=10", "HEAD"]) or "unknown"
    status = ""
    try:
        status = subprocess.run(
            ["git", "status", "--porcelain", "--", "mesh", "meshagent", "benchmarks"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=REPO,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        pass
    # Modified tracked files, or new Python files in the product (a module not committed yet is still measured).
    dirty = any(
        line and (not line.startswith("??") or (line.endswith(".py") and not line[3:].startswith("benchmarks/")))
        for line in status.splitlines()
    )
    return commit, dirty


def machine_facts(peer_versions: dict[str, str]) -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        pass
    versions = {"python": platform.python_version()}
    for mod in ("uvloop", "aiohttp", "pproxy"):
        try:
            from importlib.metadata import version

            versions[mod] = version(mod)
        except Exception:  # not installed: leave it out
            continue
    if shutil.which("wrk"):
        versions["wrk"] = _cmd(["wrk", "--version"])
    versions.update({k: v for k, v in peer_versions.items() if v})
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "memory_gib": round(mem / 2**30, 1),
        "kernel": platform.release(),
        "loadavg_at_start": list(os.getloadavg()),
        "versions": versions,
    }


# -- aggregation ----------------------------------------------------------------------------------------------


def _stat(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summarize(runs: Iterable[dict[str, Any]]) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """Median, min, max and count of every numeric metric, by workload and peer."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["workload"], r["peer"]), []).append(r)
    out: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for (wl, peer), rs in groups.items():
        metrics: dict[str, dict[str, float]] = {}
        for key in rs[0]:
            vals = [r[key] for r in rs if isinstance(r.get(key), int | float) and not isinstance(r.get(key), bool)]
            if key not in ("rep",) and len(vals) == len(rs):
                metrics[key] = _stat(vals)
        out.setdefault(wl, {})[peer] = metrics
    return out


def ratios(summary: dict[str, Any], subjects: Sequence[str]) -> dict[str, dict[str, dict[str, float]]]:
    """Median requests/s of each subject (the mesh peers) over each other peer's, by workload."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for wl, peers in summary.items():
        for subj in subjects:
            if subj not in peers or "rps" not in peers[subj]:
                continue
            mine = peers[subj]["rps"]["median"]
            row = {
                other: round(mine / m["rps"]["median"], 3)
                for other, m in peers.items()
                if other != subj and "rps" in m and m["rps"]["median"] > 0
            }
            if row:
                out.setdefault(wl, {})[subj] = row
    return out


def added_latency(summary: dict[str, Any], workload: str = "ka-100b-c1") -> dict[str, float]:
    """p50 at one connection minus direct's p50: what each proxy adds to a request, in ms."""
    peers = summary.get(workload, {})
    if "direct" not in peers or "p50_ms" not in peers["direct"]:
        return {}
    base = peers["direct"]["p50_ms"]["median"]
    return {p: round(m["p50_ms"]["median"] - base, 4) for p, m in peers.items() if p != "direct" and "p50_ms" in m}


def check_targets(summary: dict[str, Any], subject: str = "mesh-1") -> list[dict[str, Any]]:
    """The issue's targets for the 1-worker mesh, each with the measured value; missing data is left out."""
    out: list[dict[str, Any]] = []

    def med(wl: str, peer: str, metric: str) -> float | None:
        try:
            return summary[wl][peer][metric]["median"]
        except KeyError:
            return None

    def add(name: str, value: float | None, limit: float, ok_if: str) -> None:
        if value is None:
            return
        ok = value >= limit if ok_if == ">=" else value <= limit
        out.append({"name": name, "value": round(value, 4), "limit": f"{ok_if} {limit}", "ok": ok})

    for size in ("100b", "16k", "1m"):
        wl = f"ka-{size}-c64"
        m, h = med(wl, subject, "rps"), med(wl, "haproxy-256k", "rps")
        add(f"{subject} / haproxy-256k req/s, {wl}", m / h if m and h else None, 1.0, ">=")
    for size in ("100b", "16k", "1m"):
        wl = f"ka-{size}-c512"
        for hp in ("haproxy", "haproxy-256k"):
            m, h = med(wl, subject, "p99_ms"), med(wl, hp, "p99_ms")
            add(f"{subject} p99 - {hp} p99 (ms), {wl}", m - h if m is not None and h is not None else None, 0.0, "<=")
    m, h = med("ka-100b-c1", subject, "p50_ms"), med("ka-100b-c1", "haproxy", "p50_ms")
    add(
        f"{subject} p50 - haproxy p50 at 1 connection (ms)",
        m - h if m is not None and h is not None else None,
        0.02,
        "<=",
    )
    for size, limit in (("100b", 1.3), ("1m", 2.0)):
        wl = f"ka-{size}-c64"
        m, p = med(wl, subject, "rps"), med(wl, "pproxy", "rps")
        add(f"{subject} / pproxy req/s, {wl}", m / p if m and p else None, limit, ">=")
    for wl in summary:
        if wl.startswith("idle-"):
            add(f"{subject} idle bytes per proxied connection, {wl}", med(wl, subject, "bytes_per_conn"), 4096, "<=")
    for wl in summary:
        if wl.startswith("metrics-"):
            on, off = med(wl, "mesh-1", "rps"), med(wl, "mesh-1-nometrics", "rps")
            add(f"metrics cost (1 - on/off req/s), {wl}", 1 - on / off if on and off else None, 0.05, "<=")
            scraped = med(wl, "mesh-1+scrape", "rps")
            add(
                f"scrape cost, /metrics twice a second (1 - scraped/unscraped req/s), {wl}",
                1 - scraped / on if on and scraped else None,
                0.05,
                "<=",
            )
    return out


HTTP_TARGET_RPS = 1.0  # mesh req/s / HAProxy mode http req/s, at least, at 64 connections
HTTP_TARGET_CPU = 1.5  # mesh CPU per request / HAProxy's, at most
HTTP_PEERS = ("haproxy", "haproxy-always", "nginx")  # the HTTP headline's columns, those that ran


def _med(summary: dict[str, Any], wl: str, peer: str, metric: str) -> float | None:
    try:
        return summary[wl][peer][metric]["median"]
    except KeyError:
        return None


def check_http_targets(summary: dict[str, Any], subject: str = "mesh-1") -> list[dict[str, Any]]:
    """The HTTP mode's targets at 64 connections: req/s >= 1.0x HAProxy mode http's, CPU per request <= 1.5x
    HAProxy's.  Against ``haproxy`` (http-reuse safe) on every row; on the close row also against
    ``haproxy-always`` when it ran (with safe, HAProxy opens a server connection per closing client)."""
    out: list[dict[str, Any]] = []
    for wl in summary:
        if not (wl.startswith("http-") and wl.endswith("-c64")):
            continue
        for peer in ("haproxy", "haproxy-always") if wl.startswith("http-close-") else ("haproxy",):
            for metric, what, limit, ok_if in (
                ("rps", "req/s", HTTP_TARGET_RPS, ">="),
                ("proxy_us_per_req", "proxy CPU per request", HTTP_TARGET_CPU, "<="),
            ):
                m, h = _med(summary, wl, subject, metric), _med(summary, wl, peer, metric)
                if not m or not h:
                    continue
                v = m / h
                out.append(
                    {"name": f"{subject} / {peer} {what}, {wl}", "value": round(v, 4), "limit": f"{ok_if} {limit}",
                     "ok": v >= limit if ok_if == ">=" else v <= limit, "workload": wl, "peer": peer,
                     "metric": metric}
                )  # fmt: skip
    return out


def format_http(doc: dict[str, Any], subject: str = "mesh-1") -> list[str]:
    """The HTTP suite's headline: per workload the mesh's req/s and its ratio to each peer, its CPU per request
    and that ratio, its p50/p99, and the target verdicts at 64 connections (the other tables give the peers'
    own figures)."""
    summary = doc["summary"]
    subjects = doc["settings"].get("subjects") or []
    if subject not in subjects:
        subject = subjects[0] if subjects else subject
    if not any(subject in summary[wl] for wl in summary):
        why = doc.get("skipped", {}).get(subject, "not in --peers")
        return [f"HTTP mode: no mesh rows ({subject}: {why}); the targets are evaluated once the mesh runs", ""]
    peers = [p for p in HTTP_PEERS if any(p in summary[wl] for wl in summary)]
    short = {"haproxy": "hap", "haproxy-always": "hap-alw", "nginx": "nginx"}
    lines = [
        f"HTTP mode: {subject} against {', '.join(peers)}; target at 64 connections: req/s >= "
        f"{HTTP_TARGET_RPS:.2f}x haproxy's, CPU per request <= {HTTP_TARGET_CPU:.2f}x haproxy's",
        f"{'workload':<22}{'req/s':>8}"
        + "".join(f"{'x ' + short.get(p, p):>11}" for p in peers)
        + f"{'us/req':>9}"
        + "".join(f"{'cpu x ' + short.get(p, p):>14}" for p in peers)
        + f"{'p50/p99 ms':>15}  target",
    ]
    for wl, by_peer in summary.items():
        if "rps" not in by_peer.get(subject, {}):
            continue
        rps, us = by_peer[subject]["rps"]["median"], _med(summary, wl, subject, "proxy_us_per_req")
        row = f"{wl:<22}{_fmt_rate(rps):>8}"
        for p in peers:
            r = _med(summary, wl, p, "rps")
            row += f"{rps / r:>10.2f}x" if r else f"{'-':>11}"
        row += f"{us:>9.1f}" if us else f"{'-':>9}"
        for p in peers:
            h = _med(summary, wl, p, "proxy_us_per_req")
            row += f"{us / h:>13.2f}x" if us and h else f"{'-':>14}"
        p50, p99 = _med(summary, wl, subject, "p50_ms"), _med(summary, wl, subject, "p99_ms")
        row += f"{p50:>8.2f}/{p99:<6.2f}" if p50 is not None and p99 is not None else f"{'-':>15}"
        verdicts = [
            ("" if t["peer"] == "haproxy" else f"{short.get(t['peer'], t['peer'])} ")
            + ("req/s" if t["metric"] == "rps" else "cpu")
            + (" ok" if t["ok"] else " MISS")
            for t in doc.get("targets", [])
            if t.get("workload") == wl and t["name"].startswith(f"{subject} / ")
        ]
        lines.append(row + "  " + (", ".join(verdicts) if verdicts else "-"))
    lines.append("")
    return lines


# -- text -----------------------------------------------------------------------------------------------------


def _fmt_rate(v: float) -> str:
    if v >= 10_000:
        return f"{v / 1000:.0f}k"
    if v >= 1000:
        return f"{v / 1000:.1f}k"
    return f"{v:.0f}"


def _spread(s: dict[str, float]) -> str:
    med = s["median"]
    if s["n"] < 2 or med == 0:
        return ""
    return f" ±{(s['max'] - s['min']) / 2 / med * 100:.0f}%"


def format_report(doc: dict[str, Any]) -> str:
    """The tables printed at the end of a run."""
    summary = doc["summary"]
    peers: list[str] = doc["settings"]["peers"]
    lines: list[str] = []
    cols = [p for p in peers if any(p in summary[wl] for wl in summary)]
    w = 17
    if doc["settings"].get("suite") == "http":
        lines += format_http(doc)

    def row(cells: list[str]) -> str:
        return cells[0].ljust(20) + "".join(c.rjust(w) for c in cells[1:])

    tp = [wl for wl in summary if any("rps" in m for m in summary[wl].values())]
    if tp:
        lines.append("requests/s: median ±half-spread (min..max) over repeats")
        lines.append(row(["workload", *cols]))
        for wl in tp:
            cells = [wl]
            for p in cols:
                s = summary[wl].get(p, {}).get("rps")
                cells.append(_fmt_rate(s["median"]) + _spread(s) if s else "-")
            lines.append(row(cells))
        lines.append("")
        lines.append("p50 / p99 latency (ms), medians")
        lines.append(row(["workload", *cols]))
        for wl in tp:
            cells = [wl]
            for p in cols:
                m = summary[wl].get(p, {})
                cells.append(f"{m['p50_ms']['median']:.2f}/{m['p99_ms']['median']:.2f}" if "p99_ms" in m else "-")
            lines.append(row(cells))
        lines.append("")
        lines.append("proxy CPU per request (microseconds, median; lower = cheaper) and proxy CPU used (cores)")
        lines.append(row(["workload", *cols]))
        for wl in tp:
            cells = [wl]
            for p in cols:
                m = summary[wl].get(p, {})
                if p == "direct" or "proxy_us_per_req" not in m:
                    cells.append("-")
                else:
                    cells.append(f"{m['proxy_us_per_req']['median']:.1f}us/{m['proxy_cpu']['median']:.2f}")
            lines.append(row(cells))
        lines.append("")
    rat = doc.get("ratios", {})
    for subj in doc["settings"].get("subjects", []):
        others = [p for p in cols if p != subj]
        rows = [wl for wl in rat if subj in rat[wl]]
        if not rows:
            continue
        lines.append(f"ratio of requests/s: {subj} / peer (>1 = {subj} faster)")
        lines.append(row(["workload", *others]))
        for wl in rows:
            r = rat[wl][subj]
            lines.append(row([wl, *(f"{r[o]:.2f}x" if o in r else "-" for o in others)]))
        lines.append("")
    pooled = [wl for wl in summary if any("upstream_conns_per_req" in m for m in summary[wl].values())]
    if pooled:
        lines.append("backend connections opened per request (median; direct = the client's own connections)")
        lines.append(row(["workload", *cols]))
        for wl in pooled:
            cells = [wl]
            for p in cols:
                s = summary[wl].get(p, {}).get("upstream_conns_per_req")
                cells.append(f"{s['median']:.4f}" if s else "-")
            lines.append(row(cells))
        lines.append("")
    idle = [wl for wl in summary if wl.startswith("idle-")]
    for wl in idle:
        lines.append(f"{wl}: RSS growth per proxied connection (bytes, median of fresh processes)")
        for p, m in summary[wl].items():
            if "bytes_per_conn" in m:
                s = m["bytes_per_conn"]
                lines.append(f"  {p:<20}{s['median']:>10.0f}  (min {s['min']:.0f}, max {s['max']:.0f})")
        lines.append("")
    if doc.get("added_latency_ms"):
        lines.append("latency added at 1 connection (p50 minus direct's p50, ms)")
        for p, v in doc["added_latency_ms"].items():
            lines.append(f"  {p:<20}{v:>10.3f}")
        lines.append("")
    conv = [wl for wl in summary if wl.startswith("convergence")]
    for wl in conv:
        for p, m in summary[wl].items():
            lines.append(f"{wl} {p}: p50 {m['p50_ms']['median']:.1f} ms, p99 {m['p99_ms']['median']:.1f} ms")
    if doc.get("targets"):
        lines.append("targets")
        for t in doc["targets"]:
            lines.append(f"  [{'ok' if t['ok'] else 'MISS'}] {t['name']}: {t['value']} (target {t['limit']})")
        lines.append("")
    others = [r["cpu_others"] for r in doc.get("runs", []) if "cpu_others" in r]
    if others:
        lines.append(
            f"CPU used by other processes during the load runs (cores): median {statistics.median(others):.2f}, "
            f"max {max(others):.2f} (of {doc['machine'].get('cores')}): high values mean a noisy sitting"
        )
    for what, why in doc.get("skipped", {}).items():
        lines.append(f"skipped {what}: {why}")
    return "\n".join(lines)


# -- files ----------------------------------------------------------------------------------------------------


def write_json(doc: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")


def plot(doc: dict[str, Any], path: Path) -> str | None:
    """Write a PNG; return None, or the reason there is no plot (matplotlib missing, nothing to draw).

    Panels: requests/s relative to direct (min..max bars), proxy CPU per request, p99 latency, idle bytes per
    connection.  Each peer keeps its colour in every panel.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no PNG"
    summary = doc["summary"]
    allp = [p for p in doc["settings"]["peers"] if any(p in summary[wl] for wl in summary)]
    proxies = [p for p in allp if p != "direct"]
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {p: palette[i % len(palette)] for i, p in enumerate(proxies)}
    color["direct"] = "black"
    tp = [wl for wl in summary if "direct" in summary[wl] and any("rps" in m for m in summary[wl].values())]
    idle = [wl for wl in summary if wl.startswith("idle-")]
    if not tp and not idle:
        return "nothing to plot"
    panels = (3 if tp else 0) + (1 if idle else 0)
    fig, axes = plt.subplots(panels, 1, figsize=(max(9, 1.2 * len(tp) + 3), 4.0 * panels), squeeze=False)
    ax_iter = iter(axes[:, 0])

    def grouped(ax, peers: list[str], metric: str, scale=None, bars: bool = False) -> None:
        width = 0.8 / max(1, len(peers))
        for i, p in enumerate(peers):
            xs, ys, lo, hi = [], [], [], []
            for j, wl in enumerate(tp):
                m = summary[wl].get(p, {}).get(metric)
                base = scale(wl) if scale else 1.0
                if not m or not base:
                    continue
                xs.append(j + (i - (len(peers) - 1) / 2) * width)
                ys.append(max(m["median"] / base, 1e-3))
                lo.append((m["median"] - m["min"]) / base)
                hi.append((m["max"] - m["median"]) / base)
            ax.bar(xs, ys, width, yerr=[lo, hi] if bars else None, label=p, color=color[p], capsize=2)
        ax.set_xticks(range(len(tp)), tp, rotation=30, ha="right")
        ax.legend(fontsize=8, ncol=4)

    if tp:
        ax = next(ax_iter)
        grouped(ax, proxies, "rps", scale=lambda wl: summary[wl]["direct"]["rps"]["median"], bars=True)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_ylabel("requests/s relative to direct")
        ax.set_title(
            f"{doc['commit']} {doc['date']}: median and min..max of {doc['settings']['repeat']} interleaved repeats"
        )
        ax = next(ax_iter)
        grouped(ax, proxies, "proxy_us_per_req", bars=True)
        ax.set_yscale("log")
        ax.set_ylabel("proxy CPU per request (us, log)")
        ax = next(ax_iter)
        grouped(ax, allp, "p99_ms")
        ax.set_yscale("log")
        ax.set_ylabel("p99 latency (ms, log)")
    if idle:
        ax = next(ax_iter)
        names, vals, cols = [], [], []
        for wl in idle:
            for p, m in summary[wl].items():
                if "bytes_per_conn" in m:
                    names.append(f"{p}\n{wl} ({m['connections']['median']:.0f})")
                    vals.append(m["bytes_per_conn"]["median"])
                    cols.append(color.get(p, "grey"))
        ax.bar(range(len(vals)), vals, color=cols)
        ax.axhline(4096, color="red", lw=0.8, ls="--", label="target 4 KB")
        ax.set_xticks(range(len(vals)), names, fontsize=8)
        ax.set_ylabel("RSS bytes per idle proxied connection")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return None


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.report RESULT.json [--png]``: print a stored result again (and redraw its PNG)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=main.__doc__)
    p.add_argument("result", type=Path)
    p.add_argument("--png", action="store_true", help="redraw RESULT.png next to the JSON")
    args = p.parse_args(argv)
    doc = json.loads(args.result.read_text())
    print(format_report(doc))
    if args.png:
        why = plot(doc, args.result.with_suffix(".png"))
        print(f"plot: {why}" if why else f"plot: {args.result.with_suffix('.png')}")
    return 0


# -- compare --------------------------------------------------------------------------------------------------


def last_committed_result(results_dir: Path, exclude: Path | None = None, prefix: str = "") -> Path | None:
    """The newest result JSON that git knows about (names sort by date); ``prefix`` "http-" for the HTTP suite."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--", str(results_dir)],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=REPO,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    # Only this harness's results (<date>_<time>_<commit>.json): other tools may keep files here too.
    pattern = re.escape(prefix) + r"\d{4}-\d\d-\d\d_\d{6}_[\w-]+\.json"
    files = sorted(REPO / f for f in out.split() if re.fullmatch(pattern, Path(f).name))
    if exclude is not None:
        files = [f for f in files if f.resolve() != exclude.resolve()]
    return files[-1] if files else None


def _noise(s: dict[str, float]) -> float:
    return (s["max"] - s["min"]) / s["median"] if s["median"] else 0.0


def compare(
    new: dict[str, Any], old: dict[str, Any], subjects: Sequence[str] | None = None, floor: float = 0.03
) -> tuple[list[str], list[str]]:
    """(lines, regressions).  A metric regresses when it moved the wrong way by more than the measured noise:
    the larger relative spread (max-min)/median of the two runs, and at least ``floor``.  Only ``subjects``
    (default: the mesh peers) can regress; the other peers are listed to show drift of the machine itself."""
    subjects = list(subjects or [p for p in new["settings"]["peers"] if p.startswith("mesh-")])
    lines = [f"compared with {old.get('commit')} of {old.get('date')}"]
    regressions: list[str] = []
    checks = (("rps", +1), ("p99_ms", -1), ("bytes_per_conn", -1))
    for wl, peers in new["summary"].items():
        for peer, metrics in peers.items():
            for metric, better in checks:
                if metric not in metrics:
                    continue
                try:
                    o = old["summary"][wl][peer][metric]
                except KeyError:
                    continue
                n = metrics[metric]
                if not o["median"]:
                    continue
                change = (n["median"] - o["median"]) / o["median"]
                noise = max(_noise(n), _noise(o), floor)
                worse = change * better < -noise
                tag = "REGRESSION" if worse and peer in subjects else ("worse" if worse else "")
                line = (
                    f"  {wl:<16} {peer:<18} {metric:<15} {o['median']:>12.2f} -> {n['median']:>12.2f} "
                    f"({change * 100:+.1f}%, noise {noise * 100:.0f}%) {tag}"
                )
                lines.append(line.rstrip())
                if tag == "REGRESSION":
                    regressions.append(line.strip())
    return lines, regressions


if __name__ == "__main__":
    raise SystemExit(main())
