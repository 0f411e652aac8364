"""Dual certificates (config `keys`, agent/pairs.py): parsing, and the pair rule of
renewal and start-up repair, with a stand-in CA (TinyCA) and file storage.
The real HAProxy + Pebble proof is tests/integration/test_dual_pebble.py."""

from __future__ import annotations

import itertools
import json
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent import keys, layout
from agent.certstate import read_current, write_generation
from agent.challenges import MemoryChallengeRegistry
from agent.config import Config, ConfigError, load_config
from agent.issuer import IssuedCertificate, OrderFailed
from agent.metrics import CertificateView, Metrics
from agent.pairs import load_pair, save_pair
from agent.renewal import Renewer, RenewResult, prepare_state
from agent.storage import FileStorage
from tests.support.issued import TinyCA

DAY = 86400.0
CA = TinyCA()
_SERIALS = itertools.count(int(time.time() * 1000))


class PairIssuer:
    """Signs each CSR with TinyCA (a fresh serial each); `fail` = cert names to refuse."""

    renewal_info_url: str | None = None

    def __init__(self) -> None:
        self.fail: set[str] = set()
        self.ordered: list[str | None] = []
        self.lifetime = 90 * DAY
        self.now = time.time()

    def connect(self) -> None:
        pass

    def renewal_info(self, cert: x509.Certificate, previous: Any = None) -> None:
        return None

    def issue(
        self,
        csr_pem: bytes,
        domains: Sequence[str],
        replaces: str | None = None,
        *,
        challenge: str = "http-01",
        cert_name: str | None = None,
    ) -> IssuedCertificate:
        self.ordered.append(cert_name)
        if cert_name in self.fail:
            raise OrderFailed(f"order became invalid: refused for {cert_name}")
        csr = x509.load_pem_x509_csr(csr_pem)
        leaf = CA.leaf(
            csr.public_key(),  # type: ignore[arg-type]
            list(domains), self.now - 60, self.now - 60 + self.lifetime, serial=next(_SERIALS),
        )  # fmt: skip
        return IssuedCertificate(CA.fullchain(leaf).decode(), "http://ca/order/1")


DUAL = """\
    [[certificates]]
    name = "www"
    domains = ["a.example.com", "b.example.com"]
    keys = [
      { key = "rsa.key", key_type = "rsa2048", generate_key = true },
      { key = "ec.key", key_type = "ec256", generate_key = true },
    ]
    [[certificates]]
    name = "api"
    domains = ["api.example.com"]
    key = "api.key"
    generate_key = true
"""


def write_config(tmp_path: Path, certificates: str = DUAL) -> Path:
    (tmp_path / "roots.pem").write_bytes(CA.root.public_bytes(serialization.Encoding.PEM))
    head = """\
        state_dir = "state"
        [acme]
        directory = "https://127.0.0.1:1/dir"
        trusted_roots = "roots.pem"
    """
    path = tmp_path / "config.toml"
    path.write_text(textwrap.dedent(head) + textwrap.dedent(certificates))
    return path


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return load_config(write_config(tmp_path))


def renewer(config: Config, issuer: PairIssuer, clock: Any = time.time) -> Renewer:
    return Renewer(config, MemoryChallengeRegistry(), issuer=issuer, clock=clock)  # type: ignore[arg-type]


def run(r: Renewer, *names: str, force: bool = False, dry: bool = False) -> dict[str, RenewResult]:
    return {x.name: x for x in r.run(list(names) or None, force, dry)}


def currents(config: Config) -> dict[str, str | None]:
    st = FileStorage(config.state_dir)
    return {n: read_current(st, n) for n in ("www.rsa", "www.ecdsa")}


def serial_of(config: Config, name: str) -> int:
    st = FileStorage(config.state_dir)
    gen = read_current(st, name)
    assert gen is not None
    pem = st.load(layout.generation_key(name, gen, layout.CERT))
    return x509.load_pem_x509_certificate(pem).serial_number


# --- config ------------------------------------------------------------------------------


def test_a_certificate_with_keys_is_one_certificate_per_key_named_after_its_kind(
    config: Config,
) -> None:
    by_name = {c.name: c for c in config.certificates}
    assert list(by_name) == ["www.rsa", "www.ecdsa", "api"]
    rsa, ec = by_name["www.rsa"], by_name["www.ecdsa"]
    assert (rsa.group, rsa.key_kind, rsa.key_type, rsa.key.name) == ("www", "rsa", "rsa2048",
                                                                     "rsa.key")  # fmt: skip
    assert (ec.group, ec.key_kind, ec.key_type, ec.key.name) == ("www", "ecdsa", "ec256", "ec.key")
    assert rsa.domains == ec.domains == ("a.example.com", "b.example.com")
    # A single-key certificate is exactly as before.
    api = by_name["api"]
    assert (api.name, api.group, api.key_kind, api.label) == ("api", None, None, "api")
    assert [c.name for c in config.pair("www")] == ["www.rsa", "www.ecdsa"]
    assert [c.name for c in config.pair("www.ecdsa")] == ["www.rsa", "www.ecdsa"]
    assert config.expand_names(["api", "www.ecdsa"]) == ["www.rsa", "www.ecdsa", "api"]
    with pytest.raises(KeyError, match="'nope'"):
        config.expand_names(["nope"])


@pytest.mark.parametrize(
    "keys_toml, key, message",
    [
        (
            '[{ key = "r1.key", key_type = "rsa2048", generate_key = true },'
            ' { key = "r2.key", key_type = "rsa4096", generate_key = true }]',
            "certificates[0].keys[1]",
            "a second RSA key (rsa4096; keys[0] is rsa2048): list one key per type",
        ),
        (
            '[{ key = "e.key", key_type = "ec256", generate_key = true },'
            ' { key = "e.key", key_type = "rsa2048", generate_key = true }]',
            "certificates[0].keys[1].key",
            "is also keys[0].key",
        ),
        (
            '[{ key = "new.key", generate_key = true }]',
            "certificates[0].keys[0].key_type",
            "is required to create the key",
        ),
        ("[]", "certificates[0].keys", "must list at least one key"),
        ('["x.key"]', "certificates[0].keys[0]", "expected a table"),
        (
            '[{ key = "e.key", key_type = "ec256", generate_key = true, color = "red" }]',
            "certificates[0].keys[0].color",
            "unknown key",
        ),
    ],
)
def test_bad_keys_lists_are_refused_naming_file_and_key(
    tmp_path: Path, keys_toml: str, key: str, message: str
) -> None:
    path = write_config(
        tmp_path,
        f'[[certificates]]\nname = "www"\ndomains = ["a.example.com"]\nkeys = {keys_toml}\n',
    )
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}: {key}: "), str(e.value)
    assert message in str(e.value)


@pytest.mark.parametrize("single", ["key", "generate_key", "key_type", "csr"])
def test_single_key_settings_beside_keys_are_refused(tmp_path: Path, single: str) -> None:
    value = {"key": '"a.key"', "generate_key": "true", "key_type": '"ec256"', "csr": '"a.csr"'}
    path = write_config(
        tmp_path,
        '[[certificates]]\nname = "www"\ndomains = ["a.example.com"]\n'
        f"{single} = {value[single]}\n"
        'keys = [{ key = "e.key", key_type = "ec256", generate_key = true }]\n',
    )
    with pytest.raises(ConfigError, match=rf"certificates\[0\]\.{single}: .*inside `keys`"):
        load_config(path)


def test_key_type_of_an_existing_key_is_read_from_its_file(tmp_path: Path) -> None:
    keys.create_key_file(tmp_path / "old-rsa.key", "rsa3072")
    path = write_config(
        tmp_path,
        '[[certificates]]\nname = "www"\ndomains = ["a.example.com"]\n'
        'keys = [{ key = "old-rsa.key" },\n'
        '        { key = "e.key", key_type = "ec384", generate_key = true }]\n',
    )
    cfgs = {c.name: c for c in load_config(path).certificates}
    assert cfgs["www.rsa"].key_type == "rsa3072"
    assert cfgs["www.ecdsa"].key_type == "ec384"


def test_a_name_a_dual_certificate_stores_its_keys_under_is_taken(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        '[[certificates]]\nname = "www.rsa"\ndomains = ["x.example.com"]\n'
        'key = "x.key"\ngenerate_key = true\n' + DUAL.replace("    ", ""),
    )
    with pytest.raises(ConfigError, match=r"certificates\[1\]\.name: duplicate certificate "
                       r"name 'www.rsa' \(a certificate with `keys` stores"):  # fmt: skip
        load_config(path)


# --- renewal -----------------------------------------------------------------------------


def test_one_due_key_orders_both_and_the_pair_is_switched_together(config: Config) -> None:
    issuer = PairIssuer()
    results = run(renewer(config, issuer), "www.rsa")  # one key named: the pair renews
    assert {n: r.status for n, r in results.items()} == {"www.rsa": "renewed",
                                                         "www.ecdsa": "renewed"}  # fmt: skip
    assert sorted(str(n) for n in issuer.ordered) == ["www.ecdsa", "www.rsa"]
    st = FileStorage(config.state_dir)
    assert load_pair(st, "www") == currents(config)
    assert json.loads(st.load(layout.pair_key("www")))["group"] == "www"
    # Each key's own leaf, for its own key.
    for name, key_file in (("www.rsa", "rsa.key"), ("www.ecdsa", "ec.key")):
        gen = read_current(st, name)
        assert gen is not None
        leaf = x509.load_pem_x509_certificate(st.load(layout.generation_key(name, gen, "cert.pem")))
        key = keys.load_private_key(config.state_dir.parent / key_file)
        assert keys.same_public_key(leaf.public_key(), key)  # type: ignore[arg-type]

    # Nothing due: nothing ordered. Forced by the config's name: both again.
    issuer.ordered.clear()
    results = run(renewer(config, issuer))
    assert {n: r.status for n, r in results.items()} == {
        "www.rsa": "not-due", "www.ecdsa": "not-due", "api": "renewed",
    }  # fmt: skip
    assert issuer.ordered == ["api"]
    before = currents(config)
    results = run(renewer(config, issuer), "www", force=True)
    assert set(results) == {"www.rsa", "www.ecdsa"}
    after = currents(config)
    assert all(after[n] != before[n] for n in before)
    assert load_pair(st, "www") == after


def test_a_due_key_makes_its_pair_due_in_a_dry_run(config: Config, tmp_path: Path) -> None:
    issuer = PairIssuer()
    run(renewer(config, issuer))
    # The ECDSA key changed (a new key file): only it is due by itself.
    (tmp_path / "ec.key").unlink()
    keys.create_key_file(tmp_path / "ec.key", "ec256")
    results = run(renewer(config, issuer), dry=True)
    assert results["www.ecdsa"].status == "dry-run"
    assert "differs" in results["www.ecdsa"].reason
    assert results["www.rsa"].status == "dry-run"
    assert results["www.rsa"].reason == "would renew: its pair's other key is due"
    assert results["api"].status == "not-due"


def test_a_failed_ecdsa_order_keeps_the_old_pair_stored_and_reports_both(config: Config) -> None:
    issuer = PairIssuer()
    run(renewer(config, issuer))
    st = FileStorage(config.state_dir)
    old = currents(config)
    old_pointer = st.load(layout.pair_key("www"))
    issuer.fail = {"www.ecdsa"}
    issuer.ordered.clear()
    results = run(renewer(config, issuer), "www", force=True)
    assert sorted(str(n) for n in issuer.ordered) == ["www.ecdsa", "www.rsa"]
    ec_result, rsa_result = results["www.ecdsa"], results["www.rsa"]
    assert ec_result.status == "failed" and "refused for www.ecdsa" in ec_result.reason
    assert rsa_result.status == "failed" and rsa_result.error_type == "pair"
    assert "but not installed: the ecdsa order failed, so the old pair stays served" in (
        rsa_result.reason
    )
    assert rsa_result.serial is not None and int(rsa_result.serial, 16) == serial_of(
        config, "www.rsa"
    )  # the result names the served (old) serial
    assert currents(config) == old
    assert st.load(layout.pair_key("www")) == old_pointer
    # One generation each: the new RSA certificate was not stored beside the old one.
    for name in old:
        assert len(list((config.state_dir / "certificates" / name / "gen").iterdir())) == 1
    state = json.loads(st.load(layout.state_key("www.rsa")))
    assert state["last_attempt"]["result"] == "failed"


def test_first_issuance_with_a_failed_key_installs_the_other_alone_and_says_so(
    config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    issuer = PairIssuer()
    issuer.fail = {"www.ecdsa"}
    results = run(renewer(config, issuer), "www")
    assert results["www.ecdsa"].status == "failed"
    assert results["www.rsa"].status == "renewed"
    assert "installed alone: the ecdsa order failed and it had no certificate yet" in (
        results["www.rsa"].reason
    )
    assert "alone because it had no certificate yet" in caplog.text
    st = FileStorage(config.state_dir)
    assert currents(config)["www.ecdsa"] is None
    assert load_pair(st, "www") == {"www.rsa": currents(config)["www.rsa"]}
    # The next run completes the pair.
    issuer.fail = set()
    results = run(renewer(config, issuer), "www")
    assert {r.status for r in results.values()} == {"renewed"}
    assert load_pair(st, "www") == currents(config)


def test_a_key_about_to_expire_is_installed_alone_when_its_pair_fails(config: Config) -> None:
    issuer = PairIssuer()
    run(renewer(config, issuer))
    old = currents(config)
    # 1/30 of the lifetime left (< 1/20, the emergency threshold): the RSA key may go alone.
    late = issuer.now - 60 + issuer.lifetime - issuer.lifetime / 30
    issuer.now = late
    issuer.fail = {"www.ecdsa"}
    results = run(renewer(config, issuer, clock=lambda: late), "www")
    assert results["www.rsa"].status == "renewed"
    assert "installed alone" in results["www.rsa"].reason
    assert "less than 1/20 of its lifetime left" in results["www.rsa"].reason
    now = currents(config)
    assert now["www.rsa"] != old["www.rsa"] and now["www.ecdsa"] == old["www.ecdsa"]
    assert load_pair(FileStorage(config.state_dir), "www") == now


# --- start-up repair ---------------------------------------------------------------------


def _new_generation(config: Config, name: str) -> str:
    """Store a complete new generation of `name` (what a pair install does first)."""
    st = FileStorage(config.state_dir)
    issuer = PairIssuer()
    key = keys.load_private_key(config.certificate(name).key)
    pem = issuer.issue(keys.csr_pem(keys.build_csr(key, ["a.example.com", "b.example.com"])),
                       ["a.example.com", "b.example.com"]).fullchain_pem.encode()  # fmt: skip
    leaf, *chain = [x509.load_pem_x509_certificate(b"-----BEGIN" + p)
                    for p in pem.split(b"-----BEGIN")[1:]]  # fmt: skip
    meta = write_generation(st, name, leaf, chain, time.time() + 1, config.acme.directory)
    assert meta.generation is not None
    return meta.generation


def test_repair_rolls_a_half_switched_pair_forward(config: Config) -> None:
    run(renewer(config, PairIssuer()))
    st = FileStorage(config.state_dir)
    new = {n: _new_generation(config, n) for n in ("www.rsa", "www.ecdsa")}
    save_pair(st, "www", new)
    # Killed after the pair pointer and the RSA switch, before the ECDSA switch.
    st.store(layout.current_key("www.rsa"), new["www.rsa"].encode())
    prepare_state(config, st, bundles=False)
    assert currents(config) == new


def test_repair_drops_an_unpaired_new_generation_instead_of_adopting_it(config: Config) -> None:
    run(renewer(config, PairIssuer()))
    st = FileStorage(config.state_dir)
    old = currents(config)
    # Killed after the RSA generation was stored, before the pair pointer:
    # a single-key certificate would adopt it; one half of a pair must not be.
    new_rsa = _new_generation(config, "www.rsa")
    prepare_state(config, st, bundles=False)
    assert currents(config) == old
    gens = config.state_dir / "certificates" / "www.rsa" / "gen"
    assert sorted(p.name for p in gens.iterdir()) == [old["www.rsa"]]
    assert new_rsa not in {p.name for p in gens.iterdir()}


# --- metrics -----------------------------------------------------------------------------


def test_a_dual_certificates_keys_carry_a_key_type_label_and_single_keys_do_not() -> None:
    views = [
        CertificateView("www", 1.0, 2000.0, 1500.0, 5.0, {"i": True}, {"i": True}, "rsa4096"),
        CertificateView("www", 1.0, 3000.0, 2500.0, 5.0, {"i": False}, {"i": True}, "ec256"),
        CertificateView("api", 1.0, 4000.0, 3500.0, 5.0, {"i": True}),
    ]
    text = Metrics(lambda: views).render().decode()
    assert (
        'haproxy_acme_certificate_expiration_timestamp_seconds{certificate="www",'
        'key_type="rsa4096"} 2000.0' in text
    )
    assert (
        'haproxy_acme_certificate_expiration_timestamp_seconds{certificate="www",'
        'key_type="ec256"} 3000.0' in text
    )
    assert 'haproxy_acme_certificate_expiration_timestamp_seconds{certificate="api"} 4000.0' in text
    assert (
        'haproxy_acme_haproxy_in_sync{certificate="www",instance="i",key_type="ec256"} 0.0' in text
    )
    assert 'haproxy_acme_haproxy_in_sync{certificate="api",instance="i"} 1.0' in text
    assert text.count("# TYPE haproxy_acme_haproxy_in_sync gauge") == 1


# --- daemon ------------------------------------------------------------------------------


def test_the_daemon_renews_a_pair_in_one_task_and_reschedules_both_keys(config: Config) -> None:
    import asyncio
    import random

    from agent.daemon import Daemon

    issuer = PairIssuer()

    async def main() -> None:
        daemon = Daemon(config, rng=random.Random(7))
        daemon.renewer.issuer = issuer  # type: ignore[assignment]
        await daemon._schedule_all()
        # Both keys are due (nothing stored): the scheduler starts ONE pair renewal.
        daemon._tick()
        pair_tasks = [k for k in daemon._renewals if k.startswith("\0pair:")]
        assert len(pair_tasks) == 1 and len(daemon._renewals) == 2  # the pair + "api"
        await asyncio.gather(*daemon._renewals.values())
        assert sorted(str(n) for n in issuer.ordered) == ["api", "www.ecdsa", "www.rsa"]
        for name in ("www.rsa", "www.ecdsa"):
            st = daemon.states[name]
            assert not st.running and st.meta is not None and st.meta.installed
            assert st.next_at > time.time() + 30 * DAY  # rescheduled from its new leaf
        # The control socket takes the config's name; each key gets its own result.
        issuer.fail = {"www.ecdsa"}
        reply = await daemon._control({"cmd": "renew", "names": ["www"], "force": True})
        assert reply["ok"], reply
        got = {r["name"]: r["status"] for r in reply["results"]}
        assert got == {"www.rsa": "failed", "www.ecdsa": "failed"}
        assert issuer.ordered.count("www.rsa") == 2  # ordered once more, not twice
        assert all(daemon.states[n].failures == 1 for n in ("www.rsa", "www.ecdsa"))
        text = daemon.metrics.render().decode()
        assert 'certificate="www",key_type="rsa2048"' in text
        assert 'haproxy_acme_acme_errors_total{type="order"} 1.0' in text

    asyncio.run(main())


def test_pins_of_a_dual_certificate_list_both_keys_in_each_header_and_rrset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Both keys are served for the same names: a client pinning the site must
    accept either, so each key's header and TLSA RRset carries the other key."""
    import json

    from agent import keys
    from agent.cli import main

    path = write_config(tmp_path)
    assert main(["pins", "-c", str(path), "--json", "www"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    rsa_pin = keys.spki_pin(keys.load_private_key(tmp_path / "rsa.key"))
    ec_pin = keys.spki_pin(keys.load_private_key(tmp_path / "ec.key"))
    assert set(rows) == {"www.rsa", "www.ecdsa"}
    for name, own, other in (("www.rsa", rsa_pin, ec_pin), ("www.ecdsa", ec_pin, rsa_pin)):
        row = rows[name]
        assert row["key_pin"] == own and row["pair_pins"] == [other]
        assert f'pin-sha256="{own}"' in row["hpkp"] and f'pin-sha256="{other}"' in row["hpkp"]
        rrset = "\n".join(row["tlsa_rrset"])
        assert keys.pin_to_tlsa(own) in rrset and keys.pin_to_tlsa(other) in rrset
    assert main(["pins", "-c", str(path), "api"]) == 0
    assert "pair" not in capsys.readouterr().out
