"""create_topic and linearizable-read latency and throughput (a script, not a test).

On a loopback cluster of N node processes (3 and 5 in ``make bench``), for
1, 8 and 32 concurrent callers, two ways in:

- **http**: every node is its own process (``streambus-consensus node run
  --app metadata``); callers are threads of this process sending signed
  requests to the leader's API, a new connection per request as
  :class:`~streambus_consensus.client.ApiClient` does (plus one row with a
  kept-alive connection, one caller).
- **embedded**: this process runs a :class:`~streambus_consensus.metadata.MetadataStore`
  as one voting member (leadership is moved to it) and the other N-1 members
  are node processes; callers are threads calling the store directly, as a
  broker that embeds the store would.

create_topic creates a new topic of 3 partitions, replication factor 3,
per call; the linearizable read is ``describe_topic(..., linearizable=True)``
(a read command through the log). Six brokers in three racks are
registered first; broker sessions are set to a day so that no broker is
fenced for not heartbeating (heartbeats are not what is measured here).

Run alone: ``python -m streambus_consensus.bench.latency [--nodes 3] [--seconds 3]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..config import NodeConfig
from ..metadata.store import MetadataStore
from ..testing.harness import LocalCluster, wait_until
from .common import HttpCaller, closed_loop

__all__ = ["BENCH_SETTINGS", "main", "measure_cluster", "register_brokers", "run"]

BENCH_SETTINGS: dict[str, Any] = {"broker_session_timeout": 86400.0}
"""Node settings of every benchmark cluster: defaults, except no broker fencing."""

READ_TOPIC = "bench-read"
Log = Callable[[str], None]


def register_brokers(caller: HttpCaller, count: int = 6, racks: int = 3) -> None:
    """Register ``count`` active brokers over ``racks`` racks through the API."""
    for i in range(count):
        caller.request("POST", "/v1/brokers", {"broker_id": i, "endpoint": f"127.0.0.1:{19092 + i}",
                                               "rack": f"rack-{i % racks}", "fenced": False})


def _leader_api(cluster: LocalCluster) -> str:
    return cluster.nodes[cluster.wait_for_leader(30)].api_address


def _points(path: str, size: int, create: Callable[[int, int, str], object],
            read: Callable[[int, int], object], callers: Sequence[int], seconds: float,
            log: Log) -> list[dict[str, Any]]:
    rows = []
    for op in ("create_topic", "linearizable_read"):
        for n in callers:
            tag = f"{path[0]}{size}c{n}"
            call: Callable[[int, int], object]
            if op == "create_topic":
                def call(thread: int, i: int, tag: str = tag) -> object:
                    return create(thread, i, tag)
            else:
                call = read
            result = closed_loop(call, n, seconds)
            row = {"path": path, "nodes": size, "op": op, **result.summary()}
            rows.append(row)
            log(f"  {path:8} {size} nodes {op:17} {n:2} callers: "
                f"{row.get('ops_per_s', 0):8.1f} ops/s  p50 {row.get('p50_ms', 0):7.2f} ms  "
                f"p99 {row.get('p99_ms', 0):7.2f} ms  max {row.get('max_ms', 0):7.2f} ms"
                + (f"  errors {row['errors']}" if "errors" in row else ""))
    return rows


def _measure_http(base: Path, size: int, callers: Sequence[int], seconds: float,
                  log: Log) -> list[dict[str, Any]]:
    with LocalCluster(size, base, app="metadata", settings=BENCH_SETTINGS) as cluster:
        cluster.start()
        api = _leader_api(cluster)
        setup = HttpCaller(api, cluster.secret)
        register_brokers(setup)
        setup.request("POST", "/v1/topics", {"name": READ_TOPIC, "partitions": 3,
                                             "replication_factor": 3})
        term = (cluster.status(cluster.wait_for_leader(30)) or {}).get("term")
        pool = [HttpCaller(api, cluster.secret) for _ in range(max(callers))]

        def create(thread: int, i: int, tag: str) -> object:
            return pool[thread].request("POST", "/v1/topics", {
                "name": f"{tag}-{thread}-{i}", "partitions": 3, "replication_factor": 3})

        def read(thread: int, i: int) -> object:
            return pool[thread].request("GET", f"/v1/topics/{READ_TOPIC}?linearizable=1")

        rows = _points("http", size, create, read, callers, seconds, log)
        # A long-lived client keeps its connection: one caller, to show what that costs.
        kept = HttpCaller(api, cluster.secret, keep_alive=True)
        result = closed_loop(lambda t, i: kept.request("POST", "/v1/topics", {
            "name": f"k{size}-{i}", "partitions": 3, "replication_factor": 3}), 1, seconds)
        rows.append({"path": "http-keepalive", "nodes": size, "op": "create_topic",
                     **result.summary()})
        log(f"  http keep-alive, 1 caller create_topic: p50 {rows[-1].get('p50_ms')} ms")
        kept.close()
        after = cluster.status(cluster.wait_for_leader(30)) or {}
        for row in rows:
            row["leader_changed_during_run"] = after.get("term") != term
        for caller in pool:
            caller.close()
        return rows


def embedded_config(cluster: LocalCluster, node_id: str = "n1") -> NodeConfig:
    """``node_id``'s config from a LocalCluster, to run that member in this process."""
    node = cluster.nodes[node_id]
    config = NodeConfig.from_toml(node.config_path)
    return config.clone(data_dir=str(node.directory / "data"), api_address=None)


def lead_from(cluster: LocalCluster, store: MetadataStore, timeout: float = 30.0) -> None:
    """Move leadership to the in-process member ``store`` runs on."""
    me = store.node.node_id
    deadline = time.monotonic() + timeout
    while not store.node.is_leader:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{me} did not become leader within {timeout:.0f}s")
        leader = store.node.leader_id
        if leader is None or leader == me:
            time.sleep(0.05)
            continue
        with contextlib.suppress(RuntimeError, OSError):
            HttpCaller(cluster.nodes[leader].api_address, cluster.secret, timeout=5).request(
                "POST", "/v1/leader/transfer", {"node_id": me})
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: store.node.is_leader, 3, "the transfer", interval=0.02)


def _try_lead(cluster: LocalCluster, store: MetadataStore) -> None:
    for _ in range(5):
        try:
            lead_from(cluster, store, timeout=10)
            return
        except TimeoutError:
            continue
    lead_from(cluster, store)


def _measure_embedded(base: Path, size: int, callers: Sequence[int], seconds: float,
                      log: Log) -> list[dict[str, Any]]:
    with LocalCluster(size, base, app="metadata", settings=BENCH_SETTINGS) as cluster:
        others = [n for n in cluster.nodes if n != "n1"]
        cluster.start(*others)
        store = MetadataStore.open(embedded_config(cluster))
        try:
            store.node.wait_for_leader(30)
            _try_lead(cluster, store)
            for i in range(6):
                store.register_broker(i, f"127.0.0.1:{19092 + i}", rack=f"rack-{i % 3}",
                                      fenced=False)
            store.create_topic(READ_TOPIC, 3, 3)
            term = store.node.term

            def create(thread: int, i: int, tag: str) -> object:
                return store.create_topic(f"{tag}-{thread}-{i}", 3, 3)

            def read(thread: int, i: int) -> object:
                return store.describe_topic(READ_TOPIC, linearizable=True)

            rows = _points("embedded", size, create, read, callers, seconds, log)
            for row in rows:
                row["leader_changed_during_run"] = store.node.term != term
            return rows
        finally:
            store.close()


def measure_cluster(base: Path, size: int, callers: Sequence[int], seconds: float,
                    log: Log, paths: Sequence[str] = ("http", "embedded")) -> list[dict[str, Any]]:
    """All points for one cluster size."""
    rows: list[dict[str, Any]] = []
    if "http" in paths:
        rows += _measure_http(base / f"http-{size}", size, callers, seconds, log)
    if "embedded" in paths:
        rows += _measure_embedded(base / f"embedded-{size}", size, callers, seconds, log)
    return rows


def run(base: Path, *, sizes: Sequence[int] = (3, 5), callers: Sequence[int] = (1, 8, 32),
        seconds: float = 3.0, log: Log = print) -> dict[str, Any]:
    """The whole section: every size, path, operation and caller count."""
    rows: list[dict[str, Any]] = []
    for size in sizes:
        rows += measure_cluster(base, size, callers, seconds, log)
    return {"seconds_per_point": seconds, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, action="append", help="cluster size (repeatable)")
    parser.add_argument("--callers", type=int, action="append", help="concurrency (repeatable)")
    parser.add_argument("--seconds", type=float, default=3.0, help="per point (default 3)")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="streambus-bench-lat-") as tmp:
        result = run(Path(tmp), sizes=args.nodes or [3], callers=args.callers or [1, 8, 32],
                     seconds=args.seconds)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    one = [r for r in result["rows"] if r["op"] == "create_topic" and r["callers"] == 1]
    for row in one:
        print(f"{row['path']}: create_topic, 1 caller: p50 {row.get('p50_ms')} ms, "
              f"p99 {row.get('p99_ms')} ms (issue 3 targets: p50 <= 1.0 ms, p99 <= 3 ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

