"""`run`, `renew` and `check-config` share one set of start-up checks (permissions, state_dir):
what `run` refuses, `check-config` refuses too, with exit 2 naming the key and nothing written.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli import main
from agent.keys import create_key_file


def write_config(tmp: Path, state: Path, *, strict: bool = False, key_mode: int = 0o600) -> Path:
    keys = tmp / "keys"
    keys.mkdir(mode=0o700, exist_ok=True)
    key = keys / "www.key"
    if not key.exists():
        create_key_file(key, "ec256")
    key.chmod(key_mode)
    certs = tmp / "certs"
    certs.mkdir(mode=0o700, exist_ok=True)
    lines = [
        f'state_dir = "{state}"',
        f"strict_permissions = {'true' if strict else 'false'}",
        "[acme]",
        'directory = "https://127.0.0.1:1/dir"',
        "[spoa]",
        'listen = "127.0.0.1:1"',
        "[haproxy]",
        f'cert_dir = "{certs}"',
        "[[certificates]]",
        'name = "www"',
        'domains = ["www.example.test"]',
        f'key = "{key}"',
    ]
    path = tmp / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def run_daemon(config: Path) -> subprocess.CompletedProcess[str]:
    """`run` in a subprocess; a daemon that starts (the old behaviour) is stopped by its handle."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run", "-c", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=10)
        return subprocess.CompletedProcess(proc.args, -9, out, err + "\n(still running)")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_check_config_refuses_a_world_readable_key_under_strict_permissions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, tmp_path / "state", strict=True, key_mode=0o644)
    rc, out, err = cli(capsys, "check-config", "-c", str(config))
    assert rc == 2, out + err
    assert "refusing to start" in err and "www.key" in err and "chmod 600" in err
    assert "OK" not in out
    assert not (tmp_path / "state").exists()
    # ... exactly as `run` does (the systemd unit must not restart-loop on a passed config).
    r = run_daemon(config)
    assert r.returncode == 2, r.stderr
    assert "refusing to start" in r.stderr


def test_check_config_passes_a_config_run_accepts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, tmp_path / "state", strict=True)
    rc, out, err = cli(capsys, "check-config", "-c", str(config))
    assert rc == 0, err
    assert "OK" in out
    assert not (tmp_path / "state").exists()  # checks write nothing


@pytest.mark.parametrize("command", ["check-config", "renew", "status", "run"])
def test_state_dir_that_is_a_file_is_exit_2_naming_state_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    state = tmp_path / "state"
    state.write_text("not a directory\n")
    config = write_config(tmp_path, state)
    if command == "run":
        r = run_daemon(config)
        rc, err = r.returncode, r.stderr
    else:
        rc, _, err = cli(capsys, command, "-c", str(config))
    assert rc == 2, err
    assert f"config.toml: state_dir: {state} exists and is not a directory" in err
    assert "control" not in err
    assert state.read_text() == "not a directory\n"


def test_state_dir_below_a_file_is_exit_2_naming_state_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "plain").write_text("x")
    config = write_config(tmp_path, tmp_path / "plain" / "state")
    rc, _, err = cli(capsys, "check-config", "-c", str(config))
    assert rc == 2
    assert "state_dir: " in err and "is not a directory" in err


@pytest.mark.parametrize("command", ["check-config", "renew", "run"])
def test_existing_open_state_dir_is_refused_not_chmodded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    state = tmp_path / "shared"
    state.mkdir()
    state.chmod(0o755)
    config = write_config(tmp_path, state)
    if command == "run":
        r = run_daemon(config)
        rc, err = r.returncode, r.stderr
    else:
        rc, _, err = cli(capsys, command, "-c", str(config))
    assert rc == 2, err
    assert f"state_dir: {state} is open to others (mode 0755)" in err
    assert f"chmod 700 {state}" in err and "another directory" in err
    assert mode(state) == 0o755
    assert list(state.iterdir()) == []


def test_daemon_creates_a_missing_state_dir_0700_under_umask_000(tmp_path: Path) -> None:
    from agent.storage import ensure_private_dir

    old = os.umask(0)
    try:
        ensure_private_dir(tmp_path / "a" / "b" / "state")
    finally:
        os.umask(old)
    assert mode(tmp_path / "a") == 0o755
    assert mode(tmp_path / "a" / "b") == 0o755
    assert mode(tmp_path / "a" / "b" / "state") == 0o700


def test_reload_refuses_a_config_whose_state_dir_run_would_refuse(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio

    from agent.config import load_config
    from agent.daemon import Daemon

    good = write_config(tmp_path, tmp_path / "state")
    daemon = Daemon(load_config(good))
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    write_config(tmp_path, shared)
    assert asyncio.run(daemon.reload(good)) is False
    assert daemon.config.state_dir == tmp_path / "state"
    assert "reload refused" in caplog.text and "is open to others (mode 0755)" in caplog.text
    assert mode(shared) == 0o755
