"""Map answer mode in a fleet, against a real redis-server, two real HAProxy
(the shipped haproxy-map.cfg, no SPOE at all) and a real Pebble.

Node A orders; Pebble validates against node B's HAProxy only. B's part is
what its daemon runs: a RedisChallengeRegistry, its own HAProxyMapRegistry
and a MapFollower, plus a heartbeat saying answer = "map".
"""

from __future__ import annotations

import http.client
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from agent.challenge_map import ChallengeMapError, HAProxyMapRegistry
from agent.cli import main
from agent.fleet import RedisChallengeRegistry, beat
from agent.fleet_map import MapFollower, PeerAcks, ack_key
from agent.haproxy_api import RuntimeAPI, parse_map
from tests.support.acme_stack import AcmeStack
from tests.support.fleet import wait_until
from tests.support.redis import RedisProcess

pytestmark = pytest.mark.integration

SECRET = bytes(range(32))


def challenge(port: int, token: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", f"/.well-known/acme-challenge/{token}", headers={"Host": "x.test"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def token() -> str:
    return secrets.token_urlsafe(32)


@dataclass
class NodeB:
    stack: AcmeStack
    registry: RedisChallengeRegistry
    maps: HAProxyMapRegistry
    follower: MapFollower

    def entries(self) -> dict[str, str]:
        return parse_map(self.stack.haproxy.admin_command(f"show map {self.stack.map_name}"))


def map_registry(
    stack: AcmeStack,
    inner: RedisChallengeRegistry,
    peers: PeerAcks | None = None,
    timeout: float = 10.0,
) -> HAProxyMapRegistry:
    """What challenge_map.from_config builds for this stack's HAProxy (no Pebble needed)."""
    assert stack.haproxy.admin_socket is not None
    return HAProxyMapRegistry(
        inner,
        [RuntimeAPI("unix:" + str(stack.haproxy.admin_socket), 5.0)],
        default_file=str(stack.cert_dir / "acme-challenge.map"),
        timeout=timeout,
        peers=peers,
    )


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisProcess]:
    with RedisProcess(tmp_path / "redis") as server:
        yield server


def fleet_lines(redis_server: RedisProcess, tmp_path: Path, node: str) -> list[str]:
    secret = tmp_path / "fleet.secret"
    if not secret.exists():
        secret.write_bytes(SECRET)
        secret.chmod(0o600)
    return [
        "[fleet]",
        f'redis = "{redis_server.url}"',
        f'node = "{node}"',
        'namespace = "fm"',
        f'secret_file = "{secret}"',
    ]


@pytest.fixture
def node_b(
    tmp_path: Path, haproxy_bin: str, redis_server: RedisProcess
) -> Iterator[NodeB]:
    """Node B: a map-mode HAProxy and what B's daemon runs for it (no Pebble)."""
    stack = AcmeStack(tmp_path / "b", haproxy_bin, answer="map")
    stack.haproxy.start()
    try:
        client = redis.Redis.from_url(redis_server.url)
        registry = RedisChallengeRegistry(client, "fm")
        try:
            maps = map_registry(stack, registry)
            follower = MapFollower(registry, maps, PeerAcks(client, "fm", "b")).start()
            try:
                beat(client, "fm", "b", {}, extra={"answer": "map"}, ttl=120)
                wait_until("B's mirror to subscribe", registry.connected.is_set, 10)
                yield NodeB(stack, registry, maps, follower)
            finally:
                follower.stop()
        finally:
            registry.close()
    finally:
        stack.haproxy.stop()


def test_an_order_on_a_is_validated_through_bs_haproxy_map(
    tmp_path: Path, haproxy_bin: str, redis_server: RedisProcess, node_b: NodeB,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """Pebble validates only against B; A's `renew` (map mode, [fleet]) succeeds
    because its add waited until B's HAProxy held the token, and B's map is
    empty again afterwards."""
    # Pebble's http-01 validation goes to B's HTTP port, never to A's.
    a = AcmeStack(
        tmp_path / "a", haproxy_bin, answer="map", validation_port=node_b.stack.http_port
    )
    with a:
        certs = [{"name": "www", "domains": ["www.example.com"],
                  "key": str(tmp_path / "www.key"), "generate_key": True}]  # fmt: skip
        config = a.write_config(tmp_path / "a" / "config.toml", certs)
        fleet = fleet_lines(redis_server, tmp_path, "a")
        config.write_text(config.read_text() + "\n" + "\n".join(fleet) + "\n")
        rc = main(["renew", "-c", str(config)])
        out, err = capsys.readouterr()
        assert rc == 0, err + out
        assert "renewed" in out
        assert node_b.follower.mirrored >= 1  # B's HAProxy took A's token
        wait_until("B's map to be empty again", lambda: node_b.entries() == {}, 10)
        assert parse_map(a.haproxy.admin_command(f"show map {a.map_name}")) == {}


def test_a_token_added_on_a_is_answered_by_b_as_soon_as_add_returns(
    tmp_path: Path, haproxy_bin: str, redis_server: RedisProcess, node_b: NodeB
) -> None:
    a = AcmeStack(tmp_path / "a", haproxy_bin, answer="map")
    a.haproxy.start()
    try:
        client = redis.Redis.from_url(redis_server.url)
        registry_a = RedisChallengeRegistry(client, "fm")
        maps_a = map_registry(a, registry_a, PeerAcks(client, "fm", "a"))
        try:
            tok = token()
            keyauth = f"{tok}.thumbprint"
            maps_a.add(tok, keyauth, time.time() + 300)
            # No wait: add returned only once B said its HAProxy holds it.
            assert challenge(node_b.stack.http_port, tok) == (200, keyauth.encode())
            assert challenge(a.http_port, tok) == (200, keyauth.encode())
            assert client.sismember(ack_key("fm", tok), "b")
            maps_a.remove(tok)
            wait_until(
                "B to drop the token", lambda: challenge(node_b.stack.http_port, tok)[0] != 200, 10
            )
        finally:
            registry_a.close()
    finally:
        a.haproxy.stop()


def test_an_order_fails_naming_a_live_node_whose_haproxy_cannot_take_the_token(
    tmp_path: Path, haproxy_bin: str, redis_server: RedisProcess, node_b: NodeB
) -> None:
    a = AcmeStack(tmp_path / "a", haproxy_bin, answer="map")
    a.haproxy.start()
    node_b.stack.haproxy.stop()  # B's agent is alive (heartbeat), its HAProxy is not
    try:
        client = redis.Redis.from_url(redis_server.url)
        registry_a = RedisChallengeRegistry(client, "fm")
        maps_a = map_registry(a, registry_a, PeerAcks(client, "fm", "a"), timeout=1.0)
        try:
            tok = token()
            with pytest.raises(ChallengeMapError) as info:
                maps_a.add(tok, f"{tok}.thumbprint", time.time() + 300)
            assert "fleet node(s) b" in str(info.value)
            assert info.value.instance == "node b"
            # Taken back out everywhere: A's map and the fleet's registry.
            assert parse_map(a.haproxy.admin_command(f"show map {a.map_name}")) == {}
            assert not client.hexists("fm:challenges", tok)
        finally:
            registry_a.close()
    finally:
        a.haproxy.stop()


def test_a_dead_node_is_not_waited_for(
    tmp_path: Path, haproxy_bin: str, redis_server: RedisProcess
) -> None:
    """A node whose heartbeat expired (dead, cut off) does not hold orders up."""
    a = AcmeStack(tmp_path / "a", haproxy_bin, answer="map")
    a.haproxy.start()
    try:
        client = redis.Redis.from_url(redis_server.url)
        beat(client, "fm", "gone", {}, extra={"answer": "map"}, ttl=0.05)
        beat(client, "fm", "spoe-node", {}, extra={"answer": "spoe"}, ttl=120)
        time.sleep(0.1)  # the "gone" beat's TTL runs out
        registry_a = RedisChallengeRegistry(client, "fm")
        maps_a = map_registry(a, registry_a, PeerAcks(client, "fm", "a"), timeout=1.0)
        try:
            tok = token()
            maps_a.add(tok, f"{tok}.thumbprint", time.time() + 300)
            assert challenge(a.http_port, tok)[0] == 200
        finally:
            registry_a.close()
    finally:
        a.haproxy.stop()


def test_b_catches_up_on_a_token_added_while_its_haproxy_was_down(
    tmp_path: Path, haproxy_bin: str, redis_server: RedisProcess, node_b: NodeB
) -> None:
    """The follower retries a token an instance did not take, and acks it then."""
    client = redis.Redis.from_url(redis_server.url)
    node_b.stack.haproxy.stop()
    tok = token()
    registry_a = RedisChallengeRegistry(client, "fm")
    try:
        registry_a.add(tok, f"{tok}.thumbprint", time.time() + 300)  # published to B
        time.sleep(0.5)  # B tried and failed at least once
        assert not client.sismember(ack_key("fm", tok), "b")
        node_b.stack.haproxy.start()
        wait_until("B to ack after its HAProxy came back",
                   lambda: bool(client.sismember(ack_key("fm", tok), "b")), 10)  # fmt: skip
        assert challenge(node_b.stack.http_port, tok) == (200, f"{tok}.thumbprint".encode())
    finally:
        registry_a.close()
