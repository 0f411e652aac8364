"""The composition root: without [fleet] the embedded default (files, memory); with
[fleet] the Redis store and registry on the configured server (a real redis-server)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent import wiring
from agent.challenges import MemoryChallengeRegistry
from agent.config import load_config
from agent.deploy import Deployer
from agent.fleet import RedisChallengeRegistry
from agent.issuer import Issuer
from agent.storage import FileStorage
from agent.store_redis import RedisStorage
from tests.support.redis import redis_available, shared_redis

BASE = """\
state_dir = "state"
[acme]
directory = "https://127.0.0.1:14000/dir"
"""


def test_without_fleet_the_embedded_default_is_built(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text(BASE)
    config = load_config(tmp_path / "config.toml")
    storage = wiring.make_storage(config)
    assert isinstance(storage, FileStorage) and storage.root == tmp_path / "state"
    registry = wiring.make_registry(config)
    assert isinstance(registry, MemoryChallengeRegistry)
    assert isinstance(wiring.make_issuer(config, storage, registry), Issuer)
    assert isinstance(wiring.make_deployer(config), Deployer)
    assert not (tmp_path / "state").exists()  # building writes nothing


def test_with_fleet_storage_and_registry_are_shared_through_redis(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    if not redis_available():
        pytest.fail("redis-server is not installed (scripts/setup.sh installs it)")
    url = shared_redis(tmp_path_factory).url
    secret = tmp_path / "fleet.secret"
    secret.write_bytes(os.urandom(32))
    secret.chmod(0o600)
    ns = "t" + os.urandom(8).hex()
    (tmp_path / "config.toml").write_text(
        BASE + f'[fleet]\nredis = "{url}"\nnamespace = "{ns}"\nsecret_file = "fleet.secret"\n'
    )
    config = load_config(tmp_path / "config.toml")
    a, b = wiring.make_storage(config), wiring.make_storage(config)
    assert isinstance(a, RedisStorage) and a.ns == ns
    a.store("accounts/ca/account.key", b"key", secret=True)
    assert b.load("accounts/ca/account.key") == b"key"  # same secret_file: decrypts
    registry = wiring.make_registry(config)
    try:
        assert isinstance(registry, RedisChallengeRegistry)
        assert registry.connected.wait(10)
        token = "t" * 43
        registry.add(token, token + ".k", expires_at=2e9)
        assert a.client.hexists(f"{ns}:challenges", token)
    finally:
        registry.close()  # type: ignore[attr-defined]
    assert not (tmp_path / "state").exists()  # nothing local in fleet storage
