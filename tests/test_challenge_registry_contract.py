"""The `ChallengeRegistry` contract, run against every implementation: the in-memory
registry and the Redis one (agent.fleet, against a real redis-server on 127.0.0.1).

An implementation is registered in IMPLEMENTATIONS as a factory
`make(clock) -> (registry, close)`; the fixture closes what it made.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from agent.challenges import MAX_TOKEN_LENGTH, ChallengeRegistry, MemoryChallengeRegistry
from agent.fleet import RedisChallengeRegistry
from tests.support.redis import redis_available, shared_redis

TOKEN = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA"
KEYAUTH = TOKEN + ".9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


Factory = Callable[[Any, Clock], tuple[ChallengeRegistry, Callable[[], None]]]


def _memory(_: Any, clock: Clock) -> tuple[ChallengeRegistry, Callable[[], None]]:
    return MemoryChallengeRegistry(clock=clock), lambda: None


def _redis(factory: Any, clock: Clock) -> tuple[ChallengeRegistry, Callable[[], None]]:
    if not redis_available():
        pytest.fail("redis-server is not installed (scripts/setup.sh installs it)")
    client = redis.Redis.from_url(shared_redis(factory).url)
    reg = RedisChallengeRegistry(client, "t" + os.urandom(8).hex(), clock=clock)

    def close() -> None:
        reg.close()
        client.close()

    if not reg.connected.wait(10):
        close()  # no fixture teardown will
        pytest.fail("the registry's mirror did not connect to Redis within 10 s")
    return reg, close


IMPLEMENTATIONS: dict[str, Factory] = {"memory": _memory, "redis": _redis}


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def reg(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, clock: Clock
) -> Iterator[ChallengeRegistry]:
    registry, close = IMPLEMENTATIONS[request.param](tmp_path_factory, clock)
    yield registry
    close()


def test_added_token_is_found_until_removed(reg: ChallengeRegistry) -> None:
    reg.add(TOKEN, KEYAUTH, expires_at=2e9)
    assert reg.lookup(TOKEN) == KEYAUTH
    assert len(reg) == 1
    reg.remove(TOKEN)
    assert reg.lookup(TOKEN) is None
    assert len(reg) == 0


def test_unknown_and_malformed_tokens_are_none_not_errors(reg: ChallengeRegistry) -> None:
    reg.add(TOKEN, KEYAUTH, expires_at=2e9)
    for token in ["", "nope", TOKEN + "x", "../../etc/passwd", "\x00", "x" * 10_000, "a\n"]:
        assert reg.lookup(token) is None


def test_expired_token_is_absent_and_dropped(reg: ChallengeRegistry, clock: Clock) -> None:
    reg.add(TOKEN, KEYAUTH, expires_at=1010.0)
    assert reg.lookup(TOKEN) == KEYAUTH
    clock.now = 1010.0
    assert len(reg) == 0
    assert reg.lookup(TOKEN) is None
    clock.now = 900.0  # even if the clock goes back, the entry is gone
    assert reg.lookup(TOKEN) is None


def test_adding_again_replaces_key_authorization_and_expiry(
    reg: ChallengeRegistry, clock: Clock
) -> None:
    reg.add(TOKEN, KEYAUTH, expires_at=1001.0)
    reg.add(TOKEN, TOKEN + ".other", expires_at=5000.0)
    clock.now = 2000.0
    assert reg.lookup(TOKEN) == TOKEN + ".other"


def test_remove_is_idempotent(reg: ChallengeRegistry) -> None:
    reg.remove(TOKEN)
    reg.remove(TOKEN)
    assert len(reg) == 0


@pytest.mark.parametrize("token", ["", "a/b", "a b", "tök", "x" * (MAX_TOKEN_LENGTH + 1), "a.b"])
def test_add_rejects_tokens_outside_the_acme_alphabet(reg: ChallengeRegistry, token: str) -> None:
    with pytest.raises(ValueError, match="not a valid ACME token"):
        reg.add(token, token + ".k", expires_at=2e9)
    assert len(reg) == 0


def test_add_rejects_key_authorization_of_another_token(reg: ChallengeRegistry) -> None:
    with pytest.raises(ValueError, match="does not belong"):
        reg.add(TOKEN, "other.thumb", expires_at=2e9)
    assert reg.lookup(TOKEN) is None


def test_concurrent_adds_and_lookups_from_threads(reg: ChallengeRegistry) -> None:
    tokens = [f"tok{i:04d}-{'a' * 24}" for i in range(200)]

    def add(part: list[str]) -> None:
        for t in part:
            reg.add(t, t + ".thumb", expires_at=2e9)

    threads = [threading.Thread(target=add, args=(tokens[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(reg) == 200
    assert all(reg.lookup(t) == t + ".thumb" for t in tokens)
