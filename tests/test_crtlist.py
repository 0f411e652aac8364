"""The crt-list file owner (agent/crtlist.py): edits on current content, one lock,
never a line naming a missing file."""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

import pytest

from agent.crtlist import CrtListError, CrtListFile, line_names


def _bundle(directory: Path, name: str) -> Path:
    path = directory / f"{name}.pem"
    path.write_text("placeholder\n")
    return path


def test_add_appends_once_and_remove_line_takes_only_that_line(tmp_path: Path) -> None:
    a, b = _bundle(tmp_path, "a"), _bundle(tmp_path, "b")
    crt = CrtListFile(tmp_path / "crt-list.txt")
    assert crt.add(a, str(a)) == str(a)
    assert crt.add(a, f"{a} [alpn h2]") is None  # already named: unchanged
    assert crt.add(b, f"{b} [alpn h2] b.test") == f"{b} [alpn h2] b.test"
    assert crt.read() == f"{a}\n{b} [alpn h2] b.test\n"

    assert crt.remove_line(str(a))
    assert crt.read() == f"{b} [alpn h2] b.test\n"
    assert not crt.remove_line(str(a))


def test_a_line_for_a_bundle_not_written_yet_is_refused_naming_file_and_path(
    tmp_path: Path,
) -> None:
    crt = CrtListFile(tmp_path / "crt-list.txt")
    missing = tmp_path / "new.pem"
    with pytest.raises(CrtListError) as caught:
        crt.add(missing, str(missing))
    assert str(tmp_path / "crt-list.txt") in str(caught.value)
    assert str(missing) in str(caught.value)
    assert not (tmp_path / "crt-list.txt").exists()


def test_an_edit_that_leaves_a_line_naming_a_deleted_file_is_refused(tmp_path: Path) -> None:
    a, b = _bundle(tmp_path, "a"), _bundle(tmp_path, "b")
    crt = CrtListFile(tmp_path / "crt-list.txt")
    crt.add(a, str(a))
    a.unlink()
    before = crt.read()
    with pytest.raises(CrtListError, match=str(a)):
        crt.add(b, str(b))
    assert crt.read() == before


def test_relative_lines_are_resolved_against_the_crt_list_directory(tmp_path: Path) -> None:
    (tmp_path / "certs").mkdir()
    a = _bundle(tmp_path / "certs", "a")
    crt_file = tmp_path / "crt-list.txt"
    crt_file.write_text("certs/a.pem\n# a comment\n\n")
    crt = CrtListFile(crt_file)
    assert crt.names(a)
    assert crt.add(a, str(a)) is None
    assert crt.remove(a)
    assert crt.read() == "# a comment\n\n"


def test_names_through_a_symlinked_directory_match_the_same_file(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    a = _bundle(real, "a")
    assert line_names(str(a), real, link / "a.pem")
    assert line_names(str(link / "a.pem"), link, a)
    assert not line_names(str(real / "other.pem"), real, link / "a.pem")
    crt = CrtListFile(link / "crt-list.txt")
    crt.add(a, str(a))
    assert crt.add(link / "a.pem", str(link / "a.pem")) is None  # same file: no second line
    assert (real / "crt-list.txt").read_text() == f"{a}\n"


def test_concurrent_adds_from_many_editors_lose_no_line(tmp_path: Path) -> None:
    bundles = [_bundle(tmp_path, f"c{i}") for i in range(32)]
    barrier = threading.Barrier(8)

    def work(worker: int) -> None:
        barrier.wait(10)
        for path in bundles[worker::8]:
            # A new editor per call, as separate Deployers would have.
            CrtListFile(tmp_path / "crt-list.txt").add(path, str(path))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    lines = (tmp_path / "crt-list.txt").read_text().splitlines()
    assert sorted(lines) == sorted(str(p) for p in bundles)


def test_another_process_holding_the_lock_file_blocks_edits(tmp_path: Path) -> None:
    a = _bundle(tmp_path, "a")
    crt = CrtListFile(tmp_path / "crt-list.txt", lock_timeout=0.2)
    # A separate open file description, as another process would hold.
    fd = os.open(crt.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(TimeoutError, match="another process"):
            crt.add(a, str(a))
    finally:
        os.close(fd)
    assert crt.add(a, str(a)) == str(a)


def test_add_many_of_paths_named_literally_stats_no_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A renewal of certificates already in the crt-list must not stat every
    line of a 10,000-line file (issue 12: single-certificate swap)."""
    from agent import crtlist

    bundles = [tmp_path / f"c{i}.pem" for i in range(50)]
    for b in bundles:
        b.write_text("x")
    lst = tmp_path / "crt-list.txt"
    lst.write_text("".join(f"{b}\n" for b in bundles))
    calls: list[str] = []
    real = crtlist._identity
    def counting(p: str) -> tuple[int, int] | None:
        calls.append(p)
        return real(p)

    monkeypatch.setattr(crtlist, "_identity", counting)
    editor = CrtListFile(lst)
    assert editor.add_many([(bundles[7], str(bundles[7]))]) == [None]
    assert calls == []
    # Another spelling of a listed file is still found (by identity: then stats).
    link = tmp_path / "alias.pem"
    link.symlink_to(bundles[3])
    assert editor.add_many([(link, str(link))]) == [None]
    assert calls and lst.read_text().count("\n") == 50


def test_a_renewal_into_an_unchanged_crt_list_reads_it_once_and_sees_any_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Single swaps at 1,000 certificates re-read and re-parsed the whole file for
    every renewal; now only when the file changed (any writer, any process)."""
    bundles = [_bundle(tmp_path, f"c{i}") for i in range(20)]
    lst = tmp_path / "crt-list.txt"
    lst.write_text("".join(f"{b}\n" for b in bundles[:10]))
    reads: list[int] = []
    real = CrtListFile.read

    def counting(self: CrtListFile) -> str:
        reads.append(1)
        return real(self)

    monkeypatch.setattr(CrtListFile, "read", counting)
    editor = CrtListFile(lst)
    for i in range(5):
        assert editor.add_many([(bundles[i], str(bundles[i]))]) == [None]
    assert len(reads) == 1  # parsed once, then known unchanged
    # Another process (a new editor here) removes a line: the next add sees it.
    assert CrtListFile(lst).remove(bundles[2])
    assert editor.add_many([(bundles[2], str(bundles[2]))]) == [str(bundles[2])]
    assert lst.read_text().count(str(bundles[2])) == 1
    # An operator appending in place (same inode, new size) is seen too.
    with lst.open("a") as f:
        f.write(f"{bundles[15]}\n")
    assert editor.add_many([(bundles[15], str(bundles[15]))]) == [None]
    assert lst.read_text().count(str(bundles[15])) == 1
