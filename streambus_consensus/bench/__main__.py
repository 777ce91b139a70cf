"""``make bench``: run every benchmark section and write BENCHMARKS.md and results/*.json.

``python -m streambus_consensus.bench [--quick] [--only SECTION ...] [--out DIR]``

Sections, in order: ``latency`` (1), ``overhead`` (2, with 5: durability),
``scale`` (4), ``profile`` (6), ``tls`` (7), ``bulk`` (8), ``etcd`` (9: side by side
with etcd, installed with apt-get when missing, skipped with one line when it cannot
be), ``flood`` (10: connection flood), ``failover`` (3). The idle-election watch of
section 3 runs in the background for the whole run (at least ``--idle``
seconds; the run waits at the end if needed), so a full run fits in 20
minutes on two cores. ``--quick`` shortens everything (CI smoke run, < 4
minutes) and writes under ``results/quick/`` instead, so a smoke run never
overwrites the full figures.

A section that fails is recorded with its error and the run goes on; the exit
status is non-zero if any section failed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import bulk, failover, flood, latency, overhead, profile, scale, tls_cost, versus_etcd
from .common import (
    command_line,
    loadavg,
    machine_info,
    now_iso,
    repo_root,
    section_timer,
    versions,
    write_json,
)
from .idle import IdleWatch
from .report import render

SECTIONS = ("latency", "overhead", "scale", "profile", "tls", "bulk", "etcd", "flood",
            "failover")

FULL: dict[str, Any] = {
    "latency": {"sizes": (3, 5), "callers": (1, 8, 32), "seconds": 3.0},
    "overhead": {"callers": (1, 8, 32), "window": 256, "seconds": 2.5, "repeats": 3},
    "scale": {"sizes": (0, 10_000, 100_000, 1_000_000), "creates": 200},
    "profile": {"seconds": 8},
    "tls": {"callers": (1, 8, 32), "seconds": 3.0, "rounds": 3},
    "bulk": {"batches": 1000, "callers": 4, "single_seconds": 3.0,
             "fence_partitions": 1_000_000, "big_partitions": 100_000},
    "etcd": {"rounds": 3, "seconds": 3.0, "callers": 32, "procs": 2},
    "flood": {"connections": 1000, "seconds": 60.0, "limited_connections": 400,
              "limited_seconds": 10.0, "nofile": 256, "ping": 5.0},
    "failover": {"kills": 20, "rejoins": 10, "idle": 600.0},
}
QUICK: dict[str, Any] = {
    "latency": {"sizes": (3, 5), "callers": (1, 8, 32), "seconds": 0.7},
    "overhead": {"callers": (1, 8, 32), "window": 256, "seconds": 1.0, "repeats": 1},
    "scale": {"sizes": (0, 10_000, 100_000), "creates": 40},
    "profile": {"seconds": 3},
    "tls": {"callers": (8,), "seconds": 1.0, "rounds": 1},
    "bulk": {"batches": 50, "callers": 4, "single_seconds": 1.0,
             "fence_partitions": 100_000, "big_partitions": 100_000},
    "etcd": {"rounds": 1, "seconds": 0.8, "callers": 32, "procs": 2},
    "flood": {"connections": 200, "seconds": 10.0, "limited_connections": 400,
              "limited_seconds": 5.0, "nofile": 256, "ping": 5.0},
    "failover": {"kills": 3, "rejoins": 2, "idle": 30.0},
}


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the suite."""
    parser = argparse.ArgumentParser(prog="python -m streambus_consensus.bench",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short smoke run (< 4 minutes)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    parser.add_argument("--out", type=Path, help="where BENCHMARKS.md and results/ go "
                        "(default: the checkout; results/quick/ with --quick)")
    parser.add_argument("--idle", type=float, help="seconds of idle-election watch")
    parser.add_argument("--kills", type=int, help="leader kills in the failover section")
    args = parser.parse_args(argv)
    plan = {k: dict(v) for k, v in (QUICK if args.quick else FULL).items()}
    if args.idle is not None:
        plan["failover"]["idle"] = args.idle
    if args.kills is not None:
        plan["failover"]["kills"] = args.kills
    root = repo_root()
    out = args.out or (root / "results" / "quick" if args.quick else root)
    results_dir = out if args.quick and args.out is None else out / "results"
    markdown = out / "BENCHMARKS.md"
    sections = [s for s in SECTIONS if not args.only or s in args.only]

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="streambus-bench-") as tmp:
        base = Path(tmp)
        meta: dict[str, Any] = {
            "date": now_iso(), "command": command_line(), "mode": "quick" if args.quick
            else "full", "machine": machine_info(base), "versions": versions(),
            "loadavg_at_start": loadavg(), "plan": plan,
        }
        _log(f"bench ({meta['mode']}): {meta['machine']['nproc']} CPUs, "
             f"{meta['machine']['cpu_model']}, load {meta['loadavg_at_start']}")
        collected: dict[str, Any] = {}
        failures: list[str] = []
        idle: IdleWatch | None = None
        if "failover" in sections:
            try:
                idle = IdleWatch(base / "idle")
                idle.start()
                _log("idle cluster started; watching it in the background")
            except Exception as exc:
                failures.append("idle")
                collected["idle"] = {"error": f"{type(exc).__name__}: {exc}"}
                idle = None
        try:
            runners: dict[str, Callable[[], dict[str, Any]]] = {
                "latency": lambda: latency.run(base / "latency", log=_log, **plan["latency"]),
                "overhead": lambda: overhead.run(base / "overhead", log=_log,
                                                 **plan["overhead"]),
                "scale": lambda: scale.run(base / "scale", log=_log, **plan["scale"]),
                "profile": lambda: profile.run(base / "profile", log=_log, **plan["profile"]),
                "tls": lambda: tls_cost.run(base / "tls", log=_log, **plan["tls"]),
                "bulk": lambda: bulk.run(base / "bulk", log=_log, **plan["bulk"]),
                "etcd": lambda: versus_etcd.run(base / "etcd", log=_log, **plan["etcd"]),
                "flood": lambda: flood.run(base / "flood", log=_log, **plan["flood"]),
                "failover": lambda: failover.measure(
                    base / "failover", plan["failover"]["kills"], 0.0,
                    rejoins=plan["failover"]["rejoins"], log=_log),
            }
            for name in sections:
                with section_timer(_log, name) as timing:
                    try:
                        collected[name] = runners[name]()
                    except Exception as exc:
                        failures.append(name)
                        collected[name] = {"error": f"{type(exc).__name__}: {exc}",
                                           "traceback": traceback.format_exc(limit=8)}
                        _log(f"{name} FAILED: {exc}")
                collected[name]["timing"] = timing
                write_json(results_dir / f"{name}.json", name, meta, collected[name])
        finally:
            if idle is not None:
                wanted = plan["failover"]["idle"]
                remaining = wanted - idle.elapsed()
                if remaining > 0:
                    _log(f"waiting {remaining:.0f}s more for the idle watch ({wanted:.0f}s)")
                    time.sleep(remaining)
                collected["idle"] = idle.finish()
                collected["idle"]["concurrent_with_other_sections"] = len(sections) > 1
                _log(f"idle: {collected['idle']['elections']} election(s) in "
                     f"{collected['idle']['seconds']:.0f}s")
        if "idle" in collected:
            write_json(results_dir / "idle.json", "idle", meta, collected["idle"])
        meta["total_seconds"] = round(time.monotonic() - started, 1)
        meta["loadavg_at_end"] = loadavg()
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(render(meta, collected, markdown, results_dir), encoding="utf-8")
        _log(f"wrote {markdown} and {results_dir}/*.json in {meta['total_seconds']:.0f}s"
             + (f"; FAILED: {', '.join(failures)}" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
