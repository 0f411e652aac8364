"""kill -9 of `keys rollover` at random points, on real Pebble + real HAProxy.

Each round announces the current next key (`pins`), waits out a 1 s
`announce_for`, starts `keys rollover www` (which switches at once) and kills
it at a random point: a random delay within a typical run, or right as the
bundle file changes (the deploy). After every kill the bundle pairs its leaf
with its own key (tests.chaos.harness.check_invariants), and both the bundle
and the served leaf (a real TLS handshake) are on the key before the round or
on the next key, never anything else. A cron `renew` then finishes whatever
the kill left: HAProxy serves the stored generation, on one of the two keys.

The dual-certificate variant does the same with an RSA and an ECDSA key, each
with its own next key: after every kill each bundle pairs its leaf with its
own key, and each key type is on its key before the round or on its next key
(RSA-only and ECDSA-only handshakes, `openssl s_client -sigalgs`); after the
cron `renew` the pair pointer names both stored generations.

Rounds: CHAOS_ROLLOVER_ROUNDS for each test (default 20 for the single key,
which is the issue's figure; 8 for the dual certificate, whose rounds take
two orders each: 20 of them were run by hand on 2.6 and 3.2, 7.5 minutes).
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter

import pytest
from cryptography import x509

from agent import keys
from tests.chaos.harness import (
    Site,
    assert_in_sync,
    check_invariants,
    env_int,
    kill9,
    run_agent,
    spawn_agent,
)
from tests.chaos.test_kills import ACME_TIMEOUT, kill_point
from tests.integration.test_dual_pebble import ECDSA_ONLY, RSA_ONLY, s_client_leaf
from tests.support.bundles import bundle_pin
from tests.support.tls import served_leaf

pytestmark = [pytest.mark.integration, pytest.mark.chaos]


def served_pin(site: Site) -> str:
    leaf = served_leaf(site.stack.https_port, "www.chaos.test")
    return keys.spki_pin(leaf.public_key())  # type: ignore[arg-type]


def stored_pin(site: Site, name: str = "www") -> str:
    d = site.state_dir / "certificates" / name
    meta = json.loads((d / "gen" / (d / "current").read_text() / "meta.json").read_text())
    return str(meta["key_pin"])


@pytest.fixture
def one_site(site: Site) -> Site:
    site.names = {"www": "www.chaos.test"}
    return site


def test_rollover_killed_at_random_points_leaves_the_site_on_one_matching_key(
    one_site: Site, tally: Counter[str]
) -> None:
    site = one_site
    rng = random.Random(tally["seed"])
    site.write_config('generate_next_key = true\nannounce_for = "1s"\n', timeout=ACME_TIMEOUT)
    started = time.monotonic()
    cp = run_agent("renew", "-c", str(site.config))
    run_time = time.monotonic() - started
    assert cp.returncode == 0, cp.stdout + cp.stderr
    site.remember_keys()
    switched = 0
    for i in range(max(1, env_int("CHAOS_ROLLOVER_ROUNDS", 20))):
        before = stored_pin(site)
        cp = run_agent("pins", "--json", "-c", str(site.config))
        assert cp.returncode == 0, cp.stdout + cp.stderr
        nxt = json.loads(cp.stdout)[0]["next"]
        assert nxt is not None and nxt["pin"] != before
        time.sleep(max(0.0, nxt["announced_at"] + 1.05 - time.time()))
        log = site.root / f"rollover-{i}.log"
        proc = spawn_agent("keys", "rollover", "www", "-c", str(site.config), log=log)
        tally["kills_" + kill_point(rng, site, proc, run_time)] += 1
        if proc.poll() is None:
            kill9(proc)
            tally["kills"] += 1
        else:
            tally["finished_before_kill"] += 1
        check_invariants(site)  # every bundle pairs its leaf with its key; `key` unchanged
        two = {before, nxt["pin"]}
        assert bundle_pin(site.bundle("www").read_bytes()) in two
        assert served_pin(site) in two
        # The next cron run finishes what the kill left (the request stays recorded).
        cp = run_agent("renew", "-c", str(site.config))
        assert cp.returncode == 0, cp.stdout + cp.stderr
        check_invariants(site, after_restart=True)
        assert_in_sync(site)
        now_on = stored_pin(site)
        assert now_on in two
        assert served_pin(site) == now_on == bundle_pin(site.bundle("www").read_bytes())
        state = json.loads((site.state_dir / "certificates" / "www" / "state.json").read_text())
        assert state["keys"]["switch"] is None, state["keys"]
        switched += now_on != before
        tally["rounds"] += 1
    tally["switched"] += switched
    assert switched >= 1  # the rounds did roll keys, not only kill idle runs


KINDS = {"rsa": RSA_ONLY, "ecdsa": ECDSA_ONLY}
DUAL_DOMAIN = "dual.chaos.test"


def test_dual_rollover_killed_at_random_points_leaves_each_key_type_on_one_matching_key(
    site: Site, tally: Counter[str]
) -> None:
    rng = random.Random(tally["seed"])
    # The key files are named after the variants, so the harness's invariants
    # (stable keys unchanged, key_dir/NAME.key) cover both.
    site.names = {f"www.{k}": DUAL_DOMAIN for k in KINDS}
    site.key_dir.mkdir(mode=0o700, exist_ok=True)
    site.config = site.stack.write_config(site.root / "config.toml", [{
        "name": "www", "domains": [DUAL_DOMAIN], "announce_for": "1s",
        "keys": [
            {"key": str(site.key_dir / "www.rsa.key"), "key_type": "rsa2048",
             "generate_key": True, "generate_next_key": True},
            {"key": str(site.key_dir / "www.ecdsa.key"), "key_type": "ec256",
             "generate_key": True, "generate_next_key": True},
        ],
    }], site.state_dir, timeout=ACME_TIMEOUT)  # fmt: skip
    started = time.monotonic()
    cp = run_agent("renew", "-c", str(site.config))
    run_time = time.monotonic() - started
    assert cp.returncode == 0, cp.stdout + cp.stderr
    site.remember_keys()

    def served(kind: str) -> x509.Certificate:
        return s_client_leaf(site.stack.https_port, DUAL_DOMAIN, KINDS[kind], "tls1_2")

    switched: Counter[str] = Counter()
    for i in range(max(1, env_int("CHAOS_ROLLOVER_ROUNDS", 8))):
        before = {k: stored_pin(site, f"www.{k}") for k in KINDS}
        cp = run_agent("pins", "--json", "-c", str(site.config))
        assert cp.returncode == 0, cp.stdout + cp.stderr
        rows = {r["name"]: r for r in json.loads(cp.stdout)}
        nxt = {k: rows[f"www.{k}"]["next"] for k in KINDS}
        assert all(n is not None and n["pin"] != before[k] for k, n in nxt.items())
        last = max(n["announced_at"] for n in nxt.values())
        time.sleep(max(0.0, last + 1.05 - time.time()))
        log = site.root / f"dual-rollover-{i}.log"
        proc = spawn_agent("keys", "rollover", "www", "-c", str(site.config), log=log)
        tally["kills_" + kill_point(rng, site, proc, run_time)] += 1
        if proc.poll() is None:
            kill9(proc)
            tally["kills"] += 1
        else:
            tally["finished_before_kill"] += 1
        check_invariants(site)  # every bundle pairs its leaf with its key; keys unchanged
        two = {k: {before[k], nxt[k]["pin"]} for k in KINDS}
        for k in KINDS:
            assert bundle_pin(site.bundle(f"www.{k}").read_bytes()) in two[k]
            assert keys.spki_pin(served(k).public_key()) in two[k]  # type: ignore[arg-type]
        # The next cron run finishes what the kill left.
        cp = run_agent("renew", "-c", str(site.config))
        assert cp.returncode == 0, cp.stdout + cp.stderr
        check_invariants(site, after_restart=True)
        status = {r["name"]: r for r in json.loads(run_agent(
            "status", "--json", "-c", str(site.config)).stdout)}  # fmt: skip
        pair = json.loads((site.state_dir / "pairs" / "www.json").read_text())["generations"]
        for k in KINDS:
            name = f"www.{k}"
            now_on = stored_pin(site, name)
            assert now_on in two[k]
            bundle = site.bundle(name).read_bytes()
            leaf = x509.load_pem_x509_certificate(bundle)
            assert bundle_pin(bundle) == now_on
            assert served(k).serial_number == leaf.serial_number
            assert status[name]["in_sync"], status[name]
            d = site.state_dir / "certificates" / name
            assert pair[name] == (d / "current").read_text()
            state = json.loads((d / "state.json").read_text())
            assert state["keys"]["switch"] is None, state["keys"]
            switched[k] += now_on != before[k]
        tally["rounds"] += 1
    tally.update({f"switched_{k}": v for k, v in switched.items()})
    assert all(switched[k] >= 1 for k in KINDS), switched  # the rounds did roll both keys
