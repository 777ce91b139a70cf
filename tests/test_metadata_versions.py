"""Metadata versions (feature levels) in the state machine: what each release
reads, what the cluster has finalized, and how replicas of different releases
stay identical or stop."""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path

import pytest

from streambus_consensus import codec
from streambus_consensus.errors import ReplicaHaltError, UnsupportedMetadataVersionError
from streambus_consensus.metadata import (
    Command,
    CreateTopic,
    DeleteTopic,
    FenceBroker,
    MetadataStateMachine,
    NoOp,
    RefusalCode,
    RegisterBroker,
    RequestId,
    SetMetadataVersion,
    UnfenceBroker,
    encode_command,
)
from streambus_consensus.metadata.commands import AlterTopicConfig, supported_metadata_versions
from streambus_consensus.testing import next_level

CURRENT = supported_metadata_versions()[1]
"""The highest metadata version of this release (the "old" one of these tests)."""
NEXT = CURRENT + 1
"""The version :mod:`next_level` introduces (the "new" release)."""

GOLDEN_V1 = Path(__file__).parent / "data" / "metadata_snapshot_v1.bin"
"""A snapshot written by the release before metadata versions existed, of
the state :func:`golden_commands` builds."""


def golden_commands() -> list[Command]:
    seqs = iter(range(1, 100))

    def rid() -> RequestId:
        return RequestId("golden", next(seqs))

    def uid(n: int) -> str:
        return str(uuid.UUID(int=n))

    out: list[Command] = []
    for b in range(3):
        out.append(RegisterBroker(request_id=rid(), broker_id=b, endpoint=f"h{b}:9092",
                                  rack=f"r{b % 2}", incarnation_id=uid(b + 1)))
        out.append(UnfenceBroker(request_id=rid(), broker_id=b))
    out.append(CreateTopic(request_id=rid(), name="orders", topic_id=uid(100), partitions=4,
                           replication_factor=3, config={"retention.ms": 1000},
                           placement_offset=7))
    out.append(CreateTopic(request_id=rid(), name="audit", topic_id=uid(101), partitions=2,
                           replication_factor=2, placement_offset=0))
    out.append(FenceBroker(request_id=rid(), broker_id=2))
    out.append(AlterTopicConfig(request_id=rid(), name="audit",
                                set_configs={"cleanup.policy": "compact"}))
    out.append(DeleteTopic(request_id=rid(), name="audit"))
    return out



def built(commands: list[Command] | None = None) -> MetadataStateMachine:
    fsm = MetadataStateMachine()
    for command in golden_commands() if commands is None else commands:
        assert fsm.apply(encode_command(command)).ok
    return fsm


def set_retention(seq: int, retention_ms: int = 5) -> bytes:
    """The next release's new command, encoded as that release writes it."""
    with next_level.installed():
        return encode_command(next_level.SetRetention(  # type: ignore[arg-type]
            request_id=RequestId("new", seq), name="orders", retention_ms=retention_ms))


def upgrade(seq: int, level: int = NEXT) -> bytes:
    return encode_command(SetMetadataVersion(request_id=RequestId("admin", seq), level=level))


# --------------------------------------------------------------------------
# Data written before metadata versions existed


def test_an_old_snapshot_restores_at_version_1_and_is_written_back_byte_identical() -> None:
    golden = GOLDEN_V1.read_bytes()
    fsm = MetadataStateMachine()
    fsm.restore(golden)
    assert fsm.image() == built().image()
    assert fsm.image().metadata_version == 1
    # A cluster at version 1 writes the old format: older nodes can read it.
    assert fsm.snapshot() == golden == built().snapshot()


def test_a_fresh_state_is_at_metadata_version_1() -> None:
    fsm = MetadataStateMachine()
    assert fsm.image().metadata_version == 1
    assert codec.decode(fsm.snapshot())[1] == 1  # type: ignore[index]


# --------------------------------------------------------------------------
# Finalizing a version


def test_finalizing_a_version_this_release_reads_changes_nothing_else() -> None:
    with next_level.installed():
        fsm = built()
        before = fsm.image()
        result = fsm.apply(upgrade(1))
        assert result.ok and result.changes == ()
        after = fsm.image()
        assert after.metadata_version == NEXT and after.offset == before.offset + 1
        assert (after.brokers, after.topics, after.partitions) == (
            before.brokers, before.topics, before.partitions)
        again = fsm.apply(upgrade(2))
        assert again.ok and fsm.image().metadata_version == NEXT  # same level: a no-op


def test_a_downgrade_is_refused_on_every_replica() -> None:
    with next_level.installed():
        fsm = built()
        assert fsm.apply(upgrade(1)).ok
        result = fsm.apply(upgrade(2, level=1))
    assert not result.ok and result.code == RefusalCode.INVALID_METADATA_VERSION
    assert "downgrades are not supported" in result.message
    assert fsm.image().metadata_version == NEXT


def test_a_replica_that_cannot_read_the_finalized_version_halts() -> None:
    fsm = built()
    before = fsm.image()
    with pytest.raises(ReplicaHaltError, match=r"cannot apply log entry 12: the cluster needs "
                       rf"metadata version {NEXT}; this software supports 1\.\.{CURRENT}") as info:
        fsm.apply(upgrade(1))
    assert info.value.index == before.offset + 1
    assert fsm.image() is before


# --------------------------------------------------------------------------
# Commands of a version the cluster has not finalized


def test_a_newer_command_is_refused_alike_by_old_and_new_replicas() -> None:
    old = built()
    with next_level.installed():
        new = built()
        answer_new = new.apply(set_retention(1))
    answer_old = old.apply(set_retention(1))
    assert answer_new == answer_old
    assert not answer_old.ok and answer_old.code == RefusalCode.FEATURE_NOT_ENABLED
    assert f"needs metadata version {NEXT}; the cluster's is 1" in answer_old.message
    # Identical state, remembered results included: nothing diverged.
    assert old.snapshot() == new.snapshot() == built([*golden_commands(), NoOp(
        request_id=RequestId("x", 1))]).snapshot()


def test_a_command_refused_before_the_upgrade_applies_when_retried_after() -> None:
    with next_level.installed():
        fsm = built()
        assert fsm.apply(set_retention(1)).code == RefusalCode.FEATURE_NOT_ENABLED
        assert fsm.apply(upgrade(1)).ok
        result = fsm.apply(set_retention(1))  # the same request id
        assert result.ok and not result.duplicate
        assert fsm.image().topics["orders"].config.retention_ms == 5


def test_after_the_upgrade_an_old_replica_halts_on_a_newer_command() -> None:
    with next_level.installed():
        new = built([*golden_commands()])
        assert new.apply(upgrade(1)).ok
        snapshot_v2 = new.snapshot()
    old = MetadataStateMachine()
    with pytest.raises(UnsupportedMetadataVersionError,
                       match=f"the snapshot needs metadata version {NEXT}; this software "
                             rf"supports 1\.\.{CURRENT}"):
        old.restore(snapshot_v2)
    assert old.image().offset == 0  # left as it was
    # Could the old release have got here by log replay, it stops at the entry.
    with next_level.installed():
        again = MetadataStateMachine()
        again.restore(snapshot_v2)
        assert again.snapshot() == snapshot_v2
        assert again.apply(set_retention(2, 9)).ok
    lagging = built()  # as if the old release had replayed the upgrade
    lagging._image = dataclasses.replace(lagging.image(), metadata_version=NEXT)
    with pytest.raises(ReplicaHaltError, match="command 'test_set_retention' needs metadata "
                                               f"version {NEXT}"):
        lagging.apply(set_retention(2, 9))


def test_an_undecodable_command_at_a_finalized_version_halts() -> None:
    fsm = built()
    before = fsm.image()
    for data in (codec.encode((1, "no_such_command", ("c", 1))),
                 codec.encode((1, "no_op", ("c", 1), "extra")),
                 b"\x00garbage"):
        with pytest.raises(ReplicaHaltError, match="undecodable command at metadata version 1"):
            fsm.apply(data)
        assert fsm.image() is before
