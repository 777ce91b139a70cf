"""A small HTTP client for the node API, used by the CLI, the tests and the examples.

It signs requests with the cluster secret (see :mod:`streambus_consensus.api`),
tries the given nodes in turn and turns error bodies back into the package's
typed errors.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Sequence
from typing import Any

from .api import sign_request
from .config import parse_address
from .errors import (
    CommandRefusedError,
    ConsensusError,
    NoLeaderError,
    NotLeaderError,
    OutcomeUnknownError,
    ProposalRejectedError,
)

__all__ = ["ApiClient", "ClusterUnreachableError"]


class ClusterUnreachableError(ConsensusError):
    """No node answered."""

    retriable = True


class ApiClient:
    """Talks to one or more nodes' HTTP APIs.

    Args:
        addresses: ``host:port`` of node APIs; tried in order, starting with
            the last one that answered.
        secret: the cluster secret, when the cluster has one.
        timeout: socket timeout per request.
    """

    def __init__(self, addresses: Sequence[str], *, secret: str | None = None,
                 timeout: float = 10.0) -> None:
        if not addresses:
            raise ValueError("at least one API address is needed")
        for address in addresses:
            parse_address(address, field_name="api address")
        self.addresses = list(addresses)
        self.secret = secret
        self.timeout = timeout
        self._preferred = 0

    def request(self, method: str, path: str, body: Any = None, *,
                address: str | None = None) -> Any:
        """Send one request; return its ``result`` or raise the typed error.

        With ``address`` only that node is asked; otherwise each node is tried
        until one answers (connection failures move on to the next).
        """
        targets = [address] if address else (self.addresses[self._preferred:]
                                              + self.addresses[:self._preferred])
        errors = []
        for target in targets:
            try:
                status, payload = self._send(target, method, path, body)
            except (OSError, http.client.HTTPException) as exc:  # e.g. cut mid-answer
                errors.append(f"{target}: {exc}")
                continue
            if address is None:
                self._preferred = self.addresses.index(target)
            return _result(status, payload)
        raise ClusterUnreachableError("no node answered: " + "; ".join(errors))

    def _send(self, address: str, method: str, path: str, body: Any) -> tuple[int, Any]:
        host, port = parse_address(address)
        raw = b"" if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Content-Length": str(len(raw))}
        if self.secret is not None:
            timestamp = f"{time.time():.3f}"
            headers["X-SBC-Timestamp"] = timestamp
            headers["X-SBC-Signature"] = sign_request(self.secret, method, path, timestamp, raw)
        conn = http.client.HTTPConnection(host, port, timeout=self.timeout)
        try:
            conn.request(method, path, body=raw, headers=headers)
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        try:
            return response.status, json.loads(data) if data else None
        except ValueError:
            raise OSError(f"non-JSON answer with status {response.status}") from None

    def status(self, address: str) -> dict[str, Any]:
        """``GET /v1/status`` of one node."""
        result: dict[str, Any] = self.request("GET", "/v1/status", address=address)
        return result


def _result(status: int, payload: Any) -> Any:
    if status == 200 and isinstance(payload, dict) and "result" in payload:
        return payload["result"]
    error = payload.get("error", {}) if isinstance(payload, dict) else {}
    message = str(error.get("message", f"HTTP {status}"))
    code = str(error.get("code", "unknown"))
    kind = error.get("type", "")
    if status == 409:
        raise CommandRefusedError(code, message.split(": ", 1)[-1])
    if status == 504:
        raise OutcomeUnknownError(message)
    if kind == "NotLeaderError":
        raise NotLeaderError(message, leader_hint=error.get("leader_hint"))
    if kind == "NoLeaderError":
        raise NoLeaderError(message)
    if status == 503:
        raise ProposalRejectedError(message)
    raise ConsensusError(f"{code}: {message}")
