"""Connection flood: many clients hold connections to one node while writes go on.

On a three-node metadata cluster (node processes on loopback, fsync on):

1. **baseline**: a writer alone: one ``create_topic`` (3 partitions, RF 3)
   started every 20 ms through an :class:`~streambus_consensus.client.ApiClient`
   given every node, the leader first (its connection is kept alive);
2. **flood**: the same writer while :mod:`._flooder` (its own process) opens
   ``connections`` TCP connections at once to the *leader's* API, sends one
   ``GET /healthz`` on each and keeps them open for ``seconds`` (another
   ``GET /healthz`` on each every ``ping`` s, 5 by default, below the API's
   idle timeout, as polling clients would), reopening any the node cuts;
3. **fd limit**: the leader's open-file limit is lowered to ``nofile``
   (``prlimit`` on the running process, soft and hard) and the flooder opens
   ``limited_connections`` against it for ``limited_seconds``, more than the
   node can accept: the node's new log lines about failed accepts are
   counted and its CPU use measured (a node that retries ``accept`` in a loop
   burns a core and writes a line per try).

Sampled every 0.5 s on every node: the Raft term from ``/v1/status`` (an
election raises it; a node that does not answer is noted); on the flooded
node: RSS (``VmRSS`` of ``/proc/PID/status``), open file descriptors
(``/proc/PID/fd``) and CPU time (``/proc/PID/stat``).

Targets (issue 10): 0 elections during the flood, writer p99 <= 100 ms
during the flood, RSS bounded (over the second half of the hold it grows
less than 5 MB/min faster than with the writer alone, least squares), and
with the fd limit at
most one rate-limited log line per 10 s about failed accepts and no spin
(node CPU < 50 % of one core).

Run alone: ``python -m streambus_consensus.bench.flood [--connections 1000] [--seconds 60]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..client import ApiClient
from ..testing.harness import LocalCluster, rss_bytes
from .common import HttpCaller, summarize
from .latency import BENCH_SETTINGS, register_brokers

__all__ = ["ACCEPT_LINE", "main", "run"]

Log = Callable[[str], None]

ACCEPT_LINE = re.compile(r"accept|too many open files|errno 24|emfile", re.IGNORECASE)
"""A node log line about failing to accept a connection."""
UNHANDLED = "Exception occurred during processing of request"
"""What socketserver prints (a traceback follows) when a connection's handler raised."""
EXCEPTION_LINE = re.compile(r"^([A-Za-z_.]*(?:Error|Exception)): ")
"""The last line of a traceback: the exception's type."""

RSS_SLOPE_LIMIT = 5.0
"""MB per minute: RSS growing faster over the second half of the hold is not bounded."""
WRITE_EVERY = 0.02
SAMPLE_EVERY = 0.5
TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class _Writer(threading.Thread):
    """Starts a create_topic every :data:`WRITE_EVERY` s (late ones start at once)."""

    def __init__(self, client: ApiClient) -> None:
        super().__init__(name="flood-writer", daemon=True)
        self.client = client
        self.samples: list[tuple[float, float | None, str | None]] = []
        self._stopping = threading.Event()

    def run(self) -> None:
        i = 0
        next_at = time.monotonic()
        while not self._stopping.is_set():
            t0 = time.monotonic()
            try:
                self.client.request("POST", "/v1/topics", {
                    "name": f"flood-{i}", "partitions": 3, "replication_factor": 3})
            except Exception as exc:
                self.samples.append((t0, None, type(exc).__name__))
            else:
                self.samples.append((t0, time.monotonic() - t0, None))
            i += 1
            next_at += WRITE_EVERY
            self._stopping.wait(max(0.0, next_at - time.monotonic()))
            next_at = max(next_at, time.monotonic() - WRITE_EVERY)

    def stop(self) -> None:
        self._stopping.set()
        self.join(30)

    def window(self, start: float, end: float) -> dict[str, Any]:
        """Figures of the writes started in [start, end)."""
        mine = [s for s in self.samples if start <= s[0] < end]
        out = summarize([s[1] for s in mine if s[1] is not None])
        errors = Counter(s[2] for s in mine if s[2] is not None)
        out["errors"] = sum(errors.values())
        if errors:
            out["error_types"] = dict(errors)
        return out


class _Monitor(threading.Thread):
    """Every :data:`SAMPLE_EVERY` s: each node's term; the flooded node's RSS, fds, CPU."""

    def __init__(self, cluster: LocalCluster) -> None:
        super().__init__(name="flood-monitor", daemon=True)
        self.cluster = cluster
        self.flooded: str | None = None
        self.samples: list[dict[str, Any]] = []
        self._stopping = threading.Event()

    def run(self) -> None:
        while not self._stopping.is_set():
            t = time.monotonic()
            sample: dict[str, Any] = {"t": t, "terms": {}, "leaders": {}}
            for node_id in self.cluster.nodes:
                status = self.cluster.status(node_id, timeout=1.0)
                if status is not None:
                    sample["terms"][node_id] = status.get("term")
                    sample["leaders"][node_id] = status.get("leader_id")
            flooded = self.flooded
            pid = self.cluster.pid(flooded) if flooded else None
            if pid is not None:
                with contextlib.suppress(OSError, RuntimeError, ValueError):
                    sample.update(node=flooded, rss_mb=round(rss_bytes(pid) / 2**20, 1),
                                  fds=_fds(pid), cpu_s=_cpu_seconds(pid))
            self.samples.append(sample)
            self._stopping.wait(max(0.0, SAMPLE_EVERY - (time.monotonic() - t)))

    def stop(self) -> None:
        self._stopping.set()
        self.join(30)

    def window(self, start: float, end: float) -> list[dict[str, Any]]:
        """The samples taken in [start, end]."""
        return [s for s in self.samples if start <= s["t"] <= end]


def _max_term(samples: list[dict[str, Any]]) -> int | None:
    terms = [t for s in samples for t in s["terms"].values() if isinstance(t, int)]
    return max(terms) if terms else None


def _elections(monitor: _Monitor, start: float, end: float) -> dict[str, Any]:
    """Term rises between the last sample before ``start`` and the end of the window."""
    before = [s for s in monitor.samples if s["t"] <= start][-3:] or monitor.window(start, end)[:1]
    during = monitor.window(start, end + SAMPLE_EVERY)
    first, last = _max_term(before), _max_term(during)
    leaders = {s["leaders"].get(n) for s in during for n in s["leaders"]} - {None}
    unanswered = Counter(n for s in during for n in monitor.cluster.nodes if n not in s["terms"])
    return {"elections": (last - first) if first is not None and last is not None else None,
            "term_before": first, "term_after": last, "leaders_seen": sorted(leaders),
            "status_unanswered": dict(unanswered), "samples": len(during)}


def _slope_per_minute(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (t seconds, value) points, per minute."""
    if len(points) < 3:
        return None
    mean_t = sum(t for t, _ in points) / len(points)
    mean_v = sum(v for _, v in points) / len(points)
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return None
    return 60 * sum((t - mean_t) * (v - mean_v) for t, v in points) / var


def _held(counts: dict[str, Any], started: float, ended: float) -> tuple[float, float]:
    """The monotonic span in which the flooder held its connections (all opened to close)."""
    offset = time.time() - time.monotonic()
    start = counts.get("wall_start", started + offset) - offset
    end = counts.get("wall_end", ended + offset) - offset
    return start + (counts.get("first_all_open_s") or 0.0), max(end, start)


def _resources(samples: list[dict[str, Any]], baseline: list[dict[str, Any]]) -> dict[str, Any]:
    """RSS, fds and CPU of the flooded node while the connections were held.

    RSS is *bounded* when its least-squares slope over the second half of the
    hold exceeds the slope before the flood (the writer alone: every topic it
    creates grows the metadata) by less than :data:`RSS_SLOPE_LIMIT` MB/min:
    every connection is open by then, so memory that still grows faster is a
    leak or unbounded buffering.
    """
    rss = [(s["t"], s["rss_mb"]) for s in samples if "rss_mb" in s]
    fds = [s["fds"] for s in samples if "fds" in s]
    cpu = [(s["t"], s["cpu_s"]) for s in samples if "cpu_s" in s]
    base_rss = [s["rss_mb"] for s in baseline if "rss_mb" in s]
    out: dict[str, Any] = {}
    if rss:
        values = [v for _, v in rss]
        slope = _slope_per_minute(rss[len(rss) // 2:])
        before = _slope_per_minute([(s["t"], s["rss_mb"]) for s in baseline if "rss_mb" in s])
        out.update(rss_before_mb=base_rss[-1] if base_rss else None, rss_peak_mb=max(values),
                   rss_end_mb=values[-1],
                   rss_second_half_mb_per_min=None if slope is None else round(slope, 1),
                   rss_before_mb_per_min=None if before is None else round(before, 1),
                   rss_excess_mb_per_min=None if slope is None or before is None
                   else round(slope - before, 1),
                   rss_series_mb=values[::max(1, len(values) // 30)])
    if fds:
        out.update(fds_peak=max(fds), fds_end=fds[-1])
    if len(cpu) >= 2:
        (t0, c0), (t1, c1) = cpu[0], cpu[-1]
        out["cpu_percent"] = round(100 * (c1 - c0) / (t1 - t0), 1) if t1 > t0 else None
    return out


def _flood(base: Path, address: str, count: int, seconds: float, ping: float,
           tag: str) -> dict[str, Any]:
    """Run the flooder process for ``seconds``; its counts."""
    out = base / f"flooder-{tag}.json"
    log = open(base / f"flooder-{tag}.log", "ab")  # noqa: SIM115 - owned by the child
    proc = subprocess.Popen(
        [sys.executable, "-m", "streambus_consensus.bench._flooder", "--address", address,
         "--count", str(count), "--seconds", str(seconds), "--ping", str(ping),
         "--out", str(out)],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True)
    log.close()
    try:
        proc.wait(seconds + 60)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    if not out.exists():
        tail = (base / f"flooder-{tag}.log").read_text(errors="replace")[-400:]
        raise RuntimeError(f"the flooder exited {proc.returncode} without figures: {tail}")
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def _wait_fds_settle(pid: int, below: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if _fds(pid) <= below:
                return
        time.sleep(0.2)


def _log_lines(path: Path, offset: int) -> list[str]:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().decode("utf-8", errors="replace").splitlines()


def _no_paths(line: str) -> str:
    """``line`` with the directories of any absolute path dropped (file names stay)."""
    return re.sub(r"(?<![\w.])/(?:[^/\s\"']+/)+", "", line)


def _log_figures(lines: list[str]) -> dict[str, Any]:
    accept = [line for line in lines if ACCEPT_LINE.search(line)]
    return {"log_lines": len(lines), "accept_failure_lines": len(accept),
            "accept_failure_examples": [_no_paths(line)[-200:] for line in accept[:3]],
            "unhandled_exceptions": sum(1 for line in lines if UNHANDLED in line),
            "exception_types": dict(Counter(m.group(1) for line in lines
                                            if (m := EXCEPTION_LINE.match(line)))),
            "error_lines": sum(1 for line in lines if " ERROR " in line or " CRITICAL " in line),
            "commonest_lines": _commonest(lines)}


def _commonest(lines: list[str], top: int = 3) -> list[list[Any]]:
    """The most frequent line shapes (digits blanked) with their counts."""
    shapes = Counter(re.sub(r"\d+", "N", _no_paths(line).split(" ", 2)[-1])[:160]
                     for line in lines)
    return [[shape, n] for shape, n in shapes.most_common(top)]


def run(base: Path, *, connections: int = 1000, seconds: float = 60.0,
        limited_connections: int = 400, limited_seconds: float = 10.0, nofile: int = 256,
        ping: float = 5.0, baseline: float | None = None, log: Log = print) -> dict[str, Any]:
    """The whole section. ``ping``: seconds between two requests on each held connection
    (below the API's 10 s idle timeout, so connections stay; 0: silent, and cut by it)."""
    baseline = baseline if baseline is not None else min(10.0, max(3.0, seconds / 6))
    base.mkdir(parents=True, exist_ok=True)
    with LocalCluster(3, base / "cluster", app="metadata", settings=BENCH_SETTINGS) as cluster:
        cluster.start()
        leader = cluster.wait_for_leader(30)
        register_brokers(HttpCaller(cluster.nodes[leader].api_address, cluster.secret))
        order = [leader, *[n for n in cluster.nodes if n != leader]]
        writer = _Writer(cluster.client(*order, timeout=10.0))
        monitor = _Monitor(cluster)
        monitor.flooded = leader
        monitor.start()
        writer.start()
        result: dict[str, Any] = {"flooded_node": "leader", "write_every_s": WRITE_EVERY,
                                  "ping_s": ping}
        try:
            t0 = time.monotonic()
            time.sleep(baseline)
            t1 = time.monotonic()
            log(f"  flood: {connections} connections to the leader ({leader}) for {seconds:.0f}s, "
                + (f"a request on each every {ping:g}s" if ping > 0 else "silent"))
            main_log = cluster.nodes[leader].log_path
            main_offset = main_log.stat().st_size
            counts = _flood(base, cluster.nodes[leader].api_address, connections, seconds,
                            ping, "main")
            t2 = time.monotonic()
            # The flooder's connections all close at once at the end: watch that too.
            flooded_pid = cluster.pid(leader)
            if flooded_pid is not None:
                _wait_fds_settle(flooded_pid, 64, 15.0)
            time.sleep(3.0)  # several election timeouts
            t2b = time.monotonic()
            teardown = _elections(monitor, t2, t2b)
            phase = {"connections": connections, "seconds": seconds, "flooder": counts,
                     "elections_closing": teardown["elections"],
                     "term_after_closing": teardown["term_after"],
                     "closing_seconds": round(t2b - t2, 1),
                     "writer_closing": writer.window(t2, t2b),
                     **_elections(monitor, t1, t2),
                     "writer": writer.window(t1, t2), "writer_baseline": writer.window(t0, t1),
                     **_log_figures(_log_lines(main_log, main_offset)),
                     **_resources(monitor.window(*_held(counts, t1, t2)),
                                  monitor.window(t0, t1))}
            result["flood"] = phase
            w = phase["writer"]
            log(f"  flood: term {phase['term_before']} -> {phase['term_after']} while held, "
                f"-> {phase['term_after_closing']} once closed; writer p50 {w.get('p50_ms')} ms "
                f"p99 {w.get('p99_ms')} ms errors {w['errors']} (baseline p99 "
                f"{phase['writer_baseline'].get('p99_ms')} ms); RSS "
                f"{phase.get('rss_before_mb')} -> peak {phase.get('rss_peak_mb')} MB; fds peak "
                f"{phase.get('fds_peak')}; held {counts['open_at_end']}, cut {counts['cut']}")

            target = cluster.leader() or leader
            pid = cluster.pid(target)
            if pid is None:
                raise RuntimeError(f"{target} is not running after the flood")
            monitor.flooded = target
            original = resource.prlimit(pid, resource.RLIMIT_NOFILE)
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (nofile, nofile))
            log_path = cluster.nodes[target].log_path
            offset = log_path.stat().st_size
            log(f"  fd limit: {target}'s RLIMIT_NOFILE set to {nofile}; "
                f"{limited_connections} connections for {limited_seconds:.0f}s")
            t3 = time.monotonic()
            try:
                limited_counts = _flood(base, cluster.nodes[target].api_address,
                                        limited_connections, limited_seconds, ping, "limited")
            finally:
                t4 = time.monotonic()
                with contextlib.suppress(OSError):
                    resource.prlimit(pid, resource.RLIMIT_NOFILE, original)
            lines = _log_lines(log_path, offset)
            limited = {"connections": limited_connections, "seconds": limited_seconds,
                       "nofile": nofile, "node_role": "leader" if target == leader else
                       "leader (after a change)", "flooder": limited_counts,
                       **_log_figures(lines),
                       **_elections(monitor, t3, t4), "writer": writer.window(t3, t4),
                       **_resources(monitor.window(*_held(limited_counts, t3, t4)),
                                    monitor.window(t2b, t3))}
            result["fd_limit"] = limited
            log(f"  fd limit: {limited['accept_failure_lines']} accept-failure log line(s) of "
                f"{len(lines)} new lines, {limited['unhandled_exceptions']} unhandled-exception "
                "report(s); "
                f"node CPU {limited.get('cpu_percent')}%; elections "
                f"{limited['elections']}; writer p99 {limited['writer'].get('p99_ms')} ms, "
                f"errors {limited['writer']['errors']}")
        finally:
            writer.stop()
            monitor.stop()
    result["targets"] = _targets(result)
    return result


def _targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    phase = result.get("flood")
    if phase:
        n = phase["connections"]
        first, last = phase.get("term_before"), phase.get("term_after_closing")
        total = last - first if first is not None and last is not None else None
        out.append({"target": f"0 elections with {n:,} connections held for "
                    f"{phase['seconds']:.0f} s (and while they close)",
                    "value": f"{total} (term {first} -> {last})",
                    "met": None if total is None else total == 0})
        p99 = phase["writer"].get("p99_ms")
        out.append({"target": "writer p99 <= 100 ms during the flood",
                    "value": f"{p99} ms ({phase['writer']['errors']} errors)",
                    "met": p99 is not None and p99 <= 100 and phase["writer"]["errors"] == 0})
        excess = phase.get("rss_excess_mb_per_min")
        out.append({"target": f"RSS bounded (over the second half of the hold it grows < "
                    f"{RSS_SLOPE_LIMIT:g} MB/min faster than with the writer alone)",
                    "value": f"{phase.get('rss_before_mb')} -> peak {phase.get('rss_peak_mb')} "
                    f"MB; {phase.get('rss_second_half_mb_per_min')} MB/min against "
                    f"{phase.get('rss_before_mb_per_min')} before",
                    "met": None if excess is None else excess < RSS_SLOPE_LIMIT})
    limited = result.get("fd_limit")
    if limited:
        allowed = max(1, math.ceil(limited["seconds"] / 10))
        out.append({"target": f"fd limit {limited['nofile']}: <= {allowed} rate-limited "
                    "accept-failure log line(s)", "value": limited["accept_failure_lines"],
                    "met": limited["accept_failure_lines"] <= allowed})
        cpu = limited.get("cpu_percent")
        out.append({"target": "fd limit: no spin (node CPU < 50 % of one core)",
                    "value": f"{cpu} %", "met": None if cpu is None else cpu < 50})
    return out


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--limited-connections", type=int, default=400)
    parser.add_argument("--limited-seconds", type=float, default=10.0)
    parser.add_argument("--nofile", type=int, default=256)
    parser.add_argument("--ping", type=float, default=5.0,
                        help="seconds between requests on each held connection (0: silent)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="streambus-flood-") as tmp:
        result = run(Path(tmp), connections=args.connections, seconds=args.seconds,
                     limited_connections=args.limited_connections,
                     limited_seconds=args.limited_seconds, nofile=args.nofile, ping=args.ping)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    for target in result["targets"]:
        print(f"{target['target']}: {target['value']} -> "
              f"{'met' if target['met'] else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
