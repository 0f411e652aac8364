"""The renewal rule, the pre-install checks, and a renewal run with a stand-in issuer.

The stand-in issuer signs whatever CSR it gets with a throwaway CA (or fails
on purpose); the real ACME path is proven in the Pebble integration tests.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import stat
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent import ari, keys, ratelimit
from agent.challenges import MemoryChallengeRegistry
from agent.config import CertificateConfig, Config, load_config
from agent.issuer import (
    AcmeTimeout,
    AcmeUnreachable,
    IssuedCertificate,
    RateLimited,
    ReplacesRefused,
)
from agent.renewal import (
    CertificateRejected,
    CertMeta,
    Renewer,
    certificate_status,
    check_certificate,
    load_meta,
    make_bundle,
    next_renewal_time,
    renewal_decision,
)
from agent.storage import FileStorage
from tests.support.issued import TinyCA

DAY = 86400.0
NOW = 1_800_000_000.0


def cfg(
    domains: Sequence[str] = ("a.example.com",), renew_before: float | None = None
) -> CertificateConfig:
    return CertificateConfig(
        name="www", domains=tuple(domains), key=Path("/k"), renew_before=renew_before
    )


def meta(lifetime_days: float, age_days: float = 0.0, **kw: Any) -> CertMeta:
    nb = NOW - age_days * DAY
    fields: dict[str, Any] = {
        "name": "www",
        "domains": ("a.example.com",),
        "serial": "01",
        "not_before": nb,
        "not_after": nb + lifetime_days * DAY,
        **kw,
    }
    return CertMeta(**fields)


# --- the rule --------------------------------------------------------------------------


def test_no_certificate_is_due_now() -> None:
    assert renewal_decision(None, cfg(), NOW, None) == (NOW, "no certificate yet")
    assert next_renewal_time(CertMeta(name="www"), cfg(), NOW, None) == NOW


@pytest.mark.parametrize("lifetime", [90, 45, 6])
def test_renews_when_a_third_of_the_lifetime_is_left(lifetime: int) -> None:
    when = next_renewal_time(meta(lifetime), cfg(), NOW, None)
    assert when == pytest.approx(NOW + lifetime * DAY * 2 / 3)


def test_renew_before_overrides_the_third_rule_and_ari() -> None:
    window = ari.RenewalWindow("id", NOW, NOW + DAY, NOW + DAY / 2, NOW + 3600)
    when = next_renewal_time(meta(90), cfg(renew_before=10 * DAY), NOW, window)
    assert when == pytest.approx(NOW + 80 * DAY)


def test_renew_before_longer_than_the_lifetime_is_due_at_once() -> None:
    assert next_renewal_time(meta(6), cfg(renew_before=30 * DAY), NOW, None) <= NOW


def test_ari_window_point_is_used_when_the_ca_offers_one() -> None:
    window = ari.RenewalWindow("id", NOW + 70 * DAY, NOW + 72 * DAY, NOW + 71 * DAY, NOW)
    when, why = renewal_decision(meta(90), cfg(), NOW, window)
    assert when == NOW + 71 * DAY
    assert "ARI" in why


def test_emergency_beats_a_late_ari_window() -> None:
    window = ari.RenewalWindow("id", NOW + 89 * DAY, NOW + 90 * DAY, NOW + 89.5 * DAY, NOW)
    when, why = renewal_decision(meta(90), cfg(), NOW, window)
    assert when == pytest.approx(NOW + 90 * DAY - 4.5 * DAY)
    assert "1/20" in why


def test_changed_domains_are_due_now() -> None:
    when, why = renewal_decision(meta(90), cfg(["a.example.com", "b.example.com"]), NOW, None)
    assert (when, why) == (NOW, "domains changed")


def test_rate_limit_retry_time_postpones_renewal() -> None:
    m = meta(6, age_days=5.9, retry_not_before=NOW + 3600)
    assert next_renewal_time(m, cfg(), NOW, None) == NOW + 3600


# --- checks ----------------------------------------------------------------------------

CA = TinyCA()
KEY = ec.generate_private_key(ec.SECP256R1())
OTHER = ec.generate_private_key(ec.SECP256R1())
T = time.time()


def chain_for(key: Any = KEY, domains: Sequence[str] = ("a.example.com",), **kw: Any) -> bytes:
    kw.setdefault("not_before", T - 60)
    kw.setdefault("not_after", T + 90 * DAY)
    return CA.fullchain(CA.leaf(key, domains, **kw))


def test_good_chain_passes_and_splits_into_leaf_and_chain() -> None:
    checked = check_certificate(chain_for(), KEY, ["a.example.com"], [], T)
    assert keys.spki_pin(checked.leaf.public_key()) == keys.spki_pin(KEY)  # type: ignore[arg-type]
    assert checked.chain == (CA.intermediate,)
    assert checked.fullchain_pem == checked.cert_pem + checked.chain_pem


@pytest.mark.parametrize(
    "pem, domains, message",
    [
        (lambda: chain_for(OTHER), ["a.example.com"], "not the stable key"),
        (lambda: chain_for(domains=["b.example.com"]), ["a.example.com"], "are not the configured"),
        (lambda: chain_for(not_after=T - 1), ["a.example.com"], "expired"),
        (lambda: chain_for(signer=OTHER), ["a.example.com"], "chain does not verify"),
        (lambda: b"<html>oops</html>", ["a.example.com"], "no PEM certificate"),
        (
            lambda: b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            ["a.example.com"],
            "does not parse",
        ),
    ],
)
def test_bad_certificates_are_refused(pem: Any, domains: list[str], message: str) -> None:
    with pytest.raises(CertificateRejected, match=message):
        check_certificate(pem(), KEY, domains, [], T)


def test_backup_pins_must_announce_a_real_backup() -> None:
    own = keys.spki_pin(KEY)
    with pytest.raises(CertificateRejected, match="only the key's own pin"):
        check_certificate(chain_for(), KEY, ["a.example.com"], [own], T)
    backup = base64.b64encode(b"\x02" * 32).decode()
    check_certificate(chain_for(), KEY, ["a.example.com"], [backup], T)


def test_bundle_is_fullchain_key_dhparam_without_blank_lines() -> None:
    b = make_bundle(b"CERT\n\nCHAIN\n", b"KEY\r\n", b"\nDH\n")
    assert b == b"CERT\nCHAIN\nKEY\nDH\n"


# --- a renewal run ---------------------------------------------------------------------


class StandInIssuer:
    """Signs the CSR with TinyCA; `fail` makes it raise instead."""

    def __init__(self, renewal_info: ari.RenewalWindow | None = None) -> None:
        self.fail: Exception | None = None
        self.replaces: list[str | None] = []
        self.window = renewal_info
        self.wrong_key = False
        self.lifetime = 90 * DAY

    @property
    def renewal_info_url(self) -> str | None:
        return "http://ca/ari" if self.window else None

    def connect(self) -> None:
        if isinstance(self.fail, AcmeUnreachable):
            raise self.fail

    def renewal_info(self, cert: x509.Certificate, previous: Any = None) -> Any:
        if self.window is None:
            return None
        from dataclasses import replace

        return replace(self.window, cert_id=ari.cert_id(cert))

    def issue(
        self,
        csr_pem: bytes,
        domains: Sequence[str],
        replaces: str | None = None,
        *,
        challenge: str = "http-01",
        cert_name: str | None = None,
    ) -> IssuedCertificate:
        self.replaces.append(replaces)
        if self.fail is not None:
            raise self.fail
        csr = x509.load_pem_x509_csr(csr_pem)
        key = OTHER if self.wrong_key else csr.public_key()
        now = time.time()
        leaf = CA.leaf(
            key,  # type: ignore[arg-type]
            list(domains),
            now - 60,
            now - 60 + self.lifetime,
            serial=int(now * 1000),
        )
        return IssuedCertificate(CA.fullchain(leaf).decode(), "http://ca/order/1")


@pytest.fixture
def config(tmp_path: Path) -> Config:
    # The chains TinyCA issues lead to its private root: trust it as a CA's root.
    (tmp_path / "roots.pem").write_bytes(CA.root.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "config.toml").write_text(
        textwrap.dedent(
            """\
            state_dir = "state"
            [acme]
            directory = "https://127.0.0.1:1/dir"
            trusted_roots = "roots.pem"
            [[certificates]]
            name = "www"
            domains = ["a.example.com", "b.example.com"]
            key = "www.key"
            generate_key = true
            [[certificates]]
            name = "api"
            domains = ["api.example.com"]
            key = "api.key"
            generate_key = true
            key_type = "ec384"
            """
        )
    )
    return load_config(tmp_path / "config.toml")


def run(config: Config, issuer: StandInIssuer, *names: str, force: bool = False,
        dry_run: bool = False, on_installed: Any = None) -> dict[str, Any]:  # fmt: skip
    renewer = Renewer(
        config,
        MemoryChallengeRegistry(),
        issuer=issuer,
        on_installed=on_installed,  # type: ignore[arg-type]
    )
    return {r.name: r for r in renewer.run(list(names) or None, force, dry_run)}


def mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def current_dir(config: Config, name: str) -> Path:
    """The directory of the generation `current` points to."""
    d = config.state_dir / "certificates" / name
    return d / "gen" / (d / "current").read_text()


def generations(config: Config, name: str) -> list[str]:
    return sorted(p.name for p in (config.state_dir / "certificates" / name / "gen").iterdir())


def no_key_anywhere(root: Path, key_pem: bytes) -> None:
    """No file below `root` holds a private key, in any form."""
    body = b"".join(key_pem.strip().splitlines()[1:-1])
    for p in root.rglob("*"):
        if p.is_file() and p.parent.name != "accounts" and "accounts" not in p.parts:
            data = p.read_bytes()
            assert b"PRIVATE KEY" not in data, p
            assert body[:40] not in data.replace(b"\n", b"").replace(b"\n", b""), p


def test_first_run_issues_everything_with_safe_modes(config: Config) -> None:
    installed: list[str] = []
    results = run(config, StandInIssuer(), on_installed=installed.append)
    assert {n: r.status for n, r in results.items()} == {"www": "renewed", "api": "renewed"}
    assert sorted(installed) == ["api", "www"]
    state = config.state_dir
    assert mode(state) == 0o700
    d = current_dir(config, "www")
    assert sorted(p.name for p in d.iterdir()) == [
        "cert.pem", "chain.pem", "fullchain.pem", "meta.json",
    ]  # fmt: skip
    assert mode(config.certificate("www").key) == 0o600
    assert len(generations(config, "www")) == 1
    # The state dir holds no private key at all: the bundle is built at deploy time.
    no_key_anywhere(state, config.certificate("www").key.read_bytes())
    fullchain = (d / "fullchain.pem").read_bytes()
    assert fullchain == (d / "cert.pem").read_bytes() + (d / "chain.pem").read_bytes()
    m = load_meta(FileStorage(state), "www")
    assert m is not None and m.serial == results["www"].serial
    assert m.generation == d.name
    assert m.last_attempt is not None and m.last_attempt.result == "success"
    assert keys.describe_key(keys.load_private_key(config.certificate("api").key)) == "ECDSA P-384"


def test_second_run_is_idempotent_and_force_keeps_the_previous_generation(
    config: Config,
) -> None:
    issuer = StandInIssuer()
    run(config, issuer)
    first = current_dir(config, "www")
    first_chain = (first / "fullchain.pem").read_bytes()
    key_before = config.certificate("www").key.read_bytes()
    again = run(config, issuer)
    assert {r.status for r in again.values()} == {"not-due"}
    assert "next renewal at" in again["www"].reason
    assert current_dir(config, "www") == first
    serials = []
    for _ in range(3):
        time.sleep(0.002)  # distinct serial (ms clock)
        forced = run(config, issuer, "www", force=True)
        assert list(forced) == ["www"] and forced["www"].status == "renewed"
        serials.append(forced["www"].serial)
    # Current and previous are kept; older generations are pruned.
    gens = generations(config, "www")
    assert len(gens) == 2 and current_dir(config, "www").name == gens[-1]
    assert gens[-1].endswith("-" + str(serials[-1])) and gens[0].endswith("-" + str(serials[-2]))
    assert (first / "fullchain.pem").exists() is False and first_chain
    assert config.certificate("www").key.read_bytes() == key_before


def test_failed_order_never_touches_installed_files(config: Config) -> None:
    issuer = StandInIssuer()
    run(config, issuer)
    d = config.state_dir / "certificates" / "www"

    def files() -> dict[str, bytes]:
        return {
            p.relative_to(d).as_posix(): p.read_bytes()
            for p in d.rglob("*") if p.is_file() and p.name != "state.json"
        }  # fmt: skip

    before = files()
    issuer.fail = AcmeUnreachable("POST https://ca/order: cannot reach the CA: connection refused")
    results = run(config, issuer, force=True)
    assert results["www"].status == "failed"
    assert "connection refused" in results["www"].reason
    assert files() == before
    m = load_meta(FileStorage(config.state_dir), "www")
    assert m is not None and m.last_attempt is not None
    assert m.last_attempt.result == "failed" and "connection refused" in (
        m.last_attempt.error or ""
    )
    assert m.serial is not None  # the installed certificate is still what meta describes


def test_certificate_for_another_key_is_refused_and_not_installed(config: Config) -> None:
    issuer = StandInIssuer()
    issuer.wrong_key = True
    results = run(config, issuer)
    assert results["www"].status == "failed"
    assert "not the stable key" in results["www"].reason
    assert not (config.state_dir / "certificates" / "www" / "current").exists()
    assert not (config.state_dir / "certificates" / "www" / "gen").exists()


def test_rate_limit_is_reported_and_remembered(config: Config) -> None:
    issuer = StandInIssuer()
    issuer.fail = RateLimited("rate limited by the CA: too many", time.time() + 3600)
    results = run(config, issuer, "www")
    assert results["www"].status == "failed" and "rate limited" in results["www"].reason
    m = load_meta(FileStorage(config.state_dir), "www")
    assert m is not None and m.retry_not_before == pytest.approx(time.time() + 3600, abs=5)


def test_rate_limit_stops_the_rest_of_the_run(config: Config) -> None:
    sequential = dataclasses.replace(
        config, acme=dataclasses.replace(config.acme, max_concurrent_orders=1)
    )
    issuer = StandInIssuer()
    issuer.fail = RateLimited("rate limited by the CA: too many new orders", None)
    results = run(sequential, issuer)
    assert len(issuer.replaces) == 1  # only the first order was sent
    assert results["www"].reason == "rate limited by the CA: too many new orders"
    assert results["api"].status == "failed"
    assert results["api"].reason.startswith("not attempted: the CA holds new orders until")
    assert "too many new orders" in results["api"].reason


def test_dry_run_reports_and_writes_nothing(config: Config) -> None:
    results = run(config, StandInIssuer(), dry_run=True)
    assert {r.status for r in results.values()} == {"dry-run"}
    assert results["www"].reason == "would renew: no certificate yet"
    assert not config.state_dir.exists()
    assert not config.certificate("www").key.exists()


def test_ari_window_drives_renewal_and_the_order_replaces_the_old_certificate(
    config: Config,
) -> None:
    issuer = StandInIssuer()
    run(config, issuer, "www")
    storage = FileStorage(config.state_dir)
    old = x509.load_pem_x509_certificate((current_dir(config, "www") / "cert.pem").read_bytes())
    now = time.time()
    issuer.window = ari.RenewalWindow("x", now - 100, now + 100, now - 50, now + 3600)
    results = run(config, issuer, "www")
    assert results["www"].status == "renewed"
    assert "ARI" in results["www"].reason
    assert issuer.replaces[-1] == ari.cert_id(old)
    # A later window keeps the new certificate not due, and meta remembers the window.
    issuer.window = ari.RenewalWindow("x", now + 50 * DAY, now + 51 * DAY, now + 50.5 * DAY, now)
    assert run(config, issuer, "www")["www"].status == "not-due"
    m = load_meta(storage, "www")
    assert m is not None and m.ari is not None and m.ari.selected == now + 50.5 * DAY


def test_a_held_lock_means_someone_else_is_renewing(config: Config) -> None:
    storage = FileStorage(config.state_dir)
    storage.lock("cert-www")
    try:
        results = run(config, StandInIssuer(), "www")
    finally:
        storage.unlock("cert-www")
    assert results["www"].status == "not-due"
    assert "another process" in results["www"].reason


def test_deploy_hook_failure_marks_the_run_failed_but_keeps_the_certificate(
    config: Config,
) -> None:
    def hook(name: str) -> None:
        raise RuntimeError("HAProxy unix:/run/haproxy/admin.sock: connection refused")

    results = run(config, StandInIssuer(), "www", on_installed=hook)
    assert results["www"].status == "failed"
    assert "deploying it failed" in results["www"].reason
    assert (current_dir(config, "www") / "fullchain.pem").exists()


def test_unknown_name_is_a_key_error(config: Config) -> None:
    with pytest.raises(KeyError, match="nope"):
        run(config, StandInIssuer(), "nope")


def test_six_day_certificate_becomes_due_after_four_days(config: Config) -> None:
    issuer = StandInIssuer()
    issuer.lifetime = 6 * DAY
    run(config, issuer, "api")

    def at(offset: float) -> dict[str, Any]:
        renewer = Renewer(
            config, MemoryChallengeRegistry(), issuer=issuer, clock=lambda: time.time() + offset
        )
        return {r.name: r for r in renewer.run(["api"], False, False)}

    assert at(3.9 * DAY)["api"].status == "not-due"
    results = at(4.1 * DAY)
    assert results["api"].status == "renewed"
    assert results["api"].reason == "1/3 of the lifetime left"


def test_status_reports_pin_expiry_and_last_result(config: Config) -> None:
    run(config, StandInIssuer(), "www")
    rows = {r["name"]: r for r in certificate_status(config)}
    www = rows["www"]
    assert www["key_pin"] == keys.spki_pin(keys.load_private_key(config.certificate("www").key))
    assert www["last_result"] == "success"
    assert 89 < www["days_left"] <= 90
    assert rows["api"]["last_result"] is None and rows["api"]["key_pin"] is None


# --- deployed state is a fact ----------------------------------------------------------


class FakeDeploy:
    """A deploy hook whose HAProxy can be switched off: returns a DeployResult
    (reload mode: no instances) or raises DeployError as the real one does."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.up = True
        self.calls: list[str] = []

    def __call__(self, name: str) -> Any:
        from agent.deploy import DeployError, DeployResult

        self.calls.append(name)
        meta = load_meta(FileStorage(self.config.state_dir), name)
        assert meta is not None and meta.serial is not None
        path = self.config.haproxy.cert_dir / f"{name}.pem"
        result = DeployResult(name, path, int(meta.serial, 16))
        if not self.up:
            result.errors.append("HAProxy unix:/run/haproxy/admin.sock: connection refused")
            raise DeployError(result)
        result.ok = True
        return result


def test_a_failed_deploy_is_pushed_by_the_next_run_instead_of_not_due(config: Config) -> None:
    issuer = StandInIssuer()
    deploy = FakeDeploy(config)
    deploy.up = False
    first = run(config, issuer, "www", on_installed=deploy)
    assert first["www"].status == "failed" and "deploying it failed" in first["www"].reason
    orders = len(issuer.replaces)
    deploy.up = True
    again = run(config, issuer, "www", on_installed=deploy)
    # Stored but never served: the next cron run pushes it (no new order).
    assert again["www"].status == "deployed", again["www"]
    assert "not confirmed served by disk" in again["www"].reason
    assert len(issuer.replaces) == orders and deploy.calls == ["www", "www"]
    # Now it is a fact: nothing left to do.
    assert run(config, issuer, "www", on_installed=deploy)["www"].status == "not-due"
    assert deploy.calls == ["www", "www"]


def test_status_tells_stored_from_served_after_a_failed_deploy(config: Config) -> None:
    deploy = FakeDeploy(config)
    deploy.up = False
    results = run(config, StandInIssuer(), "www", on_installed=deploy)
    (row,) = [r for r in certificate_status(config) if r["name"] == "www"]
    assert row["stored_serial"] == results["www"].serial
    assert row["last_result"] == "failed" and row["last_deployed"] is False
    assert "connection refused" in row["last_error"]
    assert row["in_sync"] is False
    assert row["deployed"]["disk"]["matches"] is False
    assert row["deployed"]["disk"]["serial"] != row["stored_serial"]
    deploy.up = True
    run(config, StandInIssuer(), "www", on_installed=deploy)
    (row,) = [r for r in certificate_status(config) if r["name"] == "www"]
    assert row["in_sync"] is True and row["deployed"]["disk"]["serial"] == row["stored_serial"]
    assert row["last_result"] == "success" and row["last_deployed"] is True


def test_concurrent_forced_runs_order_each_certificate_once(config: Config) -> None:
    import inspect
    import threading

    from agent.cli import _one_renew_at_a_time

    issuer = StandInIssuer()
    orders: list[tuple[str, ...]] = []
    real_issue = issuer.issue

    def counted(
        csr_pem: bytes, domains: Sequence[str], replaces: str | None = None, **kw: Any
    ) -> Any:
        orders.append(tuple(domains))
        time.sleep(0.05)  # an order takes a while: the other runs queue up meanwhile
        return real_issue(csr_pem, domains, replaces, **kw)

    issuer.issue = counted  # type: ignore[method-assign]
    run(config, StandInIssuer())  # both installed once, as before `renew --force`
    errors: list[BaseException] = []

    def forced_renew() -> None:
        # What `renew --force` does: note the start, queue on the command lock, run.
        try:
            started = time.time()
            with _one_renew_at_a_time(config, False) as got_it:
                assert got_it
                renewer = Renewer(config, MemoryChallengeRegistry(), issuer=issuer)
                kw = {"started_at": started} if "started_at" in inspect.signature(
                    renewer.run).parameters else {}  # fmt: skip
                renewer.run(None, True, False, **kw)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=forced_renew) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert sorted(orders) == sorted([("a.example.com", "b.example.com"), ("api.example.com",)])


def test_rate_limit_hold_ends_at_the_cas_retry_after_in_the_daemon_and_in_cron(
    config: Config,
) -> None:
    now = [time.time()]
    issuer = StandInIssuer()

    def renewer() -> Renewer:
        return Renewer(config, MemoryChallengeRegistry(), issuer=issuer, clock=lambda: now[0])

    daemon = renewer()  # the daemon keeps one Renewer for its life
    issuer.fail = RateLimited("rate limited by the CA: slow down", now[0] + 2)
    first = {r.name: r for r in daemon.run(["www"], False, False)}
    assert first["www"].retry_at == pytest.approx(now[0] + 2)
    issuer.fail = None
    now[0] += 1  # a cron run before the CA's time: held, nothing sent
    held = {r.name: r for r in renewer().run(None, False, False)}
    assert {r.status for r in held.values()} == {"failed"}
    assert all(r.error_type == "rateLimited" for r in held.values())
    assert len(issuer.replaces) == 1
    rows = {r["name"]: r for r in certificate_status(config, now[0])}
    assert rows["api"]["rate_limited_until"] == pytest.approx(now[0] + 1)
    now[0] += 2  # past Retry-After: the same long-lived Renewer orders again
    later = {r.name: r for r in daemon.run(None, False, False)}
    assert {r.status for r in later.values()} == {"renewed"}
    assert ratelimit.load_holds(FileStorage(config.state_dir)) == {}  # strikes forgotten


def test_rate_limit_without_retry_after_holds_for_a_bounded_doubling_backoff(
    config: Config,
) -> None:
    store = FileStorage(config.state_dir)
    t = 1_000_000.0
    first = ratelimit.set_hold(store, "https://ca/dir", None, "no Retry-After", t)
    assert first.until == t + ratelimit.BACKOFF_FIRST
    second = ratelimit.set_hold(store, "https://ca/dir", None, "again", t + 100)
    assert second.until == t + 100 + 2 * ratelimit.BACKOFF_FIRST
    for _ in range(20):
        last = ratelimit.set_hold(store, "https://ca/dir", None, "again", t + 200)
    assert last.until == t + 200 + ratelimit.BACKOFF_MAX
    assert ratelimit.active_hold(store, "https://other/dir", t) is None  # per CA
    assert ratelimit.active_hold(store, "https://ca/dir", last.until) is None  # and no longer


class RefusesReplaces(StandInIssuer):
    """A CA that answers every newOrder carrying `replaces` with an error
    (Pebble 2.10's 500 for some serials), and times out `timeouts` plain orders."""

    def __init__(self, window: ari.RenewalWindow) -> None:
        super().__init__(window)
        self.timeouts = 0

    def issue(
        self,
        csr_pem: bytes,
        domains: Sequence[str],
        replaces: str | None = None,
        *,
        challenge: str = "http-01",
        cert_name: str | None = None,
    ) -> IssuedCertificate:
        if replaces is not None:
            self.replaces.append(replaces)
            raise ReplacesRefused("POST /new-order: HTTP 500 serverInternal (gave up)")
        if self.timeouts:
            self.timeouts -= 1
            self.replaces.append(None)
            raise AcmeTimeout("timed out waiting for the certificate")
        return super().issue(csr_pem, domains, None)


def test_an_order_whose_replaces_the_ca_refuses_is_placed_without_it_and_remembered(
    config: Config,
) -> None:
    far = time.time() + 30 * DAY
    window = ari.RenewalWindow("x", far, far + DAY, far, time.time() + 3600)
    issuer = RefusesReplaces(window)
    assert run(config, issuer, "www")["www"].status == "renewed"
    issuer.replaces.clear()
    issuer.timeouts = 1  # the order without replaces fails too this time
    assert run(config, issuer, "www", force=True)["www"].status == "failed"
    assert issuer.replaces[0] is not None and issuer.replaces[1:] == [None]
    meta = load_meta(FileStorage(config.state_dir), "www")
    assert meta is not None and meta.replaces_failures == 1
    issuer.replaces.clear()
    # The next run (a cron run: a new Renewer) does not send replaces again.
    assert run(config, issuer, "www", force=True)["www"].status == "renewed"
    assert issuer.replaces == [None]
    meta = load_meta(FileStorage(config.state_dir), "www")
    assert meta is not None and meta.replaces_failures == 0  # a new leaf: a new count


class BatchFakeDeploy(FakeDeploy):
    """FakeDeploy that can also deploy several certificates at once
    (`deploy_many`, as agent.deploy.RenewalDeployHook); `down` names fail."""

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.batches: list[list[str]] = []
        self.down: set[str] = set()

    def deploy_many(self, names: list[str]) -> dict[str, Any]:
        from agent.deploy import DeployError

        self.batches.append(sorted(names))
        out: dict[str, Any] = {}
        up = self.up
        for name in names:
            self.up = name not in self.down
            try:
                out[name] = FakeDeploy.__call__(self, name)
            except DeployError as e:
                out[name] = e
        self.up = up
        return out


def test_renew_deploys_what_it_installed_as_one_batch(config: Config) -> None:
    deploy = BatchFakeDeploy(config)
    results = run(config, StandInIssuer(), on_installed=deploy)
    assert {n: r.status for n, r in results.items()} == {"www": "renewed", "api": "renewed"}
    assert deploy.batches == [["api", "www"]]
    storage = FileStorage(config.state_dir)
    for name in ("www", "api"):
        meta = load_meta(storage, name)
        assert meta is not None and meta.deployed["disk"].serial == meta.serial
        assert meta.last_attempt is not None and meta.last_attempt.deployed is True


def test_a_batch_deploy_failing_for_one_certificate_fails_only_that_one(config: Config) -> None:
    deploy = BatchFakeDeploy(config)
    deploy.down = {"api"}
    results = run(config, StandInIssuer(), on_installed=deploy)
    assert results["www"].status == "renewed"
    assert results["api"].status == "failed" and results["api"].error_type == "deploy"
    assert "renewed and stored" in results["api"].reason
    assert "connection refused" in results["api"].reason
    storage = FileStorage(config.state_dir)
    api = load_meta(storage, "api")
    assert api is not None and api.deployed["disk"].serial is None
    assert "connection refused" in (api.deployed["disk"].error or "")
    assert api.last_attempt is not None and api.last_attempt.deployed is False
    # The next run pushes only the one not served, in a batch of its own.
    deploy.down, deploy.up = set(), True
    again = run(config, StandInIssuer(), on_installed=deploy)
    assert again["api"].status == "deployed" and again["www"].status == "not-due"
    assert deploy.calls[-1] == "api" and len(deploy.batches) == 1  # one push: no batch needed
