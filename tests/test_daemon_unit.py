"""Scheduler arithmetic of the daemon (the real-process tests are in tests/integration)."""

from __future__ import annotations

import random

from agent.daemon import retry_delay


def test_retry_delay_doubles_with_each_failure_within_jitter() -> None:
    rng = random.Random(1)
    delays = [retry_delay(n, 60, 6 * 3600, None, rng) for n in (1, 2, 3, 4)]
    for n, d in enumerate(delays, start=1):
        full = 60 * 2 ** (n - 1)
        assert full * 0.5 <= d <= full


def test_retry_delay_is_capped_by_retry_max() -> None:
    rng = random.Random(2)
    assert all(retry_delay(40, 60, 3600, None, rng) <= 3600 for _ in range(100))


def test_short_lived_certificates_retry_within_a_twentieth_of_their_lifetime() -> None:
    rng = random.Random(3)
    six_days = 6 * 86400
    assert all(retry_delay(10, 60, 6 * 3600, six_days, rng) <= six_days / 20 for _ in range(50))
    five_minutes = 300
    assert all(retry_delay(3, 60, 6 * 3600, five_minutes, rng) <= 15 for _ in range(50))


def test_jitter_spreads_many_failing_certificates_apart() -> None:
    rng = random.Random(4)
    values = {round(retry_delay(3, 60, 6 * 3600, None, rng), 3) for _ in range(200)}
    assert len(values) > 150
