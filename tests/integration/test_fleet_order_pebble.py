"""One order per certificate across a fleet, against real Pebble, HAProxy and redis-server.

Several renewer processes ("nodes": each its own process, config and node name,
all sharing one Redis and the same key file, as an operator provisions them)
run the real `Renewer` through the composition root. One SPOE agent in the test
process answers HAProxy from the shared Redis registry, so whichever node placed
the order, Pebble's validation through HAProxy finds the token. Pebble is reached
through a proxy that counts the requests and can hold one (tests/support/fault_proxy).

- three nodes find the certificate due at once: exactly one newOrder reaches Pebble;
- the ordering node is SIGKILLed after placing the order (its finalize held):
  the next node resumes that very order (the same order URL) and installs;
- a node paused (SIGSTOP) past its lease, resumed (SIGCONT) after another node
  installed: its install is refused, naming the certificate and the node.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from agent import keys, layout
from agent.agent_health import mark_agent_up
from agent.certstate import load_meta
from agent.config import parse_listen
from agent.fleet import RedisChallengeRegistry
from agent.spoa import SpoaThread
from agent.store_redis import RedisStorage
from tests.support.acme_stack import AcmeStack, toml_value
from tests.support.fault_proxy import FaultProxy
from tests.support.haproxy import haproxy_binaries, stop_process
from tests.support.pebble import pebble_binaries
from tests.support.redis import RedisProcess, redis_available

REPO = Path(__file__).resolve().parents[2]
DOMAIN = "www.fleet.test"
LEASE = 3.0  # s: the nodes' lock lease (short, so a paused node loses it quickly)

# One node: a real Renewer with the config's Redis store and registry, and a
# short lease. Prints its results as JSON; exit 0 whatever they are.
NODE = textwrap.dedent(
    """\
    import json, sys
    from agent import wiring
    from agent.config import load_config
    from agent.deploy import RenewalDeployHook
    from agent.renewal import Renewer

    class Node(Renewer):
        lease = float(sys.argv[2])

    config = load_config(sys.argv[1])
    storage, registry = wiring.make_storage(config), wiring.make_registry(config)
    hook = RenewalDeployHook(config) if sys.argv[3] == "deploy" else None
    try:
        results = Node(config, registry, storage, on_installed=hook).run(None, False, False)
    finally:
        registry.close()
    print(json.dumps([r.__dict__ for r in results]))
    """
)


class Fleet:
    def __init__(self, tmp_path: Path, stack: AcmeStack, proxy: FaultProxy, url: str) -> None:
        self.tmp_path, self.stack, self.proxy, self.url = tmp_path, stack, proxy, url
        self.ns = "fleet" + os.urandom(4).hex()
        self.secret = tmp_path / "fleet.secret"
        self.secret.write_bytes(os.urandom(32))
        self.secret.chmod(0o600)
        self.key = tmp_path / "www.key"  # the same key on every node
        keys.create_key_file(self.key, "ec256")
        self.procs: list[subprocess.Popen[str]] = []

    def config(self, node: str) -> Path:
        path = self.tmp_path / f"{node}.toml"
        self.stack.write_config(
            path,
            [{"name": "www", "domains": [DOMAIN], "key": self.key}],
            state_dir=self.tmp_path / f"state-{node}",
            directory=self.proxy.directory_url,
            ca_bundle=self.proxy.ca_bundle,
        )
        fleet = {"redis": self.url, "namespace": self.ns, "node": node,
                 "secret_file": self.secret}  # fmt: skip
        text = path.read_text().replace("[[certificates]]", "[fleet]\n" + "\n".join(
            f"{k} = {toml_value(v)}" for k, v in fleet.items()
        ) + "\n[[certificates]]", 1)  # fmt: skip
        path.write_text(text)
        return path

    def start(self, node: str, deploy: bool = False) -> subprocess.Popen[str]:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen(
            [sys.executable, "-c", NODE, str(self.config(node)), str(LEASE),
             "deploy" if deploy else "none"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=self.tmp_path,
        )  # fmt: skip
        self.procs.append(proc)
        return proc

    @staticmethod
    def results(proc: subprocess.Popen[str]) -> list[dict[str, Any]]:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        return list(json.loads(out.strip().splitlines()[-1]))

    def store(self) -> RedisStorage:
        return RedisStorage(redis.Redis.from_url(self.url), self.ns)

    def new_orders(self) -> int:
        return sum(1 for m, p in self.proxy.seen if m == "POST" and p.startswith("/order-plz"))


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    if not redis_available():
        pytest.fail("redis-server is not installed (scripts/setup.sh installs it)")
    haproxy = haproxy_binaries()[-1][1]
    with (
        AcmeStack(tmp_path / "stack", haproxy, pebble_binary=pebble_binaries()[0][1]) as stack,
        RedisProcess(tmp_path / "redis") as server,
        FaultProxy("127.0.0.1", stack.pebble.acme_port, stack.pebble.ca_bundle,
                   tmp_path / "proxy") as proxy,  # fmt: skip
    ):
        f = Fleet(tmp_path, stack, proxy, server.url)
        # The registry's mirror ends with the fixture, also when the set-up fails.
        registry = RedisChallengeRegistry(redis.Redis.from_url(server.url), f.ns)
        try:
            spoa = SpoaThread(registry, "127.0.0.1", stack.spoa_port)
            spoa.start()
            try:
                assert stack.haproxy.admin_socket is not None
                mark_agent_up(["unix:" + str(stack.haproxy.admin_socket)],
                              parse_listen(f"127.0.0.1:{stack.spoa_port}"), 5.0)  # fmt: skip
                try:
                    yield f
                finally:
                    proxy.release(drop=True)
                    for proc in f.procs:
                        if proc.poll() is None:
                            os.kill(proc.pid, signal.SIGCONT)
                            stop_process(proc, 10)  # type: ignore[arg-type]
            finally:
                spoa.stop()
        finally:
            registry.close()


def _wait(what: str, check: Any, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    for _ in range(int(seconds / 0.05) + 1):
        if check():
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_three_nodes_due_at_once_place_exactly_one_order(fleet: Fleet) -> None:
    procs = [fleet.start(node, deploy=True) for node in ("node-a", "node-b", "node-c")]
    results = [fleet.results(p)[0] for p in procs]
    statuses = sorted(r["status"] for r in results)
    assert statuses.count("renewed") == 1, results
    assert set(statuses) <= {"renewed", "deployed", "not-due"}, results
    assert fleet.new_orders() == 1
    assert fleet.stack.pebble.log_text().count("POST /order-plz") == 1
    meta = load_meta(fleet.store(), "www")
    assert meta is not None and meta.installed and meta.fence is not None
    assert meta.node in ("node-a", "node-b", "node-c")
    assert not fleet.store().exists(layout.order_key("www"))  # cleared on completion


def test_a_node_killed_mid_order_is_taken_over_and_its_order_resumed(fleet: Fleet) -> None:
    fleet.proxy.hold("/finalize-order/")
    first = fleet.start("node-a")
    _wait("node-a's finalize", fleet.proxy.held.is_set)
    record = json.loads(fleet.store().load(layout.order_key("www")))
    assert record["node"] == "node-a" and record["status"] == "ready"
    first.send_signal(signal.SIGKILL)  # after the order is placed, before it is finalized
    first.wait(10)
    fleet.proxy.release(drop=True)  # its finalize never reaches the CA
    second = fleet.start("node-b")
    result = fleet.results(second)[0]
    assert result["status"] == "renewed", result
    assert fleet.new_orders() == 1  # the same order, not a new one
    order_id = record["url"].rsplit("/", 1)[1]
    finals = [p for m, p in fleet.proxy.seen if m == "POST" and p.startswith("/finalize-order/")]
    assert finals[-1].rsplit("/", 1)[1] == order_id
    meta = load_meta(fleet.store(), "www")
    assert meta is not None and meta.node == "node-b"
    assert not fleet.store().exists(layout.order_key("www"))


def test_a_node_paused_past_its_lease_cannot_install_its_stale_result(fleet: Fleet) -> None:
    fleet.proxy.hold("/certZ/")  # node-a's certificate download
    paused = fleet.start("node-a")
    _wait("node-a's certificate download", fleet.proxy.held.is_set)
    paused.send_signal(signal.SIGSTOP)
    store = fleet.store()
    lock_key = store._lkey(layout.cert_lock("www"))
    _wait("node-a's lease to run out", lambda: not store.client.exists(lock_key), 30)
    taker = fleet.start("node-b")
    taken = fleet.results(taker)[0]
    assert taken["status"] == "renewed", taken
    meta = load_meta(store, "www")
    assert meta is not None and meta.node == "node-b"
    paused.send_signal(signal.SIGCONT)
    fleet.proxy.release()  # node-a gets its certificate now, after its lease is gone
    stale = fleet.results(paused)[0]
    assert stale["status"] == "failed" and stale["error_type"] == "fence", stale
    assert "certificate www" in stale["reason"] and "node node-a" in stale["reason"]
    after = load_meta(store, "www")
    assert after is not None and (after.serial, after.node, after.fence) == (
        meta.serial, "node-b", meta.fence,
    )  # fmt: skip
    assert fleet.new_orders() == 1


def test_a_pending_order_left_by_a_killed_node_is_validated_again_by_the_next(
    fleet: Fleet,
) -> None:
    fleet.proxy.hold("/chalZ/")  # node-a's answer to the challenge
    first = fleet.start("node-a")
    _wait("node-a's challenge answer", fleet.proxy.held.is_set)
    record = json.loads(fleet.store().load(layout.order_key("www")))
    assert record["status"] == "pending"
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    fleet.proxy.release(drop=True)  # the CA never heard the answer
    result = fleet.results(fleet.start("node-b"))[0]
    assert result["status"] == "renewed", result
    assert fleet.new_orders() == 1
    answers = [p for m, p in fleet.proxy.seen if m == "POST" and p.startswith("/chalZ/")]
    assert len(answers) == 2  # node-b answered the same challenge again


def test_a_recorded_order_the_ca_does_not_know_is_replaced_by_a_new_one(fleet: Fleet) -> None:
    store = fleet.store()
    url = fleet.proxy.directory_url.replace("/dir", "/my-order/no-such-order")
    # Recorded on the basis the next order has (this key, no certificate yet),
    # so it is asked for: the CA does not know it.
    store.store(layout.order_key("www"), json.dumps({
        "url": url, "status": "pending", "finalize": None, "certificate": None, "node": "gone",
        "fence": 1, "directory": fleet.proxy.directory_url, "domains": [DOMAIN],
        "key_pin": keys.spki_pin(keys.load_private_key(fleet.key)), "base": None,
    }).encode())  # fmt: skip
    result = fleet.results(fleet.start("node-b"))[0]
    assert result["status"] == "renewed", result
    assert ("POST", "/my-order/no-such-order") in fleet.proxy.seen
    assert fleet.new_orders() == 1
    assert not store.exists(layout.order_key("www"))


def test_a_recorded_order_for_another_key_is_not_resumed(fleet: Fleet) -> None:
    # A finished order whose record a kill left behind, finalized for another
    # key: resuming it would bring back a leaf for that key.
    store = fleet.store()
    other = keys.spki_pin(keys.generate_private_key("ec256"))
    store.store(layout.order_key("www"), json.dumps({
        "url": fleet.proxy.directory_url.replace("/dir", "/my-order/old-order"),
        "status": "valid", "finalize": None, "certificate": None, "node": "gone",
        "fence": 1, "directory": fleet.proxy.directory_url, "domains": [DOMAIN],
        "key_pin": other, "base": None,
    }).encode())  # fmt: skip
    result = fleet.results(fleet.start("node-b"))[0]
    assert result["status"] == "renewed", result
    assert not any(p.startswith("/my-order/old-order") for _, p in fleet.proxy.seen)
    assert fleet.new_orders() == 1
    assert not store.exists(layout.order_key("www"))
