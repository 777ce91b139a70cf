"""Each config refusal names the field, quotes the value and states the rule
exactly (the ConfigError attributes, not just the message)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from streambus_consensus.config import NodeConfig
from streambus_consensus.errors import ConfigError

CLUSTER = {"n1": "127.0.0.1:7001", "n2": "127.0.0.1:7002"}


def refused(call: Any) -> tuple[str, Any, str]:
    with pytest.raises(ConfigError) as info:
        call()
    return info.value.field, info.value.value, info.value.rule


def valid(**changes: Any) -> NodeConfig:
    return NodeConfig(node_id="n1", cluster=dict(CLUSTER),
                      cluster_secret="s" * 16).clone(**changes)


@pytest.mark.parametrize(("changes", "expected"), [
    ({"fsync": 1}, ("fsync", 1, "must be true or false")),
    ({"batch_appends": "yes"}, ("batch_appends", "yes", "must be true or false")),
    ({"fast_failover": None}, ("fast_failover", None, "must be true or false")),
    ({"leader_stepdown_timeout": "1"}, ("leader_stepdown_timeout", "1", "must be a number")),
    ({"leader_stepdown_timeout": True}, ("leader_stepdown_timeout", True, "must be a number")),
    ({"tick_interval": math.inf}, ("tick_interval", math.inf, "must be a finite number > 0")),
    ({"tick_interval": 0}, ("tick_interval", 0, "must be a finite number > 0")),
    ({"proposal_timeout": True}, ("proposal_timeout", True, "must be a finite number > 0")),
    ({"max_pending_proposals": 0}, ("max_pending_proposals", 0, "must be an integer >= 1")),
    ({"snapshot_interval_entries": True},
     ("snapshot_interval_entries", True, "must be an integer >= 2")),
    ({"cluster_secret": "short"},
     ("cluster_secret", "<redacted>", "must be a string of at least 16 characters; run "
      "'streambus-consensus cluster init' to make a secret and every node's config")),
    ({"cluster_secret": None},
     ("cluster_secret", None, "is required; run 'streambus-consensus cluster init' to make "
      "a secret and every node's config")),
])
def test_validate_names_field_value_and_rule(changes: dict[str, Any],
                                             expected: tuple[str, Any, str]) -> None:
    assert refused(valid(**changes).validate) == expected


def test_boundaries_that_are_accepted() -> None:
    valid(snapshot_interval_entries=2, max_pending_proposals=1).validate()
    valid(leader_stepdown_timeout=None).validate()
    valid(tick_interval=valid().heartbeat_interval).validate()  # equal is fine


def test_clone_refuses_an_unknown_field() -> None:
    assert refused(lambda: valid(colour="blue")) == ("colour", "blue", "unknown config field")
    twin = valid(tick_interval=0.01)
    assert twin.tick_interval == 0.01 and twin.cluster == CLUSTER and twin.cluster is not CLUSTER


@pytest.mark.parametrize(("data", "expected"), [
    ({"node_id": "n1", "cluster": CLUSTER, "zzz": 1, "aaa": 2},
     ("aaa", 2, "unknown config field")),
    ({"cluster": CLUSTER}, ("node_id", None, "is required")),
    ({"node_id": "n1"}, ("cluster", None, "is required")),
    ({"node_id": "n1", "cluster": ["127.0.0.1:1"]},
     ("cluster", ["127.0.0.1:1"], "must map node ids to host:port")),
])
def test_from_dict_names_field_value_and_rule(data: dict[str, Any],
                                              expected: tuple[str, Any, str]) -> None:
    assert refused(lambda: NodeConfig.from_dict(data)) == expected


def _toml(tmp_path: Path, text: str | bytes, name: str = "node.toml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


BASE = 'node_id = "n1"\n[cluster]\nn1 = "127.0.0.1:7001"\n'


def test_from_toml_refusals(tmp_path: Path) -> None:
    bad_utf8 = _toml(tmp_path, b"node_id = \"\xff\"\n")
    assert refused(lambda: NodeConfig.from_toml(bad_utf8)) == (
        "config file", str(bad_utf8), "is not UTF-8 text")
    missing = tmp_path / "absent.toml"
    field, value, rule = refused(lambda: NodeConfig.from_toml(missing))
    assert (field, value) == ("config file", str(missing))
    assert rule == "cannot be read: No such file or directory"
    broken = _toml(tmp_path, "node_id = ")
    field, value, rule = refused(lambda: NodeConfig.from_toml(broken))
    assert (field, value) == ("config file", str(broken)) and rule.startswith("is not valid TOML")
    number = _toml(tmp_path, "cluster_secret_file = 5\n" + BASE)
    assert refused(lambda: NodeConfig.from_toml(number)) == (
        "cluster_secret_file", 5, "must be a path string")
    (tmp_path / "secret.bin").write_bytes(b"\xff\xfe")
    binary = _toml(tmp_path, 'cluster_secret_file = "secret.bin"\n' + BASE)
    assert refused(lambda: NodeConfig.from_toml(binary)) == (
        "cluster_secret_file", str(tmp_path / "secret.bin"), "is not UTF-8 text")
    absent = _toml(tmp_path, 'cluster_secret_file = "nope.txt"\n' + BASE)
    assert refused(lambda: NodeConfig.from_toml(absent)) == (
        "cluster_secret_file", str(tmp_path / "nope.txt"),
        "cannot be read: No such file or directory")


def test_from_toml_reads_the_secret_file_and_resolves_data_dir(tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_text("  a-secret-of-enough-length\n", encoding="utf-8")
    path = _toml(tmp_path, 'cluster_secret_file = "secret.txt"\ndata_dir = "d"\n' + BASE)
    config = NodeConfig.from_toml(path)
    assert config.cluster_secret == "a-secret-of-enough-length"
    assert config.data_dir == str((tmp_path / "d").resolve())
