"""[fleet]: Redis URL or Sentinels, ACL password file, node, namespace, fleet secret.

Without [fleet] the config has fleet=None (single node, nothing changes)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from agent.config import ConfigError, load_config

BASE = """\
state_dir = "state"
[acme]
directory = "https://127.0.0.1:14000/dir"
"""


@pytest.fixture
def site(tmp_path: Path) -> Path:
    secret = tmp_path / "fleet.secret"
    secret.write_bytes(os.urandom(32))
    secret.chmod(0o600)
    short = tmp_path / "short.secret"
    short.write_bytes(os.urandom(16))
    short.chmod(0o600)
    (tmp_path / "redis.pass").write_text("s3cret\n")
    (tmp_path / "ca.pem").write_text("ca\n")
    return tmp_path


def load(site: Path, fleet: str) -> object:
    path = site / "config.toml"
    path.write_text(BASE + fleet)
    return load_config(path)


def test_without_fleet_nothing_changes(site: Path) -> None:
    path = site / "config.toml"
    path.write_text(BASE)
    assert load_config(path).fleet is None


def test_a_redis_url_fleet_gets_defaults_and_resolved_paths(site: Path) -> None:
    cfg = load(
        site,
        '[fleet]\nredis = "rediss://redis.example:6380/2"\nusername = "agent"\n'
        'password_file = "redis.pass"\nca_file = "ca.pem"\nsecret_file = "fleet.secret"\n',
    )
    fleet = cfg.fleet  # type: ignore[attr-defined]
    assert fleet.redis == "rediss://redis.example:6380/2" and fleet.username == "agent"
    assert fleet.password_file == site / "redis.pass" and fleet.ca_file == site / "ca.pem"
    assert fleet.secret_file == site / "fleet.secret"
    assert fleet.node == socket.gethostname() and fleet.namespace == "haproxy-acme"
    assert fleet.sentinels == () and fleet.service is None


def test_sentinels_with_a_service(site: Path) -> None:
    cfg = load(
        site,
        '[fleet]\nsentinels = ["127.0.0.1:26379", "127.0.0.2"]\nservice = "acme"\n'
        'node = "edge-1"\nnamespace = "prod"\nsecret_file = "fleet.secret"\n',
    )
    fleet = cfg.fleet  # type: ignore[attr-defined]
    assert fleet.sentinels == (("127.0.0.1", 26379), ("127.0.0.2", 26379))
    assert fleet.service == "acme" and fleet.node == "edge-1" and fleet.namespace == "prod"
    assert fleet.redis is None


def test_a_unix_socket_url(site: Path) -> None:
    cfg = load(
        site, '[fleet]\nredis = "unix:///run/redis/redis.sock"\nsecret_file = "fleet.secret"\n'
    )
    assert cfg.fleet.redis == "unix:///run/redis/redis.sock"  # type: ignore[attr-defined]


SECRET = 'secret_file = "fleet.secret"\n'


@pytest.mark.parametrize(
    ("body", "key", "fragment"),
    [
        (SECRET, "fleet.redis", "either redis"),
        ('redis = "redis://h"\nsentinels = ["h"]\nservice = "s"\n' + SECRET, "fleet.redis", "not both"),  # noqa: E501
        ('redis = "http://h"\n' + SECRET, "fleet.redis", "not a redis://"),
        ('redis = "redis://:pw@h"\n' + SECRET, "fleet.redis", "password_file"),
        ('redis = "redis:///0"\n' + SECRET, "fleet.redis", "no host"),
        ('redis = "redis://h"\nca_file = "ca.pem"\n' + SECRET, "fleet.ca_file", "rediss://"),
        ('redis = "rediss://h"\nca_file = "nope.pem"\n' + SECRET, "fleet.ca_file", "does not exist"),  # noqa: E501
        ('redis = "redis://h"\nservice = "s"\n' + SECRET, "fleet.service", "only used"),
        ('sentinels = ["h:1"]\n' + SECRET, "fleet.service", "is required"),
        ('sentinels = ["h:99999"]\nservice = "s"\n' + SECRET, "fleet.sentinels[0]", ""),
        ('redis = "redis://h"\npassword_file = "none"\n' + SECRET, "fleet.password_file", "does not exist"),  # noqa: E501
        ('redis = "redis://h"\nnode = "a b"\n' + SECRET, "fleet.node", "not a name"),
        ('redis = "redis://h"\nnamespace = "a:b"\n' + SECRET, "fleet.namespace", "not a name"),
        ('redis = "redis://h"\n', "fleet.secret_file", "is required"),
        ('redis = "redis://h"\nsecret_file = "short.secret"\n', "fleet.secret_file", "not 32"),
        ('redis = "redis://h"\ncolour = 1\n' + SECRET, "fleet.colour", "unknown key"),
    ],
)  # fmt: skip
def test_invalid_fleet_names_file_and_key(site: Path, body: str, key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as e:
        load(site, "[fleet]\n" + body)
    assert e.value.file == str(site / "config.toml") and e.value.key == key
    assert fragment in e.value.message


def test_a_secret_file_open_to_others_is_refused(site: Path) -> None:
    (site / "fleet.secret").chmod(0o644)
    with pytest.raises(ConfigError, match=r"fleet.secret_file: .*open to others.*chmod 600"):
        load(site, '[fleet]\nredis = "redis://h"\n' + SECRET)


def test_an_empty_password_file_is_refused(site: Path) -> None:
    (site / "redis.pass").write_text("\n")
    with pytest.raises(ConfigError, match=r"fleet.password_file: .* is empty"):
        load(site, '[fleet]\nredis = "redis://h"\npassword_file = "redis.pass"\n' + SECRET)
