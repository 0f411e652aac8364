"""Hot-swap certificates into a real HAProxy (every tested version) through its runtime API.

Every test starts its own HAProxy on free 127.0.0.1 ports with a throwaway CA's
certificates and checks what a real TLS handshake gets served.
"""

from __future__ import annotations

import os
import stat
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509

from agent.deploy import BundleError, Deployer, DeployTarget, tls_leaf
from agent.haproxy_api import CommandFailed, PayloadTooLarge, RuntimeAPI
from tests.support.certs import CA, bundle_pem, issue_leaf, make_bundle, make_ca, make_key
from tests.support.haproxy import HAProxyProcess, free_port

pytestmark = pytest.mark.integration

CONFIG = """\
global
    noreuseport
    stats socket "${STATE}/admin.sock" mode 600 level admin expose-fd listeners
    # EXTRA_GLOBAL

defaults
    mode http
    timeout connect 2s
    timeout client 5s
    timeout server 5s

frontend tls
    bind "127.0.0.1:${PORT}" ssl crt-list "${STATE}/crt-list.txt"
    # a second listener with its own copy of the first certificate: the managed
    # file is not what it serves, which lets a test make verification fail
    bind "127.0.0.1:${STATIC_PORT}" ssl crt "${STATE}/static.pem"
    http-request return status 200 content-type text/plain string ok
"""


@dataclass
class Site:
    haproxy: HAProxyProcess
    ca: CA
    state: Path
    cert_dir: Path
    crt_list: Path
    port: int
    static_port: int
    first: DeployTarget

    @property
    def api_address(self) -> str:
        return f"unix:{self.state}/admin.sock"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def deployer(self, **kwargs: object) -> Deployer:
        options: dict[str, object] = {
            "instances": [self.api_address],
            "cert_dir": self.cert_dir,
            "crt_list": self.crt_list,
            "verify": [self.address],
            "timeout": 5.0,
        }
        options.update(kwargs)
        return Deployer(**options)  # type: ignore[arg-type]

    def target(self, name: str, names: list[str], **kwargs: object) -> DeployTarget:
        bundle, cert, _ = make_bundle(self.ca, names)
        return DeployTarget(name, bundle, cert.serial_number, names, **kwargs)  # type: ignore[arg-type]

    def served_serial(self, sni: str | None, port: int | None = None) -> int:
        der = tls_leaf(f"127.0.0.1:{port or self.port}", sni, 5.0)
        return x509.load_der_x509_certificate(der).serial_number


def _start_site(haproxy_bin: str, tmp_path: Path, extra_global: str = "") -> Site:
    state = tmp_path / "state"
    cert_dir = state / "certs"
    cert_dir.mkdir(parents=True)
    ca = make_ca()
    bundle, cert, _ = make_bundle(ca, ["site.test", "www.site.test"])
    first = DeployTarget("site", bundle, cert.serial_number, ["site.test", "www.site.test"])
    (cert_dir / "site.pem").write_bytes(bundle)
    (state / "static.pem").write_bytes(bundle)
    crt_list = state / "crt-list.txt"
    crt_list.write_text(f"{cert_dir / 'site.pem'}\n")
    port, static_port = free_port(), free_port()
    env = {
        "STATE": str(state),
        "PORT": str(port),
        "STATIC_PORT": str(static_port),
    }
    config = CONFIG.replace("# EXTRA_GLOBAL", extra_global)
    proc = HAProxyProcess(haproxy_bin, config, env, tmp_path / "haproxy")
    proc.start()
    return Site(proc, ca, state, cert_dir, crt_list, port, static_port, first)


@pytest.fixture
def site(haproxy_bin: str, tmp_path: Path) -> Iterator[Site]:
    s = _start_site(haproxy_bin, tmp_path)
    try:
        yield s
    finally:
        s.haproxy.stop()


def test_renewal_changes_served_serial_without_new_haproxy_process(site: Site) -> None:
    pid = site.haproxy.pid
    assert site.served_serial("site.test") == site.first.serial
    renewed = site.target("site", ["site.test", "www.site.test"])

    result = site.deployer().deploy(renewed)

    assert result.ok, result.errors
    assert [(r.action, r.served_serial) for r in result.instances] == [("updated", renewed.serial)]
    assert {h.server_name for h in result.handshakes} == {"site.test", "www.site.test"}
    assert all(h.ok for h in result.handshakes)
    assert site.served_serial("site.test") == renewed.serial
    assert site.served_serial("www.site.test") == renewed.serial
    assert site.haproxy.pid == pid and site.haproxy.running
    on_disk = site.cert_dir / "site.pem"
    assert on_disk.read_bytes() == renewed.bundle
    assert stat.S_IMODE(on_disk.stat().st_mode) == 0o600


def test_restarted_haproxy_serves_the_deployed_certificate_from_disk(site: Site) -> None:
    renewed = site.target("site", ["site.test", "www.site.test"])
    added = site.target("shop", ["shop.test"])
    deployer = site.deployer()
    assert deployer.deploy(renewed).ok
    assert deployer.deploy(added).ok
    old_pid = site.haproxy.pid

    site.haproxy.restart()

    assert site.haproxy.pid != old_pid
    assert site.served_serial("site.test") == renewed.serial
    assert site.served_serial("shop.test") == added.serial


def test_certificate_added_at_runtime_is_served_for_its_sni_without_reload(site: Site) -> None:
    pid = site.haproxy.pid
    # before: HAProxy has no certificate for shop.test and falls back to the first one
    assert site.served_serial("shop.test") == site.first.serial
    shop = site.target("shop", ["shop.test"])

    result = site.deployer().deploy(shop)

    assert result.ok, result.errors
    assert result.instances[0].action == "added"
    assert site.served_serial("shop.test") == shop.serial
    assert site.served_serial("site.test") == site.first.serial
    assert site.haproxy.pid == pid
    assert f"{site.cert_dir / 'shop.pem'}\n" in site.crt_list.read_text()
    api = RuntimeAPI(site.api_address)
    assert [e.path for e in api.show_crt_list(str(site.crt_list))] == [
        str(site.cert_dir / "site.pem"),
        str(site.cert_dir / "shop.pem"),
    ]


def test_new_certificate_with_options_and_sni_filters_gets_them_live_and_on_disk(
    site: Site,
) -> None:
    api_target = site.target(
        "api",
        ["api.test", "api2.test"],
        crt_list_options="alpn h2,http/1.1",
        sni_filters=("api.test",),
    )
    result = site.deployer().deploy(api_target)

    assert result.ok, result.errors
    entry = RuntimeAPI(site.api_address).show_crt_list(str(site.crt_list))[-1]
    assert entry.options == "alpn h2,http/1.1" and entry.filters == ("api.test",)
    assert site.served_serial("api.test") == api_target.serial
    # api2.test is not in the SNI filter: the default certificate answers it
    assert site.served_serial("api2.test") == site.first.serial
    assert f"{site.cert_dir / 'api.pem'} [alpn h2,http/1.1] api.test\n" in (
        site.crt_list.read_text()
    )


def test_reconciler_pushes_current_cert_to_haproxy_restarted_with_old_file(site: Site) -> None:
    renewed = site.target("site", ["site.test", "www.site.test"])
    deployer = site.deployer()
    assert deployer.deploy(renewed).ok
    first_poll = deployer.poll([renewed])
    assert [(s.in_sync, s.pushed) for s in first_poll] == [(True, False)]

    # HAProxy goes down; meanwhile an old file lands on disk (a backup restore, say)
    site.haproxy.stop()
    down = deployer.poll([renewed])
    assert deployer.reachable(site.api_address) is False
    assert down == [] or not down[0].in_sync
    (site.cert_dir / "site.pem").write_bytes(site.first.bundle)
    site.haproxy.start()
    assert site.served_serial("site.test") == site.first.serial  # the stale file

    statuses = deployer.poll([renewed])

    assert [(s.name, s.in_sync, s.pushed, s.served_serial) for s in statuses] == [
        ("site", True, True, renewed.serial)
    ]
    assert deployer.reachable(site.api_address) is True
    assert site.served_serial("site.test") == renewed.serial
    assert (site.cert_dir / "site.pem").read_bytes() == renewed.bundle
    assert deployer.status() == statuses
    assert deployer.poll([renewed]) == []  # nothing changed since


def test_reconcile_detects_a_restart_even_without_seeing_it_down(site: Site) -> None:
    renewed = site.target("site", ["site.test", "www.site.test"])
    deployer = site.deployer()
    assert deployer.deploy(renewed).ok
    assert deployer.poll([renewed])[0].in_sync
    (site.cert_dir / "site.pem").write_bytes(site.first.bundle)
    site.haproxy.restart()  # between two polls: only the new PID tells

    statuses = deployer.poll([renewed])

    assert statuses and statuses[0].pushed and statuses[0].in_sync
    assert site.served_serial("site.test") == renewed.serial


def test_reconcile_reports_stale_and_unreachable_instances(site: Site, tmp_path: Path) -> None:
    renewed = site.target("site", ["site.test", "www.site.test"])
    missing = f"unix:{tmp_path}/nobody.sock"
    deployer = site.deployer(instances=[site.api_address, missing], verify=[])

    statuses = deployer.reconcile([renewed])

    by_instance = {s.instance: s for s in statuses}
    live = by_instance[site.api_address]
    assert (live.pushed, live.in_sync, live.served_serial) == (True, True, renewed.serial)
    dead = by_instance[missing]
    assert not dead.in_sync and dead.error and "nobody.sock" in dead.error
    assert deployer.reachable(missing) is False


def test_mismatched_key_is_refused_and_old_certificate_still_served(site: Site) -> None:
    cert = issue_leaf(site.ca, make_key(), ["site.test"])
    bad = DeployTarget(
        "site", bundle_pem(cert, make_key(), [site.ca.cert]), cert.serial_number, ["site.test"]
    )
    with pytest.raises(BundleError, match="does not belong"):
        site.deployer().deploy(bad)
    assert (site.cert_dir / "site.pem").read_bytes() == site.first.bundle
    assert site.served_serial("site.test") == site.first.serial


def test_haproxy_refuses_mismatched_key_at_commit_and_abort_keeps_old_cert(site: Site) -> None:
    # The deployer refuses such a bundle itself; this proves the HAProxy side of
    # the contract the client relies on when something slips through.
    cert = issue_leaf(site.ca, make_key(), ["site.test"])
    path = str(site.cert_dir / "site.pem")
    api = RuntimeAPI(site.api_address)
    assert api.set_cert(path, bundle_pem(cert, make_key(), [site.ca.cert])) == path
    with pytest.raises(CommandFailed, match="inconsistencies between private key") as caught:
        api.commit_cert(path)
    assert caught.value.instance == site.api_address
    assert caught.value.command == f"commit ssl cert {path}"
    assert api.abort_cert(path) is True
    assert site.served_serial("site.test") == site.first.serial
    assert api.list_certs().transactions == ()


def test_failed_verification_rolls_back_served_and_disk(site: Site) -> None:
    # The static listener keeps serving its own copy of the old certificate, so the
    # TLS check against it must fail and the swap must be undone.
    renewed = site.target("site", ["site.test", "www.site.test"])
    deployer = site.deployer(verify=[site.address, f"127.0.0.1:{site.static_port}"])

    result = deployer.deploy(renewed)

    assert not result.ok and result.rolled_back
    assert any(f"127.0.0.1:{site.static_port}" in e for e in result.errors)
    assert [(r.action, r.served_serial) for r in result.instances] == [
        ("rolled back", site.first.serial)
    ]
    assert site.served_serial("site.test") == site.first.serial
    assert (site.cert_dir / "site.pem").read_bytes() == site.first.bundle


def test_failed_new_certificate_is_removed_again(site: Site) -> None:
    shop = site.target("shop", ["shop.test"])
    deployer = site.deployer(verify=[f"127.0.0.1:{site.static_port}"])

    result = deployer.deploy(shop)

    assert not result.ok and result.rolled_back
    assert not (site.cert_dir / "shop.pem").exists()
    assert "shop.pem" not in site.crt_list.read_text()
    api = RuntimeAPI(site.api_address)
    assert str(site.cert_dir / "shop.pem") not in api.list_certs().certificates
    assert site.served_serial("shop.test") == site.first.serial


def test_second_transaction_is_merged_on_26_and_refused_on_28(site: Site) -> None:
    # The HAProxy behaviour that forces per-instance serialization.
    api = RuntimeAPI(site.api_address)
    static = str(site.state / "static.pem")
    managed = str(site.cert_dir / "site.pem")
    other = site.target("site", ["site.test"])
    assert api.set_cert(static, site.first.bundle) == static
    try:
        try:
            owner = api.set_cert(managed, other.bundle)
        except CommandFailed as exc:  # 2.8
            assert "ongoing transaction is about" in exc.reply
        else:  # 2.6: our payload silently went into static.pem's transaction
            assert owner == static
            pending = api.show_cert(static, pending=True)
            assert pending is not None and pending.serial == other.serial
    finally:
        api.abort_cert(static)


def test_deploy_refuses_to_run_next_to_a_foreign_open_transaction(site: Site) -> None:
    api = RuntimeAPI(site.api_address)
    static = str(site.state / "static.pem")
    api.set_cert(static, site.first.bundle)
    try:
        renewed = site.target("site", ["site.test", "www.site.test"])
        result = site.deployer().deploy(renewed)
        assert not result.ok
        assert any("another client has a certificate transaction open" in e for e in result.errors)
        assert site.served_serial("site.test") == site.first.serial
        assert (site.cert_dir / "site.pem").read_bytes() == site.first.bundle
    finally:
        api.abort_cert(static)


def test_concurrent_deploys_never_mix_certificates(site: Site) -> None:
    names = {"site": ["site.test"], "shop": ["shop.test"], "blog": ["blog.test"]}
    # Separate Deployers, as the daemon and a `renew` run in one process would have.
    deployers = [site.deployer(), site.deployer()]
    for name, sni in names.items():
        assert deployers[0].deploy(site.target(name, sni)).ok
    failures: list[str] = []
    final: dict[str, int] = {}
    guard = threading.Lock()

    def work(worker: int) -> None:
        for round_ in range(6):
            name = list(names)[(worker + round_) % len(names)]
            target = site.target(name, names[name])
            result = deployers[worker % 2].deploy(target)
            with guard:
                if not result.ok:
                    failures.extend(result.errors)
                final[name] = target.serial  # last writer under the guard wins below

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)

    assert failures == []
    api = RuntimeAPI(site.api_address)
    assert api.list_certs().transactions == ()
    for name, sni in names.items():
        info = api.show_cert(str(site.cert_dir / f"{name}.pem"))
        assert info is not None and info.names == tuple(sni)  # no content from another name
        served = site.served_serial(sni[0])
        on_disk = x509.load_pem_x509_certificates((site.cert_dir / f"{name}.pem").read_bytes())[0]
        assert served == info.serial == on_disk.serial_number


def test_payload_larger_than_bufsize_fails_with_message_to_raise_it(site: Site) -> None:
    key = make_key(rsa_bits=4096)
    cert = issue_leaf(site.ca, key, ["site.test"])
    bundle = bundle_pem(cert, key, [site.ca.cert] * 30)  # a silly chain: ~22 KB
    assert len(bundle) > 20000
    big = DeployTarget("site", bundle, cert.serial_number, ["site.test"])

    with pytest.raises(PayloadTooLarge, match=r"raise `tune\.bufsize`"):
        site.deployer().deploy(big)
    assert (site.cert_dir / "site.pem").read_bytes() == site.first.bundle

    # Configured larger than HAProxy really has: the value HAProxy shows wins.
    with pytest.raises(PayloadTooLarge) as caught:
        site.deployer(bufsize=65536).deploy(big)
    assert caught.value.bufsize == 16384

    # Without the probe, HAProxy's own refusal (2.6: empty reply, 2.8: "too
    # big") is recognised and the deploy is rolled back.
    result = site.deployer(bufsize=65536, probe_bufsize=False).deploy(big)
    assert not result.ok and result.rolled_back
    assert "tune.bufsize" in " ".join(result.errors)
    assert (site.cert_dir / "site.pem").read_bytes() == site.first.bundle
    assert site.served_serial("site.test") == site.first.serial
    assert site.haproxy.running


def test_raised_bufsize_lets_a_large_bundle_through(haproxy_bin: str, tmp_path: Path) -> None:
    site = _start_site(haproxy_bin, tmp_path, extra_global="tune.bufsize 65536")
    try:
        key = make_key(rsa_bits=4096)
        cert = issue_leaf(site.ca, key, ["site.test"])
        bundle = bundle_pem(cert, key, [site.ca.cert] * 30)
        big = DeployTarget("site", bundle, cert.serial_number, ["site.test"])
        # the agent's configured bufsize stays 16384: it reads 65536 from HAProxy
        result = site.deployer().deploy(big)
        assert result.ok, result.errors
        assert site.served_serial("site.test") == cert.serial_number
    finally:
        site.haproxy.stop()


def test_without_runtime_api_reload_command_runs_once_and_only_after_a_change(
    haproxy_bin: str, tmp_path: Path
) -> None:
    site = _start_site(haproxy_bin, tmp_path, extra_global="master-worker")
    try:
        marker = tmp_path / "reloads.txt"
        # The reload: count it, then ask the master to reload (SIGUSR2) its workers.
        script = (
            "import os, signal, sys; open(sys.argv[1], 'a').write('x');"
            " os.kill(int(sys.argv[2]), signal.SIGUSR2)"
        )
        deployer = site.deployer(
            instances=[],
            verify=[],
            reload_command=[sys.executable, "-c", script, str(marker), str(site.haproxy.pid)],
        )
        assert deployer.finish() is False  # nothing changed yet
        first = site.target("site", ["site.test"])
        second = site.target("site", ["site.test"])
        assert deployer.deploy(first).ok
        assert deployer.deploy(second).ok
        assert deployer.finish() is True
        assert deployer.finish() is False
        assert marker.read_text() == "x"
        assert deployer.deploy(second).ok  # same bytes again: no change, no reload
        assert deployer.finish() is False
        assert marker.read_text() == "x"
        _wait_for_serial(site, "site.test", second.serial)
        assert [s.in_sync for s in deployer.status()] == [True]
    finally:
        site.haproxy.stop()


def _wait_for_serial(site: Site, sni: str, serial: int, timeout: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            if site.served_serial(sni) == serial:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{sni}: serial {serial:X} not served after {timeout} s")
        time.sleep(0.05)


def test_bundle_files_never_become_readable_by_others(site: Site) -> None:
    shop = site.target("shop", ["shop.test"])
    assert site.deployer().deploy(shop).ok
    mode = os.stat(site.cert_dir / "shop.pem").st_mode
    assert stat.S_IMODE(mode) == 0o600


def test_every_instance_is_updated_and_a_down_one_does_not_block_the_others(site: Site) -> None:
    # A second HAProxy on the same host serving the same files (its own socket and ports).
    port2, static2 = free_port(), free_port()
    config2 = CONFIG.replace("admin.sock", "admin2.sock")
    env2 = {"STATE": str(site.state), "PORT": str(port2), "STATIC_PORT": str(static2)}
    second = HAProxyProcess(site.haproxy.binary, config2, env2, site.state / "haproxy2")
    second.start()
    try:
        api2 = f"unix:{site.state}/admin2.sock"
        deployer = site.deployer(
            instances=[site.api_address, api2], verify=[site.address, f"127.0.0.1:{port2}"]
        )
        renewed = site.target("site", ["site.test", "www.site.test"])
        result = deployer.deploy(renewed)
        assert result.ok, result.errors
        assert [r.instance for r in result.instances] == [site.api_address, api2]
        assert site.served_serial("site.test", port2) == renewed.serial

        second.stop()
        shop = site.target("shop", ["shop.test"])
        result = deployer.deploy(shop)
        assert result.ok, result.errors
        assert [(r.instance, r.action) for r in result.instances] == [
            (site.api_address, "added"),
            (api2, "unreachable"),
        ]
        assert result.warnings and "admin2.sock" in result.warnings[0]
        assert deployer.reachable(api2) is False
        assert site.served_serial("shop.test") == shop.serial

        second.start()  # reads the files and crt-list the deploy wrote
        statuses = deployer.poll([renewed, shop])
        assert {(s.name, s.instance, s.in_sync) for s in statuses} >= {
            ("site", api2, True),
            ("shop", api2, True),
        }
        assert site.served_serial("shop.test", port2) == shop.serial
    finally:
        second.stop()


def test_all_instances_down_keeps_the_new_file_for_their_restart(site: Site) -> None:
    renewed = site.target("site", ["site.test", "www.site.test"])
    deployer = site.deployer()
    site.haproxy.stop()

    result = deployer.deploy(renewed)

    assert not result.ok and not result.rolled_back
    assert "no HAProxy runtime API instance reachable" in result.errors[0]
    assert (site.cert_dir / "site.pem").read_bytes() == renewed.bundle
    site.haproxy.start()
    assert site.served_serial("site.test") == renewed.serial


def test_transaction_left_open_by_a_crashed_run_is_aborted_and_deploy_proceeds(
    site: Site,
) -> None:
    leftover = site.target("site", ["site.test"])
    api = RuntimeAPI(site.api_address)
    api.set_cert(str(site.cert_dir / "site.pem"), leftover.bundle)  # never committed
    renewed = site.target("site", ["site.test", "www.site.test"])

    result = site.deployer().deploy(renewed)

    assert result.ok, result.errors
    assert site.served_serial("site.test") == renewed.serial
    assert api.list_certs().transactions == ()


DIRECTORY_CONFIG = """\
global
    noreuseport
    stats socket "${STATE}/admin.sock" mode 600 level admin expose-fd listeners

defaults
    mode http
    timeout connect 2s
    timeout client 5s
    timeout server 5s

frontend tls
    bind "127.0.0.1:${PORT}" ssl crt "${STATE}/certs/"
    http-request return status 200 content-type text/plain string ok
"""


def test_new_certificate_is_added_to_a_crt_directory_bind(haproxy_bin: str, tmp_path: Path) -> None:
    state = tmp_path / "state"
    cert_dir = state / "certs"
    cert_dir.mkdir(parents=True)
    ca = make_ca()
    bundle, first, _ = make_bundle(ca, ["site.test"])
    (cert_dir / "site.pem").write_bytes(bundle)
    port = free_port()
    env = {"STATE": str(state), "PORT": str(port)}
    proc = HAProxyProcess(haproxy_bin, DIRECTORY_CONFIG, env, tmp_path / "haproxy")
    proc.start()
    try:
        deployer = Deployer(
            [f"unix:{state}/admin.sock"], cert_dir, crt_list=cert_dir, verify=[f"127.0.0.1:{port}"]
        )
        shop_bundle, shop, _ = make_bundle(ca, ["shop.test"])
        result = deployer.deploy(DeployTarget.from_bundle("shop", shop_bundle))
        assert result.ok, result.errors
        assert result.instances[0].action == "added"

        def serial(sni: str) -> int:
            der = tls_leaf(f"127.0.0.1:{port}", sni, 5.0)
            return x509.load_der_x509_certificate(der).serial_number

        assert serial("shop.test") == shop.serial_number
        assert serial("site.test") == first.serial_number
        proc.restart()
        assert serial("shop.test") == shop.serial_number
    finally:
        proc.stop()


def test_deploy_many_returns_results_in_order_and_serves_all(site: Site) -> None:
    targets = [site.target(f"bulk{i}", [f"bulk{i}.test"]) for i in range(12)]
    deployer = site.deployer()

    results = deployer.deploy_many(targets, workers=4)

    assert [r.name for r in results] == [t.name for t in targets]
    assert all(r.ok for r in results), [r.errors for r in results]
    for t in targets:
        assert site.served_serial(t.names[0]) == t.serial
    assert deployer.wait_idle(1.0) is True


def test_removed_certificate_is_no_longer_served_nor_loaded_after_restart(site: Site) -> None:
    shop = site.target("shop", ["shop.test"])
    deployer = site.deployer()
    assert deployer.deploy(shop).ok
    assert site.served_serial("shop.test") == shop.serial

    assert deployer.remove("shop") == []

    assert site.served_serial("shop.test") == site.first.serial
    api = RuntimeAPI(site.api_address)
    assert str(site.cert_dir / "shop.pem") not in api.list_certs().certificates
    assert "shop.pem" not in site.crt_list.read_text()
    assert not (site.cert_dir / "shop.pem").exists()
    assert [s.name for s in deployer.status()] == []
    site.haproxy.restart()
    assert site.served_serial("shop.test") == site.first.serial
