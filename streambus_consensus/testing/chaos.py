"""Fault-injection runs: real node processes, clients recording a history, faults, checks.

::

    python -m streambus_consensus.testing.chaos --duration 900 --seed 7 \\
        [--nodes 3|5] [--profile ci|soak|compaction-pauses] [--keep DIR]

One run:

1. starts a metadata cluster of ``--nodes`` processes on loopback, every
   node-to-node link through the link proxy (:mod:`.faults`), registers
   brokers and creates a probe topic per fault lane;
2. runs the workload (:mod:`.workload`): concurrent clients creating,
   deleting, altering, growing and reading topics through the HTTP API of
   random nodes, with request ids, recording a history; and a change-feed
   follower on every node;
3. for ``--duration`` seconds injects faults from the profile's schedule on
   two lanes that run side by side: a *process* lane (SIGKILL the leader, a
   random node or every node; SIGSTOP the leader or a random node for
   several election timeouts; isolate the leader until it holds writes it
   cannot commit, SIGSTOP it, heal its links, write through the others until
   they compact past it, resume it; graceful restarts) and a *network* lane
   (isolate the leader, split a minority from the majority, cut one
   direction of one link). After healing each fault the lane writes to its
   probe topic until a write succeeds: that is the fault's recovery time;
4. heals everything, stops the clients and checks:

   - **converged**: once every node has applied the same index, every node's
     metadata image is identical and, after a forced snapshot, every node's
     ``snapshot.bin`` holds byte-identical state;
   - **no duplicates**: the nodes' change feeds agree at every offset, and no
     change appears more often than operations that could cause it were
     acknowledged or left unknown (:func:`~.workload.check_feeds`);
   - **nothing lost**: every node is SIGKILLed and restarted, then every
     topic is read through the log; those reads are part of the history;
   - **linearizable**: the whole history against
     :func:`~.linearizability.metadata_model`. A topic whose history is only
     illegal because of the reads after the full restart counts as *lost
     acknowledged operations*; one that is only illegal because of reads, as
     *stale reads*.

On failure the run directory (history, fault schedule, report, every node's
log and data directory) is kept and its path printed with the seed. The seed
fixes the schedule (fault kinds, targets by role, durations) and the clients'
choices; the interleaving with the cluster's timing is not reproducible.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import itertools
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConsensusError
from ..metadata.commands import supported_metadata_versions
from ..raft.snapshot import unpack_snapshot
from .harness import LocalCluster
from .linearizability import (
    CheckOutcome,
    CheckResult,
    History,
    Operation,
    check_operations,
    metadata_model,
    save_history,
)
from .workload import (
    FeedCheck,
    FeedRecorder,
    MetadataWorkload,
    NoAnswerError,
    NotSentError,
    WorkloadConfig,
    check_feeds,
)

__all__ = [
    "NETWORK_FAULTS",
    "PROCESS_FAULTS",
    "PROFILES",
    "ChaosOptions",
    "ChaosReport",
    "Fault",
    "Profile",
    "log_alarms",
    "main",
    "run_chaos",
]

PROCESS_FAULTS = ("kill-leader", "kill-random", "kill-all", "pause-leader", "pause-random",
                  "pause-isolated-leader", "restart-random")
"""Faults of the process lane."""
NETWORK_FAULTS = ("partition-leader", "partition-split", "partition-one-way")
"""Faults of the network lane."""

UNSAFE_ENV = "STREAMBUS_CONSENSUS_UNSAFE_DISABLE_ENGINE_FIXES"
RECOVERY_LIMIT = 60.0
"""A fault whose cluster cannot take a write this long after healing fails the run."""


@dataclass(frozen=True, kw_only=True)
class Profile:
    """A kind of run: node settings, which faults, how long they last, the workload."""

    name: str
    """What ``--profile`` calls it."""
    description: str
    """One line for ``--help``."""
    settings: Mapping[str, Any]
    """Node config fields (on top of the defaults)."""
    process_faults: tuple[tuple[str, int], ...]
    """Process-lane faults and their weights (empty: no process lane)."""
    network_faults: tuple[tuple[str, int], ...]
    """Network-lane faults and their weights (empty: no network lane)."""
    hold: tuple[float, float]
    """Seconds a kill, restart or partition lasts (uniform)."""
    pause: tuple[float, float]
    """How long a SIGSTOP lasts, in election timeouts (``election_timeout_max``)."""
    gap: tuple[float, float]
    """Seconds between a lane's recovery and its next fault (uniform)."""
    workload: WorkloadConfig
    """The clients."""


_COMMON = {"broker_session_timeout": 86_400.0}  # the workload's brokers never heartbeat

PROFILES: dict[str, Profile] = {
    "ci": Profile(
        name="ci",
        description="bounded profile for the test suite: every fault kind, short holds",
        settings={**_COMMON, "snapshot_interval_entries": 200},
        process_faults=(("kill-leader", 3), ("kill-random", 2), ("kill-all", 1),
                        ("pause-leader", 3), ("pause-random", 2), ("pause-isolated-leader", 1),
                        ("restart-random", 2)),
        network_faults=(("partition-leader", 3), ("partition-split", 2),
                        ("partition-one-way", 2)),
        hold=(0.6, 1.6),
        pause=(1.5, 2.5),
        gap=(0.0, 0.3),
        workload=WorkloadConfig(clients=4, topics=10, think_time=0.05),
    ),
    "soak": Profile(
        name="soak",
        description="the long run of make chaos: every fault kind, longer holds",
        settings={**_COMMON, "snapshot_interval_entries": 500},
        process_faults=(("kill-leader", 3), ("kill-random", 2), ("kill-all", 1),
                        ("pause-leader", 3), ("pause-random", 2), ("pause-isolated-leader", 2),
                        ("restart-random", 2)),
        network_faults=(("partition-leader", 3), ("partition-split", 2),
                        ("partition-one-way", 2)),
        hold=(1.0, 4.0),
        pause=(2.0, 4.0),
        gap=(0.5, 2.0),
        workload=WorkloadConfig(clients=4, topics=16, think_time=0.05),
    ),
    "compaction-pauses": Profile(
        name="compaction-pauses",
        description="issue 7: compaction every 50 entries, the leader SIGSTOPped for "
                    "2-4 election timeouts, reads and writes through the log",
        settings={**_COMMON, "snapshot_interval_entries": 50, "snapshot_chunk_bytes": 1024,
                  "leader_stepdown_timeout": 1.6, "proposal_timeout": 20.0},
        process_faults=(("pause-leader", 1), ("pause-isolated-leader", 1)),
        network_faults=(),
        hold=(1.0, 2.0),
        pause=(2.0, 4.0),
        gap=(0.3, 1.5),
        # Clients wait out a paused leader (10 s per attempt) instead of moving on:
        # a deposed leader's bogus acknowledgement (E1) only shows if someone waits.
        workload=WorkloadConfig(clients=5, topics=10, think_time=0.03,
                                request_timeout=10.0, write_deadline=30.0,
                                read_deadline=20.0,
                                mix=(("create", 3), ("delete", 2), ("alter", 4),
                                     ("add_partitions", 2), ("read", 6))),
    ),
}


@dataclass(frozen=True, kw_only=True)
class ChaosOptions:
    """One run's parameters."""

    duration: float
    """Seconds of fault injection (setup and checks come on top)."""
    seed: int
    """Seeds the schedule and the clients."""
    nodes: int = 3
    """Cluster size."""
    profile: str = "soak"
    """A key of :data:`PROFILES`."""
    keep: Path | None = None
    """Run here and keep everything, pass or fail (default: a temporary
    directory, kept only on failure)."""
    unsafe_disable_engine_fixes: bool = False
    """Run the nodes without the engine fixes (shows that the checks catch E1)."""
    peer_tls: bool = False
    """Run the cluster traffic over mutual TLS (the APIs the clients use stay plain)."""
    log: Callable[[str], None] | None = None
    """Progress lines (one per fault); ``None`` is quiet."""
    check_timeout: float = 600.0
    """Most seconds the linearizability checker may search."""
    max_faults: int | None = None
    """Stop injecting after this many faults (both lanes together), even before
    ``duration`` is over; ``None``: no limit."""


@dataclass(kw_only=True)
class Fault:
    """One injected fault."""

    kind: str
    """One of :data:`PROCESS_FAULTS` or :data:`NETWORK_FAULTS`."""
    lane: str
    """``process`` or ``network``."""
    targets: tuple[str, ...]
    """Nodes (or links) it hit."""
    started: float
    """Seconds from the start of the fault phase."""
    hold: float = 0.0
    """How long it lasted."""
    healed: float | None = None
    """When it was healed (seconds from the start of the fault phase)."""
    recovery: float | None = None
    """Seconds from healing to the next successful write (``None``: none came)."""
    error: str | None = None
    """What went wrong injecting or healing it."""


@dataclass(kw_only=True)
class ChaosReport:
    """What a run did and found. :meth:`summary` prints it as tables."""

    options: ChaosOptions
    """How it was run."""
    run_dir: Path
    """Where its files are (deleted after a passing run unless kept)."""
    faults: list[Fault] = field(default_factory=list)
    """Every fault, in order."""
    op_counts: dict[str, Counter[str]] = field(default_factory=dict)
    """``{op kind: Counter(ok/fail/unknown)}``."""
    operations: int = 0
    """Operations in the checked history."""
    linearizable: CheckOutcome | None = None
    """The checker's verdict on the whole history."""
    check_seconds: float = 0.0
    """How long the checker took."""
    lost_topics: list[str] = field(default_factory=list)
    """Topics whose history is illegal only with the reads after the full restart."""
    stale_read_topics: list[str] = field(default_factory=list)
    """Topics whose history is illegal only because of reads."""
    violation_topics: list[str] = field(default_factory=list)
    """Topics whose writes alone are not linearizable."""
    explanation: str = ""
    """The checker's account of each illegal topic."""
    feeds: FeedCheck | None = None
    """Change-feed comparison."""
    converged_offset: int | None = None
    """The offset every image was compared at."""
    images_identical: bool | None = None
    """Whether every node's image was identical there."""
    snapshots_identical: bool | None = None
    """Whether every node's snapshot state bytes were identical there."""
    unexpected: list[str] = field(default_factory=list)
    """Answers the clients did not expect."""
    errors: list[str] = field(default_factory=list)
    """Everything else that failed (a node that would not start, no recovery...)."""
    elapsed: float = 0.0
    """Wall time of the whole run."""
    kept: bool = False
    """Whether :attr:`run_dir` was kept."""
    log_alarms: list[str] = field(default_factory=list)
    """Node log lines at CRITICAL or ERROR (``node: line``). Operators are paged
    for these, so a run with any fails; PySyncObj's "truncating
    already-applied log entries" (engine issue E2) is one."""
    engine_fixes: dict[str, float] = field(default_factory=dict)
    serving: dict[str, float] = field(default_factory=dict)
    """Batch entries, batched commands and ReadIndex rounds, summed over the
    nodes since each one's last start (the new write and read paths at work)."""
    """``streambus_consensus_engine_*`` counters summed over the nodes at the end
    of the fault phase (since each node's last start): how often each engine
    fix had to act."""

    @property
    def faults_total(self) -> int:
        """How many faults were injected."""
        return len(self.faults)

    @property
    def lost_acks(self) -> int:
        """Topics with a lost acknowledged operation."""
        return len(self.lost_topics)

    @property
    def stale_reads(self) -> int:
        """Topics with a read that no order explains."""
        return len(self.stale_read_topics)

    @property
    def duplicates(self) -> int:
        """Commands applied more than once, plus feed disagreements and reorderings."""
        if self.feeds is None:
            return 0
        return (len(self.feeds.duplicates) + len(self.feeds.divergent_offsets)
                + self.feeds.out_of_order)

    @property
    def passed(self) -> bool:
        """Every check passed."""
        return (self.linearizable is CheckOutcome.OK and not self.lost_topics
                and not self.stale_read_topics and not self.violation_topics
                and self.feeds is not None and self.feeds.ok
                and self.images_identical is True and self.snapshots_identical is True
                and not self.unexpected and not self.errors and not self.log_alarms)

    def overlapped(self, fault: Fault) -> bool:
        """Whether a fault of the other lane was in force while ``fault``'s
        recovery was measured (from its healing to the next write)."""
        if fault.healed is None or fault.recovery is None:
            return False
        begin, end = fault.healed, fault.healed + fault.recovery
        for other in self.faults:
            if other is fault or other.lane == fault.lane:
                continue
            over = (other.healed if other.healed is not None else math.inf) + (
                other.recovery or 0.0)
            if other.started <= end and over >= begin:
                return True
        return False

    def reproduce_command(self) -> str:
        """The command line that replays this run's schedule."""
        o = self.options
        unsafe = " --unsafe-disable-engine-fixes" if o.unsafe_disable_engine_fixes else ""
        budget = f" --faults {o.max_faults}" if o.max_faults is not None else ""
        tls = " --peer-tls" if o.peer_tls else ""
        return (f"python -m streambus_consensus.testing.chaos --duration {o.duration:g} "
                f"--seed {o.seed} --nodes {o.nodes} --profile {o.profile}{budget}{unsafe}{tls}")

    def summary(self) -> str:
        """The run as text tables."""
        o = self.options
        lines = [f"chaos run: profile={o.profile} nodes={o.nodes} seed={o.seed} "
                 f"duration={o.duration:g}s elapsed={self.elapsed:.0f}s"
                 + (" ENGINE FIXES DISABLED" if o.unsafe_disable_engine_fixes else ""), ""]
        lines.append(f"{'fault':<20}{'count':>6}{'recovery p50':>14}{'p90':>8}{'max':>8}"
                     f"{'none':>6}{'alone n':>9}{'p90':>8}")
        by_kind: dict[str, list[Fault]] = {}
        for fault in self.faults:
            by_kind.setdefault(fault.kind, []).append(fault)
        for kind in (*PROCESS_FAULTS, *NETWORK_FAULTS):
            faults = by_kind.get(kind, [])
            if not faults:
                continue
            times = sorted(f.recovery for f in faults if f.recovery is not None)
            alone = sorted(f.recovery for f in faults
                           if f.recovery is not None and not self.overlapped(f))
            missing = sum(1 for f in faults if f.recovery is None)
            lines.append(f"{kind:<20}{len(faults):>6}{_secs(_quantile(times, 0.5)):>14}"
                         f"{_secs(_quantile(times, 0.9)):>8}"
                         f"{_secs(times[-1] if times else None):>8}{missing:>6}"
                         f"{len(alone):>9}{_secs(_quantile(alone, 0.9)):>8}")
        lines.append(f"{'total':<20}{self.faults_total:>6}")
        lines.append("(alone: recoveries during which the other lane held no fault)")
        lines.append("")
        lines.append(f"{'operation':<16}{'ok':>8}{'failed':>8}{'unknown':>9}")
        totals: Counter[str] = Counter()
        for kind in ("create", "delete", "alter", "add_partitions", "read"):
            counts = self.op_counts.get(kind, Counter())
            totals.update(counts)
            lines.append(f"{kind:<16}{counts['ok']:>8}{counts['fail']:>8}{counts['unknown']:>9}")
        lines.append(f"{'total':<16}{totals['ok']:>8}{totals['fail']:>8}{totals['unknown']:>9}")
        lines.append("")
        verdict = self.linearizable.name if self.linearizable is not None else "not run"
        lines.append(f"linearizable            {verdict} ({self.operations} operations, "
                     f"checked in {self.check_seconds:.1f}s)")
        lines.append(f"lost acknowledged ops   {self.lost_acks}"
                     + (f"  topics {self.lost_topics}" if self.lost_topics else ""))
        lines.append(f"stale reads             {self.stale_reads}"
                     + (f"  topics {self.stale_read_topics}" if self.stale_read_topics else ""))
        if self.violation_topics:
            lines.append(f"other violations        {len(self.violation_topics)}  topics "
                         f"{self.violation_topics}")
        feeds = self.feeds
        if feeds is not None:
            lines.append(f"duplicates              {self.duplicates} ({len(feeds.duplicates)} "
                         f"applied too often, {len(feeds.divergent_offsets)} offsets where "
                         f"replicas differ, {feeds.out_of_order} offsets delivered twice; "
                         f"{feeds.offsets} offsets, {feeds.resets} resets)")
            lines.extend(f"  {d}" for d in feeds.duplicates[:10])
            if feeds.divergent_offsets:
                lines.append(f"  replicas disagree at offsets {list(feeds.divergent_offsets[:10])}")
        if self.engine_fixes:
            fired = ", ".join(f"{name} {value:g}"
                              for name, value in sorted(self.engine_fixes.items()))
            lines.append(f"engine fixes fired      {fired}")
        if self.serving:
            used = ", ".join(f"{name} {value:g}" for name, value in sorted(self.serving.items()))
            lines.append(f"batches and reads       {used}")
        lines.append(f"replicas converged      images {_yes(self.images_identical)}, "
                     f"snapshots {_yes(self.snapshots_identical)} "
                     f"(offset {self.converged_offset})")
        for message in self.unexpected[:10]:
            lines.append(f"unexpected answer       {message}")
        for message in self.errors[:20]:
            lines.append(f"error                   {message}")
        if self.log_alarms:
            lines.append(f"CRITICAL/ERROR in logs  {len(self.log_alarms)}")
            lines.extend(f"  {line}" for line in self.log_alarms[:10])
        lines.append("")
        lines.append(f"result: {'PASS' if self.passed else 'FAIL'}")
        if self.kept:
            lines.append(f"artifacts: {self.run_dir}")
        if not self.passed:
            lines.append(f"reproduce the schedule: {self.reproduce_command()}")
        return "\n".join(lines)


def _quantile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    return values[min(len(values) - 1, int(q * len(values)))]


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s"


def _yes(value: bool | None) -> str:
    return {True: "identical", False: "DIFFER", None: "not compared"}[value]


# --------------------------------------------------------------------------- the run


_SERVING_COUNTERS = frozenset({"proposal_batches_total", "batched_commands_total",
                               "read_index_rounds_total"})
"""Counters of the new write and read paths shown in the report."""


class _Run:
    """Everything one chaos run holds; the lanes call back into it."""

    def __init__(self, options: ChaosOptions, profile: Profile, run_dir: Path) -> None:
        self.options = options
        self.profile = profile
        self.run_dir = run_dir
        env = {UNSAFE_ENV: "1"} if options.unsafe_disable_engine_fixes else {}
        self.cluster = LocalCluster(options.nodes, run_dir / "cluster", app="metadata",
                                    settings=dict(profile.settings), env=env, proxied=True,
                                    tls=options.peer_tls, api_tls=False)
        self.timeout_max = float(profile.settings.get("election_timeout_max", 0.8))
        addresses = {n: node.api_address for n, node in self.cluster.nodes.items()}
        self.history = History()
        self.workload = MetadataWorkload(addresses, self.cluster.secret, self.history,
                                         config=profile.workload, seed=options.seed,
                                         name=f"s{options.seed}")
        self.feeds = FeedRecorder(addresses, self.cluster.secret)
        self.report = ChaosReport(options=options, run_dir=run_dir)
        self.stop = threading.Event()
        self.began = 0.0
        self._lock = threading.Lock()
        self._counter = itertools.count(1)
        self.expected_down: set[str] = set()

    # -- helpers -------------------------------------------------------------------

    def log(self, message: str) -> None:
        if self.options.log is not None:
            self.options.log(f"[{time.monotonic() - self.began:7.1f}s] {message}")

    def error(self, message: str) -> None:
        with self._lock:
            self.report.errors.append(message)
        self.log(f"ERROR {message}")

    def now(self) -> float:
        return time.monotonic() - self.began

    def leader(self) -> str | None:
        """The node claiming leadership in the highest term, if any."""
        best: tuple[int, str] | None = None
        for node in self.cluster.running():
            status = self.cluster.status(node, timeout=1.0)
            if status and status["state"] == "leader":
                candidate = (int(status["term"]), node)
                best = candidate if best is None or candidate > best else best
        return best[1] if best else None

    def call(self, node: str, method: str, path: str, body: Any = None) -> Any:
        answer = self.workload.api.call(self.cluster.nodes[node].api_address, method, path,
                                        body)
        if answer.status != 200:
            raise RuntimeError(f"{node}: {method} {path}: HTTP {answer.status} {answer.error}")
        return answer.result

    def setup_write(self, method: str, path: str, body: dict[str, Any], what: str) -> None:
        """A set-up write, retried (same request id) until it is applied."""
        body = {**body, "request_id": {"client_id": f"setup-{self.options.seed}",
                                       "seq": next(self._counter)}}
        deadline = time.monotonic() + 60
        while True:
            for node in self.cluster.running():
                try:
                    answer = self.workload.api.call(self.cluster.nodes[node].api_address,
                                                    method, path, body)
                except (NotSentError, NoAnswerError):
                    continue
                if answer.status == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"set-up failed: {what}")
            time.sleep(0.3)

    def probe(self, lane: str, healed_at: float) -> float | None:
        """Write to the lane's probe topic until a write succeeds; seconds after healing.

        Each write asks every node whose process runs and is not paused at
        once (one request id, so the copies are one operation), and the
        first success ends it: the recovery is when the cluster takes writes
        again, not when one randomly chosen node does. A node the other
        lane has cut off would otherwise make the probe wait out its 1 s
        attempt, which measures the probe rather than the recovery."""
        limit = healed_at + RECOVERY_LIMIT
        while time.monotonic() < limit:
            value = (60_000, 3_600_000)[next(self._counter) % 2]
            up = [n for n, node in self.cluster.nodes.items() if node.alive and not node.paused]
            record = self.workload.perform(
                f"s{self.options.seed}-probe-{lane}",
                ("alter", f"probe-{lane}", "retention.ms", value), deadline=2.0, timeout=1.0,
                nodes=up or None, fan_out=True)
            if record.outcome == "ok":
                return record.finished - healed_at
        return None

    def write_past(self, lane: str, seconds: float, *, avoid: str) -> None:
        """Write to the lane's probe topic through every node but ``avoid`` for
        ``seconds``, so that the others commit and compact well past whatever
        ``avoid`` holds (compaction every ``snapshot_interval_entries``)."""
        others = [n for n in self.cluster.nodes if n != avoid]
        until = time.monotonic() + seconds
        enough = 2 * int(self.profile.settings.get("snapshot_interval_entries", 10_000)) + 10
        written = 0
        while time.monotonic() < until and not self.stop.is_set():
            if written >= enough:  # two compactions past it; just wait out the pause
                self.stop.wait(until - time.monotonic())
                break
            value = (60_000, 3_600_000)[next(self._counter) % 2]
            record = self.workload.perform(f"s{self.options.seed}-probe-{lane}",
                                           ("alter", f"probe-{lane}", "retention.ms", value),
                                           deadline=1.0, timeout=1.0, nodes=others)
            written += record.outcome == "ok"

    def heal_everything(self) -> None:
        network = self.cluster.network
        if network is not None:
            network.heal()
        for node_id, node in self.cluster.nodes.items():
            if node.paused:
                self.cluster.resume(node_id)
        self.start_nodes(*[n for n, node in self.cluster.nodes.items() if not node.alive])

    def start_nodes(self, *node_ids: str) -> None:
        if not node_ids:
            return
        try:
            self.cluster.start(*node_ids)
        except (RuntimeError, TimeoutError) as exc:
            self.error(f"node did not start: {exc}")
            raise
        finally:
            self.expected_down.difference_update(node_ids)

    def check_crashes(self) -> None:
        """A node that died without being killed is a finding; restart it."""
        for node_id, node in self.cluster.nodes.items():
            if node_id in self.expected_down or node.proc is None or node.alive:
                continue
            self.error(f"{node_id} exited on its own with code {node.proc.poll()}; "
                       f"log: {node.log_path}")
            self.start_nodes(node_id)

    # -- faults --------------------------------------------------------------------

    def inject(self, kind: str, lane: str, rng: random.Random) -> tuple[Fault, Callable[[], None]]:
        cluster = self.cluster
        nodes = list(cluster.nodes)
        hold = rng.uniform(*self.profile.hold)
        started = self.now()

        def pick(role: str) -> str:
            if role == "leader":
                leader = self.leader()
                if leader is not None:
                    return leader
            running = cluster.running()
            return rng.choice(running or nodes)

        if kind in ("kill-leader", "kill-random", "restart-random"):
            target = pick("leader" if kind == "kill-leader" else "random")
            self.expected_down.add(target)
            if kind == "restart-random":
                cluster.stop(target)
            else:
                cluster.kill(target)
            return (Fault(kind=kind, lane=lane, targets=(target,), started=started, hold=hold),
                    lambda: self.start_nodes(target))
        if kind == "kill-all":
            self.expected_down.update(nodes)
            for node in nodes:
                cluster.kill(node)
            return (Fault(kind=kind, lane=lane, targets=tuple(nodes), started=started,
                          hold=hold / 2), lambda: self.start_nodes(*nodes))
        if kind in ("pause-leader", "pause-random"):
            target = pick("leader" if kind == "pause-leader" else "random")
            cluster.pause(target)
            pause = rng.uniform(*self.profile.pause) * self.timeout_max
            return (Fault(kind=kind, lane=lane, targets=(target,), started=started, hold=pause),
                    lambda: cluster.resume(target))
        network = cluster.network
        if network is None:
            raise RuntimeError("network faults need a proxied cluster")
        if kind == "pause-isolated-leader":
            # Issue 7 / engine issue E1: a leader holding entries it could not
            # replicate, paused, deposed, resumed after the others compacted.
            target = pick("leader")
            links = network.isolate(target)
            self.stop.wait(rng.uniform(0.4, 1.2))  # still leading, appending what cannot commit
            cluster.pause(target)
            network.heal(links)
            pause = rng.uniform(*self.profile.pause) * self.timeout_max
            return (Fault(kind=kind, lane=lane, targets=(target,), started=started, hold=pause),
                    lambda: cluster.resume(target))
        if kind == "partition-leader":
            target = pick("leader")
            links = network.isolate(target)
            targets: tuple[str, ...] = (target,)
        elif kind == "partition-split":
            shuffled = rng.sample(nodes, len(nodes))
            minority = shuffled[:rng.randint(1, (len(nodes) - 1) // 2)]
            majority = [n for n in nodes if n not in minority]
            links = network.split(minority, majority)
            targets = (f"{','.join(sorted(minority))}|{','.join(sorted(majority))}",)
        elif kind == "partition-one-way":
            leader = pick("leader")
            other = rng.choice([n for n in nodes if n != leader])
            source, target = (leader, other) if rng.random() < 0.5 else (other, leader)
            links = network.cut_one_way(source, target)
            targets = (f"{source}>{target}",)
        else:
            raise ValueError(f"unknown fault kind {kind!r}")
        return (Fault(kind=kind, lane=lane, targets=targets, started=started, hold=hold),
                lambda: network.heal(links))

    def lane(self, lane: str, kinds: tuple[tuple[str, int], ...], rng: random.Random) -> None:
        # Draw from a shuffled bag holding each kind `weight` times, refilled when
        # empty: the proportions hold, and every kind comes up within one bag.
        bag: list[str] = []
        while not self.stop.is_set():
            if not bag:
                bag = [kind for kind, weight in kinds for _ in range(weight)]
                rng.shuffle(bag)
            kind = bag.pop()
            with self._lock:
                budget = self.options.max_faults
                if budget is not None and len(self.report.faults) >= budget:
                    return
            try:
                fault, heal = self.inject(kind, lane, rng)
            except Exception as exc:
                self.error(f"{lane} lane: injecting {kind} failed: {type(exc).__name__}: {exc}")
                return
            with self._lock:
                self.report.faults.append(fault)
            self.log(f"{kind} {' '.join(fault.targets)} for {fault.hold:.1f}s")
            # A stop cuts the hold short; the fault is still healed.
            if kind == "pause-isolated-leader":
                self.write_past(lane, fault.hold, avoid=fault.targets[0])
            else:
                self.stop.wait(fault.hold)
            try:
                heal()
            except Exception as exc:
                fault.error = f"healing failed: {type(exc).__name__}: {exc}"
                self.error(f"{lane} lane: {kind}: {fault.error}")
                return
            healed_at = time.monotonic()
            fault.healed = healed_at - self.began
            if lane == "process":
                with contextlib.suppress(RuntimeError, TimeoutError):
                    self.check_crashes()
            fault.recovery = self.probe(lane, healed_at)
            if fault.recovery is None:
                self.error(f"no successful write within {RECOVERY_LIMIT:.0f}s of healing "
                           f"{kind} {fault.targets}")
                return
            self.log(f"  healed {kind}; a write succeeded {fault.recovery:.2f}s later")
            self.stop.wait(rng.uniform(*self.profile.gap))

    # -- phases --------------------------------------------------------------------

    def set_up(self) -> None:
        cluster = self.cluster
        cluster.start()
        cluster.wait_for_leader(30)
        for broker in (1, 2, 3):
            self.setup_write("POST", "/v1/brokers", {
                "broker_id": broker, "endpoint": f"broker{broker}.test:9092",
                "rack": f"r{broker}", "fenced": False}, f"register broker {broker}")
        # The highest metadata version this release reads: writes are then
        # coalesced into batch entries, and the checks cover that path too.
        self.setup_write("POST", "/v1/features",
                         {"metadata_version": supported_metadata_versions()[1]},
                         "finalize the metadata version")
        for lane in ("process", "network"):
            # Through the workload, so that the history and the feed check know it.
            config = {"cleanup.policy": "delete", "retention.ms": 604_800_000}
            record = self.workload.perform(f"s{self.options.seed}-setup",
                                           ("create", f"probe-{lane}", 1, config),
                                           deadline=60.0)
            if record.outcome != "ok":
                raise RuntimeError(f"set-up failed: create probe-{lane}: {record}")

    def fault_phase(self) -> None:
        profile, seed = self.profile, self.options.seed
        lanes = []
        for index, (lane, kinds) in enumerate((("process", profile.process_faults),
                                               ("network", profile.network_faults))):
            if kinds:
                rng = random.Random(seed * 1_000_003 + index)
                lanes.append(threading.Thread(target=self.lane, args=(lane, kinds, rng),
                                              name=f"nemesis-{lane}", daemon=True))
        for thread in lanes:
            thread.start()
        deadline = time.monotonic() + self.options.duration
        while time.monotonic() < deadline and any(t.is_alive() for t in lanes):
            time.sleep(0.2)
        self.stop.set()
        for thread in lanes:
            thread.join(RECOVERY_LIMIT + 60)
            if thread.is_alive():
                self.error(f"{thread.name} did not finish")

    def wind_down(self) -> None:
        """Heal everything, let the clients finish, wait for one write to succeed."""
        self.check_crashes()
        self.heal_everything()
        recovered = self.probe("process", time.monotonic())
        if recovered is None:
            self.error("the cluster took no write after the final heal")
        self.workload.stop()
        if self.workload._threads:
            self.error("clients did not finish")

    def converge(self) -> None:
        """Every replica at the same offset holds the same image and snapshot state."""
        cluster = self.cluster
        nodes = list(cluster.nodes)
        applied: dict[str, int] = {}

        def settled() -> bool:
            statuses = {n: cluster.status(n) for n in nodes}
            if any(s is None for s in statuses.values()):
                return False
            now = {n: int(s["applied_index"]) for n, s in statuses.items() if s}
            stable = now == applied and len(set(now.values())) == 1
            applied.clear()
            applied.update(now)
            return stable

        if not _poll(settled, 60, 0.3):
            self.error(f"replicas did not settle on one applied index: {applied}")
            return
        images: dict[str, str] = {}
        offsets: dict[str, int] = {}
        for node in nodes:
            events = self.call(node, "GET", "/v1/watch")["events"]
            image = events[0]["image"]
            offsets[node] = int(image["offset"])
            images[node] = _canonical_image(image)
        self.report.converged_offset = max(offsets.values())
        self.report.images_identical = (len(set(images.values())) == 1
                                        and len(set(offsets.values())) == 1)
        if not self.report.images_identical:
            self.error(f"replica images differ at offsets {offsets}")
            for node, image in images.items():
                (self.run_dir / f"image-{node}.json").write_text(image)
        counters = self.node_counters()
        self.report.engine_fixes = {k: v for k, v in counters.items() if k.startswith("engine_")}
        self.report.serving = {k: v for k, v in counters.items() if k in _SERVING_COUNTERS}
        index = next(iter(applied.values()))
        for node in nodes:
            self.call(node, "POST", "/v1/snapshot")
        states: dict[str, bytes] = {}

        def snapshots_written() -> bool:
            for node in nodes:
                if node in states:
                    continue
                path = cluster.nodes[node].directory / "data" / "snapshot.bin"
                try:
                    header, state = unpack_snapshot(path.read_bytes(), str(path))
                except (OSError, ConsensusError):
                    continue  # not written yet, or being replaced
                if header.last_index == index:
                    states[node] = state
            return len(states) == len(nodes)

        if not _poll(snapshots_written, 30, 0.2):
            self.error(f"no snapshot at index {index} on {sorted(set(nodes) - set(states))}")
            return
        self.report.snapshots_identical = len(set(states.values())) == 1
        if not self.report.snapshots_identical:
            self.error(f"snapshot state bytes differ at index {index}: "
                       + ", ".join(f"{n}: {len(s)} bytes" for n, s in states.items()))

    def node_counters(self) -> dict[str, float]:
        """The nodes' ``streambus_consensus_*_total`` counters, summed."""
        totals: dict[str, float] = {}
        for node in self.cluster.running():
            host, _, port = self.cluster.nodes[node].api_address.rpartition(":")
            conn = http.client.HTTPConnection(host, int(port), timeout=5)
            try:
                conn.request("GET", "/metrics")
                text = conn.getresponse().read().decode("utf-8", "replace")
            except (OSError, http.client.HTTPException):
                continue
            finally:
                conn.close()
            for line in text.splitlines():
                if line.startswith("streambus_consensus_") and "_total" in line:
                    name, _, value = line.rpartition(" ")
                    metric = name.split("{", 1)[0].removeprefix("streambus_consensus_")
                    with contextlib.suppress(ValueError):
                        totals[metric] = totals.get(metric, 0.0) + float(value)
        return totals

    def finish_feeds(self) -> None:
        """Stop following the feeds once each has everything up to the converged offset."""
        since = time.monotonic()  # converge() saw every node at its final offset before this
        if not _poll(lambda: self.feeds.caught_up(since), 20, 0.1):
            self.error("the change feeds did not catch up")
        self.feeds.stop()
        self.report.feeds = check_feeds(self.feeds, self.workload.records)

    def restart_all_and_read(self) -> None:
        """SIGKILL every node, start them all, read every topic through the log."""
        cluster = self.cluster
        for node in cluster.nodes:
            cluster.kill(node)
        self.expected_down.update(cluster.nodes)
        self.start_nodes(*cluster.nodes)
        cluster.wait_for_leader(30)
        names = [*self.workload.topic_names, "probe-process", "probe-network"]
        for name in names:
            record = self.workload.perform(f"s{self.options.seed}-final", ("read", name),
                                           deadline=30.0)
            if record.outcome != "ok":
                self.error(f"could not read {name!r} after the full restart")

    def check(self) -> None:
        report = self.report
        operations = self.history.operations()
        report.operations = len(operations)
        report.op_counts = self.workload.counts()
        report.unexpected = [f"{r.client} {r.input}: {r.unexpected}"
                             for r in self.workload.unexpected()]
        model = metadata_model()
        started = time.monotonic()
        result = check_operations(model, operations, timeout=self.options.check_timeout)
        report.check_seconds = time.monotonic() - started
        report.linearizable = result.outcome
        if result.outcome is CheckOutcome.UNKNOWN:
            self.error(f"the checker gave up after {self.options.check_timeout:.0f}s")
        final_client = f"s{self.options.seed}-final"
        explanations = []
        for part in result.illegal_partitions:
            topic = str(part.operations[0].input[1])
            ops = list(part.operations)
            without_final = [op for op in ops if op.client_id != final_client]
            writes_only = [op for op in ops if op.input[0] != "read"]
            if _legal(without_final):
                report.lost_topics.append(topic)
            elif _legal(writes_only):
                report.stale_read_topics.append(topic)
            else:
                report.violation_topics.append(topic)
            explanations.append(f"topic {topic!r}:\n" + CheckResult(
                outcome=part.outcome, partitions=(part,)).explain(model))
        report.explanation = "\n".join(explanations)

    def check_logs(self) -> None:
        """Collect every node log line at CRITICAL or ERROR."""
        for node_id, path in self.cluster.logs():
            try:
                text = path.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            self.report.log_alarms.extend(f"{node_id}: {line}" for line in log_alarms(text))

    def save_artifacts(self) -> None:
        save_history(self.history.operations(), self.run_dir / "history.json")
        faults = [vars(f) for f in self.report.faults]
        (self.run_dir / "faults.json").write_text(json.dumps(faults, indent=1, default=str))
        with self.feeds._lock:
            feeds = {node: {"resets": feed.resets, "out_of_order": feed.out_of_order,
                            "events": {str(k): json.loads(v) for k, v in feed.events.items()}}
                     for node, feed in self.feeds.feeds.items()}
        (self.run_dir / "feeds.json").write_text(json.dumps(feeds, indent=1))
        text = self.report.summary()
        if self.report.explanation:
            text += "\n\nchecker:\n" + self.report.explanation
        (self.run_dir / "report.txt").write_text(text + "\n")


_LOG_ALARM = re.compile(r"^\S+ \S+ (CRITICAL|ERROR) ")


def log_alarms(text: str) -> list[str]:
    """The lines of a node log (``cli`` format) logged at CRITICAL or ERROR."""
    return [line for line in text.splitlines() if _LOG_ALARM.search(line)]


def _legal(ops: list[Operation]) -> bool:
    return check_operations(metadata_model(partitioned=False), ops, timeout=60).ok


def _canonical_image(image: dict[str, Any]) -> str:
    def key(item: Any) -> str:
        return json.dumps(item, sort_keys=True)

    return json.dumps({
        "offset": image["offset"],
        "brokers": sorted(image["brokers"], key=key),
        "topics": sorted(image["topics"], key=key),
    }, sort_keys=True)


def _poll(check: Callable[[], bool], timeout: float, interval: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return True
        except (NotSentError, NoAnswerError, OSError):
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def run_chaos(options: ChaosOptions) -> ChaosReport:
    """Run one chaos run (see the module docstring) and return its report.

    Every process it starts is stopped before it returns, pass or fail.
    """
    profile = PROFILES.get(options.profile)
    if profile is None:
        raise ValueError(f"unknown profile {options.profile!r}; choose from {sorted(PROFILES)}")
    if options.nodes < 3:
        raise ValueError("chaos needs at least 3 nodes")
    if options.keep is not None:
        run_dir = Path(options.keep)
        run_dir.mkdir(parents=True, exist_ok=True)
    else:
        run_dir = Path(tempfile.mkdtemp(prefix=f"streambus-chaos-{options.seed}-"))
    began = time.monotonic()
    run = _Run(options, profile, run_dir)
    run.began = began
    report = run.report
    try:
        with run.cluster:
            try:
                run.set_up()
                run.feeds.start()
                run.workload.start()
                run.log(f"cluster up (leader {run.cluster.leader()}); injecting faults for "
                        f"{options.duration:g}s")
                run.fault_phase()
                run.log("healing everything; finishing clients")
                run.wind_down()
                run.log("comparing replicas")
                run.converge()
                run.finish_feeds()
                run.log("restarting every node; reading every topic")
                run.restart_all_and_read()
            except Exception as exc:
                run.error(f"run aborted: {type(exc).__name__}: {exc}")
            finally:
                run.stop.set()
                run.workload.stop(timeout=5)
                run.feeds.stop()
        run.log("checking the history")
        run.check()
        run.check_logs()
    finally:
        report.elapsed = time.monotonic() - began
        keep = options.keep is not None or not report.passed
        if keep:
            with contextlib.suppress(Exception):
                run.save_artifacts()
            report.kept = True
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
    return report


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m streambus_consensus.testing.chaos``; exit 0 when every check passed."""
    parser = argparse.ArgumentParser(
        prog="python -m streambus_consensus.testing.chaos",
        description="Fault-injection run against a local metadata cluster, with checks.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="profiles:\n" + "\n".join(f"  {p.name:<18} {p.description}"
                                         for p in PROFILES.values()))
    parser.add_argument("--duration", type=float, default=900.0,
                        help="seconds of fault injection (default 900)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the schedule and the clients (default: random, printed)")
    parser.add_argument("--nodes", type=int, choices=(3, 5), default=3)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="soak")
    parser.add_argument("--keep", type=Path, default=None,
                        help="run in DIR and keep everything (default: a temporary "
                             "directory, kept only on failure)")
    parser.add_argument("--faults", type=int, default=None, metavar="N",
                        help="stop injecting after N faults, even before --duration is over")
    parser.add_argument("--quiet", action="store_true", help="no line per fault")
    parser.add_argument("--peer-tls", action="store_true",
                        help="run the cluster traffic over mutual TLS")
    parser.add_argument("--unsafe-disable-engine-fixes", action="store_true",
                        help="run the nodes without the engine fixes, to show that the "
                             "checks catch what they prevent")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(3), "big")

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    options = ChaosOptions(duration=args.duration, seed=seed, nodes=args.nodes,
                           profile=args.profile, keep=args.keep, max_faults=args.faults,
                           unsafe_disable_engine_fixes=args.unsafe_disable_engine_fixes,
                           peer_tls=args.peer_tls, log=None if args.quiet else log)
    log(f"chaos: profile={options.profile} nodes={options.nodes} seed={seed} "
        f"duration={options.duration:g}s")
    report = run_chaos(options)
    print(report.summary())
    if report.explanation:
        print("\nchecker:\n" + report.explanation)
    return 0 if report.passed else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

