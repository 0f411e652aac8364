"""CLI: every invalid config exits 2 naming file and key and writes nothing; pins, csr, status."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from agent import keys
from agent.cli import main
from agent.storage import FileStorage
from tests.test_config import BASE, INVALID, cert_block, site, write

__all__ = ["site"]  # the fixture, imported for pytest

REPO = Path(__file__).resolve().parents[1]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("command", ["renew", "check-config"])
@pytest.mark.parametrize("extra, key, fragment", INVALID, ids=[i[1] + ":" + i[2] for i in INVALID])
def test_invalid_config_exits_2_naming_the_key_and_writes_nothing(
    site: Path,
    capsys: pytest.CaptureFixture[str],
    command: str,
    extra: str,
    key: str,
    fragment: str,
) -> None:
    path = write(site, BASE + extra)
    before = sorted(p.name for p in site.iterdir())
    rc, out, err = run(capsys, command, "-c", str(path))
    assert rc == 2
    assert f"{path}: {key}: " in err and fragment in err
    assert out == ""
    assert sorted(p.name for p in site.iterdir()) == before  # no state dir, no key


def test_console_script_exits_2_for_a_bad_config(site: Path) -> None:
    path = write(site, BASE + cert_block(renew_before='"soon"'))
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "renew", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert proc.returncode == 2
    assert f"{path}: certificates[0].renew_before: " in proc.stderr


@pytest.mark.parametrize(
    "argv",
    [["check-config"], ["run"], ["renew"], ["pins", "www"], ["keys", "rollover", "www"]],
    ids=lambda argv: " ".join(argv),
)
def test_generate_next_key_in_a_fleet_stops_every_command_before_it_writes(
    site: Path, argv: list[str]
) -> None:
    """Each command loads the config through load_config: a fleet that would let
    each node create its own next key exits 2 naming file, certificate and key.
    A subprocess: on a config that is not refused `run` would start a daemon."""
    secret = site / "fleet.secret"
    secret.write_bytes(bytes(range(32)))
    secret.chmod(0o600)
    path = write(
        site,
        BASE
        + cert_block(generate_next_key="true")
        + '[fleet]\nredis = "redis://127.0.0.1:1/0"\nsecret_file = "fleet.secret"\n',
    )
    before = sorted(p.name for p in site.rglob("*"))
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", argv[0], "-c", str(path), *argv[1:]],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert proc.returncode == 2, proc.stderr
    assert f"{path}: certificates[0].generate_next_key: refused for certificate 'www'" in (
        proc.stderr
    )
    assert "copied to every node at the same path (mode 0600)" in proc.stderr
    assert proc.stdout == ""
    assert sorted(p.name for p in site.rglob("*")) == before  # no state dir, no next key


def test_missing_default_config_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc, _, err = run(capsys, "check-config", "-c", str(tmp_path / "nope.toml"))
    assert rc == 2 and "does not exist" in err


def test_unknown_certificate_name_exits_2(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(site, BASE + cert_block())
    for argv in (["renew", "nope"], ["pins", "nope"], ["csr", "nope"]):
        rc, _, err = run(capsys, argv[0], "-c", str(path), *argv[1:])
        assert rc == 2
        assert "no certificate named 'nope'" in err


def test_check_config_ok(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(site, BASE + cert_block())
    rc, out, _ = run(capsys, "check-config", "-c", str(path))
    assert rc == 0 and "OK (1 certificates: www)" in out


def test_pins_prints_key_backup_hpkp_and_tlsa(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    backup = "A" * 43 + "="
    path = write(site, BASE + cert_block(backup_pins=f'["{backup}"]'))
    key = keys.load_private_key(site / "ec.key")
    rc, out, _ = run(capsys, "pins", "-c", str(path))
    assert rc == 0
    pin = keys.spki_pin(key)
    assert f"pin-sha256 key     {pin}" in out
    assert f"pin-sha256 backup  {backup}" in out
    assert (
        f'Public-Key-Pins-Report-Only: pin-sha256="{pin}"; pin-sha256="{backup}"; max-age=' in out
    )
    assert f"TLSA 3 1 1 {keys.tlsa_311(key)}  (key)" in out
    assert f"TLSA 3 1 1 {keys.pin_to_tlsa(backup)}  (backup)" in out
    rc, out, _ = run(capsys, "pins", "-c", str(path), "--report-uri", "https://r.example/hpkp")
    assert 'max-age=5184000; report-uri="https://r.example/hpkp"' in out


def test_pins_creates_a_generate_key_key_once(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(site, BASE + cert_block(key='"gen.key"', generate_key="true", key_type='"ec384"'))
    rc, out, _ = run(capsys, "pins", "-c", str(path), "--json")
    first = json.loads(out)[0]
    assert rc == 0 and first["key_type"] == "ECDSA P-384"
    key_bytes = (site / "gen.key").read_bytes()
    rc, out, _ = run(capsys, "pins", "-c", str(path), "--json")
    assert json.loads(out)[0]["key_pin"] == first["key_pin"]
    assert (site / "gen.key").read_bytes() == key_bytes


def test_csr_is_built_from_the_key_with_domains_as_sans(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(site, BASE + cert_block(domains='["www.example.com", "example.com"]'))
    rc, out, _ = run(capsys, "csr", "-c", str(path), "www")
    assert rc == 0
    csr = x509.load_pem_x509_csr(out.encode())
    assert keys.csr_domains(csr) == ["www.example.com", "example.com"]
    assert keys.same_public_key(csr.public_key(), keys.load_private_key(site / "ec.key"))  # type: ignore[arg-type]


def test_csr_of_a_bring_your_own_csr_is_that_csr(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        site,
        BASE
        + cert_block(
            key='"rsa.key"', csr='"rsa.csr"', domains='["a.example.com", "b.example.com"]'
        ),
    )
    rc, out, _ = run(capsys, "csr", "-c", str(path), "www")
    assert rc == 0 and out.encode() == (site / "rsa.csr").read_bytes()


def test_status_before_any_order(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(site, BASE + cert_block())
    rc, out, _ = run(capsys, "status", "-c", str(path))
    assert rc == 0
    assert "next renewal  now" in out and "never attempted" in out
    assert not (site / "state").exists()


def test_dry_run_lists_what_would_be_renewed(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(site, BASE + cert_block())
    rc, out, _ = run(capsys, "renew", "-c", str(path), "--dry-run")
    assert rc == 0
    assert "www: dry-run: would renew: no certificate yet" in out
    assert not (site / "state").exists()


def test_overlapping_renew_runs_leave_the_work_to_the_first(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(site, BASE + "timeout = 0.2\n" + cert_block())
    storage = FileStorage(site / "state")
    storage.lock("renew-command")  # as the other run would
    try:
        rc, out, err = run(capsys, "renew", "-c", str(path))
    finally:
        storage.unlock("renew-command")
    assert rc == 0
    assert "another `renew` run is in progress" in err and out == ""
    assert not (site / "state" / "certificates").exists()


def _killed_run_record(site: Path, **owner: object) -> None:
    """The lock record a `renew` killed with -9 left (as this version writes it)."""
    (site / "state").mkdir(exist_ok=True, mode=0o700)
    locks = site / "state" / "locks"
    locks.mkdir(exist_ok=True, mode=0o700)
    (locks / "renew-command.lock").write_text(json.dumps(owner))


@pytest.mark.parametrize(
    "who",
    [
        # `docker run --rm` from cron: a new host name each time, killed 20 min ago.
        {"host": "3f9c2d1e0b7a", "pid": 1, "start_time": 7, "age": 1200.0},
        # The same host name (--hostname) and PID 1 again, but another process.
        {"host": None, "pid": 1, "start_time": -1, "age": 10.0},
    ],
    ids=["another-host-name", "pid-1-with-another-start-time"],
)
def test_a_killed_renew_does_not_block_the_next_run(
    site: Path, capsys: pytest.CaptureFixture[str], who: dict[str, Any]
) -> None:
    import socket
    import time

    now = time.time()
    stat1 = Path("/proc/1/stat").read_bytes()
    start = int(stat1[stat1.rindex(b")") + 2 :].split()[19])  # field 22: start time
    owner = {
        "token": "0" * 32,
        "host": who["host"] or socket.gethostname(),
        "pid": who["pid"],
        "start_time": start + 1000 if who["start_time"] == -1 else who["start_time"],
        "boot_id": Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
        "acquired": now - who["age"],
        "created": now - who["age"],
        "expires": now - who["age"] + 120.0,  # its lease; it renewed it until killed
    }
    _killed_run_record(site, **owner)
    path = write(site, BASE + "timeout = 0.2\n" + cert_block())
    rc, _, err = run(capsys, "renew", "-c", str(path))
    # This run did the work (and failed only because no CA listens here).
    assert "another `renew` run is in progress" not in err
    assert "www: failed:" in err and rc == 1
    assert not (site / "state" / "locks" / "renew-command.lock").exists()
