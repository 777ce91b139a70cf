"""Tests for the linearizability checker and its register and metadata models.

Herlihy & Wing (1990) call a history linearizable if it can be extended, by
appending zero or more responses, to a history whose complete part is
equivalent to a legal sequential history that keeps the real-time order of
non-overlapping operations. Each test names the history it builds and the
verdict that definition demands.
"""

from __future__ import annotations

import ast
import inspect
import itertools
import json
import math
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import streambus_consensus.testing as testing
from streambus_consensus.errors import ConfigError, ConsensusError
from streambus_consensus.testing import (
    UNKNOWN_OUTPUT,
    CheckOutcome,
    CheckResult,
    History,
    HistoryError,
    Model,
    Operation,
    check_operations,
    history_from_json,
    history_to_json,
    load_history,
    metadata_model,
    partition_by_key,
    register_model,
    save_history,
)
from streambus_consensus.testing import linearizability as lin_module

INF = math.inf

OK = CheckOutcome.OK
ILLEGAL = CheckOutcome.ILLEGAL
UNKNOWN = CheckOutcome.UNKNOWN


def op(client: int | str, input: Any, call: float, ret: float, output: Any = None) -> Operation:
    return Operation(client_id=client, input=input, call_time=call, return_time=ret, output=output)


def unknown(client: int, input: Any, call: float) -> Operation:
    return Operation(client_id=client, input=input, call_time=call, return_time=INF)


def W(v: int) -> tuple[str, int]:  # noqa: N802 - reads like the paper's notation
    return ("write", v)


R = ("read",)


def CAS(old: int, new: int) -> tuple[str, int, int]:  # noqa: N802
    return ("cas", old, new)


REGISTER = register_model()
METADATA = metadata_model()
METADATA_WHOLE = metadata_model(partitioned=False)


def verdict(model: Model[Any], history: Sequence[Operation]) -> CheckOutcome:
    result = check_operations(model, history)
    if result.outcome is OK:
        assert_valid_witness(model, result)
    return result.outcome


def assert_valid_witness(model: Model[Any], result: CheckResult) -> None:
    """An OK result's linearization is legal, respects real time, and places every
    operation with a known outcome."""
    for part in result.partitions:
        order = part.linearization
        state = model.init()
        for o in order:
            legal, state = model.step(state, o.input, o.output)
            assert legal, o
        assert state == part.final_state
        position = {id(o): n for n, o in enumerate(order)}
        for o in part.operations:
            assert o.is_unknown or id(o) in position, o
        for a, b in itertools.combinations(order, 2):
            # b is after a in the order, so b must not have returned before a was called
            assert not b.return_time < a.call_time, (a, b)


# --------------------------------------------------------------------------- public surface


def _isort_key(name: str) -> tuple[int, str]:
    if name.isupper():
        return (0, name)
    return (1, name) if name[0].isupper() else (2, name)


def test_public_surface_is_sorted_and_documented() -> None:
    assert testing.__all__ == sorted(testing.__all__, key=_isort_key)
    assert lin_module.__all__ == sorted(lin_module.__all__, key=_isort_key)
    assert set(lin_module.__all__) <= set(testing.__all__)
    for name in lin_module.__all__:
        obj = getattr(testing, name)
        assert obj is getattr(lin_module, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__doc__ and obj.__doc__.strip(), name
            if inspect.isclass(obj):
                assert "__doc__" in vars(obj), f"{name} inherits its docstring"
                for attr, member in vars(obj).items():
                    own_method = inspect.isfunction(member) and member.__qualname__.startswith(
                        f"{obj.__name__}."
                    )
                    if attr.startswith("_") or not (own_method or isinstance(member, property)):
                        continue
                    assert inspect.getdoc(member), f"{name}.{attr}"


def test_history_error_is_in_the_exception_tree() -> None:
    assert issubclass(HistoryError, ConsensusError)
    assert issubclass(HistoryError, ValueError)
    assert HistoryError.retriable is False


def test_package_code_has_no_asserts_prints_or_pickle() -> None:
    source = Path(lin_module.__file__).read_text(encoding="utf-8")
    tree = ast.parse(source)
    for node in ast.walk(tree):
        assert not isinstance(node, ast.Assert), f"assert at line {node.lineno}"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id != "print", f"print at line {node.lineno}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] + [getattr(node, "module", "") or ""]
            assert not any("pickle" in n for n in names)


# --------------------------------------------------------------------------- register: classics


def test_porcupine_register_example_linearizable() -> None:
    # porcupine TestRegisterModel (from MIT 6.824 2017 quiz 2, section VII):
    # a read concurrent with put(100) may see either value.
    history = [
        op(0, W(100), 0, 100),
        op(1, R, 25, 75, 100),
        op(2, R, 30, 60, 0),
    ]
    assert verdict(REGISTER, history) is OK


def test_porcupine_register_example_not_linearizable() -> None:
    # Once a read returned 200, a read that starts after it must not see 0.
    history = [
        op(0, W(200), 0, 100),
        op(1, R, 10, 30, 200),
        op(2, R, 40, 90, 0),
    ]
    assert verdict(REGISTER, history) is ILLEGAL


def test_porcupine_zero_duration_operations() -> None:
    # porcupine TestZeroDuration: zero-length intervals still overlap the write.
    ok = [
        op(0, W(100), 0, 100),
        op(1, R, 25, 75, 100),
        op(2, R, 30, 30, 0),
        op(3, R, 30, 30, 0),
    ]
    assert verdict(REGISTER, ok) is OK
    bad = [
        op(0, W(200), 0, 100),
        op(1, R, 10, 10, 200),
        op(2, R, 10, 10, 200),
        op(3, R, 40, 90, 0),
    ]
    assert verdict(REGISTER, bad) is ILLEGAL


def test_touching_intervals_count_as_concurrent() -> None:
    # A call and a return at the same instant: the call sorts first (as in porcupine).
    history = [op(0, W(1), 0, 10), op(1, R, 10, 20, 0)]
    assert verdict(REGISTER, history) is OK
    history = [op(0, W(1), 0, 10), op(1, R, 10.001, 20, 0)]
    assert verdict(REGISTER, history) is ILLEGAL


@pytest.mark.parametrize("seen", [1, 2])
def test_concurrent_writes_either_order(seen: int) -> None:
    history = [op(0, W(1), 0, 10), op(1, W(2), 0, 10), op(2, R, 11, 12, seen)]
    assert verdict(REGISTER, history) is OK


def test_concurrent_writes_order_fixed_once_both_completed() -> None:
    # After both writes completed, two sequential reads cannot see different values.
    history = [
        op(0, W(1), 0, 10),
        op(1, W(2), 0, 10),
        op(2, R, 11, 12, 1),
        op(2, R, 13, 14, 2),
    ]
    assert verdict(REGISTER, history) is ILLEGAL


def test_readers_seeing_concurrent_writes_in_opposite_orders() -> None:
    # Reader A sees 1 then 2, reader B sees 2 then 1, all during both writes:
    # A forces w1 < w2, B forces w2 < w1.
    history = [
        op(0, W(1), 0, 100),
        op(1, W(2), 0, 100),
        op(2, R, 10, 20, 1),
        op(2, R, 30, 40, 2),
        op(3, R, 10, 20, 2),
        op(3, R, 30, 40, 1),
    ]
    assert verdict(REGISTER, history) is ILLEGAL
    # Both readers seeing the same order is fine.
    same = [*history[:4], op(3, R, 10, 20, 1), op(3, R, 30, 40, 2)]
    assert verdict(REGISTER, same) is OK


def test_stale_read_after_completed_write() -> None:
    history = [op(0, W(1), 0, 10), op(1, R, 20, 30, 0)]
    assert verdict(REGISTER, history) is ILLEGAL


def test_compare_and_set() -> None:
    both_win = [op(0, CAS(0, 1), 0, 10, True), op(1, CAS(0, 2), 0, 10, True)]
    assert verdict(REGISTER, both_win) is ILLEGAL
    one_wins = [op(0, CAS(0, 1), 0, 10, True), op(1, CAS(0, 2), 0, 10, False)]
    assert verdict(REGISTER, [*one_wins, op(2, R, 11, 12, 1)]) is OK
    assert verdict(REGISTER, [*one_wins, op(2, R, 11, 12, 2)]) is ILLEGAL
    assert verdict(REGISTER, [op(0, CAS(5, 1), 0, 1, True)]) is ILLEGAL


def test_empty_history_is_linearizable() -> None:
    result = check_operations(REGISTER, [])
    assert result.ok
    assert check_operations(METADATA, []).outcome is OK


# --------------------------------------------------------------------------- unknown outcomes


def test_unknown_write_seen_by_later_read() -> None:
    history = [unknown(0, W(7), 0), op(1, R, 50, 60, 7)]
    assert verdict(REGISTER, history) is OK


def test_unknown_write_never_seen() -> None:
    history = [unknown(0, W(7), 0), op(1, R, 50, 60, 0), op(1, R, 70, 80, 0)]
    assert verdict(REGISTER, history) is OK


def test_unknown_write_can_take_effect_much_later() -> None:
    history = [
        unknown(0, W(7), 0),
        *(op(1, R, 10 * k, 10 * k + 5, 0) for k in range(1, 20)),
        op(1, R, 300, 305, 7),
    ]
    assert verdict(REGISTER, history) is OK


def test_unknown_write_cannot_take_effect_before_its_call() -> None:
    history = [op(1, R, 0, 5, 7), unknown(0, W(7), 10)]
    assert verdict(REGISTER, history) is ILLEGAL


def test_unknown_write_cannot_be_undone() -> None:
    # Once seen, the unknown write stays in effect: a later read of the old value is stale.
    history = [unknown(0, W(7), 0), op(1, R, 50, 60, 7), op(1, R, 70, 80, 0)]
    assert verdict(REGISTER, history) is ILLEGAL


def test_read_of_value_never_written_is_illegal_even_with_unknown_writes() -> None:
    history = [unknown(0, W(7), 0), unknown(2, W(8), 0), op(1, R, 50, 60, 9)]
    assert verdict(REGISTER, history) is ILLEGAL


def test_unknown_cas_output_is_unconstrained() -> None:
    history = [unknown(0, CAS(0, 3), 0), op(1, R, 10, 20, 3)]
    assert verdict(REGISTER, history) is OK
    history = [unknown(0, CAS(1, 3), 0), op(1, R, 10, 20, 3)]  # the CAS could not swap
    assert verdict(REGISTER, history) is ILLEGAL


def test_unknown_output_with_known_return_time() -> None:
    # porcupine's timed-out reads: took effect in the interval, answer not observed.
    history = [op(0, W(1), 0, 10), op(1, R, 5, 15, UNKNOWN_OUTPUT), op(1, R, 20, 30, 1)]
    assert verdict(REGISTER, history) is OK


def test_unknown_ops_left_out_of_the_witness_when_unobserved() -> None:
    history = [unknown(0, W(7), 0), op(1, R, 50, 60, 0)]
    result = check_operations(REGISTER, history)
    assert result.ok
    assert [o.input for o in result.partitions[0].linearization] == [R]


# --------------------------------------------------------------------------- explanations


def test_illegal_result_explains_longest_prefix_and_stuck_operations() -> None:
    write = op(0, W(1), 0, 10)
    stale = op(1, R, 20, 30, 0)
    result = check_operations(REGISTER, [write, stale])
    assert result.outcome is ILLEGAL
    (part,) = result.illegal_partitions
    assert part.linearization == (write,)
    assert part.final_state == 1
    assert part.stuck == (stale,)
    assert part.blocked_by is stale
    assert part.unplaced == (stale,)
    assert part.steps >= 2
    text = result.explain(REGISTER)
    assert "ILLEGAL" in text
    assert "write(1)" in text
    assert "read() -> 0  (refused)" in text
    assert "state after it: 1" in text


def test_explanation_of_first_operation_refused() -> None:
    bad = op(0, R, 0, 1, 5)
    result = check_operations(REGISTER, [bad])
    (part,) = result.partitions
    assert part.linearization == ()
    assert part.final_state == 0
    assert part.stuck == (bad,)
    assert part.blocked_by is bad


def test_illegal_prefix_is_a_legal_sequence() -> None:
    history = [
        op(0, W(1), 0, 100),
        op(1, W(2), 0, 100),
        op(2, R, 10, 20, 1),
        op(2, R, 30, 40, 2),
        op(3, R, 10, 20, 2),
        op(3, R, 30, 40, 1),
    ]
    (part,) = check_operations(REGISTER, history).partitions
    state = REGISTER.init()
    for o in part.linearization:
        legal, state = REGISTER.step(state, o.input, o.output)
        assert legal
    assert state == part.final_state
    assert part.stuck
    for o in part.stuck:
        assert not REGISTER.step(state, o.input, o.output)[0]


# --------------------------------------------------------------------------- metadata model

CREATE = ("create", "orders", 3, {"retention.ms": "1000"})
READ = ("read", "orders")
ORDERS = (3, {"retention.ms": "1000"})


def test_metadata_create_race_one_winner() -> None:
    history = [op(0, CREATE, 0, 10, "ok"), op(1, CREATE, 0, 10, "exists")]
    assert verdict(METADATA, history) is OK


def test_metadata_create_race_two_winners_is_illegal() -> None:
    history = [op(0, CREATE, 0, 10, "ok"), op(1, CREATE, 0, 10, "ok")]
    assert verdict(METADATA, history) is ILLEGAL


def test_metadata_exists_without_any_create_is_illegal() -> None:
    assert verdict(METADATA, [op(0, CREATE, 0, 10, "exists")]) is ILLEGAL
    both_exist = [op(0, CREATE, 0, 10, "exists"), op(1, CREATE, 0, 10, "exists")]
    assert verdict(METADATA, both_exist) is ILLEGAL


def test_metadata_exists_explained_by_unknown_create() -> None:
    history = [unknown(0, CREATE, 0), op(1, CREATE, 5, 10, "exists")]
    assert verdict(METADATA, history) is OK
    later = [op(1, CREATE, 0, 5, "exists"), unknown(0, CREATE, 10)]
    assert verdict(METADATA, later) is ILLEGAL


def test_metadata_losing_create_does_not_change_the_topic() -> None:
    other: tuple[Any, ...] = ("create", "orders", 5, {})
    history = [
        op(0, CREATE, 0, 10, "ok"),
        op(1, other, 0, 10, "exists"),
        op(2, READ, 20, 30, ORDERS),
    ]
    assert verdict(METADATA, history) is OK
    history[2] = op(2, READ, 20, 30, (5, {}))
    assert verdict(METADATA, history) is ILLEGAL


def test_metadata_delete_then_read_seeing_topic_is_illegal() -> None:
    history = [
        op(0, CREATE, 0, 1, "ok"),
        op(0, ("delete", "orders"), 2, 3, "ok"),
        op(1, READ, 4, 5, ORDERS),
    ]
    assert verdict(METADATA, history) is ILLEGAL
    concurrent = [*history[:2], op(1, READ, 2, 5, ORDERS)]
    assert verdict(METADATA, concurrent) is OK


def test_metadata_acknowledged_create_lost_is_illegal() -> None:
    history = [op(0, CREATE, 0, 1, "ok"), op(1, READ, 2, 3, None)]
    assert verdict(METADATA, history) is ILLEGAL


def test_metadata_unknown_create_never_seen_and_seen_then_lost() -> None:
    never = [unknown(0, CREATE, 0), op(1, READ, 2, 3, None), op(1, READ, 4, 5, None)]
    assert verdict(METADATA, never) is OK
    seen_then_lost = [unknown(0, CREATE, 0), op(1, READ, 2, 3, ORDERS), op(1, READ, 4, 5, None)]
    assert verdict(METADATA, seen_then_lost) is ILLEGAL


def test_metadata_delete_of_unknown_topic() -> None:
    assert verdict(METADATA, [op(0, ("delete", "x"), 0, 1, "unknown_topic")]) is OK
    assert verdict(METADATA, [op(0, ("delete", "x"), 0, 1, "ok")]) is ILLEGAL
    twice = [
        op(0, CREATE, 0, 1, "ok"),
        op(1, ("delete", "orders"), 2, 3, "ok"),
        op(2, ("delete", "orders"), 2, 3, "ok"),
    ]
    assert verdict(METADATA, twice) is ILLEGAL


def test_metadata_alter_is_visible_to_later_reads() -> None:
    history = [
        op(0, CREATE, 0, 1, "ok"),
        op(0, ("alter", "orders", "cleanup.policy", "compact"), 2, 3, "ok"),
        op(1, READ, 4, 5, (3, {"retention.ms": "1000", "cleanup.policy": "compact"})),
    ]
    assert verdict(METADATA, history) is OK
    history[2] = op(1, READ, 4, 5, ORDERS)
    assert verdict(METADATA, history) is ILLEGAL
    overwrite = [
        op(0, CREATE, 0, 1, "ok"),
        op(0, ("alter", "orders", "retention.ms", "5"), 2, 3, "ok"),
        op(1, READ, 4, 5, (3, {"retention.ms": "5"})),
    ]
    assert verdict(METADATA, overwrite) is OK
    assert verdict(METADATA, [op(0, ("alter", "x", "k", "v"), 0, 1, "unknown_topic")]) is OK


def test_metadata_add_partitions() -> None:
    grow = [
        op(0, CREATE, 0, 1, "ok"),
        op(0, ("add_partitions", "orders", 6), 2, 3, "ok"),
        op(0, ("add_partitions", "orders", 6), 4, 5, "invalid_partitions"),
        op(0, ("add_partitions", "orders", 2), 6, 7, "invalid_partitions"),
        op(1, READ, 8, 9, (6, {"retention.ms": "1000"})),
    ]
    assert verdict(METADATA, grow) is OK
    shrink_claimed = [op(0, CREATE, 0, 1, "ok"), op(0, ("add_partitions", "orders", 2), 2, 3, "ok")]
    assert verdict(METADATA, shrink_claimed) is ILLEGAL
    absent = [op(0, ("add_partitions", "orders", 9), 0, 1, "unknown_topic")]
    assert verdict(METADATA, absent) is OK


def test_metadata_read_accepts_json_shaped_output() -> None:
    history = [op(0, CREATE, 0, 1, "ok"), op(1, READ, 2, 3, [3, {"retention.ms": "1000"}])]
    assert verdict(METADATA, history) is OK


def test_metadata_malformed_input_is_an_error_not_a_verdict() -> None:
    with pytest.raises(HistoryError, match="unknown metadata operation"):
        check_operations(METADATA, [op(0, ("rename", "a"), 0, 1, "ok")])
    with pytest.raises(HistoryError, match="unknown register operation"):
        check_operations(REGISTER, [op(0, ("inc",), 0, 1, None)])


def test_metadata_explanation_mentions_topic_and_state() -> None:
    history = [op(0, CREATE, 0, 1, "ok"), op(1, READ, 2, 3, None)]
    result = check_operations(METADATA, history)
    text = result.explain(METADATA)
    assert "create('orders', partitions=3" in text
    assert "read('orders') -> None" in text
    assert "'orders': 3 partition(s)" in text


# --------------------------------------------------------------------------- partitioning


def test_partition_by_key_groups_in_first_appearance_order() -> None:
    ops = [op(0, ("read", k), t, t + 1, None) for t, k in enumerate("babca")]
    parts = partition_by_key(lambda i: i[1])(ops)
    assert [[o.input[1] for o in p] for p in parts] == [["b", "b"], ["a", "a"], ["c"]]


def test_partitions_are_checked_independently() -> None:
    history = [
        op(0, ("create", "a", 1, {}), 0, 1, "ok"),
        op(1, ("create", "b", 1, {}), 0, 1, "ok"),
        op(2, ("create", "c", 1, {}), 0, 1, "ok"),
        op(0, ("read", "a"), 2, 3, (1, {})),
        op(1, ("read", "b"), 2, 3, None),  # lost acknowledged create of b
        op(2, ("read", "c"), 2, 3, (1, {})),
    ]
    result = check_operations(METADATA, history)
    assert result.outcome is ILLEGAL
    assert [p.outcome for p in result.partitions] == [OK, ILLEGAL, OK]
    (bad,) = result.illegal_partitions
    assert {o.input[1] for o in bad.operations} == {"b"}
    assert bad.blocked_by is history[4]
    assert check_operations(METADATA_WHOLE, history).outcome is ILLEGAL


def test_partition_that_loses_operations_is_rejected() -> None:
    def lossy(history: Sequence[Operation]) -> list[list[Operation]]:
        return [list(history[1:])]

    model = Model(init=REGISTER.init, step=REGISTER.step, partition=lossy)
    with pytest.raises(HistoryError, match="exactly one part"):
        check_operations(model, [op(0, W(1), 0, 1), op(0, R, 2, 3, 1)])


def test_state_key_allows_unhashable_states() -> None:
    def step(state: list[int], input: Any, output: Any) -> tuple[bool, list[int]]:
        if input[0] == "append":
            return True, [*state, input[1]]
        return output is UNKNOWN_OUTPUT or output == state, state

    model: Model[list[int]] = Model(init=list, step=step, state_key=tuple)
    history = [
        op(0, ("append", 1), 0, 10),
        op(1, ("append", 2), 0, 10),
        op(2, ("get",), 11, 12, [2, 1]),
    ]
    assert verdict(model, history) is OK
    history[2] = op(2, ("get",), 11, 12, [1, 1])
    assert verdict(model, history) is ILLEGAL


# --------------------------------------------------------------------------- validation, timeout


def test_malformed_operations_are_rejected() -> None:
    with pytest.raises(HistoryError):
        check_operations(REGISTER, [op(0, R, 5, 4, 0)])
    with pytest.raises(HistoryError):
        check_operations(REGISTER, [op(0, R, INF, INF, 0)])
    with pytest.raises(HistoryError):
        check_operations(REGISTER, [op(0, R, 0, math.nan, 0)])
    with pytest.raises(HistoryError):
        check_operations(REGISTER, [("read", 0)])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="timeout"):
        check_operations(REGISTER, [], timeout=0)


class StepClock:
    """A fake clock that advances by ``tick`` seconds each time it is read."""

    def __init__(self, tick: float) -> None:
        self.now = 0.0
        self.tick = tick

    def __call__(self) -> float:
        value = self.now
        self.now += self.tick
        return value


def test_timeout_gives_unknown_and_skips_later_partitions() -> None:
    history = [op(0, ("create", t, 1, {}), 0, 1, "ok") for t in "abc"]
    result = check_operations(METADATA, history, timeout=0.5, clock=StepClock(1.0))
    assert result.outcome is UNKNOWN
    assert [p.outcome for p in result.partitions] == [UNKNOWN] * 3
    assert "UNKNOWN" in result.explain(METADATA)


def test_illegal_partition_wins_over_timeout() -> None:
    history = [
        op(0, ("read", "a"), 0, 1, (1, {})),  # partition a: illegal
        op(0, ("create", "b", 1, {}), 0, 1, "ok"),
    ]
    # Reads: deadline computed (0), check in partition a (1 < 1.5), check in b (2 > 1.5).
    result = check_operations(METADATA, history, timeout=1.5, clock=StepClock(1.0))
    assert [p.outcome for p in result.partitions] == [ILLEGAL, UNKNOWN]
    assert result.outcome is ILLEGAL


def test_no_timeout_with_a_generous_budget() -> None:
    history = [op(0, W(1), 0, 10), op(1, R, 5, 15, 1)]
    assert check_operations(REGISTER, history, timeout=60).outcome is OK


# --------------------------------------------------------------------------- recorder


def counting_clock() -> Callable[[], float]:
    counter = itertools.count()
    return lambda: float(next(counter))


def test_history_recorder_ok_fail_unknown_and_pending() -> None:
    history = History(clock=counting_clock())
    a = history.invoke(0, W(1))  # t=0
    b = history.invoke(1, W(2))  # t=1
    c = history.invoke(2, R)  # t=2
    d = history.invoke(3, R)  # t=3, never completed (client crashed)
    a.ok()  # t=4
    b.fail("rejected: not leader")  # t=5
    c.unknown()  # t=6
    assert a.done and b.done and c.done and not d.done
    assert (a.client_id, a.input, a.call_time) == (0, W(1), 0.0)
    assert len(history) == 4
    ops = history.operations()
    assert [(o.client_id, o.input, o.call_time, o.return_time) for o in ops] == [
        (0, W(1), 0.0, 4.0),
        (2, R, 2.0, INF),
        (3, R, 3.0, INF),
    ]
    assert ops[1].is_unknown and ops[2].is_unknown
    assert ops[1].output is UNKNOWN_OUTPUT
    with pytest.raises(HistoryError, match="already completed"):
        a.ok()
    with pytest.raises(HistoryError, match="already completed"):
        c.unknown()


class LockedRegister:
    """A register that is linearizable by construction (one lock)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value = 0

    def apply(self, input: Any) -> Any:
        with self._lock:
            if input[0] == "write":
                self._value = input[1]
                return None
            if input[0] == "read":
                return self._value
            swapped = self._value == input[1]
            if swapped:
                self._value = input[2]
            return swapped


def test_recorder_from_many_threads_on_a_linearizable_register() -> None:
    register = LockedRegister()
    history = History()
    start = threading.Barrier(8)

    def client(client_id: int) -> None:
        rng = random.Random(client_id)
        start.wait(timeout=10)
        for _ in range(60):
            choice = rng.random()
            if choice < 0.4:
                input: Any = ("read",)
            elif choice < 0.8:
                input = ("write", rng.randrange(5))
            else:
                input = ("cas", rng.randrange(5), rng.randrange(5))
            handle = history.invoke(client_id, input)
            handle.ok(register.apply(input))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
        assert not t.is_alive()
    ops = history.operations()
    assert len(ops) == 480
    assert all(o.call_time <= o.return_time < INF for o in ops)
    assert verdict(REGISTER, ops) is OK


# --------------------------------------------------------------------------- JSON


def test_json_round_trip_keeps_types(tmp_path: Path) -> None:
    history = [
        op(0, ("create", "t", 3, {"a": "1", "$odd": 2}), 0.125, 1.5, "ok"),
        op(1, ("read", "t"), 2, 3, (3, {"a": "1", "$odd": 2})),
        op("c-2", ("blob", b"\x00\xff", {1: [1, 2], (1, 2): None}), 4, 5, [True, None, 1.5]),
        unknown(3, ("delete", "t"), 6),
        op(4, ("read", "t"), 7, 8, UNKNOWN_OUTPUT),
    ]
    text = history_to_json(history)
    assert json.loads(text)["operations"][3]["return_time"] is None
    assert history_from_json(text) == history
    path = tmp_path / "failing-run.json"
    save_history(history, path)
    assert load_history(path) == history
    loaded = load_history(path)
    assert isinstance(loaded[1].output, tuple)
    assert isinstance(loaded[2].input[2], dict) and (1, 2) in loaded[2].input[2]


def test_history_save_method(tmp_path: Path) -> None:
    history = History(clock=counting_clock())
    history.invoke(0, ("create", "t", 1, {})).ok("ok")
    history.invoke(1, ("read", "t"))
    path = tmp_path / "h.json"
    history.save(path)
    assert load_history(path) == history.operations()
    assert check_operations(METADATA, load_history(path)).ok


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        '{"format": "other", "version": 1, "operations": []}',
        '{"format": "streambus_consensus.linearizability.history", "version": 99, '
        '"operations": []}',
        '{"format": "streambus_consensus.linearizability.history", "version": 1, '
        '"operations": [{"client_id": 0}]}',
        '{"format": "streambus_consensus.linearizability.history", "version": 1, '
        '"operations": [{"client_id": 0, "call_time": "x", "input": null}]}',
        '{"format": "streambus_consensus.linearizability.history", "version": 1, '
        '"operations": [{"client_id": 0, "call_time": 2, "return_time": 1, "input": null}]}',
        '{"format": "streambus_consensus.linearizability.history", "version": 1, '
        '"operations": [{"client_id": 0, "call_time": 0, "input": {"$set": [1]}}]}',
    ],
)
def test_malformed_json_is_rejected(text: str) -> None:
    with pytest.raises(HistoryError):
        history_from_json(text)


@pytest.mark.parametrize("value", [{1, 2}, math.inf, object()])
def test_non_plain_data_is_rejected(value: Any) -> None:
    with pytest.raises(HistoryError, match="not plain data"):
        history_to_json([op(0, ("write", value), 0, 1)])


# --------------------------------------------------------------------------- generated histories


class ReferenceMetadata:
    """A plain-dict implementation of the metadata operations, independent of the model."""

    def __init__(self) -> None:
        self.topics: dict[str, list[Any]] = {}

    def apply(self, input: Any) -> Any:
        kind, name = input[0], input[1]
        topic = self.topics.get(name)
        if kind == "create":
            if topic is not None:
                return "exists"
            self.topics[name] = [input[2], dict(input[3])]
            return "ok"
        if kind == "read":
            return None if topic is None else (topic[0], dict(topic[1]))
        if topic is None:
            return "unknown_topic"
        if kind == "delete":
            del self.topics[name]
            return "ok"
        if kind == "alter":
            topic[1][input[2]] = input[3]
            return "ok"
        if input[2] <= topic[0]:
            return "invalid_partitions"
        topic[0] = input[2]
        return "ok"


class ReferenceRegister:
    """A plain register, independent of the model."""

    def __init__(self) -> None:
        self.value = 0

    def apply(self, input: Any) -> Any:
        if input[0] == "write":
            self.value = input[1]
            return None
        if input[0] == "read":
            return self.value
        swapped = self.value == input[1]
        if swapped:
            self.value = input[2]
        return swapped


# fate of an operation: "ok" (answered), "applied" (took effect, client never knew),
# "lost" (never took effect, client never knew)
Spec = tuple[int, Any, int, int, float, str]


def build_history(specs: Sequence[Spec], apply: Callable[[Any], Any]) -> list[Operation]:
    """Run the operations sequentially in the order of their linearization points, each
    point inside the operation's interval, and record what each client would have seen."""
    cursor: dict[int, int] = defaultdict(int)
    timed = []
    for n, (client, input, gap, duration, fraction, fate) in enumerate(specs):
        call = cursor[client] + gap
        ret = call + duration
        cursor[client] = ret
        point = call + fraction * duration
        timed.append((point, n, client, input, call, ret, fate))
    outputs: dict[int, Any] = {}
    for _, n, _, input, _, _, fate in sorted(timed):
        if fate != "lost":
            outputs[n] = apply(input)
    history = []
    for _, n, client, input, call, ret, fate in sorted(timed, key=lambda t: t[1]):
        if fate == "ok":
            history.append(op(client, input, call, ret, outputs[n]))
        else:
            history.append(unknown(client, input, call))
    return history


def sequential_history(inputs: Sequence[Any], apply: Callable[[Any], Any]) -> list[Operation]:
    return [op(0, i, 2 * n, 2 * n + 1, apply(i)) for n, i in enumerate(inputs)]


register_inputs = st.one_of(
    st.just(("read",)),
    st.tuples(st.just("write"), st.integers(0, 4)),
    st.tuples(st.just("cas"), st.integers(0, 4), st.integers(0, 4)),
)
topics = st.sampled_from(["a", "b", "c"])
configs = st.dictionaries(st.sampled_from(["x", "y"]), st.integers(0, 2), max_size=2)
metadata_inputs = st.one_of(
    st.tuples(st.just("read"), topics),
    st.tuples(st.just("create"), topics, st.integers(1, 4), configs),
    st.tuples(st.just("delete"), topics),
    st.tuples(st.just("alter"), topics, st.sampled_from(["x", "y"]), st.integers(0, 2)),
    st.tuples(st.just("add_partitions"), topics, st.integers(1, 6)),
)
fates = st.sampled_from(["ok"] * 8 + ["applied", "lost"])


def specs_of(inputs: st.SearchStrategy[Any], max_size: int) -> st.SearchStrategy[list[Spec]]:
    return st.lists(
        st.tuples(
            st.integers(0, 3),  # client
            inputs,
            st.integers(0, 3),  # gap after the client's previous operation
            st.integers(0, 8),  # duration
            st.floats(0, 1),  # where in the interval it takes effect
            fates,
        ),
        max_size=max_size,
    )


PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(specs_of(register_inputs, 30))
def test_generated_register_histories_are_linearizable(specs: list[Spec]) -> None:
    history = build_history(specs, ReferenceRegister().apply)
    assert verdict(REGISTER, history) is OK


@PROPERTY
@given(specs_of(metadata_inputs, 40))
def test_generated_metadata_histories_are_linearizable(specs: list[Spec]) -> None:
    history = build_history(specs, ReferenceMetadata().apply)
    assert verdict(METADATA, history) is OK
    assert history_from_json(history_to_json(history)) == history


@PROPERTY
@given(specs_of(register_inputs, 30), st.integers(0, 100))
def test_read_of_impossible_value_is_illegal(specs: list[Spec], where: int) -> None:
    specs = [*specs, (9, ("read",), 0, 5, 0.5, "ok")]
    history = build_history(specs, ReferenceRegister().apply)
    reads = [n for n, o in enumerate(history) if o.input == ("read",) and not o.is_unknown]
    n = reads[where % len(reads)]
    history[n] = op(9, R, history[n].call_time, history[n].return_time, -1)  # never written
    assert verdict(REGISTER, history) is ILLEGAL


@PROPERTY
@given(specs_of(metadata_inputs, 40), st.integers(0, 100))
def test_metadata_read_of_impossible_state_is_illegal(specs: list[Spec], where: int) -> None:
    specs = [*specs, (9, ("read", "a"), 0, 5, 0.5, "ok")]
    history = build_history(specs, ReferenceMetadata().apply)
    reads = [n for n, o in enumerate(history) if o.input[0] == "read" and not o.is_unknown]
    n = reads[where % len(reads)]
    old = history[n]
    history[n] = op(old.client_id, old.input, old.call_time, old.return_time, (99, {}))
    result = check_operations(METADATA, history)
    assert result.outcome is ILLEGAL
    (bad,) = result.illegal_partitions
    assert history[n] in bad.operations


def mutate_register_output(o: Operation) -> Any:
    return (o.output + 1) if o.input[0] == "read" else (not o.output)


METADATA_OUTCOMES = {
    "create": ["ok", "exists"],
    "delete": ["ok", "unknown_topic"],
    "alter": ["ok", "unknown_topic"],
    "add_partitions": ["ok", "unknown_topic", "invalid_partitions"],
}


def mutate_metadata_output(o: Operation, choice: int) -> Any:
    kind = o.input[0]
    if kind == "read":
        if o.output is None:
            return (1, {})
        return (o.output[0], {**o.output[1], "z": 1}) if choice % 2 else (o.output[0] + 1, {})
    others = [x for x in METADATA_OUTCOMES[kind] if x != o.output]
    return others[choice % len(others)]


@PROPERTY
@given(st.lists(register_inputs, min_size=1, max_size=40), st.integers(0, 100))
def test_any_changed_output_of_a_sequential_register_history_is_illegal(
    inputs: list[Any], where: int
) -> None:
    # Without overlap the only candidate order is the real one, so any changed answer is wrong.
    inputs = [*inputs, ("read",)]
    history = sequential_history(inputs, ReferenceRegister().apply)
    assert verdict(REGISTER, history) is OK
    checked = [n for n, i in enumerate(inputs) if i[0] != "write"]  # write output is ignored
    n = checked[where % len(checked)]
    old = history[n]
    history[n] = op(0, old.input, old.call_time, old.return_time, mutate_register_output(old))
    assert verdict(REGISTER, history) is ILLEGAL


@PROPERTY
@given(st.lists(metadata_inputs, min_size=1, max_size=40), st.integers(0, 100))
def test_any_changed_output_of_a_sequential_metadata_history_is_illegal(
    inputs: list[Any], where: int
) -> None:
    history = sequential_history(inputs, ReferenceMetadata().apply)
    assert verdict(METADATA, history) is OK
    n = where % len(history)
    old = history[n]
    new_output = mutate_metadata_output(old, where)
    history[n] = op(0, old.input, old.call_time, old.return_time, new_output)
    assert verdict(METADATA, history) is ILLEGAL
    assert verdict(METADATA_WHOLE, history) is ILLEGAL


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs_of(metadata_inputs, 25), st.integers(0, 1000), st.booleans())
def test_partitioned_and_whole_checks_agree(specs: list[Spec], where: int, mutate: bool) -> None:
    # Linearizability is local (Herlihy & Wing's locality theorem): checking each topic
    # separately gives the same verdict as checking the whole history.
    history = build_history(specs, ReferenceMetadata().apply)
    known = [n for n, o in enumerate(history) if not o.is_unknown]
    if mutate and known:
        n = known[where % len(known)]
        old = history[n]
        new_output = mutate_metadata_output(old, where)
        history[n] = op(old.client_id, old.input, old.call_time, old.return_time, new_output)
    assert verdict(METADATA, history) is verdict(METADATA_WHOLE, history)


# --------------------------------------------------------------------------- brute force


def brute_force_linearizable(model: Model[Any], history: Sequence[Operation]) -> bool:
    """The definition, executed literally: try every order of the known operations plus
    every subset of the unknown ones."""
    known = [o for o in history if not o.is_unknown]
    pending = [o for o in history if o.is_unknown]
    for size in range(len(pending) + 1):
        for chosen in itertools.combinations(pending, size):
            for order in itertools.permutations([*known, *chosen]):
                if any(
                    later.return_time < earlier.call_time
                    for earlier, later in itertools.combinations(order, 2)
                ):
                    continue
                state = model.init()
                for o in order:
                    legal, state = model.step(state, o.input, o.output)
                    if not legal:
                        break
                else:
                    return True
    return False


def small_histories(
    inputs: st.SearchStrategy[Any], outputs: Callable[[Any], st.SearchStrategy[Any]]
) -> st.SearchStrategy[list[Operation]]:
    @st.composite
    def one(draw: st.DrawFn) -> Operation:
        input = draw(inputs)
        call = draw(st.integers(0, 6))
        if draw(st.integers(0, 4)) == 0:
            return unknown(0, input, call)
        ret = call + draw(st.integers(0, 4))
        return op(0, input, call, ret, draw(outputs(input)))

    return st.lists(one(), max_size=6)


def register_outputs(input: Any) -> st.SearchStrategy[Any]:
    if input[0] == "read":
        return st.integers(0, 2)
    return st.booleans() if input[0] == "cas" else st.none()


small_register_inputs = st.one_of(
    st.just(("read",)),
    st.tuples(st.just("write"), st.integers(0, 2)),
    st.tuples(st.just("cas"), st.integers(0, 2), st.integers(0, 2)),
)
small_metadata_inputs: st.SearchStrategy[Any] = st.one_of(
    st.tuples(st.just("read"), st.just("a")),
    st.tuples(st.just("create"), st.just("a"), st.integers(1, 2), st.just({})),
    st.tuples(st.just("delete"), st.just("a")),
    st.tuples(st.just("add_partitions"), st.just("a"), st.integers(1, 3)),
)


def metadata_outputs(input: Any) -> st.SearchStrategy[Any]:
    if input[0] == "read":
        return st.one_of(st.none(), st.tuples(st.integers(1, 3), st.just({})))
    return st.sampled_from([*METADATA_OUTCOMES[input[0]], "ok"])


BRUTE = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@BRUTE
@given(small_histories(small_register_inputs, register_outputs))
def test_register_verdict_matches_brute_force(history: list[Operation]) -> None:
    expected = OK if brute_force_linearizable(REGISTER, history) else ILLEGAL
    assert verdict(REGISTER, history) is expected


@BRUTE
@given(small_histories(small_metadata_inputs, metadata_outputs))
def test_metadata_verdict_matches_brute_force(history: list[Operation]) -> None:
    expected = OK if brute_force_linearizable(METADATA, history) else ILLEGAL
    assert verdict(METADATA, history) is expected


# --------------------------------------------------------------------------- size


def simulated_metadata_history(
    *, operations: int, topic_count: int, clients: int, seed: int
) -> list[Operation]:
    rng = random.Random(seed)
    names = [f"topic-{n}" for n in range(topic_count)]
    specs: list[Spec] = []
    for _ in range(operations):
        name = rng.choice(names)
        kind = rng.choices(
            ["read", "create", "delete", "alter", "add_partitions"], [5, 2, 1, 2, 2]
        )[0]
        input: Any
        if kind == "create":
            input = ("create", name, rng.randint(1, 4), {"retention.ms": rng.randint(1, 3)})
        elif kind == "alter":
            input = ("alter", name, rng.choice(["retention.ms", "cleanup"]), rng.randint(0, 3))
        elif kind == "add_partitions":
            input = ("add_partitions", name, rng.randint(1, 12))
        else:
            input = (kind, name)
        fate = rng.choices(["ok", "applied", "lost"], [96, 2, 2])[0]
        specs.append(
            (
                rng.randrange(clients),
                input,
                rng.randint(0, 2),
                rng.randint(1, 10),
                rng.random(),
                fate,
            )
        )
    return build_history(specs, ReferenceMetadata().apply)


def test_two_thousand_operations_across_fifty_topics() -> None:
    history = simulated_metadata_history(operations=2000, topic_count=50, clients=8, seed=7)
    started = time.perf_counter()
    result = check_operations(METADATA, history)
    elapsed = time.perf_counter() - started
    steps = sum(p.steps for p in result.partitions)
    print(f"\n2000 ops / 50 topics / 8 clients: {elapsed:.3f}s, {steps} steps")
    assert result.outcome is OK
    assert len(result.partitions) == 50
    assert_valid_witness(METADATA, result)

    reads = [n for n, o in enumerate(history) if o.input[0] == "read" and not o.is_unknown]
    n = reads[len(reads) // 2]
    old = history[n]
    history[n] = op(old.client_id, old.input, old.call_time, old.return_time, (99, {}))
    started = time.perf_counter()
    result = check_operations(METADATA, history)
    print(f"same with one corrupted read: {time.perf_counter() - started:.3f}s")
    assert result.outcome is ILLEGAL
    (bad,) = result.illegal_partitions
    assert history[n] in bad.operations


def test_long_single_key_history_needs_no_recursion() -> None:
    inputs = [("write", n % 7) if n % 3 else ("read",) for n in range(5000)]
    history = sequential_history(inputs, ReferenceRegister().apply)
    assert verdict(REGISTER, history) is OK
    history[-1] = op(0, R, history[-1].call_time, history[-1].return_time, 99)
    result = check_operations(REGISTER, history)
    assert result.outcome is ILLEGAL
    assert len(result.partitions[0].linearization) == 4999
