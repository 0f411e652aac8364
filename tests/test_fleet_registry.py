"""What the Redis challenge registry adds to the contract: a token added on one node is
answered by the others from their mirrors (pub/sub), a miss is fetched on
demand (`fetch`, bounded: counted in Redis's own command statistics), and with
Redis down the mirror still answers. Real redis-server on 127.0.0.1; every wait bounded."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from agent.fleet import RedisChallengeRegistry
from tests.support.redis import RedisProcess, redis_available, shared_redis

TOKEN = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA"
KEYAUTH = TOKEN + ".9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI"


def eventually(check: Callable[[], bool], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    for _ in range(10_000):
        if check():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return False


@pytest.fixture
def node_pair(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[RedisChallengeRegistry, RedisChallengeRegistry]]:
    if not redis_available():
        pytest.fail("redis-server is not installed (scripts/setup.sh installs it)")
    url, ns = shared_redis(tmp_path_factory).url, "t" + os.urandom(8).hex()
    with (
        RedisChallengeRegistry(redis.Redis.from_url(url), ns) as a,
        RedisChallengeRegistry(redis.Redis.from_url(url), ns) as b,
    ):  # closed also when the wait below fails
        assert a.connected.wait(10) and b.connected.wait(10)
        yield a, b


def test_a_token_added_on_one_node_is_answered_by_another(
    node_pair: tuple[RedisChallengeRegistry, RedisChallengeRegistry],
) -> None:
    a, b = node_pair
    a.add(TOKEN, KEYAUTH, expires_at=time.time() + 600)
    assert eventually(lambda: b._mirror.get(TOKEN) is not None)
    assert b.lookup(TOKEN) == KEYAUTH
    assert b.fetches == 0  # it came by pub/sub, not by a lookup
    a.remove(TOKEN)
    assert eventually(lambda: b.lookup(TOKEN) is None and len(b) == 0)


def test_a_node_started_later_resynchronises_from_the_hash(
    node_pair: tuple[RedisChallengeRegistry, RedisChallengeRegistry],
) -> None:
    a, _ = node_pair
    a.add(TOKEN, KEYAUTH, expires_at=time.time() + 600)
    late = RedisChallengeRegistry(a.client, a.key.rsplit(":", 1)[0])
    try:
        assert late.connected.wait(10)
        assert late.lookup(TOKEN) == KEYAUTH  # no message seen: the resync brought it
    finally:
        late.close()


def hgets(client: redis.Redis) -> int:
    """HGET commands the server has executed (INFO commandstats)."""
    stats = client.info("commandstats")
    return int(stats.get("cmdstat_hget", {}).get("calls", 0))  # type: ignore[union-attr]


def test_a_missed_token_is_fetched_on_demand_and_then_mirrored(
    node_pair: tuple[RedisChallengeRegistry, RedisChallengeRegistry],
) -> None:
    a, b = node_pair
    # Written straight to the hash (as if b missed the message): b's mirror lacks it.
    a.client.hset(a.key, TOKEN, json.dumps({"k": KEYAUTH, "e": time.time() + 600}))
    assert b.lookup(TOKEN) is None  # lookup itself never goes to Redis
    future = b.fetch(TOKEN)
    assert future is not None and future.result(10) == KEYAUTH
    assert b.lookup(TOKEN) == KEYAUTH  # now mirrored: no second fetch needed
    assert b.fetches == 1


def test_a_flood_of_unknown_tokens_is_bounded_in_redis_commands(
    node_pair: tuple[RedisChallengeRegistry, RedisChallengeRegistry],
) -> None:
    _, b = node_pair
    b.NEGATIVE_TTL = 600.0  # so a slow machine cannot outlast it within the test
    # The same unknown token asked again and again: one HGET, then the negative cache.
    before = hgets(b.client)
    for _ in range(20):
        f = b.fetch("again" + "q" * 30)
        if f is not None:
            assert f.result(10) is None
    assert hgets(b.client) - before == 1
    # 5000 asks of one unknown token and 5000 distinct ones, as fast as they come:
    # the fetch budget (burst + rate) bounds the HGETs, whatever the flood.
    b.FETCH_BURST, b.FETCH_RATE = 10, 1.0
    b._budget = 10.0
    before, started = hgets(b.client), time.monotonic()
    futures = [b.fetch("unknown" + "x" * 30) for _ in range(5000)]
    futures += [b.fetch(f"flood{i:05d}" + "y" * 30) for i in range(5000)]
    for f in futures:
        if f is not None:
            assert f.result(10) is None
    elapsed = time.monotonic() - started
    flood = hgets(b.client) - before
    assert 1 <= flood <= 10 + 1 + elapsed * 1.0, flood
    assert b.fetches <= 1 + 11 + elapsed
    for bad in ["../x" + "a" * 30, "a b" + "c" * 30, "x" * 300, "short"]:
        assert b.fetch(bad) is None  # shape check (RFC 8555 base64url, >= 22): never asked


def test_with_redis_down_the_mirror_answers_and_add_fails(tmp_path: Path) -> None:
    if not redis_available():
        pytest.fail("redis-server is not installed (scripts/setup.sh installs it)")
    server = RedisProcess(tmp_path / "redis").start()
    try:
        client = redis.Redis.from_url(server.url, socket_timeout=1, socket_connect_timeout=1)
        reg = RedisChallengeRegistry(client, "fleet")
        try:
            assert reg.connected.wait(10)
            reg.add(TOKEN, KEYAUTH, expires_at=time.time() + 600)
            server.kill()
            assert eventually(lambda: not reg.connected.is_set())
            assert reg.lookup(TOKEN) == KEYAUTH  # mirrored: still answered
            assert reg.lookup("other-" + "z" * 30) is None
            assert reg.fetch("other-" + "z" * 30) is None  # Redis away: nothing to wait for
            other = "o" * 43
            with pytest.raises(redis.RedisError):
                reg.add(other, other + ".k", expires_at=time.time() + 600)
            assert reg.lookup(other) is None  # not acknowledged: not served either
            reg.remove(TOKEN)  # logged, not raised: cleanup must not fail an order
            # Back, empty (no persistence): the mirror follows the hash again.
            server.start()
            assert eventually(lambda: reg.connected.is_set(), 20)
            assert reg.lookup(TOKEN) is None
            reg.add(other, other + ".k", expires_at=time.time() + 600)
            assert reg.lookup(other) == other + ".k"
        finally:
            reg.close()
            client.close()
    finally:
        server.stop()


def test_our_own_late_add_message_does_not_bring_a_removed_token_back(
    node_pair: tuple[RedisChallengeRegistry, RedisChallengeRegistry],
) -> None:
    a, b = node_pair
    a.add(TOKEN, KEYAUTH, expires_at=time.time() + 600)
    a.remove(TOKEN)
    # The "add" message reaching a's mirror thread only now (it was in flight):
    a._apply_message(json.dumps({"op": "add", "t": TOKEN, "k": KEYAUTH, "e": time.time() + 600}))
    assert a.lookup(TOKEN) is None
    a.add(TOKEN, KEYAUTH, expires_at=time.time() + 600)  # added again: served again
    assert a.lookup(TOKEN) == KEYAUTH
    assert eventually(lambda: b.lookup(TOKEN) == KEYAUTH)
