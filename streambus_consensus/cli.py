"""``streambus-consensus``: run a node and administer a cluster.

Errors print one line to stderr and exit non-zero: 2 for bad arguments or
config, 3 when no node answers, 4 when the cluster refused or failed the
request.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from .client import ApiClient, ClusterUnreachableError
from .config import NodeConfig
from .errors import ConfigError, ConsensusError

__all__ = ["main"]

EXIT_USAGE, EXIT_UNREACHABLE, EXIT_FAILED = 2, 3, 4
UNSAFE_NO_ENGINE_FIXES = "STREAMBUS_CONSENSUS_UNSAFE_DISABLE_ENGINE_FIXES"


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streambus-consensus",
        description="Run and administer a StreamBus metadata consensus cluster.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    node = sub.add_parser("node", help="run a node").add_subparsers(
        dest="node_command", required=True, metavar="ACTION")
    run = node.add_parser("run", help="run a node in the foreground until SIGTERM/SIGINT")
    run.add_argument("--config", required=True, help="node TOML config file")
    run.add_argument("--app", choices=("metadata", "kv"), default="metadata",
                     help="state machine: StreamBus metadata (default) or the example "
                          "key-value store")
    run.add_argument("--log-level", default="INFO", help="logging level (default INFO)")

    def client_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--api", action="append", default=None, metavar="HOST:PORT",
                       help="node API address; repeat for several nodes "
                            "(default: $STREAMBUS_CONSENSUS_API, comma-separated)")
        p.add_argument("--config", help="take the API address and secret from a node config")
        p.add_argument("--secret-file", help="file holding the cluster secret "
                                             "(default: $STREAMBUS_CONSENSUS_SECRET)")
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")
        p.add_argument("--timeout", type=float, default=10.0, help="seconds per request")

    status = sub.add_parser("status", help="leader, term, indexes and peers of every node")
    client_args(status)
    members = sub.add_parser("members", help="voting members").add_subparsers(
        dest="members_command", required=True, metavar="ACTION")
    client_args(members.add_parser("list", help="list voting members"))
    add = members.add_parser("add", help="add a voting member (start it first)")
    add.add_argument("node_id")
    add.add_argument("address", help="its cluster address host:port")
    client_args(add)
    remove = members.add_parser("remove", help="remove a voting member")
    remove.add_argument("node_id")
    client_args(remove)
    leader = sub.add_parser("leader", help="leadership").add_subparsers(
        dest="leader_command", required=True, metavar="ACTION")
    transfer = leader.add_parser("transfer", help="move leadership to a node")
    transfer.add_argument("node_id", nargs="?", help="target (default: most caught-up)")
    client_args(transfer)
    return parser


def _client(args: argparse.Namespace) -> ApiClient:
    addresses: list[str] = list(args.api or [])
    secret: str | None = None
    if args.config:
        config = NodeConfig.from_toml(args.config)
        if config.api_address:
            addresses.append(config.api_address)
        secret = config.cluster_secret
    if not addresses and os.environ.get("STREAMBUS_CONSENSUS_API"):
        addresses = os.environ["STREAMBUS_CONSENSUS_API"].split(",")
    if args.secret_file:
        try:
            with open(args.secret_file, encoding="utf-8") as f:
                secret = f.read().strip()
        except OSError as exc:
            raise ConfigError("--secret-file", args.secret_file,
                              exc.strerror or "unreadable") from None
    elif secret is None:
        secret = os.environ.get("STREAMBUS_CONSENSUS_SECRET")
    if not addresses:
        raise ConfigError("--api", None, "give --api HOST:PORT, --config, or "
                                         "$STREAMBUS_CONSENSUS_API")
    return ApiClient(addresses, secret=secret, timeout=args.timeout)


def _print(args: argparse.Namespace, data: Any, table: list[list[str]] | None = None) -> None:
    if args.json or table is None:
        print(json.dumps(data, indent=2, sort_keys=True))
        return
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
              .rstrip())


def _run_node(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = NodeConfig.from_toml(args.config).validate()
    from .raft.safety import MessageGuard
    from .server import KeyValueApplication, NodeServer

    if args.app == "kv":
        application: Any = KeyValueApplication()
    else:
        from .metadata.service import MetadataApplication

        application = MetadataApplication()
    guard = None
    if os.environ.get(UNSAFE_NO_ENGINE_FIXES) == "1":
        # Test-only: lets the regression tests show the engine defects the
        # guard prevents. Never set this in production.
        logging.getLogger(__name__).critical(
            "%s=1: engine fixes DISABLED; this node can acknowledge lost writes",
            UNSAFE_NO_ENGINE_FIXES)
        guard = MessageGuard(enabled=False)
    server = NodeServer(config, application, guard=guard)
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    signal.signal(signal.SIGINT, lambda *_: server.stop())
    server.start()
    server.wait()
    return 0


def _status(args: argparse.Namespace) -> int:
    client = _client(args)
    rows = [["NODE", "STATE", "LEADER", "TERM", "COMMIT", "APPLIED", "PEERS"]]
    report = []
    reachable = 0
    for address in client.addresses:
        try:
            status = client.status(address)
        except ClusterUnreachableError:
            report.append({"api": address, "error": "unreachable"})
            rows.append([address, "unreachable", "-", "-", "-", "-", "-"])
            continue
        reachable += 1
        report.append({"api": address, **status})
        peers = ",".join(f"{p['node_id']}{'' if p['connected'] else '(down)'}"
                         for p in status["peers"])
        rows.append([status["node_id"], status["state"], str(status["leader_id"]),
                     str(status["term"]), str(status["commit_index"]),
                     str(status["applied_index"]), peers])
    _print(args, report, rows)
    if not reachable:
        raise ClusterUnreachableError("no node answered")
    return 0


def _members(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.members_command == "add":
        result = client.request("POST", "/v1/members",
                                {"node_id": args.node_id, "address": args.address})
    elif args.members_command == "remove":
        result = client.request("DELETE", f"/v1/members/{args.node_id}")
    else:
        result = client.request("GET", "/v1/members")
    rows = [["NODE", "ADDRESS"]] + [[k, v] for k, v in sorted(result["members"].items())]
    _print(args, result, rows)
    return 0


def _leader(args: argparse.Namespace) -> int:
    client = _client(args)
    leader = client.request("GET", "/v1/members")["leader_id"]
    if leader is None:
        raise ConsensusError("no leader is known")
    # Transfers must be asked of the leader: find its API among the addresses.
    for address in client.addresses:
        try:
            if client.status(address)["state"] == "leader":
                client.request("POST", "/v1/leader/transfer", {"node_id": args.node_id},
                               address=address)
                _print(args, {"from": leader, "to": args.node_id or "most caught-up"})
                return 0
        except ClusterUnreachableError:
            continue
    raise ConsensusError(f"the leader {leader} is not among the given API addresses")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    handlers = {"node": _run_node, "status": _status, "members": _members, "leader": _leader}
    try:
        return handlers[args.command](args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ClusterUnreachableError as exc:
        print(f"error: cluster unreachable: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except ConsensusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
