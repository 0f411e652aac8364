"""SIGHUP with a changed [fleet]: the daemon rebuilds its challenge registry,
heartbeat and fan-out on the new settings while HAProxy's SPOE connection
stays open and is answered from the new registry at once. An unchanged
[fleet] keeps the same objects. Real redis-server; the daemon's own
`reload` (what the SIGHUP handler runs)."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest
import redis

from agent.config import load_config
from agent.daemon import Daemon
from agent.fleet import RedisChallengeRegistry, list_nodes
from tests.support.haproxy import free_port
from tests.support.redis import redis_available, shared_redis
from tests.support.spop_client import SpopClient

TOKEN = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA"
KEYAUTH = TOKEN + ".9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI"


def write_config(path: Path, url: str, ns: str, spoa: int, metrics: int) -> None:
    tmp = path.parent
    path.write_text(
        f"""\
state_dir = "{tmp / "state"}"
[acme]
directory = "https://127.0.0.1:1/dir"
[spoa]
listen = "127.0.0.1:{spoa}"
[metrics]
listen = "127.0.0.1:{metrics}"
[haproxy]
cert_dir = "{tmp / "certs"}"
[daemon]
control_socket = "{tmp / "control.sock"}"
[fleet]
redis = "{url}"
namespace = "{ns}"
node = "edge-r"
secret_file = "{tmp / "fleet.secret"}"
"""
    )


def test_a_changed_fleet_section_rebuilds_the_registry_without_dropping_spoe(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    if not redis_available():
        pytest.fail("redis-server is not installed (scripts/setup.sh installs it)")
    url = shared_redis(tmp_path_factory).url
    ns1, ns2 = "t" + os.urandom(8).hex(), "t" + os.urandom(8).hex()
    (tmp_path / "fleet.secret").write_bytes(os.urandom(32))
    (tmp_path / "fleet.secret").chmod(0o600)
    (tmp_path / "certs").mkdir()
    path = tmp_path / "config.toml"
    spoa, metrics = free_port(), free_port()
    write_config(path, url, ns1, spoa, metrics)
    client = redis.Redis.from_url(url)
    other = RedisChallengeRegistry(redis.Redis.from_url(url), ns2)
    assert other.connected.wait(10)
    other.add(TOKEN, KEYAUTH, 2e9)  # known in the second fleet only

    before = {t for t in threading.enumerate() if t.name == "fleet-challenges"}

    async def main() -> None:
        daemon = Daemon(load_config(path))
        task = asyncio.create_task(daemon.run())
        try:
            for _ in range(500):
                if daemon._started:
                    break
                await asyncio.sleep(0.02)
            first_registry = daemon.registry
            with SpopClient(spoa) as c:
                await asyncio.to_thread(c.hello)
                ack = await asyncio.to_thread(c.ask, TOKEN, 1)
                assert ack.actions == ()  # not in ns1
                # Same [fleet]: nothing rebuilt.
                assert await daemon.reload(path)
                assert daemon.registry is first_registry
                # Another namespace: a new registry, the same SPOE connection.
                write_config(path, url, ns2, spoa, metrics)
                assert await daemon.reload(path)
                assert daemon.registry is not first_registry
                assert daemon.spoa.registry is daemon.registry
                for _ in range(500):
                    if daemon.registry.connected.is_set():  # type: ignore[attr-defined]
                        break
                    await asyncio.sleep(0.02)
                ack = await asyncio.to_thread(c.ask, TOKEN, 2)
                assert ack.stream_id == 2 and ack.actions, "not answered from the new fleet"
            for _ in range(500):
                names = {n["node"] for n in list_nodes(client, ns2) if n["alive"]}
                if "edge-r" in names:
                    break
                await asyncio.sleep(0.02)
            assert "edge-r" in names  # beating in the new fleet
            assert not [n for n in list_nodes(client, ns1) if n["alive"]]  # gone from the old
            assert daemon._fleet_sync is not None and daemon._fleet_sync.namespace == ns2
        finally:
            daemon._stop.set()
            await asyncio.wait_for(task, 30)
        # The stopped daemon left no registry mirror running (the old one was
        # closed by the reload, the current one by the stop).
        mirrors = [
            t for t in threading.enumerate() if t.name == "fleet-challenges" and t not in before
        ]
        assert mirrors == []

    try:
        asyncio.run(main())
    finally:
        other.close()
        client.close()
