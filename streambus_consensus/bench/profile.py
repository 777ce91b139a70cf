"""Where the time goes per committed operation (py-spy, a script, not a test).

Two profiles, each of the leader process while it serves 8 closed-loop
callers, sampled with ``py-spy record --gil`` (only the thread holding the
GIL is sampled: in a GIL-bound process that is the work that limits
throughput; time blocked in fsync or select, GIL released, is not in it):

- ``consensus``: a :mod:`._peer` member (our RaftNode, fsync on) replicating
  the dict write: the Raft hot path without HTTP or metadata;
- ``metadata-http``: a metadata node process serving create_topic over HTTP.

Samples are put in categories by the innermost frame that belongs to a known
part (codec, HMAC, transport, engine, adapter, storage, futures, metadata
apply, HTTP/JSON, ...), and each category's GIL time is divided by the
operations committed while sampling.

Needs ``py-spy`` on PATH or next to the interpreter (``pip install py-spy``);
without it the section reports that it was skipped.

Run alone: ``python -m streambus_consensus.bench.profile [--seconds 8]``
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..testing.harness import LocalCluster
from .common import HttpCaller, closed_loop
from .latency import BENCH_SETTINGS, register_brokers
from .overhead import PeerCluster

__all__ = ["CATEGORIES", "categorize", "find_py_spy", "main", "run"]

RATE = 200
"""Samples per second."""

CATEGORIES: list[tuple[str, re.Pattern[str]]] = [
    ("fsync + WAL write", re.compile(r"DiskStorage\._write|fdatasync")),
    ("codec (wire + command bytes)", re.compile(r"\(streambus_consensus/codec\.py")),
    ("HMAC / auth", re.compile(r"\(hmac\.py|hashlib|sign_request|authorize")),
    ("transport (sockets, framing)", re.compile(r"streambus_consensus/raft/transport\.py"
                                                r"|selectors\.py|socket\.py")),
    ("metadata apply (fsm, commands)", re.compile(r"streambus_consensus/metadata/"
                                                  r"(fsm|commands|records|placement|feed)\.py")),
    ("metadata store / controller", re.compile(r"streambus_consensus/metadata/"
                                               r"(store|controller|service)\.py")),
    ("HTTP server + JSON", re.compile(r"streambus_consensus/api\.py|http/server\.py"
                                      r"|socketserver\.py|json/|http/client\.py")),
    ("PySyncObj engine", re.compile(r"pysyncobj/")),
    ("adapter (node, engine, guard, storage)", re.compile(
        r"streambus_consensus/raft/(node|engine|safety|storage|snapshot)\.py")),
    ("futures, queues, thread hand-off", re.compile(r"concurrent/futures|threading\.py"
                                                    r"|queue\.py")),
    ("load generator (bench)", re.compile(r"streambus_consensus/bench/")),
]


class _CannotAttachError(Exception):
    """py-spy ran but recorded nothing (no permission to attach, most often)."""


def find_py_spy() -> str | None:
    """The py-spy executable, or None."""
    beside = Path(sys.executable).parent / "py-spy"
    if beside.exists():
        return str(beside)
    return shutil.which("py-spy")


def categorize(frames: list[str]) -> str:
    """The category of one stack (innermost frame first that matches)."""
    for frame in reversed(frames):
        for name, pattern in CATEGORIES:
            if pattern.search(frame):
                return name
    return "other"


def _parse(path: Path) -> tuple[Counter[str], Counter[str], int]:
    categories: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    total = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        categories[categorize(frames)] += n
        leaf = re.sub(r" \(([^)]*/)?([^/)]+?)(:\d+)?\)$", r" (\2)", frames[-1])
        leaves[leaf] += n
    return categories, leaves, total


def _record(py_spy: str, pid: int, seconds: int, out: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [py_spy, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", str(RATE),
         "--format", "raw", "--output", str(out), "--nonblocking", "--gil"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _summarize(raw: Path, ops: int, seconds: float) -> dict[str, Any]:
    categories, leaves, total = _parse(raw)
    per_op = 1e6 / RATE / ops if ops else 0.0
    return {
        "ops_committed": ops, "ops_per_s": round(ops / seconds, 1), "samples": total,
        "gil_busy_fraction": round(total / (RATE * seconds), 3),
        "categories": [{"category": name, "share": round(n / total, 3),
                        "us_per_op": round(n * per_op, 1)}
                       for name, n in categories.most_common()] if total else [],
        "top_functions": [{"function": name, "share": round(n / total, 3)}
                          for name, n in leaves.most_common(15)] if total else [],
    }


def _consensus(base: Path, py_spy: str, seconds: int, log: Callable[[str], None]
               ) -> dict[str, Any]:
    plan = [{"callers": 8, "seconds": seconds + 2.0}]
    with PeerCluster(base / "consensus", "ours", plan) as cluster:
        deadline = time.monotonic() + 60
        while (phase := cluster.phase()) is None:
            if time.monotonic() > deadline:
                raise TimeoutError("the load did not start")
            time.sleep(0.05)
        time.sleep(0.8)
        raw = base / "consensus.txt"
        proc = _record(py_spy, int(phase["pid"]), seconds, raw)
        _, err = proc.communicate(timeout=seconds + 60)
        result = cluster.wait(seconds + 60)
    if not raw.exists():
        raise _CannotAttachError(err.decode(errors="replace")[-500:])
    row = result["rows"][0]
    ops = int(row["ops_per_s"] * seconds)
    out = _summarize(raw, ops, seconds)
    out["load"] = "RaftNode (fsync on), dict write, 8 callers on the leader"
    out["fsync_groups_per_s"] = round(row.get("fsync_groups", 0) / (seconds + 2.0), 1)
    log(f"  consensus: {out['ops_per_s']} ops/s, GIL busy {out['gil_busy_fraction']:.0%}")
    return out


def _metadata_http(base: Path, py_spy: str, seconds: int, log: Callable[[str], None]
                   ) -> dict[str, Any]:
    with LocalCluster(3, base / "metadata", app="metadata", settings=BENCH_SETTINGS) as cluster:
        cluster.start()
        leader = cluster.wait_for_leader(30)
        api = cluster.nodes[leader].api_address
        register_brokers(HttpCaller(api, cluster.secret))
        pool = [HttpCaller(api, cluster.secret) for _ in range(8)]
        raw = base / "metadata.txt"
        box: dict[str, Any] = {}

        def load() -> None:
            box["result"] = closed_loop(lambda t, i: pool[t].request("POST", "/v1/topics", {
                "name": f"prof-{t}-{i}", "partitions": 3, "replication_factor": 3}),
                8, seconds + 1.0, warmup=0.5)

        thread = threading.Thread(target=load, daemon=True)
        thread.start()
        time.sleep(0.8)
        pid = cluster.pid(leader)
        if pid is None:
            raise RuntimeError("the leader is not running")
        proc = _record(py_spy, pid, seconds, raw)
        _, err = proc.communicate(timeout=seconds + 60)
        thread.join(seconds + 60)
    if not raw.exists():
        raise _CannotAttachError(err.decode(errors="replace")[-500:])
    result = box["result"]
    ops = int(len(result.latencies) / result.seconds * seconds)
    out = _summarize(raw, ops, seconds)
    out["load"] = "metadata node process, create_topic over HTTP, 8 callers"
    log(f"  metadata-http: {out['ops_per_s']} ops/s, GIL busy {out['gil_busy_fraction']:.0%}")
    return out


def run(base: Path, *, seconds: int = 8, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Both profiles."""
    py_spy = find_py_spy()
    if py_spy is None:
        log("  py-spy not found: profile skipped (pip install py-spy)")
        return {"skipped": "py-spy is not installed (pip install py-spy)"}
    base.mkdir(parents=True, exist_ok=True)
    try:
        return {"rate_hz": RATE, "seconds": seconds, "mode": "py-spy --gil",
                "consensus": _consensus(base, py_spy, seconds, log),
                "metadata_http": _metadata_http(base, py_spy, seconds, log)}
    except _CannotAttachError as exc:  # e.g. no ptrace permission in a container
        log(f"  py-spy could not attach: profile skipped ({exc})")
        return {"skipped": f"py-spy could not attach to the process: {exc}"}


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="streambus-bench-profile-") as tmp:
        result = run(Path(tmp), seconds=args.seconds)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    return 0 if "skipped" not in result else int(os.environ.get("BENCH_PROFILE_REQUIRED", "0"))


if __name__ == "__main__":
    sys.exit(main())
