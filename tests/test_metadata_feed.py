"""The change feed behind ``GET /v1/watch`` and ``MetadataStore.watch``.

A watcher resumes from the offset it last received. Whatever happens to the
node in between (a restart that restores a snapshot, a snapshot installed
from the leader), it must receive every change after that offset exactly
once, or a full image first when the changes are no longer there.
"""

from __future__ import annotations

import threading
import uuid

from streambus_consensus.metadata import RegisterBroker, RequestId, encode_command
from streambus_consensus.metadata.feed import MetadataEvent, WatchedStateMachine
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
