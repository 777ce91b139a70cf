"""Test helpers for systems built on streambus_consensus.

:mod:`~streambus_consensus.testing.linearizability` checks recorded client
histories for linearizability (Wing & Gong search with Lowe's memoization, as
in porcupine) and ships models of a register and of the StreamBus topic
metadata operations.
"""

from __future__ import annotations

from .linearizability import (
    UNKNOWN_OUTPUT,
    CheckOutcome,
    CheckResult,
    History,
    HistoryError,
    MetadataState,
    Model,
    Operation,
    OperationHandle,
    PartitionResult,
    TopicState,
    UnknownOutput,
    check_operations,
    history_from_json,
    history_to_json,
    load_history,
    metadata_model,
    partition_by_key,
    register_model,
    save_history,
)

__all__ = [
    "UNKNOWN_OUTPUT",
    "CheckOutcome",
    "CheckResult",
    "History",
    "HistoryError",
    "MetadataState",
    "Model",
    "Operation",
    "OperationHandle",
    "PartitionResult",
    "TopicState",
    "UnknownOutput",
    "check_operations",
    "history_from_json",
    "history_to_json",
    "load_history",
    "metadata_model",
    "partition_by_key",
    "register_model",
    "save_history",
]
