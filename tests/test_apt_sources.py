"""scripts/apt_sources.py: the private trixie/sid source list comes from the machine's own
Debian mirror, read from either sources format, and is always signature-checked."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "apt_sources.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("apt_sources", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["apt_sources"] = module  # dataclasses look the module up by name
    spec.loader.exec_module(module)
    return module


apt_sources = _load()

# Shapes as Debian 12/13 images and cloud hosts ship them; hosts are examples.
DEB822 = textwrap.dedent(
    """\
    Types: deb
    # http://snapshot.debian.org/archive/debian/20250520T000000Z
    URIs: http://mirror.example.org/debian
    Suites: bookworm bookworm-updates
    Components: main
    Signed-By: {keyring}

    Types: deb
    URIs: http://mirror.example.org/debian-security
    Suites: bookworm-security
    Components: main
    Signed-By: {keyring}
    """
)
ONE_LINE = textwrap.dedent(
    """\
    # deb cdrom:[Debian GNU/Linux 12]/ bookworm main
    deb https://packages.cloud.example.com/apt cloud-sdk-bookworm main
    deb-src http://src.example.org/debian bookworm main
    deb [arch=amd64 signed-by={keyring}] http://ftp.example.net/debian/ trixie main contrib
    deb http://ftp.example.net/debian-security trixie-security main
    """
)
THIRD_PARTY_DEB822 = textwrap.dedent(
    """\
    Types: deb
    URIs: https://deb.example.com/node_20.x
    Suites: nodistro
    Components: main
    Signed-By: /usr/share/keyrings/nodesource.gpg
    """
)


@pytest.fixture
def keyring(tmp_path: Path) -> Path:
    k = tmp_path / "debian-archive-keyring.gpg"
    k.write_bytes(b"not a real keyring")
    return k


def test_deb822_mirror_is_the_release_entry_not_security_and_its_keyring_is_used(
    keyring: Path,
) -> None:
    sources = apt_sources.parse_deb822(DEB822.format(keyring=keyring), "debian.sources")
    uri, entry = apt_sources.debian_mirror(sources)
    assert uri == "http://mirror.example.org/debian"
    assert apt_sources.archive_keyring(entry) == str(keyring)


def test_one_line_mirror_skips_third_party_comments_and_deb_src(keyring: Path) -> None:
    sources = apt_sources.parse_one_line(ONE_LINE.format(keyring=keyring), "sources.list")
    uri, entry = apt_sources.debian_mirror(sources)
    assert uri == "http://ftp.example.net/debian"  # trailing slash dropped
    assert entry.signed_by == str(keyring)
    assert apt_sources.archive_keyring(entry) == str(keyring)


def test_disabled_deb822_entry_is_not_used(keyring: Path) -> None:
    text = "Enabled: no\n" + DEB822.format(keyring=keyring)
    sources = apt_sources.parse_deb822(text)
    assert [s.uris for s in sources] == [["http://mirror.example.org/debian-security"]]
    with pytest.raises(apt_sources.AptSourcesError, match="no Debian mirror"):
        apt_sources.debian_mirror(sources)


def test_source_list_names_trixie_and_sid_main_signed_by_the_keyring() -> None:
    text = apt_sources.source_list("http://m.example/debian", "/k.gpg", ["trixie", "sid"])
    assert text == (
        "deb [signed-by=/k.gpg] http://m.example/debian trixie main\n"
        "deb [signed-by=/k.gpg] http://m.example/debian sid main\n"
    )
    assert "trusted" not in text


def _etc(tmp_path: Path, files: dict[str, str]) -> Path:
    etc = tmp_path / "etc-apt"
    (etc / "sources.list.d").mkdir(parents=True)
    for name, text in files.items():
        (etc / name).write_text(text)
    return etc


@pytest.mark.parametrize("fmt", ["deb822", "one-line"])
def test_script_writes_the_source_list_from_either_format(
    tmp_path: Path, keyring: Path, fmt: str
) -> None:
    if fmt == "deb822":
        files = {
            "sources.list.d/nodesource.sources": THIRD_PARTY_DEB822,
            "sources.list.d/debian.sources": DEB822.format(keyring=keyring),
        }
        mirror = "http://mirror.example.org/debian"
    else:
        files = {"sources.list": ONE_LINE.format(keyring=keyring)}
        mirror = "http://ftp.example.net/debian"
    out = tmp_path / "sources.list"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), "--etc", str(_etc(tmp_path, files))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == (
        f"deb [signed-by={keyring}] {mirror} trixie main\n"
        f"deb [signed-by={keyring}] {mirror} sid main\n"
    )


def test_script_without_a_debian_mirror_fails_naming_the_files_and_writes_nothing(
    tmp_path: Path,
) -> None:
    etc = _etc(tmp_path, {"sources.list.d/nodesource.sources": THIRD_PARTY_DEB822})
    out = tmp_path / "sources.list"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), "--etc", str(etc)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert "no Debian mirror" in proc.stderr and "nodesource.sources" in proc.stderr
    assert not out.exists()
