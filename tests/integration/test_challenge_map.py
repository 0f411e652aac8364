"""Map mode against real HAProxy (2.6, 2.8, 3.0, 3.2) and a real Pebble.

HAProxy runs the shipped haproxy/haproxy-map.cfg (no SPOE at all): challenges
can only be answered from the map the agent fills over the runtime API. The
map is virt@acme on 3.0+ and the empty file <cert_dir>/acme-challenge.map on
2.6/2.8, and the agent finds it by itself ([challenges] map unset).
"""

from __future__ import annotations

import http.client
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from acme import client as acme_client

from agent.challenge_map import ChallengeMapError, HAProxyMapRegistry
from agent.challenges import MemoryChallengeRegistry
from agent.cli import main
from agent.config import load_config
from agent.haproxy_api import RuntimeAPI, parse_map
from tests.support.acme_stack import AcmeStack
from tests.support.tls import served_leaf

pytestmark = pytest.mark.integration

THUMBPRINT = "dGh1bWJwcmludC1vZi10aGUtYWNjb3VudC1rZXktMDEyMzQ"


def token() -> str:
    return secrets.token_urlsafe(32)


def get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers={"Host": "www.example.com"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def challenge(port: int, tok: str) -> tuple[int, bytes]:
    return get(port, f"/.well-known/acme-challenge/{tok}")


@pytest.fixture
def stack(tmp_path: Path, haproxy_bin: str) -> Iterator[AcmeStack]:
    with AcmeStack(tmp_path / "stack", haproxy_bin, answer="map") as s:
        yield s


def registry_for(stack: AcmeStack, tmp_path: Path, **challenges: Any) -> HAProxyMapRegistry:
    """The registry the daemon and `renew` build from this stack's agent config."""
    from agent import challenge_map

    cfg = load_config(stack.write_config(tmp_path / "config.toml", [], challenges=challenges))
    registry = challenge_map.from_config(cfg, MemoryChallengeRegistry())
    assert registry is not None
    return registry


def map_entries(stack: AcmeStack) -> dict[str, str]:
    return parse_map(stack.haproxy.admin_command(f"show map {stack.map_name}"))


def test_order_is_validated_through_the_map_and_leaves_it_empty(
    tmp_path: Path, stack: AcmeStack, capsys: pytest.CaptureFixture[str]
) -> None:
    certs = [{"name": "www", "domains": ["www.example.com", "api.example.com"],
              "key": str(tmp_path / "www.key"), "generate_key": True}]  # fmt: skip
    config = stack.write_config(tmp_path / "config.toml", certs)
    rc = main(["renew", "-c", str(config)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "www: renewed:" in out
    from cryptography import x509

    # Deployed: HAProxy serves the bundle the agent wrote, issued for the order's names.
    bundle = x509.load_pem_x509_certificates((stack.cert_dir / "www.pem").read_bytes())[0]
    served = served_leaf(stack.https_port, "www.example.com")
    assert served.serial_number == bundle.serial_number
    san = served.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(san.get_values_for_type(x509.DNSName)) == ["api.example.com", "www.example.com"]
    # Both authorizations' tokens were taken out when the order ended.
    assert map_entries(stack) == {}
    # No SPOE in this HAProxy config: the map answered Pebble.
    lines = stack.haproxy.config_text.lower().splitlines()
    assert not [ln for ln in lines if "spoe" in ln and not ln.strip().startswith("#")]


def test_issued_token_is_answered_and_unknown_token_falls_through_to_the_site(
    tmp_path: Path, stack: AcmeStack
) -> None:
    registry = registry_for(stack, tmp_path)
    tok, other = token(), token()
    registry.add(tok, f"{tok}.{THUMBPRINT}", time.time() + 60)
    assert challenge(stack.http_port, tok) == (200, f"{tok}.{THUMBPRINT}".encode())
    assert challenge(stack.http_port, other) == (404, b"site")
    assert get(stack.http_port, "/index.html") == (404, b"site")
    # Re-adding the same token does not pile up duplicate map entries.
    registry.add(tok, f"{tok}.{THUMBPRINT}", time.time() + 60)
    listing = stack.haproxy.admin_command(f"show map {stack.map_name}")
    assert [ln.split()[1] for ln in listing.splitlines() if ln.strip()] == [tok]
    registry.remove(tok)
    assert challenge(stack.http_port, tok) == (404, b"site")
    assert map_entries(stack) == {}
    assert registry.lookup(tok) is None


def test_restarted_instance_gets_the_pending_token_back_from_the_daemons_reconciler(
    tmp_path: Path, stack: AcmeStack
) -> None:
    from agent.daemon import Daemon

    cfg = load_config(stack.write_config(tmp_path / "config.toml", []))
    daemon = Daemon(cfg)
    assert daemon.challenge_map is not None
    tok = token()
    daemon.challenge_map.add(tok, f"{tok}.{THUMBPRINT}", time.time() + 60)
    assert challenge(stack.http_port, tok)[0] == 200
    old_pid = stack.haproxy.pid
    stack.haproxy.restart()
    assert stack.haproxy.pid != old_pid
    # A new process starts with an empty map: the token is gone...
    assert challenge(stack.http_port, tok) == (404, b"site")
    # ...until the reconciler's pass notices the new PID and puts it back.
    daemon._reconcile(False)
    assert challenge(stack.http_port, tok) == (200, f"{tok}.{THUMBPRINT}".encode())
    # A token whose order ended is not resurrected by a later restart.
    daemon.challenge_map.remove(tok)
    stack.haproxy.restart()
    daemon._reconcile(False)
    assert challenge(stack.http_port, tok) == (404, b"site")


def test_add_after_a_restart_also_restores_the_other_pending_tokens(
    tmp_path: Path, stack: AcmeStack
) -> None:
    registry = registry_for(stack, tmp_path)
    first, second = token(), token()
    registry.add(first, f"{first}.{THUMBPRINT}", time.time() + 60)
    stack.haproxy.restart()
    registry.add(second, f"{second}.{THUMBPRINT}", time.time() + 60)  # no poll in between
    assert challenge(stack.http_port, first)[0] == 200
    assert challenge(stack.http_port, second)[0] == 200


def test_unreachable_instance_fails_the_order_before_the_ca_is_asked_to_validate(
    tmp_path: Path,
    stack: AcmeStack,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    answered: list[object] = []
    real_answer = acme_client.ClientV2.answer_challenge

    def counting(self: Any, challb: Any, response: Any) -> Any:
        answered.append(challb)
        return real_answer(self, challb, response)

    monkeypatch.setattr(acme_client.ClientV2, "answer_challenge", counting)
    down = tmp_path / "down.sock"  # a second HAProxy that is not running
    certs = [{"name": "www", "domains": ["www.example.com"], "key": str(tmp_path / "www.key"),
              "generate_key": True}]  # fmt: skip
    config = stack.write_config(
        tmp_path / "config.toml",
        certs,
        challenges={"map_timeout": 1},
        extra_runtime_api=(f"unix:{down}",),
    )
    rc = main(["renew", "-c", str(config)])
    out, err = capsys.readouterr()
    assert rc == 1, err
    out = out + err
    assert "www: failed:" in out, out
    assert f"unix:{down}" in out
    assert "challenge map" in out
    assert "CA was not asked to validate" in out
    assert "internal error" not in out  # a recorded order failure, not a crash
    assert answered == []
    # The instance that did take the token had it removed again.
    assert map_entries(stack) == {}
    assert not (stack.cert_dir / "www.pem").exists()  # nothing issued, nothing deployed


def test_instance_that_comes_back_within_map_timeout_lets_the_order_go_on(
    tmp_path: Path, stack: AcmeStack
) -> None:
    registry = registry_for(stack, tmp_path, map_timeout=30)
    stack.haproxy.stop()
    import threading

    restarter = threading.Timer(0.5, stack.haproxy.start)
    restarter.start()
    tok = token()
    try:
        registry.add(tok, f"{tok}.{THUMBPRINT}", time.time() + 60)
    finally:
        restarter.join(timeout=30)
    assert challenge(stack.http_port, tok)[0] == 200


def test_map_mode_refuses_a_socket_below_level_admin(
    tmp_path: Path, stack: AcmeStack, capsys: pytest.CaptureFixture[str]
) -> None:
    op_sock = tmp_path / "operator.sock"
    stack.haproxy.stop()
    stack.haproxy.config_text = stack.haproxy.config_text.replace(
        "    noreuseport\n", f'    noreuseport\n    stats socket "{op_sock}" level operator\n', 1
    )
    stack.haproxy.start()
    config = stack.write_config(tmp_path / "config.toml", [])
    text = config.read_text().replace(
        f'runtime_api = ["unix:{stack.haproxy.admin_socket}"]',
        f'runtime_api = ["unix:{op_sock}"]',
    )
    config.write_text(text)
    rc = main(["renew", "-c", str(config), "--force"])
    _, err = capsys.readouterr()
    assert rc == 2
    assert "haproxy.runtime_api" in err and "level admin" in err and str(op_sock) in err


def test_map_not_declared_is_named_at_start(
    tmp_path: Path, stack: AcmeStack, capsys: pytest.CaptureFixture[str]
) -> None:
    config = stack.write_config(tmp_path / "config.toml", [], challenges={"map": "virt@other"})
    rc = main(["renew", "-c", str(config), "--force"])
    _, err = capsys.readouterr()
    assert rc == 2
    assert "challenges.map" in err and "virt@other" in err and "haproxy-config" in err


def test_add_refuses_a_map_error_without_leaving_the_token_anywhere(
    tmp_path: Path, stack: AcmeStack
) -> None:
    registry = registry_for(stack, tmp_path, map="virt@other", map_timeout=0.5)
    tok = token()
    with pytest.raises(ChallengeMapError) as info:
        registry.add(tok, f"{tok}.{THUMBPRINT}", time.time() + 60)
    assert info.value.instance == RuntimeAPI(f"unix:{stack.haproxy.admin_socket}").name
    assert "virt@other" in str(info.value)
    assert registry.lookup(tok) is None
    assert registry.pending() == {}


def test_daemon_in_map_mode_issues_through_the_map_and_deploys(
    tmp_path: Path, stack: AcmeStack
) -> None:
    import subprocess
    import sys

    from cryptography import x509

    from tests.support.haproxy import free_port

    certs = [{"name": "www", "domains": ["www.example.com"], "key": str(tmp_path / "www.key"),
              "generate_key": True}]  # fmt: skip
    config = stack.write_config(tmp_path / "config.toml", certs)
    config.write_text(
        config.read_text()
        + f'[metrics]\nlisten = "127.0.0.1:{free_port()}"\n[daemon]\nreconcile_interval = "1s"\n'
    )
    log_path = tmp_path / "agent.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "-c", str(config)],
            cwd=Path(__file__).resolve().parents[2],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:

        def issued() -> bool:
            leaf = served_leaf(stack.https_port, "www.example.com")
            try:
                san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            except x509.ExtensionNotFound:
                return False
            return "www.example.com" in san.get_values_for_type(x509.DNSName)

        deadline = time.monotonic() + 60
        while not issued():
            assert proc.poll() is None, log_path.read_text()[-4000:]
            assert time.monotonic() < deadline, log_path.read_text()[-4000:]
            time.sleep(0.5)
        assert map_entries(stack) == {}
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert proc.returncode == 0, log_path.read_text()[-4000:]
