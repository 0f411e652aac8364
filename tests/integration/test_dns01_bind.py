"""dns-01 and wildcards against a real BIND9, real Pebble and real HAProxy.

BIND (tests/support/bind.py) is authoritative for `acme.test` and accepts
TSIG-signed updates; Pebble's `-dnsserver` points at it, so Pebble resolves
the names and reads the `_acme-challenge` TXT records from that real server.
`haproxy-acme-agent renew` publishes them over RFC 2136, deploys through
HAProxy's runtime API, and real TLS handshakes show what HAProxy serves.
dns-01 runs on the HAProxy x Pebble matrix (tests/conftest.py); dns-persist-01
needs Pebble 2.10.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from agent import keys
from agent.cli import main
from tests.support.acme_stack import AcmeStack
from tests.support.bind import BindServer
from tests.support.haproxy import free_port
from tests.support.tls import served_leaf

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ZONE = "acme.test"
NAMES = ["acme.test", "*.acme.test"]
CHALLENGE_NAME = "_acme-challenge.acme.test"


@pytest.fixture
def bind(tmp_path: Path) -> Iterator[BindServer]:
    with BindServer(tmp_path / "bind", ZONE, ("acme.test", "*.acme.test")) as b:
        yield b


@pytest.fixture
def stack(
    tmp_path: Path, haproxy_bin: str, pebble_bin: str, bind: BindServer
) -> Iterator[AcmeStack]:
    with AcmeStack(
        tmp_path / "stack", haproxy_bin, dns_server=bind.address, pebble_binary=pebble_bin
    ) as s:
        yield s


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def dns_section(bind: BindServer, **over: Any) -> str:
    keys_: dict[str, Any] = {
        "zone": ZONE,
        "server": bind.address,
        "tsig_key_name": bind.key_name,
        "tsig_algorithm": "hmac-sha256",
        "tsig_secret_file": str(bind.secret_file),
        "check_servers": [bind.address],
        "propagation_timeout": 10,
    }
    keys_.update(over)
    lines = ["[[dns]]"]
    for k, v in keys_.items():
        if v is None:
            continue
        if isinstance(v, list):
            lines.append(f"{k} = [" + ", ".join(f'"{x}"' for x in v) + "]")
        elif isinstance(v, str):
            lines.append(f'{k} = "{v}"')
        else:
            lines.append(f"{k} = {v}")
    return "\n".join(lines) + "\n"


def write_config(
    tmp_path: Path, stack: AcmeStack, bind: BindServer, name: str = "config.toml", **dns: Any
) -> Path:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    cert = {
        "name": "wild",
        "domains": NAMES,
        "key": str(site / "wild.key"),
        "generate_key": True,
        "challenge": "dns-01",
    }
    config = stack.write_config(tmp_path / name, [cert])
    with config.open("a") as f:
        f.write(dns_section(bind, **dns))
    return config


def installed(state: Path, stack: AcmeStack) -> dict[str, bytes]:
    """Every stored file of certificate "wild" but the mutable state.json, and its bundle."""
    d = state / "certificates" / "wild"
    files = {
        p.relative_to(d).as_posix(): p.read_bytes()
        for p in d.rglob("*") if p.is_file() and p.name != "state.json"
    }  # fmt: skip
    files["bundle"] = (stack.cert_dir / "wild.pem").read_bytes()
    return files


def leaf_of(state: Path) -> x509.Certificate:
    return leaf_of_cert(state, "wild")


def test_wildcard_and_apex_through_dns01_are_served_and_the_txt_records_are_gone(
    tmp_path: Path, stack: AcmeStack, bind: BindServer, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, stack, bind)
    rc, out, err = cli(capsys, "renew", "-c", str(config))
    assert rc == 0, out + err
    assert "wild: renewed" in out
    leaf = leaf_of(tmp_path / "state")
    assert sorted(keys.cert_domains(leaf)) == sorted(NAMES)
    # HAProxy serves it over TLS for a concrete name under the wildcard and for the apex.
    for sni in ("www.acme.test", "anything.acme.test", "acme.test"):
        assert served_leaf(stack.https_port, sni).serial_number == leaf.serial_number
    # Both values (apex and wildcard share the name) were published in one update, then
    # removed: BIND answers nothing at the challenge name now.
    assert bind.txt(CHALLENGE_NAME) == set()
    log = bind.update_log()
    assert sum("adding an RR" in line for line in log) == 2
    assert sum("deleting an RR" in line for line in log) == 2
    assert not list((tmp_path / "state" / "dns" / "pending").glob("*"))
    # No challtestsrv runs: Pebble resolved through BIND, and a wildcard is only ever
    # offered dns-01 (RFC 8555 section 7.1.3), so BIND's records did validate it.


def test_wrong_tsig_secret_is_a_clear_error_and_nothing_installed_changes(
    tmp_path: Path, stack: AcmeStack, bind: BindServer, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, stack, bind)
    rc, out, err = cli(capsys, "renew", "-c", str(config))
    assert rc == 0, out + err
    state = tmp_path / "state"
    before = installed(state, stack)
    assert any(k.endswith("cert.pem") for k in before) and "bundle" in before
    served = served_leaf(stack.https_port, "www.acme.test").serial_number

    wrong = tmp_path / "wrong.secret"
    wrong.write_text("c2VjcmV0IHRoYXQgYmluZCBkb2VzIG5vdCBrbm93IGF0IGFsbA==\n")
    wrong.chmod(0o600)
    bad_config = write_config(tmp_path, stack, bind, "bad.toml", tsig_secret_file=str(wrong))
    rc, out, err = cli(capsys, "renew", "-c", str(bad_config), "--force")
    assert rc != 0
    text = out + err
    assert "zone acme.test" in text
    assert bind.address in text
    assert "key acme-update" in text
    assert "wrong secret" in text
    assert installed(state, stack) == before
    assert served_leaf(stack.https_port, "www.acme.test").serial_number == served
    assert bind.txt(CHALLENGE_NAME) == set()


def test_kill_9_between_publishing_and_cleanup_leaves_a_record_the_next_run_removes(
    tmp_path: Path, stack: AcmeStack, bind: BindServer, capsys: pytest.CaptureFixture[str]
) -> None:
    # The first run also waits for a server that never answers: it publishes, then
    # sits in the propagation wait, where it is killed.
    silent = f"127.0.0.1:{free_port()}"
    stuck = write_config(
        tmp_path, stack, bind, "stuck.toml",
        check_servers=[bind.address, silent], propagation_timeout=60,
    )  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log = (tmp_path / "stuck.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "renew", "-c", str(stuck)],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while len(bind.txt(CHALLENGE_NAME)) < 2:
            assert proc.poll() is None, (tmp_path / "stuck.log").read_text()
            assert time.monotonic() < deadline, "the records never appeared in BIND"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        log.close()
    assert len(bind.txt(CHALLENGE_NAME)) == 2  # left behind by the killed run
    assert len(list((tmp_path / "state" / "dns" / "pending").glob("*.json"))) == 1

    config = write_config(tmp_path, stack, bind)
    rc, out, err = cli(capsys, "renew", "-c", str(config))
    assert rc == 0, out + err
    assert bind.txt(CHALLENGE_NAME) == set()
    assert not list((tmp_path / "state" / "dns" / "pending").glob("*"))
    leaf = leaf_of(tmp_path / "state")
    assert served_leaf(stack.https_port, "acme.test").serial_number == leaf.serial_number


def test_hook_solver_drives_bind_through_nsupdate(
    tmp_path: Path, stack: AcmeStack, bind: BindServer, capsys: pytest.CaptureFixture[str]
) -> None:
    hook = REPO / "docs" / "examples" / "dns-hook-nsupdate.sh"
    assert os.access(hook, os.X_OK)
    config = write_config(
        tmp_path, stack, bind,
        server=None, tsig_key_name=None, tsig_algorithm=None, tsig_secret_file=None,
        hook=[str(hook)],
    )  # fmt: skip
    host, port = bind.address.rsplit(":", 1)
    os.environ["NSUPDATE_SERVER"] = host
    os.environ["NSUPDATE_PORT"] = port
    os.environ["NSUPDATE_KEY_FILE"] = str(bind.nsupdate_key_file)
    try:
        rc, out, err = cli(capsys, "renew", "-c", str(config))
    finally:
        for k in ("NSUPDATE_SERVER", "NSUPDATE_PORT", "NSUPDATE_KEY_FILE"):
            del os.environ[k]
    assert rc == 0, out + err
    leaf = leaf_of(tmp_path / "state")
    assert served_leaf(stack.https_port, "www.acme.test").serial_number == leaf.serial_number
    log = bind.update_log()
    assert sum("adding an RR" in line for line in log) == 2
    assert sum("deleting an RR" in line for line in log) == 2
    assert bind.txt(CHALLENGE_NAME) == set()


def test_failing_hook_reports_exit_status_and_stderr(
    tmp_path: Path, stack: AcmeStack, bind: BindServer, capsys: pytest.CaptureFixture[str]
) -> None:
    hook = tmp_path / "bad-hook.sh"
    hook.write_text("#!/bin/sh\necho 'provider said: token expired' >&2\nexit 7\n")
    hook.chmod(0o755)
    config = write_config(
        tmp_path, stack, bind,
        server=None, tsig_key_name=None, tsig_algorithm=None, tsig_secret_file=None,
        hook=[str(hook)],
    )  # fmt: skip
    rc, out, err = cli(capsys, "renew", "-c", str(config))
    assert rc != 0
    text = out + err
    assert "exited with status 7" in text
    assert "provider said: token expired" in text
    assert not (tmp_path / "state" / "certificates" / "wild" / "current").exists()
    assert not (stack.cert_dir / "wild.pem").exists()


PEBBLE_2_10 = os.environ.get(
    "PEBBLE_2_10_BIN", str(REPO / ".cache" / "pebble-2.10" / "usr" / "bin" / "pebble")
)


def publish_once(bind: BindServer, line: str) -> None:
    """The operator's one-time step: add the printed record to the zone (here over RFC 2136
    with BIND's key; any means of editing the zone would do)."""
    import base64

    import dns.name
    import dns.query
    import dns.rdataclass
    import dns.rdatatype
    import dns.rdtypes.ANY.TXT
    import dns.tsigkeyring
    import dns.update

    name, ttl, _, _, quoted = line.split(" ", 4)
    value = quoted.strip().removeprefix('"').removesuffix('"')
    upd = dns.update.UpdateMessage(
        ZONE + ".",
        keyring={dns.name.from_text(bind.key_name): base64.b64decode(bind.secret)},
        keyname=dns.name.from_text(bind.key_name),
    )
    upd.add(
        name, int(ttl),
        dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, [value.encode()]),
    )  # fmt: skip
    assert dns.query.tcp(upd, "127.0.0.1", timeout=5, port=bind.port).rcode() == 0


def test_dns_persist01_record_published_once_then_renewals_write_nothing_to_dns(
    tmp_path: Path, haproxy_bin: str, bind: BindServer, capsys: pytest.CaptureFixture[str]
) -> None:
    with AcmeStack(
        tmp_path / "stack", haproxy_bin, dns_server=bind.address, pebble_binary=PEBBLE_2_10
    ) as stack:
        site = tmp_path / "site"
        site.mkdir()
        cert = {
            "name": "persist",
            "domains": NAMES,
            "key": str(site / "persist.key"),
            "generate_key": True,
            "challenge": "dns-persist-01",
        }
        config = stack.write_config(tmp_path / "config.toml", [cert])
        with config.open("a") as f:  # lookup only: the agent has no DNS write access at all
            f.write(f'[[dns]]\nzone = "{ZONE}"\ncheck_servers = ["{bind.address}"]\n')

        rc, out, err = cli(capsys, "dns-persist", "-c", str(config), "persist")
        assert rc == 0, out + err
        (line,) = [x for x in out.splitlines() if not x.startswith(";")]
        assert line.startswith('_validation-persist.acme.test. 300 IN TXT "')
        account = json.loads(
            next((tmp_path / "state" / "accounts").glob("*/account.json")).read_text()
        )
        # Pebble's issuer domain name, our account, and the wildcard policy.
        assert line.endswith(
            f'"pebble.letsencrypt.org; accounturi={account["uri"]}; policy=wildcard"'
        )

        rc, out, _ = cli(capsys, "status", "-c", str(config))
        assert rc == 0
        assert "_validation-persist.acme.test. TXT is missing" in out

        publish_once(bind, line)
        published = len(bind.update_log())
        rc, out, _ = cli(capsys, "status", "-c", str(config), "--json")
        (row,) = json.loads(out)
        assert row["dns_persist"] == {"ok": True, "problems": []}

        serials = []
        for argv in (["renew"], ["renew", "--force"]):
            rc, out, err = cli(capsys, *argv, "-c", str(config))
            assert rc == 0, out + err
            assert "persist: renewed" in out
            leaf = leaf_of_cert(tmp_path / "state", "persist")
            serials.append(leaf.serial_number)
            for sni in ("www.acme.test", "acme.test"):
                assert served_leaf(stack.https_port, sni).serial_number == leaf.serial_number
        assert serials[0] != serials[1]
        # Two orders validated, and BIND applied no update since the record was published.
        assert len(bind.update_log()) == published
        assert not (tmp_path / "state" / "dns" / "pending").exists()


def leaf_of_cert(state: Path, name: str) -> x509.Certificate:
    """The leaf of the certificate's current generation (agent.layout)."""
    d = state / "certificates" / name
    return x509.load_pem_x509_certificate(
        (d / "gen" / (d / "current").read_text() / "cert.pem").read_bytes()
    )


def test_persist_check_tells_a_wrong_account_and_a_missing_wildcard_policy(
    bind: BindServer,
) -> None:
    from agent.config import parse_listen
    from agent.dns01 import check_persist_record

    server = [parse_listen(bind.address)]
    publish_once(
        bind, '_validation-persist.acme.test. 300 IN TXT "ca.test; accounturi=https://a/1"'
    )
    ok = check_persist_record(server, "acme.test", ["ca.test"], "https://a/1", wildcard=False)
    assert ok is None
    wrong = check_persist_record(server, "acme.test", ["ca.test"], "https://a/2", wildcard=False)
    assert wrong is not None and "accounturi is 'https://a/1', not 'https://a/2'" in wrong
    no_policy = check_persist_record(server, "acme.test", ["ca.test"], "https://a/1", wildcard=True)
    assert no_policy is not None and "policy=wildcard" in no_policy
    other_ca = check_persist_record(server, "acme.test", ["ca.other"], "https://a/1", False)
    assert other_ca is not None and "names no issuer of this CA" in other_ca


def test_without_check_servers_the_zones_ns_set_is_found_at_the_primary(
    bind: BindServer,
) -> None:
    from agent.config import DnsZoneConfig, parse_listen
    from agent.dns01 import authoritative_servers

    zone = DnsZoneConfig(zone=ZONE, server=parse_listen(bind.address))
    # BIND's zone: NS ns.acme.test., ns.acme.test. A 127.0.0.1; name servers serve port 53.
    assert authoritative_servers(zone) == [parse_listen("127.0.0.1:53")]
