"""The ACL user docs/fleet.md documents is enough for everything the agent does in
Redis, and no more is needed: a real redis-server is started with exactly the
documented `user` lines (default user off), and the storage, the challenge
registry, heartbeats, the "certificate changed" fan-out and a fleet daemon's
renewal all run as that user. Redis's `ACL LOG` (every command or key the ACL
denied) must stay empty, so a command added to the agent without adding it to
the documented ACL fails here."""

from __future__ import annotations

import asyncio
import os
import re
import textwrap
import threading
import time
from pathlib import Path

import pytest
import redis
from cryptography.hazmat.primitives import serialization

from agent.challenges import valid_token
from agent.config import load_config
from agent.daemon import Daemon
from agent.fleet import (
    ChangeListener,
    Heartbeat,
    RedisChallengeRegistry,
    beat,
    list_nodes,
    publish_changed,
)
from agent.storage import LockTimeout
from agent.store_redis import RedisStorage
from tests.support.redis import RedisProcess, redis_available

DOC = Path(__file__).resolve().parents[1] / "docs" / "fleet.md"
PASSWORD = "acl-test-" + os.urandom(8).hex()
ADMIN = "acl-test-admin"
NS = "haproxy-acme"  # the documented ACL's namespace (the default)


def documented_acl() -> str:
    """The `user ...` lines of the ```conf block that starts with `user default off`."""
    for block in re.findall(r"```conf\n(.*?)```", DOC.read_text(), re.S):
        if block.startswith("user default off"):
            return str(block).replace("REPLACE-WITH-A-LONG-RANDOM-PASSWORD", PASSWORD)
    raise AssertionError(f"{DOC}: no ```conf block with the ACL user")


def wait(check: object, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    for _ in range(10_000):
        if check():  # type: ignore[operator]
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return False


def test_the_documented_acl_user_can_do_everything_the_agent_does(tmp_path: Path) -> None:
    if not redis_available():
        pytest.fail("redis-server is not installed (scripts/setup.sh installs it)")
    acl = documented_acl() + f"user {ADMIN} on >{PASSWORD} ~* &* +@all\n"
    with RedisProcess(tmp_path / "redis", extra=acl) as server:
        admin = redis.Redis(host=server.host, port=server.port, username=ADMIN, password=PASSWORD)
        pw = tmp_path / "redis.password"
        pw.write_text(PASSWORD + "\n")
        pw.chmod(0o600)
        secret = tmp_path / "fleet.secret"
        secret.write_bytes(os.urandom(32))
        secret.chmod(0o600)
        config_path = write_config(tmp_path, server.url, pw, secret)
        config = load_config(config_path)
        assert config.fleet is not None
        from agent.fleet import redis_client

        def client() -> redis.Redis:
            assert config.fleet is not None
            return redis_client(config.fleet)

        try:
            exercise_storage(client(), secret.read_bytes())
            exercise_registry(client)
            exercise_heartbeats_and_fanout(client)
            exercise_daemon(config)
            denied = admin.acl_log()
            assert denied == [], denied
            # The ACL really restricts: another namespace is refused.
            with pytest.raises(redis.ResponseError, match=r"(?i)no permissions"):
                client().set("other:x", b"1")
            with pytest.raises(redis.ResponseError, match=r"(?i)no permissions"):
                client().flushall()
        finally:
            admin.close()


def write_config(tmp_path: Path, url: str, pw: Path, secret: Path) -> Path:
    from tests.test_renewal import CA

    (tmp_path / "certs").mkdir()
    (tmp_path / "roots.pem").write_bytes(CA.root.public_bytes(serialization.Encoding.PEM))
    path = tmp_path / "config.toml"
    path.write_text(
        textwrap.dedent(
            f"""\
            state_dir = "state"
            [acme]
            directory = "https://127.0.0.1:1/dir"
            trusted_roots = "roots.pem"
            [haproxy]
            cert_dir = "{tmp_path / "certs"}"
            [daemon]
            control_socket = "{tmp_path / "control.sock"}"
            [fleet]
            redis = "{url}"
            username = "haproxy-acme"
            password_file = "{pw}"
            node = "edge-a"
            secret_file = "{secret}"
            [[certificates]]
            name = "www"
            domains = ["www.example.com"]
            key = "www.key"
            generate_key = true
            """
        )
    )
    return path


def exercise_storage(client: redis.Redis, secret: bytes) -> None:
    store = RedisStorage(client, NS, secret)
    store.store("accounts/ca/account.key", b"-----BEGIN PRIVATE KEY-----", secret=True)
    assert store.load("accounts/ca/account.key") == b"-----BEGIN PRIVATE KEY-----"
    store.store("certificates/www/current", b"x")
    assert store.exists("certificates/www/current")
    assert store.list("certificates") == ["certificates/www"]
    assert store.list("", recursive=True)
    assert store.stat("certificates/www/current").size == 1
    store.delete("certificates/www/current")
    store.delete_all("accounts")
    token = store.lock("cert-www", timeout=1, expires_after=30)
    assert store.fence("cert-www") >= 1
    store.renew_lock("cert-www", token, 30)
    other = RedisStorage(client, NS, secret)
    with pytest.raises(LockTimeout):
        other.lock("cert-www", timeout=0.1)
    store.unlock("cert-www")
    with store.locked("cert-www", timeout=1):
        pass
    # The batches a fleet pass uses (agent.fleet_sync, agent.renewal.record_sync_batch).
    store.store_many({"certificates/www/state.json": b"{}", "certificates/api/state.json": b"{}"})
    assert store.load_many(["certificates/www/state.json", "nope"]) == {
        "certificates/www/state.json": b"{}"
    }
    held = RedisStorage(client, NS, secret).try_lock_many(["cert-www", "cert-api"], 30)
    assert sorted(held) == ["cert-api", "cert-www"]
    assert store.unlock_many(held) == []


def exercise_registry(client: object) -> None:
    a = RedisChallengeRegistry(client(), NS)  # type: ignore[operator]
    b = RedisChallengeRegistry(client(), NS)  # type: ignore[operator]
    try:
        assert wait(a.connected.is_set) and wait(b.connected.is_set)
        token = "aclTest" + os.urandom(8).hex()
        assert valid_token(token)
        a.add(token, token + ".thumb", time.time() + 60)
        assert wait(lambda: b.lookup(token) == token + ".thumb")
        a.remove(token)
        assert wait(lambda: b.lookup(token) is None)
        # A token missing from a mirror is fetched from Redis (HGET).
        late = "aclLate" + os.urandom(8).hex()
        c = RedisChallengeRegistry(client(), NS, start=False)  # type: ignore[operator]
        c.add(late, late + ".thumb", time.time() + 60)
        with b._lock:
            b._mirror.pop(late, None)
        assert b.lookup(late) is None
        future = b.fetch(late)  # what the SPOA does for a mirror miss
        assert future is not None and future.result(timeout=5) == late + ".thumb"
    finally:
        a.close()
        b.close()


def exercise_heartbeats_and_fanout(client: object) -> None:
    beat(client(), NS, "edge-x", {"www": "01"}, ttl=5)  # type: ignore[operator]
    assert list_nodes(client(), NS)  # type: ignore[operator]
    hb = Heartbeat(client(), NS, "edge-y", dict, interval=0.05, ttl=1).start()  # type: ignore[operator]
    time.sleep(0.1)
    hb.stop()
    got = threading.Event()
    listener = ChangeListener(client(), NS, lambda *a: got.set()).start()  # type: ignore[operator]
    try:
        assert wait(listener.connected.is_set)
        publish_changed(client(), NS, "www", "01", 1, "edge-x")  # type: ignore[operator]
        assert got.wait(5)
    finally:
        listener.stop()


def exercise_daemon(config: object) -> None:
    from tests.test_renewal import StandInIssuer

    async def main() -> str:
        daemon = Daemon(config)  # type: ignore[arg-type]
        try:
            daemon.renewer.issuer = StandInIssuer()
            await daemon._schedule_all()
            result = await daemon.renew("www", False)
            await daemon._schedule_all()
            daemon._heartbeat = daemon._start_heartbeat()
            await asyncio.sleep(0.2)
        finally:
            daemon.close()  # heartbeat and registry mirror, also when an assertion failed
        return result.status

    assert asyncio.run(main()) == "renewed"
