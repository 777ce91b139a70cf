"""RateLimitedLog: one line per key per interval, and a count of what was held back."""

from __future__ import annotations

import logging

import pytest

from streambus_consensus.logutil import RateLimitedLog


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_one_line_per_key_per_interval_then_a_count(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    log = RateLimitedLog(logging.getLogger("test.ratelimit"), every=10.0, clock=clock)
    with caplog.at_level(logging.INFO, logger="test.ratelimit"):
        assert log.log("peer-a", logging.WARNING, "dropping %s", "a") is True
        for _ in range(5):
            clock.now += 1.0
            assert log.log("peer-a", logging.WARNING, "dropping %s", "a") is False
        assert log.log("peer-b", logging.WARNING, "dropping %s", "b") is True  # its own key
        clock.now += 5.0  # 10 s after the first line
        assert log.log("peer-a", logging.WARNING, "dropping %s", "a") is True
    assert [r.getMessage() for r in caplog.records] == [
        "dropping a", "dropping b", "dropping a (5 more like it in the last 10s)"]
    assert all(r.levelno == logging.WARNING for r in caplog.records)


def test_the_key_table_stays_bounded() -> None:
    log = RateLimitedLog(logging.getLogger("test.ratelimit"), every=10.0, clock=Clock())
    for i in range(3 * RateLimitedLog.MAX_KEYS):
        log.log(f"key-{i}", logging.DEBUG, "x")
    assert len(log._seen) <= RateLimitedLog.MAX_KEYS
