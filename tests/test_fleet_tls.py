"""`rediss://` with a CA bundle: a real redis-server with `tls-port` (Debian's build
has TLS), its certificate from a throwaway CA made here. The agent's client
(agent.fleet.redis_client, from a [fleet] config) connects and the store works
through it; a wrong CA and a plain redis:// to the TLS port both fail with a
clear error instead of hanging."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from agent.config import load_config
from agent.fleet import redis_client
from agent.store_redis import RedisStorage
from tests.support.certs import issue_leaf, key_pem, make_ca, make_key
from tests.support.haproxy import free_port
from tests.support.redis import RedisProcess, redis_available


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisProcess, int, Path]]:
    if not redis_available():
        pytest.fail("redis-server is not installed (scripts/setup.sh installs it)")
    d = tmp_path_factory.mktemp("redis-tls")
    ca = make_ca("redis TLS test CA")
    key = make_key()
    from cryptography.hazmat.primitives.serialization import Encoding

    (d / "ca.pem").write_bytes(ca.pem)
    (d / "server.pem").write_bytes(
        issue_leaf(ca, key, ["127.0.0.1", "localhost"]).public_bytes(Encoding.PEM)
    )
    (d / "server.key").write_bytes(key_pem(key))
    (d / "server.key").chmod(0o600)
    tls_port = free_port()
    server = RedisProcess(
        d,
        extra="\n".join(
            [
                f"tls-port {tls_port}",
                f"tls-cert-file {d / 'server.pem'}",
                f"tls-key-file {d / 'server.key'}",
                f"tls-ca-cert-file {d / 'ca.pem'}",
                "tls-auth-clients no",
            ]
        ),
    ).start()
    try:
        yield server, tls_port, d / "ca.pem"
    finally:
        server.stop()


def fleet_config(tmp_path: Path, url: str, ca_file: Path | None) -> Path:
    secret = tmp_path / "fleet.secret"
    secret.write_bytes(os.urandom(32))
    secret.chmod(0o600)
    lines = [
        '[acme]\ndirectory = "https://127.0.0.1:1/dir"',
        f'[haproxy]\ncert_dir = "{tmp_path}"',
        f'[fleet]\nredis = "{url}"\nnode = "edge-a"\nsecret_file = "{secret}"',
    ]
    if ca_file is not None:
        lines.append(f'ca_file = "{ca_file}"')
    path = tmp_path / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_rediss_with_the_ca_bundle_connects_and_the_store_works_over_tls(
    tmp_path: Path, tls_redis: tuple[RedisProcess, int, Path]
) -> None:
    server, tls_port, ca = tls_redis
    config = load_config(fleet_config(tmp_path, f"rediss://127.0.0.1:{tls_port}/0", ca))
    assert config.fleet is not None
    client = redis_client(config.fleet)
    try:
        assert client.ping()
        store = RedisStorage(client, "tls" + os.urandom(4).hex(), os.urandom(32))
        store.store("accounts/x/account.key", b"-----BEGIN PRIVATE KEY-----", secret=True)
        assert store.load("accounts/x/account.key") == b"-----BEGIN PRIVATE KEY-----"
        # The connection really is TLS: the server counts it as such.
        clients = client.client_list()
        assert clients and all("laddr" in c for c in clients)
        info = client.info("server")
        assert int(info["tcp_port"]) == server.port  # the plain port exists, we did not use it
        assert client.connection_pool.connection_class.__name__ == "SSLConnection"
    finally:
        client.close()


def test_rediss_with_another_ca_is_refused_naming_the_certificate_check(
    tmp_path: Path, tls_redis: tuple[RedisProcess, int, Path]
) -> None:
    _, tls_port, _ = tls_redis
    other = tmp_path / "other-ca.pem"
    other.write_bytes(make_ca("not the redis CA").pem)
    config = load_config(fleet_config(tmp_path, f"rediss://127.0.0.1:{tls_port}/0", other))
    assert config.fleet is not None
    client = redis_client(config.fleet)
    with pytest.raises(redis.ConnectionError, match=r"(?i)certificate verify failed"):
        client.ping()
    client.close()


def test_plain_redis_url_to_the_tls_port_fails_clearly(
    tmp_path: Path, tls_redis: tuple[RedisProcess, int, Path]
) -> None:
    _, tls_port, _ = tls_redis
    config = load_config(fleet_config(tmp_path, f"redis://127.0.0.1:{tls_port}/0", None))
    assert config.fleet is not None
    client = redis_client(config.fleet)
    with pytest.raises(redis.ConnectionError) as e:
        client.ping()
    client.close()
    message = str(e.value)
    assert f"127.0.0.1:{tls_port}" in message and "rediss://" in message, message
