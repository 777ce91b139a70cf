"""Adapter overhead and durability cost: raw PySyncObj against our RaftNode (a script).

Three variants, each a three-process loopback cluster of :mod:`._peer`
members replicating the same encoded command bytes into a dict:

- ``raw``: plain PySyncObj (journal in the page cache; it never fsyncs);
- ``ours-nofsync``: our RaftNode with ``fsync = false`` (page cache only,
  like raw): the adapter's own cost;
- ``ours``: our RaftNode with the default ``fsync = true``: adds durability.

The leader runs the load on itself: 1, 8 and 32 closed-loop callers, then a
pipelined window of in-flight writes (saturation throughput). Variants run in
rotated order, ``repeats`` times, and each figure is the median over repeats,
so slow drifts of a shared machine hit every variant alike. The disk's raw
fsync latency (append 4 KiB + fdatasync) is measured in the same directory.

Run alone: ``python -m streambus_consensus.bench.overhead [--seconds 3] [--repeats 2]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..testing.harness import free_ports
from .common import fsync_floor

__all__ = ["VARIANTS", "PeerCluster", "main", "run"]

VARIANTS: dict[str, tuple[str, str]] = {
    "raw": ("raw", "off"),
    "ours-nofsync": ("ours", "off"),
    "ours": ("ours", "on"),
}
"""name -> (member kind, fsync)."""

SECRET = "bench-cluster-secret-0123456789"
Log = Callable[[str], None]


class PeerCluster:
    """Three :mod:`._peer` processes; every one is killed on :meth:`close`."""

    def __init__(self, base: Path, variant: str, plan: list[dict[str, Any]],
                 size: int = 3) -> None:
        kind, fsync = VARIANTS[variant]
        self.base = base
        self.out = base / "result.json"
        self.status = self.out.with_suffix(".status")
        ports = free_ports(size)
        cluster = {f"n{i + 1}": f"127.0.0.1:{p}" for i, p in enumerate(ports)}
        self.procs: list[subprocess.Popen[bytes]] = []
        base.mkdir(parents=True, exist_ok=True)
        try:
            for node_id in cluster:
                log = open(base / f"{node_id}.log", "ab")  # noqa: SIM115 - owned by the child
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "streambus_consensus.bench._peer",
                     "--variant", kind, "--id", node_id, "--cluster", json.dumps(cluster),
                     "--dir", str(base / node_id), "--fsync", fsync, "--secret", SECRET,
                     "--plan", json.dumps(plan), "--out", str(self.out)],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True))
                log.close()
        except BaseException:
            self.close()
            raise

    def phase(self) -> dict[str, Any] | None:
        """The phase the leader is running (with its pid), once it has started."""
        try:
            status: dict[str, Any] = json.loads(self.status.read_text())
        except (OSError, ValueError):
            return None
        return status

    def wait(self, timeout: float) -> dict[str, Any]:
        """Wait for the leader's figures."""
        deadline = time.monotonic() + timeout
        while not self.out.exists():
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"a peer exited with {proc.returncode}; logs in {self.base}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no result within {timeout:.0f}s; logs in {self.base}")
            time.sleep(0.1)
        result: dict[str, Any] = json.loads(self.out.read_text())
        return result

    def close(self) -> None:
        """Kill every member. Idempotent."""
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)

    def __enter__(self) -> PeerCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def plan_for(callers: Sequence[int], window: int, seconds: float) -> list[dict[str, Any]]:
    """The load plan: closed-loop callers, then a pipelined window."""
    return ([{"callers": c, "seconds": seconds} for c in callers]
            + [{"window": window, "seconds": seconds}])


def run_variant(base: Path, variant: str, plan: list[dict[str, Any]]) -> dict[str, Any]:
    """One cluster of ``variant`` through ``plan``."""
    budget = 60 + sum(p["seconds"] + 2 for p in plan)
    with PeerCluster(base, variant, plan) as cluster:
        return cluster.wait(budget)


def _median_rows(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per phase, the median of each figure over repeats."""
    merged = []
    for rows in zip(*runs, strict=True):
        row = dict(rows[0])
        for key in ("ops_per_s", "p50_ms", "p99_ms", "max_ms", "mean_ms", "fsync_groups", "n"):
            values = [r[key] for r in rows if isinstance(r.get(key), int | float)]
            if values:
                row[key] = round(statistics.median(values), 3)
        row["repeats"] = [{k: r.get(k) for k in ("ops_per_s", "p50_ms", "p99_ms")} for r in rows]
        row["term_changed"] = any(r.get("term_changed") for r in rows)
        merged.append(row)
    return merged


def _ratios(variants: dict[str, list[dict[str, Any]]], num: str, den: str) -> list[dict[str, Any]]:
    out = []
    for a, b in zip(variants[num], variants[den], strict=True):
        load = f"{a['callers']} callers" if "callers" in a else f"window {a['window']}"
        entry: dict[str, Any] = {"load": load}
        if a.get("ops_per_s") and b.get("ops_per_s"):
            entry["throughput_ratio"] = round(a["ops_per_s"] / b["ops_per_s"], 3)
        if a.get("p50_ms") and b.get("p50_ms"):
            entry["p50_ratio"] = round(a["p50_ms"] / b["p50_ms"], 3)
            entry["p99_ratio"] = round(a["p99_ms"] / b["p99_ms"], 3)
        out.append(entry)
    return out


def run(base: Path, *, callers: Sequence[int] = (1, 8, 32), window: int = 256,
        seconds: float = 3.0, repeats: int = 2, log: Log = print) -> dict[str, Any]:
    """The whole section: every variant ``repeats`` times, rotated; ratios; the fsync floor."""
    plan = plan_for(callers, window, seconds)
    names = list(VARIANTS)
    runs: dict[str, list[list[dict[str, Any]]]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            result = run_variant(base / f"{name}-{r}", name, plan)
            runs[name].append(result["rows"])
            for row in result["rows"]:
                load = f"{row['callers']:>3} callers" if "callers" in row else \
                    f"window {row['window']}"
                log(f"  {name:13} run {r + 1}: {load:12} {row.get('ops_per_s', 0):8.1f} ops/s  "
                    f"p50 {row.get('p50_ms', 0):7.2f} ms  p99 {row.get('p99_ms', 0):7.2f} ms"
                    + (f"  errors {row['errors']}" if "errors" in row else ""))
    variants = {n: _median_rows(runs[n]) for n in names}
    floor = fsync_floor(base / "fsync-floor")
    log(f"  fsync floor (4 KiB append + fdatasync): p50 {floor.get('p50_ms')} ms, "
        f"p99 {floor.get('p99_ms')} ms")
    return {
        "seconds_per_point": seconds, "repeats": repeats, "window": window,
        "variants": variants,
        "ours_vs_raw": _ratios(variants, "ours", "raw"),
        "ours_nofsync_vs_raw": _ratios(variants, "ours-nofsync", "raw"),
        "fsync_vs_nofsync": _ratios(variants, "ours", "ours-nofsync"),
        "fsync_floor": floor,
    }


@contextlib.contextmanager
def _tmp(prefix: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    with _tmp("streambus-bench-overhead-") as base:
        result = run(base, seconds=args.seconds, repeats=args.repeats)
    for name in ("ours_vs_raw", "ours_nofsync_vs_raw", "fsync_vs_nofsync"):
        print(name, json.dumps(result[name]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
