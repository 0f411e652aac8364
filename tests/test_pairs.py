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


# --- key rollover, per key type ------------------------------------------------------------

ROLLING = """\
    [[certificates]]
    name = "www"
    domains = ["a.example.com", "b.example.com"]
    announce_for = "10d"
    previous_pin_for = "20d"
    backup_pins = ["{spare}"]
    keys = [
      {{ key = "rsa.key", key_type = "rsa2048", generate_key = true, generate_next_key = true }},
      {{ key = "ec.key", key_type = "ec256", generate_key = true, generate_next_key = true }},
    ]
"""


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def rolling(tmp_path: Path) -> Config:
    spare = keys.spki_pin(keys.generate_private_key("ec256"))
    return load_config(write_config(tmp_path, ROLLING.format(spare=spare)))


def key_state(config: Config, name: str) -> Any:
    from agent.certstate import load_state

    return load_state(FileStorage(config.state_dir), name).keys


def stored_pin(config: Config, name: str) -> str:
    from agent.certstate import load_meta

    meta = load_meta(FileStorage(config.state_dir), name)
    assert meta is not None and meta.key_pin is not None
    return meta.key_pin


def bundle_key_pin(config: Config, name: str) -> str:
    """The pin of the key in the bundle a deploy builds now (its leaf must match it)."""
    from agent.deploy import stored_target
    from tests.support.bundles import bundle_pin

    target = stored_target(config.certificate(name), FileStorage(config.state_dir))
    assert target is not None
    return bundle_pin(target.bundle)


def announce_both(config: Config, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    from agent.cli import main

    assert main(["pins", "-c", str(config.path), "--json", "www"]) == 0
    return {r["name"]: r for r in json.loads(capsys.readouterr().out)}


def test_next_keys_are_set_per_key_type_inside_keys(rolling: Config, tmp_path: Path) -> None:
    rsa, ec = rolling.certificate("www.rsa"), rolling.certificate("www.ecdsa")
    assert rsa.generate_next_key and ec.generate_next_key
    assert rsa.announce_for == ec.announce_for == 10 * DAY
    keys.create_key_file(tmp_path / "ec-next.key", "ec256")
    path = write_config(tmp_path, textwrap.dedent("""\
        [[certificates]]
        name = "www"
        domains = ["a.example.com"]
        rollover_at = 2027-03-01T00:00:00Z
        keys = [
          { key = "rsa.key", key_type = "rsa2048", generate_key = true },
          { key = "ec.key", key_type = "ec256", generate_key = true, next_key = "ec-next.key" },
        ]
    """))  # fmt: skip
    cfgs = {c.name: c for c in load_config(path).certificates}
    assert cfgs["www.ecdsa"].next_key == tmp_path / "ec-next.key"
    assert cfgs["www.rsa"].next_key is None and not cfgs["www.rsa"].generate_next_key
    assert cfgs["www.rsa"].rollover_at == cfgs["www.ecdsa"].rollover_at == 1803859200.0


@pytest.mark.parametrize(
    "entries, outside, key, message",
    [
        ('{ key = "rsa.key", key_type = "rsa2048", generate_key = true },'
         '{ key = "ec.key", key_type = "ec256", generate_key = true }',
         "generate_next_key = true", "certificates[0].generate_next_key",
         "set generate_next_key inside `keys`"),
        ('{ key = "rsa.key", key_type = "rsa2048", generate_key = true },'
         '{ key = "ec.key", key_type = "ec256", generate_key = true }',
         'next_key = "rsa-next.key"', "certificates[0].next_key", "set next_key inside `keys`"),
        ('{ key = "rsa.key", key_type = "rsa2048", generate_key = true },'
         '{ key = "ec.key", key_type = "ec256", generate_key = true, next_key = "rsa-next.key" }',
         "", "certificates[0].keys[1].next_key", "holds a RSA 2048 key, not 'ec256'"),
        ('{ key = "rsa-next.key", key_type = "rsa2048", next_key = "rsa-next.key" }',
         "", "certificates[0].keys[0].next_key", "the certificate's key itself"),
        ('{ key = "ec.key", key_type = "ec256", generate_key = true, next_key = "nope.key" }',
         "", "certificates[0].keys[0].next_key", "set generate_next_key = true to create it"),
    ],
)  # fmt: skip
def test_bad_next_keys_of_a_dual_certificate_are_refused_naming_file_and_key(
    tmp_path: Path, entries: str, outside: str, key: str, message: str
) -> None:
    keys.create_key_file(tmp_path / "rsa-next.key", "rsa2048")
    path = write_config(
        tmp_path,
        f'[[certificates]]\nname = "www"\ndomains = ["a.example.com"]\n{outside}\n'
        f"keys = [{entries}]\n",
    )
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}: {key}: "), str(e.value)
    assert message in str(e.value)


def test_a_next_key_beside_a_csr_in_one_keys_entry_is_refused(tmp_path: Path) -> None:
    key = keys.create_key_file(tmp_path / "ec.key", "ec256")
    (tmp_path / "ec.csr").write_bytes(keys.csr_pem(keys.build_csr(key, ["a.example.com"])))
    path = write_config(
        tmp_path,
        '[[certificates]]\nname = "www"\ndomains = ["a.example.com"]\n'
        'keys = [{ key = "ec.key", csr = "ec.csr", generate_next_key = true }]\n',
    )
    with pytest.raises(ConfigError, match=r"certificates\[0\]\.keys\[0\]\.generate_next_key: "
                       r".*remove csr"):  # fmt: skip
        load_config(path)


def test_scheduled_rollover_of_a_pair_waits_for_announce_for_then_switches_both_keys(
    rolling: Config, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from agent.cli import main
    from agent.renewal import certificate_status

    clock, issuer = Clock(), PairIssuer()
    r = renewer(rolling, issuer, clock)
    assert {x.status for x in run(r).values()} == {"renewed"}
    files = {"www.rsa": tmp_path / "rsa.key", "www.ecdsa": tmp_path / "ec.key"}
    old_files = {n: f.read_bytes() for n, f in files.items()}
    old_pins = {n: stored_pin(rolling, n) for n in old_files}
    shown = announce_both(rolling, capsys)
    nxt = {n: shown[n]["next"]["pin"] for n in old_files}
    # During the rollover each key type's header and RRset carry both key types' keys.
    for n, row in shown.items():
        (other,) = set(old_files) - {n}
        assert row["pair_pins"] == [old_pins[other], nxt[other]]
        for pin in (old_pins[n], nxt[n], old_pins[other], nxt[other]):
            assert f'pin-sha256="{pin}"' in row["hpkp"]
            assert any(keys.pin_to_tlsa(pin) in line for line in row["tlsa_rrset"])
    assert main(["keys", "rollover", "www", "-c", str(rolling.path)]) == 0
    out = capsys.readouterr().out
    assert "www.rsa: rollover requested: rollover asked for, waiting" in out, out
    assert "www.ecdsa: rollover requested: rollover asked for, waiting" in out, out

    clock.now += 9 * DAY  # announced for 9 of 10 days: no switch
    results = run(r)
    assert {n: x.status for n, x in results.items()} == {"www.rsa": "not-due",
                                                         "www.ecdsa": "not-due"}  # fmt: skip
    assert {n: stored_pin(rolling, n) for n in old_pins} == old_pins
    rows = {row["name"]: row for row in certificate_status(rolling, clock.now, r.storage)}
    for n in old_pins:
        kr = rows[n]["key_rollover"]
        assert rows[n]["key_type"] == rolling.certificate(n).key_type
        assert kr["requested"] and not kr["due"] and "waiting" in kr["why"]
        assert kr["allowed_at"] == pytest.approx(shown[n]["next"]["announced_at"] + 10 * DAY)

    clock.now += DAY + 60
    results = run(r)
    assert {x.status for x in results.values()} == {"renewed"}, results
    assert all("key rollover" in x.reason for x in results.values()), results
    for n in old_pins:
        assert stored_pin(rolling, n) == nxt[n] == bundle_key_pin(rolling, n)
        ks = key_state(rolling, n)
        assert [p.pin for p in ks.previous] == [old_pins[n]]
        assert ks.switch is None and ks.request is None
        assert ks.next is not None and ks.next.pin not in (old_pins[n], nxt[n])  # a fresh one
    assert {n: f.read_bytes() for n, f in files.items()} == old_files  # old keys untouched
    assert load_pair(r.storage, "www") == currents(rolling)
    after = announce_both(rolling, capsys)
    for n in old_pins:
        assert after[n]["key_pin"] == nxt[n]
        assert [p["pin"] for p in after[n]["previous"]] == [old_pins[n]]
    # The next ordinary renewal of the pair stays on the new keys: each generation
    # records the key it was ordered for, and its bundle is built from that key.
    clock.now += 60
    assert {x.status for x in run(r, "www", force=True).values()} == {"renewed"}
    for n in old_pins:
        assert stored_pin(rolling, n) == nxt[n] == bundle_key_pin(rolling, n)


def test_a_failed_order_of_a_switching_key_keeps_the_old_pair_and_the_switch_pending(
    rolling: Config, capsys: pytest.CaptureFixture[str]
) -> None:
    from agent.cli import main

    clock, issuer = Clock(), PairIssuer()
    r = renewer(rolling, issuer, clock)
    run(r)
    old_pins = {n: stored_pin(rolling, n) for n in ("www.rsa", "www.ecdsa")}
    old = currents(rolling)
    nxt = {n: row["next"]["pin"] for n, row in announce_both(rolling, capsys).items()}
    assert main(["keys", "rollover", "www", "-c", str(rolling.path)]) == 0
    clock.now += 10 * DAY + 60
    issuer.fail = {"www.ecdsa"}
    results = run(r)
    assert results["www.ecdsa"].status == "failed" and "refused" in results["www.ecdsa"].reason
    assert results["www.rsa"].status == "failed" and results["www.rsa"].error_type == "pair"
    assert currents(rolling) == old
    for n in old_pins:  # the old pair, each bundle with its own (old) key
        assert stored_pin(rolling, n) == old_pins[n] == bundle_key_pin(rolling, n)
        ks = key_state(rolling, n)
        assert ks.switch is not None and ks.switch.new.pin == nxt[n]  # retried next time
        assert ks.previous == ()
    issuer.fail = set()
    results = run(r)
    assert {x.status for x in results.values()} == {"renewed"}, results
    for n in old_pins:
        assert stored_pin(rolling, n) == nxt[n] == bundle_key_pin(rolling, n)
        assert key_state(rolling, n).switch is None


def test_rolling_one_key_type_switches_only_that_key(
    rolling: Config, capsys: pytest.CaptureFixture[str]
) -> None:
    from agent.cli import main

    clock, issuer = Clock(), PairIssuer()
    r = renewer(rolling, issuer, clock)
    run(r)
    old_pins = {n: stored_pin(rolling, n) for n in ("www.rsa", "www.ecdsa")}
    nxt = {n: row["next"]["pin"] for n, row in announce_both(rolling, capsys).items()}
    assert main(["keys", "rollover", "www.rsa", "-c", str(rolling.path)]) == 0
    assert "www.ecdsa" not in capsys.readouterr().out
    assert key_state(rolling, "www.ecdsa").request is None
    clock.now += 10 * DAY + 60
    results = run(r)
    assert {x.status for x in results.values()} == {"renewed"}, results  # renewed as a pair
    assert results["www.ecdsa"].reason.startswith("with its pair (rsa: key rollover")
    assert stored_pin(rolling, "www.rsa") == nxt["www.rsa"] == bundle_key_pin(rolling, "www.rsa")
    assert stored_pin(rolling, "www.ecdsa") == old_pins["www.ecdsa"]
    assert bundle_key_pin(rolling, "www.ecdsa") == old_pins["www.ecdsa"]
    ec = key_state(rolling, "www.ecdsa")
    assert ec.previous == () and ec.next is not None and ec.next.pin == nxt["www.ecdsa"]
    assert [p.pin for p in key_state(rolling, "www.rsa").previous] == [old_pins["www.rsa"]]


class Killed(BaseException):
    """Stands for a kill -9 inside a pair install."""


def test_a_kill_between_the_switches_of_a_rolling_pair_ends_on_the_new_keys(
    rolling: Config, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from agent import pairs
    from agent.cli import main

    clock, issuer = Clock(), PairIssuer()
    r = renewer(rolling, issuer, clock)
    run(r)
    nxt = {n: row["next"]["pin"] for n, row in announce_both(rolling, capsys).items()}
    assert main(["keys", "rollover", "www", "-c", str(rolling.path)]) == 0
    clock.now += 10 * DAY + 60
    real_switch = pairs.switch_generation  # type: ignore[attr-defined]
    switched: list[str] = []

    def switch(storage: Any, name: str, gen_id: str) -> None:
        if switched:
            raise Killed(name)
        switched.append(name)
        real_switch(storage, name, gen_id)

    monkeypatch.setattr(pairs, "switch_generation", switch)
    with pytest.raises(Killed):
        r._renew_unit(rolling.pair("www"), False, clock.now)
    monkeypatch.setattr(pairs, "switch_generation", real_switch)
    # Torn: one key type's pointer moved. Its bundle already pairs its new leaf
    # with its new key (the generation names the key it was ordered for).
    (first,) = switched
    assert bundle_key_pin(rolling, first) == nxt[first]
    prepare_state(rolling, r.storage, bundles=False)  # the start-up repair rolls forward
    run(r)
    for n in nxt:
        assert stored_pin(rolling, n) == nxt[n] == bundle_key_pin(rolling, n)
        ks = key_state(rolling, n)
        assert ks.switch is None and ks.current is not None and ks.current.pin == nxt[n]


def test_an_emergency_rollover_of_a_dual_certificate_picks_the_backup_keys_type(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from agent.cli import _rollover_targets, main

    rsa_backup, ec_backup = tmp_path / "rsa-backup.key", tmp_path / "ec-backup.key"
    keys.create_key_file(rsa_backup, "rsa2048")
    keys.create_key_file(ec_backup, "ec256")
    pins = [keys.spki_pin(keys.load_private_key(p)) for p in (rsa_backup, ec_backup)]
    config = load_config(write_config(tmp_path, DUAL.replace(
        'name = "www"', f'name = "www"\nbackup_pins = {json.dumps(pins)}')))  # fmt: skip
    assert [c.name for c in _rollover_targets(config, "www", str(rsa_backup))[0]] == ["www.rsa"]
    assert [c.name for c in _rollover_targets(config, "www", str(ec_backup))[0]] == ["www.ecdsa"]
    targets, why = _rollover_targets(config, "www.ecdsa", str(rsa_backup))
    assert targets == [] and why is not None
    assert "www.ecdsa: --to " in why and "is an RSA key, but www.ecdsa is not (name www or " \
        "www.rsa)" in why  # fmt: skip
    one = load_config(write_config(tmp_path, textwrap.dedent("""\
        [[certificates]]
        name = "solo"
        domains = ["a.example.com"]
        keys = [{ key = "ec.key", key_type = "ec256", generate_key = true }]
    """)))  # fmt: skip
    rc = main(["keys", "rollover", "solo", "-c", str(one.path), "--now", "--to", str(rsa_backup)])
    assert rc == 1
    assert "is an RSA key, but solo is not (solo has no RSA key)" in capsys.readouterr().err
    assert key_state(one, "solo.ecdsa") is None


def test_a_group_rollover_needs_a_key_type_with_a_next_key(
    config: Config, capsys: pytest.CaptureFixture[str]
) -> None:
    from agent.cli import main

    assert main(["keys", "rollover", "www", "-c", str(config.path)]) == 1
    assert "none of its keys has a next key" in capsys.readouterr().err


def test_rollover_metrics_carry_each_key_type_of_a_dual_certificate(
    rolling: Config, capsys: pytest.CaptureFixture[str]
) -> None:
    import asyncio
    import random

    from agent.daemon import Daemon

    run(renewer(rolling, PairIssuer()))
    announce_both(rolling, capsys)

    async def main() -> str:
        daemon = Daemon(rolling, rng=random.Random(7))
        await daemon._schedule_all()
        return daemon.metrics.render().decode()

    text = asyncio.run(main())
    for kt in ("rsa2048", "ec256"):
        assert (f'haproxy_acme_key_rollover_state{{certificate="www",key="{kt}",'
                f'key_type="{kt}"}} 1.0') in text, text  # fmt: skip
        assert f'haproxy_acme_key_served_pinned{{certificate="www",key="{kt}",key_type="{kt}"}}' \
            in text  # fmt: skip
        assert (f'haproxy_acme_key_announce_for_seconds{{certificate="www",key="{kt}",'
                f'key_type="{kt}"}} 864000.0') in text  # fmt: skip


def test_an_emergency_switch_of_one_key_type_revokes_only_its_old_leaf(tmp_path: Path) -> None:
    from pathlib import Path as P

    from agent import rollover
    from agent.cli import _rollover_targets

    class RevokingIssuer(PairIssuer):
        def __init__(self) -> None:
            super().__init__()
            self.revoked: list[tuple[int, str, int]] = []

        def revoke_with_key(self, cert: x509.Certificate, key: Any, reason: int) -> None:
            self.revoked.append((cert.serial_number, keys.spki_pin(key), reason))

    backup = tmp_path / "rsa-backup.key"
    keys.create_key_file(backup, "rsa2048")
    spare = keys.spki_pin(keys.generate_private_key("ec256"))
    bpin = keys.spki_pin(keys.load_private_key(backup))
    config = load_config(write_config(tmp_path, DUAL.replace(
        'name = "www"', f'name = "www"\nbackup_pins = ["{bpin}", "{spare}"]')))  # fmt: skip
    clock, issuer = Clock(), RevokingIssuer()
    r = renewer(config, issuer, clock)
    run(r)
    old = {n: (stored_pin(config, n), serial_of(config, n)) for n in ("www.rsa", "www.ecdsa")}
    (cfg,) = _rollover_targets(config, "www", str(backup))[0]
    request, _ = rollover.emergency_request(cfg, P(backup), old[cfg.name][0], clock.now,
                                            revoke=True, force_unannounced=False)  # fmt: skip
    with r.storage.locked(layout.cert_lock(cfg.name)):
        rollover.record_request(r.storage, cfg, request)
    results = run(r, "www")
    assert {x.status for x in results.values()} == {"renewed"}, results
    assert results["www.rsa"].reason == "key rollover"
    assert results["www.ecdsa"].reason.startswith("with its pair (rsa: key rollover")
    assert stored_pin(config, "www.rsa") == bpin == bundle_key_pin(config, "www.rsa")
    assert stored_pin(config, "www.ecdsa") == old["www.ecdsa"][0]
    assert bundle_key_pin(config, "www.ecdsa") == old["www.ecdsa"][0]
    rsa_pin, rsa_serial = old["www.rsa"]
    assert issuer.revoked == [(rsa_serial, rsa_pin, rollover.KEY_COMPROMISE)]
    assert key_state(config, "www.rsa").revoke is None


def test_a_holder_whose_lease_ran_out_cannot_switch_a_pair_over_a_newer_one(
    config: Config,
) -> None:
    """Node A takes the pair's locks and orders, then freezes past its lease; B
    takes over and installs a pair. A's install is refused (fenced on the
    pair's first lock), names the node, and leaves none of its generations:
    B's pair stays stored."""
    from agent import pairs
    from agent.certstate import load_meta

    issuer = PairIssuer()
    assert all(r.status == "renewed" for r in run(renewer(config, issuer), "www.rsa",
                                                  "www.ecdsa").values())  # fmt: skip
    st_a, st_b = FileStorage(config.state_dir), FileStorage(config.state_dir)
    ra = Renewer(config, MemoryChallengeRegistry(), st_a, issuer=issuer)  # type: ignore[arg-type]
    rb = Renewer(config, MemoryChallengeRegistry(), st_b, issuer=issuer)  # type: ignore[arg-type]
    unit = sorted((config.certificate("www.rsa"), config.certificate("www.ecdsa")),
                  key=lambda c: c.name)  # fmt: skip
    # No lease keeper: A is "frozen" from here on.
    tokens_a = {c.name: st_a.lock(layout.cert_lock(c.name), timeout=1, expires_after=0.2)
                for c in unit}  # fmt: skip
    checked_a = {}
    for c in unit:
        got = ra._order_checked(c, load_meta(st_a, c.name))
        assert not isinstance(got, RenewResult), got
        checked_a[c.name] = got
    time.sleep(0.3)  # A's leases ran out
    assert all(r.status == "renewed" for r in run(rb, "www.rsa", "www.ecdsa",
                                                  force=True).values())  # fmt: skip
    pair_b = load_pair(st_b, "www")
    # A froze right AFTER renewing its leases (the last check before the commit),
    # so only the fenced commit stands between it and B's pair.
    st_a.renew_lock = lambda *args, **kwargs: None  # type: ignore[method-assign]
    results = pairs._install(
        ra, unit, "www", checked_a, {c.name: "test" for c in unit}, tokens_a, alone=None,
        switches={}, key_paths={c.name: c.key for c in unit},
    )  # fmt: skip
    for c in unit:
        r = results[c.name]
        assert r.failed and r.error_type == "fence", r
        assert f"node {ra.node}" in r.reason
    assert load_pair(st_b, "www") == pair_b
    assert currents(config) == pair_b
    for c in unit:
        serial_a = format(checked_a[c.name].leaf.serial_number, "x")
        for key in st_b.list(layout.generations_prefix(c.name)):
            gen = key.rsplit("/", 1)[1]
            meta = json.loads(st_b.load(layout.generation_key(c.name, gen, layout.META)))
            assert meta["serial"] != serial_a  # A's generation is gone
