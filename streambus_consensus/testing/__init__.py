"""Test helpers for systems built on streambus_consensus.

Re-exported here: :mod:`~streambus_consensus.testing.linearizability`, which
checks recorded client histories for linearizability (Wing & Gong search with
Lowe's memoization, as in porcupine) and ships models of a register and of the
StreamBus topic metadata operations. It imports nothing from the package but
the exception tree.

Import :mod:`~streambus_consensus.testing.harness` (real node processes on
loopback) explicitly; it is not imported here, so checking histories stays
light.
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
