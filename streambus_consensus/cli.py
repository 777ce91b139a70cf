"""``streambus-consensus``: run a node and administer a cluster.

Every command but ``node run`` talks to the nodes' HTTP APIs
(:mod:`streambus_consensus.api`), signing each request with the cluster
secret. Output is a table for people or JSON (``--json``) for scripts.

Errors print one line to stderr and exit non-zero: 1 when a running node
stopped on an error (so that a supervisor restarts it), 2 for bad arguments or
config, 3 when no node answers, 4 when the cluster refused or failed the
request. This module is the only one in the package that prints.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import prometheus_client

from .client import ApiClient, ClusterUnreachableError
from .config import NodeConfig, parse_address, validate_member
from .errors import ConfigError, ConsensusError, ProposalRejectedError, TransportError
from .tls import client_context

__all__ = ["format_fields", "format_table", "main"]

EXIT_OK, EXIT_NODE_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_FAILED = 0, 1, 2, 3, 4
ENV_API = "STREAMBUS_CONSENSUS_API"
ENV_SECRET = "STREAMBUS_CONSENSUS_SECRET"
ENV_SECRET_FILE = "STREAMBUS_CONSENSUS_SECRET_FILE"
ENV_CA_FILE = "STREAMBUS_CONSENSUS_CA_FILE"
ENV_CERT_FILE = "STREAMBUS_CONSENSUS_CERT_FILE"
ENV_KEY_FILE = "STREAMBUS_CONSENSUS_KEY_FILE"
UNSAFE_NO_ENGINE_FIXES = "STREAMBUS_CONSENSUS_UNSAFE_DISABLE_ENGINE_FIXES"
_POLL_INTERVAL = 0.02
"""Seconds between checks while waiting for the cluster (leadership, retries)."""

T = TypeVar("T")

_EPILOG = f"""\
a new cluster:
  streambus-consensus cluster init --nodes n1=10.0.0.1:7001,n2=10.0.0.2:7001,n3=10.0.0.3:7001 \\
      --api n1=10.0.0.1:9101,n2=10.0.0.2:9101,n3=10.0.0.3:9101 --dir cluster [--tls]
  writes cluster/cluster.secret (0600) and cluster/n1.toml ...; copy each node
  its TOML, the secret and (with --tls) its tls/ files.

connecting:
  Admin commands need node API addresses: --api HOST:PORT (repeatable, or
  comma-separated), --config NODE.toml (its api_address, cluster secret and
  TLS files; repeatable; alias --node-config), or ${ENV_API}.
  The cluster secret signs every request: --secret-file FILE, else the
  secret of the first --config, else ${ENV_SECRET_FILE},
  else ${ENV_SECRET}.
  APIs served with api_tls need --ca-file (and --cert-file/--key-file for a
  client certificate), or ${ENV_CA_FILE} / ${ENV_CERT_FILE} /
  ${ENV_KEY_FILE}, or a --config whose node has api_tls.

exit codes:
  0  success
  1  'node run': the node stopped on an error (storage failure, Raft thread
     crash); let a supervisor restart it
  2  bad arguments or configuration (for 'node run': also an address it
     cannot bind)
  3  no node answered
  4  the cluster refused or failed the request

examples:
  streambus-consensus node run --config examples/cluster/n1.toml
  streambus-consensus status --config examples/cluster/n1.toml
  streambus-consensus topics create orders --partitions 6 --replication-factor 3 \\
      --config retention.ms=86400000 --api 127.0.0.1:9101
  streambus-consensus leader transfer n2 --api 127.0.0.1:9101,127.0.0.1:9102,127.0.0.1:9103
"""


class _UsageError(Exception):
    """Bad command-line arguments (exit 2)."""


class _NodeFailedError(Exception):
    """``node run``: the node stopped on a storage failure or a Raft thread crash (exit 1)."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (and exit 2 through :func:`main`)."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{self.prog}: {message} (see --help)")


@dataclass(frozen=True)
class _Output:
    """What a command prints: ``data`` with ``--json``, else ``text``."""

    data: Any
    text: str
    code: int = 0
    """The exit code once printed (non-zero: part of the request was refused)."""


# -- formatting (pure: strings in, strings out) -----------------------------------------


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ",".join(_cell(v) for v in value) or "-"
    return str(value)


def format_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Left-aligned columns separated by two spaces; ``None`` shows as ``-``,
    lists as comma-separated values."""
    cells = [list(header)] + [[_cell(value) for value in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
                     .rstrip() for row in cells)


def format_fields(fields: Iterable[tuple[str, Any]]) -> str:
    """``name: value`` lines with the values aligned."""
    pairs = [(name, _cell(value)) for name, value in fields]
    width = max((len(name) for name, _ in pairs), default=0)
    return "\n".join(f"{name + ':':<{width + 1}} {value}" for name, value in pairs)


# -- connecting -----------------------------------------------------------------------


def _read_secret(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            secret = f.read().strip()
    except OSError as exc:
        raise ConfigError(what, path, f"cannot be read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(what, path, "is not UTF-8 text") from None
    if not secret:
        raise ConfigError(what, path, "is empty")
    return secret


def _client(args: argparse.Namespace) -> ApiClient:
    addresses: list[str] = []
    for item in args.api or []:
        addresses += [a.strip() for a in item.split(",") if a.strip()]
    secret: str | None = None
    tls_files: tuple[str | None, str | None, str | None] = (None, None, None)
    for path in args.config or []:
        config = NodeConfig.from_toml(path)
        if config.api_address is None:
            raise ConfigError("--config", path, "has no api_address: that node serves no API")
        addresses.append(config.api_address)
        if secret is None:
            secret = config.cluster_secret
        if config.api_tls and tls_files[0] is None:
            tls_files = (config.tls_ca_file, config.tls_cert_file, config.tls_key_file)
    if not addresses and os.environ.get(ENV_API):
        addresses = [a.strip() for a in os.environ[ENV_API].split(",") if a.strip()]
    if not addresses:
        raise _UsageError(f"no node API address: give --api HOST:PORT, --config FILE or "
                          f"${ENV_API}")
    if args.secret_file:
        secret = _read_secret(args.secret_file, "--secret-file")
    elif secret is None and os.environ.get(ENV_SECRET_FILE):
        secret = _read_secret(os.environ[ENV_SECRET_FILE], ENV_SECRET_FILE)
    elif secret is None:
        secret = os.environ.get(ENV_SECRET) or None
    for address in addresses:
        parse_address(address, field_name="api address")
    if not secret:
        raise _UsageError(f"no cluster secret: give --secret-file FILE, --config NODE.toml or "
                          f"${ENV_SECRET_FILE} (the file 'cluster init' wrote)")
    ca_file = args.ca_file or os.environ.get(ENV_CA_FILE) or tls_files[0]
    cert_file = args.cert_file or os.environ.get(ENV_CERT_FILE) or tls_files[1]
    key_file = args.key_file or os.environ.get(ENV_KEY_FILE) or tls_files[2]
    context = None
    if ca_file is not None:
        context = client_context(ca_file, cert_file, key_file)
    elif cert_file is not None:
        raise _UsageError("--cert-file needs --ca-file (the CA the nodes' certificates "
                          "chain to)")
    return ApiClient(list(dict.fromkeys(addresses)), secret=secret, timeout=args.timeout,
                     tls=context)


def _statuses(client: ApiClient) -> list[tuple[str, dict[str, Any] | None]]:
    """``(api address, status or None if it did not answer)`` for every address."""
    found: list[tuple[str, dict[str, Any] | None]] = []
    errors: list[str] = []
    for address in client.addresses:
        try:
            found.append((address, client.status(address)))
        except ClusterUnreachableError as exc:
            found.append((address, None))
            errors.append(str(exc).removeprefix("no node answered: "))
    if all(status is None for _, status in found):
        raise ClusterUnreachableError("no node answered: " + "; ".join(errors))
    return found


def _retry_rejected(call: Callable[[], T], budget: float) -> T:
    """Call, retrying for ``budget`` seconds while the cluster says "not now"
    (another membership change in flight, an election, a leader not settled)."""
    deadline = time.monotonic() + budget
    while True:
        try:
            return call()
        except ProposalRejectedError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(_POLL_INTERVAL * 5)


def _wait_for_leader(client: ApiClient, addresses: Sequence[str], accept: Callable[[str], bool],
                     timeout: float) -> str | None:
    """Poll the nodes at ``addresses`` until one knows a leader that ``accept`` s."""
    deadline = time.monotonic() + timeout
    while True:
        for address in addresses:
            try:
                leader = client.status(address)["leader_id"]
            except ConsensusError:
                continue
            if leader is not None and accept(leader):
                return str(leader)
        if time.monotonic() >= deadline:
            return None
        time.sleep(_POLL_INTERVAL)


# -- commands ---------------------------------------------------------------------------


def _run_node(args: argparse.Namespace) -> _Output | None:
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # This process is ours: drop prometheus-client's "<name>_created" series, which
    # the text format shows as extra gauge families (a library must not do this).
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
    from .raft.safety import MessageGuard
    from .server import KeyValueApplication, NodeServer

    if args.app == "kv":
        application: Any = KeyValueApplication()
    else:
        from .metadata.service import MetadataApplication

        application = MetadataApplication()
    # After the application: it decides which metadata versions this node reads,
    # which bootstrap_metadata_version must be one of.
    config = NodeConfig.from_toml(args.config).validate()
    guard = None
    if os.environ.get(UNSAFE_NO_ENGINE_FIXES) == "1":
        # Test-only: lets the regression tests show the engine defects the
        # guard prevents. Never set this in production.
        logging.getLogger(__name__).critical(
            "%s=1: engine fixes DISABLED; this node can acknowledge lost writes",
            UNSAFE_NO_ENGINE_FIXES)
        guard = MessageGuard(enabled=False)
    server = NodeServer(config, application, guard=guard)
    signalled: list[int] = []
    # The handler only records the signal: stopping joins threads and takes locks,
    # which a handler interrupting this thread at any point must never do.
    signal.signal(signal.SIGTERM, lambda number, _: signalled.append(number))
    signal.signal(signal.SIGINT, lambda number, _: signalled.append(number))
    try:
        server.start()
    except TransportError as exc:  # e.g. bind_address not on this host, or its port taken
        raise ConfigError("bind_address", config.effective_bind_address, str(exc)) from None
    while not signalled and not server.wait(_POLL_INTERVAL * 5):
        pass
    server.stop()
    if server.fatal_error is not None:
        raise _NodeFailedError(f"node {config.node_id} stopped on an error: {server.fatal_error}; "
                          f"exiting {EXIT_NODE_FAILED} so that its supervisor restarts it")
    return None


def _pairs(text: str, flag: str) -> dict[str, str]:
    """``"n1=host:port,n2=host:port"`` (or repeated flags joined by commas) as a dict."""
    result: dict[str, str] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise _UsageError(f"{flag} wants NODE_ID=HOST:PORT, got {item!r}")
        if key.strip() in result:
            raise _UsageError(f"{flag} names {key.strip()!r} twice")
        result[key.strip()] = value.strip()
    return result


def _cluster(args: argparse.Namespace) -> _Output:
    from .provision import init_cluster

    nodes = _pairs(",".join(args.nodes), "--nodes")
    api = _pairs(",".join(args.api_addresses or []), "--api")
    files = init_cluster(args.dir, nodes, api=api, tls=args.tls, force=args.force,
                         metadata_version=args.metadata_version)
    lines = [f"wrote {files.secret_file} (the cluster secret, mode 0600)"]
    lines += [f"wrote {path}" for path in files.configs.values()]
    lines.append(f"the cluster starts at metadata version {files.metadata_version}")
    data: dict[str, Any] = {"secret_file": str(files.secret_file),
                            "configs": {k: str(v) for k, v in files.configs.items()},
                            "metadata_version": files.metadata_version}
    if files.admin_tls is not None:
        tls_dir = files.admin_tls.ca_file.parent
        lines.append(f"wrote {tls_dir}/: ca.pem, a certificate per node, admin.pem/.key "
                     "for the CLI (ca.key signs them: keep it offline or delete it)")
        data["tls"] = {"ca_file": str(files.admin_tls.ca_file),
                       "cert_file": str(files.admin_tls.cert_file),
                       "key_file": str(files.admin_tls.key_file)}
    first = next(iter(files.configs.values()))
    lines += ["", "start each node with:",
              f"  streambus-consensus node run --config {files.directory}/<node id>.toml"]
    if api:
        lines += ["and administer the cluster with:",
                  f"  streambus-consensus status --config {first}"]
    return _Output(data, "\n".join(lines))


def _status(args: argparse.Namespace) -> _Output:
    report: list[dict[str, Any]] = []
    rows = []
    for address, status in _statuses(_client(args)):
        if status is None:
            report.append({"api": address, "error": "unreachable"})
            rows.append([None, address, "unreachable"] + [None] * 6)
            continue
        report.append({"api": address, **status})
        peers = " ".join(
            f"{p['node_id']}{'(learner)' if p.get('role') == 'learner' else ''}:"
            f"{'up' if p['connected'] else 'down'}"
            + (f"@{p['match_index']}" if p.get("match_index") is not None else "")
            for p in status["peers"])
        state = status["state"]
        if status["node_id"] in status.get("learners", ()):
            state = f"{state} (learner)"
        rows.append([status["node_id"], address, state, status["leader_id"],
                     status["term"], status["commit_index"], status["applied_index"],
                     status["log_entries"], peers or None])
    header = ["NODE", "API", "STATE", "LEADER", "TERM", "COMMIT", "APPLIED", "LOG", "PEERS"]
    return _Output(report, format_table(header, rows))


def _members_table(result: dict[str, Any], leader: str | None) -> str:
    rows = [[node, address, "leader" if node == leader else "voter"]
            for node, address in result["members"].items()]
    rows += [[node, address, "learner"] for node, address in result.get("learners", {}).items()]
    return format_table(["NODE", "ADDRESS", "ROLE"], sorted(rows))


def _members(args: argparse.Namespace) -> _Output:
    client = _client(args)
    current = client.request("GET", "/v1/members")
    members: dict[str, str] = current["members"]
    learners: dict[str, str] = current.get("learners", {})
    leader: str | None = current["leader_id"]
    if args.members_command == "list":
        return _Output(current, _members_table(current, leader))
    node_id = args.node_id
    if args.members_command == "add":
        if node_id in members:
            raise ConsensusError(f"{node_id} is already a member (at {members[node_id]})")
        if node_id not in learners:
            validate_member(node_id, args.address, {**members, **learners})
        # The answer comes once the new node votes, or the leader gave up on
        # it as a learner (learner_catchup_timeout): wait that long for it.
        client.timeout = max(client.timeout,
                             float(current.get("learner_catchup_timeout", 0)) + args.timeout)
        result = _retry_rejected(lambda: client.request(
            "POST", "/v1/members", {"node_id": node_id, "address": args.address,
                                    "check": not args.no_check}), args.timeout)
        text = (f"added {node_id} at {args.address}: it caught up as a learner and now votes\n"
                + _members_table(result, leader))
        return _Output(result, text)
    members = {**members, **learners}
    if node_id not in members:
        raise ConsensusError(f"{node_id} is not a member (members: {', '.join(sorted(members))})")
    statuses = _statuses(client)
    others = [a for a, s in statuses if s is not None and s["node_id"] != node_id]
    notes = []
    if leader == node_id:
        # The leader cannot remove itself: move leadership first.
        leader_api = next((a for a, s in statuses if s is not None
                           and s["node_id"] == node_id and s["state"] == "leader"), None)
        if leader_api is None:
            raise ConsensusError(f"{node_id} leads and its API is not among the given "
                                 f"addresses; run 'leader transfer' on it first")
        client.request("POST", "/v1/leader/transfer", {"node_id": None}, address=leader_api)
        new_leader = _wait_for_leader(client, [a for a, _ in statuses],
                                      lambda lead: lead != node_id, args.timeout)
        if new_leader is None:
            raise ConsensusError(f"{node_id} leads and leadership did not move away within "
                                 f"{args.timeout:g}s")
        notes.append(f"moved leadership from {node_id} to {new_leader}")
        leader = new_leader
    if not others:
        raise ConsensusError(f"give the API of a member other than {node_id}: a node does "
                             "not remove itself")
    result = _retry_rejected(lambda: client.request(
        "DELETE", f"/v1/members/{node_id}", address=others[0]), args.timeout)
    notes.append(f"removed {node_id}; stop its process now: the cluster no longer talks to it")
    return _Output(result, "\n".join(notes) + "\n" + _members_table(result, leader))


def _leader(args: argparse.Namespace) -> _Output:
    client = _client(args)
    statuses = _statuses(client)
    answered = [(a, s) for a, s in statuses if s is not None]
    current = next(((a, s) for a, s in answered if s["state"] == "leader"), None)
    if current is None:
        known = next((s["leader_id"] for _, s in answered if s["leader_id"]), None)
        if known is None:
            raise ConsensusError("no leader is known; an election may be in progress")
        raise ConsensusError(f"the leader {known} is not among the given API addresses "
                             f"(transfers are asked of the leader)")
    leader_api, leader_status = current
    old = str(leader_status["node_id"])
    target = args.node_id
    if target == old:
        return _Output({"from": old, "to": old, "seconds": 0.0}, f"{old} already leads")
    if target is not None and target not in leader_status["members"]:
        raise ConsensusError(f"{target} is not a member "
                             f"(members: {', '.join(leader_status['members'])})")
    started = time.monotonic()
    client.request("POST", "/v1/leader/transfer", {"node_id": target}, address=leader_api)
    new = _wait_for_leader(client, [a for a, _ in answered],
                           lambda lead: lead == target if target else lead != old, args.wait)
    elapsed = time.monotonic() - started
    if new is None:
        raise ConsensusError(f"leadership did not move from {old} to {target or 'a follower'} "
                             f"within {args.wait:g}s")
    return _Output({"from": old, "to": new, "seconds": round(elapsed, 4)},
                   f"leadership moved from {old} to {new} in {elapsed:.3f}s")


def _topic_text(topic: dict[str, Any]) -> str:
    head = format_fields([
        ("topic", topic["name"]), ("id", topic["topic_id"]),
        ("partitions", topic["partition_count"]),
        ("replication factor", topic["replication_factor"]),
        ("config", " ".join(f"{k}={v}" for k, v in sorted(topic["config"].items()))),
    ])
    parts = topic.get("partitions")
    if not parts:
        return head
    table = format_table(
        ["PARTITION", "LEADER", "REPLICAS", "ISR", "LEADER EPOCH", "RECOVERING"],
        [[p["index"], p["leader"], p["replicas"], p["isr"], p["leader_epoch"],
          p.get("recovering", False)] for p in parts])
    return head + "\n\n" + table


def _key_values(items: Sequence[str] | None, flag: str) -> dict[str, str]:
    result: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise _UsageError(f"{flag} wants KEY=VALUE, got {item!r}")
        result[key.strip()] = value.strip()
    return result


def _partition_rows(topic: str, parts: Iterable[dict[str, Any]]) -> list[list[Any]]:
    return [[topic, p["index"], p["leader"], p["replicas"], p["isr"]] for p in parts]


def _under_replicated(client: ApiClient, name: str | None, suffix: str) -> _Output:
    """Partitions whose ISR is smaller than their replica set, of one topic or all."""
    names = [name] if name else client.request("GET", "/v1/topics" + suffix)["topics"]
    found: list[dict[str, Any]] = []
    for topic in names:
        described = client.request("GET", f"/v1/topics/{topic}{suffix}")
        found += [{"topic": topic, **p} for p in described.get("partitions") or []
                  if len(p["isr"]) < len(p["replicas"])]
    table = format_table(["TOPIC", "PARTITION", "LEADER", "REPLICAS", "ISR"],
                         [[p["topic"], p["index"], p["leader"], p["replicas"], p["isr"]]
                          for p in found])
    return _Output({"under_replicated": found}, table)


def _topics_more(args: argparse.Namespace, client: ApiClient) -> _Output:
    """add-partitions, elect, reassign."""
    command, name = args.topics_command, args.name
    if command == "add-partitions":
        result = client.request("POST", f"/v1/topics/{name}/partitions",
                                {"count": args.total})
        return _Output(result, f"topic {name} has {result['partition_count']} partitions")
    if command == "elect":
        body: dict[str, Any] = {"kind": args.kind}
        if args.partition is not None:
            body["partition"] = args.partition
        result = client.request("POST", f"/v1/topics/{name}/elect", body)
        changed = result["changed"]
        return _Output(result, f"{len(changed)} partition leader(s) changed\n" + format_table(
            ["TOPIC", "PARTITION", "LEADER", "REPLICAS", "ISR"],
            _partition_rows(name, changed)))
    result = client.request("POST", f"/v1/topics/{name}/partitions/{args.partition}/reassign",
                            {"replicas": args.replicas})
    return _Output(result, f"reassigned {name}/{args.partition}\n" + format_table(
        ["TOPIC", "PARTITION", "LEADER", "REPLICAS", "ISR"], _partition_rows(name, [result])))


_BATCH = 1000
"""Topics per batched create request (the server's MAX_TOPICS_PER_BATCH)."""


def _topic_names(args: argparse.Namespace) -> list[str]:
    names = list(args.name)
    if args.from_file:
        try:
            if args.from_file == "-":
                text = sys.stdin.read()
            else:
                with open(args.from_file, encoding="utf-8") as f:
                    text = f.read()
        except OSError as exc:
            raise _UsageError(f"topics create: cannot read {args.from_file}: "
                              f"{exc.strerror}") from None
        names += [line.strip() for line in text.splitlines()
                  if line.strip() and not line.lstrip().startswith("#")]
    if not names:
        raise _UsageError("topics create: give a topic name, several, or --from-file")
    return names


def _create_many(client: ApiClient, names: list[str], partitions: int,
                 replication_factor: int, config: dict[str, str]) -> _Output:
    """``topics create a b c``: batched creates, one result per topic; exit 4 if any refused."""
    results: list[dict[str, Any]] = []
    for start in range(0, len(names), _BATCH):
        answer = client.request("POST", "/v1/topics:batch", {"topics": [
            {"name": name, "partitions": partitions, "replication_factor": replication_factor,
             "config": config} for name in names[start:start + _BATCH]]})
        results += answer["results"]
    created = sum(1 for r in results if r["ok"])
    rows = [[r["name"], "created" if r["ok"] else r["code"], r["message"] or "-"]
            for r in results]
    text = (f"created {created} of {len(results)} topics\n"
            + format_table(["TOPIC", "RESULT", "DETAIL"], rows))
    return _Output({"created": created, "results": results}, text,
                   EXIT_OK if created == len(results) else EXIT_FAILED)


def _topics(args: argparse.Namespace) -> _Output:
    command = args.topics_command
    if command == "describe" and args.name is None and not args.under_replicated:
        raise _UsageError("topics describe: give a topic name, or --under-replicated for all")
    if command == "create":
        config = _key_values(args.topic_config, "--config")
    elif command == "alter":
        settings = _key_values(args.set, "--set")
        if not settings and not args.delete:
            raise _UsageError("topics alter: give at least one --set KEY=VALUE or --delete KEY")
    client = _client(args)
    suffix = "?linearizable=1" if getattr(args, "linearizable", False) else ""
    if command == "list":
        result = client.request("GET", "/v1/topics" + suffix)
        return _Output(result, format_table(["TOPIC"], [[name] for name in result["topics"]]))
    if command in ("add-partitions", "elect", "reassign"):
        return _topics_more(args, client)
    if command == "describe" and args.under_replicated:
        return _under_replicated(client, args.name, suffix)
    if command == "describe":
        result = client.request("GET", f"/v1/topics/{args.name}{suffix}")
        return _Output(result, _topic_text(result))
    if command == "create":
        names = _topic_names(args)
        if len(names) > 1 or args.from_file:
            return _create_many(client, names, args.partitions, args.replication_factor, config)
        result = client.request("POST", "/v1/topics", {
            "name": names[0], "partitions": args.partitions,
            "replication_factor": args.replication_factor, "config": config})
        return _Output(result, f"created topic {names[0]}\n" + _topic_text(result))
    if command == "delete":
        result = client.request("DELETE", f"/v1/topics/{args.name}")
        return _Output(result, f"deleted topic {args.name}")
    result = client.request("PUT", f"/v1/topics/{args.name}/config",
                            {"set": settings, "delete": list(args.delete or [])})
    return _Output(result, f"altered topic {args.name}\n" + _topic_text(result))


def _broker_text(broker: dict[str, Any]) -> str:
    return format_fields([
        ("broker", broker["broker_id"]), ("state", broker["state"]),
        ("endpoint", broker["endpoint"]), ("rack", broker["rack"]),
        ("incarnation", broker["incarnation_id"]), ("epoch", broker["broker_epoch"])])


def _heartbeat(args: argparse.Namespace, client: ApiClient) -> _Output | None:
    """One heartbeat per broker, or (``--every``) one round per interval until stopped."""

    def beat(broker_id: int) -> dict[str, Any]:
        epoch = args.epoch if args.epoch is not None else client.request(
            "GET", f"/v1/brokers/{broker_id}")["broker_epoch"]
        result: dict[str, Any] = client.request(
            "POST", f"/v1/brokers/{broker_id}/heartbeat", {"broker_epoch": epoch})
        return result

    def one_round() -> list[dict[str, Any]]:
        return [beat(broker_id) for broker_id in args.broker_ids]

    def looped_round() -> list[str]:
        # An error that is not retriable concerns one broker (unknown, a stale
        # epoch): report it and beat the others, or they would be fenced. A
        # retriable one (no leader, no node answers) fails the whole round.
        shown = []
        for broker_id in args.broker_ids:
            try:
                state = beat(broker_id)
            except ConsensusError as exc:
                if exc.retriable:
                    raise
                code = getattr(exc, "code", None) or str(exc).split(": ", 1)[0]
                print(f"streambus-consensus: heartbeat of broker {broker_id} refused, "
                      f"retrying: {_explain(exc)}", file=sys.stderr, flush=True)
                shown.append(json.dumps({"broker_id": broker_id, "refused": code})
                             if args.json else f"{broker_id}:{code}")
            else:
                shown.append(json.dumps(state, sort_keys=True) if args.json
                             else f"{state['broker_id']}:{state['state']}")
        return shown

    if args.every is None:
        # The leader unfences a fenced broker that heartbeats at its next check
        # (within a second): wait for that, so the next command sees it active.
        deadline = time.monotonic() + args.timeout
        states = one_round()
        while (any(b["state"] == "fenced" for b in states)
               and time.monotonic() < deadline):
            time.sleep(_POLL_INTERVAL * 10)
            states = one_round()
        return _Output(states[0] if len(states) == 1 else states, format_table(
            ["ID", "STATE", "EPOCH"],
            [[b["broker_id"], b["state"], b["broker_epoch"]] for b in states]))
    while True:  # until Ctrl-C; a failed round (an election, say) is reported and retried
        try:
            shown = looped_round()
        except ConsensusError as exc:
            print(f"streambus-consensus: heartbeat failed, retrying: {_explain(exc)}",
                  file=sys.stderr, flush=True)
        else:
            _print_line(f"[{', '.join(shown)}]" if args.json else " ".join(shown))
        time.sleep(args.every)


def _brokers(args: argparse.Namespace) -> _Output | None:
    client = _client(args)
    command = args.brokers_command
    if command == "register":
        result = client.request("POST", "/v1/brokers", {
            "broker_id": args.broker_id, "endpoint": args.endpoint, "rack": args.rack,
            "incarnation_id": args.incarnation_id, "fenced": not args.active})
        return _Output(result, f"registered broker {args.broker_id}\n" + _broker_text(result))
    if command == "heartbeat":
        return _heartbeat(args, client)
    if command == "unregister":
        result = client.request("DELETE", f"/v1/brokers/{args.broker_id}")
        return _Output(result, f"unregistered broker {args.broker_id}")
    if command in ("fence", "unfence"):
        body = {} if args.epoch is None else {"broker_epoch": args.epoch}
        result = client.request("POST", f"/v1/brokers/{args.broker_id}/{command}", body)
        return _Output(result, f"{command}d broker {args.broker_id}\n" + _broker_text(result))
    if command == "list":
        result = client.request("GET", "/v1/brokers")
        brokers = sorted(result["brokers"], key=lambda b: b["broker_id"])
        return _Output(result, format_table(
            ["ID", "STATE", "ENDPOINT", "RACK", "EPOCH"],
            [[b["broker_id"], b["state"], b["endpoint"], b["rack"], b["broker_epoch"]]
             for b in brokers]))
    result = client.request("GET", f"/v1/brokers/{args.broker_id}")
    return _Output(result, _broker_text(result))


def _backup_fields(info: Any) -> list[tuple[str, Any]]:
    return [("last index", info.last_index), ("last term", info.last_term),
            ("members", " ".join(f"{k}={v}" for k, v in sorted(info.members.items()))),
            ("bytes", info.size), ("sha256", info.sha256)]


def _snapshot(args: argparse.Namespace) -> _Output:
    import base64
    from dataclasses import asdict

    from .backup import read_backup, restore_backup, write_backup

    if args.snapshot_command == "save":
        client = _client(args)
        result = client.request("GET", "/v1/snapshot" + ("?local=1" if args.local else ""))
        info = write_backup(args.file, base64.b64decode(result["snapshot"]))
        return _Output({"file": args.file, "node_id": result["node_id"], **asdict(info)},
                       f"saved a snapshot from {result['node_id']} to {args.file} "
                       f"(checksum verified)\n" + format_fields(_backup_fields(info)))
    blob, info = read_backup(args.file)
    if args.snapshot_command == "inspect":
        return _Output({"file": args.file, **asdict(info)},
                       f"{args.file}: checksum ok\n" + format_fields(_backup_fields(info)))
    config = NodeConfig.from_toml(args.node_config).validate()
    data_dir = args.data_dir or config.data_dir
    if data_dir is None:
        raise _UsageError(f"{args.node_config} has no data_dir: give --data-dir")
    restored = restore_backup(blob, data_dir, config.cluster)
    return _Output({"data_dir": str(data_dir), "node_id": config.node_id, **asdict(restored)},
                   f"restored {args.file} into {data_dir} for {config.node_id}; start it "
                   f"with 'node run --config {args.node_config}'\n"
                   + format_fields(_backup_fields(restored)))


def _features(args: argparse.Namespace) -> _Output:
    """Metadata versions (feature levels): each node's range, the finalized one; raise it."""
    client = _client(args)
    if args.features_command == "upgrade":
        result = client.request("POST", "/v1/features",
                                {"metadata_version": args.metadata_version})
        voters = ", ".join(f"{voter} reads {low}..{high}"
                           for voter, (low, high) in sorted(result["voters"].items()))
        return _Output(result, f"metadata version is {result['finalized']} "
                               f"(voters: {voters})")
    report: list[dict[str, Any]] = []
    rows = []
    for address in client.addresses:
        try:
            found = client.request("GET", "/v1/features", address=address)
        except ClusterUnreachableError:
            report.append({"api": address, "error": "unreachable"})
            rows.append([None, address, "unreachable", None, None])
            continue
        report.append({"api": address, **found})
        low, high = found["supported"]
        rows.append([found["node_id"], address, f"{low}..{high}", found["finalized"],
                     found["offset"]])
    if all("error" in item for item in report):
        raise ClusterUnreachableError("no node answered at " + ", ".join(client.addresses))
    return _Output(report, format_table(
        ["NODE", "API", "SUPPORTED", "FINALIZED", "OFFSET"], rows))


# -- the parser -------------------------------------------------------------------------


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
    return value


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0}


def _duration(text: str) -> float:
    """``2s``, ``500ms``, ``1m`` or plain seconds."""
    number, factor = text, 1.0
    for unit in ("ms", "s", "m"):
        if text.endswith(unit):
            number, factor = text[: -len(unit)], _UNITS[unit]
            break
    return _positive(number) * factor if number else _positive(text)


def _broker_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of broker ids: {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError(f"no broker ids in {text!r}")
    return ids


def _connection_options(*config_flags: str) -> argparse.ArgumentParser:
    parent = _Parser(add_help=False)
    group = parent.add_argument_group("connection and output")
    group.add_argument("--api", action="append", metavar="HOST:PORT",
                       help=f"a node's API address; repeat or comma-separate for several "
                            f"(default: ${ENV_API})")
    group.add_argument(*config_flags, dest="config", action="append", metavar="FILE",
                       help="a node's TOML config: use its api_address and cluster secret; "
                            "repeatable")
    group.add_argument("--secret-file", metavar="FILE",
                       help=f"file holding the cluster secret (default: the first --config's "
                            f"secret, ${ENV_SECRET_FILE}, or ${ENV_SECRET})")
    group.add_argument("--ca-file", metavar="FILE",
                       help=f"CA bundle for APIs served over TLS (default: ${ENV_CA_FILE}, or "
                            f"the first --config's tls_ca_file when its node has api_tls)")
    group.add_argument("--cert-file", metavar="FILE",
                       help=f"client certificate for TLS APIs (default: ${ENV_CERT_FILE})")
    group.add_argument("--key-file", metavar="FILE",
                       help=f"its private key (default: ${ENV_KEY_FILE})")
    group.add_argument("--timeout", type=_positive, default=10.0, metavar="SECONDS",
                       help="timeout of each request, and of retries while the cluster is "
                            "busy (default 10)")
    group.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parent


def _build_parser() -> argparse.ArgumentParser:
    conn = _connection_options("--config", "--node-config")
    # In 'topics create', --config is a topic setting (as in kafka-topics.sh).
    conn_create = _connection_options("--node-config")
    formatter = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog="streambus-consensus", formatter_class=formatter, epilog=_EPILOG,
                     description="Run and administer a StreamBus metadata consensus cluster.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="what to do; COMMAND --help for more")

    def command(parent: Any, name: str, help_text: str, description: str,
                connection: argparse.ArgumentParser | None = conn) -> argparse.ArgumentParser:
        parsed: argparse.ArgumentParser = parent.add_parser(
            name, help=help_text, description=description, formatter_class=formatter,
            parents=[connection] if connection is not None else [])
        return parsed

    def group(name: str, help_text: str, dest: str) -> Any:
        holder = sub.add_parser(name, help=help_text, description=help_text)
        return holder.add_subparsers(dest=dest, required=True, metavar="ACTION",
                                     help="ACTION --help for more")

    node = group("node", "run a node", "node_command")
    run = command(node, "run", "run a node in the foreground until SIGTERM or SIGINT",
                  "Run one node (Raft, the application, the HTTP API and /metrics) in the "
                  "foreground. Logs go to stderr.", connection=None)
    run.add_argument("--config", required=True, metavar="FILE",
                     help="the node's TOML config (see README, 'Configuration')")
    run.add_argument("--app", choices=("metadata", "kv"), default="metadata",
                     help="state machine: StreamBus metadata (default) or the example "
                          "key-value store")
    run.add_argument("--log-level", default="INFO", metavar="LEVEL",
                     help="DEBUG, INFO (default), WARNING or ERROR")

    cluster = group("cluster", "make a new cluster's secret and configs", "cluster_command")
    init = command(cluster, "init", "write a cluster secret and every node's config",
                   "Write a new random cluster secret (mode 0600) and one TOML config per "
                   "node into --dir, and with --tls a throwaway CA, a certificate per node "
                   "and one for the admin client. Refuses to replace existing files "
                   "without --force.", connection=None)
    init.add_argument("--nodes", action="append", required=True, metavar="ID=HOST:PORT,...",
                      help="each node's id and cluster (Raft) address; comma-separate or "
                           "repeat")
    init.add_argument("--api", dest="api_addresses", action="append",
                      metavar="ID=HOST:PORT,...",
                      help="each node's HTTP API address (optional; a node without one "
                           "serves no API)")
    init.add_argument("--dir", default=".", metavar="DIR",
                      help="where to write the files (default: the current directory)")
    init.add_argument("--tls", action="store_true",
                      help="also make a CA and certificates; turns on peer_tls and api_tls")
    init.add_argument("--metadata-version", type=int, metavar="N",
                      help="the metadata version (feature level) the new cluster starts at "
                           "(default: the newest this software reads); lower it while some "
                           "nodes will run an older release, then 'features upgrade'")
    init.add_argument("--force", action="store_true", help="replace files that exist")
    init.add_argument("--json", action="store_true", help="print JSON instead of text")

    command(sub, "status", "state, leader, term, indexes and peers of each node",
            "Ask every given node for its Raft status. PEERS shows each peer's link "
            "(up/down) and, on the leader, its match index (@N); learners (members "
            "catching up, not yet voting) are marked. Exits 3 only when no node answers.")

    members = group("members", "list, add or remove voting members", "members_command")
    command(members, "list", "list the voting members and learners",
            "The voting members and learners (members still catching up, not yet voting) "
            "as the first node that answers sees them.")
    add = command(members, "add", "add a voting member (start it first)",
                  "Add a voting member. Start the new node first, with a fresh data_dir and "
                  "a [cluster] table holding the current members plus itself: a node that "
                  "does not complete the cluster handshake is refused. It joins as a "
                  "learner (it receives the log, does not vote) and the leader makes it a "
                  "voter once it has caught up; one that has not caught up within the "
                  "cluster's learner_catchup_timeout is removed again and the add fails "
                  "(exit 4, member_not_caught_up). Changes are made one at a time; while "
                  "another is in flight this command retries until --timeout.")
    add.add_argument("node_id", help="the new member's node_id")
    add.add_argument("address", metavar="HOST:PORT", help="the new member's cluster address")
    add.add_argument("--no-check", action="store_true",
                     help="propose it even if it does not answer the cluster handshake yet "
                          "(by default a node that does not is refused); it still has "
                          "learner_catchup_timeout to catch up")
    remove = command(members, "remove", "remove a voting member",
                     "Remove a voting member. When it leads, leadership is moved to another "
                     "node first (its API must be among the addresses). Stop the removed "
                     "node's process afterwards.")
    remove.add_argument("node_id", help="the member to remove")

    leader = group("leader", "leadership", "leader_command")
    transfer = command(leader, "transfer", "move leadership to a node",
                       "Ask the leader (whose API must be among the addresses) to hand "
                       "leadership to NODE_ID, or to its most caught-up follower, and wait "
                       "until a node reports the new leader.")
    transfer.add_argument("node_id", nargs="?", help="the target (default: most caught-up)")
    transfer.add_argument("--wait", type=_positive, default=5.0, metavar="SECONDS",
                          help="how long to wait for the new leader (default 5)")

    topics = group("topics", "create, list, describe, delete or alter topics",
                   "topics_command")
    tlist = command(topics, "list", "list topic names", "List the topics' names.")
    create = command(topics, "create", "create one topic or many",
                     "Create a topic; its replicas are placed over the active brokers. "
                     "Several names (or --from-file) create them in batches of up to "
                     f"{_BATCH}, one log entry each: every topic succeeds or fails on its "
                     "own, and the exit code is 4 if any was refused. "
                     "Here --config is a topic setting; give a node config with "
                     "--node-config.", connection=conn_create)
    create.add_argument("name", nargs="*",
                        help="topic name(s): 1-249 characters of [a-zA-Z0-9._-]")
    create.add_argument("--from-file", metavar="FILE",
                        help="also create the topics named in FILE, one per line "
                        "('-': standard input; '#' starts a comment line)")
    create.add_argument("--partitions", type=int, required=True, metavar="N",
                        help="number of partitions (> 0)")
    create.add_argument("--replication-factor", type=int, required=True, metavar="R",
                        help="replicas per partition (at most the number of brokers)")
    create.add_argument("--config", dest="topic_config", action="append", metavar="KEY=VALUE",
                        help="a topic setting, e.g. retention.ms=86400000; repeatable")
    describe = command(topics, "describe", "show a topic and its partitions",
                       "Show a topic's settings and each partition's leader, replicas and ISR; "
                       "with --under-replicated only the partitions whose ISR is smaller than "
                       "their replica set (of every topic when no name is given).")
    describe.add_argument("name", nargs="?", help="topic name")
    describe.add_argument("--under-replicated", action="store_true",
                          help="only partitions with fewer in-sync replicas than replicas")
    for read in (tlist, describe):
        read.add_argument("--linearizable", action="store_true",
                          help="read through the leader's log instead of the local copy")
    delete = command(topics, "delete", "delete a topic", "Delete a topic and its partitions.")
    delete.add_argument("name", help="topic name")
    alter = command(topics, "alter", "change a topic's settings",
                    "Set settings and/or reset them to their defaults.")
    alter.add_argument("name", help="topic name")
    alter.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="set a setting; repeatable")
    alter.add_argument("--delete", action="append", metavar="KEY",
                       help="reset a setting to its default; repeatable")

    snap = group("snapshot", "save, inspect and restore backups", "snapshot_command")
    save = command(snap, "save", "save a consistent snapshot of the cluster to a file",
                   "Ask a node for a snapshot of everything the cluster committed before "
                   "the request (it commits a no-op through the leader first) and write it "
                   "to FILE, checksum verified. With --local the node snapshots what it has "
                   "applied without asking the leader: the way to save what a survivor "
                   "holds after the cluster lost its quorum.")
    save.add_argument("file", help="where to write (must not exist)")
    save.add_argument("--local", action="store_true",
                      help="do not go through the leader (quorum lost); ask one node only")
    inspect = command(snap, "inspect", "verify a snapshot file and show what it holds",
                      "Check a snapshot file's checksum and show its last index, term and "
                      "members.", connection=None)
    inspect.add_argument("file", help="the snapshot file")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")
    restore = command(snap, "restore", "seed a new node's data dir from a snapshot file",
                      "Write a new data directory from a snapshot file, for the node of "
                      "--config, with that config's [cluster] as the members. Run it for "
                      "every node of the new cluster (same file), then start them. The data "
                      "directory must not exist or be empty.", connection=None)
    restore.add_argument("file", help="the snapshot file")
    restore.add_argument("--config", dest="node_config", required=True, metavar="NODE.toml",
                         help="the new node's config: its node_id, [cluster] and data_dir")
    restore.add_argument("--data-dir", metavar="DIR", help="default: the config's data_dir")
    restore.add_argument("--json", action="store_true", help="print JSON instead of text")

    grow = command(topics, "add-partitions", "grow a topic to more partitions",
                   "Grow a topic to --total partitions (never fewer); the new ones are "
                   "placed over the active brokers.")
    grow.add_argument("name", help="topic name")
    grow.add_argument("--total", type=int, required=True, metavar="N",
                      help="the topic's new partition count")
    elect = command(topics, "elect", "elect partition leaders",
                    "Elect leaders of a topic's partitions (or one --partition): preferred "
                    "(the first replica, when in sync), isr (any in-sync replica) or unclean "
                    "(any live replica: may lose data).")
    elect.add_argument("name", help="topic name")
    elect.add_argument("--partition", type=int, metavar="P", help="only this partition")
    elect.add_argument("--kind", choices=("preferred", "isr", "unclean"), default="preferred",
                       help="how to choose (default preferred)")
    reassign = command(topics, "reassign", "move a partition to other brokers",
                       "Set a partition's replicas (the first is the preferred leader).")
    reassign.add_argument("name", help="topic name")
    reassign.add_argument("partition", type=int, help="partition index")
    reassign.add_argument("--replicas", type=_broker_ids, required=True, metavar="ID,ID,...",
                          help="the new replica set, comma-separated broker ids")

    brokers = group("brokers", "register, heartbeat, fence or list brokers", "brokers_command")
    command(brokers, "list", "list registered brokers",
            "List the brokers registered in the metadata, with their state.")
    bdescribe = command(brokers, "describe", "show one broker", "Show one registered broker.")
    bdescribe.add_argument("broker_id", type=int, help="the broker's id")
    register = command(brokers, "register", "register a broker (as the broker does at start)",
                       "Register a broker. It starts fenced and is unfenced by the leader once "
                       "it heartbeats ('brokers heartbeat'), unless --active.")
    register.add_argument("broker_id", type=int, help="the broker's id")
    register.add_argument("endpoint", metavar="HOST:PORT", help="where clients reach it")
    register.add_argument("--rack", help="its rack (replicas are spread across racks)")
    register.add_argument("--incarnation-id", metavar="ID",
                          help="its incarnation (default: a new one, which bumps its epoch)")
    register.add_argument("--active", action="store_true",
                          help="register it unfenced, without waiting for a heartbeat")
    beat = command(brokers, "heartbeat", "send brokers' heartbeats (for local clusters)",
                   "Heartbeat brokers on their behalf: once, or with --every every interval "
                   "until Ctrl-C (a stand-in for brokers on a local cluster; a real broker "
                   "heartbeats itself). A fenced broker that heartbeats is unfenced by the "
                   "leader: without --every, heartbeats repeat until that happened or "
                   "--timeout.")
    beat.add_argument("broker_ids", type=_broker_ids, metavar="ID[,ID...]",
                      help="the brokers' ids, comma-separated")
    beat.add_argument("--epoch", type=int, metavar="N",
                      help="the broker epoch (default: the registered one)")
    beat.add_argument("--every", type=_duration, metavar="DURATION",
                      help="repeat every DURATION (2s, 500ms, 1m) and print each round")
    unregister = command(brokers, "unregister", "remove a broker",
                         "Remove a broker; its partitions get new leaders.")
    unregister.add_argument("broker_id", type=int, help="the broker's id")
    for action in ("fence", "unfence"):
        fence = command(brokers, action, f"{action} a broker",
                        "Fence a broker: out of every ISR, leads nothing. A broker that "
                        "still heartbeats is unfenced again at the leader's next check "
                        "(within a second): stop it, or unregister it." if action == "fence"
                        else "Unfence a fenced broker.")
        fence.add_argument("broker_id", type=int, help="the broker's id")
        fence.add_argument("--epoch", type=int, metavar="N",
                           help="only if this is its current epoch")

    features = group("features", "metadata versions (feature levels): describe or upgrade",
                     "features_command")
    command(features, "describe", "each node's supported and finalized metadata version",
            "Ask every given node which metadata versions its software reads (SUPPORTED) "
            "and which one the cluster has finalized, as of the node's OFFSET.")
    fupgrade = command(
        features, "upgrade", "raise the cluster's metadata version",
        "Raise the cluster's finalized metadata version, so that commands of that "
        "version may be written. Refused (exit 4) unless every voter answers that its "
        "software reads it: upgrade every node's software first (docs/operations.md, "
        "'Rolling upgrade'). Cannot be lowered again.")
    fupgrade.add_argument("--metadata-version", type=int, required=True, metavar="N",
                          help="the version to finalize")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    try:
        args = _build_parser().parse_args(argv)
        handlers: dict[str, Callable[[argparse.Namespace], _Output | None]] = {
            "node": _run_node, "cluster": _cluster, "status": _status, "members": _members,
            "leader": _leader, "topics": _topics, "brokers": _brokers, "snapshot": _snapshot,
            "features": _features}
        output = handlers[args.command](args)
    except _UsageError as exc:
        return _fail(EXIT_USAGE, str(exc))
    except _NodeFailedError as exc:
        return _fail(EXIT_NODE_FAILED, str(exc))
    except ConfigError as exc:
        return _fail(EXIT_USAGE, str(exc))
    except ClusterUnreachableError as exc:
        leaderless = _no_leader(args)
        if leaderless is not None:
            return _fail(EXIT_FAILED, leaderless)
        return _fail(EXIT_UNREACHABLE, f"cluster unreachable: {exc}")
    except ConsensusError as exc:
        # A retriable failure (the node's own deadline passed, no leader known)
        # may be a lost quorum: say so, as when no node answered in time.
        leaderless = _no_leader(args) if exc.retriable else None
        if leaderless is not None:
            return _fail(EXIT_FAILED, f"{leaderless} ({_explain(exc)})")
        return _fail(EXIT_FAILED, _explain(exc))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return _closed_pipe()
    if output is not None:
        try:
            _print_line(json.dumps(output.data, indent=2, sort_keys=True) if args.json
                        else output.text)
        except BrokenPipeError:
            return _closed_pipe()
        return output.code
    return EXIT_OK


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("streambus-consensus")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


def _print_line(text: str) -> None:
    print(text, flush=True)


def _closed_pipe() -> int:
    """The reader went away (``| head``): stop quietly, as ``cat`` does."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush is quiet too
    os.close(devnull)
    return EXIT_OK


def _no_leader(args: argparse.Namespace) -> str | None:
    """When a request timed out: if nodes answer but none knows a leader (quorum
    lost, an election that cannot finish), say so instead of "unreachable"."""
    try:
        client = _client(argparse.Namespace(**{**vars(args), "timeout": 2.0}))
        answered = [s for _, s in _statuses(client) if s is not None]
    except (ConsensusError, _UsageError, AttributeError):
        return None

    def reaches_quorum(status: dict[str, Any]) -> bool:
        up = 1 + sum(1 for peer in status["peers"] if peer["connected"])
        return up > len(status.get("members") or [status["node_id"]]) // 2

    if not answered or any(s["leader_id"] and reaches_quorum(s) for s in answered):
        return None
    seen = ", ".join(f"{s['node_id']} {s['state']} in term {s['term']}, "
                     f"{1 + sum(p['connected'] for p in s['peers'])}/{len(s['members'])} "
                     f"members reachable" for s in answered)
    return (f"no leader: the nodes that answered know no leader with a quorum ({seen}); is "
            f"a majority of the members ({', '.join(answered[0]['members'])}) running and "
            f"connected?")


def _explain(exc: ConsensusError) -> str:
    message = str(exc)
    if message.startswith("not_found: no route for") and "/v1/" in message:
        return f"{message} (is the node running another app? 'node run --app metadata')"
    if message.startswith("unauthenticated:"):
        return (f"{message} (give the cluster secret: --secret-file, --config or "
                f"${ENV_SECRET_FILE})")
    return message


def _fail(code: int, message: str) -> int:
    print(f"streambus-consensus: error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
