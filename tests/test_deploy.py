"""Unit tests of the deployer parts that need no HAProxy: bundle checks, files,
the reload fallback, config wiring. The swap itself is tested against real
HAProxy in tests/integration/test_deploy_haproxy.py.
"""

from __future__ import annotations

import os
import socket
import stat
import sys
import threading
import types
from pathlib import Path

import pytest

from agent.config import HAProxyConfig, Listen
from agent.deploy import (
    DISK_INSTANCE,
    BundleError,
    Deployer,
    DeployTarget,
    ReloadError,
    _sni_for,
    _verify_names,
    inspect_bundle,
)
from agent.haproxy_api import PayloadTooLarge
from tests.support.certs import CA, bundle_pem, issue_leaf, make_bundle, make_ca, make_key


@pytest.fixture(scope="module")
def ca() -> CA:
    return make_ca()


def test_target_from_bundle_reads_serial_and_names(ca: CA) -> None:
    bundle, cert, _ = make_bundle(ca, ["a.test", "*.a.test", "127.0.0.1"])
    target = DeployTarget.from_bundle("a", bundle)
    assert target.serial == cert.serial_number
    assert target.names == ("a.test", "*.a.test", "127.0.0.1")


def test_bundle_with_foreign_key_is_refused_naming_the_certificate(ca: CA) -> None:
    cert = issue_leaf(ca, make_key(), ["a.test"])
    with pytest.raises(BundleError, match=r"'a'.*does not belong"):
        inspect_bundle("a", bundle_pem(cert, make_key()))


def test_bundle_without_key_or_certificate_is_refused(ca: CA) -> None:
    bundle, _, _ = make_bundle(ca, ["a.test"])
    cert_only = bundle.split(b"-----BEGIN PRIVATE KEY-----")[0]
    with pytest.raises(BundleError, match="exactly one private key, found 0"):
        inspect_bundle("a", cert_only)
    with pytest.raises(BundleError, match="no readable certificate"):
        inspect_bundle("a", b"-----BEGIN PRIVATE KEY-----\nAA\n-----END PRIVATE KEY-----\n")


def test_verify_uses_sni_filters_and_concrete_names() -> None:
    target = DeployTarget("a", b"", 1, ["a.test", "*.a.test", "::1"], sni_filters=())
    assert _verify_names(target) == ("a.test", "*.a.test", "::1")
    assert [_sni_for(n) for n in _verify_names(target)] == [
        "a.test",
        "haproxy-acme-agent-check.a.test",
        None,
    ]
    filtered = DeployTarget("a", b"", 1, ["a.test", "b.test"], sni_filters=("b.test", "!a.test"))
    assert _verify_names(filtered) == ("b.test",)


def test_bad_names_and_duplicate_instances_are_refused(tmp_path: Path, ca: CA) -> None:
    with pytest.raises(ValueError, match="twice"):
        Deployer(["unix:/run/a.sock", "/run/a.sock"], tmp_path)
    with pytest.raises(ValueError, match="cert_dir"):
        Deployer([], tmp_path / "with space")
    deployer = Deployer([], tmp_path)
    bundle, cert, _ = make_bundle(ca, ["a.test"])
    with pytest.raises(BundleError, match="certificate name"):
        deployer.deploy(DeployTarget("../evil", bundle, cert.serial_number, ["a.test"]))
    with pytest.raises(BundleError, match="serial"):
        deployer.deploy(DeployTarget("a", bundle, cert.serial_number + 1, ["a.test"]))
    assert list(tmp_path.iterdir()) == []


def test_oversize_bundle_is_refused_before_any_write(tmp_path: Path, ca: CA) -> None:
    key = make_key(rsa_bits=2048)
    cert = issue_leaf(ca, key, ["a.test"])
    bundle = bundle_pem(cert, key, [ca.cert] * 40)
    deployer = Deployer([f"unix:{tmp_path}/admin.sock"], tmp_path / "certs")
    with pytest.raises(PayloadTooLarge, match=r"tune\.bufsize 32768"):
        deployer.deploy(DeployTarget("a", bundle, cert.serial_number, ["a.test"]))
    assert not (tmp_path / "certs").exists()


def _counting_reload(tmp_path: Path, exit_code: int = 0) -> tuple[list[str], Path]:
    marker = tmp_path / "reloads"
    script = f"open({str(marker)!r}, 'a').write('x'); raise SystemExit({exit_code})"
    return [sys.executable, "-c", script], marker


def test_reload_runs_once_per_run_and_only_after_a_change(tmp_path: Path, ca: CA) -> None:
    command, marker = _counting_reload(tmp_path)
    deployer = Deployer([], tmp_path / "certs", reload_command=command)
    a = DeployTarget.from_bundle("a", make_bundle(ca, ["a.test"])[0])
    b = DeployTarget.from_bundle("b", make_bundle(ca, ["b.test"])[0])
    assert deployer.finish() is False
    assert deployer.deploy(a).ok and deployer.deploy(b).ok
    assert deployer.finish() is True
    assert deployer.finish() is False
    assert deployer.deploy(a).file_changed is False
    assert deployer.finish() is False
    assert marker.read_text() == "x"
    path = tmp_path / "certs" / "a.pem"
    assert path.read_bytes() == a.bundle and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [(s.name, s.instance, s.in_sync) for s in deployer.status()] == [
        ("a", DISK_INSTANCE, True),
        ("b", DISK_INSTANCE, True),
    ]


def test_failed_reload_is_an_error_and_stays_pending(tmp_path: Path, ca: CA) -> None:
    command, marker = _counting_reload(tmp_path, exit_code=3)
    deployer = Deployer([], tmp_path / "certs", reload_command=command)
    assert deployer.deploy(DeployTarget.from_bundle("a", make_bundle(ca, ["a.test"])[0])).ok
    with pytest.raises(ReloadError, match="exited with 3"):
        deployer.finish()
    with pytest.raises(ReloadError):
        deployer.finish()
    assert marker.read_text() == "xx"


def test_reconcile_without_runtime_api_rewrites_a_stale_file(tmp_path: Path, ca: CA) -> None:
    command, marker = _counting_reload(tmp_path)
    deployer = Deployer([], tmp_path / "certs", reload_command=command)
    old = DeployTarget.from_bundle("a", make_bundle(ca, ["a.test"])[0])
    new = DeployTarget.from_bundle("a", make_bundle(ca, ["a.test"])[0])
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "a.pem").write_bytes(old.bundle)
    [status] = deployer.reconcile([new])
    assert (status.instance, status.pushed, status.in_sync) == (DISK_INSTANCE, True, True)
    assert (tmp_path / "certs" / "a.pem").read_bytes() == new.bundle
    assert deployer.finish() is True and marker.read_text() == "x"
    assert deployer.reconcile([new])[0].pushed is False


def test_from_config_takes_the_haproxy_section(tmp_path: Path) -> None:
    section = HAProxyConfig(
        cert_dir=tmp_path / "certs",
        runtime_api=("unix:/run/haproxy/admin.sock", "tcp:127.0.0.1:9999"),
        crt_list=tmp_path / "crt-list.txt",
        verify=(Listen("127.0.0.1", 443), Listen("::1", 443)),
        reload_command=("systemctl", "reload", "haproxy"),
        timeout=2.5,
    )
    deployer = Deployer.from_config(section)
    assert deployer.instances() == ["unix:/run/haproxy/admin.sock", "tcp:127.0.0.1:9999"]
    assert deployer.verify == ["127.0.0.1:443", "[::1]:443"]
    assert deployer.crt_list == tmp_path / "crt-list.txt"
    assert deployer.timeout == 2.5 and deployer.apis[0].timeout == 2.5
    assert deployer.reload_command == ["systemctl", "reload", "haproxy"]


def test_cert_dir_is_created_0750_even_under_umask_000(tmp_path: Path, ca: CA) -> None:
    deployer = Deployer([], tmp_path / "new" / "certs")
    target = DeployTarget.from_bundle("a", make_bundle(ca, ["a.test"])[0])
    old_umask = os.umask(0)
    try:
        assert deployer.deploy(target).ok
    finally:
        os.umask(old_umask)
    for d in (tmp_path / "new", tmp_path / "new" / "certs"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o750


def test_an_existing_cert_dir_is_never_chmodded(tmp_path: Path, ca: CA) -> None:
    (tmp_path / "certs").mkdir()
    os.chmod(tmp_path / "certs", 0o755)
    deployer = Deployer([], tmp_path / "certs")
    assert deployer.deploy(DeployTarget.from_bundle("a", make_bundle(ca, ["a.test"])[0])).ok
    assert stat.S_IMODE((tmp_path / "certs").stat().st_mode) == 0o755


class _HungRuntimeAPI:
    """A TCP runtime API on 127.0.0.1 that accepts connections and never answers.
    Counts the connections it accepted."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            self._held.append(conn)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.listener.close()
        for conn in self._held:
            conn.close()


def test_status_gives_up_on_a_hung_runtime_api_after_one_timeout(
    tmp_path: Path, ca: CA, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agent import cli
    from agent import deploy as deploy_mod

    hung = _HungRuntimeAPI()
    bundle, cert, _ = make_bundle(ca, ["a.test"])
    targets = [DeployTarget(f"c{i}", bundle, cert.serial_number, ["a.test"]) for i in range(20)]
    monkeypatch.setattr(deploy_mod, "stored_targets", lambda config, storage=None: targets)
    section = HAProxyConfig(
        cert_dir=tmp_path / "certs",
        runtime_api=(f"tcp:127.0.0.1:{hung.port}",),
        timeout=0.2,
    )
    config = types.SimpleNamespace(haproxy=section)
    try:
        entries = cli.served_serials(config)  # type: ignore[arg-type]
    finally:
        hung.close()
    # One connection (one timeout) for the whole instance, not one per certificate.
    assert hung.accepted == 1
    assert [e["certificate"] for e in entries] == [t.name for t in targets]
    for entry in entries:
        assert entry["in_sync"] is False and entry["served_serial"] is None
        assert "unreachable" in entry["error"] and str(hung.port) in entry["error"]
