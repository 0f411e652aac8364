"""Three real nodes (HAProxy + agent daemon on 127.0.0.2-4), one real redis-server, one
Pebble whose DNS (challtestsrv `/add-a`) sends each name's validation to a chosen
node: the "Show" list of the fleet issue (tests/support/fleet.py builds it).

Every wait is bounded; the bounds named FANOUT (2 s) are the issue's targets
for "every node serves it", measured from the moment the certificate was
stored (or the link came back).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.certstate import load_meta
from agent.fleet import RedisChallengeRegistry
from agent.store_redis import RedisStorage
from tests.support.fleet import Fleet, FleetNode, wait_until
from tests.support.haproxy import haproxy_binaries
from tests.support.pebble import pebble_binaries

pytestmark = [pytest.mark.integration, pytest.mark.fleet]

FANOUT = 2.0  # s: the issue's bound from "stored" (or "link back") to "served on every node"
RECONCILE = 30.0  # s: [daemon] reconcile_interval of tests/support/fleet.py (the default)
ISSUE_TIMEOUT = 40.0  # s for a first issuance through the whole fleet (generous under load)
B_NAME, C_NAME = "b.fleet.test", "c.fleet.test"
WWW = {"name": "www", "domains": [B_NAME, C_NAME]}

# Most scenarios run on one HAProxy and one Pebble (the first of each list); the
# headline one runs on the conftest's sampled HAProxy x Pebble matrix.
HAPROXY = haproxy_binaries()[0][1]
PEBBLE = pebble_binaries()[0][1]


@contextlib.contextmanager
def fleet_of(tmp_path: Path, **kwargs: Any) -> Iterator[Fleet]:
    kwargs.setdefault("pebble_binary", PEBBLE)
    certificates = kwargs.pop("certificates", [WWW])
    binary = kwargs.pop("haproxy_binary", HAPROXY)
    fleet = Fleet(tmp_path / "fleet", binary, certificates, **kwargs)
    fleet.start(start_agents=False)
    try:
        yield fleet
    finally:
        fleet.stop()


def store(fleet: Fleet) -> RedisStorage:
    return RedisStorage(fleet.redis_client(), fleet.namespace)


def stored_serial(fleet: Fleet, cert: str = "www") -> int | None:
    meta = load_meta(store(fleet), cert)
    return int(meta.serial, 16) if meta is not None and meta.serial else None


def logs(fleet: Fleet) -> str:
    return "\n".join(f"--- node {n.name} ---\n{n.log_tail(2500)}" for n in fleet)


def serves(node: FleetNode, serial: int | None, domain: str = B_NAME) -> bool:
    return serial is not None and node.served_serial(domain) == serial


def issue_first(fleet: Fleet, on: str = "a") -> int:
    """Issue `www` with only node `on`'s agent running (names pointed at it): the
    certificate every later step renews. Returns its serial."""
    fleet.point(B_NAME, on)
    fleet.point(C_NAME, on)
    fleet[on].start_agent()
    wait_until(
        f"node {on} serves a certificate for {B_NAME}",
        lambda: fleet[on].served_serial(B_NAME) is not None,
        ISSUE_TIMEOUT, logs=lambda: logs(fleet),
    )  # fmt: skip
    serial = stored_serial(fleet)
    assert serial is not None and fleet[on].served_serial(B_NAME) == serial
    return serial


def start_rest(fleet: Fleet, serial: int, started: str = "a") -> None:
    """Start the other agents; each pushes the stored certificate to its own HAProxy."""
    others = [n for n in fleet.nodes if n != started]
    fleet.start_agents(others)
    for n in others:
        wait_serves(fleet, fleet[n], serial, ISSUE_TIMEOUT)


def force_renew(node: FleetNode, cert: str = "www") -> dict[str, Any]:
    """`renew --force CERT` on `node`, handed to its daemon; the result row."""
    cp = node.cli("renew", "--force", cert)
    assert cp.returncode == 0, cp.stdout + cp.stderr + node.log_tail()
    return {"stdout": cp.stdout}


def wait_serves(fleet: Fleet, node: FleetNode, serial: int, bound: float, what: str = "") -> None:
    def check() -> bool:
        return serves(node, serial)

    wait_until(f"node {node.name} serves serial {serial:x} {what}", check, bound, poll=0.01,
               logs=lambda: logs(fleet))  # fmt: skip


def wait_all_serve(fleet: Fleet, serial: int, bound: float, what: str = "") -> None:
    for node in fleet:
        wait_serves(fleet, node, serial, bound, what)


# --- A orders, B and C are validated, everyone serves -------------------------------------


def test_node_a_orders_pebble_validates_on_b_and_c_and_every_node_serves_it(
    tmp_path: Path, haproxy_bin: str, pebble_bin: str
) -> None:
    with fleet_of(tmp_path, haproxy_binary=haproxy_bin, pebble_binary=pebble_bin) as fleet:
        first = issue_first(fleet, "a")
        start_rest(fleet, first)
        # From now on the CA's validation for each name reaches B or C, never A.
        fleet.point(B_NAME, "b")
        fleet.point(C_NAME, "c")
        names = {"b": B_NAME, "c": C_NAME}
        for _ in range(3):
            before = {n.name: n.answered_tokens() for n in fleet}
            asked_before = {n: fleet.validated_tokens(d) for n, d in names.items()}
            orders = fleet.orders_placed()
            force_renew(fleet["a"])
            stored_at = time.monotonic()
            second = stored_serial(fleet)
            assert second is not None and second != first
            assert fleet.orders_placed() == orders + 1
            asked = {n: fleet.validated_tokens(d) - asked_before[n] for n, d in names.items()}
            if all(asked.values()):
                break
            # Pebble reused a name's valid authorization (1 time in 100 even with
            # PEBBLE_AUTHZREUSE=0): nothing to trace for it, so renew once more.
            first = second
        else:
            raise AssertionError(f"Pebble validated no name in 3 orders: {asked}")
        # The HAProxy logs prove where Pebble's validation went: each name's
        # tokens were answered by its own node, none by A.
        new = {n.name: n.answered_tokens() - before[n.name] for n in fleet}
        assert new["a"] == set(), new
        assert new["b"] == asked["b"] and new["c"] == asked["c"], (new, asked)
        assert not (new["b"] & new["c"]), new
        # Every node serves the new serial, by a real handshake on its own address.
        remaining = FANOUT - (time.monotonic() - stored_at)
        wait_all_serve(fleet, second, max(remaining, 0.0), "within 2 s of being stored")


# --- all due at once: one order ------------------------------------------------------------


def test_three_nodes_due_at_the_same_moment_place_exactly_one_order(tmp_path: Path) -> None:
    # 30-second certificates: renewed when 1/3 is left, at the same moment on
    # every node (they read the same stored metadata). The first one is issued
    # with node a alone: agents start one after the other, and a first order
    # placed before the others answer challenges would fail validation there.
    with fleet_of(tmp_path, validity_period=30) as fleet:
        first = issue_first(fleet, "a")
        fleet.point(B_NAME, "b", "c")
        fleet.point(C_NAME, "c", "b")
        fleet.start_agents(["b", "c"])
        wait_all_serve(fleet, first, ISSUE_TIMEOUT)
        assert fleet.orders_placed() == 1, logs(fleet)
        # The renewal, 20 s after issuance, due on all three nodes at once.
        wait_until("the renewal", lambda: stored_serial(fleet) not in (None, first), 40,
                   logs=lambda: logs(fleet))  # fmt: skip
        second = stored_serial(fleet)
        assert second is not None
        wait_all_serve(fleet, second, ISSUE_TIMEOUT)
        assert fleet.orders_placed() == 2, fleet.pebble.log_text()[-3000:]


# --- a node dies or freezes in the middle of an order ------------------------------------


def wait_order_holder(fleet: Fleet, timeout: float = 40.0) -> FleetNode:
    """Poll Redis (2 ms) until some node's order has put its challenge token into the
    shared registry (placed, not finished); return the node holding the certificate's
    lock (found by the PID in the lock record). Whenever the lock changes hands the
    names are pointed at the other nodes at once (the lock is taken before newOrder,
    so before the CA validates): the validation never needs the node a test is
    about to kill or pause."""
    client = fleet.redis_client()
    challenges = f"{fleet.namespace}:challenges"
    lock = f"{fleet.namespace}:lock:cert-www"
    by_pid = {node.pid: node for node in fleet if node.running}
    pointed_away: FleetNode | None = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        raw = client.get(lock)
        holder = by_pid.get(json.loads(raw).get("pid")) if raw is not None else None
        if holder is not None and holder is not pointed_away:
            point_at_the_others(fleet, holder)
            pointed_away = holder
        if holder is not None and client.hlen(challenges):
            return holder
        time.sleep(0.002)
    raise AssertionError(f"no node placed an order in {timeout} s:\n{logs(fleet)}")


def lock_lease(fleet: Fleet) -> float:
    return max(30.0, fleet.acme_timeout * 2)  # agent.renewal.Renewer.lease


@contextlib.contextmanager
def renewal_in_flight(tmp_path: Path) -> Iterator[tuple[Fleet, int, FleetNode, int]]:
    """A fleet of 30-second certificates whose renewal falls due on all three nodes at
    once: yields (fleet, first serial, the node holding the order mid-way, orders so far
    not counting that one)."""
    with fleet_of(tmp_path, validity_period=30) as fleet:
        first = issue_first(fleet, "a")
        start_rest(fleet, first)
        fleet.point(B_NAME, "b", "c", "a")
        fleet.point(C_NAME, "c", "b", "a")
        orders = fleet.orders_placed()
        holder = wait_order_holder(fleet)
        yield fleet, first, holder, orders


def point_at_the_others(fleet: Fleet, away: FleetNode) -> None:
    """The CA's validation must not reach a node whose agent is gone."""
    others = [n.name for n in fleet if n is not away]
    fleet.point(B_NAME, *others)
    fleet.point(C_NAME, *reversed(others))


def test_ordering_node_killed_mid_order_another_node_completes_that_order(
    tmp_path: Path,
) -> None:
    with renewal_in_flight(tmp_path) as (fleet, first, holder, orders):
        holder.kill_agent()
        # Another node completes the order left in flight (resumed or reused, not a
        # second newOrder), once the dead holder's lease ran out.
        wait_until(
            f"another node installs the order node {holder.name} left",
            lambda: stored_serial(fleet) not in (None, first),
            lock_lease(fleet) + 20, poll=0.1, logs=lambda: logs(fleet),
        )  # fmt: skip
        second = stored_serial(fleet)
        assert second is not None
        assert fleet.orders_placed() == orders + 1, "a second order was placed\n" + logs(fleet)
        for node in fleet:
            if node is not holder:
                wait_serves(fleet, node, second, 10)


def test_a_paused_ordering_node_cannot_install_its_stale_result(tmp_path: Path) -> None:
    with renewal_in_flight(tmp_path) as (fleet, first, holder, _):
        holder.pause_agent()
        # Its lease runs out; another node takes the certificate over and installs one.
        wait_until(
            "another node installs a certificate",
            lambda: stored_serial(fleet) not in (None, first),
            lock_lease(fleet) + 20, poll=0.1, logs=lambda: logs(fleet),
        )  # fmt: skip
        winner = stored_serial(fleet)
        assert winner is not None
        holder.resume_agent()
        # The paused node wakes up with its stale order: whatever it does, it installs
        # nothing over the newer certificate, and every node serves the winner.
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            assert stored_serial(fleet) == winner, logs(fleet)
            time.sleep(0.2)
        wait_all_serve(fleet, winner, 10)
        assert stored_serial(fleet) == winner


# --- Redis stopped, back, emptied --------------------------------------------------------


def get_challenge(node: FleetNode, token: str) -> tuple[int, str]:
    url = f"http://{node.address}:{node.http_port}/.well-known/acme-challenge/{token}"
    req = urllib.request.Request(url, headers={"Host": B_NAME})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""


def answers(node: FleetNode, token: str) -> bool:
    return get_challenge(node, token)[0] == 200


def degraded(node: FleetNode) -> bool:
    """/healthz names the degraded state and its reason (Redis)."""
    got = node.healthz()
    return got is not None and "degraded" in got[1].lower() and "redis" in got[1].lower()


def healthy(node: FleetNode) -> bool:
    got = node.healthz()
    return got is not None and got[0] == 200 and "degraded" not in got[1].lower()


def test_redis_stopped_nodes_keep_serving_are_degraded_and_renew_once_it_is_back(
    tmp_path: Path,
) -> None:
    # 30-second certificates: the renewal falls due while Redis is away.
    with fleet_of(tmp_path, validity_period=30, redis_appendonly=True) as fleet:
        first = issue_first(fleet, "a")
        start_rest(fleet, first)
        fleet.point(B_NAME, "b", "c")
        fleet.point(C_NAME, "c", "b")
        # A token "another node" added: mirrored on every node before Redis goes.
        token = "fleetMirrored" + os.urandom(8).hex()
        registry = RedisChallengeRegistry(fleet.redis_client(), fleet.namespace, start=False)
        registry.add(token, token + ".thumb", time.time() + 300)
        for node in fleet:
            wait_until(f"node {node.name} answers the token",
                       functools.partial(answers, node, token), 5)  # fmt: skip
        orders = fleet.orders_placed()
        fleet.redis.stop()
        for node in fleet:
            wait_until(f"node {node.name} /healthz says degraded (Redis)",
                       functools.partial(degraded, node), 10, poll=0.2,
                       logs=lambda: logs(fleet))  # fmt: skip
            assert serves(node, first)
            assert get_challenge(node, token) == (200, token + ".thumb")
        # Past the renewal time (20 s after issuance), still no order: none can be locked.
        time.sleep(22)
        assert fleet.orders_placed() == orders
        for node in fleet:
            assert serves(node, first)
        fleet.redis.start()
        wait_until("the renewal after Redis is back", lambda: stored_serial(fleet) != first,
                   30, poll=0.2, logs=lambda: logs(fleet))  # fmt: skip
        second = stored_serial(fleet)
        assert second is not None
        wait_all_serve(fleet, second, 15)
        for node in fleet:
            wait_until(f"node {node.name} healthy again", functools.partial(healthy, node), 10)


def test_redis_restarted_empty_no_new_orders_for_valid_certificates(tmp_path: Path) -> None:
    with fleet_of(tmp_path) as fleet:  # no persistence: a restart loses everything
        first = issue_first(fleet, "a")
        start_rest(fleet, first)
        orders = fleet.orders_placed()
        run_id = fleet.redis_client().info("server")["run_id"]
        fleet.redis.kill()
        fleet.redis.start()
        # A new server that loaded nothing (the nodes' heartbeats may already be back,
        # so the key count is no proof).
        client = fleet.redis_client()
        assert client.info("server")["run_id"] != run_id
        assert client.info("persistence").get("rdb_last_load_keys_loaded", 0) == 0
        # The fleet rebuilds its shared state from what the nodes hold...
        # (at the latest at each node's next reconcile pass: 30 s in this fixture)
        wait_until("the certificate back in Redis", lambda: stored_serial(fleet) == first,
                   RECONCILE + 20, poll=0.2, logs=lambda: logs(fleet))  # fmt: skip
        # ...and a node that starts now finds it there: no storm of new orders.
        fleet["b"].stop_agent()
        fleet["b"].start_agent()
        time.sleep(6)  # three reconcile intervals
        assert fleet.orders_placed() == orders, fleet.pebble.log_text()[-2000:]
        for node in fleet:
            assert serves(node, first)


# --- a node cut off from Redis catches up -------------------------------------------------


def test_a_node_cut_off_from_redis_catches_up_within_2s_of_the_link_coming_back(
    tmp_path: Path,
) -> None:
    with fleet_of(tmp_path) as fleet:
        first = issue_first(fleet, "a")
        start_rest(fleet, first)
        fleet.point(B_NAME, "b")
        fleet.point(C_NAME, "c")
        relay = fleet["a"].relay
        assert relay is not None
        relay.cut()
        force_renew(fleet["b"])
        second = stored_serial(fleet)
        assert second is not None and second != first
        for n in ("b", "c"):
            wait_serves(fleet, fleet[n], second, FANOUT)
        time.sleep(1)
        assert serves(fleet["a"], first)  # cut off: it cannot know yet
        relay.restore()
        wait_until("node a catches up", lambda: serves(fleet["a"], second), FANOUT, poll=0.01,
                   logs=lambda: logs(fleet))  # fmt: skip


# --- Sentinel failover ----------------------------------------------------------------------


def test_after_a_sentinel_failover_the_next_renewal_succeeds_on_the_new_primary(
    tmp_path: Path,
) -> None:
    with fleet_of(tmp_path, validity_period=30, sentinel=True) as fleet:
        assert fleet.replica is not None and fleet.sentinel is not None
        first = issue_first(fleet, "a")
        start_rest(fleet, first)
        fleet.point(B_NAME, "b", "c")
        fleet.point(C_NAME, "c", "b")
        import redis

        replica = redis.Redis(host="127.0.0.1", port=fleet.replica.port, socket_timeout=5)
        wait_until("the replica has the certificate",
                   lambda: bool(replica.zcard(f"{fleet.namespace}:index")), 10)  # fmt: skip
        fleet.redis.kill()
        sentinel = redis.Redis(host="127.0.0.1", port=fleet.sentinel.port, socket_timeout=5)
        wait_until(
            "Sentinel promotes the replica",
            lambda: promoted(sentinel, fleet.replica),
            20, poll=0.2,
        )  # fmt: skip
        # A lock taken on the old primary just before it died is still on the
        # replica: the renewal may wait for that lease to end.
        wait_until("the renewal on the new primary",
                   lambda: _serial_in(replica, fleet) not in (None, first),
                   lock_lease(fleet) + 30, poll=0.2, logs=lambda: logs(fleet))  # fmt: skip
        second = _serial_in(replica, fleet)
        assert second is not None
        wait_all_serve(fleet, second, 15)


def promoted(sentinel: Any, replica: Any) -> bool:
    addr = sentinel.sentinel_get_master_addr_by_name("fleet")
    return bool(addr) and int(addr[1]) == replica.port


def _serial_in(client: Any, fleet: Fleet) -> int | None:
    meta = load_meta(RedisStorage(client, fleet.namespace), "www")
    return int(meta.serial, 16) if meta is not None and meta.serial else None


# --- a node with another key refuses ------------------------------------------------------


def test_a_node_with_a_different_local_key_refuses_to_deploy_and_says_so(
    tmp_path: Path,
) -> None:
    from tests.support.certs import key_pem, make_key

    with fleet_of(tmp_path) as fleet:
        fleet["c"].provision_key("www", key_pem(make_key()))  # the operator got C wrong
        first = issue_first(fleet, "a")
        fleet.start_agents(["b", "c"])
        wait_until("node b serves it", lambda: serves(fleet["b"], first), ISSUE_TIMEOUT,
                   logs=lambda: logs(fleet))  # fmt: skip
        c = fleet["c"]
        # C reports the mismatch (certificate and node named, and in a metric)...
        wait_until(
            "node c reports the key mismatch",
            lambda: any(
                "key" in k and 'certificate="www"' in k and v > 0
                for k, v in c.metrics().items()
                if k.startswith("haproxy_acme_")
            ),
            15, poll=0.2, logs=lambda: logs(fleet),
        )  # fmt: skip
        assert "www" in c.log_tail(20000) and c.node_name in c.log_tail(20000)
        # ...serves its fallback, orders nothing with its own key, and A and B are unaffected.
        time.sleep(4)
        assert c.served_serial(B_NAME) is None
        assert fleet.orders_placed() == 1, "node c ordered a certificate for its own key"
        assert stored_serial(fleet) == first
        assert serves(fleet["a"], first) and serves(fleet["b"], first)
        status = json.dumps(c.status_json())
        assert "edge-c" in status


# --- a key switch waits for every node to hold the next key ------------------------------


def test_a_key_switch_waits_until_every_live_node_holds_the_next_key(tmp_path: Path) -> None:
    from tests.support.certs import key_pem, make_key

    # One next key file at one path, as an operator copies it to every node; C's
    # config does not name it yet (its roll-out lags), so C cannot serve it.
    shared = tmp_path / "keys"
    shared.mkdir(mode=0o700)
    next_key = shared / "www.next.key"
    fd = os.open(next_key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem(make_key()))
    www = {**WWW, "next_key": next_key, "announce_for": "1s"}
    with fleet_of(tmp_path, certificates=[www]) as fleet:
        a, c = fleet["a"], fleet["c"]
        c.cert_extra["www"] = {"next_key": None}
        first = issue_first(fleet, "a")
        start_rest(fleet, first)
        old_pin = a.served_pin(B_NAME)
        cp = a.cli("pins", "--json")
        assert cp.returncode == 0, cp.stdout + cp.stderr
        nxt = json.loads(cp.stdout)[0]["next"]
        assert nxt is not None and nxt["pin"] != old_pin
        time.sleep(max(0.0, nxt["announced_at"] + 1.05 - time.time()))
        orders = fleet.orders_placed()
        cp = a.cli("keys", "rollover", "www")
        assert cp.returncode == 0, cp.stdout + cp.stderr

        def waiting() -> str:
            kr = a.status_json()["certificates"][0]["key_rollover"]
            return str(kr.get("waiting") or "")

        def waiting_gauge(node: FleetNode) -> float | None:
            found = [v for k, v in node.metrics().items()
                     if k.startswith("haproxy_acme_key_rollover_waiting{")
                     and 'certificate="www"' in k]  # fmt: skip
            return found[0] if found else None

        wait_until("A's status says the switch waits for node c",
                   lambda: c.node_name in waiting(), 15, poll=0.5,
                   logs=lambda: logs(fleet))  # fmt: skip
        wait_until("A's metric says the switch waits", lambda: waiting_gauge(a) == 1.0, 15,
                   poll=0.5, logs=lambda: logs(fleet))  # fmt: skip
        assert a.node_name not in waiting() and fleet["b"].node_name not in waiting()
        time.sleep(4)  # two of the daemons' re-checks (retry_base 2 s): still waiting
        assert fleet.orders_placed() == orders, "the switch went while node c lacked the key"
        assert all(n.served_pin(B_NAME) == old_pin for n in fleet)
        assert "do not hold the next key" in a.log_tail(20000) + fleet["b"].log_tail(20000)
        # C's config catches up and its agent restarts: the switch goes, and every
        # node serves the leaf for the next key.
        c.cert_extra["www"] = {}
        c.stop_agent()
        c.start_agent()
        wait_until(
            "every node serves a leaf for the next key",
            lambda: all(n.served_pin(B_NAME) == nxt["pin"] for n in fleet),
            60, poll=0.2, logs=lambda: logs(fleet),
        )  # fmt: skip
        assert fleet.orders_placed() == orders + 1
        assert waiting() == ""
        wait_until("no node's metric says a switch waits",
                   lambda: all(waiting_gauge(n) in (0.0, None) for n in fleet), 40, poll=0.5,
                   logs=lambda: logs(fleet))  # fmt: skip


# --- a single node moves into the fleet without re-issuing -------------------------------


def test_a_single_node_joins_the_fleet_and_nothing_is_issued_again(tmp_path: Path) -> None:
    from agent.storage import FileStorage

    with fleet_of(tmp_path) as fleet:
        a = fleet["a"]
        a.solo = True  # a node that ran alone: file storage, no Redis
        fleet.point(B_NAME, "a")
        fleet.point(C_NAME, "a")
        a.start_agent()
        wait_until("the single node serves its certificate",
                   lambda: a.served_serial(B_NAME) is not None, ISSUE_TIMEOUT,
                   logs=lambda: logs(fleet))  # fmt: skip
        meta = load_meta(FileStorage(a.state_dir), "www")
        assert meta is not None and meta.serial
        serial = int(meta.serial, 16)
        assert stored_serial(fleet) is None  # nothing in Redis yet
        a.stop_agent()
        a.solo = False
        a.write_config()
        cp = a.cli("fleet-join")
        assert cp.returncode == 0, cp.stdout + cp.stderr
        assert f"copied www: serial {meta.serial}" in cp.stdout and "copied (" in cp.stdout
        again = a.cli("fleet-join")
        assert again.returncode == 0 and "skipped www" in again.stdout, again.stdout
        assert stored_serial(fleet) == serial
        # The whole fleet starts on the joined state: every node serves it, none orders.
        fleet.start_agents()
        wait_all_serve(fleet, serial, ISSUE_TIMEOUT)
        time.sleep(3)
        assert fleet.orders_placed() == 1 and fleet.accounts_created() == 1
        # The next renewal, on another node, uses the joined account.
        fleet.point(B_NAME, "b")
        fleet.point(C_NAME, "c")
        force_renew(fleet["b"])
        assert fleet.orders_placed() == 2
        assert fleet.accounts_created() == 1, "the fleet made a new ACME account"
