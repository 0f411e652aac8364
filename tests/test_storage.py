"""atomic_write and FileStorage: modes, atomicity, key sanitising, locks across processes."""

from __future__ import annotations

import json
import multiprocessing
import os
import stat
import time
from pathlib import Path

import pytest

from agent.storage import (
    FileStorage,
    LockTimeout,
    StorageKeyError,
    UnsafeDirectoryError,
    atomic_write,
    safe_key,
    safe_name,
)


def mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_atomic_write_sets_mode_regardless_of_umask(tmp_path: Path) -> None:
    old = os.umask(0o000)
    try:
        atomic_write(tmp_path / "k", b"secret", 0o600)
        atomic_write(tmp_path / "c", b"public", 0o644)
    finally:
        os.umask(old)
    assert mode(tmp_path / "k") == 0o600
    assert mode(tmp_path / "c") == 0o644
    assert (tmp_path / "k").read_bytes() == b"secret"


def test_atomic_write_replaces_and_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")
    os.chmod(target, 0o644)
    atomic_write(target, b"new", 0o600)
    assert target.read_bytes() == b"new"
    assert mode(target) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_atomic_write_failure_keeps_old_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")

    def boom(*a: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="No space"):
        atomic_write(target, b"new", 0o600)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


@pytest.mark.parametrize(
    "bad", ["", "/abs", "a/../b", "..", "a/..", ".hidden", "a//b", "a/", "a\\b", "a/b\x00", "é"]
)
def test_safe_key_rejects_traversal_and_odd_names(bad: str) -> None:
    with pytest.raises(StorageKeyError):
        safe_key(bad)


def test_safe_key_accepts_certificate_and_domain_names() -> None:
    assert safe_key("certificates/www.example.com/bundle.pem") == (
        "certificates/www.example.com/bundle.pem"
    )
    with pytest.raises(StorageKeyError):
        safe_name("a/b")


def test_file_storage_modes_roundtrip_and_listing(tmp_path: Path) -> None:
    root = tmp_path / "state"
    st = FileStorage(root)
    st.store("certificates/www/bundle.pem", b"key material", secret=True)
    st.store("certificates/www/cert.pem", b"cert")
    st.store("accounts/ca/account.json", b"{}")
    assert mode(root) == 0o700
    assert mode(root / "certificates") == 0o700
    assert mode(root / "certificates" / "www") == 0o700
    assert mode(root / "certificates" / "www" / "bundle.pem") == 0o600
    assert mode(root / "certificates" / "www" / "cert.pem") == 0o644
    assert st.load("certificates/www/cert.pem") == b"cert"
    assert st.list("certificates") == ["certificates/www"]
    assert st.list("certificates/www") == [
        "certificates/www/bundle.pem",
        "certificates/www/cert.pem",
    ]
    assert st.list("", recursive=True) == [
        "accounts/ca/account.json",
        "certificates/www/bundle.pem",
        "certificates/www/cert.pem",
    ]
    assert st.exists("certificates/www/cert.pem")
    assert st.stat("certificates/www/cert.pem").size == 4
    st.delete("certificates/www/cert.pem")
    st.delete("certificates/www/cert.pem")  # idempotent
    assert not st.exists("certificates/www/cert.pem")
    with pytest.raises(FileNotFoundError):
        st.load("certificates/www/cert.pem")


def test_file_storage_refuses_a_loose_existing_root_and_leaves_its_mode(tmp_path: Path) -> None:
    # Was "tightens": chmodding a directory the agent did not create (state_dir = "/tmp"
    # by mistake) locks others out of it. Now refused, naming mode and fix; nothing written.
    root = tmp_path / "state"
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)
    with pytest.raises(UnsafeDirectoryError) as e:
        FileStorage(root).store("x", b"1")
    assert f"{root} is open to others (mode 0755)" in str(e.value)
    assert f"chmod 700 {root}" in str(e.value)
    assert mode(root) == 0o755
    assert list(root.iterdir()) == []


def test_created_state_dir_and_subdirectories_are_0700_under_umask_000(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        FileStorage(tmp_path / "new" / "state").store("certificates/www/cert.pem", b"1")
    finally:
        os.umask(old)
    assert mode(tmp_path / "new") == 0o755  # a missing parent: traversable, not writable
    assert mode(tmp_path / "new" / "state") == 0o700
    assert mode(tmp_path / "new" / "state" / "certificates") == 0o700
    assert mode(tmp_path / "new" / "state" / "certificates" / "www") == 0o700


def test_existing_subdirectory_of_a_private_root_is_used_as_it_is(tmp_path: Path) -> None:
    root = tmp_path / "state"
    root.mkdir(mode=0o700)
    (root / "locks").mkdir(mode=0o755)
    os.chmod(root / "locks", 0o755)
    FileStorage(root).store("locks/x", b"1")
    assert mode(root / "locks") == 0o755


def test_file_storage_refuses_escaping_keys(tmp_path: Path) -> None:
    st = FileStorage(tmp_path / "state")
    with pytest.raises(StorageKeyError):
        st.store("../outside", b"x")
    assert not (tmp_path / "outside").exists()


def _hold_lock(root: str, hold: float, started: multiprocessing.synchronize.Event) -> None:
    st = FileStorage(Path(root))
    st.lock("www", timeout=5)
    started.set()
    time.sleep(hold)
    st.unlock("www")


def test_lock_excludes_another_process_until_released(tmp_path: Path) -> None:
    root = tmp_path / "state"
    ctx = multiprocessing.get_context("fork")
    started = ctx.Event()
    proc = ctx.Process(target=_hold_lock, args=(str(root), 0.6, started))
    proc.start()
    try:
        assert started.wait(5)
        st = FileStorage(root)
        with pytest.raises(LockTimeout, match="held by another process"):
            st.lock("www", timeout=0.1)
        t0 = time.monotonic()
        st.lock("www", timeout=5)  # released by the holder after ~0.6 s
        assert time.monotonic() - t0 > 0.1
        st.unlock("www")
    finally:
        proc.join(5)


def test_lock_of_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    root = tmp_path / "state"
    st = FileStorage(root)
    root.mkdir(mode=0o700)  # an existing state dir must be closed to others
    (root / "locks").mkdir()
    dead = multiprocessing.get_context("fork").Process(target=lambda: None)
    dead.start()
    dead.join()
    (root / "locks" / "www.lock").write_text(
        json.dumps({"host": os.uname().nodename, "pid": dead.pid, "created": time.time()})
    )
    st.lock("www", timeout=1)
    st.unlock("www")


def test_expired_lock_is_taken_over(tmp_path: Path) -> None:
    root = tmp_path / "state"
    root.mkdir(mode=0o700)  # an existing state dir must be closed to others
    (root / "locks").mkdir()
    (root / "locks" / "www.lock").write_text(
        json.dumps({"host": "other-host", "pid": 1, "created": time.time() - 1000})
    )
    st = FileStorage(root)
    with pytest.raises(LockTimeout):
        st.lock("www", timeout=0.1, expires_after=5000)
    st.lock("www", timeout=1, expires_after=10)
    with st.locked("other"):
        assert (root / "locks" / "other.lock").exists()
    assert not (root / "locks" / "other.lock").exists()
    st.unlock("www")


def test_unlock_of_a_lock_not_held_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="not held"):
        FileStorage(tmp_path).unlock("www")


def test_unlock_after_a_stale_takeover_keeps_the_new_holders_lock(tmp_path: Path) -> None:
    root = tmp_path / "state"
    a, b = FileStorage(root), FileStorage(root)
    a.lock("www", timeout=1, expires_after=0.2)
    time.sleep(0.3)  # a's lease runs out (a froze, or was SIGSTOPped)
    b.lock("www", timeout=5, expires_after=30)
    with pytest.raises(Exception, match="taken over"):
        a.unlock("www")  # the old holder wakes up and releases "its" lock
    assert (root / "locks" / "www.lock").exists()
    with pytest.raises(LockTimeout):
        FileStorage(root).lock("www", timeout=0.1)  # still b's: nobody else gets in
    b.unlock("www")
