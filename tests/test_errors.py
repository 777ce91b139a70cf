"""The one exception tree (STYLE habit 8): every error derives from
ConsensusError, carries a ``retriable`` flag, and the context it documents."""

from __future__ import annotations

import inspect

import pytest

from streambus_consensus import errors
from streambus_consensus.errors import (
    CodecError,
    CommandRefusedError,
    CommandTooLargeError,
    ConfigError,
    ConsensusError,
    CorruptStorageError,
    EngineCompatibilityError,
    LeadershipLostError,
    MemberNotCaughtUpError,
    NodeStoppedError,
    NoLeaderError,
    NotLeaderError,
    OutcomeUnknownError,
    ProposalDiscardedError,
    ProposalRejectedError,
    ProposalTimeoutError,
    QueueFullError,
    ReplicaHaltError,
    RequestDeniedError,
    StorageError,
    TransportError,
    UnsupportedMetadataVersionError,
)

# (class, its direct documented parent, retriable)
TREE: list[tuple[type[ConsensusError], type[Exception], bool]] = [
    (ConfigError, ConsensusError, False),
    (CodecError, ConsensusError, False),
    (StorageError, ConsensusError, False),
    (CorruptStorageError, StorageError, False),
    (TransportError, ConsensusError, False),
    (NodeStoppedError, ConsensusError, False),
    (ProposalRejectedError, ConsensusError, True),
    (NotLeaderError, ProposalRejectedError, True),
    (NoLeaderError, ProposalRejectedError, True),
    (QueueFullError, ProposalRejectedError, True),
    (ProposalDiscardedError, ProposalRejectedError, True),
    (CommandTooLargeError, ProposalRejectedError, False),
    (RequestDeniedError, ConsensusError, True),
    (OutcomeUnknownError, ConsensusError, True),
    (ProposalTimeoutError, OutcomeUnknownError, True),
    (LeadershipLostError, OutcomeUnknownError, True),
    (CommandRefusedError, ConsensusError, False),
    (MemberNotCaughtUpError, CommandRefusedError, False),
    (UnsupportedMetadataVersionError, CodecError, False),
    (ReplicaHaltError, ConsensusError, False),
    (EngineCompatibilityError, ConsensusError, False),
]


def _public_classes() -> set[type]:
    return {
        obj for name, obj in vars(errors).items()
        if inspect.isclass(obj) and issubclass(obj, BaseException) and not name.startswith("_")
        and obj.__module__ == errors.__name__
    }


def test_all_lists_every_error_class_sorted() -> None:
    assert sorted(errors.__all__) == errors.__all__
    assert {getattr(errors, n) for n in errors.__all__} == _public_classes()


def test_tree_table_covers_every_class() -> None:
    assert {cls for cls, _, _ in TREE} | {ConsensusError} == _public_classes()


def test_root_is_an_exception_and_not_retriable() -> None:
    assert issubclass(ConsensusError, Exception)
    assert ConsensusError.retriable is False
    exc = ConsensusError("boom", node_id="n1")
    assert str(exc) == "boom"
    assert exc.node_id == "n1"
    assert ConsensusError("boom").node_id is None


@pytest.mark.parametrize(
    ("cls", "parent", "retriable"), TREE, ids=lambda v: getattr(v, "__name__", str(v))
)
def test_class_position_and_retriable_flag(
    cls: type[ConsensusError], parent: type[Exception], retriable: bool
) -> None:
    assert issubclass(cls, ConsensusError)
    assert parent in cls.__bases__
    assert cls.retriable is retriable
    assert cls.__doc__ and cls.__doc__.strip()


def test_rejected_and_unknown_outcomes_are_disjoint() -> None:
    # "not applied, retry is safe" and "may have been applied" must never overlap.
    rejected = {cls for cls, _, _ in TREE if issubclass(cls, ProposalRejectedError)}
    unknown = {cls for cls, _, _ in TREE if issubclass(cls, OutcomeUnknownError)}
    assert rejected == {ProposalRejectedError, NotLeaderError, NoLeaderError, QueueFullError,
                        ProposalDiscardedError, CommandTooLargeError}
    assert unknown == {OutcomeUnknownError, ProposalTimeoutError, LeadershipLostError}
    assert not rejected & unknown


def test_value_errors_are_also_value_errors() -> None:
    assert issubclass(ConfigError, ValueError)
    assert issubclass(CodecError, ValueError)
    with pytest.raises(ValueError, match="bad"):
        raise CodecError("bad")


def test_not_leader_error_carries_leader_hint_and_node() -> None:
    exc = NotLeaderError("not the leader", leader_hint="n2", node_id="n1")
    assert exc.leader_hint == "n2"
    assert exc.node_id == "n1"
    assert exc.retriable is True
    assert str(exc) == "not the leader"
    assert NotLeaderError("no idea").leader_hint is None


def test_corrupt_storage_error_carries_path_offset_and_detail() -> None:
    exc = CorruptStorageError("/data/wal.log", "record checksum mismatch", offset=4242)
    assert exc.path == "/data/wal.log"
    assert exc.offset == 4242
    assert exc.detail == "record checksum mismatch"
    message = str(exc)
    assert message.startswith("/data/wal.log: record checksum mismatch")
    assert "at byte 4242" in message
    assert "refusing to start" in message
    assert isinstance(exc, StorageError)


def test_corrupt_storage_error_without_offset() -> None:
    exc = CorruptStorageError("/data/snapshot.bin", "unsupported version 9")
    assert exc.offset is None
    assert "at byte" not in str(exc)
    assert str(exc).startswith("/data/snapshot.bin: unsupported version 9")


def test_config_error_names_field_and_quotes_value() -> None:
    exc = ConfigError("heartbeat_interval", -1.5, "must be a number > 0")
    assert (exc.field, exc.value, exc.rule) == ("heartbeat_interval", -1.5, "must be a number > 0")
    assert str(exc) == "invalid config heartbeat_interval=-1.5: must be a number > 0"
    assert exc.retriable is False


def test_command_refused_error_carries_code() -> None:
    exc = CommandRefusedError("topic_exists", "topic 'orders' already exists", node_id="n3")
    assert exc.code == "topic_exists"
    assert exc.node_id == "n3"
    assert str(exc) == "topic_exists: topic 'orders' already exists"
    assert not isinstance(exc, ProposalRejectedError | OutcomeUnknownError)


def test_unsupported_metadata_version_names_what_needs_what() -> None:
    exc = UnsupportedMetadataVersionError("the snapshot", 3, (1, 2))
    assert (exc.required, exc.supported) == (3, (1, 2))
    assert str(exc) == ("the snapshot needs metadata version 3; this software supports 1..2 "
                        "(run a release that supports 3)")
    assert isinstance(exc, CodecError)


def test_member_not_caught_up_is_a_refusal_naming_the_member() -> None:
    exc = MemberNotCaughtUpError("n4", "it never answered", node_id="n1")
    assert (exc.member, exc.reason, exc.code, exc.node_id) == (
        "n4", "it never answered", "member_not_caught_up", "n1")
    assert isinstance(exc, CommandRefusedError) and not exc.retriable
    assert str(exc) == ("member_not_caught_up: not adding n4: it never answered; it was removed "
                        "again and the voters are unchanged")


def test_replica_halt_names_the_entry() -> None:
    exc = ReplicaHaltError(42, "undecodable", node_id="n2")
    assert exc.index == 42 and exc.node_id == "n2" and not exc.retriable
    assert str(exc) == ("cannot apply log entry 42: undecodable; stopping this replica "
                        "rather than diverge")


@pytest.mark.parametrize("cls", [cls for cls, _, _ in TREE if cls not in
                                 (ConfigError, CorruptStorageError, CommandRefusedError,
                                  UnsupportedMetadataVersionError, ReplicaHaltError,
                                  MemberNotCaughtUpError)])
def test_simple_errors_accept_message_and_node_id(cls: type[ConsensusError]) -> None:
    exc = cls("went wrong", node_id="n9")
    assert str(exc) == "went wrong"
    assert exc.node_id == "n9"
    with pytest.raises(ConsensusError):
        raise exc
