"""What TLS costs: create_topic over HTTP on two three-node clusters, one plain and one
with mutual TLS for peers and the API, measured in alternating rounds of one run.

Both clusters run side by side for the whole measurement (an idle cluster costs
little), and the rounds alternate plain, TLS, plain, TLS... so that other work on
a shared machine falls on both alike. Each caller is a thread with its own
:class:`~streambus_consensus.client.ApiClient` (kept-alive connections; a TLS
handshake only when a connection is opened), sending signed ``POST /v1/topics``
(3 partitions, replication factor 3, three registered brokers) to the leader.

Run: ``python -m streambus_consensus.bench.tls_cost [--callers 1 8 32]
[--seconds S] [--rounds N] [--json PATH]``
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from ..testing.harness import LocalCluster
from .common import closed_loop

__all__ = ["main", "run"]

SETTINGS = {"broker_session_timeout": 86_400.0}
"""The bench's brokers never heartbeat; they must stay active."""
MODES = ("plain", "tls")


@contextmanager
def _cluster(base: Path, tls: bool) -> Iterator[tuple[LocalCluster, str]]:
    with LocalCluster(3, base, app="metadata", tls=tls, settings=SETTINGS) as cluster:
        cluster.start()
        leader = cluster.wait_for_leader(30)
        client = cluster.client(leader)
        for broker_id in range(3):
            client.request("POST", "/v1/brokers", {
                "broker_id": broker_id, "endpoint": f"bench-broker{broker_id}:9092",
                "fenced": False})
        client.close()
        yield cluster, leader


def _round(cluster: LocalCluster, leader: str, callers: int, seconds: float,
           names: Iterator[int], label: str) -> dict[str, Any]:
    clients = [cluster.client(leader, timeout=30) for _ in range(callers)]

    def create(thread: int, _: int) -> None:
        clients[thread].request("POST", "/v1/topics", {
            "name": f"{label}-{next(names)}", "partitions": 3, "replication_factor": 3})

    try:
        return closed_loop(create, callers, seconds).summary()
    finally:
        for client in clients:
            client.close()


def run(base: Path, *, callers: Sequence[int] = (1, 8, 32), seconds: float = 3.0,
        rounds: int = 3, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure; returns per-round figures, medians and the TLS/plain ratios."""
    names = itertools.count()
    rows: list[dict[str, Any]] = []
    with ExitStack() as stack:
        clusters = {mode: stack.enter_context(_cluster(base / mode, mode == "tls"))
                    for mode in MODES}
        for count in callers:
            per_mode: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
            for r in range(rounds):
                for mode in MODES:
                    cluster, leader = clusters[mode]
                    figures = _round(cluster, leader, count, seconds, names, mode)
                    per_mode[mode].append(figures)
                    log(f"tls: {mode:5} callers {count:2} round {r + 1}: "
                        f"{figures.get('ops_per_s')} ops/s, p50 {figures.get('p50_ms')} ms")
            row: dict[str, Any] = {"callers": count, "rounds": per_mode}
            for mode in MODES:
                row[mode] = {
                    "ops_per_s": statistics.median(f.get("ops_per_s", 0.0)
                                                   for f in per_mode[mode]),
                    "p50_ms": statistics.median(f.get("p50_ms", float("nan"))
                                                for f in per_mode[mode])}
            plain, tls = row["plain"], row["tls"]
            row["throughput_ratio"] = (round(tls["ops_per_s"] / plain["ops_per_s"], 3)
                                       if plain["ops_per_s"] else None)
            row["p50_ratio"] = (round(tls["p50_ms"] / plain["p50_ms"], 3)
                                if plain["p50_ms"] else None)
            rows.append(row)
            log(f"tls: callers {count}: TLS/plain throughput {row['throughput_ratio']}, "
                f"p50 {row['p50_ratio']}")
    return {"seconds": seconds, "rounds": rounds, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--callers", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="streambus-tls-") as tmp:
        result = run(Path(tmp), callers=args.callers, seconds=args.seconds, rounds=args.rounds)
    for row in result["rows"]:
        print(f"callers {row['callers']:>2}: plain {row['plain']['ops_per_s']:>7} ops/s "
              f"p50 {row['plain']['p50_ms']} ms | TLS {row['tls']['ops_per_s']:>7} ops/s "
              f"p50 {row['tls']['p50_ms']} ms | TLS/plain throughput "
              f"{row['throughput_ratio']}, p50 {row['p50_ratio']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
