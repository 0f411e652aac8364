"""Whoever builds a fleet challenge registry ends its mirror thread ("fleet-challenges")
on every way out: `renew` run in-process (done, or interrupted), and the daemon
when it cannot start or its constructor fails. A thread left behind outlives
its Redis and logs "Redis unreachable" into whatever runs next. Real
redis-server of its own per test (stopped at the end)."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import renewal
from agent.cli import main
from agent.config import load_config
from agent.daemon import Daemon
from agent.fleet import RedisChallengeRegistry
from tests.support.haproxy import free_port
from tests.support.redis import RedisProcess, redis_available

MIRROR = "fleet-challenges"


def mirrors() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == MIRROR and t.is_alive()}


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisProcess]:
    if not redis_available():
        pytest.fail("redis-server is not installed (scripts/setup.sh installs it)")
    server = RedisProcess(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


def fleet_config(tmp_path: Path, url: str, spoa: int | None = None) -> Path:
    """A [fleet] config without certificates (nothing is ordered)."""
    secret = tmp_path / "fleet.secret"
    secret.write_bytes(os.urandom(32))
    secret.chmod(0o600)
    (tmp_path / "certs").mkdir(exist_ok=True)
    path = tmp_path / "config.toml"
    path.write_text(
        f'state_dir = "{tmp_path / "state"}"\n'
        '[acme]\ndirectory = "https://127.0.0.1:1/dir"\n'
        f'[spoa]\nlisten = "127.0.0.1:{spoa or free_port()}"\n'
        f'[metrics]\nlisten = "127.0.0.1:{free_port()}"\n'
        f'[haproxy]\ncert_dir = "{tmp_path / "certs"}"\n'
        f'[daemon]\ncontrol_socket = "{tmp_path / "control.sock"}"\n'
        f'[fleet]\nredis = "{url}"\nnamespace = "t{os.urandom(8).hex()}"\n'
        f'node = "edge-m"\nsecret_file = "{secret}"\n'
    )
    return path


def test_a_renew_run_in_process_ends_its_registry_mirror_thread(
    tmp_path: Path, redis_server: RedisProcess
) -> None:
    config = fleet_config(tmp_path, redis_server.url)
    before = mirrors()
    assert main(["renew", "-c", str(config)]) == 0
    assert mirrors() - before == set()


def test_an_interrupted_renew_run_ends_its_registry_mirror_thread(
    tmp_path: Path, redis_server: RedisProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = fleet_config(tmp_path, redis_server.url)
    started: list[bool] = []

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        started.append(bool(mirrors()))
        raise KeyboardInterrupt  # Ctrl-C while the orders run

    monkeypatch.setattr(renewal, "renew_certificates", interrupted)
    before = mirrors()
    assert main(["renew", "-c", str(config)]) == 130
    assert started == [True]  # the mirror was running while renew ran
    assert mirrors() - before == set()


def test_a_daemon_that_cannot_start_ends_its_registry_mirror_thread(
    tmp_path: Path, redis_server: RedisProcess
) -> None:
    with socket.socket() as taken:  # the SPOA port is in use: "cannot start", exit 1
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = load_config(fleet_config(tmp_path, redis_server.url, taken.getsockname()[1]))
        before = mirrors()

        async def main_() -> int:
            daemon = Daemon(config)
            assert isinstance(daemon.registry, RedisChallengeRegistry)
            return await daemon.run()

        assert asyncio.run(main_()) == 1
    assert mirrors() - before == set()


def test_a_daemon_whose_construction_fails_ends_its_registry_mirror_thread(
    tmp_path: Path, redis_server: RedisProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_config(fleet_config(tmp_path, redis_server.url))

    def broken(self: Daemon) -> Any:
        assert mirrors()  # the registry exists by now
        raise OSError("metrics server cannot be built")

    monkeypatch.setattr(Daemon, "_make_metrics_server", broken)
    before = mirrors()
    with pytest.raises(OSError, match="metrics server cannot be built"):
        Daemon(config)
    assert mirrors() - before == set()
