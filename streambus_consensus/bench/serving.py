"""Coalesced proposals and ReadIndex reads, before against after, in one run (a script).

Embedded, as in ``create_topic --mode embedded``: two node processes and the
bench process itself as the third voter, which leads; callers are threads of
the bench process calling the store (or the node) directly. fsync is on.

Two clusters, one after the other:

- **metadata**: ``create_topic`` (3 partitions, RF 3, on 3 heartbeating
  brokers) and linearizable ``describe_topic``, at 1 and 32 callers. The
  cluster is at metadata version 2 (batches allowed).
- **kv**: ``set`` and linearizable ``get``, at 1 and 32 callers.

Each figure is measured in both modes, alternated within every round
(``--rounds``, order rotated) so a noisy machine hits both alike; medians
over rounds are quoted with the after/before ratio:

- ``before``: one log entry per command (``max_batch_commands = 1``) and a
  linearizable read as a command through the log, as before ReadIndex;
- ``after``: coalesced proposals and ReadIndex reads.

Run: ``python -m streambus_consensus.bench.serving [--seconds 2] [--rounds 3]
[--json PATH]``
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import NodeConfig
from ..errors import ConsensusError
from ..kv import KeyValueStateMachine, kv_command
from ..metadata.commands import BATCHED_ENTRIES_VERSION, Read
from ..metadata.store import MetadataStore
from ..raft.node import RaftNode
from ..testing.harness import LocalCluster, wait_until
from .common import closed_loop
from .create_topic import _heartbeating, _transfer

__all__ = ["main", "run"]

MODES = ("before", "after")
Log = Callable[[str], None]
Call = Callable[[int, int], object]


def _figure(call: Call, callers: int, seconds: float) -> dict[str, Any]:
    summary = closed_loop(call, callers, seconds).summary()
    return {k: summary.get(k) for k in ("ops_per_s", "p50_ms", "p99_ms", "errors")
            if summary.get(k) is not None}


def _figures(write_name: str, write: Call, callers: tuple[int, ...], read_name: str,
             reads: tuple[Call, Call], read_callers: tuple[int, ...],
             seconds: float) -> dict[str, dict[str, Callable[[], dict[str, Any]]]]:
    """The figures of one cluster: writes at each caller count (the same call in
    both modes), reads at each of ``read_callers`` (the old path before,
    ReadIndex after)."""
    figures: dict[str, dict[str, Callable[[], dict[str, Any]]]] = {}
    for c in callers:
        figures[f"{write_name} {c} callers"] = dict.fromkeys(
            MODES, functools.partial(_figure, write, c, seconds))
    for c in read_callers:
        figures[f"{read_name} {c} callers"] = {
            mode: functools.partial(_figure, call, c, seconds)
            for mode, call in zip(MODES, reads, strict=True)}
    return figures


def _rounds(figures: dict[str, dict[str, Callable[[], dict[str, Any]]]], rounds: int,
            set_mode: Callable[[str], None], log: Log) -> dict[str, dict[str, Any]]:
    """Run every figure in both modes ``rounds`` times; medians and ratios."""
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {
        name: {m: [] for m in MODES} for name in figures}
    for r in range(rounds):
        order = MODES if r % 2 == 0 else MODES[::-1]
        for mode in order:
            set_mode(mode)
            for name, measure in figures.items():
                row = measure[mode]()
                raw[name][mode].append(row)
                log(f"  round {r + 1} {mode:6} {name:24} {row.get('ops_per_s', 0):9.1f} ops/s"
                    f"  p50 {row.get('p50_ms', 0):7.2f} ms"
                    + (f"  errors {row['errors']}" if row.get("errors") else ""))
    out: dict[str, dict[str, Any]] = {}
    for name, measured in raw.items():
        entry: dict[str, Any] = {}
        for mode, rows in measured.items():
            entry[mode] = {key: round(statistics.median(r[key] for r in rows), 3)
                           for key in ("ops_per_s", "p50_ms", "p99_ms")
                           if all(isinstance(r.get(key), int | float) for r in rows)}
            entry[mode]["rounds"] = rows
        before, after = entry["before"].get("ops_per_s"), entry["after"].get("ops_per_s")
        if before and after:
            entry["throughput_ratio"] = round(after / before, 2)
        out[name] = entry
    return out


def _metadata(base: Path, callers: tuple[int, ...], read_callers: tuple[int, ...],
              seconds: float, rounds: int, log: Log) -> dict[str, Any]:
    with LocalCluster(3, base, app="metadata",
                      settings={"broker_session_timeout": 86_400.0}) as cluster:
        config = NodeConfig.from_toml(cluster.nodes["n1"].config_path)
        cluster.start("n2", "n3")
        store = MetadataStore.open(config)
        try:
            wait_until(lambda: store.node.leader_id, 30, "a leader")
            _transfer(cluster, store, store.node.node_id)
            epochs = {b.broker_id: b.broker_epoch for b in (
                store.register_broker(i, f"bench-broker{i}:9092", rack=f"rack-{i}",
                                      fenced=False) for i in range(3))}
            store.upgrade_metadata_version(BATCHED_ENTRIES_VERSION)
            with _heartbeating(store.heartbeat, epochs):
                store.create_topic("read-me", 3, 3)
                made = iter(range(10**9))

                def create(_thread: int, _i: int) -> None:
                    store.create_topic(f"t{next(made)}", 3, 3)

                def read_before(_thread: int, _i: int) -> None:
                    store.execute(Read(request_id=store.next_request_id(), name="read-me"))

                def read_after(_thread: int, _i: int) -> None:
                    store.describe_topic("read-me", linearizable=True)

                figures = _figures("create_topic", create, callers, "linearizable read",
                                   (read_before, read_after), read_callers, seconds)

                def set_mode(mode: str) -> None:
                    store.node.config.max_batch_commands = 1 if mode == "before" else 256

                result = _rounds(figures, rounds, set_mode, log)
                result["batches"] = {"batches_proposed": store.node.batches_proposed,
                                     "batched_commands": store.node.batched_commands}
                return result
        finally:
            store.close()


def _kv(base: Path, callers: tuple[int, ...], read_callers: tuple[int, ...], seconds: float,
        rounds: int, log: Log) -> dict[str, Any]:
    with LocalCluster(3, base, app="kv") as cluster:
        config = NodeConfig.from_toml(cluster.nodes["n1"].config_path)
        cluster.start("n2", "n3")
        sm = KeyValueStateMachine(batching=True)
        node = RaftNode(config, sm)
        node.start()
        try:
            _lead(cluster, node)
            node.propose(kv_command("set", "read-me", 1))

            def write(thread: int, i: int) -> None:
                node.propose(kv_command("set", f"k{thread}", i))

            def read_before(_thread: int, _i: int) -> None:
                node.propose(kv_command("get", "read-me"))

            def read_after(_thread: int, _i: int) -> None:
                node.read_index()
                sm.get("read-me")

            figures = _figures("kv set", write, callers, "kv linearizable get",
                               (read_before, read_after), read_callers, seconds)

            def set_mode(mode: str) -> None:
                node.config.max_batch_commands = 1 if mode == "before" else 256

            result = _rounds(figures, rounds, set_mode, log)
            result["batches"] = {"batches_proposed": node.batches_proposed,
                                 "batched_commands": node.batched_commands}
            return result
        finally:
            node.stop()


def _lead(cluster: LocalCluster, node: RaftNode) -> None:
    """Move leadership to the in-process node."""
    def moved() -> bool:
        current = node.leader_id
        if current == node.node_id:
            return True
        if current is not None:
            with contextlib.suppress(ConsensusError, OSError):
                cluster.client(current).request("POST", "/v1/leader/transfer",
                                                {"node_id": node.node_id})
        return False

    wait_until(moved, 30, "leadership to move to the bench process", interval=0.5)


def run(base: Path, *, callers: tuple[int, ...] = (1, 32), read_callers: tuple[int, ...] = (1, 32),
        seconds: float = 2.0, rounds: int = 3, log: Log = print) -> dict[str, Any]:
    """Both clusters; see the module docstring."""
    started = time.monotonic()
    return {
        "seconds_per_point": seconds, "rounds": rounds,
        "metadata": _metadata(base / "metadata", callers, read_callers, seconds, rounds, log),
        "kv": _kv(base / "kv", callers, read_callers, seconds, rounds, log),
        "elapsed_s": round(time.monotonic() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="streambus-bench-serving-") as tmp:
        result = run(Path(tmp), seconds=args.seconds, rounds=args.rounds)
    print(f"\n{'figure':38} {'before':>10} {'after':>10} {'ratio':>6}  (ops/s, medians)")
    for cluster in ("metadata", "kv"):
        for name, entry in result[cluster].items():
            if name == "batches":
                continue
            print(f"{name:38} {entry['before'].get('ops_per_s', 0):10.1f} "
                  f"{entry['after'].get('ops_per_s', 0):10.1f} "
                  f"{entry.get('throughput_ratio', 0):6.2f}")
        print(f"{cluster} batches: {result[cluster]['batches']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
