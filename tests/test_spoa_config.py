"""The [spoa] door settings: defaults, rejections naming the key, and that they reach the server."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from agent.challenges import MemoryChallengeRegistry
from agent.config import ConfigError, load_config
from agent.spoa import SpoaServer, door_settings

BASE = """\
state_dir = "state"
[acme]
directory = "https://127.0.0.1:14000/dir"
"""


def config_file(tmp_path: Path, spoa: str = "") -> Path:
    path = tmp_path / "config.toml"
    path.write_text(BASE + ("[spoa]\n" + textwrap.dedent(spoa) if spoa else ""))
    return path


def test_spoa_door_defaults_match_the_servers_defaults(tmp_path: Path) -> None:
    settings = door_settings(load_config(config_file(tmp_path)).spoa)
    assert settings == {
        "hello_timeout": 5.0,
        "idle_timeout": 30.0,
        "max_connections": 1000,
        "max_pending_per_peer": 256,
    }
    server = SpoaServer(MemoryChallengeRegistry())
    assert {k: getattr(server, k) for k in settings} == settings


def test_configured_door_settings_reach_the_server(tmp_path: Path) -> None:
    cfg = load_config(
        config_file(
            tmp_path,
            """\
            hello_timeout = 2
            idle_timeout = 45.5
            max_connections = 300
            max_pending_per_peer = 16
            """,
        )
    )
    server = SpoaServer(MemoryChallengeRegistry(), **door_settings(cfg.spoa))
    assert (server.hello_timeout, server.idle_timeout) == (2.0, 45.5)
    assert (server.max_connections, server.max_pending_per_peer) == (300, 16)


@pytest.mark.parametrize(
    ("line", "key", "message"),
    [
        ("hello_timeout = 0", "spoa.hello_timeout", "greater than 0"),
        ("hello_timeout = 601", "spoa.hello_timeout", "at most 600"),
        ('idle_timeout = "30s"', "spoa.idle_timeout", "expected"),
        ("idle_timeout = -1", "spoa.idle_timeout", "greater than 0"),
        ("max_connections = 0", "spoa.max_connections", "between 1 and 1000000"),
        ("max_connections = 2.5", "spoa.max_connections", "expected"),
        ("max_pending_per_peer = 0", "spoa.max_pending_per_peer", "between 1 and 1000000"),
        ("max_pending_per_peer = true", "spoa.max_pending_per_peer", "boolean"),
    ],
)
def test_bad_door_settings_name_the_file_and_key(
    tmp_path: Path, line: str, key: str, message: str
) -> None:
    path = config_file(tmp_path, line + "\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert key in str(err.value) and message in str(err.value)
    assert "config.toml" in str(err.value)


def test_the_daemon_builds_its_spoa_with_the_configured_settings(tmp_path: Path) -> None:
    from agent.daemon import Daemon

    cfg = load_config(config_file(tmp_path, "hello_timeout = 1.5\nmax_pending_per_peer = 8\n"))
    daemon = Daemon(cfg)
    try:
        assert daemon.spoa.hello_timeout == 1.5
        assert daemon.spoa.max_pending_per_peer == 8
    finally:
        daemon._executor.shutdown(wait=False)
