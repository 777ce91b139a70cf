"""A runnable node: RaftNode + an application state machine + the HTTP API.

This is what ``streambus-consensus node run --config FILE`` starts. The
application decides the state machine and its routes: ``kv`` (the example
key-value machine) or ``metadata`` (StreamBus cluster metadata).
"""

from __future__ import annotations

import base64
import gc
import logging
import threading
from dataclasses import asdict
from typing import Any, Protocol

from .api import ApiError, ApiRequest, ApiServer, Route
from .config import NodeConfig
from .errors import ConsensusError
from .interfaces import NodeState, NodeStatus, StateMachine
from .kv import KeyValueStateMachine, kv_command
from .raft.aio import wait_outcome
from .raft.node import RaftNode
from .raft.safety import MessageGuard
from .tls import api_server_context

__all__ = ["Application", "KeyValueApplication", "NodeServer", "status_json"]

logger = logging.getLogger(__name__)


class Application(Protocol):
    """A state machine plus the HTTP routes that drive it."""

    state_machine: StateMachine

    def routes(self, node: RaftNode) -> list[Route]:
        """The routes this application serves."""
        ...

    def start(self, node: RaftNode) -> None:
        """Called once the node runs."""
        ...

    def stop(self) -> None:
        """Called before the node stops."""
        ...


def status_json(status: NodeStatus) -> dict[str, Any]:
    """A node status as plain JSON data."""
    data = asdict(status)
    data["state"] = str(status.state)
    return data


def _body_field(request: ApiRequest, name: str) -> Any:
    if not isinstance(request.body, dict) or name not in request.body:
        raise ApiError(400, "invalid_argument", f"JSON body must have a {name!r} field")
    return request.body[name]


def _text_field(request: ApiRequest, name: str) -> str:
    value = _body_field(request, name)
    if not isinstance(value, str):
        raise ApiError(400, "invalid_argument", f"{name!r} must be a string")
    return value


def _json_value(value: Any) -> str | int | None:
    if value is None or isinstance(value, str) or (isinstance(value, int)
                                                   and not isinstance(value, bool)):
        return value
    raise ApiError(400, "invalid_argument", "values must be strings, integers or null")


class KeyValueApplication:
    """The example key-value machine behind ``/v1/kv/{key}``."""

    def __init__(self) -> None:
        self.state_machine = KeyValueStateMachine()

    def start(self, node: RaftNode) -> None:
        """Nothing to start."""

    def stop(self) -> None:
        """Nothing to stop."""

    def routes(self, node: RaftNode) -> list[Route]:
        """``GET/PUT/DELETE /v1/kv/{key}``, ``POST /v1/kv/{key}/incr|cas``."""
        sm = self.state_machine

        # The hot routes are async: they run on the API's event loop and await
        # Raft, so a caller waiting for a commit holds no thread.
        async def propose(command: bytes) -> Any:
            return await wait_outcome(node, node.propose_async(command))

        async def read(request: ApiRequest) -> Any:
            key = request.path_args[0]
            if request.flag("linearizable"):
                await wait_outcome(node, node.read_index_async())
            return {"value": sm.get(key), "applied_index": node.applied_index}

        async def write(request: ApiRequest) -> Any:
            value = _json_value(_body_field(request, "value"))
            return {"previous": await propose(kv_command("set", request.path_args[0], value))}

        async def delete(request: ApiRequest) -> Any:
            return {"previous": await propose(kv_command("delete", request.path_args[0]))}

        async def incr(request: ApiRequest) -> Any:
            return {"value": await propose(kv_command("incr", request.path_args[0]))}

        async def cas(request: ApiRequest) -> Any:
            expected = _json_value(_body_field(request, "expected"))
            new = _json_value(_body_field(request, "new"))
            return {"swapped": await propose(kv_command("cas", request.path_args[0],
                                                        expected, new))}

        async def dump(request: ApiRequest) -> Any:
            if request.flag("linearizable"):
                await wait_outcome(node, node.read_index_async())
            return {"items": sm.items(), "applied_index": node.applied_index}

        return [
            Route("GET", "/v1/kv", dump),
            Route("GET", "/v1/kv/{key}", read),
            Route("PUT", "/v1/kv/{key}", write),
            Route("DELETE", "/v1/kv/{key}", delete),
            Route("POST", "/v1/kv/{key}/incr", incr),
            Route("POST", "/v1/kv/{key}/cas", cas),
        ]


def admin_routes(node: RaftNode) -> list[Route]:
    """Status, membership, leadership and snapshot routes common to every application."""

    def status(_: ApiRequest) -> Any:
        return status_json(node.status())

    def membership() -> dict[str, Any]:
        return {"members": node.members(), "learners": node.learners()}

    def members(_: ApiRequest) -> Any:
        return {**membership(), "leader_id": node.leader_id,
                "learner_catchup_timeout": node.config.learner_catchup_timeout}

    def add_member(request: ApiRequest) -> Any:
        check = request.body.get("check", True) if isinstance(request.body, dict) else True
        if not isinstance(check, bool):
            raise ApiError(400, "invalid_argument", "'check' must be true or false")
        node.add_member(_text_field(request, "node_id"), _text_field(request, "address"),
                        check=check)
        return membership()

    def remove_member(request: ApiRequest) -> Any:
        node.remove_member(request.path_args[0])
        return membership()

    def transfer(request: ApiRequest) -> Any:
        if request.body is not None and not isinstance(request.body, dict):
            raise ApiError(400, "invalid_argument", "JSON body must be an object or empty")
        target = request.body.get("node_id") if isinstance(request.body, dict) else None
        if target is not None and not isinstance(target, str):
            raise ApiError(400, "invalid_argument", "'node_id' must be a string or null")
        node.transfer_leadership(target)
        return {"requested": target}

    def snapshot(_: ApiRequest) -> Any:
        node.snapshot_now()
        return {"requested": True}

    def backup(request: ApiRequest) -> Any:
        if not request.flag("local"):
            node.read_index()  # everything the cluster committed before this request
        blob = node.export_snapshot()
        return {"snapshot": base64.b64encode(blob).decode("ascii"), "node_id": node.node_id}

    return [
        Route("GET", "/v1/status", status),
        Route("GET", "/v1/members", members),
        Route("POST", "/v1/members", add_member),
        Route("DELETE", "/v1/members/{node_id}", remove_member),
        Route("POST", "/v1/leader/transfer", transfer),
        Route("POST", "/v1/snapshot", snapshot),
        Route("GET", "/v1/snapshot", backup),
    ]


class NodeServer:
    """A node with its application and HTTP API, started and stopped together."""

    def __init__(self, config: NodeConfig, application: Application | None = None, *,
                 guard: MessageGuard | None = None) -> None:
        self.config = config.clone().validate()
        self.application = application or KeyValueApplication()
        self.node = RaftNode(self.config, self.application.state_machine, guard=guard)
        # A node process owns its interpreter: once a snapshot's objects are
        # loaded, move them out of the collector's reach, or every full
        # collection walks millions of long-lived records (0.9 s pauses at a
        # million partitions, longer than an election timeout).
        self.node.restore_observer = gc.freeze
        self.api: ApiServer | None = None
        # Load the API's certificate now: a bad file stops the node before it starts.
        self._api_tls = api_server_context(self.config) if self.config.api_tls else None
        self._stopped = threading.Event()
        self._done = threading.Event()
        self.node.on_fatal(lambda _error: self._done.set())

    @property
    def fatal_error(self) -> BaseException | None:
        """Why the node stopped on its own (storage failure, Raft thread crash), or ``None``."""
        return self.node.fatal_error

    def start(self) -> None:
        """Start the node, then the application, then the API."""
        self.node.start()
        try:
            self.application.start(self.node)
            if self.config.api_address is not None:
                from .metrics import metrics_endpoint

                self.api = ApiServer(
                    self.config.api_address,
                    admin_routes(self.node) + self.application.routes(self.node),
                    secret=self.config.secret,
                    metrics=metrics_endpoint(self.node, self.application,
                                             api=lambda: self.api),
                    tls_context=self._api_tls,
                    health=self._health,
                    max_connections=self.config.api_max_connections,
                    max_in_flight=self.config.api_max_in_flight,
                    handler_threads=self.config.api_handler_threads,
                    request_timeout=self.config.api_request_timeout,
                    idle_timeout=self.config.api_idle_timeout,
                )
                self.api.start()
        except BaseException:
            self.stop()
            raise
        logger.info("%s: serving (api %s)", self.config.node_id, self.config.api_address)

    def _health(self) -> tuple[int, dict[str, Any]]:
        """``/healthz``: 200 while the Raft thread runs, 503 once it stopped."""
        node = self.node
        state = node.state
        return (503 if state is NodeState.STOPPED else 200), {
            "node_id": node.node_id, "state": str(state), "leader_id": node.leader_id,
            "term": node.term}

    def stop(self) -> None:
        """Stop the API, the application and the node. Idempotent."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._done.set()
        if self.api is not None:
            self.api.stop()
        try:
            self.application.stop()
        except ConsensusError:
            logger.exception("application stop failed")
        self.node.stop()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until :meth:`stop` is called or the node stops on its own (see
        :attr:`fatal_error`; call :meth:`stop` then), at most ``timeout``
        seconds; ``True`` when either happened."""
        return self._done.wait(timeout)
