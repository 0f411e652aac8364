"""The one owner of HAProxy's crt-list FILE: every edit of it goes through here.

HAProxy reads the crt-list file at start; a line naming a missing file makes
`haproxy -c` (and the next restart) fail for every site. Several deploys (in
threads of one process, or a cron `renew` next to the daemon) edit the same
file, so:

- every edit runs under ONE lock per file: a threading lock keyed by the
  file's real path (shared by every `CrtListFile` of the process) plus an
  exclusive `flock` on the sibling `<file>.lock` (shared with other processes);
- every edit is a change to the content read UNDER that lock ("add this line
  if no line names the path", "remove the lines naming this path", "remove
  this exact line"), never a write-back of an older snapshot;
- before any write, every line of the result must name an existing file
  (relative paths resolved against the crt-list's directory); otherwise the
  write is refused with `CrtListError` naming the crt-list file and the
  missing path, and the file is left as it was.

So a bundle must be written before a line naming it is added, and on rollback
the line must be removed before the bundle is deleted.

Paths: HAProxy knows a file by the literal path in its config, so names are
compared as written (`os.path.abspath`, never `resolve()`); two spellings of
the same existing file (e.g. through a symlinked directory) also count as
naming it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from agent.storage import atomic_write

CRT_LIST_MODE = 0o644  # a new crt-list file: HAProxy (maybe another user) reads it
LOCK_FILE_MODE = 0o600
_POLL = 0.01  # s between flock attempts while another process holds it

_GUARD = threading.Lock()
_THREAD_LOCKS: dict[str, threading.Lock] = {}


# crt-list path -> (file identity, the paths its lines name literally), as last
# parsed under the file's lock: a renewal of a certificate the file already
# names re-reads nothing while the file is unchanged (10,000 lines cost
# milliseconds per deploy otherwise). Every write replaces the file (a new
# inode), so a change by any process misses.
_NAMED: dict[str, tuple[tuple[int, int, int, int], frozenset[str]]] = {}


def _file_identity(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class CrtListError(Exception):
    """An edit of the crt-list file was refused (the file is unchanged)."""


def line_path(line: str, base: Path | str) -> str | None:
    """The absolute (not symlink-resolved) path crt-list `line` names, or None for a
    blank or comment line. Relative paths are taken against `base`."""
    fields = line.split("#", 1)[0].split()
    if not fields:
        return None
    return os.path.abspath(os.path.join(base, fields[0]))


def _same(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _identity(path: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of an existing file, None if it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def line_names(line: str, base: Path | str, path: Path | str) -> bool:
    """True if crt-list `line` names `path` (literally, or the same existing file)."""
    named = line_path(line, base)
    return named is not None and _same(named, os.path.abspath(path))


def _thread_lock(path: Path) -> threading.Lock:
    # Keyed by the real path: two spellings of one file must share the lock.
    key = os.path.realpath(path)
    with _GUARD:
        return _THREAD_LOCKS.setdefault(key, threading.Lock())


class CrtListFile:
    """Edits of one crt-list file at `path` (absolute, as HAProxy's config names it).

    `lock_timeout` (s): how long an edit waits for the lock before raising
    TimeoutError. Every method is thread-safe and process-safe.
    """

    def __init__(self, path: Path | str, lock_timeout: float = 30.0) -> None:
        self.path = Path(os.path.abspath(path))
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.lock_timeout = lock_timeout

    def __repr__(self) -> str:
        return f"CrtListFile({str(self.path)!r})"

    # -- locking -------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the file's lock (thread and process wide) for the block."""
        deadline = time.monotonic() + self.lock_timeout
        lock = _thread_lock(self.path)
        if not lock.acquire(timeout=self.lock_timeout):
            raise TimeoutError(f"crt-list {self.path}: still locked after {self.lock_timeout:g} s")
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, LOCK_FILE_MODE)
            try:
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except OSError as exc:
                        if exc.errno not in (errno.EAGAIN, errno.EACCES):
                            raise
                        if time.monotonic() >= deadline:
                            raise TimeoutError(
                                f"crt-list {self.path}: {self.lock_path} still locked by "
                                f"another process after {self.lock_timeout:g} s"
                            ) from exc
                        time.sleep(_POLL)
                yield
            finally:
                os.close(fd)  # closing releases the flock
        finally:
            lock.release()

    # -- reading -------------------------------------------------------------

    def read(self) -> str:
        """The current content ("" if the file does not exist)."""
        try:
            return self.path.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def names(self, path: Path | str) -> bool:
        """Whether a line of the current file names `path`."""
        base = self.path.parent
        return any(line_names(line, base, path) for line in self.read().splitlines())

    def missing(self, text: str) -> list[str]:
        """The paths that lines of `text` name but that do not exist."""
        base = self.path.parent
        out = []
        for line in text.splitlines():
            named = line_path(line, base)
            if named is not None and not os.path.isfile(named):
                out.append(named)
        return out

    # -- edits (each under the lock, on the content read under it) -------------

    def add(self, path: Path | str, line: str) -> str | None:
        """Append `line` (which must name `path`) unless a line already names `path`.

        Returns the line added, or None if one was already there. Raises
        CrtListError (nothing written) if the result would name a missing file,
        e.g. `path` itself when its bundle was not written first.
        """
        if not line_names(line, self.path.parent, path):
            raise ValueError(f"crt-list line {line!r} does not name {path}")
        with self.locked():
            text = self.read()
            base = self.path.parent
            if any(line_names(raw, base, path) for raw in text.splitlines()):
                return None
            if text and not text.endswith("\n"):
                text += "\n"
            self._write(text + line + "\n", f"adding {path}")
            return line

    def remove(self, path: Path | str) -> bool:
        """Remove every line naming `path`. Returns whether the file changed."""
        with self.locked():
            text = self.read()
            base = self.path.parent
            kept = [
                raw for raw in text.splitlines(keepends=True) if not line_names(raw, base, path)
            ]
            if len(kept) == len(text.splitlines(keepends=True)):
                return False
            self._write("".join(kept), f"removing {path}")
            return True

    def remove_line(self, line: str) -> bool:
        """Remove the last line equal to `line` (what an `add` returned): a rollback
        removes only what its own deploy added. Returns whether the file changed."""
        with self.locked():
            raws = self.read().splitlines(keepends=True)
            for i in range(len(raws) - 1, -1, -1):
                if raws[i].rstrip("\r\n") == line:
                    del raws[i]
                    self._write("".join(raws), f"removing line {line!r}")
                    return True
            return False

    def add_many(self, items: Sequence[tuple[Path | str, str]]) -> list[str | None]:
        """`add` for every (path, line) of a batch in ONE locked edit (one read, one write).

        Returns, per item, the line added or None if a line already names its
        path (or an earlier item of the batch added one). Raises CrtListError
        (nothing written) if the result would name a missing file. Matching is
        one stat per line and per path (not one per pair), so a batch of N
        paths into a file of M lines costs O(N + M).
        """
        base = self.path.parent
        for path, line in items:
            if not line_names(line, base, path):
                raise ValueError(f"crt-list line {line!r} does not name {path}")
        if not items:
            return []
        with self.locked():
            before = _file_identity(self.path)
            cached = _NAMED.get(str(self.path))
            if before is not None and cached is not None and cached[0] == before and all(
                os.path.abspath(path) in cached[1] for path, _ in items
            ):
                # The usual single renewal: the file is as we last parsed it
                # (same inode, size and mtime) and names every path literally.
                return [None] * len(items)
            text = self.read()
            literal: set[str] = set()
            for raw in text.splitlines():
                named = line_path(raw, base)
                if named is not None:
                    literal.add(named)
            if before is not None and before == _file_identity(self.path):
                _NAMED[str(self.path)] = (before, frozenset(literal))
            identity: set[tuple[int, int]] = set()
            # The usual case (every path named literally: a renewal of a
            # certificate HAProxy serves) needs no stat of the file's lines.
            if any(os.path.abspath(path) not in literal for path, _ in items):
                for named in literal:
                    ident = _identity(named)
                    if ident is not None:
                        identity.add(ident)
            out: list[str | None] = []
            new_lines: list[str] = []
            for path, line in items:
                p = os.path.abspath(path)
                if p in literal:
                    out.append(None)
                    continue
                ident = _identity(p)
                if ident is not None and ident in identity:
                    out.append(None)
                    continue
                literal.add(p)
                if ident is not None:
                    identity.add(ident)
                new_lines.append(line)
                out.append(line)
            if new_lines:
                if text and not text.endswith("\n"):
                    text += "\n"
                self._write(
                    text + "".join(f"{line}\n" for line in new_lines),
                    f"adding {len(new_lines)} line(s)",
                )
            return out

    def remove_lines(self, lines: Sequence[str]) -> int:
        """`remove_line` for each of `lines` in ONE locked edit (the last equal line
        each). Returns how many lines were removed."""
        if not lines:
            return 0
        with self.locked():
            raws = self.read().splitlines(keepends=True)
            removed = 0
            for line in lines:
                for i in range(len(raws) - 1, -1, -1):
                    if raws[i].rstrip("\r\n") == line:
                        del raws[i]
                        removed += 1
                        break
            if removed:
                self._write("".join(raws), f"removing {removed} line(s)")
            return removed

    def _write(self, text: str, why: str) -> None:
        missing = self.missing(text)
        if missing:
            raise CrtListError(
                f"crt-list {self.path}: not {why}: the file would name "
                f"{', '.join(missing)}, which does not exist (HAProxy would refuse to start)"
            )
        try:
            mode = self.path.stat().st_mode & 0o777
        except FileNotFoundError:
            mode = CRT_LIST_MODE
        atomic_write(self.path, text.encode(), mode)
