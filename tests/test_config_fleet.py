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


# --- next keys in a fleet ----------------------------------------------------------------

FLEET = '[fleet]\nredis = "redis://127.0.0.1:1/0"\nsecret_file = "fleet.secret"\n'

# (certificate table, the key the error names, what it says of the key)
GENERATED_NEXT_KEYS = [
    (
        'key = "www.key"\ngenerate_next_key = true\n',
        "certificates[0].generate_next_key",
        "refused for certificate 'www' with [fleet]",
    ),
    (  # a next_key path that does not exist yet, for the agent to create
        'key = "www.key"\nnext_key = "next/www-next.key"\ngenerate_next_key = true\n',
        "certificates[0].generate_next_key",
        "refused for certificate 'www' with [fleet]",
    ),
    (
        'keys = [\n  { key = "www.key" },\n'
        '  { key = "www-rsa.key", generate_next_key = true },\n]\n',
        "certificates[0].keys[1].generate_next_key",
        "refused for certificate 'www' (rsa2048 key) with [fleet]",
    ),
]
GENERATED_IDS = ["single", "single-at-next_key", "keys-entry"]


@pytest.fixture
def keyed_site(site: Path) -> Path:
    """`site` plus the certificate's keys (EC and RSA), the next keys an operator
    copied (`www-next.key`, `www-rsa-next.key`) and the empty directory `next/`."""
    from agent import keys

    for name, kind in (("www.key", "ec256"), ("www-next.key", "ec256")):
        keys.create_key_file(site / name, kind)
    for name in ("www-rsa.key", "www-rsa-next.key"):
        keys.create_key_file(site / name, "rsa2048")
    (site / "next").mkdir()
    return site


def cert(table: str) -> str:
    return '[[certificates]]\nname = "www"\ndomains = ["www.example.com"]\n' + table


@pytest.mark.parametrize(("table", "key", "fragment"), GENERATED_NEXT_KEYS, ids=GENERATED_IDS)
def test_generate_next_key_in_a_fleet_is_refused_naming_file_certificate_and_key(
    keyed_site: Path, table: str, key: str, fragment: str
) -> None:
    path = keyed_site / "config.toml"
    path.write_text(BASE + cert(table) + FLEET)
    before = sorted(p.name for p in keyed_site.rglob("*"))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.file == str(path) and e.value.key == key
    assert fragment in e.value.message
    # What to do instead: one next key file, the same on every node.
    assert "set next_key to a key file created once and copied to every node" in e.value.message
    assert "same path (mode 0600) before announce_for ends" in e.value.message
    assert sorted(p.name for p in keyed_site.rglob("*")) == before  # nothing created


def test_generate_next_key_in_a_fleet_is_refused_before_its_directory_is_checked(
    keyed_site: Path,
) -> None:
    table = 'key = "www.key"\nnext_key = "nodir/www-next.key"\ngenerate_next_key = true\n'
    path = keyed_site / "config.toml"
    path.write_text(BASE + cert(table))
    with pytest.raises(ConfigError, match=r"next_key: directory .*nodir does not exist"):
        load_config(path)
    with pytest.raises(ConfigError) as e:
        load(keyed_site, cert(table) + FLEET)
    assert e.value.key == "certificates[0].generate_next_key"
    assert not (keyed_site / "nodir").exists()


@pytest.mark.parametrize(("table", "key", "fragment"), GENERATED_NEXT_KEYS, ids=GENERATED_IDS)
def test_generate_next_key_without_a_fleet_is_still_accepted(
    keyed_site: Path, table: str, key: str, fragment: str
) -> None:
    path = keyed_site / "config.toml"
    path.write_text(BASE + cert(table))
    cfg = load_config(path)
    assert cfg.fleet is None
    assert any(c.generate_next_key for c in cfg.certificates)


@pytest.mark.parametrize(
    "table",
    [
        'key = "www.key"\nnext_key = "www-next.key"\n',
        'keys = [\n  { key = "www.key", next_key = "www-next.key" },\n'
        '  { key = "www-rsa.key", next_key = "www-rsa-next.key" },\n]\n',
    ],
)
def test_a_copied_next_key_in_a_fleet_is_accepted(keyed_site: Path, table: str) -> None:
    cfg = load(keyed_site, cert(table) + FLEET)
    certs = cfg.certificates  # type: ignore[attr-defined]
    assert cfg.fleet is not None  # type: ignore[attr-defined]
    assert {c.next_key.name for c in certs} <= {"www-next.key", "www-rsa-next.key"}
    assert all(c.next_key is not None and not c.generate_next_key for c in certs)


def test_a_missing_next_key_in_a_fleet_asks_for_a_copy_not_for_generate_next_key(
    keyed_site: Path,
) -> None:
    with pytest.raises(ConfigError) as e:
        load(keyed_site, cert('key = "www.key"\nnext_key = "next/www-next.key"\n') + FLEET)
    assert e.value.key == "certificates[0].next_key"
    assert "does not exist" in e.value.message and "copy it to every node" in e.value.message
    assert "generate_next_key" not in e.value.message
