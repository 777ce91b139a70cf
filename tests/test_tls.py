"""TLS for the cluster transport and the API, and the files ``cluster init`` writes.

Transports here are real (TCP on loopback, real certificates from a throwaway
CA made by :mod:`streambus_consensus.certs`), pumped from the test thread as
in ``test_transport.py``.
"""

from __future__ import annotations

import datetime
import logging
import os
import ssl
import stat
from pathlib import Path
from typing import Any

import pytest
import test_transport
from test_transport import SECRET, Net, Peer, addresses, exchange

from streambus_consensus import NodeConfig, tls
from streambus_consensus.certs import Issued, issue_certificate, make_ca
from streambus_consensus.errors import ConfigError
from streambus_consensus.provision import init_cluster, write_private
from streambus_consensus.raft import transport as transport_module

net = test_transport.net  # the same fixture: transports pumped from the test thread

# -- material -----------------------------------------------------------------------------


class Pki:
    """A CA and helpers to write certificates it (or another CA) signs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca = make_ca()
        self.ca_file = self._write("ca.pem", self.ca.cert_pem)

    def _write(self, name: str, data: bytes) -> Path:
        path = self.root / name
        path.write_bytes(data)
        return path

    def leaf(self, name: str, *, ca: Issued | None = None,
             not_before: datetime.datetime | None = None, valid_days: int = 30,
             hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> tuple[Path, Path]:
        issued = issue_certificate(ca or self.ca, name, hosts, valid_days=valid_days,
                                   not_before=not_before)
        cert = self._write(f"{name}.pem", issued.cert_pem)
        key = self.root / f"{name}.key"
        write_private(key, issued.key_pem)
        return cert, key

    def config(self, name: str, *, ca_file: Path | None = None, **leaf: Any) -> NodeConfig:
        cert, key = self.leaf(name, **leaf)
        return NodeConfig(node_id="n1", cluster={"n1": "127.0.0.1:1"}, cluster_secret=SECRET,
                          peer_tls=True, tls_cert_file=str(cert), tls_key_file=str(key),
                          tls_ca_file=str(ca_file or self.ca_file))


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


def contexts(config: NodeConfig) -> dict[str, ssl.SSLContext]:
    return {"server_tls": tls.peer_server_context(config),
            "client_tls": tls.peer_client_context(config)}


def unverified_contexts(cert: Path, key: Path, ca_file: Path) -> dict[str, ssl.SSLContext]:
    """Contexts built by hand, skipping the node's own start-up checks, to show
    what a *peer* does with a certificate the node itself would refuse to load."""
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca_file))
    server.verify_mode = ssl.CERT_REQUIRED
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
    for context in (server, client):
        context.load_cert_chain(str(cert), str(key))
    return {"server_tls": server, "client_tls": client}


def tls_pair(net: Net, pki: Pki, a_options: dict[str, Any],
             b_options: dict[str, Any]) -> tuple[Peer, Peer]:
    cluster = addresses("a", "b")
    return net.start("a", cluster, **a_options), net.start("b", cluster, **b_options)


def refused_both_ways(net: Net, a: Peer, b: Peer) -> None:
    net.pump(lambda: a.transport.dropped_connections >= 1
             and b.transport.dropped_connections >= 1, what="both handshakes refused")
    net.pump_for(0.3)
    assert a.transport.connected_peers() == b.transport.connected_peers() == frozenset()
    assert a.connected == b.connected == []


# -- the transport over TLS -------------------------------------------------------------------


def test_peers_talk_over_mutual_tls(net: Net, pki: Pki) -> None:
    a, b = tls_pair(net, pki, contexts(pki.config("a")), contexts(pki.config("b")))
    net.pump(lambda: a.transport.connected_peers() == {"b"}
             and b.transport.connected_peers() == {"a"}, what="TLS mesh")
    exchange(net, a, b, "over-tls")
    big = {"type": "chunk", "data": os.urandom(40_000)}  # several TLS records
    assert a.transport.send("b", big)
    a.transport.release()
    net.pump(lambda: big in b.received_from("a"), what="a large message over TLS")


def test_the_secret_handshake_still_runs_inside_tls(net: Net, pki: Pki) -> None:
    """A valid certificate does not make a member: the cluster secret still has to match."""
    cluster = addresses("a", "b")
    a = net.start("a", cluster, **contexts(pki.config("a")))
    b = net.start("b", cluster, secret="another-secret-0123456789", **contexts(pki.config("b")))
    refused_both_ways(net, a, b)


def test_a_certificate_from_another_ca_is_refused(
        net: Net, pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    other_ca = make_ca("somebody else's CA")
    with caplog.at_level(logging.INFO, logger=transport_module.__name__):
        a, b = tls_pair(net, pki, contexts(pki.config("a")),
                        contexts(pki.config("b", ca=other_ca)))
        refused_both_ways(net, a, b)
    assert "TLS handshake failed: certificate not trusted" in caplog.text


def test_an_expired_peer_certificate_is_refused(
        net: Net, pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    expired = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=40)
    cert, key = pki.leaf("b-expired", not_before=expired, valid_days=10)
    with caplog.at_level(logging.INFO, logger=transport_module.__name__):
        a, b = tls_pair(net, pki, contexts(pki.config("a")),
                        unverified_contexts(cert, key, pki.ca_file))
        refused_both_ways(net, a, b)
    assert "certificate has expired" in caplog.text


def test_a_certificate_for_another_host_is_refused_by_the_dialler(
        net: Net, pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=transport_module.__name__):
        a, _ = tls_pair(net, pki, contexts(pki.config("a")),
                        contexts(pki.config("b", hosts=("elsewhere.example",))))
        net.pump(lambda: a.transport.dropped_connections >= 1, what="a refuses b's name")
        net.pump_for(0.3)
    assert "b" not in a.transport.connected_peers()
    assert "Hostname mismatch" in caplog.text or "IP address mismatch" in caplog.text


def test_plain_tcp_to_a_tls_port_is_dropped_with_a_clear_reason(
        net: Net, pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    cluster = addresses("a", "c")
    a = net.start("a", cluster, **contexts(pki.config("a")))
    with caplog.at_level(logging.INFO, logger=transport_module.__name__):
        client = net.raw_client(a.address)
        client.send(b"\x00\x00\x00\x14SBC1" + os.urandom(16))  # our plain protocol
        net.pump(lambda: client.eof, what="plain client dropped")
    assert "does not speak TLS" in caplog.text
    assert a.transport.dropped_connections == 1


def test_tls_to_a_plain_port_is_dropped_with_a_clear_reason(
        net: Net, pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    cluster = addresses("a", "b")
    a = net.start("a", cluster)
    with caplog.at_level(logging.INFO, logger=transport_module.__name__):
        b = net.start("b", cluster, **contexts(pki.config("b")))
        net.pump(lambda: a.transport.dropped_connections >= 1, what="TLS hello refused")
    assert "speaks TLS: is peer_tls on there and off here?" in caplog.text
    assert b.transport.connected_peers() == frozenset()


# -- loading certificates ------------------------------------------------------------------


def test_an_expired_node_certificate_stops_the_node_at_start(pki: Pki) -> None:
    expired = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=40)
    config = pki.config("old", not_before=expired, valid_days=10)
    with pytest.raises(ConfigError, match=r"tls_cert_file.*expired on"):
        tls.peer_server_context(config)


def test_a_certificate_not_yet_valid_stops_the_node_at_start(pki: Pki) -> None:
    future = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=2)
    with pytest.raises(ConfigError, match="is not valid before"):
        tls.peer_client_context(pki.config("early", not_before=future))


@pytest.mark.parametrize("damage", ["missing-ca", "garbage-ca", "missing-key", "wrong-key"])
def test_unloadable_files_are_config_errors_naming_the_field(pki: Pki, damage: str) -> None:
    config = pki.config("n1")
    if damage == "missing-ca":
        config.tls_ca_file = str(pki.root / "nope.pem")
        field = "tls_ca_file"
    elif damage == "garbage-ca":
        (pki.root / "garbage.pem").write_text("not a certificate")
        config.tls_ca_file = str(pki.root / "garbage.pem")
        field = "tls_ca_file"
    elif damage == "missing-key":
        config.tls_key_file = str(pki.root / "nope.key")
        field = "tls_key_file"
    else:
        _, other_key = pki.leaf("other")
        config.tls_key_file = str(other_key)
        field = "tls_cert_file + tls_key_file"
    with pytest.raises(ConfigError) as info:
        tls.peer_server_context(config)
    assert info.value.field == field


def test_describe_failure_names_the_usual_causes() -> None:
    not_tls = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    not_tls.reason = "WRONG_VERSION_NUMBER"
    assert "does not speak TLS" in tls.describe_failure(not_tls)
    alert = ssl.SSLError(1, "[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca")
    alert.reason = "TLSV1_ALERT_UNKNOWN_CA"
    assert tls.describe_failure(alert) == "the other side rejected our certificate (unknown ca)"


# -- cluster init -----------------------------------------------------------------------------

NODES = {"n1": "127.0.0.1:7001", "n2": "127.0.0.1:7002", "n3": "127.0.0.1:7003"}
APIS = {"n1": "127.0.0.1:9101", "n2": "127.0.0.1:9102", "n3": "127.0.0.1:9103"}


@pytest.mark.parametrize("with_tls", [False, True], ids=["plain", "tls"])
def test_init_cluster_writes_a_private_secret_and_valid_configs(
        tmp_path: Path, with_tls: bool) -> None:
    files = init_cluster(tmp_path / "c", NODES, api=APIS, tls=with_tls)
    mode = stat.S_IMODE(files.secret_file.stat().st_mode)
    assert mode == 0o600
    secret = files.secret_file.read_text().strip()
    assert len(secret) >= 40
    configs = {n: NodeConfig.from_toml(p).validate() for n, p in files.configs.items()}
    assert set(configs) == set(NODES)
    for node_id, config in configs.items():
        assert config.cluster == NODES and config.api_address == APIS[node_id]
        assert config.cluster_secret == secret
        assert (config.peer_tls, config.api_tls) == (with_tls, with_tls)
        if with_tls:
            tls.peer_server_context(config)  # the files load and verify
            tls.api_server_context(config)
            assert stat.S_IMODE(Path(config.tls_key_file or "").stat().st_mode) == 0o600
    assert (files.admin_tls is not None) == with_tls
    again = init_cluster(tmp_path / "d", NODES)
    assert again.secret_file.read_text() != files.secret_file.read_text(), "secrets are random"


def test_init_cluster_refuses_to_replace_files_unless_forced(tmp_path: Path) -> None:
    first = init_cluster(tmp_path, NODES)
    old = first.secret_file.read_text()
    with pytest.raises(ConfigError, match=r"already holds cluster\.secret; pass --force"):
        init_cluster(tmp_path, NODES)
    assert first.secret_file.read_text() == old
    assert init_cluster(tmp_path, NODES, force=True).secret_file.read_text() != old


@pytest.mark.parametrize(("nodes", "api"), [
    ({"bad id": "127.0.0.1:7001"}, {}),
    ({"n1": "127.0.0.1"}, {}),
    ({"n1": "127.0.0.1:7001"}, {"n9": "127.0.0.1:9101"}),
    ({"n1": "127.0.0.1:7001"}, {"n1": "nowhere"}),
    ({}, {}),
])
def test_init_cluster_writes_nothing_for_bad_input(
        tmp_path: Path, nodes: dict[str, str], api: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        init_cluster(tmp_path / "c", nodes, api=api, tls=True)
    assert not (tmp_path / "c").exists()
