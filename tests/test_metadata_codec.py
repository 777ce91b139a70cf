"""The metadata command codec, the records, and the package's public surface."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import streambus_consensus.metadata as metadata
from streambus_consensus import codec
from streambus_consensus.errors import CodecError, ConfigError, UnsupportedMetadataVersionError
from streambus_consensus.metadata import (
    BATCH_CREATE_VERSION,
    ELECTION_KINDS,
    FORMAT_VERSION,
    TOPIC_CONFIG_KEYS,
    AddPartitions,
    AlterIsr,
    AlterTopicConfig,
    BeginControlledShutdown,
    Broker,
    BrokerState,
    Command,
    CreateTopic,
    CreateTopics,
    DeleteTopic,
    ElectLeaders,
    FenceBroker,
    NoOp,
    Partition,
    Read,
    ReassignReplicas,
    RegisterBroker,
    RequestId,
    SetMetadataVersion,
    TopicConfig,
    UnfenceBroker,
    UnregisterBroker,
    command_level,
    command_type,
    decode_command,
    encode_command,
    register_command,
    supported_metadata_versions,
)
from streambus_consensus.testing import next_level

INT31 = 2**31 - 1
INT63 = 2**63 - 1

# --------------------------------------------------------------------------
# Strategies: every command, with every field anywhere in its accepted range.

texts = st.text(max_size=20)
names = st.text(max_size=30)
broker_ids = st.integers(0, INT31)
epochs = st.integers(0, INT63)
counts = st.integers(-(2**31), INT31)
request_ids = st.builds(RequestId, st.text(min_size=1, max_size=20), st.integers(0, INT63))
configs = st.dictionaries(
    st.text(min_size=1, max_size=20),
    st.one_of(st.text(max_size=20), st.integers(-(2**63), INT63)),
    max_size=5,
)
uuids = st.uuids().map(str)

commands: st.SearchStrategy[Command] = st.one_of(
    st.builds(RegisterBroker, request_id=request_ids, broker_id=broker_ids, endpoint=texts,
              rack=st.none() | texts, incarnation_id=uuids, fenced=st.booleans()),
    st.builds(UnregisterBroker, request_id=request_ids, broker_id=broker_ids),
    st.builds(FenceBroker, request_id=request_ids, broker_id=broker_ids,
              broker_epoch=st.none() | epochs),
    st.builds(UnfenceBroker, request_id=request_ids, broker_id=broker_ids,
              broker_epoch=st.none() | epochs),
    st.builds(BeginControlledShutdown, request_id=request_ids, broker_id=broker_ids,
              broker_epoch=st.none() | epochs),
    st.builds(CreateTopic, request_id=request_ids, name=names, topic_id=uuids,
              partitions=counts, replication_factor=counts, config=configs,
              placement_offset=epochs),
    st.builds(DeleteTopic, request_id=request_ids, name=names, topic_id=st.none() | uuids),
    st.builds(AlterTopicConfig, request_id=request_ids, name=names, set_configs=configs,
              delete_configs=st.lists(st.text(min_size=1, max_size=10), max_size=3).map(tuple)),
    st.builds(AddPartitions, request_id=request_ids, name=names, new_total=counts,
              placement_offset=epochs),
    st.builds(ElectLeaders, request_id=request_ids, topic=names,
              partition=st.none() | st.integers(0, INT31), kind=st.sampled_from(ELECTION_KINDS)),
    st.builds(AlterIsr, request_id=request_ids, topic=names, partition=st.integers(0, INT31),
              leader=broker_ids, leader_epoch=epochs,
              new_isr=st.lists(broker_ids, max_size=5).map(tuple), partition_epoch=epochs),
    st.builds(ReassignReplicas, request_id=request_ids, topic=names,
              partition=st.integers(0, INT31),
              replicas=st.lists(broker_ids, max_size=5).map(tuple)),
    st.builds(Read, request_id=request_ids, name=st.none() | names),
    st.builds(NoOp, request_id=request_ids),
)


@settings(max_examples=400, deadline=None)
@given(commands)
def test_every_command_round_trips(cmd: Command) -> None:
    data = encode_command(cmd)
    assert decode_command(data) == cmd
    assert encode_command(decode_command(data)) == data


def test_wire_layout_is_versioned_and_flat() -> None:
    cmd = FenceBroker(request_id=RequestId("c", 7), broker_id=3)
    assert codec.decode(encode_command(cmd)) == (FORMAT_VERSION, "fence_broker", ("c", 7), 3, None)
    assert command_type(cmd) == "fence_broker"


def test_equal_configs_encode_equally_whatever_their_order() -> None:
    def create(config: dict[str, str | int]) -> CreateTopic:
        return CreateTopic(request_id=RequestId("c", 1), name="t", topic_id=str(uuid.UUID(int=1)),
                           partitions=1, replication_factor=1, config=config,
                           placement_offset=0)

    a = create({"retention.ms": 5, "cleanup.policy": "compact"})
    b = create({"cleanup.policy": "compact", "retention.ms": 5})
    assert encode_command(a) == encode_command(b)


def test_commands_are_immutable() -> None:
    cmd = CreateTopic(request_id=RequestId("c", 1), name="t", topic_id="x", partitions=1,
                      replication_factor=1, config={"a": 1}, placement_offset=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cmd.name = "u"  # type: ignore[misc]
    with pytest.raises(TypeError):
        cmd.config["a"] = 2  # type: ignore[index]
    listed = ReassignReplicas(request_id=RequestId("c", 1), topic="t", partition=0,
                              replicas=[1, 2])  # type: ignore[arg-type]
    assert listed.replicas == (1, 2)


# --------------------------------------------------------------------------
# Encoding refuses what could not be decoded


@pytest.mark.parametrize(
    "cmd",
    [
        FenceBroker(request_id=RequestId("c", 1), broker_id="1"),  # type: ignore[arg-type]
        FenceBroker(request_id=RequestId("c", 1), broker_id=True),
        FenceBroker(request_id=RequestId("c", 1), broker_id=-1),
        FenceBroker(request_id=RequestId("c", 1), broker_id=2**31),
        FenceBroker(request_id=RequestId("c", -1), broker_id=1),
        FenceBroker(request_id=RequestId("", 1), broker_id=1),
        FenceBroker(request_id=("c", 1), broker_id=1),  # type: ignore[arg-type]
        CreateTopic(request_id=RequestId("c", 1), name="t", topic_id="x", partitions=1,
                    replication_factor=1, config={"a": 1.5}, placement_offset=0),  # type: ignore[dict-item]
        CreateTopic(request_id=RequestId("c", 1), name="t", topic_id="x", partitions=1,
                    replication_factor=1, config={1: "a"}, placement_offset=0),  # type: ignore[dict-item]
        ElectLeaders(request_id=RequestId("c", 1), topic="t", kind="random"),  # type: ignore[arg-type]
        AlterIsr(request_id=RequestId("c", 1), topic="t", partition=0, leader=1, leader_epoch=0,
                 new_isr=(1, "2"), partition_epoch=0),  # type: ignore[arg-type]
        RegisterBroker(request_id=RequestId("c", 1), broker_id=1, endpoint="h:1",
                       incarnation_id="x", fenced=1),  # type: ignore[arg-type]
    ],
)
def test_encode_refuses_bad_fields(cmd: Command) -> None:
    with pytest.raises(CodecError):
        encode_command(cmd)


def test_encode_refuses_non_commands() -> None:
    with pytest.raises(CodecError, match="not a metadata command"):
        encode_command(RequestId("c", 1))  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# Decoding refuses anything else


GOOD = codec.decode(encode_command(
    AlterIsr(request_id=RequestId("c", 1), topic="t", partition=0, leader=1, leader_epoch=2,
             new_isr=(1, 2), partition_epoch=3)
))


HIGH = supported_metadata_versions()[1]
"""The highest metadata version this release reads."""
NEXT = HIGH + 1
"""The level of the next release (:mod:`streambus_consensus.testing.next_level`)."""


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ([1, "no_op", ("c", 1)], "tuple"),
        ((1,), "tuple"),
        ((3, *GOOD[1:]), "needs metadata version 3; this software supports 1..2"),
        ((0, *GOOD[1:]), "invalid command metadata version 0"),
        (("1", *GOOD[1:]), "invalid command metadata version '1'"),
        ((32768, *GOOD[1:]), "invalid command metadata version 32768"),
        ((1, "launch_missiles", ("c", 1)), "unknown command type"),
        ((1, 7, ("c", 1)), "unknown command type"),
        (GOOD[:-1], "expected 7 fields"),
        ((*GOOD, 0), "expected 7 fields"),
        ((*GOOD[:3], 5, *GOOD[4:]), "expected a string"),
        ((*GOOD[:4], -1, *GOOD[5:]), "out of range"),
        ((*GOOD[:5], True, *GOOD[6:]), "expected an integer"),
        ((*GOOD[:7], [1, 2], *GOOD[8:]), "expected a tuple"),
        ((*GOOD[:7], (1, None), *GOOD[8:]), "expected an integer"),
        ((1, "fence_broker", ("c",), 1, None), "client_id, seq"),
        ((1, "fence_broker", ("c", -5), 1, None), "out of range"),
        ((1, "fence_broker", ("c", 1), 1, "x"), "expected an integer"),
        ((1, "elect_leaders", ("c", 1), "t", None, "sideways"), "is not one of"),
        ((1, "create_topic", ("c", 1), "t", "id", 1, 1, [("a", 1)], 0), "expected a dict"),
        ((1, "create_topic", ("c", 1), "t", "id", 1, 1, {"a": None}, 0), "expected a string"),
        ((1, "register_broker", ("c", 1), 1, "h:1", None, "i", 1), "expected a bool"),
    ],
)
def test_decode_refuses(value: Any, fragment: str) -> None:
    with pytest.raises(CodecError, match=fragment):
        decode_command(codec.encode(value))


def test_a_newer_metadata_version_is_named_in_a_typed_error() -> None:
    with pytest.raises(UnsupportedMetadataVersionError) as info:
        decode_command(codec.encode((4, "from_the_future", ("c", 1))))
    assert (info.value.required, info.value.supported) == (4, (1, 2))
    assert "command 'from_the_future' needs metadata version 4" in str(info.value)


def test_a_command_must_carry_its_own_kinds_version() -> None:
    with next_level.installed() as level:
        assert level == 3 and supported_metadata_versions() == (1, 3)
        command = next_level.SetRetention(request_id=RequestId("c", 1), name="t",
                                          retention_ms=5)
        data = encode_command(command)  # type: ignore[arg-type]
        assert codec.decode(data)[0] == 3  # type: ignore[index]
        assert decode_command(data) == command
        with pytest.raises(CodecError, match="test_set_retention is a metadata version 3 "
                                             "command, not version 1"):
            decode_command(codec.encode((1, "test_set_retention", ("c", 1), "t", 5)))
        with pytest.raises(CodecError, match="no_op is a metadata version 1 command"):
            decode_command(codec.encode((3, "no_op", ("c", 1))))
        with pytest.raises(ValueError, match="already registered"):
            register_command(next_level.SetRetention, "again", {}, level=3)
        with pytest.raises(ValueError, match="skips 4"):
            register_command(type("Skip", (), {}), "skip", {}, level=5)
    assert supported_metadata_versions() == (1, 2)
    with pytest.raises(UnsupportedMetadataVersionError):
        decode_command(data)


def test_every_kind_of_the_first_release_is_metadata_version_1() -> None:
    assert supported_metadata_versions() == (1, BATCH_CREATE_VERSION)
    assert FORMAT_VERSION == 1 and BATCH_CREATE_VERSION == 2
    batch = CreateTopics(request_id=RequestId("c", 1), topics=())
    assert command_level(batch) == 2 and codec.decode(encode_command(batch))[0] == 2  # type: ignore[index]
    for command in (NoOp(request_id=RequestId("c", 1)),
                    SetMetadataVersion(request_id=RequestId("c", 1), level=2)):
        assert command_level(command) == 1
        assert codec.decode(encode_command(command))[0] == 1  # type: ignore[index]
    with pytest.raises(CodecError, match="not a metadata command"):
        command_level("no_op")  # type: ignore[arg-type]


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_decode_random_bytes_raises_only_codec_error(data: bytes) -> None:
    with contextlib.suppress(CodecError):
        decode_command(data)


plain = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), INT63) | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.lists(inner, max_size=8).map(tuple)
    | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=20,
)


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from(["alter_isr", "create_topic", "elect_leaders", "fence_broker", "no_op",
                     "register_broker"]),
    st.lists(plain, max_size=8),
)
def test_decode_random_plain_data_raises_only_codec_error(name: str, fields: list[Any]) -> None:
    data = codec.encode((FORMAT_VERSION, name, *fields))
    try:
        cmd = decode_command(data)
    except CodecError:
        return
    assert command_type(cmd) == name
    encode_command(cmd)  # whatever decodes can be encoded again


# --------------------------------------------------------------------------
# Records


def test_topic_config_defaults_are_kafkas() -> None:
    config = TopicConfig()
    assert config.retention_ms == 7 * 24 * 3600 * 1000
    assert config.segment_bytes == 1024**3
    assert config.min_insync_replicas == 1
    assert config.cleanup_policy == "delete"
    assert config.compression == "producer"
    assert config.overrides() == {}
    assert list(config.to_dict()) == list(TOPIC_CONFIG_KEYS) == sorted(TOPIC_CONFIG_KEYS)


def test_topic_config_parses_kafka_text() -> None:
    config = TopicConfig().updated({
        "retention.ms": "-1", "segment.bytes": 1 << 20, "min.insync.replicas": " 2 ",
        "cleanup.policy": "Delete, compact", "compression.type": "LZ4",
    })
    assert config == TopicConfig(-1, 1 << 20, 2, "compact,delete", "lz4")
    assert config.get("cleanup.policy") == "compact,delete"
    assert config.updated({}, ["retention.ms"]).retention_ms == TopicConfig().retention_ms
    assert config.updated({}) is config


@pytest.mark.parametrize(
    ("set_configs", "delete", "fragment"),
    [
        ({"bogus": 1}, (), "unknown topic config key"),
        ({}, ("bogus",), "unknown topic config key"),
        ({"retention.ms": 1}, ("retention.ms",), "both set and deleted"),
        ({"retention.ms": "1e3"}, (), "must be an integer"),
        ({"retention.ms": "--5"}, (), "must be an integer"),
        ({"retention.ms": True}, (), "must be an integer"),
        ({"retention.ms": -2}, (), "must be in -1.."),
        ({"segment.bytes": 2**31}, (), "must be in 14.."),
        ({"min.insync.replicas": 0}, (), "must be in 1.."),
        ({"cleanup.policy": "never"}, (), "must be one of"),
        ({"compression.type": "brotli"}, (), "must be one of"),
        ({"compression.type": 1}, (), "must be a string"),
    ],
)
def test_topic_config_refuses(
    set_configs: dict[str, str | int], delete: tuple[str, ...], fragment: str
) -> None:
    with pytest.raises(ConfigError, match=fragment):
        TopicConfig().updated(set_configs, delete)


def test_topic_config_validates_direct_construction() -> None:
    with pytest.raises(ConfigError):
        TopicConfig(compression="Zstd")
    with pytest.raises(ConfigError):
        TopicConfig(min_insync_replicas=0)
    with pytest.raises(ConfigError):
        TopicConfig().get("nope")


def test_records_are_readable_and_immutable() -> None:
    assert str(BrokerState.SHUTTING_DOWN) == "shutting_down"
    broker = Broker(1, "h:1", None, str(uuid.UUID(int=1)), 5, BrokerState.ACTIVE)
    assert broker.is_active
    with pytest.raises(dataclasses.FrozenInstanceError):
        broker.state = BrokerState.FENCED  # type: ignore[misc]
    p = Partition("t", 0, (1, 2), (1,), None, 3, 4)
    assert p.is_offline and not p.recovering


# --------------------------------------------------------------------------
# The public surface


def _isort_key(name: str) -> tuple[int, str]:
    """ruff's RUF022 order: CONSTANTS, then Classes, then functions."""
    return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)


def test_public_surface_is_sorted_and_documented() -> None:
    names = metadata.__all__
    assert names == sorted(names, key=_isort_key)
    assert len(set(names)) == len(names)
    for name in names:
        value = getattr(metadata, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            assert inspect.getdoc(value), f"{name} has no docstring"
            for attr, member in vars(value).items():
                if not attr.startswith("_") and inspect.isfunction(member):
                    assert inspect.getdoc(member), f"{name}.{attr} has no docstring"


def test_every_submodule_lists_only_what_it_defines() -> None:
    from streambus_consensus.metadata import commands, fsm, placement, records

    exported = set()
    for module in (commands, fsm, placement, records):
        assert module.__all__ == sorted(module.__all__, key=_isort_key)
        for name in module.__all__:
            assert hasattr(module, name)
        exported |= set(module.__all__)
    assert exported == set(metadata.__all__)
