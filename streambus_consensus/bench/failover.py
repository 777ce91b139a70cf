"""Election and failover timings on real node processes (a script, not a test).

Measures, on loopback clusters of node processes with the default config:

1. time from process start to an agreed leader, for one node and for three;
2. failover under a light write load: a writer starts one write every 50 ms
   (a create_topic of one partition, replication factor 3, with the metadata
   application; a key write with ``--app kv``) on a thread of its own, to any
   running node, so a write stuck on a dead leader delays no other. Two kinds
   of leader death, side by side on the same cluster:

   - *loud* (``--kills``): SIGKILL. The followers' connections to it close
     and its address refuses new ones (``fast_failover``);
   - *silent* (``--pauses``): SIGSTOP, as a hung machine or a cut cable:
     nothing closes, the followers only hear silence, and failover is bounded
     by the election timeout. The paused node is resumed afterwards.

   Each round measures the time to a new leader that a majority agrees on
   (status polled every 10 ms), to the first write *started after the death*
   that commits, and the number of new terms (exactly one is right); the node
   is then restarted or resumed and caught up before the next round;
3. rejoins (``--rejoins``): on a cluster whose links run through the link
   proxy, a follower is cut off both ways for 2-5 maximum election timeouts
   and healed; every term change from the cut to its catch-up is an election
   the rejoin caused (pre-vote must make it 0);
4. elections seen in ``--idle`` seconds of silence afterwards: the highest
   term after minus the highest term before (every election bumps it).

Run: ``python -m streambus_consensus.bench.failover [--kills 20] [--pauses 20]
[--rejoins 20] [--idle 600] [--json F]``
"""

from __future__ import annotations

import argparse
import functools
import json
import random
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
           "leader_single_node_s": 1.0, "leader_three_nodes_s": 2.0,
           "silent_failover_median_s": 0.6, "silent_failover_p99_s": 1.0,
           "extra_terms": 0, "rejoin_elections": 0}
WRITE_PERIOD = 0.05
MAX_IN_FLIGHT = 32
ELECTION_TIMEOUT_MAX = 0.8  # NodeConfig's default
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
    """A light write load: one write started every ``WRITE_PERIOD`` on a thread
    of its own (at most ``MAX_IN_FLIGHT`` at once); remembers when each write
    started and ended."""

    def __init__(self, cluster: LocalCluster, app: str) -> None:
        self.cluster, self.app = cluster, app
        self.records: list[tuple[float, float, bool]] = []
        self.wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(MAX_IN_FLIGHT)
        self._thread = threading.Thread(target=self._run, name="bench-writer", daemon=True)
        self._workers: list[threading.Thread] = []

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
        for worker in self._workers:
            worker.join(15)

    def _write(self, client: ApiClient, i: int) -> None:
        if self.app == "metadata":
            client.request("POST", "/v1/topics", {"name": f"failover-{i}", "partitions": 1,
                                                  "replication_factor": 3})
        else:
            client.request("PUT", f"/v1/kv/failover-{i}", {"value": i})

    def _one(self, i: int) -> None:
        try:
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
        finally:
            self._slots.release()

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            if self._slots.acquire(timeout=0.1):
                worker = threading.Thread(target=self._one, args=(i,), daemon=True)
                self._workers = [w for w in self._workers if w.is_alive()]
                self._workers.append(worker)
                worker.start()
                i += 1
            self.wake.wait(WRITE_PERIOD)
            self.wake.clear()

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


def _failovers(cluster: LocalCluster, writer: _Writer, rounds: int, how: str,
               log: Log) -> tuple[list[float], list[float], list[dict[str, Any]]]:
    """``rounds`` leader deaths of one kind: ``"sigkill"`` or ``"sigstop"``."""
    elected: list[float] = []
    committed: list[float] = []
    records: list[dict[str, Any]] = []
    for round_no in range(rounds):
        leader = cluster.wait_for_leader(30)
        wait_until(lambda: writer.first_commit_after(time.monotonic() - 0.5), 30,
                   "writes to commit before the leader's death")
        term_before = _max_term(cluster)
        died = time.monotonic()
        if how == "sigkill":
            cluster.kill(leader)
        else:
            cluster.pause(leader)
        writer.wake.set()
        new_leader = _agreed_leader(cluster, leader, 30)
        elected.append(time.monotonic() - died)
        commit_end = wait_until(functools.partial(writer.first_commit_after, died), 30,
                                "a write after failover", interval=0.005)
        committed.append(commit_end - died)
        if how == "sigkill":
            cluster.start(leader)
        else:
            cluster.resume(leader)
        wait_until(functools.partial(_caught_up, cluster, leader), 60,
                   f"the {'restarted' if how == 'sigkill' else 'resumed'} node to catch up")
        records.append({"how": how, "leader": leader, "new_leader": new_leader,
                        "new_leader_s": round(elected[-1], 3),
                        "next_commit_s": round(committed[-1], 3),
                        "terms": _max_term(cluster) - term_before})
        log(f"  {how} {round_no + 1}/{rounds}: new leader after {elected[-1]:.3f}s, "
            f"write committed after {committed[-1]:.3f}s, "
            f"{records[-1]['terms']} new term(s) once {leader} caught up")
    return elected, committed, records


def _rejoins(base: Path, count: int, app: str, settings: dict[str, Any],
             log: Log) -> dict[str, Any]:
    """Cut a follower off both ways for 2-5 election timeouts, heal, count elections."""
    rng = random.Random(1111)
    elections: list[int] = []
    with LocalCluster(3, base, app=app, settings=settings, proxied=True) as cluster:
        network = cluster.network
        if network is None:  # proxied=True always builds one
            raise RuntimeError("the cluster has no link proxy to cut links with")
        cluster.start()
        cluster.wait_for_leader(30)
        writer = _Writer(cluster, app)
        writer.start()
        try:
            for round_no in range(count):
                leader = cluster.wait_for_leader(30)
                follower = rng.choice([n for n in cluster.nodes if n != leader])
                term_before = _max_term(cluster)
                cut_for = rng.uniform(2, 5) * ELECTION_TIMEOUT_MAX
                links = network.isolate(follower)
                time.sleep(cut_for)
                network.heal(links)
                wait_until(functools.partial(_caught_up, cluster, follower), 60,
                           f"{follower} to catch up after the cut")
                elections.append(_max_term(cluster) - term_before)
                log(f"  rejoin {round_no + 1}/{count}: {follower} cut off for {cut_for:.2f}s, "
                    f"{elections[-1]} election(s)")
        finally:
            writer.stop()
    return {"rounds": count, "elections": sum(elections),
            "rounds_with_an_election": sum(1 for e in elections if e)}


def measure(base: Path, kills: int, idle: float, *, app: str = "metadata",
            pauses: int | None = None, rejoins: int = 0, log: Log = print) -> dict[str, Any]:
    """Run the measurements; return the figures. ``pauses`` defaults to ``kills``."""
    pauses = kills if pauses is None else pauses
    results: dict[str, Any] = {
        "app": app,
        "leader_single_node_s": round(_time_to_leader(base / "single", 1), 3),
        "leader_three_nodes_s": round(_time_to_leader(base / "three", 3), 3),
    }
    settings = {"broker_session_timeout": 86400.0} if app == "metadata" else {}
    with LocalCluster(3, base / "failover", app=app, settings=settings) as cluster:
        cluster.start()
        cluster.wait_for_leader(30)
        writer = _Writer(cluster, app)
        writer.start()
        try:
            elected, committed, rounds = _failovers(cluster, writer, kills, "sigkill", log)
            s_elected, s_committed, s_rounds = _failovers(cluster, writer, pauses, "sigstop",
                                                          log)
        finally:
            writer.stop()
        results["writes"] = {"total": len(writer.records),
                             "failed": sum(1 for _, _, ok in writer.records if not ok)}
        if elected:
            results["failover_new_leader_s"] = _summary(elected)
            results["failover_next_commit_s"] = _summary(committed)
        if s_elected:
            results["silent_failover_new_leader_s"] = _summary(s_elected)
            results["silent_failover_next_commit_s"] = _summary(s_committed)
        results["rounds"] = rounds + s_rounds
        terms = [r["terms"] for r in results["rounds"]]
        results["terms_per_failover"] = {str(t): terms.count(t) for t in sorted(set(terms))}
        results["extra_terms"] = sum(t - 1 for t in terms if t > 1)
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
    if rejoins:
        results["rejoins"] = _rejoins(base / "rejoins", rejoins, app, settings, log)
    return results


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20, help="SIGKILL rounds (default 20)")
    parser.add_argument("--pauses", type=int, default=None,
                        help="SIGSTOP rounds (default: as many as --kills)")
    parser.add_argument("--rejoins", type=int, default=20,
                        help="rounds of a follower cut off and healed (default 20)")
    parser.add_argument("--idle", type=float, default=600.0,
                        help="idle seconds (default 600)")
    parser.add_argument("--app", choices=("metadata", "kv"), default="metadata")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="streambus-failover-") as tmp:
        try:
            results = measure(Path(tmp), args.kills, args.idle, app=args.app,
                              pauses=args.pauses, rejoins=args.rejoins)
        except (ConsensusError, TimeoutError, RuntimeError) as exc:
            print(f"failover benchmark failed: {exc}", file=sys.stderr)
            return 1
    rows = [
        ("leader elected, 1 node (s)", f"{results['leader_single_node_s']:.3f}", "<= 1.0"),
        ("leader elected, 3 nodes (s)", f"{results['leader_three_nodes_s']:.3f}", "<= 2.0"),
    ]
    for key, what, target in (
            ("failover_new_leader_s", "SIGKILL: new leader", "-"),
            ("failover_next_commit_s", "SIGKILL: next commit", "median <= 0.6, p99 <= 1.2"),
            ("silent_failover_new_leader_s", "SIGSTOP: new leader", "-"),
            ("silent_failover_next_commit_s", "SIGSTOP: next commit",
             "median <= 0.6, p99 <= 1.0")):
        if key in results:
            f = results[key]
            rows.append((f"{what}, median / p99 / max over {f['n']} (s)",
                         f"{f['median']:.3f} / {f['p99']:.3f} / {f['max']:.3f}", target))
    rows.append(("new terms per failover {terms: rounds}",
                 json.dumps(results["terms_per_failover"]), "all 1"))
    if "rejoins" in results:
        rj = results["rejoins"]
        rows.append((f"elections caused by {rj['rounds']} rejoins", str(rj["elections"]), "0"))
    rows.append((f"elections in {results['idle_seconds']:.0f}s idle",
                 str(results["idle_elections"]), "0"))
    width = max(len(r[0]) for r in rows)
    print(f"{'measure'.ljust(width)}  {'value':>23}  target")
    for name, value, target in rows:
        print(f"{name.ljust(width)}  {value:>23}  {target}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
