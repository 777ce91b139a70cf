"""Make a cluster's secret and every node's config: ``streambus-consensus cluster init``.

Nobody should type a cluster secret by hand: :func:`init_cluster` writes a
random one (mode 0600) and one TOML file per node that points at it, and
with ``tls=True`` a throwaway CA, a certificate per node and one for the
admin client (:mod:`streambus_consensus.certs`). The test harness and the
examples build their clusters with the same functions.

Layout of the directory it writes::

    cluster.secret        the shared secret (0600)
    n1.toml, n2.toml ...  one config per node (data in data/<node id>)
    tls/ca.pem            with tls=True: the CA every node and client trusts
    tls/ca.key            its key (0600): keep it or delete it, nodes never read it
    tls/<node id>.pem/.key  each node's certificate, for peers and its API
    tls/admin.pem/.key    the admin client's certificate (the CLI, ApiClient)
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import NodeConfig, parse_address
from .errors import ConfigError
from .metadata.commands import supported_metadata_versions

__all__ = [
    "ADMIN_NAME",
    "ClusterFiles",
    "TlsFiles",
    "generate_secret",
    "init_cluster",
    "render_node_config",
    "toml_value",
    "write_private",
    "write_tls_material",
]

SECRET_BYTES = 32
ADMIN_NAME = "admin"
"""The name of the admin client's certificate files in ``tls/``."""


@dataclass(frozen=True)
class TlsFiles:
    """Where a node's (or a client's) TLS material lies."""

    ca_file: Path
    cert_file: Path
    key_file: Path


@dataclass(frozen=True)
class ClusterFiles:
    """What :func:`init_cluster` wrote."""

    directory: Path
    secret_file: Path
    configs: dict[str, Path]
    """Node id to its TOML file."""
    admin_tls: TlsFiles | None
    """The admin client's TLS files (``tls=True`` only)."""
    metadata_version: int
    """The metadata version the new cluster starts at (every config's
    ``bootstrap_metadata_version``)."""


def generate_secret() -> str:
    """A new random cluster secret (256 bits, URL-safe text)."""
    return secrets.token_urlsafe(SECRET_BYTES)


def write_private(path: Path, data: bytes | str) -> None:
    """Write a file that only its owner may read (0600), replacing any old one."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(raw)


def write_tls_material(directory: Path, hosts_by_name: Mapping[str, Iterable[str]]) -> dict[
        str, TlsFiles]:
    """A CA in ``directory`` and a certificate for each name (valid for its
    hosts, and for both TLS server and client use). Returns the files by name."""
    from .certs import issue_certificate, make_ca

    ca = make_ca()
    ca_file = directory / "ca.pem"
    directory.mkdir(parents=True, exist_ok=True)
    ca_file.write_bytes(ca.cert_pem)
    write_private(directory / "ca.key", ca.key_pem)
    issued: dict[str, TlsFiles] = {}
    for name, hosts in hosts_by_name.items():
        leaf = issue_certificate(ca, name, hosts)
        cert_file, key_file = directory / f"{name}.pem", directory / f"{name}.key"
        cert_file.write_bytes(leaf.cert_pem)
        write_private(key_file, leaf.key_pem)
        issued[name] = TlsFiles(ca_file, cert_file, key_file)
    return issued


def render_node_config(node_id: str, cluster: Mapping[str, str], *, data_dir: str,
                       secret_file: str, api_address: str | None = None,
                       tls: TlsFiles | None = None, api_tls: bool | None = None,
                       settings: Mapping[str, Any] | None = None) -> str:
    """The TOML text of one node's config. Paths are written as given
    (relative ones are read against the file's own directory). With ``tls``
    files, ``peer_tls`` is on, and ``api_tls`` too unless ``api_tls=False``
    (or the node has no API)."""
    lines = [
        f"# Node {node_id}. Start it with:",
        "#   streambus-consensus node run --config <this file>",
        "# Every field and its default is documented in streambus_consensus/config.py.",
        "",
        f"node_id = {toml_value(node_id)}",
        f"data_dir = {toml_value(data_dir)}",
    ]
    if api_address is not None:
        lines.append(f"api_address = {toml_value(api_address)}")
    lines.append(f"cluster_secret_file = {toml_value(secret_file)}")
    if tls is not None:
        lines += [
            "peer_tls = true",
            f"api_tls = {toml_value(api_address is not None and api_tls is not False)}",
            f"tls_ca_file = {toml_value(str(tls.ca_file))}",
            f"tls_cert_file = {toml_value(str(tls.cert_file))}",
            f"tls_key_file = {toml_value(str(tls.key_file))}",
        ]
    for key, value in (settings or {}).items():
        lines.append(f"{key} = {toml_value(value)}")
    lines += ["", "# The voting members at first start; after a membership change the log",
              "# is authoritative.", "[cluster]"]
    lines += [f"{member} = {toml_value(address)}" for member, address in cluster.items()]
    return "\n".join(lines) + "\n"


def init_cluster(directory: str | Path, nodes: Mapping[str, str], *,
                 api: Mapping[str, str] | None = None, tls: bool = False,
                 settings: Mapping[str, Any] | None = None,
                 metadata_version: int | None = None,
                 force: bool = False) -> ClusterFiles:
    """Write a new cluster's secret and configs into ``directory``.

    Args:
        nodes: ``{node_id: "host:port"}`` of the Raft addresses.
        api: ``{node_id: "host:port"}`` of the API addresses (optional per node).
        tls: also make a CA and certificates, and turn on ``peer_tls`` and
            ``api_tls`` in every config.
        settings: extra config fields for every node.
        metadata_version: the metadata version the cluster starts at,
            written as every node's ``bootstrap_metadata_version``; default:
            the newest this software reads. Give a lower one when some
            nodes will run an older release (as ``kafka-storage format
            --release-version``).
        force: replace files that exist (a new secret makes the old cluster's
            data unreachable by the new configs: use on fresh clusters only).

    Raises:
        ConfigError: an id or address is invalid (nothing is written), or a
            file exists and ``force`` is false.
    """
    directory = Path(directory)
    api = dict(api or {})
    if not nodes:
        raise ConfigError("--nodes", nodes, "name at least one node as id=host:port")
    unknown = sorted(set(api) - set(nodes))
    if unknown:
        raise ConfigError("--api", unknown[0], "is not one of the nodes")
    settings = dict(settings or {})
    if metadata_version is not None:
        settings["bootstrap_metadata_version"] = metadata_version
    settings.setdefault("bootstrap_metadata_version", supported_metadata_versions()[1])
    secret_file = directory / "cluster.secret"
    configs = {node_id: directory / f"{node_id}.toml" for node_id in nodes}
    for node_id in nodes:
        # Validate everything before writing anything.
        NodeConfig(node_id=node_id, cluster=dict(nodes), api_address=api.get(node_id),
                   cluster_secret="x" * 32, **settings).validate()
    if not force:
        existing = [p for p in [secret_file, *configs.values()] if p.exists()]
        if existing:
            raise ConfigError("directory", str(directory),
                              f"already holds {existing[0].name}; pass --force to replace")
    directory.mkdir(parents=True, exist_ok=True)
    write_private(secret_file, generate_secret() + "\n")
    node_tls: dict[str, TlsFiles] = {}
    if tls:
        hosts: dict[str, list[str]] = {}
        for node_id, address in nodes.items():
            node_hosts = [parse_address(address)[0]]
            if node_id in api:
                node_hosts.append(parse_address(api[node_id])[0])
            hosts[node_id] = node_hosts + _loopback_names(node_hosts)
        hosts[ADMIN_NAME] = []
        node_tls = write_tls_material(directory / "tls", hosts)
    for node_id, path in configs.items():
        files = node_tls.get(node_id)
        relative = (TlsFiles(Path("tls/ca.pem"), Path(f"tls/{node_id}.pem"),
                             Path(f"tls/{node_id}.key")) if files else None)
        path.write_text(render_node_config(
            node_id, nodes, data_dir=f"data/{node_id}", secret_file=secret_file.name,
            api_address=api.get(node_id), tls=relative, settings=settings), encoding="utf-8")
        NodeConfig.from_toml(path).validate()
    return ClusterFiles(directory, secret_file, configs, node_tls.get(ADMIN_NAME),
                        settings["bootstrap_metadata_version"])


def toml_value(value: Any) -> str:
    """A Python scalar as TOML (strings, numbers, booleans)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise TypeError(f"cannot write {value!r} to TOML")


def _loopback_names(hosts: list[str]) -> list[str]:
    loopback = {"127.0.0.1", "localhost", "::1"}
    return ["localhost", "127.0.0.1"] if loopback & set(hosts) else []
