"""Election and failover timings on real node processes (a script, not a test).

Measures, on loopback clusters of node processes with the default config:

1. time from process start to an agreed leader, for one node and for three;
2. failover under a light write load: a writer thread sends one write every
   50 ms (a create_topic of one partition, replication factor 3, with the
   metadata application; a key write with ``--app kv``) to any node that
   answers. Each round SIGKILLs the leader and measures the time to a new
   leader that a majority agrees on (status polled every 10 ms) and to the
   first write *sent after the kill* that commits; the killed node is then
   restarted and caught up before the next round;
3. elections seen in ``--idle`` seconds of silence afterwards: the highest
   term after minus the highest term before (every election bumps it).

Run: ``python -m streambus_consensus.bench.failover [--kills 20] [--idle 600] [--json F]``
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..client import ApiClient
from ..errors import ConsensusError
from ..testing.harness import LocalCluster, wait_until
from .common import quantile

__all__ = ["TARGETS", "main", "measure"]

TARGETS = {"failover_median_s": 0.6, "failover_p99_s": 1.2, "idle_elections": 0,
           "leader_single_node_s": 1.0, "leader_three_nodes_s": 2.0}
WRITE_PERIOD = 0.05
Log = Callable[[str], None]


def _summary(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "median": round(statistics.median(values), 3),
            "p99": round(quantile(values, 0.99), 3), "max": round(max(values), 3),
            "min": round(min(values), 3)}


def _time_to_leader(base: Path, size: int) -> float:
    with LocalCluster(size, base, app="kv") as cluster:
        started = time.monotonic()
        cluster.start(wait=False)
        cluster.wait_for_leader(30)
        return time.monotonic() - started


class _Writer:
    """A light write load on its own thread; remembers when each write started and ended."""

    def __init__(self, cluster: LocalCluster, app: str) -> None:
        self.cluster, self.app = cluster, app
        self.records: list[tuple[float, float, bool]] = []
        self.wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="bench-writer", daemon=True)

    def start(self) -> None:
        if self.app == "metadata":
            client = self.cluster.client(timeout=5)
            for b in range(3):
                client.request("POST", "/v1/brokers", {"broker_id": b, "fenced": False,
                                                       "endpoint": f"127.0.0.1:{19092 + b}"})
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.wake.set()
        self._thread.join(15)

    def _write(self, client: ApiClient, i: int) -> None:
        if self.app == "metadata":
            client.request("POST", "/v1/topics", {"name": f"failover-{i}", "partitions": 1,
                                                  "replication_factor": 3})
        else:
            client.request("PUT", f"/v1/kv/failover-{i}", {"value": i})

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            client = self.cluster.client(*self.cluster.running(), timeout=2)
            t0 = time.monotonic()
            try:
                self._write(client, i)
                ok = True
            except (ConsensusError, OSError):
                ok = False
            t1 = time.monotonic()
            with self._lock:
                self.records.append((t0, t1, ok))
            i += 1
            if ok:
                self.wake.wait(WRITE_PERIOD)
                self.wake.clear()
            else:
                time.sleep(0.01)

    def first_commit_after(self, t: float) -> float | None:
        """End time of the first successful write that started at or after ``t``."""
        with self._lock:
            ends = [t1 for t0, t1, ok in self.records if ok and t0 >= t]
        return min(ends) if ends else None


def _max_term(cluster: LocalCluster) -> int:
    terms = [(cluster.status(n) or {}).get("term", 0) for n in cluster.running()]
    return max(terms, default=0)


def _agreed_leader(cluster: LocalCluster, exclude: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        leader = cluster.leader()
        if leader is not None and leader != exclude:
            return leader
        if time.monotonic() > deadline:
            raise TimeoutError(f"no new leader within {timeout:.0f}s")
        time.sleep(0.01)


def _caught_up(cluster: LocalCluster, node_id: str) -> bool:
    leader = cluster.leader()
    mine, theirs = cluster.status(node_id), cluster.status(leader) if leader else None
    return bool(mine and theirs and mine["leader_id"] == leader
                and mine["applied_index"] >= theirs["commit_index"])


def measure(base: Path, kills: int, idle: float, *, app: str = "metadata",
            log: Log = print) -> dict[str, Any]:
    """Run all three measurements; return the figures."""
    results: dict[str, Any] = {
        "app": app,
        "leader_single_node_s": round(_time_to_leader(base / "single", 1), 3),
        "leader_three_nodes_s": round(_time_to_leader(base / "three", 3), 3),
    }
    elected: list[float] = []
    committed: list[float] = []
    rounds: list[dict[str, Any]] = []
    settings = {"broker_session_timeout": 86400.0} if app == "metadata" else {}
    with LocalCluster(3, base / "failover", app=app, settings=settings) as cluster:
        cluster.start()
        cluster.wait_for_leader(30)
        writer = _Writer(cluster, app)
        writer.start()
        try:
            for round_no in range(kills):
                leader = cluster.wait_for_leader(30)
                wait_until(lambda: writer.first_commit_after(time.monotonic() - 0.5), 30,
                           "writes to commit before the kill")
                term_before = _max_term(cluster)
                killed = time.monotonic()
                cluster.kill(leader)
                writer.wake.set()
                new_leader = _agreed_leader(cluster, leader, 30)
                elected.append(time.monotonic() - killed)
                commit_end = wait_until(functools.partial(writer.first_commit_after, killed), 30,
                                        "a write after failover", interval=0.005)
                committed.append(commit_end - killed)
                rounds.append({"killed": leader, "new_leader": new_leader,
                               "new_leader_s": round(elected[-1], 3),
                               "next_commit_s": round(committed[-1], 3),
                               "terms": _max_term(cluster) - term_before})
                log(f"  kill {round_no + 1}/{kills}: new leader after {elected[-1]:.3f}s, "
                    f"write committed after {committed[-1]:.3f}s, "
                    f"{rounds[-1]['terms']} election(s)")
                cluster.start(leader)
                wait_until(functools.partial(_caught_up, cluster, leader), 60,
                           "the restarted node to catch up")
        finally:
            writer.stop()
        results["writes"] = {"total": len(writer.records),
                             "failed": sum(1 for _, _, ok in writer.records if not ok)}
        results["failover_new_leader_s"] = _summary(elected)
        results["failover_next_commit_s"] = _summary(committed)
        results["rounds"] = rounds
        time.sleep(1.0)
        before = {n: cluster.status(n) or {} for n in cluster.nodes}
        log(f"  idle for {idle:.0f}s ...")
        time.sleep(idle)
        after = {n: cluster.status(n) or {} for n in cluster.nodes}
        results["idle_seconds"] = idle
        results["idle_elections"] = (max(s.get("term", 0) for s in after.values())
                                     - max(s.get("term", 0) for s in before.values()))
        results["idle_leaders"] = sorted({s.get("leader_id") or "-" for s in after.values()})
        results["idle_nodes_answering"] = sum(1 for s in after.values() if s)
    return results


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20, help="failover rounds (default 20)")
    parser.add_argument("--idle", type=float, default=600.0,
                        help="idle seconds (default 600)")
    parser.add_argument("--app", choices=("metadata", "kv"), default="metadata")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="streambus-failover-") as tmp:
        try:
            results = measure(Path(tmp), args.kills, args.idle, app=args.app)
        except (ConsensusError, TimeoutError, RuntimeError) as exc:
            print(f"failover benchmark failed: {exc}", file=sys.stderr)
            return 1
    f_l, f_c = results["failover_new_leader_s"], results["failover_next_commit_s"]
    rows = [
        ("leader elected, 1 node (s)", f"{results['leader_single_node_s']:.3f}", "<= 1.0"),
        ("leader elected, 3 nodes (s)", f"{results['leader_three_nodes_s']:.3f}", "<= 2.0"),
        (f"failover to new leader, median / p99 / max over {f_l['n']} (s)",
         f"{f_l['median']:.3f} / {f_l['p99']:.3f} / {f_l['max']:.3f}", "-"),
        (f"failover to next commit, median / p99 / max over {f_c['n']} (s)",
         f"{f_c['median']:.3f} / {f_c['p99']:.3f} / {f_c['max']:.3f}",
         "median <= 0.6, p99 <= 1.2"),
        (f"elections in {results['idle_seconds']:.0f}s idle",
         str(results["idle_elections"]), "0"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'measure'.ljust(width)}  {'value':>23}  target")
    for name, value, target in rows:
        print(f"{name.ljust(width)}  {value:>23}  {target}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
