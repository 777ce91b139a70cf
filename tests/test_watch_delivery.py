"""``GET /v1/watch`` delivers each node's changes once and in order, through faults.

Issue 11: twice in early chaos runs, a node's change feed was reported to have
delivered offsets it had already delivered. The server answers ``after=N``
only with offsets above ``N`` (or a full image when ``N`` is below what it
holds), so a repeat needs either a feed whose offsets go backwards or a
follower that is handed an answer to an earlier request. This file drives
both followers a client would use against three real node processes while
their feeds are at their most fragile, and checks every answer:

- the chaos suite's :class:`~streambus_consensus.testing.workload.FeedRecorder`
  (a fresh connection per poll, 5 s timeout), and
- a follower through :class:`~streambus_consensus.client.ApiClient` (a pool of
  kept-alive connections, a timeout close to the long poll's wait, so polls
  time out while the node is about to answer and are retried on a fresh
  connection);

while a follower or the leader is paused (SIGSTOP) past its clients'
timeouts, a follower is cut off until the leader has compacted past it and
then installs a snapshot while being watched, and a follower is SIGKILLed
and restarted from its own snapshot with watchers resuming above it.

Checks: every event a follower receives is above the last one it had (a full
image included); nodes agree on the changes at every offset; no command shows
up in the feeds more often than it was issued (:func:`check_feeds`). The
injected-repeat test shows the checks catch a follower handed an earlier
answer again.

``STREAMBUS_WATCH_STRESS_SECONDS`` lengthens the fault phase (default 45 s).
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from conftest import ClusterFactory

from streambus_consensus.client import ApiClient
from streambus_consensus.errors import ConsensusError
from streambus_consensus.metadata.commands import supported_metadata_versions
from streambus_consensus.testing.harness import LocalCluster, wait_until
from streambus_consensus.testing.linearizability import History
from streambus_consensus.testing.workload import (
    FeedRecorder,
    MetadataWorkload,
    WorkloadConfig,
    check_feeds,
)

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

STRESS_SECONDS = float(os.environ.get("STREAMBUS_WATCH_STRESS_SECONDS", "45"))
SNAPSHOT_EVERY = 40
"""Entries between compactions: a follower cut off for a few seconds of
writes is sent a snapshot when it returns."""


@dataclass
class PooledFollower:
    """Long-polls one node's ``/v1/watch`` through a pooled :class:`ApiClient`.

    ``timeout`` is close to the polls' ``wait`` (drawn from ``waits``), so some
    polls time out just as the node answers. ``replay_once_at`` hands the
    follower its last answer with events again, once, at that answer or the
    first one after it with an earlier answer to repeat: the repeat a stale
    pooled response would cause, to show the check catches it.
    """

    client: ApiClient
    waits: tuple[float, float] = (0.3, 1.4)
    replay_once_at: int | None = None
    cursor: int | None = None
    answers: int = 0
    events: dict[int, str] = field(default_factory=dict)
    """offset -> canonical JSON of the changes delivered there."""
    repeats: list[dict[str, Any]] = field(default_factory=list)
    """Every event at or below an offset already delivered, with its request."""
    resets: int = 0
    errors: int = 0

    def run(self, stop: threading.Event, seed: int) -> None:
        rng = random.Random(seed)
        previous: list[dict[str, Any]] | None = None
        while not stop.is_set():
            after = self.cursor
            path = f"/v1/watch?wait={rng.uniform(*self.waits):.2f}"
            if after is not None:
                path += f"&after={after}"
            try:
                events: list[dict[str, Any]] = self.client.request("GET", path)["events"]
            except (ConsensusError, OSError):
                self.errors += 1
                stop.wait(0.05)
                continue
            self.answers += 1
            if self.answers >= (self.replay_once_at or 0) > 0 and previous is not None:
                events = previous  # injected: an earlier answer handed back again
                self.replay_once_at = None
            previous = events or previous
            self.take(after, events)

    def take(self, after: int | None, events: list[dict[str, Any]]) -> None:
        for event in events:
            offset = int(event["offset"])
            if self.cursor is not None and offset <= self.cursor:
                self.repeats.append({"asked_after": after, "cursor": self.cursor,
                                     "offset": offset,
                                     "answer": [e["offset"] for e in events]})
            elif event["reset"]:
                self.resets += 1
            else:
                self.events[offset] = json.dumps(event["changes"], sort_keys=True)
            self.cursor = max(offset, self.cursor if self.cursor is not None else offset)


@dataclass
class Run:
    """A watched, loaded three-node cluster."""

    cluster: LocalCluster
    workload: MetadataWorkload
    recorder: FeedRecorder
    followers: dict[str, PooledFollower]
    stop: threading.Event
    threads: list[threading.Thread]
    log: list[str] = field(default_factory=list)

    def divergent_offsets(self) -> list[int]:
        """Offsets at which two followers (of any nodes) hold different changes."""
        union: dict[int, str] = {}
        divergent: set[int] = set()
        feeds = [f.events for f in self.followers.values()]
        feeds += [f.events for f in self.recorder.feeds.values()]
        for events in feeds:
            for offset, changes in events.items():
                if union.setdefault(offset, changes) != changes:
                    divergent.add(offset)
        return sorted(divergent)


@pytest.fixture
def watched(make_cluster: ClusterFactory) -> Iterator[Callable[..., Run]]:
    runs: list[Run] = []

    def build(*, replay_once_at: int | None = None) -> Run:
        cluster = make_cluster(3, app="metadata", proxied=True, api_tls=False, settings={
            "broker_session_timeout": 86_400.0, "snapshot_interval_entries": SNAPSHOT_EVERY})
        cluster.start()
        cluster.wait_for_leader(30)
        admin = cluster.client(timeout=5)
        for n, broker in enumerate((1, 2, 3)):
            _until_applied(admin, "POST", "/v1/brokers", {
                "broker_id": broker, "endpoint": f"b{broker}.test:9092", "rack": f"r{broker}",
                "fenced": False, "request_id": {"client_id": "setup", "seq": n + 1}})
        _until_applied(admin, "POST", "/v1/features", {
            "metadata_version": supported_metadata_versions()[1],
            "request_id": {"client_id": "setup", "seq": 10}})
        addresses = {n: node.api_address for n, node in cluster.nodes.items()}
        workload = MetadataWorkload(addresses, cluster.secret, History(), name="wd",
                                    config=WorkloadConfig(clients=3, topics=8,
                                                          think_time=0.02,
                                                          request_timeout=1.0,
                                                          write_deadline=8.0))
        recorder = FeedRecorder(addresses, cluster.secret)
        followers = {n: PooledFollower(cluster.client(n, timeout=1.5),
                                       replay_once_at=replay_once_at)
                     for n in cluster.nodes}
        stop = threading.Event()
        threads = [threading.Thread(target=f.run, args=(stop, i), daemon=True,
                                    name=f"pooled-follower-{n}")
                   for i, (n, f) in enumerate(followers.items())]
        run = Run(cluster, workload, recorder, followers, stop, threads)
        runs.append(run)
        recorder.start()
        workload.start()
        for thread in threads:
            thread.start()
        return run

    yield build
    for run in runs:
        run.stop.set()
        run.workload.stop(timeout=5)
        run.recorder.stop()
        for thread in run.threads:
            thread.join(5)
        for follower in run.followers.values():
            follower.client.close()


def _until_applied(client: ApiClient, method: str, path: str, body: dict[str, Any]) -> None:
    def applied() -> bool:
        try:
            client.request(method, path, body)
        except ConsensusError:
            return False
        return True

    wait_until(applied, 60, f"{method} {path}")


def _faults(run: Run, seconds: float, rng: random.Random) -> None:
    """Pause, cut off, kill and restart nodes in turn until ``seconds`` have passed."""
    cluster, network = run.cluster, run.cluster.network
    assert network is not None
    kinds = ["pause-follower", "pause-leader", "isolate-follower", "kill-follower",
             "kill-leader", "stop-follower"]
    until = time.monotonic() + seconds
    i = 0
    while time.monotonic() < until:
        kind = kinds[i % len(kinds)]
        leader = cluster.wait_for_leader(30)
        others = [n for n in sorted(cluster.nodes) if n != leader]
        follower = others[(i // len(kinds)) % len(others)]
        victim = leader if kind.endswith("-leader") else follower
        i += 1
        run.log.append(f"{kind} {victim}")
        if kind.startswith("pause-"):
            cluster.pause(victim)
            time.sleep(rng.uniform(1.6, 2.6))  # past the pooled followers' 1.5 s timeout
            cluster.resume(victim)
        elif kind == "isolate-follower":
            links = network.isolate(victim)
            # Until the leader has compacted past what the follower holds:
            # back on the network, it is sent a snapshot while being watched.
            _wait_applied_past(cluster, leader, 2 * SNAPSHOT_EVERY)
            network.heal(links)
        else:
            if kind == "stop-follower":
                cluster.stop(victim)  # graceful: open long polls are cut off
            else:
                cluster.kill(victim)
            time.sleep(rng.uniform(0.2, 1.0))
            cluster.start(victim)
        time.sleep(rng.uniform(0.5, 1.5))


def _wait_applied_past(cluster: LocalCluster, node: str, entries: int) -> None:
    start = _applied(cluster, node) or 0
    wait_until(lambda: (_applied(cluster, node) or 0) > start + entries, 60,
               f"{node} to apply {entries} more entries")


def _applied(cluster: LocalCluster, node: str) -> int | None:
    status = cluster.status(node)
    return None if status is None else int(status["applied_index"])


def _finish(run: Run) -> None:
    """Stop the writers, let every follower reach the final offset, stop them."""
    run.workload.stop()
    cluster = run.cluster
    cluster.wait_for_leader(30)

    def settled() -> int | None:
        applied = {_applied(cluster, n) for n in cluster.nodes}
        return applied.pop() if len(applied) == 1 and None not in applied else None

    final = wait_until(settled, 30, "every node at one applied index")
    wait_until(lambda: all((f.cursor or 0) >= _last_change(f.events, final)
                           for f in run.followers.values()), 30, "the pooled followers")
    since = time.monotonic()
    wait_until(lambda: run.recorder.caught_up(since), 30, "the feed recorder")
    run.stop.set()
    run.recorder.stop()
    for thread in run.threads:
        thread.join(5)


def _last_change(events: dict[int, str], final: int) -> int:
    return max((o for o in events if o <= final), default=0)


def test_watchers_get_each_offset_once_in_order_through_pauses_installs_and_restarts(
        watched: Callable[..., Run]) -> None:
    run = watched()
    _faults(run, STRESS_SECONDS, random.Random(int(os.environ.get("STREAMBUS_WATCH_SEED", "11"))))
    _finish(run)
    feeds = check_feeds(run.recorder, run.workload.records)
    pooled = run.followers
    summary = (f"faults: {run.log}\nrecorder: offsets {feeds.offsets}, resets {feeds.resets}, "
               f"repeats {[f.out_of_order for f in run.recorder.feeds.values()]}\npooled: "
               + ", ".join(f"{n}: {len(f.events)} events, {f.resets} resets, {f.errors} "
                           f"errors, repeats {f.repeats}" for n, f in pooled.items()))
    print(summary)
    assert feeds.out_of_order == 0, summary
    assert all(not f.repeats for f in pooled.values()), summary
    assert not feeds.duplicates and not feeds.divergent_offsets, summary
    assert not run.divergent_offsets(), summary
    # The paths under test really ran: polls failed during pauses, and the
    # snapshot installs and restarts sent full images to followers above them.
    assert sum(f.errors for f in pooled.values()) > 0, summary
    assert feeds.resets + sum(f.resets for f in pooled.values()) > 0, summary
    assert min(len(f.events) for f in pooled.values()) > 2 * SNAPSHOT_EVERY, summary


def test_the_check_catches_a_follower_handed_an_earlier_answer_again(
        watched: Callable[..., Run]) -> None:
    run = watched(replay_once_at=8)
    wait_until(lambda: all(f.answers > 10 for f in run.followers.values()), 60,
               "answers to every follower")
    run.stop.set()
    for thread in run.threads:
        thread.join(5)
    for follower in run.followers.values():
        assert follower.repeats, "the replayed answer is reported as a repeat"
        assert all(r["offset"] <= r["cursor"] for r in follower.repeats)
