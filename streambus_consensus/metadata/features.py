"""Feature levels across the voters: who reads which metadata versions.

Each node answers, over the cluster's authenticated links, with the range of
metadata versions its software reads (:func:`~.commands.supported_metadata_versions`).
Before the cluster's version is raised (:meth:`.store.MetadataStore.upgrade_metadata_version`),
every voter is asked; a voter that does not answer in time counts as not
supporting the new version, so the upgrade is refused rather than risked.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Mapping
from typing import Any

from ..raft.node import RaftNode
from .commands import supported_metadata_versions

__all__ = ["VoterFeatures"]

_ASK = "app:features?"
_ANSWER = "app:features"


class VoterFeatures:
    """Asks the voters for their supported metadata versions and answers them.

    Args:
        node: the local node; :meth:`start` subscribes to its app messages.
    """

    def __init__(self, node: RaftNode) -> None:
        self._node = node
        self._nonces = itertools.count(1)
        self._answers: dict[int, dict[str, tuple[int, int]]] = {}
        self._cond = threading.Condition()

    def start(self) -> None:
        """Answer peers' questions and collect their answers (node worker thread)."""
        self._node.on_app_message(self._on_message)

    def _on_message(self, peer: str, message: Mapping[str, Any]) -> None:
        kind = message.get("type")
        nonce = message.get("nonce")
        if type(nonce) is not int:
            return
        if kind == _ASK:
            low, high = supported_metadata_versions()
            self._node.send_app_message(peer, {"type": _ANSWER, "nonce": nonce,
                                               "min": low, "max": high})
        elif kind == _ANSWER:
            lowest, highest = message.get("min"), message.get("max")
            if type(lowest) is int and type(highest) is int:
                with self._cond:
                    answers = self._answers.get(nonce)
                    if answers is not None:
                        answers[peer] = (lowest, highest)
                        self._cond.notify_all()

    def ask_voters(self, timeout: float) -> dict[str, tuple[int, int] | None]:
        """``{voter: (lowest, highest) or None}`` for every voting member, this
        node included; ``None`` for a voter that did not answer within ``timeout``."""
        voters = sorted(self._node.members())
        nonce = next(self._nonces)
        me = self._node.node_id
        with self._cond:
            self._answers[nonce] = {me: supported_metadata_versions()}
        try:
            for voter in voters:
                if voter != me:
                    self._node.send_app_message(voter, {"type": _ASK, "nonce": nonce})
            deadline = time.monotonic() + timeout
            with self._cond:
                while True:
                    answers = dict(self._answers[nonce])
                    remaining = deadline - time.monotonic()
                    if all(v in answers for v in voters) or remaining <= 0:
                        break
                    self._cond.wait(remaining)
        finally:
            with self._cond:
                self._answers.pop(nonce, None)
        return {voter: answers.get(voter) for voter in voters}
