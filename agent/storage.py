"""Durable state: atomic file writes and the `Storage` interface (with locks).

`atomic_write` is the one way this project writes a file that matters: a temp
file in the same directory, fsync, rename over the target, fsync the directory.
A reader therefore sees either the old bytes or the new bytes, never a mix, and
after a crash the rename is either durable or not there at all.

`Storage` is a small key/value interface modelled on CertMagic's: keys are
slash-separated names ("certificates/www/bundle.pem"), values are bytes, and a
lock primitive lets several processes (a cron `renew` and the daemon, or a fleet
sharing one backend) avoid ordering the same certificate twice. `FileStorage`
keeps everything under the state directory; a shared backend (Redis) can
implement the same interface later without touching the ACME or SPOE code.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import socket
import stat
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# Files holding private keys (or bundles containing one) are written with this mode.
SECRET_MODE = 0o600
PUBLIC_MODE = 0o644
DIR_MODE = 0o700


def fsync_dir(directory: Path) -> None:
    """fsync a directory so a rename inside it survives a crash."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Replace `path` with `data` atomically; the file ends up with permission `mode`.

    The temp file is created in `path`'s directory (so the rename never crosses
    file systems) with `mode` from the start (a key is never briefly world
    readable), fsynced, renamed over `path`, and the directory is fsynced.
    The parent directory must exist. On any error the target is untouched and
    the temp file is removed.
    """
    path = Path(path)
    directory = path.parent
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    tmp = Path(tmp_name)
    try:
        # mkstemp creates 0600; set the final mode explicitly (umask does not apply).
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            fd = -1
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(directory)


# Mode given to the missing parents of a private directory the agent creates.
PARENT_DIR_MODE = 0o755


class UnsafeDirectoryError(OSError):
    """A directory the agent would keep secrets in is not a directory or is open to others.

    The message names the path, its mode and the fix; the agent changes nothing."""


def private_dir_problem(path: Path) -> str | None:
    """Why `path` cannot be used as a private (0700) directory, or None.

    None also when `path` does not exist yet but could be created (its nearest
    existing ancestor is a directory). Reads only; changes nothing.
    """
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        parent = path.parent
        while parent != parent.parent and not parent.exists():
            parent = parent.parent
        if parent.exists() and not parent.is_dir():
            return f"{path} cannot be created: {parent} is not a directory"
        return None
    except NotADirectoryError:
        return f"{path} cannot be created: one of its parents is not a directory"
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o007:
        return (
            f"{path} is open to others (mode {mode:04o}); the agent does not change the mode "
            f"of a directory it did not create: run `chmod 700 {path}` or choose another "
            "directory"
        )
    return None


def ensure_private_dir(path: Path, *, within: Path | None = None) -> None:
    """Make sure `path` is a directory closed to others, creating it if missing.

    `within`: `path` is a subdirectory of that private directory (already
    checked): an existing one is used as it is whatever its mode (others cannot
    reach it through `within`), a missing one is created 0700.

    An existing directory is never chmodded: one that is open to others (any
    "other" permission bit) or not a directory raises UnsafeDirectoryError
    naming the path, mode and fix (state_dir = "/tmp" by mistake must not lock
    everyone else out of /tmp). A directory created here gets 0700 and missing
    parents 0755, set explicitly after mkdir (mkdir's mode is masked by the
    umask; explicit modes make the result the same under umask 000 or 077).
    """
    path = Path(path)
    if within is not None and path.is_dir():
        return
    problem = private_dir_problem(path)
    if problem is not None:
        raise UnsafeDirectoryError(problem)
    if path.is_dir():
        return
    missing: list[Path] = []
    cur = path
    while not cur.exists() and cur != cur.parent:
        missing.append(cur)
        cur = cur.parent
    for d in reversed(missing):
        final = d == path
        mode = DIR_MODE if final else PARENT_DIR_MODE
        try:
            d.mkdir(mode=mode & DIR_MODE)  # never wider than 0700 until chmod below
        except FileExistsError:
            # A concurrent creator won the race: its directory must pass the same check.
            if final and (problem := private_dir_problem(d)) is not None:
                raise UnsafeDirectoryError(problem) from None
            continue
        os.chmod(d, mode)  # we created it: give it its mode whatever the umask


# --- key sanitising -------------------------------------------------------------

_SAFE_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,254}$")


class StorageKeyError(ValueError):
    """A storage key that is empty, absolute, or would leave the storage root."""


def safe_key(key: str) -> str:
    """Validate a slash-separated storage key and return it normalised.

    This is the ONE place key names are checked: every part must start with an
    alphanumeric character and contain only ``[A-Za-z0-9._@+-]`` (so no ``..``,
    no hidden files, no absolute paths, no backslashes or NULs). Certificate
    names and domain names pass; anything that could escape the root does not.
    """
    if not key or key.startswith("/") or key.endswith("/"):
        raise StorageKeyError(f"invalid storage key {key!r}")
    parts = key.split("/")
    for part in parts:
        if not _SAFE_PART.match(part) or part in (".", "..") or ".." in part:
            raise StorageKeyError(f"invalid storage key {key!r} (part {part!r})")
    return "/".join(parts)


def safe_name(name: str) -> str:
    """Validate a single path component (a certificate name) for use as a storage key part."""
    if "/" in name:
        raise StorageKeyError(f"invalid name {name!r}: contains '/'")
    return safe_key(name)


# --- interface ------------------------------------------------------------------


@dataclass(frozen=True)
class KeyInfo:
    """What `Storage.stat` reports: size in bytes, modification time (UNIX seconds)."""

    key: str
    size: int
    modified: float


class LockTimeout(TimeoutError):
    """`Storage.lock` could not obtain the lock within its timeout."""


class Storage(ABC):
    """Bytes under slash-separated keys, plus named locks.

    Contract for implementations:
    - Keys go through `safe_key` before use; an invalid key raises `StorageKeyError`.
    - `store` is atomic: a concurrent or later `load` sees the whole old value or
      the whole new value. `secret=True` means the value holds private key
      material and must only be readable by the agent's user (0600 for files).
    - `load` raises `FileNotFoundError` when the key does not exist.
    - `delete` is idempotent (deleting a missing key is not an error).
    - `list(prefix)` returns the keys and sub-prefixes directly below `prefix`,
      sorted; `recursive=True` returns every key (value) below it.
    - `lock(name, expires_after)` blocks until this process holds the lock
      named `name` or `timeout` seconds passed (then `LockTimeout`). A lock not
      unlocked within `expires_after` seconds is stale and may be taken over by
      another process (so a crashed holder never blocks renewals forever).
      Locks are not re-entrant. `unlock` releases a lock this process holds.
    """

    @abstractmethod
    def store(self, key: str, value: bytes, *, secret: bool = False) -> None: ...

    @abstractmethod
    def load(self, key: str) -> bytes: ...

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str, recursive: bool = False) -> list[str]: ...

    @abstractmethod
    def stat(self, key: str) -> KeyInfo: ...

    @abstractmethod
    def lock(self, name: str, timeout: float = 60.0, expires_after: float = 600.0) -> None: ...

    @abstractmethod
    def unlock(self, name: str) -> None: ...

    @contextlib.contextmanager
    def locked(
        self, name: str, timeout: float = 60.0, expires_after: float = 600.0
    ) -> Iterator[None]:
        """Context manager around `lock`/`unlock`."""
        self.lock(name, timeout=timeout, expires_after=expires_after)
        try:
            yield
        finally:
            self.unlock(name)


class FileStorage(Storage):
    """`Storage` in a directory tree (the state directory, mode 0700).

    Keys map to paths below the root; every directory created is 0700; secret
    values are 0600, others 0644 (still unreadable to others through the 0700
    root). Locks are `locks/<name>.lock` files created with O_EXCL holding the
    owner (host, pid) and creation time; a lock file older than its
    `expires_after`, or held by a dead pid on this host, is stale and removed.
    """

    LOCK_POLL = 0.05  # seconds between attempts while waiting for a lock

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._held: set[str] = set()

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*safe_key(key).split("/"))

    def _ensure_parent(self, path: Path) -> None:
        ensure_private_dir(self.root)
        rel = path.parent.relative_to(self.root)
        cur = self.root
        for part in rel.parts:
            cur = cur / part
            ensure_private_dir(cur, within=self.root)

    def path(self, key: str) -> Path:
        """The file a key lives in (for HAProxy, which reads files, and for tests)."""
        return self._path(key)

    def store(self, key: str, value: bytes, *, secret: bool = False) -> None:
        path = self._path(key)
        self._ensure_parent(path)
        atomic_write(path, value, SECRET_MODE if secret else PUBLIC_MODE)

    def load(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        fsync_dir(path.parent)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str, recursive: bool = False) -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return []
        prefix_rel = safe_key(prefix) + "/" if prefix else ""
        out: list[str] = []
        if recursive:
            for p in base.rglob("*"):
                if p.is_file() and not p.name.startswith("."):
                    out.append(prefix_rel + p.relative_to(base).as_posix())
        else:
            for p in base.iterdir():
                if not p.name.startswith("."):
                    out.append(prefix_rel + p.name)
        return sorted(out)

    def stat(self, key: str) -> KeyInfo:
        st = self._path(key).stat()
        return KeyInfo(key=key, size=st.st_size, modified=st.st_mtime)

    # --- locks ---

    def _lock_path(self, name: str) -> Path:
        return self.root / "locks" / (safe_name(name) + ".lock")

    def _is_stale(self, path: Path, expires_after: float) -> bool:
        try:
            raw = path.read_bytes()
            st = path.stat()
        except FileNotFoundError:
            return False  # released meanwhile: just retry
        try:
            info = json.loads(raw)
            created = float(info["created"])
            host = str(info["host"])
            pid = int(info["pid"])
        except (ValueError, KeyError, TypeError):
            # A half-written lock file: judge by mtime only.
            return time.time() - st.st_mtime > expires_after
        if time.time() - created > expires_after:
            return True
        if host == socket.gethostname() and pid != os.getpid():
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False
        return False

    def lock(self, name: str, timeout: float = 60.0, expires_after: float = 600.0) -> None:
        path = self._lock_path(name)
        self._ensure_parent(path)
        deadline = time.monotonic() + timeout
        body = json.dumps(
            {"host": socket.gethostname(), "pid": os.getpid(), "created": time.time()}
        ).encode()
        while True:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, SECRET_MODE)
            except FileExistsError:
                if self._is_stale(path, expires_after):
                    # Another waiter may remove it at the same time: both then race
                    # on O_EXCL again, and exactly one wins.
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                    continue
                if time.monotonic() >= deadline:
                    raise LockTimeout(
                        f"lock {name!r} is held by another process ({path})"
                    ) from None
                time.sleep(self.LOCK_POLL)
                continue
            try:
                os.write(fd, body)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._held.add(name)
            return

    def unlock(self, name: str) -> None:
        path = self._lock_path(name)
        if name not in self._held:
            raise RuntimeError(f"lock {name!r} is not held by this process")
        self._held.discard(name)
        try:
            path.unlink()
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise
