"""Corrections to PySyncObj's handling of incoming messages.

Each rule is a fix for an engine defect that can report SUCCESS for an entry
that is not committed, or drop an entry it has acknowledged. They are
documented, with triggers and upstream write-ups, in ``docs/engine-issues.md``.
The guard sits between our transport and the engine and may rewrite or
answer a message before the engine sees it; it never touches engine state.

Rule 1 (engine issue E1, *commit index raised over an unverified log*).
    PySyncObj ends its ``append_entries`` handling with
    ``commit = min(leader_commit, own_last_index)`` even for messages that
    carry no ``prevLogIdx`` (snapshot chunks and the leader's "snapshot not
    ready" message), i.e. without checking that its log matches the leader's.
    A deposed leader holding uncommitted entries then applies them and
    acknowledges them to clients. Raft (§5.3) lets a follower advance its
    commit index only up to the last entry it has verified against the
    leader. Fix: in such messages, lower ``commit_index`` to the follower's
    current commit index. The next regular ``append_entries`` (which does
    verify) carries the commit index forward.

Rule 2 (engine issue E2, *matching entries truncated by a stale append*).
    On any ``append_entries`` whose ``prevLogIdx`` matches, PySyncObj deletes
    every entry after ``prevLogIdx`` before appending, even when the message's
    entries all match and the follower's log is longer (a re-sent or delayed
    batch after the leader rewound ``nextIndex``). The follower then briefly
    lacks entries it has acknowledged, which the leader may already count
    towards a commit; a crash in that window loses them, and when they were
    applied the engine logs CRITICAL "truncating already-applied log
    entries". Raft (§5.3) deletes only from the first *conflicting* entry.
    Fix: find how many leading entries of the message the log already holds
    (same index and term). When it holds them all and extends past them,
    acknowledge the message's last index directly and do not hand it to the
    engine. Otherwise hand the engine only the rest, with ``prevLogIdx`` /
    ``prevLogTerm`` moved to the last held entry: it deletes nothing when the
    rest extends the log, and from the first conflict when there is one.

Rule 3 (engine issue E22, *a conflicting suffix is walked back one entry per
round trip*).
    When the entry at ``prevLogIdx`` has another term than ``prevLogTerm``,
    PySyncObj answers ``next_node_idx = prevLogIdx``: the leader steps back
    one entry per round trip. A deposed leader that appended a few hundred
    writes it could not commit then keeps the new leader from committing
    anything for up to a second after a partition heals (its vote is needed
    when the third node is down). Raft (§5.3) notes the fix: name the first
    index of the conflicting term, so the leader bypasses the whole run.
    Fix: move ``prevLogIdx`` back, before the engine sees the message, over
    every entry that cannot match the leader's: those of the conflicting
    term, and those of a term above ``prevLogTerm`` (a leader's terms never
    decrease along its log), never to or below the commit index (committed
    entries match). The entry it lands on has another term than
    ``prevLogTerm``, so the engine itself answers with that index, after
    adopting the sender's term and leadership as usual.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .engine import Engine, Member

__all__ = ["MessageGuard"]

logger = logging.getLogger(__name__)


class MessageGuard:
    """Applies the rules above to every incoming message.

    Args:
        enabled: ``False`` passes every message through untouched. Only the
            regression tests that prove each rule is needed turn it off.
    """

    def __init__(self, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self._engine: Engine | None = None
        self.commit_clamps = 0
        """How many times rule 1 lowered a commit index."""
        self.stale_appends = 0
        """How many stale appends rule 2 answered or trimmed so nothing held is truncated."""
        self.conflict_skips = 0
        """How many conflicting runs rule 3 skipped in one round trip."""

    def attach(self, engine: Engine) -> None:
        """Bind to the engine whose log the rules inspect."""
        self._engine = engine

    def inspect(self, node: Member, message: dict[str, Any]) -> dict[str, Any] | None:
        """Return the message to deliver (possibly rewritten), or ``None`` to drop it."""
        engine = self._engine
        if not self.enabled or engine is None or message.get("type") != "append_entries":
            return message
        if "prevLogIdx" not in message:
            return self._clamp_commit(engine, message)
        skipped = self._skip_conflicting_run(engine, message)
        if skipped is not None:
            return skipped
        return self._answer_stale_append(engine, node, message)

    def _skip_conflicting_run(self, engine: Engine, message: dict[str, Any]
                              ) -> dict[str, Any] | None:
        """Rule 3: the message with ``prevLogIdx`` moved back over the
        conflicting run, or ``None`` when there is nothing to skip."""
        prev_index, prev_term = message.get("prevLogIdx"), message.get("prevLogTerm")
        term = message.get("term")
        if ("transmission" in message or not isinstance(prev_index, int)
                or not isinstance(prev_term, int) or not isinstance(term, int)
                or term < engine.term):
            return None
        journal = engine.journal
        if not len(journal):
            return None
        first = journal[0][1]
        if not first <= prev_index <= journal[-1][1]:
            return None
        ours = journal[prev_index - first][2]
        if ours == prev_term:
            return None
        floor = max(engine.commit_index, first)
        back = prev_index
        while back - 1 > floor:
            before = journal[back - 1 - first][2]
            if before != ours and before <= prev_term:
                break  # may match the leader's entry: let the leader try there
            back -= 1
        if back == prev_index:
            return None
        self.conflict_skips += 1
        return {**message, "prevLogIdx": back}

    def _clamp_commit(self, engine: Engine, message: dict[str, Any]) -> dict[str, Any]:
        ours = engine.commit_index
        leader_commit = message.get("commit_index")
        if isinstance(leader_commit, int) and leader_commit > ours:
            message["commit_index"] = ours
            self.commit_clamps += 1
        return message

    def _answer_stale_append(
        self, engine: Engine, node: Member, message: dict[str, Any]
    ) -> dict[str, Any] | None:
        entries = message.get("entries")
        term = message.get("term")
        if (not entries or "transmission" in message or not isinstance(term, int)
                or term < engine.term):
            return message  # heartbeats, pieces of a large entry, and what the engine refuses
        journal = engine.journal
        if not len(journal):
            return message
        first = journal[0][1]
        last_index = journal[-1][1]
        held = 0  # leading entries of the batch the log already holds
        for _command, index, entry_term in entries:
            position = index - first
            if position < 0 or index > last_index or journal[position][2] != entry_term:
                break  # compacted (not assumed to match), past our end, or a conflict
            held += 1
        if held == 0:
            return message
        message_last = entries[-1][1]
        if held == len(entries) and message_last < last_index:
            if term != engine.term or engine.leader_id != node.id:
                return message  # a new leader: the engine must adopt it first
            self.stale_appends += 1
            # Everything is held and the log goes on: acknowledge it as the
            # engine would after appending, without deleting what follows.
            engine.send(node.id, {
                "type": "next_node_idx",
                "next_node_idx": message_last + 1,
                "reset": False,
                "success": True,
            })
            return None
        # Hand the engine the part that is not held, after the last held entry,
        # which the engine then verifies as prevLogIdx/prevLogTerm: it deletes
        # nothing when the rest extends the log, and from the first conflict
        # otherwise, as Raft requires.
        self.stale_appends += 1
        _command, prev_index, prev_term = entries[held - 1]
        return {**message, "prevLogIdx": prev_index, "prevLogTerm": prev_term,
                "entries": list(entries[held:])}
