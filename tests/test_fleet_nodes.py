"""Node heartbeats (TTL keys), `status --json` listing the fleet's nodes, and the
"certificate changed" fan-out message: against a real redis-server, waits bounded."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from agent.cli import main
from agent.fleet import ChangeListener, Heartbeat, beat, list_nodes, publish_changed
from tests.support.redis import redis_available, shared_redis


def eventually(check: Callable[[], bool], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    for _ in range(10_000):
        if check():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return False


@pytest.fixture
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis.Redis]:
    if not redis_available():
        pytest.fail("redis-server is not installed (scripts/setup.sh installs it)")
    c = redis.Redis.from_url(shared_redis(tmp_path_factory).url)
    yield c
    c.close()


def _ns() -> str:
    return "t" + os.urandom(8).hex()


def test_a_node_is_alive_while_it_beats_and_dead_after_its_ttl(client: redis.Redis) -> None:
    ns = _ns()
    beat(client, ns, "edge-a", {"www": "abc1"}, ttl=0.3)
    beat(client, ns, "edge-b", {}, ttl=60)
    nodes = list_nodes(client, ns)
    assert [(n["node"], n["alive"]) for n in nodes] == [("edge-a", True), ("edge-b", True)]
    assert nodes[0]["serials"] == {"www": "abc1"} and nodes[0]["pid"] == os.getpid()
    assert eventually(lambda: not list_nodes(client, ns)[0]["alive"])
    dead = list_nodes(client, ns)[0]
    assert dead == {"node": "edge-a", "alive": False, "seen": None, "serials": {}}
    assert list_nodes(client, _ns()) == []  # another namespace: another fleet


def test_the_heartbeat_thread_keeps_beating_and_stop_removes_the_node(
    client: redis.Redis,
) -> None:
    ns = _ns()
    calls = threading.Event()

    def serials() -> dict[str, str | None]:
        calls.set()
        return {"www": "01"}

    hb = Heartbeat(client, ns, "edge-a", serials, interval=0.05, ttl=0.3).start()
    try:
        first = None
        assert eventually(
            lambda: bool(list_nodes(client, ns)) and list_nodes(client, ns)[0]["alive"]
        )
        first = list_nodes(client, ns)[0]["seen"]
        # Several TTLs later it is still alive: the beats renewed it.
        assert eventually(lambda: list_nodes(client, ns)[0]["seen"] > first + 0.6)
        assert list_nodes(client, ns)[0]["alive"] and calls.is_set()
    finally:
        hb.stop()
    assert list_nodes(client, ns)[0]["alive"] is False


def test_status_json_lists_the_fleets_nodes(
    client: redis.Redis, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ns = _ns()
    secret = tmp_path / "fleet.secret"
    secret.write_bytes(os.urandom(32))
    secret.chmod(0o600)
    url = client.connection_pool.connection_kwargs
    config = tmp_path / "config.toml"
    config.write_text(
        'state_dir = "state"\n[acme]\ndirectory = "https://127.0.0.1:14000/dir"\n'
        f'[fleet]\nredis = "redis://{url["host"]}:{url["port"]}/0"\nnamespace = "{ns}"\n'
        'node = "edge-a"\nsecret_file = "fleet.secret"\n'
    )
    beat(client, ns, "edge-a", {}, ttl=60)
    beat(client, ns, "edge-b", {}, ttl=0.001)
    assert eventually(lambda: client.get(f"{ns}:node:edge-b") is None)
    assert main(["status", "--json", "-c", str(config)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["certificates"] == []
    assert [(n["node"], n["alive"]) for n in doc["nodes"]] == [("edge-a", True), ("edge-b", False)]
    assert main(["status", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    assert "node edge-a: alive" in out and "node edge-b: DEAD" in out


def test_a_certificate_changed_message_reaches_every_other_node(client: redis.Redis) -> None:
    ns = _ns()
    got: dict[str, list[tuple[str, str, int | None, str]]] = {"b": [], "c": []}
    listeners = [
        ChangeListener(client, ns, lambda *m, k=k: got[k].append(m)).start()  # type: ignore[misc]
        for k in ("b", "c")
    ]
    try:
        assert all(lst.connected.wait(10) for lst in listeners)
        assert eventually(lambda: client.pubsub_numsub(f"{ns}:certificates")[0][1] == 2)
        client.publish(f"{ns}:certificates", "not json")  # ignored, the listener carries on
        assert publish_changed(client, ns, "www", "0a1b", 7, "edge-a") == 2
        want = [("www", "0a1b", 7, "edge-a")]
        assert eventually(lambda: got["b"] == want and got["c"] == want)
    finally:
        for lst in listeners:
            lst.stop()
