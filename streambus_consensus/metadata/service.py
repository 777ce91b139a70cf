"""The metadata application of a node process: HTTP routes, controller, metrics.

Routes (JSON; see :mod:`streambus_consensus.api` for authentication and errors).
Writes accept an optional ``"request_id": {"client_id": ..., "seq": ...}`` so
that a client retrying after a timeout or failover applies once.

============================================  ======================================
``GET /v1/topics``                            names (``?linearizable=1``)
``POST /v1/topics``                           create: name, partitions,
                                              replication_factor, config
``POST /v1/topics:batch``                     create many in one entry: ``{"topics":
                                              [{name, partitions, replication_factor,
                                              config}, ...]}``; one result per topic
``GET /v1/topics/{name}``                     topic and partitions (``?linearizable=1``)
``DELETE /v1/topics/{name}``                  delete
``PUT /v1/topics/{name}/config``              ``{"set": {...}, "delete": [...]}``
``POST /v1/topics/{name}/partitions``         ``{"count": n}``, never fewer
``POST /v1/topics/{name}/elect``              ``{"partition": i|null, "kind": ...}``
``POST /v1/topics/{name}/partitions/{i}/isr`` leader, leader_epoch, isr, partition_epoch
``POST /v1/topics/{name}/partitions/{i}/reassign``  ``{"replicas": [...]}``
``GET /v1/brokers``, ``GET /v1/brokers/{id}`` registered brokers
``POST /v1/brokers``                          register: broker_id, endpoint, rack,
                                              incarnation_id
``DELETE /v1/brokers/{id}``                   unregister
``POST /v1/brokers/{id}/heartbeat``           ``{"broker_epoch": e}``
``POST /v1/brokers/{id}/{fence|unfence|shutdown}``
``GET /v1/watch?after=OFFSET&wait=SECONDS``   changes after an offset (long poll); a
                                              full image when too old or absent;
                                              ``&format=compact``: partition changes
                                              as columns, at most ``limit`` changes
                                              per answer (see :func:`compact_events`)
``GET /v1/features``                          metadata versions: this node's software's
                                              range, the cluster's finalized one
``POST /v1/features``                         ``{"metadata_version": n}``: raise it, once
                                              every voter reads it
``GET /v1/metadata/digest``                   SHA-256 of the local replica's state (its
                                              snapshot bytes) and its offset
============================================  ======================================
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import inspect
import itertools
import logging
import math
import os
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .. import codec
from ..api import ApiError, ApiRequest, Handler, InPool, Route
from ..errors import CodecError
from ..metrics import PREFIX
from ..raft.node import RaftNode
from ..testing import next_level
from .commands import RequestId
from .feed import MetadataEvent, WatchedStateMachine
from .fsm import Change, MetadataImage
from .records import Broker, BrokerState, Partition, Topic
from .store import MetadataStore, NewTopic

__all__ = ["COMPACT_WATCH_LIMIT", "MetadataApplication", "compact_events", "to_json"]

COMPACT_WATCH_LIMIT = 100_000
"""Default and largest number of changes in one compact ``/v1/watch`` answer.
An answer is encoded in one call that holds the interpreter lock; bounding it
keeps the Raft thread of the node running while a mass change is streamed."""

logger = logging.getLogger(__name__)


_PLAIN = (str, int, float, bool, type(None))
_FIELDS: dict[type, tuple[str, ...]] = {}
"""Field names of each record class to_json met (the same few classes, every answer)."""


def _field_names(cls: type) -> tuple[str, ...]:
    names = _FIELDS.get(cls)
    if names is None:
        names = _FIELDS[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names


def to_json(value: Any) -> Any:
    """Records, images and events as plain JSON data."""
    if isinstance(value, _PLAIN) and not isinstance(value, enum.Enum):
        return value
    if isinstance(value, MetadataImage):
        return {
            "offset": value.offset,
            "brokers": [to_json(b) for b in value.brokers.values()],
            "topics": [_topic_json(t, value.partitions.get(t.name, ()))
                       for t in value.topics.values()],
        }
    if isinstance(value, MetadataEvent):
        return {"offset": value.offset, "reset": value.is_reset,
                "image": to_json(value.image) if value.image is not None else None,
                "changes": [{"kind": str(c.kind), "key": to_json(c.key),
                             "record": to_json(c.record)} for c in value.changes]}
    if isinstance(value, enum.Enum):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {name: to_json(getattr(value, name)) for name in _field_names(type(value))}
    if isinstance(value, tuple | list):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    return value




def compact_events(events: list[MetadataEvent], skip: int, limit: int) -> dict[str, Any]:
    """``{"events": [...], "sets": [...], "resume": ...}``: events in the
    compact watch format, the table of replica sets they use, and where the
    next read resumes.

    Partition changes come in *runs*: consecutive changes of one kind to
    partitions become one object of columns, ``{"kind", "topics": [[name,
    count], ...], "index": [...], "leader": [...], "isr": [...], "replicas":
    [...], "leader_epoch": [...], "partition_epoch": [...], "recovering":
    [...]}``: the first ``count`` rows are partitions of the first topic named,
    and so on; ``isr`` and ``replicas`` hold positions in the answer's ``sets``
    table of lists of broker ids (a million partitions over a few brokers use
    a few dozen distinct sets). A column other than ``index`` whose values are
    all equal is sent as that one value instead of a list. Other changes keep
    the plain format, in order between the runs.

    The first event starts at its change number ``skip``; at most ``limit``
    changes are returned. Every event carries ``"first"`` (its first change
    number here) and ``"total"``; for one cut short, ``resume`` is the
    cursor ``{"after": ..., "skip": ...}`` to pass back; ``None`` when every
    event was returned whole (resume after the last one's offset).
    """
    out: list[dict[str, Any]] = []
    sets: dict[tuple[int, ...], int] = {}
    budget = limit
    for n, event in enumerate(events):
        if event.is_reset:
            out.append(to_json(event))
            continue
        first = skip if n == 0 else 0
        end = min(len(event.changes), first + budget)
        out.append({"offset": event.offset, "reset": False, "first": first,
                    "total": len(event.changes),
                    "runs": _runs(event.changes[first:end], sets)})
        budget -= end - first
        if end < len(event.changes):
            return {"events": out, "sets": [list(s) for s in sets],
                    "resume": {"after": event.offset - 1, "skip": end}}
        if budget <= 0:
            break
    return {"events": out, "sets": [list(s) for s in sets], "resume": None}


def _column(values: list[Any]) -> Any:
    """A column whose values are all equal is sent as that one value."""
    return values[0] if values and values.count(values[0]) == len(values) else values


def _runs(changes: tuple[Change, ...], sets: dict[tuple[int, ...], int]) -> list[dict[str, Any]]:
    # Split into runs with C-level grouping, then fill each run's columns with
    # comprehensions: a million partitions take a fraction of a second.
    runs: list[dict[str, Any]] = []
    # Only partition changes have a (topic, index) key. (No set lookups here:
    # hashing an enum member runs Python code.)
    kinds = [c.kind if type(c.key) is tuple else None for c in changes]
    start = 0
    for kind, group in itertools.groupby(kinds):
        end = start + len(list(group))
        if kind is None:
            runs += [{"kind": str(c.kind), "key": to_json(c.key), "record": to_json(c.record)}
                     for c in changes[start:end]]
        else:
            records: list[Partition] = [c.record for c in changes[start:end]]  # type: ignore[misc]
            runs.append({
                "kind": str(kind),
                "topics": [[topic, len(list(same))] for topic, same
                           in itertools.groupby([p.topic for p in records])],
                "index": [p.index for p in records],
                "leader": _column([p.leader for p in records]),
                "isr": _column([sets.setdefault(p.isr, len(sets)) for p in records]),
                "replicas": _column([sets.setdefault(p.replicas, len(sets)) for p in records]),
                "leader_epoch": _column([p.leader_epoch for p in records]),
                "partition_epoch": _column([p.partition_epoch for p in records]),
                "recovering": _column([1 if p.recovering else 0 for p in records]),
            })
        start = end
    return runs


def _topic_json(topic: Topic, partitions: tuple[Partition, ...]) -> dict[str, Any]:
    data: dict[str, Any] = to_json(topic)
    data["config"] = topic.config.to_dict()
    data["partitions"] = [to_json(p) for p in partitions]
    return data


def _body(request: ApiRequest) -> dict[str, Any]:
    if request.body is None:
        return {}
    if not isinstance(request.body, dict):
        raise ApiError(400, "invalid_argument", "JSON body must be an object")
    return request.body


_KIND_NAMES = {int: "an integer", str: "a string", bool: "true or false",
               dict: "an object", list: "an array"}


def _field(body: dict[str, Any], name: str, kind: type, *, default: Any = ...) -> Any:
    """``body[name]`` checked against ``kind``. A field with a default may be
    absent or ``null`` (both give the default); a required one must be there."""
    value = body.get(name)
    if value is None:
        if default is ...:
            what = "missing field" if name not in body else "null given for field"
            raise ApiError(400, "invalid_argument", f"{what} {name!r}")
        return default
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ApiError(400, "invalid_argument", f"{name!r} must be an integer")
    if not isinstance(value, kind):
        raise ApiError(400, "invalid_argument",
                       f"{name!r} must be {_KIND_NAMES.get(kind, kind.__name__)}")
    return value


def _request_id(body: dict[str, Any]) -> RequestId | None:
    raw = body.get("request_id")
    if raw is None:
        return None
    if (not isinstance(raw, dict) or not isinstance(raw.get("client_id"), str)
            or isinstance(raw.get("seq"), bool) or not isinstance(raw.get("seq"), int)):
        raise ApiError(400, "invalid_argument",
                       "request_id must be {\"client_id\": str, \"seq\": int}")
    return RequestId(raw["client_id"], raw["seq"])


def _new_topics(body: dict[str, Any]) -> list[NewTopic]:
    """The ``topics`` of a batched create, each checked like ``POST /v1/topics``'s body."""
    topics = []
    for i, item in enumerate(_field(body, "topics", list)):
        if not isinstance(item, dict):
            raise ApiError(400, "invalid_argument", f"topics[{i}] must be an object")
        try:
            topics.append(NewTopic(
                _field(item, "name", str), _field(item, "partitions", int),
                _field(item, "replication_factor", int),
                _field(item, "config", dict, default={})))
        except ApiError as exc:
            raise ApiError(400, "invalid_argument", f"topics[{i}]: {exc}") from None
    return topics


def _int_arg(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ApiError(400, "invalid_argument", f"{what} must be an integer") from None


def _seconds_arg(text: str | None, what: str, limit: float) -> float:
    """A duration query parameter, clamped to ``0..limit`` (absent: 0)."""
    if text in (None, ""):
        return 0.0
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if math.isnan(value):
        raise ApiError(400, "invalid_argument", f"{what} must be a number of seconds")
    return min(max(value, 0.0), limit)


def _checked(handler: Handler) -> Handler:
    """Report arguments that cannot be encoded into a command as a 400.

    The command codec checks every field's type and range before anything is
    proposed (:func:`~.commands.encode_command`); here a CodecError can only
    come from the caller's arguments, never from the cluster.
    """
    if inspect.iscoroutinefunction(handler):
        async def run_async(request: ApiRequest) -> Any:
            try:
                return await handler(request)
            except CodecError as exc:
                raise ApiError(400, "invalid_argument", str(exc)) from None

        return run_async

    def run(request: ApiRequest) -> Any:
        try:
            return handler(request)
        except CodecError as exc:
            raise ApiError(400, "invalid_argument", str(exc)) from None

    return run


class MetadataApplication:
    """StreamBus metadata on a node process (``node run --app metadata``)."""

    def __init__(self) -> None:
        if os.environ.get(next_level.ENV_VAR) == "1":
            level = next_level.install()
            logger.warning("%s=1: test build of the next release (reads metadata version %d)",
                           next_level.ENV_VAR, level)
        self.state_machine = WatchedStateMachine()
        self.store: MetadataStore | None = None

    def start(self, node: RaftNode) -> None:
        """Create the store and start its controller on the running node."""
        self.store = MetadataStore(node, self.state_machine)
        self.store.start()

    def stop(self) -> None:
        """Stop the controller and watches."""
        if self.store is not None:
            self.store.close()

    def _store(self) -> MetadataStore:
        if self.store is None:
            raise ApiError(503, "unavailable", "metadata store is not running")
        return self.store

    def routes(self, node: RaftNode) -> list[Route]:
        """See the module docstring."""
        s = self._store

        # The hot routes are async: they run on the API's event loop and await
        # Raft, holding no thread (see :class:`~..api.ApiServer`).
        async def list_topics(req: ApiRequest) -> Any:
            if req.flag("linearizable"):
                await s().read_index_async()
            image = s().image()
            return {"topics": sorted(image.topics), "offset": image.offset}

        async def create_topic(req: ApiRequest) -> Any:
            body = _body(req)
            topic = await s().create_topic_async(
                _field(body, "name", str), _field(body, "partitions", int),
                _field(body, "replication_factor", int),
                config=_field(body, "config", dict, default=None),
                request_id=_request_id(body))
            described = s().describe_topic(topic.name)
            return _topic_json(topic, described[1] if described else ())

        def create_topics(req: ApiRequest) -> Any:
            body = _body(req)
            outcomes = s().create_topics(_new_topics(body), request_id=_request_id(body))
            return {"created": sum(1 for o in outcomes if o.ok), "results": [
                {"name": o.name, "ok": o.ok, "code": o.code, "message": o.message,
                 "topic": None if o.topic is None else {
                     "name": o.topic.name, "topic_id": o.topic.topic_id,
                     "config": o.topic.config.to_dict(),
                     "partition_count": o.topic.partition_count,
                     "replication_factor": o.topic.replication_factor}}
                for o in outcomes]}

        async def describe_topic(req: ApiRequest) -> Any:
            if req.flag("linearizable"):
                await s().read_index_async()
            found = s().describe_topic(req.path_args[0])
            if found is None:
                raise ApiError(404, "unknown_topic", f"topic {req.path_args[0]!r} does not exist")
            return _topic_json(*found)

        def delete_topic(req: ApiRequest) -> Any:
            s().delete_topic(req.path_args[0], request_id=_request_id(_body(req)))
            return {"deleted": req.path_args[0]}

        def alter_config(req: ApiRequest) -> Any:
            body = _body(req)
            topic = s().alter_topic_config(
                req.path_args[0], _field(body, "set", dict, default={}),
                tuple(_field(body, "delete", list, default=[])), request_id=_request_id(body))
            return to_json(topic) | {"config": topic.config.to_dict()}

        def add_partitions(req: ApiRequest) -> Any:
            body = _body(req)
            topic = s().add_partitions(req.path_args[0], _field(body, "count", int),
                                       request_id=_request_id(body))
            return to_json(topic)

        def elect(req: ApiRequest) -> Any:
            body = _body(req)
            changed = s().elect_leaders(
                req.path_args[0], _field(body, "partition", int, default=None),
                kind=_field(body, "kind", str, default="preferred"),
                request_id=_request_id(body))
            return {"changed": to_json(changed)}

        def alter_isr(req: ApiRequest) -> Any:
            body = _body(req)
            part = s().alter_isr(
                req.path_args[0], _int_arg(req.path_args[1], "partition"),
                leader=_field(body, "leader", int),
                leader_epoch=_field(body, "leader_epoch", int),
                new_isr=tuple(_field(body, "isr", list)),
                partition_epoch=_field(body, "partition_epoch", int),
                request_id=_request_id(body))
            return to_json(part)

        def reassign(req: ApiRequest) -> Any:
            body = _body(req)
            part = s().reassign_replicas(
                req.path_args[0], _int_arg(req.path_args[1], "partition"),
                tuple(_field(body, "replicas", list)), request_id=_request_id(body))
            return to_json(part)

        def list_brokers(req: ApiRequest) -> Any:
            image = s().read_image() if req.flag("linearizable") else s().image()
            return {"brokers": [to_json(b) for b in image.brokers.values()],
                    "offset": image.offset}

        def describe_broker(req: ApiRequest) -> Any:
            broker = s().image().brokers.get(_int_arg(req.path_args[0], "broker id"))
            if broker is None:
                raise ApiError(404, "unknown_broker", f"broker {req.path_args[0]} is unknown")
            return to_json(broker)

        def register(req: ApiRequest) -> Any:
            body = _body(req)
            broker = s().register_broker(
                _field(body, "broker_id", int), _field(body, "endpoint", str),
                rack=_field(body, "rack", str, default=None),
                incarnation_id=_field(body, "incarnation_id", str, default=None),
                fenced=bool(_field(body, "fenced", bool, default=True)),
                request_id=_request_id(body))
            return to_json(broker)

        def unregister(req: ApiRequest) -> Any:
            s().unregister_broker(_int_arg(req.path_args[0], "broker id"),
                                  request_id=_request_id(_body(req)))
            return {"unregistered": int(req.path_args[0])}

        async def heartbeat(req: ApiRequest) -> Any:  # never blocks: in memory or a message
            broker: Broker | None = s().heartbeat(_int_arg(req.path_args[0], "broker id"),
                                                  _field(_body(req), "broker_epoch", int))
            return to_json(broker)

        def broker_action(req: ApiRequest) -> Any:
            broker_id = _int_arg(req.path_args[0], "broker id")
            body = _body(req)
            epoch = _field(body, "broker_epoch", int, default=None)
            actions = {"fence": s().fence_broker, "unfence": s().unfence_broker,
                       "shutdown": s().begin_controlled_shutdown}
            action = actions.get(req.path_args[1])
            if action is None:
                raise ApiError(404, "not_found", f"no broker action {req.path_args[1]!r}")
            action(broker_id, epoch, request_id=_request_id(body))
            return to_json(s().image().brokers.get(broker_id))

        def features(req: ApiRequest) -> Any:
            return s().describe_features()

        def upgrade_features(req: ApiRequest) -> Any:
            level = _field(_body(req), "metadata_version", int)
            voters = s().upgrade_metadata_version(level)
            return s().describe_features() | {
                "voters": {v: list(r) if r else None for v, r in voters.items()}}

        def digest(req: ApiRequest) -> Any:
            blob = s().state_machine.fsm.snapshot()
            offset = codec.decode(codec.decode(blob)[3])[0]  # the state's own offset
            return {"offset": offset, "sha256": hashlib.sha256(blob).hexdigest()}

        async def watch(req: ApiRequest) -> Any:
            # The long poll waits on the event loop, holding no thread; the
            # answer (a fence changes up to a million partitions) is built
            # on a handler thread.
            after_text = req.param("after")
            after = None if after_text in (None, "") else _int_arg(after_text, "after")
            wait = _seconds_arg(req.param("wait"), "wait", 30.0)
            fmt = req.param("format") or "plain"
            if fmt not in ("plain", "compact"):
                raise ApiError(400, "invalid_argument", "format must be 'plain' or 'compact'")
            skip, limit = 0, COMPACT_WATCH_LIMIT
            if fmt == "compact":
                skip = _int_arg(req.param("skip") or "0", "skip")
                limit = _int_arg(req.param("limit") or str(COMPACT_WATCH_LIMIT), "limit")
                if skip < 0 or not 1 <= limit <= COMPACT_WATCH_LIMIT:
                    raise ApiError(400, "invalid_argument", "skip must be >= 0 and limit in "
                                   f"1..{COMPACT_WATCH_LIMIT}")
            feed = s().state_machine.feed
            await feed.wait_async(after, wait)

            def answer() -> Any:
                events = feed.read(after, timeout=0)
                if fmt == "plain":
                    return {"events": [to_json(e) for e in events]}
                return compact_events(events, skip, limit)

            return InPool(answer)

        routes = [
            Route("GET", "/v1/topics", list_topics),
            Route("POST", "/v1/topics", create_topic),
            Route("POST", "/v1/topics:batch", create_topics),
            Route("GET", "/v1/topics/{name}", describe_topic),
            Route("DELETE", "/v1/topics/{name}", delete_topic),
            Route("PUT", "/v1/topics/{name}/config", alter_config),
            Route("POST", "/v1/topics/{name}/partitions", add_partitions),
            Route("POST", "/v1/topics/{name}/elect", elect),
            Route("POST", "/v1/topics/{name}/partitions/{i}/isr", alter_isr),
            Route("POST", "/v1/topics/{name}/partitions/{i}/reassign", reassign),
            Route("GET", "/v1/brokers", list_brokers),
            Route("POST", "/v1/brokers", register),
            Route("GET", "/v1/brokers/{id}", describe_broker),
            Route("DELETE", "/v1/brokers/{id}", unregister),
            Route("POST", "/v1/brokers/{id}/heartbeat", heartbeat),
            Route("POST", "/v1/brokers/{id}/{action}", broker_action),
            Route("GET", "/v1/watch", watch),
            Route("GET", "/v1/features", features),
            Route("POST", "/v1/features", upgrade_features),
            Route("GET", "/v1/metadata/digest", digest),
        ]
        if next_level.is_installed():
            routes += next_level.routes(s)
        return [Route(r.method, r.pattern, _checked(r.handler)) for r in routes]

    def collect_metrics(self) -> Iterator[Metric]:
        """Metadata gauges, read at scrape time from the local image."""
        store = self.store
        if store is None:
            return
        image = store.image()
        node_id = store.node.node_id
        partitions = [p for parts in image.partitions.values() for p in parts]
        min_isr = {name: t.config.min_insync_replicas for name, t in image.topics.items()}
        for name, doc, value in (
            ("metadata_topics", "Topics", len(image.topics)),
            ("metadata_partitions", "Partitions", len(partitions)),
            ("metadata_offline_partitions", "Partitions without a leader",
             sum(1 for p in partitions if p.leader is None)),
            ("metadata_under_replicated_partitions", "Partitions whose ISR is smaller "
             "than their replica set", sum(1 for p in partitions if len(p.isr) < len(p.replicas))),
            ("metadata_under_min_isr_partitions", "Partitions whose ISR is below "
             "min.insync.replicas", sum(1 for p in partitions if len(p.isr) < min_isr[p.topic])),
            ("metadata_preferred_leader_imbalance", "Partitions not led by their preferred "
             "replica", sum(1 for p in partitions if p.leader != p.replicas[0])),
            ("metadata_offset", "Offset of the local metadata image", image.offset),
        ):
            gauge = GaugeMetricFamily(PREFIX + name, doc, labels=["node_id"])
            gauge.add_metric([node_id], float(value))
            yield gauge
        by_state = GaugeMetricFamily(PREFIX + "metadata_brokers", "Registered brokers by state",
                                     labels=["node_id", "state"])
        for state in BrokerState:
            by_state.add_metric([node_id, str(state)], float(
                sum(1 for b in image.brokers.values() if b.state is state)))
        yield by_state
        fenced = CounterMetricFamily(PREFIX + "controller_fenced_brokers",
                                     "Brokers fenced by this node's controller for silence",
                                     labels=["node_id"])
        fenced.add_metric([node_id], float(store.controller.fenced_by_controller))
        yield fenced
        resets = CounterMetricFamily(PREFIX + "metadata_watch_resets",
                                     "Watchers sent a full image because they fell behind",
                                     labels=["node_id"])
        resets.add_metric([node_id], float(store.state_machine.feed.resets))
        yield resets
