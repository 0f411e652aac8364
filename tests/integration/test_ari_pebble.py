"""ARI, profiles and per-CA rate limits against the real Pebble 2.10 and a real HAProxy.

Pebble 2.10 speaks RFC 9773 (renewalInfo, `replaces`, `alreadyReplaced`) and
ACME profiles (tests/support/pebble.py: `profiles=`). These tests run on Pebble
2.10 only (2.4 has neither), on HAProxy 2.6 and 3.2 (the oldest and newest).
Pebble has no rate limiter: a FaultProxy in front of it answers newOrder with
429 rateLimited + Retry-After where a test asks for it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from acme import client, messages
from cryptography import x509
from josepy.jwa import ES256
from josepy.jwk import JWKEC

from agent import keys
from agent.cli import main
from agent.issuer import account_slug
from tests.support.acme_stack import AcmeStack
from tests.support.fault_proxy import FaultProxy
from tests.support.haproxy import free_port, haproxy_binaries
from tests.support.pebble import pebble_binaries
from tests.support.tls import served_leaf

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DOMAIN = "ari.example.test"
SHORT = 3 * 3600  # s: the "shortlived" profile's validity
REPLACEMENT = re.compile(r"ARI: order \S+ is a replacement of \S+")

_PEBBLE_210 = [path for label, path in pebble_binaries() if label == "2.10"]
_HAPROXIES = [(label, path) for label, path in haproxy_binaries() if label in ("2.6", "3.2")]


@pytest.fixture(params=[p for _, p in _HAPROXIES], ids=[label for label, _ in _HAPROXIES])
def haproxy_edge(request: pytest.FixtureRequest) -> str:
    """HAProxy 2.6 and 3.2: the oldest and newest tested."""
    path: str = request.param
    return path


@pytest.fixture
def stack(tmp_path: Path, haproxy_edge: str) -> Iterator[AcmeStack]:
    assert _PEBBLE_210, "Pebble 2.10 is not set up (scripts/setup.sh)"
    with AcmeStack(
        tmp_path / "stack",
        haproxy_edge,
        pebble_binary=_PEBBLE_210[0],
        pebble_profiles={"shortlived": SHORT},
    ) as s:
        assert "renewalInfo" in s.pebble.directory()
        yield s


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def current_leaf(state: Path, name: str) -> x509.Certificate:
    d = state / "certificates" / name
    return x509.load_pem_x509_certificate(
        (d / "gen" / (d / "current").read_text() / "cert.pem").read_bytes()
    )


def stored_files(state: Path, name: str) -> dict[str, bytes]:
    d = state / "certificates" / name
    return {
        p.relative_to(d).as_posix(): p.read_bytes()
        for p in d.rglob("*") if p.is_file() and p.name != "state.json"
    }  # fmt: skip


def one_cert(tmp_path: Path) -> list[dict[str, Any]]:
    return [{"name": "www", "domains": [DOMAIN], "key": str(tmp_path / "www.key"),
             "generate_key": True}]  # fmt: skip


def revoke(stack: AcmeStack, state: Path, cert: x509.Certificate) -> None:
    """Revoke `cert` through ACME, signed with the agent's account key."""
    acct_dir = state / "accounts" / account_slug(stack.pebble.directory_url)
    key = keys.load_private_key(acct_dir / "account.key")
    uri = json.loads((acct_dir / "account.json").read_text())["uri"]
    net = client.ClientNetwork(
        JWKEC(key=key),
        account=messages.RegistrationResource(body=messages.Registration(), uri=uri),
        alg=ES256,
        verify_ssl=str(stack.pebble.ca_bundle),  # type: ignore[arg-type]  # requests takes a path
    )
    directory = client.ClientV2.get_directory(stack.pebble.directory_url, net)
    client.ClientV2(directory, net).revoke(cert, 0)


def wait_for(what: str, check: Callable[[], bool], timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(
        f"timed out after {timeout} s waiting for {what}:\n" + log.read_text()[-4000:]
    )


def daemon_config(stack: AcmeStack, tmp_path: Path, directory: str | None = None,
                  ca_bundle: Path | None = None) -> Path:  # fmt: skip
    overrides: dict[str, Any] = {}
    if directory:
        overrides["directory"] = directory
    if ca_bundle:
        overrides["ca_bundle"] = ca_bundle
    config = stack.write_config(tmp_path / "config.toml", one_cert(tmp_path), **overrides)
    # A table after the [[certificates]] array simply ends its last element.
    text = config.read_text() + (
        f'[metrics]\nlisten = "127.0.0.1:{free_port()}"\n'
        f'[daemon]\ncontrol_socket = "{tmp_path / "control.sock"}"\n'
        'check_interval = "2s"\nreconcile_interval = "2s"\nretry_base = "1s"\n'
    )
    config.write_text(text)
    return config


def start_daemon(config: Path, log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "-c", str(config)],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip


def stop_daemon(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def served_serial(stack: AcmeStack) -> int | None:
    try:
        return served_leaf(stack.https_port, DOMAIN).serial_number
    except OSError:
        return None


# --- ARI -------------------------------------------------------------------------------


def test_daemon_renews_a_certificate_the_ca_revoked_without_a_command(
    stack: AcmeStack, tmp_path: Path
) -> None:
    config = daemon_config(stack, tmp_path)
    state = tmp_path / "state"
    log = tmp_path / "agent.log"
    proc = start_daemon(config, log)
    try:
        wait_for("the first certificate served",
                 lambda: (state / "certificates" / "www" / "current").exists()
                 and served_serial(stack) == current_leaf(state, "www").serial_number,
                 60, log)  # fmt: skip
        first = current_leaf(state, "www")
        # Its window is far away (90-day certificate): nothing happens by itself.
        wait_for("the CA's window stored",
                 lambda: json.loads((state / "certificates" / "www" / "state.json")
                                    .read_text()).get("ari") is not None, 30, log)  # fmt: skip
        revoke(stack, state, first)
        # renewalInfo now says "renew now": the daemon does, unasked, and HAProxy serves it.
        wait_for("a new serial served after the revocation",
                 lambda: served_serial(stack) not in (None, first.serial_number), 60, log)
        assert proc.poll() is None
        second = current_leaf(state, "www")
        assert served_serial(stack) == second.serial_number != first.serial_number
        assert REPLACEMENT.search(stack.pebble.log_text())  # the order named the revoked one
    finally:
        stop_daemon(proc)


def test_forced_renew_sends_replaces_and_a_second_replacement_orders_without_it(
    stack: AcmeStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = stack.write_config(tmp_path / "config.toml", one_cert(tmp_path))
    state = tmp_path / "state"
    rc, _, err = cli(capsys, "renew", "-c", str(config))
    assert rc == 0, err
    first = current_leaf(state, "www")
    # Another node (a copy of this state: same account, same certificate) will
    # try to replace the same certificate later.
    other_state = tmp_path / "other-state"
    shutil.copytree(state, other_state)
    other = stack.write_config(tmp_path / "other.toml", one_cert(tmp_path), state_dir=other_state)
    assert not REPLACEMENT.search(stack.pebble.log_text())
    rc, out, err = cli(capsys, "renew", "-c", str(config), "--force")
    assert rc == 0, err
    assert len(REPLACEMENT.findall(stack.pebble.log_text())) == 1
    # The second replacement of `first`: the CA answers alreadyReplaced, the
    # agent orders without `replaces`, once, and says so.
    rc, out, err = cli(capsys, "renew", "-c", str(other), "--force")
    assert rc == 0, err
    assert "www: renewed" in out
    assert len(REPLACEMENT.findall(stack.pebble.log_text())) == 1
    refused = [line for line in err.splitlines() if "ordering without it" in line]
    assert len(refused) == 1 and "alreadyReplaced" in refused[0]
    assert current_leaf(other_state, "www").serial_number != first.serial_number
    assert served_serial(stack) == current_leaf(other_state, "www").serial_number


# --- profiles --------------------------------------------------------------------------


def test_profile_shortlived_gives_its_validity_and_status_shows_it(
    stack: AcmeStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = stack.write_config(tmp_path / "config.toml", one_cert(tmp_path), profile="shortlived")
    rc, _, err = cli(capsys, "renew", "-c", str(config))
    assert rc == 0, err
    leaf = current_leaf(tmp_path / "state", "www")
    lifetime = (leaf.not_valid_after_utc - leaf.not_valid_before_utc).total_seconds()
    assert abs(lifetime - SHORT) <= 1
    rc, out, _ = cli(capsys, "status", "-c", str(config), "--json")
    (row,) = json.loads(out)
    assert row["profile"] == "shortlived"
    rc, out, _ = cli(capsys, "status", "-c", str(config))
    assert "profile       shortlived" in out


def test_unknown_profile_is_refused_before_any_order_and_nothing_installed_changes(
    stack: AcmeStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = stack.write_config(tmp_path / "config.toml", one_cert(tmp_path))
    rc, _, err = cli(capsys, "renew", "-c", str(config))
    assert rc == 0, err
    state = tmp_path / "state"
    before = stored_files(state, "www")
    bundle = (stack.cert_dir / "www.pem").read_bytes()
    orders = stack.pebble.log_text().count("POST /order-plz")
    bad = stack.write_config(tmp_path / "bad.toml", one_cert(tmp_path), profile="longlived")
    rc, _, err = cli(capsys, "renew", "-c", str(bad), "--force")
    assert rc == 1
    assert "'longlived' is not offered by the CA" in err
    assert "default, shortlived" in err
    assert stored_files(state, "www") == before
    assert (stack.cert_dir / "www.pem").read_bytes() == bundle
    assert stack.pebble.log_text().count("POST /order-plz") == orders


# --- rate limits -----------------------------------------------------------------------


def rate_limiting_proxy(stack: AcmeStack, tmp_path: Path) -> FaultProxy:
    return FaultProxy("127.0.0.1", stack.pebble.acme_port, stack.pebble.ca_bundle,
                      tmp_path / "proxy")  # fmt: skip


def test_cron_runs_hold_orders_until_the_cas_retry_after_then_resume(
    stack: AcmeStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with rate_limiting_proxy(stack, tmp_path) as proxy:
        config = stack.write_config(
            tmp_path / "config.toml", one_cert(tmp_path),
            directory=proxy.directory_url, ca_bundle=proxy.ca_bundle,
        )  # fmt: skip
        proxy.rate_limit("/order-plz", times=1, retry_after=2)
        rc, out, err = cli(capsys, "renew", "-c", str(config))
        assert rc == 1 and "rate limited" in err
        assert proxy.rate_limited == 1
        rc, out, _ = cli(capsys, "status", "-c", str(config), "--json")
        (row,) = json.loads(out)
        until = row["rate_limited_until"]
        assert until is not None
        if time.time() < until - 0.5:
            # Another cron run inside the hold sends nothing.
            requests = proxy.requests
            rc, out, err = cli(capsys, "renew", "-c", str(config))
            assert rc == 1 and "holds new orders until" in err
            assert proxy.requests == requests
        time.sleep(max(0.0, until - time.time()) + 0.2)
        rc, out, err = cli(capsys, "renew", "-c", str(config))
        assert rc == 0, err
        assert "www: renewed" in out
        assert proxy.rate_limited == 1


def test_daemon_resumes_orders_once_the_cas_retry_after_has_passed(
    stack: AcmeStack, tmp_path: Path
) -> None:
    with rate_limiting_proxy(stack, tmp_path) as proxy:
        proxy.rate_limit("/order-plz", times=1, retry_after=2)
        config = daemon_config(stack, tmp_path, proxy.directory_url, proxy.ca_bundle)
        state = tmp_path / "state"
        log = tmp_path / "agent.log"
        proc = start_daemon(config, log)
        try:
            wait_for("the certificate served after the rate limit",
                     lambda: (state / "certificates" / "www" / "current").exists()
                     and served_serial(stack) == current_leaf(state, "www").serial_number,
                     60, log)  # fmt: skip
            assert proxy.rate_limited == 1
            assert "rate-limited us" in log.read_text()
            assert proc.poll() is None
        finally:
            stop_daemon(proc)
