"""Start-up permission checks: a world-readable key warns, strict mode refuses
group/world-accessible keys, and the messages name the file, mode and fix."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from agent.config import Config, ConfigError, load_config
from agent.keys import create_key_file
from agent.permissions import PermissionsError, check, enforce


def make(tmp: Path, *, strict: bool | None = None, key_mode: int = 0o600) -> Config:
    state, certs, keys = tmp / "state", tmp / "certs", tmp / "keys"
    state.mkdir(mode=0o700)
    certs.mkdir(mode=0o750)
    keys.mkdir(mode=0o700)
    key = keys / "www.key"
    create_key_file(key, "ec256")
    key.chmod(key_mode)
    lines = [
        f'state_dir = "{state}"',
        *([f"strict_permissions = {'true' if strict else 'false'}"] if strict is not None else []),
        "[acme]",
        'directory = "https://127.0.0.1:14000/dir"',
        "[haproxy]",
        f'cert_dir = "{certs}"',
        "[[certificates]]",
        'name = "www"',
        'domains = ["www.example.test"]',
        f'key = "{key}"',
    ]
    (tmp / "config.toml").write_text("\n".join(lines) + "\n")
    return load_config(tmp / "config.toml")


def test_strict_permissions_defaults_to_off_and_must_be_a_boolean(tmp_path: Path) -> None:
    assert make(tmp_path).strict_permissions is False
    text = (
        (tmp_path / "config.toml")
        .read_text()
        .replace("state_dir", 'strict_permissions = "yes"\nstate_dir', 1)
    )
    (tmp_path / "config.toml").write_text(text)
    with pytest.raises(ConfigError, match=r"config\.toml: strict_permissions: expected a boolean"):
        load_config(tmp_path / "config.toml")


def test_private_keys_pass_in_strict_mode(tmp_path: Path) -> None:
    cfg = make(tmp_path, strict=True)
    (tmp_path / "certs" / "www.pem").write_bytes(b"bundle")
    (tmp_path / "certs" / "www.pem").chmod(0o600)
    assert check(cfg) == []
    assert enforce(cfg) == []


def test_world_readable_key_warns_and_still_starts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = make(tmp_path, key_mode=0o644)
    key = tmp_path / "keys" / "www.key"
    with caplog.at_level(logging.WARNING):
        warnings = enforce(cfg)
    assert len(warnings) == 1 and not warnings[0].fatal
    assert f"{key}: private key of certificate 'www' is world-readable (mode 0644)" in caplog.text
    assert f"chmod 600 {key}" in caplog.text
    # The agent reports; it never changes the operator's file.
    assert key.stat().st_mode & 0o777 == 0o644


def test_world_readable_key_is_refused_in_strict_mode(tmp_path: Path) -> None:
    cfg = make(tmp_path, strict=True, key_mode=0o604)
    with pytest.raises(
        PermissionsError, match=r"www\.key: private key of certificate 'www' is world"
    ):
        enforce(cfg)


def test_group_readable_key_is_accepted_unless_strict(tmp_path: Path) -> None:
    (tmp_path / "lax").mkdir()
    assert check(make(tmp_path / "lax", key_mode=0o640)) == []
    (tmp_path / "strict").mkdir()
    strict = make(tmp_path / "strict", strict=True, key_mode=0o640)
    with pytest.raises(PermissionsError) as e:
        enforce(strict)
    assert [p.message.split(" (")[0] for p in e.value.problems] == [
        "private key of certificate 'www' is group-accessible"
    ]
    assert "strict_permissions = true" in str(e.value)


def test_world_readable_haproxy_bundle_is_reported(tmp_path: Path) -> None:
    cfg = make(tmp_path, strict=True)
    bundle = tmp_path / "certs" / "www.pem"
    bundle.write_bytes(b"cert + key")
    bundle.chmod(0o644)
    problems = check(cfg)
    assert {p.path for p in problems} == {bundle}
    assert all(p.fatal for p in problems)
    assert "HAProxy bundle of 'www' (has the key) is world-readable" in problems[0].message
    assert "is group-accessible (mode 0644)" in problems[1].message


def test_open_state_dir_and_world_writable_key_dir_are_reported(tmp_path: Path) -> None:
    cfg = make(tmp_path)
    (tmp_path / "state").chmod(0o755)
    (tmp_path / "keys").chmod(0o777)
    messages = [p.message for p in check(cfg)]
    assert any(m.startswith("state directory is open to others (mode 0755)") for m in messages)
    assert any("directory of the key of 'www' is world-writable (mode 0777)" in m for m in messages)
    assert all(not p.fatal for p in check(cfg))
    assert all(p.fatal for p in check(cfg, strict=True))


def test_missing_files_are_not_permission_problems(tmp_path: Path) -> None:
    cfg = make(tmp_path, strict=True)
    # no bundle yet (never issued): nothing to say
    assert not (tmp_path / "certs" / "www.pem").exists()
    assert check(cfg) == []


def test_renew_refuses_to_start_with_an_open_key_in_strict_mode(tmp_path: Path) -> None:
    import subprocess
    import sys

    cfg = make(tmp_path, strict=True, key_mode=0o644)
    r = subprocess.run(
        [sys.executable, "-m", "agent.cli", "renew", "-c", str(cfg.path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert "refusing to start" in r.stderr and "www.key" in r.stderr
    assert not (tmp_path / "state" / "certificates").exists()
