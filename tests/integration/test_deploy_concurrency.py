"""Many certificates deployed at once against a real HAProxy (2.6 and 2.8): the
crt-list file stays loadable (`haproxy -c`) and loses no line, and the in-sync
state says what HAProxy serves after rollbacks and reconciles.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.deploy import Deployer, DeployResult, DeployTarget
from agent.haproxy_api import (
    HAProxyConnectionError,
    PayloadTooLarge,
    RuntimeAPI,
    frame_command,
)
from tests.integration.test_deploy_haproxy import Site, _start_site

pytestmark = pytest.mark.integration

ROUNDS = 3


@pytest.fixture
def site(haproxy_bin: str, tmp_path: Path) -> Iterator[Site]:
    s = _start_site(haproxy_bin, tmp_path)
    try:
        yield s
    finally:
        s.haproxy.stop()


def haproxy_check(site: Site) -> subprocess.CompletedProcess[str]:
    """`haproxy -c -f cfg`: would HAProxy start with the files as they are now?"""
    proc = site.haproxy
    return subprocess.run(
        [proc.binary, "-c", "-f", str(proc.config_path)],
        cwd=proc.workdir,
        env={**os.environ, **proc.env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def deploy_concurrently(
    make_deployer: Callable[[], Deployer], targets: list[DeployTarget]
) -> list[DeployResult]:
    """Each target deployed by its own Deployer in its own thread, all at once."""
    results: list[DeployResult | None] = [None] * len(targets)
    barrier = threading.Barrier(len(targets))

    def work(i: int) -> None:
        deployer = make_deployer()
        barrier.wait(30)
        results[i] = deployer.deploy(targets[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(targets))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert all(r is not None for r in results)
    return [r for r in results if r is not None]


def assert_loadable(site: Site) -> None:
    for line in site.crt_list.read_text().splitlines():
        assert Path(line.split()[0]).is_file(), f"crt-list names a missing file: {line}"
    check = haproxy_check(site)
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize("count", [4, 8])
def test_concurrent_new_certificates_that_all_roll_back_leave_a_loadable_crt_list(
    site: Site, count: int
) -> None:
    before = site.crt_list.read_text()
    for round_ in range(ROUNDS):
        targets = [site.target(f"new{round_}x{i}", [f"n{round_}x{i}.test"]) for i in range(count)]
        # The static listener serves another certificate: every TLS check fails.
        results = deploy_concurrently(
            lambda: site.deployer(verify=[f"127.0.0.1:{site.static_port}"]), targets
        )
        assert all(not r.ok and r.rolled_back for r in results)
        assert site.crt_list.read_text() == before
        assert_loadable(site)
    # None of them is left loaded in HAProxy either.
    assert set(RuntimeAPI(site.api_address).list_certs().certificates) == {
        str(site.cert_dir / "site.pem"),
        str(site.state / "static.pem"),
    }


def test_concurrent_rollbacks_with_crt_list_named_through_a_symlinked_directory(
    site: Site, tmp_path: Path
) -> None:
    link = tmp_path / "link"
    link.symlink_to(site.state)
    before = site.crt_list.read_text()
    for round_ in range(ROUNDS):
        targets = [site.target(f"sym{round_}x{i}", [f"s{round_}x{i}.test"]) for i in range(6)]
        results = deploy_concurrently(
            lambda: site.deployer(crt_list=link / "crt-list.txt"), targets
        )
        # HAProxy knows the list by the path in its config, not the link: the
        # runtime addition fails and every deploy rolls back.
        assert all(not r.ok and r.rolled_back for r in results), [r.errors for r in results]
        assert site.crt_list.read_text() == before
        assert not site.crt_list.is_symlink()
        assert_loadable(site)


def test_concurrent_new_certificates_lose_no_crt_list_line(site: Site) -> None:
    expected = [str(site.cert_dir / "site.pem")]
    for round_ in range(ROUNDS):
        targets = [site.target(f"ok{round_}x{i}", [f"ok{round_}x{i}.test"]) for i in range(8)]
        results = deploy_concurrently(site.deployer, targets)
        assert [r.errors for r in results if not r.ok] == []
        expected += [str(site.cert_dir / f"{t.name}.pem") for t in targets]
        lines = [line.split()[0] for line in site.crt_list.read_text().splitlines()]
        assert sorted(lines) == sorted(expected)
        assert_loadable(site)
    # After a restart HAProxy serves every one of them from the files alone.
    site.haproxy.restart()
    for path in expected[1:]:
        name = Path(path).stem
        sni = f"{name}.test"
        assert site.served_serial(sni) != site.first.serial, f"{name} lost at restart"


def test_rolled_back_deploy_reports_out_of_sync_with_the_old_serial(site: Site) -> None:
    deployer = site.deployer(verify=[site.address, f"127.0.0.1:{site.static_port}"])
    assert deployer.deploy(site.first).ok  # in sync to begin with
    renewed = site.target("site", ["site.test", "www.site.test"])

    result = deployer.deploy(renewed)

    assert not result.ok and result.rolled_back
    [status] = [s for s in deployer.status() if s.name == "site"]
    assert status.instance == RuntimeAPI(site.api_address).name
    assert (status.served_serial, status.stored_serial) == (site.first.serial, renewed.serial)
    assert status.in_sync is False and status.error


def test_reconciler_rolls_back_a_stored_certificate_the_tls_check_refuses(site: Site) -> None:
    deployer = site.deployer(verify=[site.address, f"127.0.0.1:{site.static_port}"])
    renewed = site.target("site", ["site.test", "www.site.test"])
    assert not deployer.deploy(renewed).ok  # stored, refused, rolled back

    [status] = deployer.reconcile([renewed])

    assert status.in_sync is False and status.served_serial == site.first.serial
    assert not status.pushed
    assert site.served_serial("site.test") == site.first.serial
    assert (site.cert_dir / "site.pem").read_bytes() == site.first.bundle
    assert_loadable(site)


def test_reconciler_pushes_a_stale_instance_with_full_verification(site: Site) -> None:
    renewed = site.target("site", ["site.test", "www.site.test"])
    (site.cert_dir / "site.pem").write_bytes(renewed.bundle)  # on disk, not yet served
    deployer = site.deployer()

    [status] = deployer.reconcile([renewed])

    assert status.in_sync and status.pushed and status.served_serial == renewed.serial
    assert site.served_serial("site.test") == renewed.serial


def test_haproxy_killed_during_set_ssl_cert_is_a_dead_connection_not_bufsize(site: Site) -> None:
    api = RuntimeAPI(site.api_address, timeout=5.0, probe_bufsize=False)
    path = str(site.cert_dir / "site.pem")
    command = f"set ssl cert {path}"
    # The payload without its final empty line: HAProxy keeps reading it, as
    # it would while a large bundle is still on its way, until it is killed.
    message = frame_command(command, site.first.bundle)[:-1]
    caught: list[BaseException] = []

    def send() -> None:
        try:
            api._exchange(command, message, True, time.monotonic() + 5.0, api.bufsize)
        except BaseException as exc:
            caught.append(exc)

    thread = threading.Thread(target=send)
    thread.start()
    time.sleep(0.3)  # let HAProxy take the partial command (not a timing assertion)
    os.kill(site.haproxy.pid, signal.SIGKILL)
    thread.join(10)
    assert not thread.is_alive()
    [error] = caught
    assert isinstance(error, HAProxyConnectionError), error
    assert not isinstance(error, PayloadTooLarge)
    assert "bufsize" not in str(error) and api.name in str(error)
