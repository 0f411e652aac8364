"""The daemon on its own: real Pebble (short-lived certificates), real HAProxy, real TLS.

`haproxy-acme-agent run` is started as a process, issues two certificates,
pushes them into the running HAProxy, and renews them by itself before they
expire while HAProxy (same PID, no reload) serves each new serial. Metrics
must agree with what is served; SIGHUP with a broken file keeps the old
config; SIGTERM exits 0 quickly and leaves no half-written file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509

from tests.support.acme_stack import AcmeStack, toml_value
from tests.support.haproxy import free_port
from tests.support.tls import served_leaf

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
NAMES = {"alpha": "alpha.example.test", "beta": "beta.example.test"}
VALIDITY = 60  # seconds: the 1/3 rule renews 40 s after issuance


def wait_for(
    what: str, check: Callable[[], bool], timeout: float, proc: subprocess.Popen[bytes], log: Path
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"agent exited with {proc.returncode} while waiting for {what}:\n"
                + log.read_text()[-4000:]
            )
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(
        f"timed out after {timeout} s waiting for {what}:\n" + log.read_text()[-4000:]
    )


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    return samples


@pytest.fixture
def stack(tmp_path: Path, haproxy_bin: str, pebble_bin: str) -> Iterator[AcmeStack]:
    with AcmeStack(
        tmp_path / "stack", haproxy_bin, validity_period=VALIDITY, pebble_binary=pebble_bin
    ) as s:
        yield s


def write_config(stack: AcmeStack, tmp_path: Path, metrics_port: int) -> Path:
    assert stack.haproxy.admin_socket is not None
    lines = [
        f"state_dir = {toml_value(tmp_path / 'state')}",
        "[acme]",
        f"directory = {toml_value(stack.pebble.directory_url)}",
        f"ca_bundle = {toml_value(stack.pebble.ca_bundle)}",
        f"trusted_roots = {toml_value(stack.pebble.roots_file())}",
        "poll_interval = 0.05",
        "timeout = 20",
        "[spoa]",
        f'listen = "127.0.0.1:{stack.spoa_port}"',
        "[haproxy]",
        f"runtime_api = [{toml_value('unix:' + str(stack.haproxy.admin_socket))}]",
        f"cert_dir = {toml_value(tmp_path / 'certs')}",
        f"crt_list = {toml_value(stack.workdir / 'haproxy' / 'certs.list')}",
        f'verify = ["127.0.0.1:{stack.https_port}"]',
        "[metrics]",
        f'listen = "127.0.0.1:{metrics_port}"',
        "[daemon]",
        'reconcile_interval = "2s"',
        'retry_base = "2s"',
    ]
    for name, domain in NAMES.items():
        lines += [
            "[[certificates]]",
            f'name = "{name}"',
            f'domains = ["{domain}"]',
            f"key = {toml_value(tmp_path / 'keys' / (name + '.key'))}",
            "generate_key = true",
        ]
    (tmp_path / "keys").mkdir()
    path = tmp_path / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.every_version  # heavy end-to-end case: every HAProxy x Pebble pair
def test_daemon_issues_deploys_and_renews_on_its_own_without_reloading_haproxy(
    stack: AcmeStack, tmp_path: Path
) -> None:
    metrics_port = free_port()
    config = write_config(stack, tmp_path, metrics_port)
    log_path = tmp_path / "agent.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "-c", str(config)],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        haproxy_pid = stack.haproxy.pid
        https = stack.https_port

        def serial_of(name: str) -> int:
            return served_leaf(https, NAMES[name]).serial_number

        def issued_by_pebble(name: str) -> bool:
            leaf = served_leaf(https, NAMES[name])
            try:
                san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            except x509.ExtensionNotFound:  # HAProxy's fallback certificate
                return False
            return NAMES[name] in san.get_values_for_type(x509.DNSName)

        wait_for(
            "both certificates served",
            lambda: all(map(issued_by_pebble, NAMES)),
            60,
            proc,
            log_path,
        )

        # With 60 s certificates the first may already be renewed while the second
        # is still on its way (a loaded machine): each check below compares with
        # what HAProxy serves around it, and is repeated (bounded) when a renewal
        # landed in between.
        def metrics_agree(served: dict[str, int]) -> None:
            samples = scrape(metrics_port)
            for name, domain in NAMES.items():
                leaf = served_leaf(https, domain)
                assert leaf.serial_number == served[name]
                label = f'{{certificate="{name}"}}'
                key = "haproxy_acme_certificate_expiration_timestamp_seconds" + label
                assert samples[key] == leaf.not_valid_after_utc.timestamp()
                key = "haproxy_acme_certificate_not_before_timestamp_seconds" + label
                assert samples[key] == leaf.not_valid_before_utc.timestamp()
                key = f'haproxy_acme_renewals_total{{certificate="{name}",result="success"}}'
                assert samples[key] >= 1
                inst = "unix:" + str(stack.haproxy.admin_socket)
                key = f'haproxy_acme_haproxy_in_sync{{certificate="{name}",instance="{inst}"}}'
                assert samples[key] == 1
                renewal = "haproxy_acme_certificate_renewal_timestamp_seconds" + label
                assert leaf.not_valid_before_utc.timestamp() < samples[renewal]
                assert samples[renewal] < leaf.not_valid_after_utc.timestamp()
            assert samples['haproxy_acme_challenges_total{result="answered",type="http-01"}'] >= 2

        def status_agrees(served: dict[str, int]) -> None:
            # `status` shows, per HAProxy instance, whether it serves the stored serial.
            status = subprocess.run(
                [sys.executable, "-m", "agent.cli", "status", "--json", "-c", str(config)],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert status.returncode == 0, status.stderr
            for row in json.loads(status.stdout):
                [entry] = row["haproxy"]
                assert entry["in_sync"] is True
                assert entry["served_serial"] == f"{served[row['name']]:x}"

        for check in (metrics_agree, status_agrees):
            for attempt in range(4):
                served = {name: serial_of(name) for name in NAMES}
                try:
                    check(served)
                    break
                except AssertionError:
                    if attempt == 3 or served == {name: serial_of(name) for name in NAMES}:
                        raise  # nothing was renewed meanwhile: a real disagreement
                    time.sleep(1)
        first = {name: serial_of(name) for name in NAMES}

        # `renew` while the daemon runs hands the work over (the SPOA port is the daemon's).
        cli = subprocess.run(
            [
                sys.executable,
                "-m",
                "agent.cli",
                "renew",
                "-v",
                "-c",
                str(config),
                "--force",
                "alpha",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert cli.returncode == 0, cli.stderr
        assert "handed to the running daemon" in cli.stderr
        assert cli.stdout.startswith("alpha: renewed")
        assert serial_of("alpha") != first["alpha"]
        first["alpha"] = serial_of("alpha")

        # SIGHUP with a broken file: logged, old config keeps running.
        good = config.read_text()
        config.write_text(good + "\n[acme\n")
        proc.send_signal(signal.SIGHUP)
        wait_for(
            "the refused reload in the log",
            lambda: b"reload refused" in log_path.read_bytes(),
            10,
            proc,
            log_path,
        )
        config.write_text(good)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/healthz", timeout=5) as r:
            assert r.status == 200

        # Renewal by itself, before expiry, served without reload.
        wait_for(
            "both certificates renewed and served",
            lambda: all(serial_of(n) != first[n] for n in NAMES),
            VALIDITY + 30,
            proc,
            log_path,
        )
        for domain in NAMES.values():
            assert served_leaf(https, domain).not_valid_after_utc.timestamp() > time.time()
        assert stack.haproxy.pid == haproxy_pid
        assert stack.haproxy.running

        # Graceful stop.
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=10)
        elapsed = time.monotonic() - started
        assert code == 0, log_path.read_text()
        assert elapsed < 5.0
        leftovers = [
            p
            for root in (tmp_path / "state", tmp_path / "certs")
            for p in root.rglob("*")
            if ".tmp" in p.name
        ]
        assert leftovers == []
        assert not (tmp_path / "state" / "control.sock").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert os.stat(tmp_path / "state").st_mode & 0o777 == 0o700


def test_cron_renew_without_runtime_api_waits_for_haproxy_to_find_the_agent(
    stack: AcmeStack, tmp_path: Path
) -> None:
    # Between two cron runs no agent listens and HAProxy's checks mark it DOWN;
    # without a runtime API `renew` cannot mark it UP and must wait for the checks.
    assert stack.haproxy.admin_socket is not None
    stack.haproxy.admin_command("set server acme-spoa/agent1 health down")
    (tmp_path / "keys").mkdir()
    config = tmp_path / "config.toml"
    config.write_text(
        "\n".join(
            [
                f"state_dir = {toml_value(tmp_path / 'state')}",
                "[acme]",
                f"directory = {toml_value(stack.pebble.directory_url)}",
                f"ca_bundle = {toml_value(stack.pebble.ca_bundle)}",
                f"trusted_roots = {toml_value(stack.pebble.roots_file())}",
                "poll_interval = 0.05",
                "[spoa]",
                f'listen = "127.0.0.1:{stack.spoa_port}"',
                "[haproxy]",
                f"cert_dir = {toml_value(tmp_path / 'certs')}",
                "[[certificates]]",
                'name = "alpha"',
                'domains = ["alpha.example.test"]',
                f"key = {toml_value(tmp_path / 'keys' / 'alpha.key')}",
                "generate_key = true",
            ]
        )
        + "\n"
    )
    cli = subprocess.run(
        [sys.executable, "-m", "agent.cli", "renew", "-v", "-c", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert "health checks found the SPOE agent" in cli.stderr
    assert cli.stdout.startswith("alpha: renewed")
    bundle = (tmp_path / "certs" / "alpha.pem").read_bytes()
    assert b"BEGIN CERTIFICATE" in bundle
    assert os.stat(tmp_path / "certs" / "alpha.pem").st_mode & 0o777 == 0o600
