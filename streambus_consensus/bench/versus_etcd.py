"""Side by side with etcd: create_topic and linearizable reads, one run, systems interleaved.

Three systems run on this machine for the whole section, each with three
members on 127.0.0.1 and fsync on (every system's default):

- **etcd** 3.4 (the distribution's ``etcd-server``; installed with apt-get by
  :func:`~.etcd.ensure_etcd` when missing, else the section is skipped with
  one line saying why), reached through its v3 JSON gateway;
- **ours over HTTP**: three ``node run --app metadata`` processes
  (:class:`~streambus_consensus.testing.harness.LocalCluster`), reached with
  :class:`~streambus_consensus.client.ApiClient`;
- **ours embedded**: this process is one voting member and the leader
  (:class:`~streambus_consensus.metadata.MetadataStore`, as a broker embedding
  the store would run it) with two node processes as the other members.

Operations. *create*: ours = ``create_topic`` of a new topic (3 partitions,
RF 3, six brokers in three racks); etcd = a txn that puts the key
``topics/NAME`` only if it does not exist (``create_revision == 0``), as a
create that must not overwrite, with a value of the JSON record a topic of 3
partitions would be (:func:`~._load.topic_value`). *read*: a linearizable
read of one topic: ours = ``describe_topic(linearizable=True)`` (HTTP
``GET /v1/topics/NAME?linearizable=1``); etcd = ``/v3/kv/range`` of its key
with ``serializable`` false (etcd's default, a ReadIndex read).

The HTTP callers of etcd and of our API are the same machinery
(:class:`~._load.LoadPool`): worker processes with threads, one kept-alive
connection per caller, aimed at the leader. Embedded callers are threads of
this process (that is what embedding means). Rounds interleave the systems
(etcd, ours over HTTP, ours embedded, then the two ceilings, repeat) so that
drifts of a shared machine fall on all of them; each figure is the median
over rounds.

**Load generator ceiling.** The callers share the machine's two cores with
the servers, so part of each HTTP figure may be the callers' own limit. The
same callers, at the same caller counts, are also pointed at a server in a
process of its own that answers every request at once with the bytes etcd or
our node sent for that kind of request (:class:`~._canned.CannedServer`):
``etcd_ceiling`` with etcd's callers and etcd's answers, ``http_ceiling``
with ours. The ceiling is what the callers could drive here with a server
that does no work (its own CPU is reported); ``ceiling_vs_etcd`` is the
etcd-caller ceiling's ops/s over etcd's, ``ceiling_vs_http`` ours.

Run alone: ``python -m streambus_consensus.bench.versus_etcd [--rounds 3] [--seconds 3]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from ..metadata.commands import supported_metadata_versions
from ..metadata.store import MetadataStore
from ..testing.harness import LocalCluster
from ._canned import CannedServer, capture
from ._load import LoadPool, Target, topic_value
from ._peer import sample_command
from .common import HttpCaller, closed_loop
from .etcd import (
    EtcdCaller,
    EtcdCluster,
    create_body,
    ensure_etcd,
    etcd_version,
    range_body,
)
from .latency import BENCH_SETTINGS, READ_TOPIC, embedded_config, lead_from, register_brokers

__all__ = ["CEILINGS", "SYSTEMS", "TARGETS", "ceilings", "main", "run", "targets"]

SYSTEMS = ("etcd", "http", "embedded", "etcd_ceiling", "http_ceiling")
"""In the order each round runs them (the ceilings: the same callers against
:class:`~._canned.CannedServer`)."""
CEILINGS = {"etcd_ceiling": "etcd", "http_ceiling": "http"}
"""Each ceiling and the system whose callers and answers it uses."""

Log = Callable[[str], None]

TARGETS: tuple[tuple[str, str, str, float], ...] = (
    ("HTTP create_topic >= 2x etcd ops/s at 32 callers", "http_create_many_vs_etcd", ">=", 2.0),
    ("HTTP linearizable reads >= 3x etcd ops/s at 32 callers", "http_read_many_vs_etcd", ">=",
     3.0),
    ("HTTP create_topic 1-caller p50 <= etcd's", "http_create_one_p50_vs_etcd", "<=", 1.0),
    ("embedded create_topic >= 3x etcd ops/s at 32 callers", "embedded_create_many_vs_etcd",
     ">=", 3.0),
    ("embedded create_topic 1-caller p50 <= 1.5 ms", "embedded_create_one_p50_ms", "<=", 1.5),
)
"""Issue 10's targets: (label, key in ``ratios``, comparison, bound)."""


def _points(callers: int) -> list[tuple[str, int]]:
    return [("create", callers), ("create", 1), ("read", callers), ("read", 1)]


HIGHEST = supported_metadata_versions()[1]
"""The metadata version both of our clusters run at (a new cluster starts there)."""
_CEILING_PROBE = "ceiling-probe"
"""The topic (and etcd key) created once to capture a create's answer."""


class _Systems:
    """The three systems, started once for the whole section."""

    def __init__(self, stack: ExitStack, base: Path, binary: str, log: Log) -> None:
        self.etcd = stack.enter_context(EtcdCluster(binary, base / "etcd"))
        self.etcd.start()
        leader = self.etcd.leader()
        self.etcd_address = self.etcd.address(leader)
        EtcdCaller(self.etcd_address).put(f"topics/{READ_TOPIC}", topic_value(READ_TOPIC))
        log(f"  etcd: 3 members up, leader {leader}")

        self.http = stack.enter_context(LocalCluster(3, base / "http", app="metadata",
                                                     settings=BENCH_SETTINGS))
        self.http.start()
        self.http_leader = self.http.wait_for_leader(30)
        self.http_address = self.http.nodes[self.http_leader].api_address
        setup = HttpCaller(self.http_address, self.http.secret)
        # A new cluster starts at this release's highest metadata version (writes
        # are coalesced); this waits until the leader has applied it, and checks.
        setup.request("POST", "/v1/features", {"metadata_version": HIGHEST})
        register_brokers(setup)
        setup.request("POST", "/v1/topics", {"name": READ_TOPIC, "partitions": 3,
                                             "replication_factor": 3})
        log(f"  ours over HTTP: 3 node processes up, leader {self.http_leader}")

        self.embedded = stack.enter_context(LocalCluster(3, base / "embedded", app="metadata",
                                                         settings=BENCH_SETTINGS))
        self.embedded.start(*[n for n in self.embedded.nodes if n != "n1"])
        self.store = MetadataStore.open(embedded_config(self.embedded))
        stack.callback(self.store.close)
        self.store.node.wait_for_leader(30)
        for attempt in range(5):
            try:
                lead_from(self.embedded, self.store, timeout=10 if attempt < 4 else 30)
                break
            except TimeoutError:
                if attempt == 4:
                    raise
        self.store.upgrade_metadata_version(HIGHEST)
        for i in range(6):
            self.store.register_broker(i, f"127.0.0.1:{19092 + i}", rack=f"rack-{i % 3}",
                                       fenced=False)
        self.store.create_topic(READ_TOPIC, 3, 3)
        log("  ours embedded: this process leads, 2 node processes follow")

        secret = self.http.secret
        answers = {
            b"POST /v3/kv/txn ": capture(self.etcd_address, "POST", "/v3/kv/txn", create_body(
                f"topics/{_CEILING_PROBE}", topic_value(_CEILING_PROBE))),
            b"POST /v3/kv/range ": capture(self.etcd_address, "POST", "/v3/kv/range",
                                           range_body(f"topics/{READ_TOPIC}")),
            b"POST /v1/topics ": capture(self.http_address, "POST", "/v1/topics", {
                "name": _CEILING_PROBE, "partitions": 3, "replication_factor": 3},
                secret=secret),
            b"GET /v1/topics/": capture(self.http_address, "GET",
                                        f"/v1/topics/{READ_TOPIC}?linearizable=1",
                                        secret=secret),
        }
        self.canned = stack.enter_context(CannedServer(answers))
        log(f"  load generator ceiling: canned answers of {self.canned.answer_bytes} bytes "
            f"from a process of its own on {self.canned.address}")

    def terms(self) -> dict[str, int | None]:
        """Each system's current Raft term (a rise during the run = an election)."""
        status = self.http.status(self.http_leader) or {}
        return {"etcd": self.etcd.raft_term(), "http": status.get("term"),
                "embedded": self.store.node.term}

    def target(self, system: str, op: str, tag: str) -> Target:
        """A load target of the etcd or HTTP system, or of their ceilings."""
        if system in CEILINGS:
            return Target(CEILINGS[system], self.canned.address, op, tag,
                          secret=self.http.secret)
        if system == "etcd":
            return Target("etcd", self.etcd_address, op, tag)
        return Target("http", self.http_address, op, tag, secret=self.http.secret)

    def embedded_call(self, op: str, tag: str) -> Callable[[int, int], object]:
        """What an embedded caller thread calls."""
        store = self.store
        if op == "create":
            def create(thread: int, i: int) -> object:
                return store.create_topic(f"{tag}-{thread}-{i}", 3, 3)
            return create

        def read(thread: int, i: int) -> object:
            return store.describe_topic(READ_TOPIC, linearizable=True)
        return read


def _median(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if isinstance(r.get(key), int | float)]
    return round(statistics.median(values), 3) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def targets(figures: dict[str, dict[str, dict[str, Any]]]) -> dict[str, float | None]:
    """The ratios (and the one absolute figure) the targets are stated in."""
    def fig(system: str, point: str, key: str) -> float | None:
        value = figures.get(system, {}).get(point, {}).get(key)
        return value if isinstance(value, int | float) else None

    out: dict[str, float | None] = {}
    for system in ("http", "embedded"):
        out[f"{system}_create_many_vs_etcd"] = _ratio(fig(system, "create_many", "ops_per_s"),
                                                      fig("etcd", "create_many", "ops_per_s"))
        out[f"{system}_read_many_vs_etcd"] = _ratio(fig(system, "read_many", "ops_per_s"),
                                                    fig("etcd", "read_many", "ops_per_s"))
        out[f"{system}_create_one_p50_vs_etcd"] = _ratio(fig(system, "create_one", "p50_ms"),
                                                         fig("etcd", "create_one", "p50_ms"))
        out[f"{system}_read_one_p50_vs_etcd"] = _ratio(fig(system, "read_one", "p50_ms"),
                                                       fig("etcd", "read_one", "p50_ms"))
    out["embedded_create_one_p50_ms"] = fig("embedded", "create_one", "p50_ms")
    return out


def ceilings(figures: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per point: each system's ops/s beside its callers' ceiling, and their ratio
    (ceiling ops/s / the system's ops/s; near 1 = that figure is the callers' limit)."""
    out: dict[str, dict[str, Any]] = {}
    for point in figures.get("etcd", {}):
        row: dict[str, Any] = {}
        for ceiling, system in CEILINGS.items():
            measured = figures.get(system, {}).get(point, {}).get("ops_per_s")
            top = figures.get(ceiling, {}).get(point, {}).get("ops_per_s")
            row[f"{system}_ops_per_s"] = measured
            row[f"{ceiling}_ops_per_s"] = top
            row[f"ceiling_vs_{system}"] = _ratio(top, measured)
        out[point] = row
    return out


def verdicts(ratios: dict[str, float | None]) -> list[dict[str, Any]]:
    """Each target of :data:`TARGETS` with its figure and whether it is met."""
    out = []
    for label, key, op, bound in TARGETS:
        value = ratios.get(key)
        met = None if value is None else (value >= bound if op == ">=" else value <= bound)
        out.append({"target": label, "key": key, "value": value, "met": met})
    return out


def run(base: Path, *, rounds: int = 3, seconds: float = 3.0, callers: int = 32,
        procs: int = 2, install: bool = True, log: Log = print) -> dict[str, Any]:
    """The whole section; ``{"skipped": why}`` when etcd cannot be had."""
    binary, how = ensure_etcd(log, install=install)
    if binary is None:
        log(f"  etcd: SKIPPED: {how}")
        return {"skipped": how}
    version = etcd_version(binary)
    log(f"  etcd: {version} ({how})")
    points = _points(callers)
    per_round: dict[str, dict[str, list[dict[str, Any]]]] = {
        s: {f"{op}_{'one' if n == 1 else 'many'}": [] for op, n in points} for s in SYSTEMS}
    with ExitStack() as stack:
        systems = _Systems(stack, base, binary, log)
        terms_before = systems.terms()
        pool = stack.enter_context(LoadPool(procs))
        for r in range(rounds):
            for system in SYSTEMS:
                for op, n in points:
                    point = f"{op}_{'one' if n == 1 else 'many'}"
                    tag = f"{system[0]}{r}{op[0]}{n}-{time.monotonic_ns() % 10**9}"
                    cpu: list[float | None] = []
                    server_cpu = None
                    if system == "embedded":
                        result = closed_loop(systems.embedded_call(op, tag), n, seconds)
                    else:
                        cpu0, wall0 = systems.canned.cpu_seconds(), time.monotonic()
                        result, cpu = pool.run(systems.target(system, op, tag), n, seconds)
                        cpu1, wall = systems.canned.cpu_seconds(), time.monotonic() - wall0
                        if system in CEILINGS and cpu0 is not None and cpu1 is not None:
                            server_cpu = round((cpu1 - cpu0) / wall, 3)
                    row = {"round": r + 1, **result.summary()}
                    if cpu:
                        row["client_cpu"] = cpu
                    if server_cpu is not None:
                        row["server_cpu"] = server_cpu
                    per_round[system][point].append(row)
                    log(f"  round {r + 1} {system:8} {op:6} {n:2} caller(s): "
                        f"{row.get('ops_per_s', 0):8.1f} ops/s  p50 {row.get('p50_ms', 0):7.2f} ms"
                        f"  p99 {row.get('p99_ms', 0):7.2f} ms"
                        + (f"  client CPU {cpu}" if cpu and n > 1 else "")
                        + (f"  server CPU {server_cpu}" if server_cpu is not None else "")
                        + (f"  errors {row['errors']}" if "errors" in row else ""))
        terms_after = systems.terms()
        answer_bytes = systems.canned.answer_bytes
    figures: dict[str, dict[str, dict[str, Any]]] = {}
    for system, by_point in per_round.items():
        figures[system] = {}
        for point, rows in by_point.items():
            figures[system][point] = {
                "callers": rows[0]["callers"] if rows else None,
                **{k: _median(rows, k) for k in ("ops_per_s", "p50_ms", "p99_ms")},
                "errors": sum(sum(r.get("errors", {}).values()) for r in rows),
                "rounds": rows}
    ratios = targets(figures)
    checks = verdicts(ratios)
    for check in checks:
        verdict = "-" if check["met"] is None else ("met" if check["met"] else "NOT met")
        log(f"  target: {check['target']}: {check['value']} -> {verdict}")
    elections: dict[str, int | None] = {}
    for system in terms_before:
        before, after = terms_before[system], terms_after[system]
        elections[system] = after - before if after is not None and before is not None else None
    return {
        "etcd_version": version, "etcd_found": how, "rounds": rounds, "seconds": seconds,
        "callers": callers, "client_procs": procs,
        "etcd_value_bytes": len(topic_value(READ_TOPIC)),
        "our_create_command_bytes": len(sample_command()),
        "figures": figures, "ratios": ratios, "targets": checks,
        "ceiling": ceilings(figures), "ceiling_answer_bytes": answer_bytes,
        "term_changes": elections,
    }


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--callers", type=int, default=32)
    parser.add_argument("--procs", type=int, default=2, help="client worker processes")
    parser.add_argument("--no-install", action="store_true", help="never apt-get etcd")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="streambus-etcd-") as tmp:
        result = run(Path(tmp), rounds=args.rounds, seconds=args.seconds, callers=args.callers,
                     procs=args.procs, install=not args.no_install)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    with contextlib.suppress(KeyError):
        print(json.dumps(result["ratios"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
