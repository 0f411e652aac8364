"""`fleet-join`: a single node's stored certificates and ACME account move into the
fleet's Redis without re-issuing; idempotent; never rolls the fleet back; refuses
(writing nothing) a certificate that is not for the node's key. Real redis-server."""

from __future__ import annotations

import datetime
import os
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest
import redis

from agent import layout
from agent.certstate import Deployed, install_generation, load_current, load_state, update_state
from agent.cli import main
from agent.storage import FileStorage
from agent.store_redis import RedisStorage
from tests.support.certs import issue_leaf, key_pem, make_ca, make_key
from tests.support.redis import redis_available, shared_redis

CA = make_ca("fleet-join test CA")
ACCOUNT = "accounts/acme-v02.example-directory/account.key"


def node(tmp_path: Path, url: str, ns: str, secret: bytes, name: str = "node") -> Path:
    """A node's directory: key file, state dir, [fleet] config; returns the config path."""
    d = tmp_path / name
    d.mkdir()
    (d / "certs").mkdir()
    s = d / "fleet.secret"
    s.write_bytes(secret)
    s.chmod(0o600)
    key = make_key()
    (d / "www.key").write_bytes(key_pem(key))
    (d / "www.key").chmod(0o600)
    (d / "config.toml").write_text(
        textwrap.dedent(
            f"""\
            state_dir = "state"
            [acme]
            directory = "https://127.0.0.1:1/dir"
            [haproxy]
            cert_dir = "{d / "certs"}"
            [fleet]
            redis = "{url}"
            namespace = "{ns}"
            node = "{name}"
            secret_file = "fleet.secret"
            [[certificates]]
            name = "www"
            domains = ["www.example.com"]
            key = "www.key"
            """
        )
    )
    return d / "config.toml"


def issue_locally(config: Path, days: float, key_file: Path | None = None) -> str:
    """A certificate for the node's key (or `key_file`'s) installed in its state dir, as a
    single node's renewal leaves it; returns the generation id."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    d = config.parent
    key = load_pem_private_key((key_file or d / "www.key").read_bytes(), None)
    now = datetime.datetime.now(datetime.UTC)
    not_after = now + datetime.timedelta(days=days)
    leaf = issue_leaf(CA, key, ["www.example.com"], not_after=not_after)  # type: ignore[arg-type]
    store = FileStorage(d / "state")
    meta = install_generation(store, "www", leaf, [CA.cert], time.time(), "https://ca/dir")
    with store.locked(layout.cert_lock("www")):
        facts = {"unix:/run/haproxy/admin.sock": Deployed(meta.serial, time.time(), None)}
        update_state(store, "www", lambda st: replace(st, deployed=facts))
    assert meta.generation is not None
    return meta.generation


@pytest.fixture
def fleet(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, bytes]:
    if not redis_available():
        pytest.fail("redis-server is not installed (scripts/setup.sh installs it)")
    return shared_redis(tmp_path_factory).url, "t" + os.urandom(8).hex(), os.urandom(32)


def redis_store(url: str, ns: str, secret: bytes | None = None) -> RedisStorage:
    return RedisStorage(redis.Redis.from_url(url), ns, secret)


def test_a_single_node_joins_with_its_certificate_and_account_and_a_rerun_changes_nothing(
    tmp_path: Path, fleet: tuple[str, str, bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    url, ns, secret = fleet
    config = node(tmp_path, url, ns, secret)
    gen_id = issue_locally(config, days=60)
    local = FileStorage(config.parent / "state")
    account_pem = key_pem(make_key())
    local.store(ACCOUNT, account_pem, secret=True)
    assert main(["fleet-join", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"copied www: serial {load_current(local, 'www').meta.serial}" in out  # type: ignore[union-attr]
    store = redis_store(url, ns, secret)
    theirs = load_current(store, "www")
    ours = load_current(local, "www")
    assert theirs is not None and ours is not None and theirs.id == gen_id
    assert theirs.fullchain_pem == ours.fullchain_pem
    meta_key = layout.generation_key("www", gen_id, layout.META)
    assert store.load(meta_key) == local.load(meta_key)  # byte for byte: same facts
    assert load_state(store, "www").deployed == {}  # every node verifies its own HAProxy
    assert store.load(ACCOUNT) == account_pem
    # Encrypted at rest: no private key in any raw Redis value.
    raw = redis.Redis.from_url(url)
    for k in raw.scan_iter(f"{ns}:*"):
        if raw.type(k) == b"hash":
            assert b"PRIVATE KEY" not in (raw.hget(k, "d") or b""), k
    before = {k: store.stat(k).modified for k in store.list("", recursive=True)}
    assert main(["fleet-join", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    assert "skipped www: the fleet already holds" in out and "kept it" in out
    assert {k: store.stat(k).modified for k in store.list("", recursive=True)} == before


def test_an_older_node_does_not_roll_the_fleet_back_and_a_newer_one_moves_it_forward(
    tmp_path: Path, fleet: tuple[str, str, bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    url, ns, secret = fleet
    first = node(tmp_path, url, ns, secret, "first")
    issue_locally(first, days=60)
    assert main(["fleet-join", "-c", str(first)]) == 0
    store = redis_store(url, ns, secret)
    held = load_current(store, "www")
    assert held is not None
    # Same key file on every node (provisioned); this one holds an older certificate.
    older = node(tmp_path, url, ns, secret, "older")
    (older.parent / "www.key").write_bytes((first.parent / "www.key").read_bytes())
    issue_locally(older, days=30)
    assert main(["fleet-join", "-c", str(older)]) == 0
    assert "skipped www" in capsys.readouterr().out
    assert load_current(store, "www").id == held.id  # type: ignore[union-attr]
    newer = node(tmp_path, url, ns, secret, "newer")
    (newer.parent / "www.key").write_bytes((first.parent / "www.key").read_bytes())
    newest = issue_locally(newer, days=90)
    assert main(["fleet-join", "-c", str(newer)]) == 0
    assert load_current(store, "www").id == newest  # type: ignore[union-attr]


def test_a_certificate_for_another_key_is_refused_and_nothing_is_written(
    tmp_path: Path, fleet: tuple[str, str, bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    url, ns, secret = fleet
    config = node(tmp_path, url, ns, secret)
    other = tmp_path / "other.key"
    other.write_bytes(key_pem(make_key()))
    issue_locally(config, days=60, key_file=other)
    FileStorage(config.parent / "state").store(ACCOUNT, key_pem(make_key()), secret=True)
    assert main(["fleet-join", "-c", str(config)]) == 1
    err = capsys.readouterr().err
    assert "certificate www" in err and "www.key" in err and "nothing was copied" in err
    assert redis_store(url, ns).list("", recursive=True) == []


def test_fleet_join_needs_a_fleet_section(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "config.toml").write_text(
        '[acme]\ndirectory = "https://127.0.0.1:1/dir"\n'
        f'[haproxy]\ncert_dir = "{tmp_path}"\n'
    )
    assert main(["fleet-join", "-c", str(tmp_path / "config.toml")]) == 2
    err = capsys.readouterr().err
    assert "fleet" in err and "config.toml" in err
