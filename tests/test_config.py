"""NodeConfig: documented defaults, every validation rule (each one quoting the
bad value and naming the field), clone, from_dict, from_toml, and validation
that survives ``python -O``."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from streambus_consensus.config import NodeConfig, parse_address
from streambus_consensus.errors import ConfigError, ConsensusError

REPO_ROOT = Path(__file__).resolve().parents[1]
SECRET = "correct-horse-battery-staple"  # 28 characters
LOOPBACK_CLUSTER = {"n1": "127.0.0.1:7001", "n2": "127.0.0.1:7002", "n3": "127.0.0.1:7003"}

DOCUMENTED_DEFAULTS: dict[str, Any] = {
    "bind_address": None,
    "data_dir": None,
    "cluster_secret": None,
    "election_timeout_min": 0.4,
    "election_timeout_max": 0.8,
    "heartbeat_interval": 0.1,
    "leader_stepdown_timeout": None,
    "tick_interval": 0.05,
    "batch_appends": False,
    "max_append_bytes": 1 << 20,
    "max_pending_proposals": 100_000,
    "max_batch_commands": 256,
    "learner_catchup_timeout": 30.0,
    "learner_max_lag": 1000,
    "proposal_timeout": 5.0,
    "snapshot_interval_entries": 10_000,
    "snapshot_interval_seconds": 3600.0,
    "snapshot_chunk_bytes": 1 << 20,
    "max_command_bytes": 1 << 20,
    "peer_frame_timeout": 5.0,
    "connect_retry_interval": 0.2,
    "fast_failover": True,
    "fsync": True,
    "broker_session_timeout": 9.0,
    "bootstrap_metadata_version": None,
    "api_address": None,
    "tls_cert_file": None,
    "tls_key_file": None,
    "tls_ca_file": None,
    "peer_tls": False,
    "api_tls": False,
    "api_client_cert_required": True,
    "api_max_connections": 1024,
    "api_max_in_flight": 256,
    "api_handler_threads": 8,
    "api_request_timeout": 10.0,
    "api_idle_timeout": 10.0,
}


def make(**changes: Any) -> NodeConfig:
    """A valid three-node loopback config for n1, with ``changes`` applied."""
    fields: dict[str, Any] = {"node_id": "n1", "cluster": dict(LOOPBACK_CLUSTER),
                              "cluster_secret": SECRET}
    fields.update(changes)
    return NodeConfig(**fields)


def refused(config: NodeConfig, field: str, value: Any) -> ConfigError:
    """Assert validate() refuses ``config`` naming ``field`` and quoting ``value``."""
    with pytest.raises(ConfigError) as info:
        config.validate()
    exc = info.value
    assert exc.field == field
    assert exc.value == value or (isinstance(value, float) and math.isnan(value))
    message = str(exc)
    assert message.startswith(f"invalid config {field}=")
    assert repr(value) in message
    assert exc.rule in message
    return exc


# -- defaults ------------------------------------------------------------------

def test_every_default_is_the_documented_value() -> None:
    config = NodeConfig(node_id="n1", cluster={"n1": "127.0.0.1:7001"})
    field_names = {f.name for f in dataclasses.fields(NodeConfig)}
    assert field_names == {"node_id", "cluster", *DOCUMENTED_DEFAULTS}
    for name, value in DOCUMENTED_DEFAULTS.items():
        got = getattr(config, name)
        assert got == value and type(got) is type(value), name


def test_required_fields_have_no_default() -> None:
    with pytest.raises(TypeError):
        NodeConfig(cluster_secret=SECRET, node_id="n1")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        NodeConfig(cluster={"n1": "127.0.0.1:7001"})  # type: ignore[call-arg]


def test_fields_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        NodeConfig("n1", {"n1": "127.0.0.1:7001"})  # type: ignore[call-arg]


def test_effective_defaults_resolve() -> None:
    config = make()
    assert config.effective_stepdown_timeout == config.election_timeout_max == 0.8
    assert config.effective_bind_address == "127.0.0.1:7001"
    custom = make(leader_stepdown_timeout=1.0, bind_address="127.0.0.2:9000")
    assert custom.effective_stepdown_timeout == 1.0
    assert custom.effective_bind_address == "127.0.0.2:9000"


def test_minimal_config_validates() -> None:
    config = NodeConfig(node_id="n1", cluster={"n1": "127.0.0.1:7001"}, cluster_secret=SECRET)
    assert config.validate() is config


@pytest.mark.parametrize("cluster", [
    LOOPBACK_CLUSTER,
    {"n1": "localhost:7001", "n2": "localhost:7002"},
    {"n1": "[::1]:7001", "n2": "[::1]:7002"},
    {"n1": "127.0.0.1:1", "n2": "127.9.9.9:65535"},
])
def test_loopback_clusters_need_a_secret_too(cluster: dict[str, str]) -> None:
    """There is no unauthenticated mode: a local process could otherwise join."""
    exc = refused(NodeConfig(node_id="n1", cluster=cluster), "cluster_secret", None)
    assert "streambus-consensus cluster init" in exc.rule
    assert "\n" not in str(exc)
    NodeConfig(node_id="n1", cluster=cluster, cluster_secret=SECRET).validate()


def test_constructor_copies_cluster_dict() -> None:
    cluster = {"n1": "127.0.0.1:7001"}
    config = NodeConfig(cluster_secret=SECRET, node_id="n1", cluster=cluster)
    cluster["n2"] = "127.0.0.1:7002"
    assert config.cluster == {"n1": "127.0.0.1:7001"}


# -- the error type ---------------------------------------------------------------

def test_config_error_is_value_error_and_consensus_error() -> None:
    with pytest.raises(ValueError):
        make(heartbeat_interval=-1).validate()
    with pytest.raises(ConsensusError):
        make(heartbeat_interval=-1).validate()
    assert issubclass(ConfigError, ValueError)
    assert issubclass(ConfigError, ConsensusError)


# -- node ids ---------------------------------------------------------------------

@pytest.mark.parametrize("node_id", ["", "-lead", "_x", ".x", "a b", "a/b", "n:1", "ä", "x" * 65,
                                     "n1\t"])
def test_bad_node_id_is_refused(node_id: str) -> None:
    config = NodeConfig(cluster_secret=SECRET, node_id=node_id,
                        cluster={node_id: "127.0.0.1:7001"})
    refused(config, "node_id", node_id)


@pytest.mark.parametrize("node_id", [None, 7, b"n1"])
def test_non_string_node_id_is_refused(node_id: Any) -> None:
    refused(make(node_id=node_id), "node_id", node_id)


@pytest.mark.parametrize("node_id", ["a", "9", "x" * 64, "broker-1.rack_a", "N0DE"])
def test_good_node_ids_pass(node_id: str) -> None:
    NodeConfig(cluster_secret=SECRET, node_id=node_id,
               cluster={node_id: "127.0.0.1:7001"}).validate()


def test_node_id_with_trailing_newline_is_refused() -> None:
    with pytest.raises(ConfigError):
        NodeConfig(cluster_secret=SECRET, node_id="n1\n",
                   cluster={"n1\n": "127.0.0.1:7001"}).validate()


def test_empty_cluster_is_refused() -> None:
    refused(NodeConfig(cluster_secret=SECRET, node_id="n1", cluster={}), "cluster", {})


def test_bad_member_id_is_refused() -> None:
    config = make(cluster={"n1": "127.0.0.1:7001", "bad id": "127.0.0.1:7002"})
    refused(config, "cluster['bad id']", "bad id")


def test_node_id_not_in_cluster_is_refused() -> None:
    exc = refused(make(node_id="n9"), "node_id + cluster", "n9")
    assert "['n1', 'n2', 'n3']" in str(exc)


# -- addresses ----------------------------------------------------------------------

@pytest.mark.parametrize("address", [
    "127.0.0.1", "127.0.0.1:", ":7002", "[]:7002", "127.0.0.1:abc", "127.0.0.1:7.5",
    "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:-1", "127.0.0.1:99999999999", "",
])
def test_bad_member_address_is_refused(address: str) -> None:
    config = make(cluster={"n1": "127.0.0.1:7001", "n2": address})
    exc = refused(config, "cluster['n2']", address)
    assert exc.rule in ("must be 'host:port'", "host part is empty",
                        "port must be an integer", "port must be in 1..65535")


def test_non_string_address_is_refused() -> None:
    refused(make(cluster={"n1": "127.0.0.1:7001", "n2": 7002}), "cluster['n2']", 7002)


@pytest.mark.parametrize(("address", "rule"), [
    ("127.0.0.1:0", "port must be in 1..65535"),
    ("127.0.0.1:65536", "port must be in 1..65535"),
    ("127.0.0.1:http", "port must be an integer"),
    ("no-port", "must be 'host:port'"),
])
def test_bad_bind_address_is_refused(address: str, rule: str) -> None:
    exc = refused(make(bind_address=address), "bind_address", address)
    assert exc.rule == rule


@pytest.mark.parametrize(("address", "expected"), [
    ("127.0.0.1:1", ("127.0.0.1", 1)),
    ("localhost:65535", ("localhost", 65535)),
    ("[::1]:7001", ("::1", 7001)),
    ("node-1.example.com:9092", ("node-1.example.com", 9092)),
])
def test_parse_address(address: str, expected: tuple[str, int]) -> None:
    assert parse_address(address) == expected


def test_parse_address_names_the_given_field() -> None:
    with pytest.raises(ConfigError) as info:
        parse_address("nope", field_name="peer n7")
    assert info.value.field == "peer n7"
    assert "'nope'" in str(info.value)


@pytest.mark.parametrize("duplicate", ["127.0.0.1:7001", "127.0.0.1:07001", "[127.0.0.1]:7001"])
def test_duplicate_addresses_are_refused(duplicate: str) -> None:
    config = make(cluster={"n1": "127.0.0.1:7001", "n2": duplicate})
    exc = refused(config, "cluster['n2']", duplicate)
    assert "same address as member 'n1'" in str(exc)


@pytest.mark.parametrize(("cluster", "bind", "exposed"), [
    ({"n1": "127.0.0.1:7001", "n2": "10.0.0.2:7002"}, None, "10.0.0.2:7002"),
    ({"n1": "10.0.0.1:7001"}, None, "10.0.0.1:7001"),
    ({"n1": "127.0.0.1:7001", "n2": "broker2.internal:7002"}, None, "broker2.internal:7002"),
    ({"n1": "127.0.0.1:7001"}, "0.0.0.0:7001", "0.0.0.0:7001"),
    ({"n1": "127.0.0.1:7001"}, "[::]:7001", "[::]:7001"),
])
def test_non_loopback_without_secret_is_refused(
    cluster: dict[str, str], bind: str | None, exposed: str
) -> None:
    config = NodeConfig(node_id="n1", cluster=cluster, bind_address=bind)
    exc = refused(config, "cluster_secret", None)
    assert "cluster init" in exc.rule
    # The same layout is fine once the traffic is authenticated.
    config.clone(cluster_secret=SECRET).validate()


@pytest.mark.parametrize("secret", ["hunter2-hunter2", "", "s" * 15])
def test_short_secret_is_refused_and_not_echoed(secret: str) -> None:
    config = make(cluster_secret=secret)
    with pytest.raises(ConfigError) as info:
        config.validate()
    exc = info.value
    assert exc.field == "cluster_secret"
    assert "at least 16 characters" in str(exc)
    assert "<redacted>" in str(exc)
    if secret:
        assert secret not in str(exc)
        assert secret not in repr(exc)
        assert secret not in repr(exc.value)
        assert all(secret not in str(arg) for arg in exc.args)


def test_non_string_secret_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        make(cluster_secret=b"0123456789abcdef0123").validate()
    assert info.value.field == "cluster_secret"
    assert "0123456789abcdef" not in str(info.value)


def test_secret_of_exactly_minimum_length_passes() -> None:
    make(cluster_secret="s" * 16).validate()


def test_api_address_rules() -> None:
    make(api_address="127.0.0.1:9101").validate()
    refused(make(api_address="127.0.0.1:0"), "api_address", "127.0.0.1:0")
    make(api_address="0.0.0.0:9101").validate()
    refused(make(api_address="0.0.0.0:9101", cluster_secret=None), "cluster_secret", None)


def test_secret_property_says_how_to_make_one() -> None:
    assert make().secret == SECRET
    with pytest.raises(ConfigError, match="cluster init"):
        _ = make(cluster_secret=None).secret


# -- TLS ---------------------------------------------------------------------------------

TLS_FILES = {"tls_cert_file": "n1.pem", "tls_key_file": "n1.key", "tls_ca_file": "ca.pem"}


@pytest.mark.parametrize("user", ["peer_tls", "api_tls"])
@pytest.mark.parametrize("missing", sorted(TLS_FILES))
def test_tls_needs_all_three_files(user: str, missing: str) -> None:
    files = {k: v for k, v in TLS_FILES.items() if k != missing}
    config = make(api_address="127.0.0.1:9101", **{user: True}, **files)
    exc = refused(config, f"{user} + {missing}", None)
    assert "cluster init --tls" in exc.rule
    make(api_address="127.0.0.1:9101", **{user: True}, **TLS_FILES).validate()


def test_api_tls_needs_an_api_address() -> None:
    refused(make(api_tls=True, **TLS_FILES), "api_tls + api_address", None)


@pytest.mark.parametrize("name", ["peer_tls", "api_tls", "api_client_cert_required"])
def test_tls_switches_must_be_booleans(name: str) -> None:
    refused(make(api_address="127.0.0.1:9101", **TLS_FILES, **{name: "yes"}), name, "yes")


@pytest.mark.parametrize("name", sorted(TLS_FILES))
def test_tls_paths_must_be_non_empty_strings(name: str) -> None:
    refused(make(**{name: ""}), name, "")
    refused(make(**{name: 5}), name, 5)


# -- timings ----------------------------------------------------------------------------

POSITIVE_FIELDS = ["election_timeout_min", "election_timeout_max", "heartbeat_interval",
                   "tick_interval", "proposal_timeout", "snapshot_interval_seconds",
                   "connect_retry_interval", "peer_frame_timeout", "api_request_timeout",
                   "api_idle_timeout", "learner_catchup_timeout"]


@pytest.mark.parametrize("name", POSITIVE_FIELDS)
@pytest.mark.parametrize("value", [0, -1, -0.5, True, "1", None, math.nan],
                         ids=["zero", "neg-int", "neg-float", "bool", "str", "none", "nan"])
def test_timing_fields_must_be_positive_numbers(name: str, value: Any) -> None:
    exc = refused(make(**{name: value}), name, value)
    assert exc.rule == "must be a finite number > 0"


def test_election_min_must_exceed_three_heartbeats() -> None:
    # 0.125 * 3 == 0.375 exactly in binary floating point.
    config = make(heartbeat_interval=0.125, election_timeout_min=0.375)
    exc = refused(config, "election_timeout_min + heartbeat_interval", (0.375, 0.125))
    assert "3 x heartbeat_interval" in exc.rule
    make(heartbeat_interval=0.125, election_timeout_min=0.376).validate()


@pytest.mark.parametrize("maximum", [0.4, 0.39])
def test_election_max_must_exceed_min(maximum: float) -> None:
    config = make(election_timeout_max=maximum, leader_stepdown_timeout=0.5)
    exc = refused(config, "election_timeout_max + election_timeout_min", (maximum, 0.4))
    assert "must exceed election_timeout_min" in exc.rule


def test_tick_must_not_exceed_heartbeat() -> None:
    exc = refused(make(tick_interval=0.11), "tick_interval + heartbeat_interval", (0.11, 0.1))
    assert "must not exceed" in exc.rule
    make(tick_interval=0.1).validate()


@pytest.mark.parametrize("stepdown", [0.19, 1.61, 0.0, -1.0, math.nan])
def test_stepdown_outside_bounds_is_refused(stepdown: float) -> None:
    exc = refused(make(leader_stepdown_timeout=stepdown), "leader_stepdown_timeout", stepdown)
    assert "2 x heartbeat_interval and 2 x election_timeout_max" in exc.rule


@pytest.mark.parametrize("stepdown", [0.2, 1.6, 1.0])
def test_stepdown_at_bounds_passes(stepdown: float) -> None:
    make(leader_stepdown_timeout=stepdown).validate()


@pytest.mark.parametrize("stepdown", ["1", True], ids=["str", "bool"])
def test_stepdown_of_wrong_type_is_refused(stepdown: Any) -> None:
    with pytest.raises(ConfigError):
        make(leader_stepdown_timeout=stepdown).validate()


# -- integer limits -------------------------------------------------------------------

INTEGER_MINIMUMS = {"max_append_bytes": 1024, "max_pending_proposals": 1,
                    "max_batch_commands": 1, "learner_max_lag": 0,
                    "snapshot_interval_entries": 2, "snapshot_chunk_bytes": 1024,
                    "max_command_bytes": 1024, "api_max_connections": 1,
                    "api_max_in_flight": 1, "api_handler_threads": 1}


def _small_ints(**changes: Any) -> NodeConfig:
    fields: dict[str, Any] = {"max_append_bytes": 1024, "snapshot_chunk_bytes": 1024,
                              "max_command_bytes": 1024}
    fields.update(changes)
    return make(**fields)


@pytest.mark.parametrize("name", sorted(INTEGER_MINIMUMS))
def test_integer_field_at_minimum_passes(name: str) -> None:
    _small_ints(**{name: INTEGER_MINIMUMS[name]}).validate()


@pytest.mark.parametrize("name", sorted(INTEGER_MINIMUMS))
def test_integer_field_below_minimum_is_refused(name: str) -> None:
    low = INTEGER_MINIMUMS[name]
    exc = refused(_small_ints(**{name: low - 1}), name, low - 1)
    assert exc.rule == f"must be an integer >= {low}"


@pytest.mark.parametrize("name", sorted(INTEGER_MINIMUMS))
@pytest.mark.parametrize("value", [True, 2048.0, "4096", None],
                         ids=["bool", "float", "str", "none"])
def test_integer_field_of_wrong_type_is_refused(name: str, value: Any) -> None:
    refused(_small_ints(**{name: value}), name, value)


def test_bool_true_for_max_pending_proposals_is_refused() -> None:
    # True == 1 would satisfy ">= 1"; a bool is still not a count.
    refused(make(max_pending_proposals=True), "max_pending_proposals", True)


def test_max_frame_is_derived_from_what_a_peer_may_send() -> None:
    envelope = 64 << 10
    assert make().max_frame_bytes == (2 << 20) + envelope  # 1 MiB append + 1 MiB command
    assert make(max_append_bytes=4096, max_command_bytes=2048,
                snapshot_chunk_bytes=1024).max_frame_bytes == 6144 + envelope
    assert make(max_append_bytes=4096, max_command_bytes=2048,
                snapshot_chunk_bytes=1 << 20).max_frame_bytes == (1 << 20) + envelope


# -- clone ------------------------------------------------------------------------------------

def test_clone_is_a_deep_copy() -> None:
    original = make()
    twin = original.clone()
    assert twin == original
    assert twin is not original
    twin.cluster["n4"] = "127.0.0.1:7004"
    del twin.cluster["n2"]
    assert original.cluster == LOOPBACK_CLUSTER


def test_clone_applies_changes_only_to_the_clone() -> None:
    original = make()
    twin = original.clone(heartbeat_interval=0.05, cluster_secret=SECRET * 2)
    assert (twin.heartbeat_interval, twin.cluster_secret) == (0.05, SECRET * 2)
    assert (original.heartbeat_interval, original.cluster_secret) == (0.1, SECRET)


def test_clone_with_unknown_field_raises() -> None:
    with pytest.raises(ConfigError) as info:
        make().clone(heartbeat_intervall=0.05)
    assert info.value.field == "heartbeat_intervall"
    assert "unknown config field" in str(info.value)


# -- from_dict --------------------------------------------------------------------------------

def test_from_dict_builds_the_same_config() -> None:
    data = {"node_id": "n1", "cluster": dict(LOOPBACK_CLUSTER), "heartbeat_interval": 0.05,
            "cluster_secret": SECRET}
    assert NodeConfig.from_dict(data) == make(heartbeat_interval=0.05)


def test_from_dict_refuses_unknown_keys() -> None:
    data = {"node_id": "n1", "cluster": dict(LOOPBACK_CLUSTER), "zz_typo": 1, "hearbeat": 2}
    with pytest.raises(ConfigError) as info:
        NodeConfig.from_dict(data)
    assert info.value.field == "hearbeat"  # the first unknown key, sorted
    assert "unknown config field" in str(info.value)


@pytest.mark.parametrize("missing", ["node_id", "cluster"])
def test_from_dict_refuses_missing_required_keys(missing: str) -> None:
    data: dict[str, Any] = {"node_id": "n1", "cluster": dict(LOOPBACK_CLUSTER)}
    del data[missing]
    with pytest.raises(ConfigError) as info:
        NodeConfig.from_dict(data)
    assert info.value.field == missing
    assert "is required" in str(info.value)


# -- from_toml --------------------------------------------------------------------------------

def _write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_from_toml_reads_cluster_table_secret_file_and_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    (conf_dir / "secret.txt").write_text(f"  {SECRET}\n\n", encoding="utf-8")
    path = _write(conf_dir / "node.toml", """
        node_id = "n2"
        data_dir = "state/n2"
        cluster_secret_file = "secret.txt"
        heartbeat_interval = 0.05
        election_timeout_min = 0.3
        batch_appends = true

        [cluster]
        n1 = "10.0.0.1:7001"
        n2 = "10.0.0.2:7001"
        n3 = "10.0.0.3:7001"
    """)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative paths resolve against the file, not the CWD
    config = NodeConfig.from_toml(Path("..") / "etc" / "node.toml")
    assert config.node_id == "n2"
    assert config.cluster == {"n1": "10.0.0.1:7001", "n2": "10.0.0.2:7001",
                              "n3": "10.0.0.3:7001"}
    assert config.cluster_secret == SECRET
    assert config.data_dir == str((conf_dir / "state" / "n2").resolve())
    assert (config.heartbeat_interval, config.election_timeout_min) == (0.05, 0.3)
    assert config.batch_appends is True
    assert config.validate() is config
    assert NodeConfig.from_toml(str(path)) == config


def test_from_toml_keeps_absolute_data_dir(tmp_path: Path) -> None:
    target = tmp_path / "abs" / "data"
    path = _write(tmp_path / "n.toml", f"""
        node_id = "n1"
        data_dir = "{target}"
        [cluster]
        n1 = "127.0.0.1:7001"
    """)
    assert NodeConfig.from_toml(path).data_dir == str(target)


def test_from_toml_missing_file_raises_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        NodeConfig.from_toml(missing)
    assert info.value.field == "config file"
    assert str(missing) in str(info.value)
    assert "cannot be read" in str(info.value)


def test_from_toml_invalid_toml_raises_config_error(tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.toml", 'node_id = "n1\n[cluster\n')
    with pytest.raises(ConfigError) as info:
        NodeConfig.from_toml(path)
    assert info.value.field == "config file"
    assert "is not valid TOML" in str(info.value)
    assert str(path) in str(info.value)


def test_from_toml_directory_instead_of_file_raises_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        NodeConfig.from_toml(tmp_path)


@pytest.mark.parametrize("make_secret", ["missing", "directory"])
def test_from_toml_unreadable_secret_file_raises_config_error(
    tmp_path: Path, make_secret: str
) -> None:
    if make_secret == "directory":
        (tmp_path / "secret").mkdir()
    path = _write(tmp_path / "n.toml", """
        node_id = "n1"
        cluster_secret_file = "secret"
        [cluster]
        n1 = "127.0.0.1:7001"
    """)
    with pytest.raises(ConfigError) as info:
        NodeConfig.from_toml(path)
    assert info.value.field == "cluster_secret_file"
    assert str(tmp_path / "secret") in str(info.value)


def test_from_toml_refuses_unknown_keys_and_missing_cluster(tmp_path: Path) -> None:
    unknown = _write(tmp_path / "u.toml", """
        node_id = "n1"
        heartbeat = 0.1
        [cluster]
        n1 = "127.0.0.1:7001"
    """)
    with pytest.raises(ConfigError, match="heartbeat"):
        NodeConfig.from_toml(unknown)
    no_cluster = _write(tmp_path / "c.toml", 'node_id = "n1"\n')
    with pytest.raises(ConfigError) as info:
        NodeConfig.from_toml(no_cluster)
    assert info.value.field == "cluster"


@pytest.mark.parametrize("case", ["binary-config", "binary-secret", "secret-file-int",
                                  "cluster-int"])
def test_from_toml_malformed_content_raises_config_error(tmp_path: Path, case: str) -> None:
    (tmp_path / "secret").write_bytes(b"\xff\xfe" * 10)
    path = tmp_path / "n.toml"
    body = {
        "binary-config": None,
        "binary-secret": 'node_id = "n1"\ncluster_secret_file = "secret"\n',
        "secret-file-int": 'node_id = "n1"\ncluster_secret_file = 5\n',
        "cluster-int": 'node_id = "n1"\ncluster = 5\n',
    }[case]
    if body is None:
        path.write_bytes(b'node_id = "\xff"\n[cluster]\nn1 = "127.0.0.1:7001"\n')
    else:
        table = "" if case == "cluster-int" else '[cluster]\nn1 = "127.0.0.1:7001"\n'
        path.write_text(body + table, encoding="utf-8")
    with pytest.raises(ConfigError):
        NodeConfig.from_toml(path)


# -- python -O ------------------------------------------------------------------------------------

def test_validation_survives_python_dash_o() -> None:
    script = textwrap.dedent("""
        import sys
        from streambus_consensus.config import NodeConfig
        from streambus_consensus.errors import ConfigError

        if sys.flags.optimize < 1:
            sys.exit(3)
        cases = [
            dict(node_id="bad id", cluster={"bad id": "127.0.0.1:7001"}),
            dict(node_id="n1", cluster={"n1": "127.0.0.1:7001"}),
            dict(node_id="n1", cluster={"n1": "127.0.0.1:7001"}, heartbeat_interval=-1,
                 cluster_secret="s" * 16),
            dict(node_id="n1", cluster={"n1": "127.0.0.1:7001"}, election_timeout_max=0.1,
                 cluster_secret="s" * 16),
        ]
        for kwargs in cases:
            try:
                NodeConfig(**kwargs).validate()
            except ConfigError as exc:
                print("refused", exc.field)
            else:
                print("ACCEPTED", kwargs)
                sys.exit(2)
    """)
    result = subprocess.run(
        [sys.executable, "-O", "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
        env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"}, timeout=30, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split("\n")[:4] == [
        "refused node_id", "refused cluster_secret", "refused heartbeat_interval",
        "refused election_timeout_max + election_timeout_min",
    ]
