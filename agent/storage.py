"""Durable state: atomic file writes and the `Storage` interface (with locks).

`atomic_write` is the one way this project writes a file that matters: a temp
file in the same directory, fsync, rename over the target, fsync the directory.
A reader therefore sees either the old bytes or the new bytes, never a mix, and
after a crash the rename is either durable or not there at all.

`Storage` is a small key/value interface modelled on CertMagic's: keys are
slash-separated names ("certificates/www/current", see agent.layout), values are bytes, and a
lock primitive lets several processes (a cron `renew` and the daemon, or a fleet
sharing one backend) avoid ordering the same certificate twice. `FileStorage`
keeps everything under the state directory; a shared backend (Redis) can
implement the same interface later without touching the ACME or SPOE code.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import socket
import stat
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

log = logging.getLogger(__name__)

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
_PART = r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,254}"
_SAFE_KEY = re.compile(rf"{_PART}(?:/{_PART})*\Z")  # every part a _SAFE_PART, all in one match


class StorageKeyError(ValueError):
    """A storage key that is empty, absolute, or would leave the storage root."""


def safe_key(key: str) -> str:
    """Validate a slash-separated storage key and return it normalised.

    This is the ONE place key names are checked: every part must start with an
    alphanumeric character and contain only ``[A-Za-z0-9._@+-]`` (so no ``..``,
    no hidden files, no absolute paths, no backslashes or NULs). Certificate
    names and domain names pass; anything that could escape the root does not.
    """
    # The common case in one match (it runs for every key of 10,000
    # certificates at start); anything it refuses gets the precise message below.
    if _SAFE_KEY.match(key) and ".." not in key:
        return key
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


class LockLost(RuntimeError):
    """The lock is no longer ours: its lease ran out and another process took it over."""


class FenceRejected(LockLost):
    """A fenced write (`Storage.commit_fenced`) was refused and nothing was written:
    our lease of the lock was lost, or what is stored carries a higher fencing
    number than ours (a newer holder installed after our lease ran out)."""


class StoreUnavailable(OSError):
    """The storage backend cannot be reached (a fleet's Redis is down or cut off).

    Raised by `Storage.check_available`; a renewal that meets it is skipped, not failed."""


# The lease a holder gets by default (seconds). Holders renew it while they
# work (`Storage.locked` does so from a thread), so it only bounds how long a
# holder that died, froze or lost its host blocks the others.
DEFAULT_LEASE = 60.0


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def process_start_time(pid: int) -> int | None:
    """Start time of process `pid` (clock ticks after boot, /proc/PID/stat field 22), or None.

    Together with the PID it names a process uniquely within one boot: a new
    process that got a recycled PID (PID 1 of the next `docker run --rm`) has
    another start time.
    """
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    try:
        # The command name (field 2) is in parentheses and may hold spaces or ')'.
        fields = raw[raw.rindex(b")") + 2 :].split()
        return int(fields[19])
    except (ValueError, IndexError):
        return None


@dataclass(frozen=True)
class LockOwner:
    """What a lock record says about its holder. Times: UNIX seconds.

    `token` is random per acquisition (it, not the PID, says whose lock it is);
    `start_time` is the holder's `process_start_time`; `boot_id` the holder's
    kernel boot id; `expires` the end of the current lease.
    """

    token: str
    host: str
    pid: int
    start_time: int | None
    boot_id: str | None
    acquired: float
    expires: float

    def to_json(self) -> dict[str, object]:
        return {
            "token": self.token,
            "host": self.host,
            "pid": self.pid,
            "start_time": self.start_time,
            "boot_id": self.boot_id,
            "acquired": self.acquired,
            "created": self.acquired,  # what versions before leases read
            "expires": self.expires,
        }

    @classmethod
    def from_json(cls, data: dict[str, object], default_lease: float) -> LockOwner:
        """Parse a lock record; a record of an older version (no token, no
        `expires`) gets `created + default_lease` as its expiry."""
        acquired = float(data.get("acquired", data["created"]))  # type: ignore[arg-type]
        expires = data.get("expires")
        st = data.get("start_time")
        return cls(
            token=str(data.get("token") or ""),
            host=str(data["host"]),
            pid=int(data["pid"]),  # type: ignore[call-overload]
            start_time=None if st is None else int(st),  # type: ignore[call-overload]
            boot_id=None if data.get("boot_id") is None else str(data["boot_id"]),
            acquired=acquired,
            expires=acquired + default_lease if expires is None else float(expires),  # type: ignore[arg-type]
        )

    @classmethod
    def for_this_process(cls, lease: float, now: float) -> LockOwner:
        pid = os.getpid()
        return cls(
            token=secrets.token_hex(16),
            host=socket.gethostname(),
            pid=pid,
            start_time=process_start_time(pid),
            boot_id=_boot_id(),
            acquired=now,
            expires=now + lease,
        )


def holder_is_gone(owner: LockOwner, now: float) -> bool:
    """True when `owner`'s lock is stale: its lease ran out, or it provably died.

    - a lease that ran out is stale, whoever holds it;
    - a holder with our host name and our boot id is checked at once: its PID
      is not alive, or is alive with another start time (the PID was reused:
      PID 1 of every `docker run --rm`), means it died;
    - a holder on another host (or another boot of a host with our name) is
      judged by its lease only: its PID means nothing here.
    """
    if owner.expires <= now:
        return True
    if owner.host != socket.gethostname():
        return False
    boot = _boot_id()
    if owner.boot_id is not None and boot is not None and owner.boot_id != boot:
        return False
    if owner.pid == os.getpid():
        # Ourselves (another thread), unless the record is from an earlier
        # process that had our PID.
        mine = process_start_time(owner.pid)
        return owner.start_time is not None and mine is not None and owner.start_time != mine
    try:
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    if owner.start_time is not None:
        actual = process_start_time(owner.pid)
        if actual is not None and actual != owner.start_time:
            return True
    return False


class Storage(ABC):
    """Bytes under slash-separated keys, plus named locks with owners and leases.

    Contract for implementations (tests/test_storage_contract.py checks it):
    - Keys go through `safe_key` before use; an invalid key raises `StorageKeyError`.
    - `store` is atomic: a concurrent or later `load` sees the whole old value or
      the whole new value. `secret=True` means the value holds private key
      material and must only be readable by the agent's user (0600 for files).
    - `load` raises `FileNotFoundError` when the key does not exist.
    - `delete` is idempotent (deleting a missing key is not an error);
      `delete_all(prefix)` deletes every key below `prefix` (idempotent too).
    - `list(prefix)` returns the keys and sub-prefixes directly below `prefix`,
      sorted; `recursive=True` returns every key (value) below it.
    - `lock(name, timeout, expires_after)` blocks until this process holds the
      lock named `name` or `timeout` seconds passed (then `LockTimeout`), and
      returns the owner token of this acquisition. The lock is a lease of
      `expires_after` seconds, which the holder extends with `renew_lock` while
      it works (`locked` does it from a thread). A lock whose lease ran out is
      stale and taken over by the next `lock`, whoever held it; an
      implementation may also take over a lock whose holder provably died
      (`holder_is_gone`). Locks are not re-entrant, and exclude other threads
      of the same process too.
    - `renew_lock(name, token, lease)` extends our lease; `LockLost` if the
      lock is no longer ours (taken over after our lease ran out).
    - `unlock(name, token)` releases the lock only if it is still ours (same
      token); a lock taken over meanwhile is left alone (and `LockLost` is
      raised so the old holder knows). Without `token`, the token this object
      got from its last `lock(name)`; `RuntimeError` if it holds none.
    - `lock_owner(name)` reads the current record (None: not locked).
    - Batches, one round trip where the store can (the defaults loop):
      `load_many`, `store_many`, `try_lock_many` (the free locks of many names,
      without waiting) and `unlock_many` (returns the names taken over
      meanwhile instead of raising `LockLost`).
    """

    # Several nodes read and write this store (a fleet): what one node lacks
    # locally (a key file) says nothing about the others (agent.rollover).
    shared = False

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
    def lock(
        self, name: str, timeout: float = 60.0, expires_after: float = DEFAULT_LEASE
    ) -> str: ...

    @abstractmethod
    def renew_lock(self, name: str, token: str, lease: float = DEFAULT_LEASE) -> None: ...

    @abstractmethod
    def unlock(self, name: str, token: str | None = None) -> None: ...

    @abstractmethod
    def lock_owner(self, name: str) -> LockOwner | None: ...

    @abstractmethod
    def fence(self, name: str) -> int:
        """The fencing number of our current hold of lock `name` (RuntimeError if
        none): every acquisition gets a larger one than the one before it."""

    @abstractmethod
    def commit_fenced(
        self, lock: str, token: str, fence: int, fence_key: str, values: Mapping[str, bytes]
    ) -> None:
        """Store `values` (key -> bytes, not secret) and `fence` at `fence_key`, in ONE
        atomic step, only if lock `lock` is still held with `token` (its lease did not
        run out) and the number stored at `fence_key` (if any) is not larger than
        `fence`. Otherwise nothing is written and `FenceRejected` says why."""

    def check_available(self) -> None:
        """Raise `StoreUnavailable` (with the reason) when the backend cannot be
        reached now; a local store always can."""
        return None

    def delete_all(self, prefix: str) -> None:
        """Delete every key below `prefix` (idempotent)."""
        for key in self.list(prefix, recursive=True):
            self.delete(key)

    def remove_temporaries(self, prefix: str = "", older_than: float = 0.0) -> int:
        """Remove leftovers of interrupted writes below `prefix` whose age is
        at least `older_than` seconds; returns how many. A store whose writes
        leave nothing behind has nothing to do (the default)."""
        return 0

    def list_temporaries(self, prefix: str = "") -> builtins.list[str]:
        """Keys-like names (relative to the root) of leftovers of interrupted
        writes below `prefix`; none for a store that leaves nothing behind."""
        return []

    def scan(self, prefix: str) -> tuple[builtins.list[str], builtins.list[str]]:
        """(`list(prefix, recursive=True)`, `list_temporaries(prefix)`) in one pass
        where the store can do that."""
        return self.list(prefix, recursive=True), self.list_temporaries(prefix)

    def load_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        """The values of those of `keys` that exist (missing ones are left out),
        in one round trip where the store can do that; same checks as `load`."""
        out: dict[str, bytes] = {}
        for key in keys:
            try:
                out[key] = self.load(key)
            except FileNotFoundError:
                continue
        return out

    def try_lock_many(
        self, names: Iterable[str], expires_after: float = DEFAULT_LEASE
    ) -> dict[str, str]:
        """Take, without waiting, every lock of `names` that is free now, with the
        lease, owner record and fencing number `lock` gives: name -> owner token
        of those taken; a lock someone holds is left out (one whose holder died
        may be taken over, as `lock(name, timeout=0)` would, or left to the next
        `lock`). Nothing renews these leases: for holds of milliseconds to seconds
        (e.g. recording deploy facts of many certificates), released with
        `unlock_many`. One round trip where the store can do that."""
        out: dict[str, str] = {}
        for name in dict.fromkeys(names):
            try:
                out[name] = self.lock(name, timeout=0, expires_after=expires_after)
            except LockTimeout:
                continue
        return out

    def unlock_many(self, held: Mapping[str, str]) -> builtins.list[str]:
        """`unlock(name, token)` of every (name -> token) in `held`; returns the names
        that were no longer ours (taken over after the lease ran out; left to their
        new holder) instead of raising LockLost. One round trip where the store can."""
        lost: builtins.list[str] = []
        for name, token in held.items():
            try:
                self.unlock(name, token)
            except LockLost:
                lost.append(name)
        return lost

    def store_many(self, values: Mapping[str, bytes]) -> None:
        """`store(key, value)` of every (not secret) value; each one atomic as with
        `store`. One round trip where the store can do that."""
        for key, value in values.items():
            self.store(key, value)

    @contextlib.contextmanager
    def locked(
        self, name: str, timeout: float = 60.0, expires_after: float = DEFAULT_LEASE
    ) -> Iterator[str]:
        """Hold lock `name` for the block, renewing its lease from a thread every
        `expires_after / 3` seconds; yields the owner token. A lease that could
        not be renewed (lost to a takeover) is logged; the block is not
        interrupted, so long operations should also call `renew_lock` before
        an irreversible step (it raises `LockLost`)."""
        token = self.lock(name, timeout=timeout, expires_after=expires_after)
        stop = threading.Event()

        def keep() -> None:
            while not stop.wait(max(expires_after / 3, 0.05)):
                try:
                    self.renew_lock(name, token, expires_after)
                except LockLost:
                    log.error("lock %r was taken over by another process", name)
                    return
                except OSError as e:  # transient: the next round may work
                    log.warning("lock %r: cannot renew the lease: %s", name, e)

        renewer = threading.Thread(target=keep, name=f"lease-{name}", daemon=True)
        renewer.start()
        try:
            yield token
        finally:
            stop.set()
            renewer.join()
            try:
                self.unlock(name, token)
            except LockLost:
                log.error("lock %r was taken over before we released it", name)
            except StoreUnavailable as e:  # the lease ends it by itself
                log.warning("lock %r: cannot release it now, its lease will end: %s", name, e)


def _stored_fence(storage: Storage, key: str) -> int | None:
    """The fencing number stored at `key`, None when there is none (or it is damaged)."""
    try:
        return int(storage.load(key).strip())
    except (FileNotFoundError, ValueError):
        return None


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
        self._held: dict[str, str] = {}  # lock name -> token of our last acquisition
        self._fences: dict[str, int] = {}  # lock name -> fencing number of that acquisition
        # flock is per open file description: threads of one process each open
        # the guard, so they exclude each other too; this lock keeps them from
        # interleaving within one FileStorage all the same.
        self._thread_guard = threading.Lock()

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
            # os.walk, not Path.rglob: several times faster on 10,000 certificates.
            for dirpath, dirnames, filenames in os.walk(base):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                rel = os.path.relpath(dirpath, base)
                head = prefix_rel + ("" if rel == "." else rel.replace(os.sep, "/") + "/")
                out += [head + f for f in filenames if not f.startswith(".")]
        else:
            for p in base.iterdir():
                if not p.name.startswith("."):
                    out.append(prefix_rel + p.name)
        return sorted(out)

    def stat(self, key: str) -> KeyInfo:
        st = self._path(key).stat()
        return KeyInfo(key=key, size=st.st_size, modified=st.st_mtime)

    def delete_all(self, prefix: str) -> None:
        base = self._path(prefix)
        for key in self.list(prefix, recursive=True):
            self.delete(key)
        if base.is_dir():
            # Directories left empty (and leftover temp files in them) go too.
            for p in sorted(base.rglob("*"), key=lambda q: len(q.parts), reverse=True):
                with contextlib.suppress(FileNotFoundError, OSError):
                    if p.is_dir():
                        p.rmdir()
                    else:
                        p.unlink()
            with contextlib.suppress(OSError):
                base.rmdir()
            fsync_dir(base.parent)

    def remove_temporaries(self, prefix: str = "", older_than: float = 0.0) -> int:
        """Remove `atomic_write` temp files (".NAME.XXXX.tmp") below `prefix`."""
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return 0
        now = time.time()
        removed = 0
        locks = self.root / "locks"
        for p in base.rglob(".*.tmp"):
            try:
                if p.parent == locks:
                    # Lock records are only written under the guard: holding it,
                    # a temp file there is a leftover whatever its age.
                    with self._guard():
                        p.unlink()
                elif p.is_file() and now - p.stat().st_mtime >= older_than:
                    p.unlink()
                else:
                    continue
            except FileNotFoundError:
                continue
            removed += 1
        return removed

    def list_temporaries(self, prefix: str = "") -> builtins.list[str]:
        return self.scan(prefix)[1]

    def scan(self, prefix: str) -> tuple[builtins.list[str], builtins.list[str]]:
        base = str(self._path(prefix) if prefix else self.root)
        keys: list[str] = []
        temps: list[str] = []
        # One scandir per directory (its d_type says file or directory, no
        # stat): the start-up repair scans 30,000 directories at 10,000
        # certificates, where os.walk's overhead was most of the time.
        stack = [(base, safe_key(prefix) + "/" if prefix else "")]
        while stack:
            directory, rel = stack.pop()
            try:
                entries = os.scandir(directory)
            except (FileNotFoundError, NotADirectoryError):
                continue
            with entries:
                for e in entries:
                    name = e.name
                    is_dir = e.is_dir()
                    if name[0] == ".":
                        if name.endswith(".tmp") and not is_dir:
                            temps.append(rel + name)
                    elif not is_dir:
                        keys.append(rel + name)
                    elif not e.is_symlink():  # as os.walk: listed nowhere, not entered
                        stack.append((e.path, rel + name + "/"))
        return sorted(keys), sorted(temps)

    def load_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        root = str(self.root) + os.sep
        out: dict[str, bytes] = {}
        for key in keys:
            # os-level reads: 10,000 pointers and state files at start, where
            # pathlib's per-call overhead outweighed the read itself.
            try:
                fd = os.open(root + safe_key(key), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                chunks = []
                while chunk := os.read(fd, 1 << 16):
                    chunks.append(chunk)
            finally:
                os.close(fd)
            out[key] = b"".join(chunks)
        return out

    # --- locks ---
    #
    # A lock is the JSON record `locks/<name>.lock` (a LockOwner). Every
    # compare-and-change of a record (take when free or stale, renew, release)
    # happens under an flock on `locks/.guard`, held for milliseconds, so two
    # waiters never both take over the same stale lock and a release never
    # removes someone else's record. The kernel drops the flock of a process
    # that dies, so the guard itself can never be stale.

    def _lock_path(self, name: str) -> Path:
        return self.root / "locks" / (safe_name(name) + ".lock")

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        guard = self.root / "locks" / ".guard"
        self._ensure_parent(guard)
        fd = os.open(guard, os.O_RDWR | os.O_CREAT, SECRET_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            with self._thread_guard:
                yield
        finally:
            os.close(fd)  # releases the flock

    def _read_owner(self, path: Path, default_lease: float) -> LockOwner | None:
        """The record at `path`; None if absent. A damaged record (a crash
        while writing one under an older version) counts as expired."""
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return LockOwner.from_json(json.loads(raw), default_lease)
        except (ValueError, KeyError, TypeError):
            mtime = path.stat().st_mtime
            return LockOwner("", "", 0, None, None, mtime, mtime + default_lease)

    def lock_owner(self, name: str) -> LockOwner | None:
        return self._read_owner(self._lock_path(name), DEFAULT_LEASE)

    def lock(self, name: str, timeout: float = 60.0, expires_after: float = DEFAULT_LEASE) -> str:
        path = self._lock_path(name)
        deadline = time.monotonic() + timeout
        while True:
            with self._guard():
                now = time.time()
                owner = self._read_owner(path, expires_after)
                if owner is None or holder_is_gone(owner, now):
                    if owner is not None:
                        why = "its lease ran out" if owner.expires <= now else "it is gone"
                        log.warning(
                            "lock %r: taking over from %s pid %d (%s)",
                            name, owner.host, owner.pid, why,
                        )  # fmt: skip
                    mine = LockOwner.for_this_process(expires_after, now)
                    fence = self._next_fence(name)
                    record = {**mine.to_json(), "fence": fence}
                    atomic_write(path, json.dumps(record).encode(), SECRET_MODE)
                    self._held[name] = mine.token
                    self._fences[name] = fence
                    return mine.token
            if time.monotonic() >= deadline:
                raise LockTimeout(
                    f"lock {name!r} is held by another process ({owner.host} pid {owner.pid}, "
                    f"{path})"
                )
            time.sleep(self.LOCK_POLL)

    def _next_fence(self, name: str) -> int:
        """INCRement `locks/<name>.fence` (the caller holds the guard)."""
        path = self.root / "locks" / (safe_name(name) + ".fence")
        try:
            last = int(path.read_bytes().strip() or b"0")
        except (FileNotFoundError, ValueError):
            last = 0
        atomic_write(path, str(last + 1).encode(), SECRET_MODE)
        return last + 1

    def fence(self, name: str) -> int:
        if name not in self._fences or name not in self._held:
            raise RuntimeError(f"lock {name!r} is not held by this process")
        return self._fences[name]

    def commit_fenced(
        self, lock: str, token: str, fence: int, fence_key: str, values: Mapping[str, bytes]
    ) -> None:
        # Under the guard no lock record changes hands, so the check and the
        # writes are one step for every process that follows the lock protocol.
        with self._guard():
            owner = self._read_owner(self._lock_path(lock), DEFAULT_LEASE)
            if owner is None or owner.token != token or owner.expires <= time.time():
                raise FenceRejected(f"the lease of lock {lock!r} was lost")
            stored = _stored_fence(self, fence_key)
            if stored is not None and stored > fence:
                raise FenceRejected(
                    f"{fence_key} carries fencing number {stored}, newer than ours ({fence})"
                )
            for key, value in values.items():
                self.store(key, value)
            self.store(fence_key, str(fence).encode())

    def renew_lock(self, name: str, token: str, lease: float = DEFAULT_LEASE) -> None:
        path = self._lock_path(name)
        with self._guard():
            owner = self._read_owner(path, lease)
            if owner is None or owner.token != token:
                raise LockLost(f"lock {name!r} is no longer held by this process")
            renewed = replace(owner, expires=time.time() + lease)
            atomic_write(path, json.dumps(renewed.to_json()).encode(), SECRET_MODE)

    def unlock(self, name: str, token: str | None = None) -> None:
        if token is None:
            token = self._held.get(name)
            if token is None:
                raise RuntimeError(f"lock {name!r} is not held by this process")
        if self._held.get(name) == token:
            del self._held[name]
            self._fences.pop(name, None)
        path = self._lock_path(name)
        with self._guard():
            owner = self._read_owner(path, DEFAULT_LEASE)
            if owner is None or owner.token != token:
                raise LockLost(
                    f"lock {name!r} was taken over by another process; left it to its new holder"
                )
            try:
                path.unlink()
            except OSError as e:
                if e.errno != errno.ENOENT:
                    raise
