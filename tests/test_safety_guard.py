"""Unit tests of the engine fixes in raft/safety.py and the journal alignment (E2, E1, E4).

The guard only reads an engine's term, leader, commit index and log, and sends
through it; a small fake with those stands in for PySyncObj here. The E1 rule
is also shown end to end on real processes in test_engine_fixes.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from streambus_consensus.interfaces import LogEntry, RecoveredState
from streambus_consensus.raft.engine import Member, _Journal
from streambus_consensus.raft.safety import MessageGuard
from streambus_consensus.raft.snapshot import SnapshotHeader
from streambus_consensus.raft.storage import MemoryStorage


@dataclass
class FakeEngine:
    term: int = 3
    leader_id: str | None = "n1"
    commit_index: int = 5
    journal: list[tuple[bytes, int, int]] = field(default_factory=list)
    sent: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def send(self, peer_id: str, message: dict[str, Any]) -> bool:
        self.sent.append((peer_id, message))
        return True


LEADER = Member("n1", "127.0.0.1:1")


def log(*terms: int, first: int = 1) -> list[tuple[bytes, int, int]]:
    return [(b"x%d" % i, first + i, t) for i, t in enumerate(terms)]


def guard_for(engine: FakeEngine, enabled: bool = True) -> MessageGuard:
    guard = MessageGuard(enabled=enabled)
    guard.attach(engine)  # type: ignore[arg-type]
    return guard


def append(prev: int, entries: list[tuple[bytes, int, int]], term: int = 3,
           commit: int = 5) -> dict[str, Any]:
    prev_term = 3
    return {"type": "append_entries", "term": term, "commit_index": commit,
            "prevLogIdx": prev, "prevLogTerm": prev_term, "entries": entries}


# -- rule 2 (E2) ---------------------------------------------------------------------

def test_stale_matching_append_is_acknowledged_without_truncating() -> None:
    engine = FakeEngine(journal=log(1, 3, 3, 3, 3, 3, 3, 3))  # indexes 1..8
    guard = guard_for(engine)
    stale = append(prev=2, entries=engine.journal[2:5])  # entries 3..5, all matching
    assert guard.inspect(LEADER, stale) is None
    assert engine.sent == [("n1", {"type": "next_node_idx", "next_node_idx": 6,
                                   "reset": False, "success": True})]
    assert guard.stale_appends == 1


def test_append_with_a_conflict_goes_to_the_engine() -> None:
    engine = FakeEngine(journal=log(1, 2, 2, 2, 2, 2))  # old-term tail
    guard = guard_for(engine)
    conflicting = append(prev=2, entries=[(b"new", 3, 3)])
    assert guard.inspect(LEADER, conflicting) is conflicting
    assert engine.sent == []


def test_append_that_only_extends_the_log_goes_to_the_engine() -> None:
    engine = FakeEngine(journal=log(1, 3, 3))
    guard = guard_for(engine)
    extending = append(prev=3, entries=[(b"y", 4, 3), (b"z", 5, 3)])
    assert guard.inspect(LEADER, extending) is extending


def test_overlapping_append_is_handed_over_as_its_new_suffix() -> None:
    """A stale batch that overlaps the log and reaches past its end: the engine
    would delete the overlap (applied entries: CRITICAL "truncating
    already-applied log entries") and append it again. Raft §5.3: "If an
    existing entry conflicts with a new one (same index but different terms),
    delete the existing entry and all that follow it"; matching ones stay."""
    engine = FakeEngine(journal=log(1, 3, 3, 3, 3))  # indexes 1..5
    guard = guard_for(engine)
    overlapping = append(prev=2, entries=[*engine.journal[2:5], (b"y", 6, 3), (b"z", 7, 3)])
    out = guard.inspect(LEADER, overlapping)
    assert out is not None and out is not overlapping
    assert (out["prevLogIdx"], out["prevLogTerm"]) == (5, 3)
    assert out["entries"] == [(b"y", 6, 3), (b"z", 7, 3)]
    assert out["commit_index"] == overlapping["commit_index"] and out["term"] == 3
    assert guard.stale_appends == 1 and engine.sent == []


def test_append_ending_at_the_last_entry_is_handed_over_empty() -> None:
    """The batch is entirely held and ends where the log ends (the case behind
    every CRITICAL line seen in the chaos runs: "from index 101 (last applied: 101)")."""
    engine = FakeEngine(journal=log(1, 3, 3, 3, 3))
    for term in (3, 4):  # also from a new leader, whose term the engine must adopt
        guard = guard_for(engine)
        message = append(prev=3, entries=engine.journal[3:5], term=term)
        out = guard.inspect(LEADER, message)
        assert out is not None and (out["prevLogIdx"], out["prevLogTerm"]) == (5, 3)
        assert out["entries"] == [] and out["term"] == term


def test_overlap_with_a_conflict_is_handed_over_from_the_conflict() -> None:
    engine = FakeEngine(journal=log(1, 3, 3, 2, 2))  # an old-term tail at 4..5
    guard = guard_for(engine)
    message = append(prev=2, entries=[engine.journal[2], (b"n4", 4, 3), (b"n5", 5, 3)])
    out = guard.inspect(LEADER, message)
    assert out is not None and (out["prevLogIdx"], out["prevLogTerm"]) == (3, 3)
    assert out["entries"] == [(b"n4", 4, 3), (b"n5", 5, 3)]


def test_an_older_term_is_left_for_the_engine_to_refuse() -> None:
    engine = FakeEngine(journal=log(1, 3, 3, 3, 3))
    message = append(prev=2, entries=[*engine.journal[2:5], (b"y", 6, 3)], term=2)
    assert guard_for(engine).inspect(LEADER, message) is message


@pytest.mark.parametrize("change", [
    {"term": 4},                 # a newer term: the engine must see it
    {"transmission": "finish"},  # a large entry sent in pieces
    {"entries": []},             # a heartbeat
])
def test_rule_2_leaves_other_appends_alone(change: dict[str, Any]) -> None:
    engine = FakeEngine(journal=log(1, 3, 3, 3, 3))
    message = append(prev=1, entries=engine.journal[1:3]) | change
    assert guard_for(engine).inspect(LEADER, message) is message


def test_rule_2_ignores_a_sender_that_is_not_the_leader() -> None:
    engine = FakeEngine(journal=log(1, 3, 3, 3, 3), leader_id="n2")
    message = append(prev=1, entries=engine.journal[1:3])
    assert guard_for(engine).inspect(LEADER, message) is message


def test_compacted_entries_are_not_assumed_to_match() -> None:
    engine = FakeEngine(journal=log(3, 3, 3, first=10))  # log starts at 10
    message = append(prev=7, entries=[(b"a", 8, 3), (b"b", 9, 3)])
    assert guard_for(engine).inspect(LEADER, message) is message


# -- rule 3 (E22) --------------------------------------------------------------------


def conflict(prev: int, prev_term: int, term: int = 5) -> dict[str, Any]:
    return {"type": "append_entries", "term": term, "commit_index": 12,
            "prevLogIdx": prev, "prevLogTerm": prev_term, "entries": []}


def test_a_conflicting_run_is_skipped_in_one_round_trip() -> None:
    """A deposed leader appended 6..10 at term 4 that nobody else holds; the new
    leader (term 5) finds a conflict at 10. The engine answers nextIndex = 10,
    one entry back per round trip (0.4-0.9 s of lost writes after a heal in the
    chaos soak). Raft §5.3: the follower can name the conflicting term's first
    index so the leader "can decrement nextIndex to bypass all of the
    conflicting entries in that term"."""
    engine = FakeEngine(term=5, commit_index=5, journal=log(1, 3, 3, 3, 3, 4, 4, 4, 4, 4))
    guard = guard_for(engine)
    out = guard.inspect(LEADER, conflict(prev=10, prev_term=5))
    assert out is not None and out["prevLogIdx"] == 6 and out["prevLogTerm"] == 5
    assert guard.conflict_skips == 1 and engine.sent == []


def test_a_skip_never_reaches_below_the_commit_index() -> None:
    """Entries up to the commit index match the leader's (Leader Completeness):
    the skip stops there even when the same term goes on below it."""
    engine = FakeEngine(term=5, commit_index=7, journal=log(1, 3, 3, 3, 3, 3, 3, 3, 3, 3))
    out = guard_for(engine).inspect(LEADER, conflict(prev=10, prev_term=5))
    assert out is not None and out["prevLogIdx"] == 8


def test_entries_of_a_term_above_the_leaders_are_skipped_too() -> None:
    """The leader's terms never decrease along its log, so an entry of ours at a
    lower index with a term above its prevLogTerm cannot match either."""
    engine = FakeEngine(term=6, commit_index=3, journal=log(1, 3, 3, 5, 5, 4, 4))
    out = guard_for(engine).inspect(LEADER, conflict(prev=7, prev_term=3, term=6))
    assert out is not None and out["prevLogIdx"] == 4


def test_a_new_leaders_first_conflict_is_rewritten_for_the_engine_to_answer() -> None:
    """The engine itself answers (it must adopt the new term and leader first):
    the guard only moves prevLogIdx back, to an entry whose term differs from
    prevLogTerm, so the engine's own answer names it."""
    engine = FakeEngine(term=4, leader_id="n2", commit_index=5,
                        journal=log(1, 3, 3, 3, 3, 4, 4, 4, 4, 4))
    message = conflict(prev=10, prev_term=5)
    out = guard_for(engine).inspect(LEADER, message)
    assert out is not None and out["prevLogIdx"] == 6
    assert {k: v for k, v in out.items() if k != "prevLogIdx"} == {
        k: v for k, v in message.items() if k != "prevLogIdx"}


@pytest.mark.parametrize(("prev", "prev_term", "change"), [
    (6, 3, {}),                        # the entry before the run: one step is all there is
    (10, 4, {}),                       # no conflict
    (12, 5, {}),                       # past our end: the engine names our last index + 1
    (10, 5, {"term": 3}),              # an older term: the engine refuses it
    (10, 5, {"transmission": "start"}),
])
def test_rule_3_leaves_other_appends_alone(prev: int, prev_term: int,
                                           change: dict[str, Any]) -> None:
    engine = FakeEngine(term=5, commit_index=5, journal=log(1, 3, 3, 3, 3, 4, 4, 4, 4, 4))
    message = conflict(prev=prev, prev_term=prev_term) | change
    out = guard_for(engine).inspect(LEADER, message)
    assert out is not None and out.get("prevLogIdx") == prev


# -- rule 1 (E1) ---------------------------------------------------------------------

@pytest.mark.parametrize("serialized", [None, (b"chunk", True, False), (b"", False, True)])
def test_snapshot_traffic_cannot_raise_the_commit_index(serialized: Any) -> None:
    engine = FakeEngine(journal=log(1, 1, 1, 1, 1, 1, 1, 1), commit_index=5)
    message = {"type": "append_entries", "term": 3, "commit_index": 500,
               "serialized": serialized}
    out = guard_for(engine).inspect(LEADER, message)
    assert out is not None and out["commit_index"] == 5


def test_verified_appends_keep_the_leaders_commit_index() -> None:
    engine = FakeEngine(journal=log(1, 3, 3))
    message = append(prev=3, entries=[(b"z", 4, 3)], commit=4)
    out = guard_for(engine).inspect(LEADER, message)
    assert out is not None and out["commit_index"] == 4


def test_disabled_guard_passes_everything_untouched() -> None:
    engine = FakeEngine(journal=log(1, 3, 3, 3, 3, 3, 3, 3))
    guard = guard_for(engine, enabled=False)
    snapshot_message = {"type": "append_entries", "term": 3, "commit_index": 500,
                        "serialized": None}
    assert guard.inspect(LEADER, dict(snapshot_message)) == snapshot_message
    stale = append(prev=2, entries=engine.journal[2:5])
    assert guard.inspect(LEADER, stale) is stale


# -- E4: journal aligned with the snapshot before the engine starts -------------------

def _journal(entries: list[LogEntry]) -> tuple[_Journal, MemoryStorage]:
    storage = MemoryStorage()
    for entry in entries:
        storage.append(entry)
    journal = _Journal(storage, RecoveredState(entries=entries, term=2, voted_for=None,
                                               commit_index=10))
    return journal, storage


def test_journal_starting_before_the_snapshot_is_compacted_to_it() -> None:
    entries = [LogEntry(i, 2, b"e%d" % i) for i in range(1, 11)]
    journal, storage = _journal(entries)
    header = SnapshotHeader(last_entry=(b"e6", 6, 2), prev_entry=(b"e5", 5, 2), members=())
    journal.align_with_snapshot(header)
    assert [e[1] for e in journal[:]] == [5, 6, 7, 8, 9, 10]
    assert [e.index for e in storage.open().entries] == [5, 6, 7, 8, 9, 10]
    storage.close()


def test_journal_behind_the_snapshot_is_left_for_the_engine() -> None:
    entries = [LogEntry(i, 2, b"e%d" % i) for i in range(1, 4)]
    journal, storage = _journal(entries)
    header = SnapshotHeader(last_entry=(b"e9", 9, 2), prev_entry=(b"e8", 8, 2), members=())
    journal.align_with_snapshot(header)
    assert [e[1] for e in journal[:]] == [1, 2, 3]
    storage.close()
