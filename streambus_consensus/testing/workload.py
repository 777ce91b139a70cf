"""Clients that drive the metadata HTTP API under faults and record what they saw.

:class:`MetadataWorkload` runs concurrent clients. Each issues topic
operations (create, delete, alter config, add partitions, linearizable read)
against a node chosen at random, and records every operation in a
:class:`~.linearizability.History` for :func:`~.linearizability.metadata_model`:
invoked just before the first request, completed just after the last answer.

How an answer is recorded:

- **ok**: the operation took effect (or was definitely refused by the state
  machine: ``topic_exists``, ``unknown_topic``, ``invalid_partitions`` are
  outputs of the model, not failures).
- **fail**: it definitely did not take effect: every attempt either never
  left (the connection was refused) or got a 503 saying the proposal was
  rejected (not leader, no leader, queue full). Failed operations are left
  out of the history. A read that got no answer is also a failure: reads
  change nothing.
- **unknown**: some attempt may have reached the log (a timeout, a broken
  connection, a 504, a 500) and no later attempt settled it before the
  deadline.

Writes carry a request id (``{"client_id", "seq"}``). An attempt whose
outcome is unknown is retried, on another node, with the *same* request id,
so the state machine applies it at most once and answers the retry with the
original result: most unknowns become definite, which keeps histories small
for the checker.

:class:`FeedRecorder` long-polls ``GET /v1/watch`` on every node during a run
and keeps each node's change feed, to find commands applied twice and
replicas that disagree about an offset (:func:`check_feeds`).
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import math
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from ..api import sign_request
from .linearizability import History

__all__ = [
    "CONFIG_KEYS",
    "Answer",
    "FeedCheck",
    "FeedRecorder",
    "MetadataWorkload",
    "NoAnswerError",
    "NodeApi",
    "NotSentError",
    "OpRecord",
    "WorkloadConfig",
    "check_feeds",
]

CONFIG_KEYS = ("cleanup.policy", "retention.ms")
"""The topic config keys the workload sets and reads (the model sees only these)."""

_RETENTIONS = (60_000, 3_600_000, 86_400_000, 604_800_000)
_POLICIES = ("delete", "compact")

# 503 answers that mean "the proposal was not applied" (errors.ProposalRejectedError
# and its subclasses, or the store not running at all).
_DECISIVE = frozenset({"ok", "unexpected", "expired"})
"""Verdicts that end an operation's retries."""

_NOT_APPLIED_TYPES = frozenset({
    "NotLeaderError", "NoLeaderError", "QueueFullError", "ProposalRejectedError",
    "ProposalDiscardedError", "ApiError",
})

# Refusal codes each operation may legitimately get, mapped to the model's output.
_REFUSALS: dict[str, dict[str, Any]] = {
    "create": {"topic_exists": "exists"},
    "delete": {"unknown_topic": "unknown_topic"},
    "alter": {"unknown_topic": "unknown_topic"},
    "add_partitions": {"unknown_topic": "unknown_topic",
                       "invalid_partitions": "invalid_partitions"},
    "read": {"unknown_topic": None},
}


# --------------------------------------------------------------------------- HTTP


class NotSentError(Exception):
    """The request never left: the connection could not be made."""


class NoAnswerError(Exception):
    """The request may have been received, but no complete answer came back."""


@dataclass(frozen=True, slots=True)
class Answer:
    """One HTTP answer from a node."""

    status: int
    """The HTTP status."""
    body: Any
    """The decoded JSON body (``None`` when empty)."""

    @property
    def result(self) -> Any:
        """``body["result"]`` of a 200 answer."""
        return self.body.get("result") if isinstance(self.body, dict) else None

    @property
    def error(self) -> dict[str, Any]:
        """``body["error"]`` of an error answer (empty when absent)."""
        error = self.body.get("error") if isinstance(self.body, dict) else None
        return error if isinstance(error, dict) else {}


class NodeApi:
    """Signed HTTP/1.1 requests to one node at a time, telling "never sent" from
    "no answer" (which :class:`~streambus_consensus.client.ApiClient` does not).

    Args:
        secret: the cluster secret (``None`` sends unsigned requests).
        timeout: socket timeout per request.
    """

    def __init__(self, secret: str | None, timeout: float) -> None:
        self.secret = secret
        self.timeout = timeout

    def call(self, address: str, method: str, path: str, body: Any = None, *,
             timeout: float | None = None) -> Answer:
        """Send one request. Raises NotSentError or NoAnswerError."""
        host, _, port = address.rpartition(":")
        raw = b"" if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Content-Length": str(len(raw))}
        if self.secret is not None:
            stamp = f"{time.time():.3f}"
            headers["X-SBC-Timestamp"] = stamp
            headers["X-SBC-Signature"] = sign_request(self.secret, method, path, stamp, raw)
        conn = http.client.HTTPConnection(host, int(port), timeout=timeout or self.timeout)
        try:
            try:
                conn.connect()
            except OSError as exc:
                raise NotSentError(f"{address}: {exc}") from None
            try:
                conn.request(method, path, body=raw, headers=headers)
                response = conn.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException) as exc:
                raise NoAnswerError(f"{address}: {type(exc).__name__}: {exc}") from None
        finally:
            conn.close()
        try:
            decoded = json.loads(data) if data else None
        except ValueError:
            raise NoAnswerError(f"{address}: non-JSON answer, status {response.status}") from None
        return Answer(response.status, decoded)


# --------------------------------------------------------------------------- operations


@dataclass(frozen=True, kw_only=True)
class WorkloadConfig:
    """How the clients behave."""

    clients: int = 4
    """Concurrent client threads."""
    topics: int = 10
    """Distinct topic names the clients work on (``t0`` ...)."""
    topic_prefix: str = "t"
    """Prefix of the topic names."""
    request_timeout: float = 3.0
    """Socket timeout of one attempt."""
    write_deadline: float = 15.0
    """How long a write is retried (same request id) before it is recorded unknown."""
    read_deadline: float = 5.0
    """How long a read is retried before it is dropped as failed."""
    think_time: float = 0.02
    """Most a client waits between operations (uniform from 0)."""
    mix: tuple[tuple[str, int], ...] = (("create", 3), ("delete", 1), ("alter", 4),
                                        ("add_partitions", 2), ("read", 5))
    """Operation kinds and their weights."""
    max_partitions: int = 8
    """Partition counts stay within 1..this."""
    replication_factor: int = 1
    """Replication factor of created topics (needs that many active brokers)."""


@dataclass(kw_only=True)
class OpRecord:
    """What the workload knows about one operation, beyond the history."""

    client: str
    """Client name (also the history's client id)."""
    seq: int
    """The request id's sequence number (0 for reads, which carry none)."""
    input: tuple[Any, ...]
    """The model input."""
    outcome: str = "pending"
    """``ok``, ``fail`` or ``unknown``."""
    output: Any = None
    """The model output (``ok`` only)."""
    attempts: int = 0
    """Requests sent or tried."""
    nodes: list[str] = field(default_factory=list)
    """The node asked by each attempt."""
    topic_id: str | None = None
    """For an acknowledged create: the new topic's id."""
    unexpected: str | None = None
    """An answer the workload did not expect (a failed check)."""
    started: float = 0.0
    """Monotonic time of the invocation."""
    finished: float = math.inf
    """Monotonic time of the outcome."""


class MetadataWorkload:
    """Concurrent clients against a metadata cluster, recording a history.

    Args:
        nodes: ``{node_id: api address}``.
        secret: the cluster secret.
        history: where operations are recorded.
        config: client behaviour.
        seed: seeds each client's choices.
        name: prefix of client names and request ids (unique per cluster run).
    """

    def __init__(self, nodes: Mapping[str, str], secret: str | None, history: History, *,
                 config: WorkloadConfig | None = None, seed: int = 0,
                 name: str = "w") -> None:
        self.nodes = dict(nodes)
        self.config = config or WorkloadConfig()
        self.api = NodeApi(secret, self.config.request_timeout)
        self.history = history
        self.seed = seed
        self.name = name
        self.records: list[OpRecord] = []
        self._records_lock = threading.Lock()
        self._seq: Counter[str] = Counter()
        self._seq_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        kinds, weights = zip(*self.config.mix, strict=True)
        self._kinds: tuple[str, ...] = kinds
        self._weights: tuple[int, ...] = weights

    @property
    def topic_names(self) -> list[str]:
        """The topics the clients work on."""
        return [f"{self.config.topic_prefix}{i}" for i in range(self.config.topics)]

    # -- running ----------------------------------------------------------------------

    def start(self) -> None:
        """Start the client threads."""
        for i in range(self.config.clients):
            rng = random.Random(self.seed * 7919 + i)
            thread = threading.Thread(target=self._client, args=(f"{self.name}-c{i}", rng),
                                      name=f"workload-c{i}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop issuing operations; wait for those in flight to finish."""
        self._stop.set()
        limit = timeout if timeout is not None else self.config.write_deadline + 10
        deadline = time.monotonic() + limit
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads = [t for t in self._threads if t.is_alive()]

    def _client(self, client: str, rng: random.Random) -> None:
        while not self._stop.is_set():
            self.perform(client, self.random_input(rng), rng=rng)
            self._stop.wait(rng.uniform(0, self.config.think_time))

    def random_input(self, rng: random.Random) -> tuple[Any, ...]:
        """A random operation for the model."""
        kind = rng.choices(self._kinds, self._weights)[0]
        name = rng.choice(self.topic_names)
        if kind == "create":
            config = {"cleanup.policy": rng.choice(_POLICIES),
                      "retention.ms": rng.choice(_RETENTIONS)}
            return ("create", name, rng.randint(1, 3), config)
        if kind == "alter":
            key = rng.choice(CONFIG_KEYS)
            value = rng.choice(_POLICIES if key == "cleanup.policy" else _RETENTIONS)
            return ("alter", name, key, value)
        if kind == "add_partitions":
            return ("add_partitions", name, rng.randint(2, self.config.max_partitions))
        return (kind, name)

    # -- one operation ------------------------------------------------------------------

    def _next_seq(self, client: str) -> int:
        with self._seq_lock:
            self._seq[client] += 1
            return self._seq[client]

    def perform(self, client: str, op: tuple[Any, ...], *, rng: random.Random | None = None,
                deadline: float | None = None, timeout: float | None = None,
                nodes: Sequence[str] | None = None, fan_out: bool = False) -> OpRecord:
        """Run one operation to an outcome and record it. Returns its record.

        ``deadline`` bounds the retries, ``timeout`` each attempt (defaults:
        the config's); ``nodes`` limits the nodes asked. With ``fan_out``,
        every node in ``nodes`` is asked at once, each retried on its own,
        and the first decisive answer is the outcome: the request id makes
        the copies one operation, as a client that fails over between nodes
        relies on.
        """
        rng = rng or random.Random()
        kind = op[0]
        is_read = kind == "read"
        seq = 0 if is_read else self._next_seq(client)
        request_id = {"client_id": client, "seq": seq}
        method, path, body = _request(op, request_id, self.config.replication_factor)
        limit = deadline if deadline is not None else (
            self.config.read_deadline if is_read else self.config.write_deadline)
        choices = list(nodes or self.nodes)
        record = OpRecord(client=client, seq=seq, input=op)
        handle = self.history.invoke(client, op)
        record.started = handle.call_time
        give_up = time.monotonic() + limit

        def attempt(node: str) -> tuple[str, Any, Answer | None]:
            try:
                answer = self.api.call(self.nodes[node], method, path, body, timeout=timeout)
            except NotSentError:
                return "retry", None, None
            except NoAnswerError:
                return "unknown", None, None
            verdict, value = self._interpret(kind, answer, record)
            return verdict, value, answer

        if fan_out:
            verdict, value, answer, maybe_applied = self._fan_out(
                choices, attempt, record, give_up, rng)
        else:
            verdict, value, answer, maybe_applied = self._one_by_one(
                choices, attempt, record, give_up, rng)
        if verdict == "ok":
            handle.ok(value)
            record.outcome, record.output = "ok", value
            if kind == "create" and value == "ok" and answer is not None:
                record.topic_id = answer.result.get("topic_id")
        elif maybe_applied and not is_read:
            handle.unknown()
            record.outcome = "unknown"
        else:
            handle.fail()
            record.outcome = "fail"
        record.finished = time.monotonic()
        with self._records_lock:
            self.records.append(record)
        return record

    @staticmethod
    def _one_by_one(choices: list[str],
                    attempt: Callable[[str], tuple[str, Any, Answer | None]],
                    record: OpRecord, give_up: float, rng: random.Random,
                    ) -> tuple[str, Any, Answer | None, bool]:
        """Ask one node per attempt, never the same node twice in a row, until
        a decisive answer or ``give_up``. Returns the last verdict, its value
        and answer, and whether an attempt may have applied the operation."""
        maybe_applied = False
        last = ""
        while True:
            node = rng.choice([n for n in choices if n != last] or choices)
            last = node
            record.attempts += 1
            record.nodes.append(node)
            verdict, value, answer = attempt(node)
            maybe_applied |= verdict in ("unknown", "expired")
            if verdict in _DECISIVE or time.monotonic() >= give_up:
                return verdict, value, answer, maybe_applied
            time.sleep(rng.uniform(0.05, 0.2))

    @staticmethod
    def _fan_out(choices: list[str],
                 attempt: Callable[[str], tuple[str, Any, Answer | None]],
                 record: OpRecord, give_up: float, rng: random.Random,
                 ) -> tuple[str, Any, Answer | None, bool]:
        """Ask every node at once, each retried on its own until the first
        decisive answer from any of them or ``give_up``. Attempts still in
        flight then are left to finish on their own; their answers are not
        used (the request id makes a late copy a no-op)."""
        lock = threading.Lock()
        decided = threading.Event()
        outcome: list[tuple[str, Any, Answer | None]] = []
        maybe_applied = False
        # Drawn here, in order: threads drawing from the seeded rng would make
        # the client's later choices depend on their timing.
        pauses = [rng.uniform(0.01, 0.05) for _ in range(64)]

        def ask(node: str) -> None:
            nonlocal maybe_applied
            for pause in itertools.cycle(pauses):
                with lock:
                    if decided.is_set():
                        return
                    record.attempts += 1
                    record.nodes.append(node)
                verdict, value, answer = attempt(node)
                with lock:
                    if decided.is_set():
                        return
                    maybe_applied |= verdict in ("unknown", "expired")
                    if verdict in _DECISIVE:
                        outcome.append((verdict, value, answer))
                        decided.set()
                        return
                if time.monotonic() >= give_up or decided.wait(pause):
                    return

        threads = [threading.Thread(target=ask, args=(node,), name=f"fan-out-{node}",
                                    daemon=True) for node in choices]
        for thread in threads:
            thread.start()
        while not decided.wait(0.02) and any(t.is_alive() for t in threads):
            pass
        with lock:
            decided.set()  # the threads still asking stop after their current attempt
            verdict, value, answer = outcome[0] if outcome else ("retry", None, None)
            return verdict, value, answer, maybe_applied

    def _interpret(self, kind: str, answer: Answer, record: OpRecord) -> tuple[str, Any]:
        """Classify an answer: ``ok`` (with the model output), ``retry`` (not
        applied), ``unknown`` (maybe applied), ``expired``, ``unexpected``."""
        status, error = answer.status, answer.error
        if status == 200:
            return "ok", _output(kind, answer.result)
        code = str(error.get("code", ""))
        if status in (404, 409):
            refusals = _REFUSALS[kind]
            if code in refusals:
                return "ok", refusals[code]
            if code == "request_expired":
                return "expired", None
            record.unexpected = f"HTTP {status} {code}: {error.get('message')}"
            return "unexpected", record.unexpected
        if status == 503 and str(error.get("type", "")) in _NOT_APPLIED_TYPES:
            return "retry", None
        if status in (500, 503, 504):
            return "unknown", None
        record.unexpected = f"HTTP {status} {code}: {error.get('message')}"
        return "unexpected", record.unexpected

    # -- summaries --------------------------------------------------------------------

    def counts(self) -> dict[str, Counter[str]]:
        """``{op kind: Counter(outcome)}`` over every finished operation."""
        result: dict[str, Counter[str]] = {}
        with self._records_lock:
            for record in self.records:
                result.setdefault(record.input[0], Counter())[record.outcome] += 1
        return result

    def unexpected(self) -> list[OpRecord]:
        """Operations that got an answer the workload did not expect."""
        with self._records_lock:
            return [r for r in self.records if r.unexpected is not None]


def _request(op: tuple[Any, ...], request_id: dict[str, Any],
             replication_factor: int) -> tuple[str, str, Any]:
    kind, name = op[0], op[1]
    topic = f"/v1/topics/{quote(name, safe='')}"
    if kind == "create":
        return "POST", "/v1/topics", {"name": name, "partitions": op[2],
                                      "replication_factor": replication_factor,
                                      "config": op[3],
                                      "request_id": request_id}
    if kind == "delete":
        return "DELETE", topic, {"request_id": request_id}
    if kind == "alter":
        return "PUT", f"{topic}/config", {"set": {op[2]: op[3]}, "request_id": request_id}
    if kind == "add_partitions":
        return "POST", f"{topic}/partitions", {"count": op[2], "request_id": request_id}
    if kind == "read":
        return "GET", f"{topic}?linearizable=1", None
    raise ValueError(f"unknown operation {op!r}")


def _output(kind: str, result: Any) -> Any:
    if kind != "read":
        return "ok"
    config = result["config"]
    return (result["partition_count"], {k: config[k] for k in CONFIG_KEYS})


# --------------------------------------------------------------------------- change feeds


@dataclass(kw_only=True)
class _NodeFeed:
    events: dict[int, str] = field(default_factory=dict)
    """offset -> canonical JSON of the entry's changes."""
    cursor: int | None = None
    last_poll_started: float = -math.inf
    """Monotonic start time of the last poll answered."""
    resets: int = 0
    out_of_order: list[dict[str, Any]] = field(default_factory=list)
    """Each event (a full image included) delivered at or below an offset
    already delivered, with the request and the answer it came in (for the
    report). The cursor stays where it was."""


class FeedRecorder:
    """Follows ``GET /v1/watch`` on every node and keeps what each delivered.

    Args:
        nodes: ``{node_id: api address}``.
        secret: the cluster secret.
        wait: long-poll wait per request.
    """

    def __init__(self, nodes: Mapping[str, str], secret: str | None, *,
                 wait: float = 1.0) -> None:
        self.nodes = dict(nodes)
        self.api = NodeApi(secret, wait + 4.0)
        self.wait = wait
        self.feeds = {node: _NodeFeed() for node in self.nodes}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """One long-polling thread per node."""
        for node in self.nodes:
            thread = threading.Thread(target=self._follow, args=(node,), daemon=True,
                                      name=f"feed-{node}")
            self._threads.append(thread)
            thread.start()

    def stop(self) -> None:
        """Stop following (waits for the polls in flight)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(self.wait + 6.0)

    def cursor(self, node: str) -> int | None:
        """The offset of the last event received from ``node``."""
        with self._lock:
            return self.feeds[node].cursor

    def caught_up(self, since: float) -> bool:
        """Whether every node answered a poll sent after monotonic time ``since``
        (so each feed holds every change its node had applied by then)."""
        with self._lock:
            return all(feed.last_poll_started >= since for feed in self.feeds.values())

    def _follow(self, node: str) -> None:
        feed = self.feeds[node]
        while not self._stop.is_set():
            cursor = feed.cursor
            path = f"/v1/watch?wait={self.wait:g}"
            if cursor is not None:
                path += f"&after={cursor}"
            sent = time.monotonic()
            try:
                answer = self.api.call(self.nodes[node], "GET", path)
            except (NotSentError, NoAnswerError):
                self._stop.wait(0.2)
                continue
            if answer.status != 200:
                self._stop.wait(0.2)
                continue
            with self._lock:
                feed.last_poll_started = sent
                for event in answer.result["events"]:
                    offset = int(event["offset"])
                    if feed.cursor is not None and offset <= feed.cursor:
                        # A full image at or below the cursor counts too: the
                        # offsets after it would come a second time.
                        offsets = [e["offset"] for e in answer.result["events"]]
                        feed.out_of_order.append({
                            "asked_after": cursor, "cursor": feed.cursor, "offset": offset,
                            "reset": event["reset"], "answer_offsets": offsets,
                            "changes": event["changes"]})
                        continue
                    if event["reset"]:
                        feed.resets += 1
                    else:
                        feed.events[offset] = json.dumps(event["changes"], sort_keys=True)
                    feed.cursor = offset


@dataclass(frozen=True, kw_only=True)
class FeedCheck:
    """What :func:`check_feeds` found."""

    offsets: int
    """Distinct offsets with changes seen on any node."""
    divergent_offsets: tuple[int, ...]
    """Offsets at which two nodes reported different changes."""
    duplicates: tuple[str, ...]
    """Commands applied more often than they were issued, described."""
    out_of_order: int
    """Events (full images included) a node delivered at or below an offset it
    had already delivered."""
    resets: int
    """Full images received (a node restarted from a snapshot, or a watcher fell behind)."""

    @property
    def ok(self) -> bool:
        """No divergence, no duplicate, no reordering."""
        return not self.divergent_offsets and not self.duplicates and not self.out_of_order


# Change kinds each operation kind can produce (at most once per operation).
_EFFECTS = {"topic_created": "create", "topic_deleted": "delete",
            "config_changed": "alter", "topic_changed": "add_partitions"}


def check_feeds(recorder: FeedRecorder, records: Sequence[OpRecord]) -> FeedCheck:
    """Compare the nodes' change feeds with each other and with what was issued.

    - Two nodes must report identical changes at any offset both delivered.
    - Over the union of all feeds, each kind of topic change appears no more
      often than operations that could have caused it were acknowledged or
      left unknown (a command applied twice shows up as one change too many).
    - Every created topic has a fresh id, and an acknowledged create's topic
      id appears at most once.
    """
    union: dict[int, str] = {}
    divergent: list[int] = []
    resets = 0
    out_of_order = 0
    with recorder._lock:
        for feed in recorder.feeds.values():
            resets += feed.resets
            out_of_order += len(feed.out_of_order)
            for offset, changes in feed.events.items():
                seen = union.setdefault(offset, changes)
                if seen != changes:
                    divergent.append(offset)
    caused: Counter[tuple[str, str]] = Counter()
    created_ids: Counter[str] = Counter()
    for changes in union.values():
        for change in json.loads(changes):
            kind = _EFFECTS.get(change["kind"])
            if kind is None:
                continue
            caused[kind, str(change["key"])] += 1
            if kind == "create":
                created_ids[str(change["record"]["topic_id"])] += 1
    possible: Counter[tuple[str, str]] = Counter()
    for record in records:
        kind, name = record.input[0], record.input[1]
        if record.outcome == "unknown" or (record.outcome == "ok" and record.output == "ok"):
            possible[kind, name] += 1
    duplicates = [
        f"{count} x {kind} of {name!r} in the feeds, but only {possible[kind, name]} such "
        f"operation(s) acknowledged or unknown"
        for (kind, name), count in sorted(caused.items()) if count > possible[kind, name]
    ]
    duplicates += [f"topic id {topic_id} created {count} times"
                   for topic_id, count in sorted(created_ids.items()) if count > 1]
    return FeedCheck(offsets=len(union), divergent_offsets=tuple(sorted(set(divergent))),
                     duplicates=tuple(duplicates), out_of_order=out_of_order, resets=resets)


def wait_for(check: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    """Poll ``check`` until it is true or ``timeout`` passes; returns the last result."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(NotSentError, NoAnswerError):
            if check():
                return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
