"""Fleet fan-out, catch-up, key check and shared challenges between two real nodes.

Two agent daemons (`haproxy-acme-agent run`, subprocesses), each with its own
real HAProxy (the shipped haproxy.cfg and spoe-acme.conf) on 127.0.0.1, share
one real redis-server. A certificate is stored in Redis the way a node's
renewal stores it (agent.certstate.install_generation + publish_changed),
and what each HAProxy serves is read by real TLS handshakes. Node B reaches
Redis through a TcpRelay, so its link can be cut and restored. Every wait is
bounded; processes are stopped by their handles.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.certstate import install_generation
from agent.fleet import RedisChallengeRegistry, publish_changed
from agent.store_redis import RedisStorage
from tests.support.certs import write_crt_list
from tests.support.haproxy import HAProxyProcess, free_port, haproxy_binaries, stop_process
from tests.support.issued import TinyCA
from tests.support.redis import RedisProcess, redis_available
from tests.support.tcp_relay import TcpRelay
from tests.support.tls import served_leaf

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SHIPPED_CFG = REPO / "haproxy" / "haproxy.cfg"
SHIPPED_SPOE = REPO / "haproxy" / "spoe-acme.conf"
DOMAIN = "www.fleet.test"
HAPROXY = haproxy_binaries()[-1][1]  # one build: the version matrix is the single-node suite's
SITE_STUB = """
frontend site_stub
    bind "127.0.0.1:${SITE_PORT}"
    http-request return status 200 content-type text/plain lf-string "site:%[path]"
"""


def wait_for(what: str, check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    for _ in range(100_000):
        try:
            if check():
                return
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass
class Node:
    name: str
    workdir: Path
    haproxy: HAProxyProcess
    https_port: int
    http_port: int
    spoa_port: int
    metrics_port: int
    config: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = (self.workdir / "agent.log").open("ab")
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "-c", str(self.config)],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        log.close()
        wait_for(f"{self.name}'s metrics", lambda: bool(self.metrics()))

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def log(self) -> str:
        return (self.workdir / "agent.log").read_text(errors="replace")

    def served_serial(self) -> int:
        return served_leaf(self.https_port, DOMAIN).serial_number

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            return str(r.read().decode())

    def _status(self, *extra: str) -> str:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        out = subprocess.run(
            [sys.executable, "-m", "agent.cli", "status", "-c", str(self.config), *extra],
            cwd=REPO, env=env, capture_output=True, timeout=60, check=True,
        )  # fmt: skip
        return out.stdout.decode()

    def status(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self._status("--json"))
        return doc

    def status_text(self) -> str:
        return self._status()

    def challenge(self, token: str) -> str:
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=5)
        try:
            conn.request("GET", f"/.well-known/acme-challenge/{token}", headers={"Host": DOMAIN})
            return conn.getresponse().read().decode()
        finally:
            conn.close()


def make_node(name: str, workdir: Path, redis_url: str, ns: str, secret: Path, key: bytes) -> Node:
    workdir.mkdir(parents=True)
    ports = {k: free_port() for k in ("http", "https", "spoa", "site", "metrics")}
    crt_list = write_crt_list(workdir, "default.test")
    env = {
        "HAPROXY_ADMIN_SOCKET": str(workdir / "admin.sock"),
        "HTTP_BIND": f"127.0.0.1:{ports['http']}",
        "HTTPS_BIND": f"127.0.0.1:{ports['https']}",
        "SPOE_ACME_CONF": str(SHIPPED_SPOE),
        "CRT_LIST": str(crt_list),
        "SITE_ADDR": f"127.0.0.1:{ports['site']}",
        "SITE_PORT": str(ports["site"]),
        "SPOA_ADDR": f"127.0.0.1:{ports['spoa']}",
    }
    config_text = "global\n    noreuseport\n\n" + SHIPPED_CFG.read_text() + SITE_STUB
    haproxy = HAProxyProcess(HAPROXY, config_text, env, workdir)
    haproxy.start()
    (workdir / "www.key").write_bytes(key)
    (workdir / "www.key").chmod(0o600)
    config = workdir / "config.toml"
    config.write_text(
        f"""\
state_dir = "{workdir / "state"}"
[acme]
directory = "https://127.0.0.1:1/dir"
[spoa]
listen = "127.0.0.1:{ports["spoa"]}"
[haproxy]
runtime_api = ["unix:{workdir / "admin.sock"}"]
cert_dir = "{workdir / "certs"}"
crt_list = "{crt_list}"
[metrics]
listen = "127.0.0.1:{ports["metrics"]}"
[daemon]
control_socket = "{workdir / "control.sock"}"
reconcile_interval = "2s"
[fleet]
redis = "{redis_url}"
namespace = "{ns}"
node = "{name}"
secret_file = "{secret}"
[[certificates]]
name = "www"
domains = ["{DOMAIN}"]
key = "{workdir / "www.key"}"
"""
    )
    return Node(name, workdir, haproxy, ports["https"], ports["http"], ports["spoa"],
                ports["metrics"], config)  # fmt: skip


@dataclass
class Fleet:
    server: RedisProcess
    relay: TcpRelay
    client: redis.Redis
    ns: str
    a: Node
    b: Node
    ca: TinyCA
    key: ec.EllipticCurvePrivateKey
    serial: int = 0x1000

    def store(self, node: str = "edge-c") -> int:
        """Store a new certificate for the shared key as `node`'s renewal does and
        announce it (from a third node: both daemons here deploy it, neither
        stored it itself); returns its serial."""
        self.serial += 1
        now = time.time()
        leaf = self.ca.leaf(self.key, [DOMAIN], now - 60, now + 30 * 86400, serial=self.serial)
        store = RedisStorage(self.client, self.ns)
        install_generation(store, "www", leaf, [self.ca.intermediate], now, None)
        publish_changed(self.client, self.ns, "www", format(self.serial, "x"), None, node)
        return self.serial


def fleet_of(tmp_path: Path, b_key: bytes | None = None) -> Iterator[Fleet]:
    if not redis_available():
        pytest.fail("redis-server is not installed (scripts/setup.sh installs it)")
    server = RedisProcess(tmp_path / "redis").start()
    relay = TcpRelay(server.port).start()
    ns = "t" + os.urandom(6).hex()
    secret = tmp_path / "fleet.secret"
    secret.write_bytes(os.urandom(32))
    secret.chmod(0o600)
    key = ec.generate_private_key(ec.SECP256R1())
    nodes: list[Node] = []
    client = redis.Redis.from_url(server.url)
    try:
        a = make_node("edge-a", tmp_path / "a", server.url, ns, secret, key_pem(key))
        nodes.append(a)
        b = make_node("edge-b", tmp_path / "b", relay.url, ns, secret, b_key or key_pem(key))
        nodes.append(b)
        fleet = Fleet(server, relay, client, ns, a, b, TinyCA(), key)
        fleet.store()  # before the daemons start: nothing is due to order
        a.start()
        b.start()
        yield fleet
    finally:
        for n in nodes:
            n.stop()
            n.haproxy.stop()
        relay.stop()
        client.close()
        server.stop()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    yield from fleet_of(tmp_path)


def test_a_stored_certificate_is_served_by_both_nodes_and_b_catches_up_after_a_restart_and_a_cut(
    fleet: Fleet,
) -> None:
    first = fleet.serial
    for node in (fleet.a, fleet.b):
        wait_for(f"{node.name} serving serial {first:x}", lambda n=node: n.served_serial() == first)  # type: ignore[misc]
    # Fan-out: stored by another node (its message), served by both.
    second = fleet.store()
    for node in (fleet.a, fleet.b):
        wait_for(f"{node.name} serving {second:x}", lambda n=node: n.served_serial() == second)  # type: ignore[misc]
    assert "fleet: certificate www: deployed stored serial" in fleet.b.log()
    # Heartbeats carry what each HAProxy serves: in sync everywhere.
    wait_for(
        "in-sync metrics",
        lambda: 'haproxy_acme_fleet_node_in_sync{certificate="www",node="edge-b"} 1.0'
        in fleet.a.metrics(),
    )
    assert "haproxy_acme_fleet_nodes 2.0" in fleet.a.metrics()
    assert 'haproxy_acme_fleet_redis_up{node="edge-b"} 1.0' in fleet.b.metrics()

    doc = fleet.a.status()
    for name in ("edge-a", "edge-b"):
        (row,) = [n for n in doc["nodes"] if n["node"] == name]
        assert row["alive"] and row["certificates"]["www"] == {
            "served_serial": f"{second:x}", "stored_serial": f"{second:x}",
            "in_sync": True, "key_mismatch": False, "next_key_pin": None,  # no next_key
        }  # fmt: skip

    # B down while a new certificate is stored: it catches up when it starts.
    fleet.b.stop()
    third = fleet.store()
    wait_for("A serving the third", lambda: fleet.a.served_serial() == third)
    assert fleet.b.served_serial() == second  # nobody deployed it to B's HAProxy
    (row,) = [n for n in fleet.a.status()["nodes"] if n["node"] == "edge-b"]
    assert not row["alive"] and row["certificates"]["www"]["in_sync"] is None  # listed, dead
    text = fleet.a.status_text()
    assert "node edge-b: DEAD" in text and f"www: serves {third:x} (the stored serial)" in text
    fleet.b.start()
    wait_for("B caught up after its restart", lambda: fleet.b.served_serial() == third)

    # B cut off from Redis: the message is lost to it; restored, it catches up.
    fleet.relay.cut()
    wait_for(
        "B seeing Redis down",
        lambda: 'haproxy_acme_fleet_redis_up{node="edge-b"} 0.0' in fleet.b.metrics(),
    )
    fourth = fleet.store()
    wait_for("A serving the fourth", lambda: fleet.a.served_serial() == fourth)
    assert fleet.b.served_serial() == third  # still serving what it has
    fleet.relay.restore()
    wait_for("B caught up after the link came back", lambda: fleet.b.served_serial() == fourth)
    wait_for(
        "B seeing Redis up",
        lambda: 'haproxy_acme_fleet_redis_up{node="edge-b"} 1.0' in fleet.b.metrics(),
    )


def test_a_token_b_never_heard_of_is_answered_through_bs_haproxy_and_a_flood_is_bounded(
    fleet: Fleet,
) -> None:
    token = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA"
    keyauth = token + ".9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI"
    # Added on A the way the registry adds (A's mirror has it), but the pub/sub
    # message is dropped: written to the hash only, so B's mirror misses it.
    registry_key = f"{fleet.ns}:challenges"
    fleet.client.hset(registry_key, token, json.dumps({"k": keyauth, "e": time.time() + 600}))
    assert fleet.b.challenge(token) == keyauth  # B's SPOA fetched it, HAProxy got a late ACK
    # And one added by a registry (with its message) is answered by B too.
    reg = RedisChallengeRegistry(redis.Redis.from_url(fleet.server.url), fleet.ns)
    try:
        other = "Zm9vYmFyYmF6cXV4cXV1eHF1dXhxdXV4cXV1eA"
        reg.add(other, other + ".thumb", time.time() + 600)
        assert fleet.b.challenge(other) == other + ".thumb"
    finally:
        reg.close()

    def hgets() -> int:
        stats = fleet.client.info("commandstats")
        return int(stats.get("cmdstat_hget", {}).get("calls", 0))  # type: ignore[union-attr]

    # A flood of unknown tokens through B's HAProxy: each falls through to the
    # site, and the HGETs stay within the registry's budget.
    before, started = hgets(), time.monotonic()
    for i in range(400):
        body = fleet.b.challenge(f"flood{i:04d}" + "x" * 30)
        assert body.startswith("site:"), body
    for _ in range(100):
        assert fleet.b.challenge("same" + "y" * 30).startswith("site:")
    elapsed = time.monotonic() - started
    made = hgets() - before
    burst, rate = RedisChallengeRegistry.FETCH_BURST, RedisChallengeRegistry.FETCH_RATE
    assert made <= burst + rate * elapsed + 1, (made, elapsed)
    assert made < 400  # not one HGET per unknown token


def test_a_node_whose_key_differs_refuses_and_says_so_while_a_is_unaffected(
    tmp_path: Path,
) -> None:
    other_key = key_pem(ec.generate_private_key(ec.SECP256R1()))
    for fleet in fleet_of(tmp_path, b_key=other_key):
        first = fleet.serial
        wait_for("A serving the stored certificate", lambda: fleet.a.served_serial() == first)  # noqa: B023
        wait_for(
            "B's key mismatch metric",
            lambda: 'haproxy_acme_fleet_key_mismatch{certificate="www",node="edge-b"} 1.0'
            in fleet.b.metrics(),  # noqa: B023
        )
        second = fleet.store()
        wait_for("A serving the new one", lambda: fleet.a.served_serial() == second)  # noqa: B023
        assert 'haproxy_acme_fleet_key_mismatch{certificate="www",node="edge-a"} 0.0' in (
            fleet.a.metrics()
        )
        # B keeps serving what it had (the throwaway default), never a bundle with a wrong key.
        assert fleet.b.served_serial() not in (first, second)
        log = fleet.b.log()
        assert re.search(r"node edge-b refuses to deploy certificate www", log), log[-3000:]
        assert fleet.b.proc is not None and fleet.b.proc.poll() is None  # still running
