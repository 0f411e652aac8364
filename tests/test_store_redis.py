"""What the Redis store adds to the Storage contract: encrypted secrets and fencing
tokens (against a real redis-server on 127.0.0.1; the contract itself runs in
tests/test_storage_contract.py)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator

import pytest
import redis

from agent.storage import LockTimeout
from agent.store_redis import RedisStorage, SecretError
from tests.support.redis import counting_client, redis_available, shared_redis


@pytest.fixture
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis.Redis]:
    if not redis_available():
        pytest.fail("redis-server is not installed (scripts/setup.sh installs it)")
    c = redis.Redis.from_url(shared_redis(tmp_path_factory).url)
    yield c
    c.close()


def _ns() -> str:
    return "t" + os.urandom(8).hex()


def test_a_secret_is_stored_encrypted_and_read_back(client: redis.Redis) -> None:
    secret, ns = os.urandom(32), _ns()
    st = RedisStorage(client, ns, secret)
    plain = b"-----BEGIN EC PRIVATE KEY-----\nMHcCAQEE\n-----END EC PRIVATE KEY-----\n"
    st.store("accounts/ca/account.key", plain, secret=True)
    raw = client.hget(f"{ns}:v:accounts/ca/account.key", "d")
    assert raw is not None and plain not in raw and b"PRIVATE" not in raw
    assert RedisStorage(client, ns, secret).load("accounts/ca/account.key") == plain
    # The same value stored twice gets another nonce: the ciphertexts differ.
    st.store("accounts/ca/account.key", plain, secret=True)
    assert client.hget(f"{ns}:v:accounts/ca/account.key", "d") != raw
    # A public value stored over it afterwards is not "decrypted".
    st.store("accounts/ca/account.key", b"public", secret=False)
    assert st.load("accounts/ca/account.key") == b"public"


def test_another_secret_or_another_key_name_does_not_decrypt(client: redis.Redis) -> None:
    ns = _ns()
    st = RedisStorage(client, ns, os.urandom(32))
    st.store("accounts/a/account.key", b"k", secret=True)
    with pytest.raises(SecretError, match="secret_file differs"):
        RedisStorage(client, ns, os.urandom(32)).load("accounts/a/account.key")
    with pytest.raises(SecretError, match="no fleet secret"):
        RedisStorage(client, ns).load("accounts/a/account.key")
    # A ciphertext copied under another key name fails: the name is associated data.
    raw = client.hgetall(f"{ns}:v:accounts/a/account.key")
    client.hset(f"{ns}:v:accounts/b/account.key", mapping=raw)  # type: ignore[arg-type]
    with pytest.raises(SecretError):
        st.load("accounts/b/account.key")


def test_a_store_without_secret_refuses_secret_values(client: redis.Redis) -> None:
    st = RedisStorage(client, _ns())
    with pytest.raises(ValueError, match="no fleet secret"):
        st.store("accounts/a/account.key", b"k", secret=True)
    assert not st.exists("accounts/a/account.key")


def test_namespaces_do_not_see_each_other(client: redis.Redis) -> None:
    a, b = RedisStorage(client, _ns()), RedisStorage(client, _ns())
    a.store("certificates/www/current", b"1")
    assert b.list("", recursive=True) == [] and not b.exists("certificates/www/current")
    b.unlock("www", b.lock("www", timeout=1))  # locks are per namespace too
    a.unlock("www", a.lock("www", timeout=1))


def test_every_acquisition_gets_a_larger_fencing_token(client: redis.Redis) -> None:
    ns = _ns()
    a, b = RedisStorage(client, ns), RedisStorage(client, ns)
    ta = a.lock("www", timeout=1, expires_after=0.2)
    fa = a.fence("www")
    tb = b.lock("www", timeout=5)  # after a's lease ran out
    fb = b.fence("www")
    assert fb > fa
    b.unlock("www", tb)
    assert a.fence("www") == fa  # a still believes it holds it: its fence is the stale one
    with pytest.raises(RuntimeError):
        b.fence("www")
    assert ta != tb
    tc = b.lock("www", timeout=1)
    assert b.fence("www") > fb
    b.unlock("www", tc)


def test_a_node_whose_clock_runs_ahead_does_not_take_a_live_lock_over(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lease is the key's PX in Redis: a taker whose wall clock is past the
    holder's `expires` (skew, not an expired lease) still waits."""
    server = shared_redis(tmp_path_factory)
    ns = "skew" + os.urandom(6).hex()
    holder = RedisStorage(redis.Redis.from_url(server.url), ns)
    taker = RedisStorage(redis.Redis.from_url(server.url), ns)
    other_host = {"host": "node-b", "pid": 999_999_999}
    token = holder.lock("cert-www", timeout=1, expires_after=30)
    record = json.loads(holder.client.get(holder._lkey("cert-www")) or b"{}")
    record.update(other_host)  # the holder is another node: only its lease counts
    holder.client.set(holder._lkey("cert-www"), json.dumps(record), px=30_000)
    skewed = time.time() + 120  # the taker's clock is two minutes ahead
    monkeypatch.setattr("agent.store_redis.time.time", lambda: skewed)
    with pytest.raises(LockTimeout):
        taker.lock("cert-www", timeout=0.3)
    monkeypatch.undo()
    holder.unlock("cert-www", token)


def test_load_many_equals_load_key_by_key_in_one_round_trip(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Public and encrypted values, a secret overwritten by a public one, missing
    keys and a duplicate: the same bytes as `load` of each key, the missing
    ones left out, in one pipelined round trip (per LOAD_MANY_CHUNK keys)."""
    if not redis_available():
        pytest.fail("redis-server is not installed (scripts/setup.sh installs it)")
    client, trips = counting_client(shared_redis(tmp_path_factory).url)
    secret, ns = os.urandom(32), _ns()
    st = RedisStorage(client, ns, secret)
    values = {f"certificates/c{i:02d}/current": f"gen-{i}".encode() for i in range(25)}
    for key, value in values.items():
        st.store(key, value)
    st.store("accounts/ca/account.key", b"-----BEGIN EC PRIVATE KEY-----\n", secret=True)
    st.store("accounts/ca2/account.key", b"was secret", secret=True)
    st.store("accounts/ca2/account.key", b"now public")
    st.store("empty", b"")
    keys = [*values, "accounts/ca/account.key", "accounts/ca2/account.key", "empty",
            "certificates/nope/current", "certificates/c00/current"]  # fmt: skip
    expected = {}
    for key in keys:
        try:
            expected[key] = st.load(key)
        except FileNotFoundError:
            continue
    assert "certificates/nope/current" not in expected and len(expected) == 28
    before = trips.count
    assert st.load_many(keys) == expected
    assert trips.count - before == 1
    monkeypatch.setattr(RedisStorage, "LOAD_MANY_CHUNK", 10)
    before = trips.count
    assert st.load_many(keys) == expected
    assert trips.count - before == 3  # 30 keys, 10 a round trip
    assert st.load_many([]) == {}
    client.close()


def test_load_many_refuses_what_load_refuses(client: redis.Redis) -> None:
    """A value that does not decrypt (another secret, no secret, moved to another
    key name) raises SecretError naming the key, as `load`; a bad key name is a
    ValueError before anything is read."""
    ns = _ns()
    st = RedisStorage(client, ns, os.urandom(32))
    st.store("accounts/a/account.key", b"k", secret=True)
    st.store("certificates/www/current", b"public")
    keys = ["certificates/www/current", "accounts/a/account.key"]
    assert st.load_many(keys) == {k: st.load(k) for k in keys}
    for other in (RedisStorage(client, ns, os.urandom(32)), RedisStorage(client, ns)):
        with pytest.raises(SecretError) as one:
            other.load("accounts/a/account.key")
        with pytest.raises(SecretError) as many:
            other.load_many(keys)
        assert str(many.value) == str(one.value) and "accounts/a/account.key" in str(many.value)
    raw = client.hgetall(f"{ns}:v:accounts/a/account.key")
    client.hset(f"{ns}:v:accounts/b/account.key", mapping=raw)  # type: ignore[arg-type]
    with pytest.raises(SecretError, match=r"accounts/b/account\.key"):
        st.load_many(["accounts/b/account.key"])
    with pytest.raises(ValueError):
        st.load("../escape")
    with pytest.raises(ValueError):
        st.load_many(["certificates/www/current", "../escape"])


def test_batched_locks_work_after_redis_lost_its_script_cache(client: redis.Redis) -> None:
    """try_lock_many / unlock_many load their scripts once (SCRIPT LOAD, which the
    documented ACL allows, never SCRIPT EXISTS); a Redis whose script cache was
    emptied (a restart) answers NOSCRIPT to every call alike: loaded again, sent again."""
    st = RedisStorage(client, _ns())
    held = st.try_lock_many(["cert-a", "cert-b"], expires_after=30)
    assert st.unlock_many(held) == []
    client.script_flush()
    held = st.try_lock_many(["cert-a", "cert-b"], expires_after=30)
    assert sorted(held) == ["cert-a", "cert-b"]
    assert st.fence("cert-a") == 2  # acquired once before, once now: no call ran twice
    client.script_flush()
    assert st.unlock_many(held) == []
    assert st.lock_owner("cert-a") is None and st.lock_owner("cert-b") is None
