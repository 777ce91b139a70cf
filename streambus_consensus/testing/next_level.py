"""Test only: turn this build into "the next release", one metadata version up.

The version-skew tests need two releases that differ the way real ones do: the
newer one reads and writes a command kind that the older one cannot decode.
:func:`install` makes this process that newer release: it registers
:class:`SetRetention`, a kind introduced at metadata version
``supported_metadata_versions()[1] + 1``, and its handler. A node process
installs it when :data:`ENV_VAR` is ``"1"`` (``node run --app metadata``);
nothing else ever does, and production configs never set it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..api import ApiError, ApiRequest, Route
from ..metadata import commands, fsm
from ..metadata.commands import AlterTopicConfig, RequestId

if TYPE_CHECKING:
    from ..metadata.store import MetadataStore

__all__ = ["ENV_VAR", "SetRetention", "install", "installed", "is_installed", "routes"]

ENV_VAR = "STREAMBUS_CONSENSUS_TEST_NEXT_METADATA_VERSION"
"""Set to ``"1"`` in a node process's environment to run it as the next release."""

_WIRE_NAME = "test_set_retention"


@dataclass(frozen=True, slots=True, kw_only=True)
class SetRetention:
    """Set a topic's ``retention.ms`` (the next release's new command kind)."""

    read_only: ClassVar[bool] = False
    request_id: RequestId
    """Idempotency key."""
    name: str
    """The topic."""
    retention_ms: int
    """The new retention, ``-1`` (forever) or more."""


def _apply(state_machine: Any, cmd: SetRetention, index: int, delta: Any) -> tuple[str, Any]:
    as_config = AlterTopicConfig(request_id=cmd.request_id, name=cmd.name,
                                 set_configs={"retention.ms": cmd.retention_ms})
    result: tuple[str, Any] = state_machine._alter_topic_config(as_config, index, delta)
    return result


def install() -> int:
    """Register :class:`SetRetention` (idempotent); return its metadata version."""
    if _WIRE_NAME not in commands._BY_NAME:
        level = commands.supported_metadata_versions()[1] + 1
        commands.register_command(SetRetention, _WIRE_NAME, {
            "request_id": commands._REQUEST_ID, "name": commands._NAME,
            "retention_ms": commands._Int(-1, commands._INT64_MAX),
        }, level=level)
        fsm.register_handler(SetRetention, _apply)
    return commands._LEVEL[SetRetention]


def is_installed() -> bool:
    """Whether this process runs as the next release."""
    return _WIRE_NAME in commands._BY_NAME


def routes(store: Callable[[], MetadataStore]) -> list[Route]:
    """``POST /v1/test/topics/{name}/retention`` ``{"retention_ms": n}``: propose
    a :class:`SetRetention` (refused as ``feature_not_enabled`` until the
    cluster's metadata version is raised)."""

    def set_retention(request: ApiRequest) -> Any:
        body = request.body if isinstance(request.body, dict) else {}
        value = body.get("retention_ms")
        if type(value) is not int:
            raise ApiError(400, "invalid_argument", "'retention_ms' must be an integer")
        result = store().execute(SetRetention(  # type: ignore[arg-type]
            request_id=store().next_request_id(), name=request.path_args[0],
            retention_ms=value))
        return {"offset": result.offset}

    return [Route("POST", "/v1/test/topics/{name}/retention", set_retention)]


@contextlib.contextmanager
def installed() -> Iterator[int]:
    """:func:`install` for the duration of a ``with`` block (in-process tests)."""
    schema, by_name = dict(commands._SCHEMA), dict(commands._BY_NAME)
    levels, supported = dict(commands._LEVEL), list(commands._SUPPORTED)
    extensions = dict(fsm._EXTENSIONS)
    try:
        yield install()
    finally:
        commands._SCHEMA.clear()
        commands._SCHEMA.update(schema)
        commands._BY_NAME.clear()
        commands._BY_NAME.update(by_name)
        commands._LEVEL.clear()
        commands._LEVEL.update(levels)
        commands._SUPPORTED[:] = supported
        fsm._EXTENSIONS.clear()
        fsm._EXTENSIONS.update(extensions)
