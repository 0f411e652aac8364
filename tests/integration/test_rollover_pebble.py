"""Key rollover against the real Pebble 2.10 and a real HAProxy (2.6 and 3.2).

A short `announce_for` (seconds) stands in for the operators' two months; the
switch is proven by real TLS handshakes (the served leaf's SPKI pin), the
HAProxy process is the same one throughout (hot swap over the runtime API),
and an emergency switch's keyCompromise revocation is confirmed by Pebble
itself (its management interface, and ARI's "renew now" window).
"""

from __future__ import annotations

import json
import ssl
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from agent import keys
from agent.challenges import MemoryChallengeRegistry
from agent.cli import main
from agent.config import load_config
from agent.issuer import Issuer
from agent.renewal import Renewer
from agent.storage import FileStorage
from tests.integration.test_issuance_pebble import Killed
from tests.support.acme_stack import AcmeStack
from tests.support.bundles import bundle_pin
from tests.support.haproxy import haproxy_binaries
from tests.support.pebble import pebble_binaries
from tests.support.tls import served_leaf

pytestmark = pytest.mark.integration

DOMAIN = "pinned.example.test"
ANNOUNCE_FOR = 3  # s

_PEBBLE_210 = [path for label, path in pebble_binaries() if label == "2.10"]
_HAPROXIES = [(label, path) for label, path in haproxy_binaries() if label in ("2.6", "3.2")]


@pytest.fixture(params=[p for _, p in _HAPROXIES], ids=[label for label, _ in _HAPROXIES])
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AcmeStack]:
    assert _PEBBLE_210, "Pebble 2.10 is not set up (scripts/setup.sh)"
    with AcmeStack(tmp_path / "stack", request.param, pebble_binary=_PEBBLE_210[0]) as s:
        yield s


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def served_pin(stack: AcmeStack) -> str:
    leaf = served_leaf(stack.https_port, DOMAIN)
    return keys.spki_pin(leaf.public_key())  # type: ignore[arg-type]


def current_leaf(state: Path) -> x509.Certificate:
    d = state / "certificates" / "www"
    return x509.load_pem_x509_certificate(
        (d / "gen" / (d / "current").read_text() / "cert.pem").read_bytes()
    )


def pins_json(capsys: pytest.CaptureFixture[str], config: Path) -> dict[str, Any]:
    rc, out, err = cli(capsys, "pins", "-c", str(config), "--json")
    assert rc == 0, err
    (item,) = json.loads(out)
    return dict(item)


def test_scheduled_rollover_is_refused_before_announce_for_and_done_after(
    stack: AcmeStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "www.key"
    spare = keys.spki_pin(keys.generate_private_key("ec256"))
    config = stack.write_config(tmp_path / "config.toml", [{
        "name": "www", "domains": [DOMAIN], "key": str(key), "generate_key": True,
        "generate_next_key": True, "announce_for": f"{ANNOUNCE_FOR}s", "backup_pins": [spare],
    }])  # fmt: skip
    rc, _, err = cli(capsys, "renew", "-c", str(config))
    assert rc == 0, err
    pid = stack.haproxy.pid
    old_key = key.read_bytes()
    old_pin = keys.spki_pin(keys.load_private_key(key))
    assert served_pin(stack) == old_pin
    shown = pins_json(capsys, config)
    nxt = shown["next"]
    assert nxt is not None and nxt["announced_at"] is not None
    # Asked for at once: refused (announced for less than announce_for), nothing changes.
    rc, out, err = cli(capsys, "keys", "rollover", "www", "-c", str(config))
    assert rc == 0, err
    assert "waiting" in out and "announce_for" in out
    rc, out, _ = cli(capsys, "status", "-c", str(config), "--json")
    row = json.loads(out)[0]["key_rollover"]
    assert row["requested"] and not row["due"]
    assert row["allowed_at"] == pytest.approx(nxt["announced_at"] + ANNOUNCE_FOR)
    rc, out, err = cli(capsys, "renew", "-c", str(config))
    assert rc == 0 and "not-due" in out, out + err
    assert served_pin(stack) == old_pin
    # After announce_for: the next `renew` switches, hot, on the same HAProxy.
    time.sleep(max(0.0, nxt["announced_at"] + ANNOUNCE_FOR + 0.2 - time.time()))
    rc, out, err = cli(capsys, "renew", "-v", "-c", str(config))
    assert rc == 0 and "www: renewed: key rollover" in out, out + err
    switch_log = err
    assert served_pin(stack) == nxt["pin"] == bundle_pin((stack.cert_dir / "www.pem").read_bytes())
    assert stack.haproxy.pid == pid
    assert key.read_bytes() == old_key  # the old key file is untouched
    after = pins_json(capsys, config)
    assert after["key_pin"] == nxt["pin"]
    assert [p["pin"] for p in after["previous"]] == [old_pin]
    assert after["next"] is not None and after["next"]["pin"] not in (old_pin, nxt["pin"])
    assert keys.spki_pin(current_leaf(tmp_path / "state").public_key()) == nxt["pin"]  # type: ignore[arg-type]
    # The order for the next key replaced the old leaf (ARI `replaces`), and the
    # CA took it so. (Pebble's own "is a replacement of" log line was missing
    # once in CI although the order went through: the agent's side is the proof.)
    assert "as the replacement of" in switch_log, switch_log[-3000:]
    assert "refused an order with replaces" not in switch_log, switch_log[-3000:]


def _pebble_status(stack: AcmeStack, serial: int) -> dict[str, Any] | None:
    """Pebble's management view of a certificate (`Status`, `Reason`; None: no such page)."""
    ctx = ssl.create_default_context(cafile=str(stack.pebble.ca_bundle))
    url = f"https://127.0.0.1:{stack.pebble.management_port}/cert-status-by-serial/{serial:x}"
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=10) as resp:
            data: dict[str, Any] = json.loads(resp.read())
            return data
    except urllib.error.HTTPError:
        return None


def test_emergency_rollover_to_a_backup_key_revokes_the_old_certificate(
    stack: AcmeStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key, backup = tmp_path / "www.key", tmp_path / "backup.key"
    keys.create_key_file(backup, "ec256")
    bpin = keys.spki_pin(keys.load_private_key(backup))
    spare = keys.spki_pin(keys.generate_private_key("ec256"))
    config = stack.write_config(tmp_path / "config.toml", [{
        "name": "www", "domains": [DOMAIN], "key": str(key), "generate_key": True,
        "backup_pins": [bpin, spare],
    }])  # fmt: skip
    rc, _, err = cli(capsys, "renew", "-c", str(config))
    assert rc == 0, err
    pid = stack.haproxy.pid
    old = current_leaf(tmp_path / "state")
    old_key = key.read_bytes()
    before = _pebble_status(stack, old.serial_number)
    # A key that was never announced is refused without --force-unannounced.
    rogue = tmp_path / "rogue.key"
    keys.create_key_file(rogue, "ec256")
    rc, _, err = cli(capsys, "keys", "rollover", "www", "-c", str(config), "--now",
                     "--to", str(rogue))  # fmt: skip
    assert rc == 1 and "not in backup_pins" in err
    rc, out, err = cli(capsys, "keys", "rollover", "www", "-c", str(config), "--now",
                       "--to", str(backup), "--revoke")  # fmt: skip
    assert rc == 0, out + err
    assert served_pin(stack) == bpin == bundle_pin((stack.cert_dir / "www.pem").read_bytes())
    assert stack.haproxy.pid == pid and key.read_bytes() == old_key
    assert "revoked serial" in err and "keyCompromise" in err
    status = _pebble_status(stack, old.serial_number)
    # Pebble's own record of the revocation, with its reason (1 = keyCompromise).
    assert before is not None and before.get("Status") == "Valid", before
    assert status is not None and status.get("Status") == "Revoked", status
    assert status.get("Reason") == 1, status
    # ARI: the revoked leaf's window is in the past ("renew now").
    cfg = load_config(config)
    window = Issuer(cfg.acme, FileStorage(cfg.state_dir), MemoryChallengeRegistry()).renewal_info(
        old
    )
    assert window is not None and window.end < time.time()
    rc, out, _ = cli(capsys, "status", "-c", str(config), "--json")
    row = json.loads(out)[0]
    assert row["key_pin"] == bpin and row["key_rollover"]["revocation_pending"] is None
    assert row["key_rollover"]["served_pinned"] is True


def test_dual_certificate_rollover_switches_each_key_type_to_its_next_key(
    stack: AcmeStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """RSA + ECDSA with a next key each: after `keys rollover NAME` and announce_for,
    an RSA-only client gets a leaf for the RSA next key and an ECDSA client one for
    the ECDSA next key, from the same HAProxy process."""
    from tests.integration.test_dual_pebble import ECDSA_ONLY, RSA_ONLY, s_client_leaf

    site = tmp_path / "site"
    site.mkdir()
    rsa_key, ec_key = site / "rsa.key", site / "ec.key"
    config = stack.write_config(tmp_path / "config.toml", [{
        "name": "www", "domains": [DOMAIN], "announce_for": f"{ANNOUNCE_FOR}s",
        "keys": [
            {"key": str(rsa_key), "key_type": "rsa2048", "generate_key": True,
             "generate_next_key": True},
            {"key": str(ec_key), "key_type": "ec256", "generate_key": True,
             "generate_next_key": True},
        ],
    }])  # fmt: skip

    def served(sigalgs: str) -> str:
        leaf = s_client_leaf(stack.https_port, DOMAIN, sigalgs, "tls1_2")
        return keys.spki_pin(leaf.public_key())  # type: ignore[arg-type]

    rc, _, err = cli(capsys, "renew", "-c", str(config))
    assert rc == 0, err
    pid = stack.haproxy.pid
    old_files = {p: p.read_bytes() for p in (rsa_key, ec_key)}
    old = {"rsa": keys.spki_pin(keys.load_private_key(rsa_key)),
           "ecdsa": keys.spki_pin(keys.load_private_key(ec_key))}  # fmt: skip
    assert (served(RSA_ONLY), served(ECDSA_ONLY)) == (old["rsa"], old["ecdsa"])
    rc, out, err = cli(capsys, "pins", "-c", str(config), "--json")
    assert rc == 0, err
    shown = {r["name"]: r for r in json.loads(out)}
    nxt = {k: shown[f"www.{k}"]["next"] for k in ("rsa", "ecdsa")}
    assert all(n is not None and n["announced_at"] is not None for n in nxt.values())
    # Both key types' current and next keys are announced in each header.
    for k, other in (("rsa", "ecdsa"), ("ecdsa", "rsa")):
        assert shown[f"www.{k}"]["pair_pins"] == [old[other], nxt[other]["pin"]]
    rc, out, err = cli(capsys, "keys", "rollover", "www", "-c", str(config))
    assert rc == 0, err
    assert "www.rsa: rollover requested: rollover asked for, waiting" in out, out
    assert "www.ecdsa: rollover requested: rollover asked for, waiting" in out, out
    rc, out, err = cli(capsys, "renew", "-c", str(config))
    assert rc == 0 and "www.rsa: not-due" in out and "www.ecdsa: not-due" in out, out + err
    assert (served(RSA_ONLY), served(ECDSA_ONLY)) == (old["rsa"], old["ecdsa"])
    last = max(n["announced_at"] for n in nxt.values())
    time.sleep(max(0.0, last + ANNOUNCE_FOR + 0.2 - time.time()))
    rc, out, err = cli(capsys, "renew", "-c", str(config))
    assert rc == 0, out + err
    assert "www.rsa: renewed: key rollover" in out and "www.ecdsa: renewed: key rollover" in out
    assert served(RSA_ONLY) == nxt["rsa"]["pin"]
    assert served(ECDSA_ONLY) == nxt["ecdsa"]["pin"]
    for k in ("rsa", "ecdsa"):
        assert bundle_pin((stack.cert_dir / f"www.{k}.pem").read_bytes()) == nxt[k]["pin"]
    assert stack.haproxy.pid == pid
    assert {p: p.read_bytes() for p in old_files} == old_files  # the old key files untouched
    rc, out, _ = cli(capsys, "pins", "-c", str(config), "--json")
    after = {r["name"]: r for r in json.loads(out)}
    for k in ("rsa", "ecdsa"):
        assert after[f"www.{k}"]["key_pin"] == nxt[k]["pin"]
        assert [p["pin"] for p in after[f"www.{k}"]["previous"]] == [old[k]]


def test_a_pair_killed_before_clearing_an_order_record_still_switches_both_keys_later(
    stack: AcmeStack,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A kill after a pair was installed but before the ECDSA order's record was
    cleared leaves that finished order recorded. The rollover that follows orders
    for the next keys: it must not resume the recorded order (its leaf is for the
    old key) but place a new one, so both key types switch."""
    from tests.integration.test_dual_pebble import ECDSA_ONLY, RSA_ONLY, s_client_leaf

    site = tmp_path / "site"
    site.mkdir()
    config = stack.write_config(tmp_path / "config.toml", [{
        "name": "www", "domains": [DOMAIN], "announce_for": f"{ANNOUNCE_FOR}s",
        "keys": [
            {"key": str(site / "rsa.key"), "key_type": "rsa2048", "generate_key": True,
             "generate_next_key": True},
            {"key": str(site / "ec.key"), "key_type": "ec256", "generate_key": True,
             "generate_next_key": True},
        ],
    }])  # fmt: skip
    state = tmp_path / "state"
    rc, _, err = cli(capsys, "renew", "-c", str(config))
    assert rc == 0, err
    real_clear = Renewer._clear_order

    def killed_at_ecdsa(self: Renewer, cfg: Any) -> None:
        if cfg.name == "www.ecdsa":
            raise Killed
        real_clear(self, cfg)

    monkeypatch.setattr(Renewer, "_clear_order", killed_at_ecdsa)
    with pytest.raises(Killed):
        main(["renew", "--force", "-c", str(config)])
    monkeypatch.undo()
    capsys.readouterr()
    record = json.loads((state / "certificates" / "www.ecdsa" / "order.json").read_text())
    assert record["status"] == "valid", record
    assert not (state / "certificates" / "www.rsa" / "order.json").exists()
    rc, out, err = cli(capsys, "pins", "-c", str(config), "--json")
    assert rc == 0, err
    nxt = {r["name"]: r["next"] for r in json.loads(out)}
    rc, out, err = cli(capsys, "keys", "rollover", "www", "-c", str(config))
    assert rc == 0, err
    last = max(n["announced_at"] for n in nxt.values())
    time.sleep(max(0.0, last + ANNOUNCE_FOR + 0.2 - time.time()))
    rc, out, err = cli(capsys, "renew", "-v", "-c", str(config))
    assert rc == 0, out + err
    assert "www.rsa: renewed: key rollover" in out and "www.ecdsa: renewed: key rollover" in out
    assert "resuming" not in err, err[-3000:]
    for name, sigalgs in (("www.rsa", RSA_ONLY), ("www.ecdsa", ECDSA_ONLY)):
        leaf = s_client_leaf(stack.https_port, DOMAIN, sigalgs, "tls1_2")
        assert keys.spki_pin(leaf.public_key()) == nxt[name]["pin"]  # type: ignore[arg-type]
        assert not (state / "certificates" / name / "order.json").exists()
