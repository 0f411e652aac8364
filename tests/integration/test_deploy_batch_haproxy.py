"""Batch deploys against a real HAProxy (every build of the `haproxy_bin` fixture):
a failure rolls back only the certificate it concerns, and a batch cut by an
HAProxy restart ends with everything served after the next reconcile.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.deploy import Deployer
from agent.haproxy_api import RuntimeAPI, Session
from tests.integration.test_deploy_concurrency import assert_loadable
from tests.integration.test_deploy_haproxy import Site, _start_site

pytestmark = pytest.mark.integration


@pytest.fixture
def site(haproxy_bin: str, tmp_path: Path) -> Iterator[Site]:
    s = _start_site(haproxy_bin, tmp_path)
    try:
        yield s
    finally:
        s.haproxy.stop()


def test_batch_with_one_certificate_failing_verification_rolls_back_only_that_one(
    site: Site,
) -> None:
    deployer = site.deployer()
    renewed = site.target("site", ["site.test", "www.site.test"])
    shops = [site.target(f"shop{i}", [f"shop{i}.test"]) for i in range(5)]
    # A new certificate for a name site.pem already serves: HAProxy keeps
    # answering site.test with the first certificate loaded for it, so the TLS
    # check of this one fails.
    clash = site.target("clash", ["site.test"])
    before = site.crt_list.read_text()

    results = deployer.deploy_batch([renewed, *shops[:2], clash, *shops[2:]])

    by_name = {r.name: r for r in results}
    assert [r.name for r in results] == [
        "site",
        "shop0",
        "shop1",
        "clash",
        "shop2",
        "shop3",
        "shop4",
    ]
    failed = by_name.pop("clash")
    assert not failed.ok and failed.rolled_back
    assert any("SNI site.test" in e for e in failed.errors), failed.errors
    assert all(r.ok for r in by_name.values()), [r.errors for r in by_name.values()]
    # The others stay deployed and verified.
    assert site.served_serial("site.test") == renewed.serial
    for shop in shops:
        assert site.served_serial(shop.names[0]) == shop.serial
    # Only the failed one is gone: not loaded, no file, no crt-list line.
    api = RuntimeAPI(site.api_address)
    assert str(site.cert_dir / "clash.pem") not in api.list_certs().certificates
    assert api.list_certs().transactions == ()
    assert not (site.cert_dir / "clash.pem").exists()
    assert site.crt_list.read_text() == before + "".join(
        f"{site.cert_dir / s.name}.pem\n" for s in shops
    )
    assert_loadable(site)
    statuses = {(s.name, s.in_sync) for s in deployer.status()}
    assert ("clash", False) in statuses and ("site", True) in statuses


def test_a_failing_sampled_handshake_makes_every_certificate_of_the_batch_checked(
    site: Site,
) -> None:
    shops = [site.target(f"shop{i}", [f"shop{i}.test"]) for i in range(4)]
    assert all(r.ok for r in site.deployer().deploy_batch(shops))
    renewed = [site.target(s.name, list(s.names)) for s in shops]
    # One handshake in the sample, against a listener that serves another
    # certificate: it fails, so the three skipped ones are checked too (and fail).
    deployer = site.deployer(verify=[f"127.0.0.1:{site.static_port}"], handshake_sample=1)

    results = deployer.deploy_batch(renewed)

    assert all(not r.ok and r.rolled_back for r in results), [r.errors for r in results]
    assert all(r.handshakes and not r.handshakes[0].ok for r in results)
    for shop in shops:
        assert site.served_serial(shop.names[0]) == shop.serial


def test_batch_cut_by_an_haproxy_restart_is_served_after_the_next_reconcile(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    deployer = site.deployer()
    renewed = site.target("site", ["site.test", "www.site.test"])
    shops = [site.target(f"shop{i}", [f"shop{i}.test"]) for i in range(12)]
    targets = [renewed, *shops]
    real = Deployer._open_checked
    calls = {"n": 0}

    def restart_mid_batch(self: Deployer, session: Session, *args: Any) -> tuple[bool, str]:
        calls["n"] += 1
        if calls["n"] == 6:  # five certificates through, seven to go
            os.kill(site.haproxy.pid, signal.SIGKILL)
            site.haproxy.stop()  # reaps the killed process (by its handle)
            site.haproxy.start()  # loads whatever the files say right now
        return real(self, session, *args)

    monkeypatch.setattr(Deployer, "_open_checked", restart_mid_batch)
    results = deployer.deploy_batch(targets)
    monkeypatch.setattr(Deployer, "_open_checked", real)

    assert calls["n"] >= 6
    assert not all(r.ok for r in results)  # the batch did see the restart
    assert any("HAProxy" in e and site.api_address in e for r in results for e in r.errors)

    statuses = deployer.reconcile(targets)  # the agent's next pass

    assert [(s.name, s.in_sync) for s in statuses] == [(t.name, True) for t in targets], [
        s.error for s in statuses if not s.in_sync
    ]
    for target in targets:
        assert site.served_serial(target.names[0]) == target.serial, target.name
        assert (site.cert_dir / f"{target.name}.pem").read_bytes() == target.bundle
    assert RuntimeAPI(site.api_address).list_certs().transactions == ()
    assert_loadable(site)
    # And a restart now serves the same from the files alone.
    site.haproxy.restart()
    for target in targets:
        assert site.served_serial(target.names[0]) == target.serial, target.name
