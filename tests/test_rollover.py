"""Key rollover: the pure policy (injected clock), config checks, and the switch
in a renewal run with a stand-in issuer (the real CA and HAProxy path is in
tests/integration/test_rollover_pebble.py)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import textwrap
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent import keys, rollover
from agent.certstate import load_meta, load_state
from agent.challenges import MemoryChallengeRegistry
from agent.cli import main, pins_of
from agent.config import CertificateConfig, Config, ConfigError, load_config
from agent.deploy import stored_target
from agent.renewal import Renewer, certificate_status, renewal_decision
from agent.storage import FileStorage
from tests.support.bundles import bundle_pin
from tests.test_renewal import CA, StandInIssuer

DAY = 86400.0
T0 = 1_800_000_000.0


# --- the policy (pure) ----------------------------------------------------------------


def ccfg(**kw: Any) -> CertificateConfig:
    base: dict[str, Any] = {
        "name": "www",
        "domains": ("a.example.com",),
        "key": Path("/k/a"),
        "next_key": Path("/k/n"),
        "announce_for": 60 * DAY,
    }
    return CertificateConfig(**{**base, **kw})


def announced(at: float | None, **kw: Any) -> rollover.KeyState:
    return rollover.KeyState(next=rollover.NextKey("/k/n", "N" * 43 + "=", at), **kw)


def test_requested_switch_waits_for_announce_for_then_is_due() -> None:
    ks = announced(T0, request=rollover.Request(T0 + DAY))
    before = rollover.status_of(ccfg(), ks, T0 + 59 * DAY)
    assert (before.state, before.requested, before.due) == ("announced", True, False)
    assert before.allowed_at == T0 + 60 * DAY
    assert "waiting" in before.why and "announce_for" in before.why
    after = rollover.status_of(ccfg(), ks, T0 + 60 * DAY)
    assert (after.state, after.due) == ("allowed", True)
    assert rollover.switch_time(ccfg(), ks, T0 + 59 * DAY) == T0 + 60 * DAY


def test_a_next_key_never_shown_is_never_switched_to() -> None:
    ks = announced(None, request=rollover.Request(T0))
    st = rollover.status_of(ccfg(), ks, T0 + 1000 * DAY)
    assert not st.due and st.allowed_at is None
    assert "not announced" in st.why
    assert rollover.switch_time(ccfg(), ks, T0 + 1000 * DAY) is None


def test_allowed_but_not_asked_for_is_not_due() -> None:
    st = rollover.status_of(ccfg(), announced(T0), T0 + 90 * DAY)
    assert (st.state, st.requested, st.due) == ("allowed", False, False)


def test_rollover_at_is_the_later_of_it_and_announce_for_and_is_used_once() -> None:
    cfg = ccfg(rollover_at=T0 + 10 * DAY)
    assert rollover.switch_time(cfg, announced(T0), T0) == T0 + 60 * DAY
    cfg = ccfg(rollover_at=T0 + 70 * DAY)
    assert rollover.switch_time(cfg, announced(T0), T0) == T0 + 70 * DAY
    # After a switch at (or after) rollover_at, the same rollover_at asks for nothing.
    done = announced(T0, last_switch_at=T0 + 70 * DAY)
    assert rollover.switch_time(cfg, done, T0 + 200 * DAY) is None


def test_announcement_time_is_set_once_and_never_moved_later() -> None:
    ks = rollover.announce(announced(None), T0)
    assert ks.next is not None and ks.next.announced_at == T0
    again = rollover.announce(ks, T0 + 5 * DAY)
    assert again.next is not None and again.next.announced_at == T0


def test_emergency_request_is_due_at_once() -> None:
    to = rollover.KeyRef("/k/b", "B" * 43 + "=")
    ks = rollover.KeyState(request=rollover.Request(T0, rollover.EMERGENCY, to, revoke=True))
    st = rollover.status_of(ccfg(next_key=None), ks, T0)
    assert st.due and st.target == to


def test_settle_finishes_a_switch_whose_generation_became_current() -> None:
    old, new = rollover.KeyRef("/k/a", "A" * 43 + "="), rollover.KeyRef("/k/n", "N" * 43 + "=")
    sw = rollover.Switch(old, new, T0, announced_at=T0 - 61 * DAY)
    ks = replace(announced(T0 - 61 * DAY, request=rollover.Request(T0)), switch=sw)
    # Killed before the pointer moved: still switching (the order is made again).
    assert rollover.settle(ks, old.pin, T0 + 1, DAY, "/k/a").switch == sw
    done = rollover.settle(ks, new.pin, T0 + 1, DAY, "/k/a")
    assert done.switch is None and done.request is None and done.next is None
    assert done.current == new and [p.pin for p in done.previous] == [old.pin]
    assert done.previous[0].until == T0 + 1 + DAY
    assert rollover.current_key_path(ccfg(), done) == Path("/k/n")
    # The operator points `key` somewhere else later: the config wins again.
    assert rollover.current_key_path(ccfg(key=Path("/k/z")), done) == Path("/k/z")
    # Previous keys leave the list after previous_pin_for.
    assert rollover.settle(done, new.pin, T0 + 2 * DAY, DAY, "/k/a").previous == ()


# --- config ---------------------------------------------------------------------------


def write_config(tmp_path: Path, extra: str, key_type: str = "ec256") -> Path:
    (tmp_path / "roots.pem").write_bytes(CA.root.public_bytes(serialization.Encoding.PEM))
    if not (tmp_path / "www.key").exists():
        keys.create_key_file(tmp_path / "www.key", key_type)
    path = tmp_path / "config.toml"
    path.write_text(
        textwrap.dedent(
            """\
            state_dir = "state"
            [acme]
            directory = "https://127.0.0.1:1/dir"
            trusted_roots = "roots.pem"
            [haproxy]
            cert_dir = "certs"
            [[certificates]]
            name = "www"
            domains = ["a.example.com"]
            key = "www.key"
            """
        )
        + textwrap.dedent(extra)
    )
    return path


def test_next_key_equal_to_the_key_is_refused_naming_file_and_key(tmp_path: Path) -> None:
    path = write_config(tmp_path, 'next_key = "www.key"\n')
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}: certificates[0].next_key: ")
    assert "the certificate's key itself" in str(e.value)
    keys.create_key_file(tmp_path / "copy.key", "ec256")
    (tmp_path / "copy.key").write_bytes((tmp_path / "www.key").read_bytes())
    path = write_config(tmp_path, 'next_key = "copy.key"\n')
    with pytest.raises(ConfigError, match=r"next_key: .*holds the same key"):
        load_config(path)


def test_next_key_of_another_type_or_unsupported_is_refused(tmp_path: Path) -> None:
    keys.create_key_file(tmp_path / "rsa.key", "rsa2048")
    path = write_config(tmp_path, 'next_key = "rsa.key"\n')
    with pytest.raises(
        ConfigError, match=r"certificates\[0\]\.next_key: .*RSA 2048 key, not 'ec256'"
    ):
        load_config(path)
    from cryptography.hazmat.primitives.asymmetric import ed25519

    ed = ed25519.Ed25519PrivateKey.generate()
    (tmp_path / "ed.key").write_bytes(
        ed.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path = write_config(tmp_path, 'next_key = "ed.key"\n')
    with pytest.raises(ConfigError, match=r"next_key: .*Ed25519PrivateKey keys are not supported"):
        load_config(path)


def test_missing_next_key_needs_generate_next_key(tmp_path: Path) -> None:
    path = write_config(tmp_path, 'next_key = "next.key"\n')
    with pytest.raises(ConfigError, match=r"next_key: .*set generate_next_key = true"):
        load_config(path)
    path = write_config(tmp_path, 'next_key = "next.key"\ngenerate_next_key = true\n')
    cfg = load_config(path).certificate("www")
    assert cfg.generate_next_key and cfg.next_key == tmp_path / "next.key"
    assert not (tmp_path / "next.key").exists()  # loading writes nothing


def test_rollover_durations_and_timestamp_parse(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        'generate_next_key = true\nannounce_for = "2h"\n'
        'previous_pin_for = "30d"\nrollover_at = 2027-03-01T00:00:00Z\n',
    )
    cfg = load_config(path).certificate("www")
    assert (cfg.announce_for, cfg.previous_pin_for) == (7200.0, 30 * DAY)
    assert cfg.rollover_at == 1803859200.0
    path = write_config(tmp_path, 'rollover_at = "2027-03-01T00:00:00"\n')
    with pytest.raises(ConfigError, match=r"rollover_at: needs a UTC offset"):
        load_config(path)
    path = write_config(tmp_path, 'announce_for = "soon"\n')
    with pytest.raises(ConfigError, match=r"announce_for: 'soon' is not a duration"):
        load_config(path)


# --- a run with the stand-in issuer and a test clock -----------------------------------


@pytest.fixture
def site(tmp_path: Path) -> Config:
    spare = keys.spki_pin(keys.generate_private_key("ec256"))
    write_config(
        tmp_path,
        f'generate_next_key = true\nannounce_for = "10d"\n'
        f'previous_pin_for = "20d"\nbackup_pins = ["{spare}"]\n',
    )
    return load_config(tmp_path / "config.toml")


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


class RevokingIssuer(StandInIssuer):
    def __init__(self) -> None:
        super().__init__()
        self.revoked: list[tuple[int, str, int]] = []

    def revoke_with_key(self, cert: x509.Certificate, key: keys.PrivateKey, reason: int) -> None:
        self.revoked.append((cert.serial_number, keys.spki_pin(key), reason))


def leaf_pin(config: Config) -> str:
    meta = load_meta(FileStorage(config.state_dir), "www")
    assert meta is not None and meta.key_pin is not None
    return meta.key_pin


def bundle_matches(config: Config) -> str:
    """The bundle `stored_target` builds: its key is the leaf's; returns the pin."""
    target = stored_target(config.certificate("www"), FileStorage(config.state_dir))
    assert target is not None
    return bundle_pin(target.bundle)


def test_scheduled_rollover_refused_before_announce_for_and_done_after(site: Config) -> None:
    clock, issuer = Clock(), RevokingIssuer()
    store = FileStorage(site.state_dir)
    renewer = Renewer(site, MemoryChallengeRegistry(), store, issuer, clock=clock)
    cfg = site.certificate("www")
    assert {r.status for r in renewer.run(None, False, False)} == {"renewed"}
    old_key = (site.path.parent / "www.key").read_bytes()
    old_pin = leaf_pin(site)
    shown = pins_of(cfg, storage=store, now=clock.now)  # the first showing: announced now
    nxt = shown["next"]
    assert nxt is not None and nxt["announced_at"] == clock.now
    assert shown["tlsa_rrset"] == [
        f"_443._tcp.a.example.com. IN TLSA 3 1 1 {h}"
        for h in (shown["tlsa_311"], nxt["tlsa_311"], *shown["backup_tlsa_311"])
    ]
    assert stat.S_IMODE(os.stat(nxt["path"]).st_mode) == 0o600
    announced_at = clock.now
    assert main(["keys", "rollover", "www", "-c", str(site.path)]) == 0
    clock.now += 9 * DAY  # announced for 9 of 10 days: refused
    (res,) = renewer.run(None, False, False)
    assert res.status == "not-due" and leaf_pin(site) == old_pin
    row = certificate_status(site, clock.now, store)[0]["key_rollover"]
    assert row["requested"] and not row["due"]
    assert row["allowed_at"] == announced_at + 10 * DAY and "waiting" in row["why"]
    when, why = renewal_decision(load_meta(store, "www"), cfg, clock.now, None)
    assert (when, why) == (announced_at + 10 * DAY, "key rollover")
    pins_of(cfg, storage=store, now=clock.now)  # showing it again moves nothing
    ks = load_state(store, "www").keys
    assert ks is not None and ks.next is not None and ks.next.announced_at == announced_at
    clock.now += 1 * DAY + 1
    (res,) = renewer.run(None, False, False)
    assert res.status == "renewed", res.reason
    assert leaf_pin(site) == nxt["pin"] == bundle_matches(site)
    assert (site.path.parent / "www.key").read_bytes() == old_key
    ks = load_state(store, "www").keys
    assert ks is not None and [p.pin for p in ks.previous] == [old_pin]
    assert ks.request is None and ks.switch is None and issuer.revoked == []
    # A fresh next key is already there, to be announced; the old one is "previous".
    assert ks.next is not None and ks.next.pin not in (old_pin, nxt["pin"])
    assert ks.next.announced_at is None
    after = pins_of(cfg, storage=store, now=clock.now)
    assert after["key_pin"] == nxt["pin"] and after["previous"][0]["pin"] == old_pin
    assert issuer.replaces[-1] is None or issuer.replaces[-1]
    # The next ordinary renewal stays on the new key.
    clock.now += 60
    (res,) = renewer.run(None, True, False)
    assert res.status == "renewed" and leaf_pin(site) == nxt["pin"] == bundle_matches(site)
    # After previous_pin_for, the previous key leaves the list (its file stays).
    clock.now += 21 * DAY
    renewer.run(None, False, False)
    assert pins_of(cfg, storage=store, now=clock.now)["previous"] == []
    assert (site.path.parent / "www.key").read_bytes() == old_key


def test_kill_between_install_and_bookkeeping_is_settled_on_the_new_key(site: Config) -> None:
    clock, issuer = Clock(), StandInIssuer()
    store = FileStorage(site.state_dir)
    renewer = Renewer(site, MemoryChallengeRegistry(), store, issuer, clock=clock)
    renewer.run(None, False, False)
    cfg = site.certificate("www")
    nxt = pins_of(cfg, storage=store, now=clock.now)["next"]
    assert main(["keys", "rollover", "www", "-c", str(site.path)]) == 0
    clock.now += 11 * DAY
    # The run "dies" right after the pointer moved: rollover.finish never runs.
    real_finish = rollover.finish
    rollover.finish = lambda *a, **k: (_ for _ in ()).throw(SystemExit(9))  # type: ignore[assignment]
    try:
        with pytest.raises(SystemExit):
            renewer._renew_one(cfg, False, clock.now)
    finally:
        rollover.finish = real_finish  # type: ignore[assignment]
    ks = load_state(store, "www").keys
    assert ks is not None and ks.switch is not None  # bookkeeping not done
    assert bundle_matches(site) == nxt["pin"]  # but the bundle pairs the new leaf and key
    (res,) = renewer.run(None, False, False)
    assert res.status in ("not-due", "renewed")
    ks = load_state(store, "www").keys
    assert ks is not None and ks.switch is None and ks.current is not None
    assert ks.current.pin == nxt["pin"] == leaf_pin(site) == bundle_matches(site)


def test_emergency_rollover_to_a_backup_key_revokes_the_old_leaf(tmp_path: Path) -> None:
    backup = tmp_path / "backup.key"
    keys.create_key_file(backup, "ec256")
    spare = keys.spki_pin(keys.generate_private_key("ec256"))
    bpin = keys.spki_pin(keys.load_private_key(backup))
    path = write_config(tmp_path, f'backup_pins = ["{bpin}", "{spare}"]\n')
    config = load_config(path)
    clock, issuer = Clock(), RevokingIssuer()
    store = FileStorage(config.state_dir)
    renewer = Renewer(config, MemoryChallengeRegistry(), store, issuer, clock=clock)
    renewer.run(None, False, False)
    old = load_meta(store, "www")
    assert old is not None and old.serial is not None
    old_pin = old.key_pin
    cfg = config.certificate("www")
    ks_path = rollover.emergency_request(
        cfg, backup, old_pin, clock.now, revoke=True, force_unannounced=False
    )[0]
    rollover.record_request(store, cfg, ks_path)
    (res,) = renewer.run(None, False, False)
    assert res.status == "renewed", res.reason
    assert leaf_pin(config) == bpin == bundle_matches(config)
    assert issuer.revoked == [(int(old.serial, 16), old_pin, rollover.KEY_COMPROMISE)]
    ks = load_state(store, "www").keys
    assert ks is not None and ks.revoke is None and [p.pin for p in ks.previous] == [old_pin]


def test_emergency_to_an_unannounced_key_needs_force(tmp_path: Path, capsys: Any) -> None:
    spare = keys.spki_pin(keys.generate_private_key("ec256"))
    path = write_config(tmp_path, f'backup_pins = ["{spare}"]\n')
    cfg = load_config(path).certificate("www")
    rogue = tmp_path / "rogue.key"
    keys.create_key_file(rogue, "ec256")
    with pytest.raises(rollover.RolloverError, match="not in backup_pins"):
        rollover.emergency_request(cfg, rogue, None, T0, revoke=False, force_unannounced=False)
    req, warnings = rollover.emergency_request(
        cfg, rogue, None, T0, revoke=False, force_unannounced=True
    )
    assert req.mode == rollover.EMERGENCY and "NEVER" in warnings[0]
    with pytest.raises(rollover.RolloverError, match="is the current key"):
        rollover.emergency_request(
            cfg,
            tmp_path / "www.key",
            keys.spki_pin(keys.load_private_key(tmp_path / "www.key")),
            T0,
            revoke=False,
            force_unannounced=True,
        )
    assert main(["keys", "rollover", "www", "-c", str(path), "--now", "--to", str(rogue)]) == 1
    assert "not in backup_pins" in capsys.readouterr().err
    assert load_state(FileStorage(tmp_path / "state"), "www").keys in (None, rollover.KeyState())


# --- pins against openssl ---------------------------------------------------------------


def _openssl_pin(path: Path) -> tuple[str, str]:
    pub = subprocess.run(
        ["openssl", "pkey", "-in", str(path), "-pubout"], check=True, capture_output=True
    ).stdout
    der = subprocess.run(
        ["openssl", "pkey", "-pubin", "-outform", "der"], input=pub, check=True, capture_output=True
    ).stdout
    digest = subprocess.run(
        ["openssl", "dgst", "-sha256", "-binary"], input=der, check=True, capture_output=True
    ).stdout
    b64 = (
        subprocess.run(["openssl", "base64"], input=digest, check=True, capture_output=True)
        .stdout.decode()
        .strip()
    )
    return b64, digest.hex()


@pytest.mark.parametrize("key_type", keys.KEY_TYPES)
def test_pins_match_openssl_for_every_key_type(tmp_path: Path, key_type: str, capsys: Any) -> None:
    backup = tmp_path / "backup.key"
    keys.create_key_file(backup, key_type)
    bpin, bhex = _openssl_pin(backup)
    path = write_config(
        tmp_path,
        f'key_type = "{key_type}"\ngenerate_next_key = true\nbackup_pins = ["{bpin}"]\n',
        key_type=key_type,
    )
    assert main(["pins", "-c", str(path), "--json"]) == 0
    (item,) = json.loads(capsys.readouterr().out)
    cur_pin, cur_hex = _openssl_pin(tmp_path / "www.key")
    next_pin, next_hex = _openssl_pin(Path(item["next"]["path"]))
    assert (item["current"]["pin"], item["current"]["tlsa_311"]) == (cur_pin, cur_hex)
    assert (item["next"]["pin"], item["next"]["tlsa_311"]) == (next_pin, next_hex)
    assert item["backup_pins"] == [bpin] and item["backup_tlsa_311"] == [bhex]
    assert item["hpkp"] == (
        f'pin-sha256="{cur_pin}"; pin-sha256="{next_pin}"; '
        f'pin-sha256="{bpin}"; max-age={keys.HPKP_MAX_AGE}'
    )
    assert [ln.rsplit(" ", 1)[1] for ln in item["tlsa_rrset"]] == [cur_hex, next_hex, bhex]
    assert item["next"]["announced_at"] is not None
    # The text form prints the same records.
    assert main(["pins", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"pin-sha256 next    {next_pin}" in out
    assert f"_443._tcp.a.example.com. IN TLSA 3 1 1 {next_hex}" in out


# --- metrics ----------------------------------------------------------------------------


def test_metrics_export_rollover_state_and_announcement_without_key_material(
    site: Config,
) -> None:
    from agent.metrics import CertificateView, Metrics

    clock, issuer = Clock(), StandInIssuer()
    store = FileStorage(site.state_dir)
    Renewer(site, MemoryChallengeRegistry(), store, issuer, clock=clock).run(None, False, False)
    cfg = site.certificate("www")
    pins_of(cfg, storage=store, now=clock.now)
    assert main(["keys", "rollover", "www", "-c", str(site.path)]) == 0

    def scrape(now: float) -> str:
        view = rollover.key_view(cfg, load_meta(store, "www"), now)
        cv = CertificateView("www", None, None, None, None, {}, keys=view)
        return Metrics(lambda: [cv]).render().decode()

    text = scrape(clock.now)
    assert 'haproxy_acme_key_rollover_state{certificate="www",key="ec256"} 1.0' in text
    (line,) = [ln for ln in text.splitlines()
               if ln.startswith('haproxy_acme_key_announced_timestamp_seconds{certificate="www"')]
    assert float(line.rsplit(" ", 1)[1]) == pytest.approx(clock.now)
    assert 'haproxy_acme_key_served_pinned{certificate="www",key="ec256"} 1.0' in text
    assert 'haproxy_acme_key_announce_for_seconds{certificate="www",key="ec256"} 864000.0' in text
    assert "haproxy_acme_key_rollover_scheduled_timestamp_seconds{" in text
    later = scrape(clock.now + 11 * DAY)
    assert 'haproxy_acme_key_rollover_state{certificate="www",key="ec256"} 2.0' in later
    for pem in (site.path.parent / "www.key").read_bytes().splitlines()[1:-1]:
        assert pem.decode() not in text
