"""A daemon with [fleet]: the wiring gives it the Redis store and registry, a renewal
stores the certificate in Redis (nothing under state_dir but the key it made),
its heartbeat lists it with the serial, and it announces the certificate to the
fleet. Real redis-server; stand-in CA."""

from __future__ import annotations

import asyncio
import os
import textwrap
import time
from pathlib import Path

import pytest
import redis
from cryptography.hazmat.primitives import serialization

from agent.config import load_config
from agent.daemon import Daemon
from agent.fleet import ChangeListener, RedisChallengeRegistry, list_nodes
from agent.store_redis import RedisStorage
from tests.support.redis import redis_available, shared_redis
from tests.test_renewal import CA, StandInIssuer


def test_a_fleet_daemon_renews_into_redis_and_beats_with_the_serial(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    if not redis_available():
        pytest.fail("redis-server is not installed (scripts/setup.sh installs it)")
    url = shared_redis(tmp_path_factory).url
    ns = "t" + os.urandom(8).hex()
    secret = tmp_path / "fleet.secret"
    secret.write_bytes(os.urandom(32))
    secret.chmod(0o600)
    (tmp_path / "certs").mkdir()
    (tmp_path / "roots.pem").write_bytes(CA.root.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "config.toml").write_text(
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
            namespace = "{ns}"
            node = "edge-a"
            secret_file = "fleet.secret"
            [[certificates]]
            name = "www"
            domains = ["www.example.com"]
            key = "www.key"
            generate_key = true
            """
        )
    )
    config = load_config(tmp_path / "config.toml")

    heard: list[tuple[str, str, int | None, str]] = []
    listener = ChangeListener(
        redis.Redis.from_url(url), ns, lambda *m: heard.append(m)  # type: ignore[arg-type]
    ).start()
    assert listener.connected.wait(10)

    async def main() -> tuple[str, str | None]:
        daemon = Daemon(config)
        try:
            assert isinstance(daemon.storage, RedisStorage)
            assert isinstance(daemon.registry, RedisChallengeRegistry)
            daemon.renewer.issuer = StandInIssuer()
            await daemon._schedule_all()
            result = await daemon.renew("www", False)
            await daemon._schedule_all()
            daemon._heartbeat = daemon._start_heartbeat()
            client = redis.Redis.from_url(url)
            for _ in range(500):
                nodes = list_nodes(client, ns)
                if nodes and nodes[0]["serials"].get("www"):
                    break
                await asyncio.sleep(0.02)
            serial = nodes[0]["serials"].get("www") if nodes else None
            client.close()
        finally:
            daemon.close()  # heartbeat and registry mirror, also when an assertion failed
        return result.status, serial

    status, serial = asyncio.run(main())
    assert status == "renewed" and serial
    # The renewal told the fleet: name, serial, the fence of its hold, this node.
    for _ in range(500):
        if heard:
            break
        time.sleep(0.01)
    listener.stop()
    assert heard and heard[0][0] == "www" and heard[0][1] == serial and heard[0][3] == "edge-a"
    assert isinstance(heard[0][2], int) and heard[0][2] > 0
    store = RedisStorage(redis.Redis.from_url(url), ns)
    current = store.load("certificates/www/current").decode()
    assert current.endswith("-" + serial)
    assert store.exists(f"certificates/www/gen/{current}/fullchain.pem")
    # No private key in the shared store: the bundle is made on the node from its key file.
    for key in store.list("", recursive=True):
        assert b"PRIVATE KEY" not in store.load(key), key
    assert (tmp_path / "certs" / "www.pem").exists()  # deployed to this node's disk
    # Nothing of the certificate went to the local state dir: it lives in Redis.
    local = (
        sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "state").rglob("*") if p.is_file())
        if (tmp_path / "state").exists()
        else []
    )
    assert not [p for p in local if "certificates" in p], local
