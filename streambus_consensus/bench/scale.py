"""Metadata at scale: 10k, 100k and 1,000,000 partitions (a script, not a test).

**How the state is built.** Loading a million partitions through the Raft
log would take most of the time budget, so the state is built *offline*, in
a child process, by a :class:`~streambus_consensus.metadata.fsm.MetadataStateMachine`
applying the real commands (100 brokers in 5 racks registered active, then
``topics`` CreateTopic commands of 100 partitions each, replication factor
3) through its normal ``apply_at``. Its snapshot is packed in the node's
snapshot file format, with the three members of the cluster and a log
position equal to the state's offset (term 1), and written with
:class:`~streambus_consensus.raft.storage.DiskStorage` as each member's
``snapshot.bin`` before the node starts. Nodes therefore start exactly as
after a restart from disk.

Per size, on a loopback cluster of node processes (``--app metadata``):

- snapshot size; time to encode it (offline) and to take one in the
  cluster (``POST /v1/snapshot`` on the leader: capture, encode, write, fsync);
- cold start of all three members from disk, and restart-to-ready of one
  member (SIGKILL, start, until it has applied the leader's commit index);
- catch-up of a new, empty member added with ``POST /v1/members`` (snapshot
  transfer and install), watching every member's term meanwhile: an install
  that blocks the new member's Raft thread past its election timeout makes it
  campaign when it wakes (PySyncObj has no pre-vote) and depose the leader;
- resident memory of every member; create_topic latency (1 caller,
  keep-alive HTTP to the leader) at that size;
- in the build process: restore time, a full garbage collection's pause
  with the state loaded, and the same after ``gc.freeze()``.

Run alone: ``python -m streambus_consensus.bench.scale [--sizes 10000 100000]``
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import http.client
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..metadata.commands import CreateTopic, RegisterBroker, RequestId, encode_command
from ..metadata.fsm import MetadataStateMachine
from ..raft.snapshot import SnapshotHeader, pack_snapshot
from ..raft.storage import DiskStorage
from ..testing.harness import LocalCluster, wait_until
from .common import HttpCaller, summarize
from .latency import BENCH_SETTINGS

__all__ = ["build_snapshot", "main", "measure_size", "run"]

PARTITIONS_PER_TOPIC = 100
BROKERS = 100
RACKS = 5
NOOP_ENTRY = b"\x01"
"""PySyncObj's no-op log entry: what the snapshot header's two entries hold."""
Log = Callable[[str], None]


# -- offline build (child process) ------------------------------------------------


def build_state(topics: int, partitions: int = PARTITIONS_PER_TOPIC,
                brokers: int = BROKERS) -> MetadataStateMachine:
    """A state machine holding ``brokers`` active brokers and ``topics`` x ``partitions``."""
    fsm = MetadataStateMachine()
    seq = 0

    def apply(command: Any) -> None:
        nonlocal seq
        seq += 1
        result = fsm.apply_at(fsm.offset + 1, encode_command(command))
        if not result.ok:
            raise RuntimeError(f"build refused: {result.code} {result.message}")

    for b in range(brokers):
        apply(RegisterBroker(request_id=RequestId("scale-build", seq + 1), broker_id=b,
                             endpoint=f"broker-{b}.example:9092", rack=f"rack-{b % RACKS}",
                             incarnation_id=str(uuid.UUID(int=b + 1)), fenced=False))
    for t in range(topics):
        apply(CreateTopic(request_id=RequestId("scale-build", seq + 1), name=f"topic-{t:06d}",
                          topic_id=str(uuid.UUID(int=(1 << 64) + t)), partitions=partitions,
                          replication_factor=3, config={}, placement_offset=t * 7919))
    return fsm


def build_snapshot(topics: int, members: dict[str, str], out: Path,
                   probe_gc: bool = True, brokers: int = BROKERS) -> dict[str, Any]:
    """Build the state, write the node snapshot file to ``out``; return timings."""
    figures: dict[str, Any] = {"topics": topics, "partitions": topics * PARTITIONS_PER_TOPIC}
    t0 = time.perf_counter()
    fsm = build_state(topics, brokers=brokers)
    figures["build_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    state = fsm.prepare_snapshot()()
    figures["encode_s"] = round(time.perf_counter() - t0, 3)
    offset = fsm.offset
    header = SnapshotHeader(last_entry=(NOOP_ENTRY, offset, 1),
                            prev_entry=(NOOP_ENTRY, offset - 1, 1),
                            members=tuple(sorted(members.items())))
    blob = pack_snapshot(header, state)
    out.write_bytes(blob)
    figures.update(offset=offset, state_bytes=len(state), file_bytes=len(blob))
    del fsm
    gc.collect()
    if probe_gc:
        restored = MetadataStateMachine()
        t0 = time.perf_counter()
        restored.restore(state)
        figures["restore_s"] = round(time.perf_counter() - t0, 3)
        figures["gc_objects"] = len(gc.get_objects())
        t0 = time.perf_counter()
        gc.collect()
        figures["full_gc_pause_s"] = round(time.perf_counter() - t0, 3)
        gc.freeze()
        t0 = time.perf_counter()
        gc.collect()
        figures["full_gc_pause_after_freeze_s"] = round(time.perf_counter() - t0, 4)
        gc.unfreeze()
    return figures


# -- the cluster ------------------------------------------------------------------


def _members_only(cluster: LocalCluster, node_ids: Sequence[str]) -> None:
    """Rewrite the configs of ``node_ids`` so their [cluster] lists only them."""
    keep = set(node_ids)
    for node_id in node_ids:
        path = cluster.nodes[node_id].config_path
        lines = path.read_text(encoding="utf-8").splitlines()
        head = lines.index("[cluster]")
        members = [ln for ln in lines[head + 1:] if ln.split("=", 1)[0].strip() in keep]
        path.write_text("\n".join(lines[:head + 1] + members) + "\n", encoding="utf-8")


def _install(directory: Path, blob: bytes) -> None:
    """Make ``directory`` a node data dir holding the snapshot and term 1."""
    storage = DiskStorage(directory)
    storage.open()
    storage.set_term(1, None)
    storage.sync()
    storage.save_snapshot(blob)
    storage.close()


def _ready(cluster: LocalCluster, node_id: str, applied: int) -> bool:
    status = cluster.status(node_id, timeout=1.0)
    return bool(status and status.get("leader_id") and status["applied_index"] >= applied)


def _metric(cluster: LocalCluster, node_id: str, name: str) -> tuple[float | None, float]:
    """One metric of a node's /metrics, and how long the scrape took."""
    node = cluster.nodes[node_id]
    t0 = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", node.api_port, timeout=60)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    took = time.monotonic() - t0
    match = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
    return (float(match.group(1)) if match else None), took


class _TermWatch:
    """Polls every member's term and leader in the background; counts changes."""

    def __init__(self, cluster: LocalCluster, node_ids: Sequence[str],
                 interval: float = 0.2) -> None:
        self.cluster, self.node_ids, self.interval = cluster, list(node_ids), interval
        self.terms: dict[str, int] = {}
        self.leaders: list[tuple[float, str | None]] = []
        self.start_term = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _TermWatch:
        self._poll()
        self.start_term = max(self.terms.values(), default=0)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _poll(self) -> None:
        for node_id in self.node_ids:
            status = self.cluster.status(node_id, timeout=1.0)
            if status:
                self.terms[node_id] = max(self.terms.get(node_id, 0), status["term"])
                if status["state"] == "leader" and (not self.leaders
                                                    or self.leaders[-1][1] != node_id):
                    self.leaders.append((time.monotonic(), node_id))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._poll()

    def elections(self) -> int:
        """Term increments seen (each election bumps the term at least once)."""
        return max(self.terms.values(), default=0) - self.start_term


def _create_latency(caller: HttpCaller, count: int, tag: str) -> dict[str, Any]:
    latencies = []
    for i in range(count):
        t0 = time.monotonic()
        caller.request("POST", "/v1/topics", {"name": f"{tag}-{i}", "partitions": 3,
                                              "replication_factor": 3})
        latencies.append(time.monotonic() - t0)
    return summarize(latencies)


def measure_size(base: Path, topics: int, *, creates: int, log: Log) -> dict[str, Any]:
    """Every figure for one size. ``topics == 0``: the empty baseline."""
    row: dict[str, Any] = {"topics": topics, "partitions": topics * PARTITIONS_PER_TOPIC}
    with LocalCluster(4, base, app="metadata", settings=BENCH_SETTINGS) as cluster:
        voters = ["n1", "n2", "n3"]
        _members_only(cluster, voters)
        members = {n: cluster.nodes[n].raft_address for n in voters}
        snapshot = base / "snapshot.bin"
        build = subprocess.run(
            [sys.executable, "-m", "streambus_consensus.bench.scale", "build",
             "--topics", str(topics), "--members", json.dumps(members), "--out", str(snapshot)],
            capture_output=True, text=True, timeout=600, check=False)
        if build.returncode != 0:
            raise RuntimeError(f"offline build failed: {build.stderr[-2000:]}")
        row["offline"] = json.loads(build.stdout.strip().splitlines()[-1])
        offset = row["offline"]["offset"]
        log(f"  {row['partitions']:>9} partitions: built offline in "
            f"{row['offline']['build_s']}s, snapshot {row['offline']['file_bytes'] / 1e6:.1f} MB, "
            f"encode {row['offline']['encode_s']}s, restore {row['offline'].get('restore_s')}s, "
            f"full GC pause {row['offline'].get('full_gc_pause_s')}s")
        blob = snapshot.read_bytes()
        for node_id in voters:
            _install(cluster.nodes[node_id].directory / "data", blob)
        del blob

        t0 = time.monotonic()
        cluster.start(*voters, wait=False)
        for node_id in voters:
            wait_until(functools.partial(_ready, cluster, node_id, offset), 300,
                       f"{node_id} ready", interval=0.1)
        row["cold_start_all_s"] = round(time.monotonic() - t0, 2)
        leader = cluster.wait_for_leader(60)
        api = cluster.nodes[leader].api_address
        caller = HttpCaller(api, cluster.secret, timeout=60)
        caller.request("POST", "/v1/brokers", {"broker_id": 1000, "endpoint": "x:1",
                                               "fenced": False})
        row["create_topic"] = _create_latency(caller, creates, "scale")
        row["rss_mb"] = {n: round(cluster.rss_bytes(n) / 2**20, 1) for n in voters}
        log(f"    cold start of 3 members {row['cold_start_all_s']}s; create_topic p50 "
            f"{row['create_topic'].get('p50_ms')} ms p99 {row['create_topic'].get('p99_ms')} ms; "
            f"RSS {row['rss_mb']}")

        # A snapshot taken by the running leader (background encode + write + fsync).
        before, _ = _metric(cluster, leader, "streambus_consensus_snapshots_total")
        caller.request("POST", "/v1/snapshot")
        t0 = time.monotonic()
        scrape_times = []
        while True:
            count, took = _metric(cluster, leader, "streambus_consensus_snapshots_total")
            scrape_times.append(took)
            if count is not None and count > (before or 0):
                break
            if time.monotonic() - t0 > 120:
                raise TimeoutError("the leader took no snapshot within 120s")
            time.sleep(0.2)
        seconds, _ = _metric(cluster, leader, "streambus_consensus_last_snapshot_duration_seconds")
        size, _ = _metric(cluster, leader, "streambus_consensus_last_snapshot_size_bytes")
        row["cluster_snapshot"] = {"seconds": seconds, "bytes": size,
                                   "observed_s": round(time.monotonic() - t0, 2)}
        row["metrics_scrape_s"] = round(statistics_median(scrape_times), 3)

        # Restart-to-ready of one follower from its data dir.
        follower = next(n for n in voters if n != leader)
        commit = (cluster.status(leader) or {}).get("commit_index", offset)
        cluster.kill(follower)
        with _TermWatch(cluster, [n for n in voters if n != follower]) as watch:
            t0 = time.monotonic()
            cluster.start(follower, wait=False)
            wait_until(lambda: _ready(cluster, follower, commit), 300, "restarted member ready",
                       interval=0.1)
            row["restart_to_ready_s"] = round(time.monotonic() - t0, 2)
            settle = time.monotonic() + 3.0
            while time.monotonic() < settle:
                time.sleep(0.2)
        row["restart_elections"] = watch.elections()
        row["rss_mb_restarted"] = round(cluster.rss_bytes(follower) / 2**20, 1)
        log(f"    leader snapshot {row['cluster_snapshot']}; metrics scrape "
            f"{row['metrics_scrape_s']}s; restart-to-ready {row['restart_to_ready_s']}s, "
            f"elections meanwhile: {row['restart_elections']}")

        # Catch-up of a new, empty member; watch for elections meanwhile.
        leader = cluster.wait_for_leader(60)
        api = cluster.nodes[leader].api_address
        caller = HttpCaller(api, cluster.secret, timeout=60)
        cluster.start("n4", wait=True)
        with _TermWatch(cluster, voters) as watch:
            target = (cluster.status(leader) or {}).get("commit_index", offset)
            t0 = time.monotonic()
            caller.request("POST", "/v1/members", {"node_id": "n4",
                                                   "address": cluster.nodes["n4"].raft_address})
            wait_until(lambda: _ready(cluster, "n4", target), 300, "the new member caught up",
                       interval=0.1)
            row["catch_up_s"] = round(time.monotonic() - t0, 2)
            settle = time.monotonic() + 5.0
            while time.monotonic() < settle:
                time.sleep(0.2)
        row["catch_up_elections"] = watch.elections()
        row["catch_up_leaders"] = [n for _, n in watch.leaders]
        row["rss_mb_new_member"] = round(cluster.rss_bytes("n4") / 2**20, 1)
        log(f"    new member caught up in {row['catch_up_s']}s; elections meanwhile: "
            f"{row['catch_up_elections']} (leaders seen {row['catch_up_leaders']}); "
            f"its RSS {row['rss_mb_new_member']} MB")
        caller.close()
    snapshot.unlink(missing_ok=True)
    return row


def statistics_median(values: Sequence[float]) -> float:
    """Median, 0 for none."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def run(base: Path, *, sizes: Sequence[int] = (0, 10_000, 100_000, 1_000_000),
        creates: int = 200, log: Log = print) -> dict[str, Any]:
    """The whole section, one size after the other (sizes in partitions)."""
    rows = []
    for partitions in sizes:
        topics = partitions // PARTITIONS_PER_TOPIC
        rows.append(measure_size(base / f"p{partitions}", topics, creates=creates, log=log))
    return {"partitions_per_topic": PARTITIONS_PER_TOPIC, "brokers": BROKERS,
            "replication_factor": 3, "creates": creates, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    """Command line entry point (``build`` is the child-process step)."""
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["build"]:
        parser = argparse.ArgumentParser(prog="scale build")
        parser.add_argument("--topics", type=int, required=True)
        parser.add_argument("--members", required=True)
        parser.add_argument("--out", required=True)
        parser.add_argument("--brokers", type=int, default=BROKERS)
        parser.add_argument("--no-gc-probe", action="store_true")
        args = parser.parse_args(argv[1:])
        figures = build_snapshot(args.topics, json.loads(args.members), Path(args.out),
                                 probe_gc=not args.no_gc_probe, brokers=args.brokers)
        print(json.dumps(figures), flush=True)
        return 0
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[0, 10_000, 100_000],
                        help="partition counts (default 0 10000 100000)")
    parser.add_argument("--creates", type=int, default=100)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="streambus-bench-scale-") as tmp:
        result = run(Path(tmp), sizes=args.sizes, creates=args.creates)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
