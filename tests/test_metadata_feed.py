"""The change feed behind ``GET /v1/watch`` and ``MetadataStore.watch``.

A watcher resumes from the offset it last received. Whatever happens to the
node in between (a restart that restores a snapshot, a snapshot installed
from the leader), it must receive every change after that offset exactly
once, or a full image first when the changes are no longer there.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any

from streambus_consensus.metadata import (
    ChangeKind,
    CreateTopic,
    FenceBroker,
    Partition,
    RegisterBroker,
    RequestId,
    encode_command,
)
from streambus_consensus.metadata.feed import MetadataEvent, WatchedStateMachine
from streambus_consensus.metadata.fsm import MetadataStateMachine
from streambus_consensus.metadata.service import compact_events
from streambus_consensus.testing.harness import wait_until


def register(machine: WatchedStateMachine, index: int) -> None:
    command = RegisterBroker(request_id=RequestId("feed-test", index), broker_id=index,
                             endpoint=f"broker{index}.example:9092", rack=None,
                             incarnation_id=str(uuid.UUID(int=index + 1)), fenced=False)
    assert machine.apply_at(index, encode_command(command)).ok


def test_a_snapshot_restored_while_a_watcher_waits_sends_it_an_image() -> None:
    """A node restarts (or installs the leader's snapshot) while a watcher is
    long-polling from offset 5: the snapshot covers offsets 6..10, whose
    changes the feed never held. Before the fix the watcher woke on offset 11
    and silently skipped 6..10 (seen as missing offsets on one node in a
    kill/restart run)."""
    leader = WatchedStateMachine()
    for index in range(1, 11):
        register(leader, index)
    snapshot = leader.snapshot()

    node = WatchedStateMachine()  # the restarted node, before its snapshot is loaded
    for index in range(1, 6):
        register(node, index)
    answer: list[list[MetadataEvent]] = []
    reader = threading.Thread(target=lambda: answer.append(node.feed.read(5, timeout=5)))
    reader.start()
    wait_until(lambda: len(node.feed._cond._waiters) == 1,  # type: ignore[attr-defined]
               5, "the watcher to wait")
    node.restore(snapshot)
    register(node, 11)
    reader.join(5)
    (events,) = answer
    assert events[0].is_reset, f"offsets 6..10 skipped: got {[e.offset for e in events]}"
    assert events[0].offset >= 10


def test_a_watcher_gets_each_change_once_across_restores() -> None:
    node = WatchedStateMachine()
    for index in range(1, 4):
        register(node, index)
    first = node.feed.read(0, timeout=0)
    assert [e.offset for e in first] == [1, 2, 3]
    node.restore(node.snapshot())  # a restart from a snapshot at the same offset
    register(node, 4)
    assert [e.offset for e in node.feed.read(3, timeout=0)] == [4]


class _RestoreHeldOpen(MetadataStateMachine):
    """A state machine whose next restore, once its state is replaced, waits
    (at most a second) for ``go_on``: a watcher can then read the feed in the
    moment between the state machine's restore and the feed's reset."""

    def __init__(self) -> None:
        super().__init__()
        self.hold_next = False
        self.restored = threading.Event()
        self.go_on = threading.Event()

    def restore(self, data: bytes) -> None:
        super().restore(data)
        if self.hold_next:
            self.hold_next = False
            self.restored.set()
            self.go_on.wait(1.0)


def test_a_watcher_never_gets_an_image_at_or_below_its_offset_during_a_restore() -> None:
    """A follower restarted from its own snapshot at 20 is watched by a client
    resuming from 15 (behind: it needs an image) just as the leader installs
    its older snapshot at 10. Before the fix the feed's floor was still 20
    while the state was already 10: the client got an image at 10, below the
    15 it had, then offsets 11..15 a second time."""
    leader = WatchedStateMachine()
    for index in range(1, 21):
        register(leader, index)
        if index == 10:
            at_10 = leader.snapshot()
    fsm = _RestoreHeldOpen()
    node = WatchedStateMachine(fsm)
    node.restore(leader.snapshot())
    answer: list[list[MetadataEvent]] = []
    fsm.hold_next = True
    installer = threading.Thread(target=node.restore, args=(at_10,))
    installer.start()
    assert fsm.restored.wait(5)
    reader = threading.Thread(target=lambda: answer.append(node.feed.read(15, timeout=5)))
    reader.start()
    reader.join(0.3)  # answered at once before the fix; waits for the reset with it
    fsm.go_on.set()
    installer.join(5)
    for index in range(11, 17):
        register(node, index)
    reader.join(5)
    (events,) = answer
    offsets = [(e.offset, e.is_reset) for e in events]
    assert all(e.offset > 15 for e in events), f"after=15 answered with {offsets}"


def _mass_change() -> WatchedStateMachine:
    """Three brokers, a few topics, then broker 1 fenced: most partitions change."""
    machine = WatchedStateMachine()
    for b in range(1, 4):
        register(machine, b)
    for t in range(4):
        machine.apply(encode_command(CreateTopic(
            request_id=RequestId("t", 200 + t), name=f"t{t}", topic_id=str(uuid.UUID(int=t + 9)),
            partitions=5, replication_factor=2, config={}, placement_offset=t)))
    machine.apply(encode_command(FenceBroker(request_id=RequestId("t", 300), broker_id=1)))
    return machine


def test_the_compact_watch_format_carries_every_change_in_bounded_answers() -> None:
    machine = _mass_change()
    events = machine.feed.read(0, timeout=0)
    wanted = [c for e in events for c in e.changes]
    got: list[tuple[str, object]] = []
    after, skip, answers = 0, 0, 0
    while True:
        answer = compact_events(machine.feed.read(after, timeout=0), skip, limit=4)
        answers += 1
        sets = [tuple(s) for s in answer["sets"]]
        for event in answer["events"]:
            assert sum(len(run.get("index", [None])) for run in event["runs"]) <= 4
            for run in event["runs"]:
                if "topics" not in run:
                    got.append((run["kind"], run["key"]))
                    continue
                names = [name for name, count in run["topics"] for _ in range(count)]
                assert len(names) == len(run["index"])
                def col(name: str, i: int, run: dict[str, Any] = run) -> Any:
                    value = run[name]
                    return value[i] if isinstance(value, list) else value  # one value: all

                for i, index in enumerate(run["index"]):
                    got.append((run["kind"], Partition(
                        names[i], index, sets[col("replicas", i)], sets[col("isr", i)],
                        col("leader", i), col("leader_epoch", i), col("partition_epoch", i),
                        col("recovering", i) == 1)))
            after = event["offset"]
        if answer["resume"] is None:
            break
        after, skip = answer["resume"]["after"], answer["resume"]["skip"]
    assert got == [(str(c.kind), c.record if isinstance(c.record, Partition) else c.key)
                   for c in wanted]
    assert answers >= len(wanted) // 4
    fenced = [c for c in wanted if c.kind is ChangeKind.PARTITION_CHANGED]
    assert len(fenced) >= 10  # the fence is one event, cut across answers
    assert any("topics" in run and not isinstance(run["recovering"], list)
               for run in compact_events(events, 0, 100)["events"][-1]["runs"])


def test_readers_on_an_event_loop_wake_on_a_change_and_time_out_without_leaking() -> None:
    machine = WatchedStateMachine()
    register(machine, 1)
    feed = machine.feed

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        # Nothing new after 1: the wait runs out, and leaves no waiter behind.
        started = loop.time()
        await feed.wait_async(1, 0.2)
        assert loop.time() - started >= 0.19
        assert feed.read(1, timeout=0) == []
        assert not feed._waiters
        # Already news (offset 0 < 1): no wait at all.
        started = loop.time()
        await feed.wait_async(0, 5)
        assert loop.time() - started < 0.1
        # Many readers, one change from another thread (the Raft thread's role).
        readers = [asyncio.ensure_future(feed.wait_async(1, 5)) for _ in range(100)]
        await asyncio.sleep(0.05)
        assert not any(r.done() for r in readers)
        changed = threading.Timer(0.1, register, (machine, 2))
        changed.start()
        started = loop.time()
        await asyncio.gather(*readers)
        assert loop.time() - started < 2.0
        assert [e.offset for e in feed.read(1, timeout=0)] == [2]
        assert not feed._waiters
        # A restored snapshot wakes readers too (they then need an image).
        waiting = asyncio.ensure_future(feed.wait_async(2, 5))
        await asyncio.sleep(0.05)
        threading.Timer(0.05, feed.reset, (10,)).start()
        await waiting
        assert feed.read(2, timeout=0)[0].is_reset

    threads = threading.active_count()
    started = time.monotonic()
    asyncio.run(scenario())
    assert time.monotonic() - started < 5
    assert threading.active_count() <= threads + 1  # no thread per reader


def test_a_slow_restore_never_blocks_readers_on_an_event_loop() -> None:
    """Readers on the API's event loop take the feed's lock to look; a restore
    (seconds at a million partitions) must not hold it, or the node's whole
    API stalls behind one snapshot install."""
    machine = WatchedStateMachine()
    register(machine, 1)
    feed = machine.feed

    def slow_restore() -> int:
        time.sleep(1.0)
        return 10

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        restoring = threading.Thread(target=feed.replace, args=(slow_restore,))
        restoring.start()
        await asyncio.sleep(0.1)
        started = loop.time()
        waiting = asyncio.ensure_future(feed.wait_async(1, 5))
        await asyncio.sleep(0.05)
        assert loop.time() - started < 0.5, "the loop was blocked by the restore"
        assert not waiting.done(), "news announced before the restore finished"
        await waiting  # woken by the reset
        assert loop.time() - started >= 0.5
        restoring.join()
        assert feed.read(1, timeout=0)[0].is_reset

    asyncio.run(scenario())
