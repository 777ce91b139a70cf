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
        return self._answer_stale_append(engine, node, message)

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
