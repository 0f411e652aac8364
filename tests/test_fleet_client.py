"""`agent.fleet.redis_client` connects as [fleet] says: ACL user + password file over
TCP, a unix socket, and the primary Sentinel names (real redis-server/sentinel)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import redis

from agent.config import FleetConfig
from agent.fleet import redis_client
from tests.support.redis import RedisProcess, redis_available


@pytest.fixture(autouse=True)
def _needs_redis() -> None:
    if not redis_available():
        pytest.fail("redis-server is not installed (scripts/setup.sh installs it)")


def _fleet(tmp_path: Path, **kw: object) -> FleetConfig:
    secret = tmp_path / "fleet.secret"
    secret.write_bytes(os.urandom(32))
    return FleetConfig(node="n1", namespace="ns", secret_file=secret, **kw)  # type: ignore[arg-type]


def test_an_acl_user_with_a_password_file_is_let_in_and_a_wrong_one_is_not(
    tmp_path: Path,
) -> None:
    acl = "user default off\nuser agent on >s3cret-pw ~ns:* &ns:* +@all\n"
    with RedisProcess(tmp_path / "r", extra=acl) as server:
        (tmp_path / "pw").write_text("s3cret-pw\n")
        good = redis_client(
            _fleet(tmp_path, redis=server.url, username="agent", password_file=tmp_path / "pw")
        )
        assert good.set("ns:x", b"1") and good.get("ns:x") == b"1"
        with pytest.raises(redis.ResponseError):
            good.set("other:x", b"1")  # the ACL's key pattern holds
        (tmp_path / "bad").write_text("wrong\n")
        bad = redis_client(
            _fleet(tmp_path, redis=server.url, username="agent", password_file=tmp_path / "bad")
        )
        with pytest.raises(redis.AuthenticationError):
            bad.ping()
        good.close()
        bad.close()


def test_a_unix_socket_url(tmp_path: Path) -> None:
    sock = tmp_path / "r" / "redis.sock"
    with RedisProcess(tmp_path / "r", extra=f"unixsocket {sock}\nunixsocketperm 700"):
        client = redis_client(_fleet(tmp_path, redis=f"unix://{sock}"))
        assert client.ping()
        client.close()


def test_sentinel_names_the_primary_and_the_client_follows_a_failover(tmp_path: Path) -> None:
    from agent.storage import StoreUnavailable
    from agent.store_redis import RedisStorage
    from tests.support.redis import SentinelProcess

    with RedisProcess(tmp_path / "primary") as primary:
        replica = RedisProcess(
            tmp_path / "replica", extra=f"replicaof {primary.host} {primary.port}"
        ).start()
        sentinel = SentinelProcess(tmp_path / "sentinel", primary, "acme").start()
        try:
            fleet = _fleet(tmp_path, sentinels=((sentinel.host, sentinel.port),), service="acme")
            client = redis_client(fleet, socket_timeout=1, socket_connect_timeout=1)
            store = RedisStorage(client, "ns")
            store.store("certificates/www/current", b"1")
            direct = redis.Redis(host=replica.host, port=replica.port)
            for _ in range(500):  # bounded: until the replica has it
                if direct.exists("ns:v:certificates/www/current"):
                    break
                time.sleep(0.02)
            assert direct.exists("ns:v:certificates/www/current")
            primary.kill()  # SIGKILL: Sentinel must promote the replica
            value = None
            for _ in range(600):  # bounded: 600 attempts, each short
                try:
                    store.store("certificates/www/after", b"2")
                    value = store.load("certificates/www/current")
                    break
                except StoreUnavailable:  # what RedisStorage makes of connection errors
                    time.sleep(0.05)
            assert value == b"1"  # written before the failover, read from the new primary
            assert direct.execute_command("ROLE")[0] == b"master"  # type: ignore[no-untyped-call]
            assert direct.hget("ns:v:certificates/www/after", "d") == b"2"
            direct.close()
            client.close()
        finally:
            sentinel.stop()
            replica.stop()
