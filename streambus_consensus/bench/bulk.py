"""Bulk metadata changes on a real 3-node cluster (a script, not a test).

Three figures, each on node processes over loopback HTTP (``--app metadata``,
fsync on, the defaults' election timeouts):

- **batched create**: topics created per second through ``POST
  /v1/topics:batch`` in batches of 100 topics (3 partitions each,
  replication factor 3, 6 brokers in 3 racks), ``callers`` keep-alive callers
  to the leader; beside it, single ``POST /v1/topics`` creates with as many
  callers for the same time, as the figure to compare with.
- **fence at scale**: a state of ``fence_partitions`` partitions (100 per
  topic, replication factor 3, 3 brokers: every partition has a replica on
  broker 0, which leads a third of them) is built offline and installed as
  each member's snapshot (as :mod:`.scale` does). Broker 0 is fenced through
  ``POST /v1/brokers/0/fence``: the time until that answer (the fence is
  committed and applied on the leader), and until a watcher on *every* node
  (``GET /v1/watch?format=compact``, long-polling from before the fence) has
  received every changed partition; elections meanwhile (term changes).
- **large create**: broker 0 is unfenced, then one topic of ``big_partitions``
  partitions (the documented maximum is 100,000) is created: its time and the
  elections meanwhile.

Run alone: ``python -m streambus_consensus.bench.bulk [--fence-partitions N]``
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..testing.harness import LocalCluster, wait_until
from .common import HttpCaller, closed_loop, summarize
from .latency import BENCH_SETTINGS, register_brokers
from .scale import PARTITIONS_PER_TOPIC, _install, _ready, _TermWatch

__all__ = ["main", "measure_batched", "measure_large", "run"]

Log = Callable[[str], None]
BATCH_SIZE = 100
"""Topics per batched create (the issue's figure)."""
SETTLE_S = 3.0
"""How long elections are still watched for after a large change completes."""


def _upgrade(caller: HttpCaller) -> None:
    """Finalize metadata version 2 (the batched create); a voter that was slow
    to answer the feature question (a busy machine) is asked again."""
    deadline = time.monotonic() + 60
    while True:
        try:
            caller.request("POST", "/v1/features", {"metadata_version": 2})
            return
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def _leader_caller(cluster: LocalCluster, timeout: float = 60.0) -> HttpCaller:
    leader = cluster.wait_for_leader(60)
    return HttpCaller(cluster.nodes[leader].api_address, cluster.secret, timeout,
                      keep_alive=True)


def measure_batched(base: Path, *, batches: int, callers: int, single_seconds: float,
                    log: Log) -> dict[str, Any]:
    """Topics/s in batches of 100 against single creates, on one 3-node cluster."""
    row: dict[str, Any] = {"batch_size": BATCH_SIZE, "batches": batches, "callers": callers,
                           "partitions": 3, "replication_factor": 3}
    with LocalCluster(3, base, app="metadata", settings=BENCH_SETTINGS) as cluster:
        cluster.start()
        setup = _leader_caller(cluster)
        register_brokers(setup, 6, 3)
        _upgrade(setup)
        api = setup.host, setup.port
        setup.close()
        voters = sorted(cluster.nodes)

        def single(thread: int, i: int, callers_: list[HttpCaller]) -> None:
            callers_[thread].request("POST", "/v1/topics", {
                "name": f"single-{thread}-{i}", "partitions": 3, "replication_factor": 3})

        pool = [HttpCaller(f"{api[0]}:{api[1]}", cluster.secret, 60, keep_alive=True)
                for _ in range(callers)]
        singles = closed_loop(functools.partial(single, callers_=pool), callers,
                              single_seconds).summary()
        singles["seconds"] = single_seconds
        row["single_create"] = singles
        log(f"  single creates, {callers} callers: {singles.get('ops_per_s')} topics/s, "
            f"p50 {singles.get('p50_ms')} ms")

        next_batch = iter(range(batches))
        lock = threading.Lock()
        latencies: list[float] = []
        created: list[int] = []
        errors: list[str] = []

        def batch_loop(thread: int) -> None:
            caller = pool[thread]
            while True:
                with lock:
                    b = next(next_batch, None)
                if b is None:
                    return
                body = {"topics": [{"name": f"batch-{b}-{i}", "partitions": 3,
                                    "replication_factor": 3} for i in range(BATCH_SIZE)]}
                t0 = time.monotonic()
                try:
                    answer = caller.request("POST", "/v1/topics:batch", body)
                except Exception as exc:
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                took = time.monotonic() - t0
                with lock:
                    latencies.append(took)
                    created.append(answer["created"])

        with _TermWatch(cluster, voters) as watch:
            threads = [threading.Thread(target=batch_loop, args=(t,), daemon=True)
                       for t in range(callers)]
            t0 = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join(600)
            elapsed = time.monotonic() - t0
        for caller in pool:
            caller.close()
        total = sum(created)
        row["batched"] = {"topics": total, "seconds": round(elapsed, 3),
                          "topics_per_s": round(total / elapsed, 1) if elapsed else None,
                          "batch_latency": summarize(latencies), "errors": errors[:5],
                          "error_count": len(errors), "elections": watch.elections()}
        single_rate = singles.get("ops_per_s") or 0
        row["batched"]["vs_single"] = (round(total / elapsed / single_rate, 1)
                                       if single_rate and elapsed else None)
        log(f"  batched creates of {BATCH_SIZE}, {callers} callers: {total} topics in "
            f"{elapsed:.2f} s = {row['batched']['topics_per_s']} topics/s "
            f"({row['batched']['vs_single']}x single), batch p50 "
            f"{row['batched']['batch_latency'].get('p50_ms')} ms, errors {len(errors)}, "
            f"elections {watch.elections()}")
    return row


def _watch_node(caller: HttpCaller, after: int, expected: int, deadline: float,
                done: dict[str, float], counts: dict[str, int], key: str) -> None:
    """Long-poll a node's compact feed until ``expected`` partition changes arrived."""
    count, skip = 0, 0
    try:
        while count < expected and time.monotonic() < deadline:
            path = f"/v1/watch?format=compact&after={after}&wait=5"
            if skip:
                path += f"&skip={skip}"
            answer = caller.request("GET", path)
            for event in answer["events"]:
                for run in event.get("runs", ()):
                    if run["kind"] == "partition_changed":
                        count += len(run["index"])
                after = event["offset"]
            resume = answer.get("resume")
            after, skip = (resume["after"], resume["skip"]) if resume else (after, 0)
    finally:
        counts[key] = count
        if count >= expected:
            done[key] = time.monotonic()
        caller.close()


def measure_large(base: Path, *, fence_partitions: int, big_partitions: int,
                  log: Log) -> dict[str, Any]:
    """The fence of a broker in ``fence_partitions`` partitions, then a large create."""
    topics = fence_partitions // PARTITIONS_PER_TOPIC
    row: dict[str, Any] = {"partitions": topics * PARTITIONS_PER_TOPIC, "brokers": 3,
                           "replication_factor": 3}
    with LocalCluster(3, base, app="metadata", settings=BENCH_SETTINGS) as cluster:
        voters = sorted(cluster.nodes)
        members = {n: cluster.nodes[n].raft_address for n in voters}
        snapshot = base / "snapshot.bin"
        build = subprocess.run(
            [sys.executable, "-m", "streambus_consensus.bench.scale", "build",
             "--topics", str(topics), "--members", json.dumps(members), "--out", str(snapshot),
             "--brokers", "3", "--no-gc-probe"],
            capture_output=True, text=True, timeout=900, check=False)
        if build.returncode != 0:
            raise RuntimeError(f"offline build failed: {build.stderr[-2000:]}")
        offline = json.loads(build.stdout.strip().splitlines()[-1])
        offset = offline["offset"]
        blob = snapshot.read_bytes()
        for node_id in voters:
            _install(cluster.nodes[node_id].directory / "data", blob)
        del blob
        snapshot.unlink()
        cluster.start(*voters, wait=False)
        for node_id in voters:
            wait_until(functools.partial(_ready, cluster, node_id, offset), 600,
                       f"{node_id} ready", interval=0.2)
        caller = _leader_caller(cluster, timeout=300)
        _upgrade(caller)
        log(f"  {row['partitions']:,} partitions on 3 brokers loaded (built in "
            f"{offline['build_s']} s)")

        # The fence: every partition has a replica on broker 0.
        expected = row["partitions"]
        done: dict[str, float] = {}
        counts: dict[str, int] = {}
        with _TermWatch(cluster, voters) as watch:
            deadline = time.monotonic() + 300
            watchers = [threading.Thread(target=_watch_node, daemon=True, args=(
                HttpCaller(cluster.nodes[n].api_address, cluster.secret, 120, keep_alive=True),
                offset, expected, deadline, done, counts, n)) for n in voters]
            for w in watchers:
                w.start()
            time.sleep(0.5)  # the watchers are waiting in their long poll
            t0 = time.monotonic()
            caller.request("POST", "/v1/brokers/0/fence", {})
            committed = time.monotonic() - t0
            for w in watchers:
                w.join(300)
            settle = time.monotonic() + SETTLE_S
            while time.monotonic() < settle:
                time.sleep(0.2)
        delivered = {n: round(done[n] - t0, 3) if n in done else None for n in voters}
        row["fence"] = {"changed_partitions": expected, "commit_s": round(committed, 3),
                        "delivered_s": delivered, "received": counts,
                        "all_delivered_s": (max(v for v in delivered.values() if v is not None)
                                            if all(delivered.values()) else None),
                        "elections": watch.elections()}
        log(f"  fence of broker 0 ({expected:,} partitions changed): committed in "
            f"{committed:.2f} s; every changed partition at every node's watcher after "
            f"{row['fence']['all_delivered_s']} s ({delivered}); elections meanwhile: "
            f"{watch.elections()}")

        # The largest topic: one entry of big_partitions new partitions.
        caller.request("POST", "/v1/brokers/0/unfence", {})
        with _TermWatch(cluster, voters) as watch:
            t0 = time.monotonic()
            answer = caller.request("POST", "/v1/topics:batch", {"topics": [
                {"name": "bulk-big", "partitions": big_partitions, "replication_factor": 3}]})
            took = time.monotonic() - t0
            settle = time.monotonic() + SETTLE_S
            while time.monotonic() < settle:
                time.sleep(0.2)
        row["large_create"] = {"partitions": big_partitions, "seconds": round(took, 3),
                               "code": answer["results"][0]["code"],
                               "elections": watch.elections()}
        log(f"  create of a {big_partitions:,}-partition topic: {took:.2f} s "
            f"({answer['results'][0]['code']}); elections meanwhile: {watch.elections()}")
        row["rss_mb"] = {n: round(cluster.rss_bytes(n) / 2**20, 1) for n in voters}
        caller.close()
    return row


def run(base: Path, *, batches: int = 1000, callers: int = 4, single_seconds: float = 3.0,
        fence_partitions: int = 1_000_000, big_partitions: int = 100_000,
        log: Log = print) -> dict[str, Any]:
    """The whole section."""
    return {
        "batched": measure_batched(base / "batched", batches=batches, callers=callers,
                                   single_seconds=single_seconds, log=log),
        "large": measure_large(base / "large", fence_partitions=fence_partitions,
                               big_partitions=big_partitions, log=log),
    }


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=1000)
    parser.add_argument("--callers", type=int, default=4)
    parser.add_argument("--fence-partitions", type=int, default=1_000_000)
    parser.add_argument("--big-partitions", type=int, default=100_000)
    parser.add_argument("--only", choices=("batched", "large"))
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="streambus-bench-bulk-") as tmp:
        base = Path(tmp)
        result: dict[str, Any] = {}
        if args.only in (None, "batched"):
            result["batched"] = measure_batched(base / "batched", batches=args.batches,
                                                callers=args.callers, single_seconds=3.0,
                                                log=print)
        if args.only in (None, "large"):
            result["large"] = measure_large(base / "large",
                                            fence_partitions=args.fence_partitions,
                                            big_partitions=args.big_partitions, log=print)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
