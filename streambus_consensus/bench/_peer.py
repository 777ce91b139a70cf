"""One member of a benchmark cluster: raw PySyncObj or our RaftNode, same commands.

Started three times by :mod:`.overhead` (``python -m
streambus_consensus.bench._peer ...``). Every member replicates the same
thing: a dict write of an already-encoded command (the same bytes for every
call), into a dict of 1,000 slots, so the state machine costs next to
nothing and what is measured is the consensus path.

- ``raw``: a plain ``SyncObj`` with one ``@replicated`` method; its own tick
  thread and TCP transport (pickle, no authentication); a journal file and a
  dump file (page cache only: PySyncObj never fsyncs). This module is the one
  place outside :mod:`streambus_consensus.raft` that imports PySyncObj: it is
  the baseline the adapter is compared with.
- ``ours``: :class:`~streambus_consensus.raft.node.RaftNode` with
  :class:`~streambus_consensus.raft.storage.DiskStorage` (``--fsync`` on or
  off), our authenticated transport and the engine fixes.

Both take their timeouts, batching, queue size and compaction threshold from
the same default :class:`~streambus_consensus.config.NodeConfig`.

The member that is leader once every peer is connected runs the load plan
(closed-loop callers and a pipelined window) on itself, writes the figures to
``--out`` and idles; the others just serve. The parent kills them all.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from .. import codec
from ..config import NodeConfig
from ..metadata.commands import CreateTopic, RequestId, encode_command
from ..raft.node import RaftNode
from .common import closed_loop, summarize

SLOTS = 1000


def sample_command() -> bytes:
    """The encoded command every benchmark write carries (a 3-partition create_topic)."""
    return encode_command(CreateTopic(
        request_id=RequestId("bench-client-0123456789", 1_000_000), name="orders.bench-topic",
        topic_id="6f1c2a3e-9b4d-4c21-8e5f-0a1b2c3d4e5f", partitions=3, replication_factor=3,
        config={}, placement_offset=123_456_789))


class DictMachine:
    """Our twin of the raw member's state: ``slots[n % SLOTS] = command``."""

    def __init__(self) -> None:
        self.slots: dict[int, bytes] = {}
        self.count = 0

    def apply(self, command: bytes) -> int:
        """Store the command; return how many were applied."""
        self.slots[self.count % SLOTS] = command
        self.count += 1
        return self.count

    def snapshot(self) -> bytes:
        """The dict and the counter."""
        return codec.encode((self.count, sorted(self.slots.items())))

    def restore(self, data: bytes) -> None:
        """Replace the state."""
        count, items = codec.decode(data)
        self.count, self.slots = count, dict(items)


class _Member:
    """What the load plan needs from either kind of member."""

    def is_leader(self) -> bool:
        raise NotImplementedError

    def term(self) -> int:
        raise NotImplementedError

    def put(self, data: bytes, timeout: float) -> None:
        raise NotImplementedError

    def put_async(self, data: bytes, done: Callable[[bool], None]) -> None:
        raise NotImplementedError

    def counters(self) -> dict[str, Any]:
        return {}


class _Ours(_Member):
    def __init__(self, config: NodeConfig) -> None:
        self.node = RaftNode(config, DictMachine())
        self.fsyncs = 0
        self.node.fsync_observer = self._fsync
        self.node.start()

    def _fsync(self, _seconds: float) -> None:
        self.fsyncs += 1

    def is_leader(self) -> bool:
        return self.node.is_leader

    def term(self) -> int:
        return self.node.term

    def put(self, data: bytes, timeout: float) -> None:
        self.node.propose(data, timeout=timeout)

    def put_async(self, data: bytes, done: Callable[[bool], None]) -> None:
        def finished(future: Future[Any]) -> None:
            done(future.exception() is None)

        self.node.propose_async(data).add_done_callback(finished)

    def counters(self) -> dict[str, Any]:
        return {"fsync_groups": self.fsyncs}


def _raw_member(config: NodeConfig, directory: Path) -> _Member:
    # PySyncObj is imported here only: see the module docstring.
    from pysyncobj import SyncObj, SyncObjConf, replicated

    class RawDict(SyncObj):  # type: ignore[misc]
        def __init__(self, self_address: str, others: list[str], conf: Any) -> None:
            self.slots: dict[int, bytes] = {}
            self.count = 0
            super().__init__(self_address, others, conf)

        @replicated  # type: ignore[untyped-decorator]
        def put(self, data: bytes) -> int:
            self.slots[self.count % SLOTS] = data
            self.count += 1
            return self.count

    conf = SyncObjConf(
        raftMinTimeout=config.election_timeout_min,
        raftMaxTimeout=config.election_timeout_max,
        appendEntriesPeriod=config.heartbeat_interval,
        autoTickPeriod=config.tick_interval,
        appendEntriesUseBatch=config.batch_appends,
        appendEntriesBatchSizeBytes=config.max_append_bytes,
        commandsQueueSize=config.max_pending_proposals,
        leaderFallbackTimeout=config.effective_stepdown_timeout,
        connectionTimeout=max(config.election_timeout_max, 1.0),
        connectionRetryTime=config.connect_retry_interval,
        logCompactionMinEntries=config.snapshot_interval_entries,
        logCompactionMinTime=config.snapshot_interval_seconds,
        journalFile=str(directory / "journal.bin"),
        fullDumpFile=str(directory / "dump.bin"),
        bindAddress=config.cluster[config.node_id],
        dynamicMembershipChange=True,
    )
    others = [a for n, a in config.cluster.items() if n != config.node_id]
    obj = RawDict(config.cluster[config.node_id], others, conf)

    class Raw(_Member):
        def is_leader(self) -> bool:
            return bool(obj._isLeader())

        def term(self) -> int:
            return int(obj.raftCurrentTerm)

        def put(self, data: bytes, timeout: float) -> None:
            obj.put(data, sync=True, timeout=timeout)

        def put_async(self, data: bytes, done: Callable[[bool], None]) -> None:
            obj.put(data, callback=lambda _result, error: done(error == 0))

    return Raw()


def _window(member: _Member, data: bytes, window: int, seconds: float,
            warmup: float = 0.3) -> dict[str, Any]:
    """Keep ``window`` writes in flight for ``seconds``; latency of each."""
    slots = threading.Semaphore(window)
    lock = threading.Lock()
    latencies: list[float] = []
    failed = [0]
    start = time.monotonic() + warmup
    end = start + seconds
    while True:
        if not slots.acquire(timeout=10):
            break
        t0 = time.monotonic()
        if t0 >= end:
            slots.release()
            break

        def done(ok: bool, t0: float = t0) -> None:
            t1 = time.monotonic()
            with lock:
                if not ok:
                    failed[0] += 1
                elif t0 >= start and t1 <= end:
                    latencies.append(t1 - t0)
            slots.release()

        member.put_async(data, done)
    for _ in range(window):  # drain
        slots.acquire(timeout=10)
    out = {"window": window, **summarize(latencies, seconds)}
    if failed[0]:
        out["errors"] = {"failed": failed[0]}
    return out


def _run_plan(member: _Member, plan: list[dict[str, Any]], status: Path) -> list[dict[str, Any]]:
    data = sample_command()
    rows: list[dict[str, Any]] = []
    for phase in plan:
        status.write_text(json.dumps({"pid": os.getpid(), "phase": phase}) + "\n")
        counters = member.counters()
        term = member.term()
        started = time.monotonic()
        if "callers" in phase:
            row = closed_loop(lambda _t, _i: member.put(data, 10.0), phase["callers"],
                              phase["seconds"]).summary()
        else:
            row = _window(member, data, phase["window"], phase["seconds"])
        after = member.counters()
        for key, value in after.items():
            row[key] = value - counters.get(key, 0)
        row["wall_s"] = round(time.monotonic() - started, 2)
        row["term_changed"] = member.term() != term
        row["still_leader"] = member.is_leader()
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run one member until killed."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variant", choices=("raw", "ours"), required=True)
    parser.add_argument("--id", required=True)
    parser.add_argument("--cluster", required=True, help="JSON {id: host:port}")
    parser.add_argument("--dir", required=True)
    parser.add_argument("--fsync", choices=("on", "off"), default="on")
    parser.add_argument("--secret")
    parser.add_argument("--plan", required=True, help="JSON list of phases")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    config = NodeConfig(node_id=args.id, cluster=json.loads(args.cluster),
                        data_dir=str(directory / "data"), cluster_secret=args.secret,
                        fsync=args.fsync == "on").validate()
    member = _Ours(config) if args.variant == "ours" else _raw_member(config, directory)
    out = Path(args.out)
    data = sample_command()
    leader_since: float | None = None
    while not out.exists():
        if member.is_leader():
            leader_since = leader_since or time.monotonic()
            if time.monotonic() - leader_since > 1.0:
                try:
                    member.put(data, 5.0)  # the cluster commits: every peer is there
                except Exception:  # not ready yet (no quorum): try again
                    time.sleep(0.1)
                    continue
                rows = _run_plan(member, json.loads(args.plan), out.with_suffix(".status"))
                tmp = out.with_suffix(".tmp")
                tmp.write_text(json.dumps({"leader": args.id, "rows": rows}) + "\n")
                tmp.replace(out)
                break
        else:
            leader_since = None
        time.sleep(0.05)
    while True:  # serve until the parent kills us
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
