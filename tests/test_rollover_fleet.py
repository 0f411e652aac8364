"""A fleet's key switch waits until every live node holds the next key.

The policy (`rollover.switch_hold`) is checked on its own, then through a real
`Renewer` on a real redis-server with heartbeats written as the daemons write
them (agent.fleet.beat, "next_keys"). The whole fleet (three daemons, HAProxy,
Pebble) is in tests/fleet/test_fleet_topology.py.
"""

from __future__ import annotations

import json
import os
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from cryptography.hazmat.primitives import serialization

from agent import keys, rollover
from agent.certstate import load_meta, load_state
from agent.challenges import MemoryChallengeRegistry
from agent.cli import main, pins_of
from agent.config import CertificateConfig, Config, load_config
from agent.fleet import beat
from agent.renewal import Renewer
from agent.wiring import make_storage
from tests.test_renewal import CA, StandInIssuer

T0 = 1_800_000_000.0


# --- the policy -------------------------------------------------------------------------


@pytest.fixture
def next_key(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "www.next.key"
    key = keys.create_key_file(path, "ec256")
    return path, keys.spki_pin(key)


def due_switch(path: Path, pin: str, **kw: Any) -> tuple[CertificateConfig, rollover.KeyState]:
    cfg = CertificateConfig(
        name="www", domains=("a.example.com",), key=Path("/k/a"), next_key=path,
        announce_for=60.0,
    )  # fmt: skip
    ks = rollover.KeyState(
        next=rollover.NextKey(str(path), pin, T0), request=rollover.Request(T0), **kw
    )
    assert rollover.status_of(cfg, ks, T0 + 61).due
    return cfg, ks


def node(name: str, held: dict[str, str | None] | None, alive: bool = True) -> dict[str, Any]:
    n: dict[str, Any] = {"node": name, "alive": alive, "serials": {}}
    if held is not None:
        n["next_keys"] = held
    return n


def test_a_due_switch_goes_when_every_live_node_reports_the_next_keys_pin(
    next_key: tuple[Path, str],
) -> None:
    path, pin = next_key
    cfg, ks = due_switch(path, pin)
    nodes = [node("a", {"www": pin}), node("b", {"www": pin}), node("c", {"www": pin})]
    assert rollover.switch_hold(cfg, ks, T0 + 61, "a", nodes) is None


def test_a_due_switch_waits_naming_each_live_node_without_the_next_key(
    next_key: tuple[Path, str],
) -> None:
    path, pin = next_key
    cfg, ks = due_switch(path, pin)
    other = keys.spki_pin(keys.generate_private_key("ec256"))
    nodes = [
        node("a", {"www": pin}),
        node("b", {"www": None}),  # its config has the path, the file is missing
        node("c", {"www": other}),  # another key at that path
        node("d", None),  # an agent that does not report next keys
        node("e", {}),  # its config names no next key
        node("f", {"www": None}, alive=False),  # dead: not waited for
    ]
    hold = rollover.switch_hold(cfg, ks, T0 + 61, "a", nodes)
    assert hold is not None
    assert "node(s) b, c, d, e do not hold the next key" in hold
    assert str(path) in hold and pin in hold and "f" not in hold.split("key")[0]


def test_this_node_without_its_own_next_key_file_waits_for_itself(
    next_key: tuple[Path, str],
) -> None:
    path, pin = next_key
    cfg, ks = due_switch(path, pin)
    path.unlink()
    hold = rollover.switch_hold(cfg, ks, T0 + 61, "a", [node("b", {"www": pin})])
    assert hold is not None and "node(s) a do not hold" in hold


def test_an_emergency_switch_a_switch_under_way_and_a_switch_not_due_never_wait(
    next_key: tuple[Path, str],
) -> None:
    path, pin = next_key
    lacking = [node("b", {"www": None})]
    cfg, ks = due_switch(path, pin)
    to = rollover.KeyRef(str(path), pin)
    emergency = rollover.KeyState(request=rollover.Request(T0, rollover.EMERGENCY, to))
    assert rollover.status_of(cfg, emergency, T0).due
    assert rollover.switch_hold(cfg, emergency, T0, "a", lacking) is None
    under_way = rollover.Switch(rollover.KeyRef("/k/a", "A" * 43 + "="), to, T0, "scheduled")
    from dataclasses import replace

    assert rollover.switch_hold(cfg, replace(ks, switch=under_way), T0 + 61, "a", lacking) is None
    assert rollover.switch_hold(cfg, ks, T0 + 59, "a", lacking) is None  # announced 59 s of 60
    assert rollover.switch_hold(cfg, None, T0 + 61, "a", lacking) is None


def test_held_next_keys_reads_each_next_key_file_again_after_it_is_replaced(
    tmp_path: Path, next_key: tuple[Path, str]
) -> None:
    path, pin = next_key
    cfgs = [
        CertificateConfig(name="www", domains=("a.example.com",), key=Path("/k/a"),
                          next_key=path),
        CertificateConfig(name="api", domains=("b.example.com",), key=Path("/k/b"),
                          next_key=tmp_path / "missing.key"),
        CertificateConfig(name="plain", domains=("c.example.com",), key=Path("/k/c")),
    ]  # fmt: skip
    assert rollover.held_next_keys(cfgs) == {"www": pin, "api": None}
    replacement = tmp_path / "replacement.key"
    new_pin = keys.spki_pin(keys.create_key_file(replacement, "ec256"))
    os.replace(replacement, path)  # an operator copies the right file over the wrong one
    assert rollover.held_next_keys(cfgs)["www"] == new_pin
    (tmp_path / "missing.key").write_text("not a key\n")
    assert rollover.held_next_keys(cfgs)["api"] is None  # unreadable: not held


def test_a_fleet_node_without_the_next_key_file_keeps_the_fleets_announcement(
    next_key: tuple[Path, str],
) -> None:
    path, pin = next_key
    cfg, ks = due_switch(path, pin)
    path.unlink()  # this node lacks it; the others may not
    kept = rollover.ensure_next(cfg, ks, None, T0 + 61, create=False, shared=True)
    assert kept.next == ks.next
    # A single node's next key file that is gone is no next key any more.
    dropped = rollover.ensure_next(cfg, ks, None, T0 + 61, create=False, shared=False)
    assert dropped.next is None


# --- through the renewer, on a real redis-server ----------------------------------------


def fleet_site(tmp_path: Path, url: str, ns: str) -> Config:
    (tmp_path / "roots.pem").write_bytes(CA.root.public_bytes(serialization.Encoding.PEM))
    secret = tmp_path / "fleet.secret"
    secret.write_bytes(os.urandom(32))
    secret.chmod(0o600)
    keys.create_key_file(tmp_path / "www.key", "ec256")
    keys.create_key_file(tmp_path / "www.next.key", "ec256")
    path = tmp_path / "config.toml"
    path.write_text(textwrap.dedent(f"""\
        state_dir = "state"
        [acme]
        directory = "https://127.0.0.1:1/dir"
        trusted_roots = "roots.pem"
        timeout = 5
        [haproxy]
        cert_dir = "certs"
        [fleet]
        redis = "{url}"
        namespace = "{ns}"
        node = "edge-a"
        secret_file = "fleet.secret"
        [[certificates]]
        name = "www"
        domains = ["a.example.com"]
        key = "www.key"
        next_key = "www.next.key"
        announce_for = "1s"
        """))  # fmt: skip
    (tmp_path / "certs").mkdir()
    return load_config(path)


def test_a_fleet_switch_waits_for_node_b_then_goes_when_b_reports_the_next_key(
    tmp_path: Path, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ns = "rf" + os.urandom(6).hex()
    site = fleet_site(tmp_path, redis_url, ns)
    client = redis.Redis.from_url(redis_url)
    issuer = StandInIssuer()
    store = make_storage(site)
    renewer = Renewer(site, MemoryChallengeRegistry(), store, issuer)
    renewer.NODES_FRESH = 0.0  # read the heartbeats on every decision
    cfg = site.certificate("www")
    try:
        assert [r.status for r in renewer.run(None, False, False)] == ["renewed"]
        old_pin = load_meta(store, "www").key_pin  # type: ignore[union-attr]
        nxt = pins_of(cfg, storage=store)["next"]
        assert nxt is not None and nxt["announced_at"] is not None
        assert main(["keys", "rollover", "www", "-c", str(site.path)]) == 0
        beat(client, ns, "edge-a", extra={"next_keys": {"www": nxt["pin"]}})
        beat(client, ns, "edge-b", extra={"next_keys": {"www": None}})
        # Announced for announce_for (1 s): the switch is due.
        time.sleep(max(0.0, nxt["announced_at"] + 1.05 - time.time()))
        capsys.readouterr()
        (res,) = renewer.run(None, False, False)
        (again,) = renewer.run(None, False, False)
        assert res.status == again.status == "not-due", res
        assert "node(s) edge-b do not hold the next key" in res.reason
        said = [ln for ln in capsys.readouterr().err.splitlines() if "do not hold" in ln]
        assert len(said) == 1 and "WARNING" in said[0], said  # once, not on every poll
        ks = load_state(store, "www").keys
        assert ks is not None and ks.switch is None and ks.request is not None
        assert load_meta(store, "www").key_pin == old_pin  # type: ignore[union-attr]
        # `status` says what it waits for.
        assert main(["status", "--json", "-c", str(site.path)]) == 0
        doc = json.loads(capsys.readouterr().out)
        kr = doc["certificates"][0]["key_rollover"]
        assert kr["due"] and "edge-b" in kr["waiting"] and kr["why"] == kr["waiting"], kr
        rows = {n["node"]: n["certificates"]["www"] for n in doc["nodes"]}
        assert rows["edge-a"]["next_key_pin"] == nxt["pin"]
        assert rows["edge-b"]["next_key_pin"] is None
        # A forced renewal meanwhile stays on the current key.
        (forced,) = renewer.run(None, True, False)
        assert forced.status == "renewed"
        assert load_meta(store, "www").key_pin == old_pin  # type: ignore[union-attr]
        # B now holds it: the next decision switches.
        beat(client, ns, "edge-b", extra={"next_keys": {"www": nxt["pin"]}})
        (done,) = renewer.run(None, False, False)
        assert done.status == "renewed" and "key rollover" in done.reason, done
        assert load_meta(store, "www").key_pin == nxt["pin"]  # type: ignore[union-attr]
        assert "key rollover (scheduled)" in capsys.readouterr().err
    finally:
        client.close()
