"""Write a private apt source list for Debian trixie and sid on this machine's own mirror.

scripts/fetch_debian.sh downloads newer HAProxy and Pebble packages with
`apt-get download` under a private apt configuration. Its source list must use
the Debian mirror the machine's apt already uses (never a host written into
the repo), so it is generated here from /etc/apt/sources.list and
/etc/apt/sources.list.d/*.list (one-line format) and *.sources (deb822).

Contract:
- `parse_one_line(text)` and `parse_deb822(text)` return the `Source` entries
  of one file (disabled entries, comments and `deb-src` are dropped).
- `debian_mirror(sources)` is the first `deb` entry that serves a Debian
  release suite (bookworm, trixie, sid, stable, ...; not -security/-updates)
  with the `main` component over http(s); `AptSourcesError` if none.
- `archive_keyring(source)` is the keyring file to verify the Release files
  with: the entry's own Signed-By if it is a file, else the file the package
  debian-archive-keyring ships. Never "trusted=yes".
- `source_list(mirror_uri, keyring, suites)` is the one-line source list text.

    python3 scripts/apt_sources.py OUT [--etc /etc/apt] [--suite trixie --suite sid]

Stdlib only: it runs before the venv exists.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

# Debian release suites (codenames and aliases) a Debian mirror entry may name.
DEBIAN_SUITES = frozenset(
    {
        "buster", "bullseye", "bookworm", "trixie", "forky", "duke", "sid",
        "oldoldstable", "oldstable", "stable", "testing", "unstable",
    }
)  # fmt: skip
KEYRING_CANDIDATES = (
    "/usr/share/keyrings/debian-archive-keyring.pgp",  # trixie and later
    "/usr/share/keyrings/debian-archive-keyring.gpg",  # bookworm
)


class AptSourcesError(RuntimeError):
    """No usable Debian mirror or keyring; the message names the files looked at."""


@dataclass
class Source:
    """One apt source entry: `types` deb/deb-src, `uris`, `suites`, `components`."""

    types: list[str]
    uris: list[str]
    suites: list[str]
    components: list[str]
    signed_by: str | None = None
    origin: str = ""  # the file it came from, for error messages
    options: dict[str, str] = field(default_factory=dict)


def parse_one_line(text: str, origin: str = "") -> list[Source]:
    """Entries of a sources.list-style file: `deb [opt=v ...] URI SUITE COMPONENT...`."""
    out: list[Source] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        kind, _, rest = line.partition(" ")
        rest = rest.strip()
        options: dict[str, str] = {}
        if rest.startswith("["):
            opts, sep, rest = rest[1:].partition("]")
            if not sep:
                continue  # malformed: apt would refuse it too
            for opt in opts.split():
                key, _, value = opt.partition("=")
                options[key.lower()] = value
        words = rest.split()
        if kind not in ("deb", "deb-src") or len(words) < 2:
            continue
        out.append(
            Source(
                types=[kind],
                uris=[words[0]],
                suites=[words[1]],
                components=words[2:],
                signed_by=options.get("signed-by"),
                origin=origin,
                options=options,
            )
        )
    return out


def parse_deb822(text: str, origin: str = "") -> list[Source]:
    """Entries of a deb822 `.sources` file (paragraphs of `Field: value`)."""
    out: list[Source] = []
    paragraphs: list[dict[str, str]] = []
    current: dict[str, str] = {}
    last_key: str | None = None
    for raw in [*text.splitlines(), ""]:
        if raw.startswith("#"):
            continue
        if not raw.strip():
            if current:
                paragraphs.append(current)
            current, last_key = {}, None
            continue
        if raw[0] in " \t":  # continuation line (e.g. an inline Signed-By key block)
            if last_key is not None:
                current[last_key] += "\n" + raw.strip()
            continue
        key, sep, value = raw.partition(":")
        if not sep:
            continue
        last_key = key.strip().lower()
        current[last_key] = value.strip()
    for p in paragraphs:
        if p.get("enabled", "yes").strip().lower() == "no":
            continue
        signed_by = p.get("signed-by")
        if signed_by is not None and "\n" in signed_by:
            signed_by = None  # an inline key, not a file we can hand on
        out.append(
            Source(
                types=p.get("types", "").split(),
                uris=p.get("uris", "").split(),
                suites=p.get("suites", "").split(),
                components=p.get("components", "").split(),
                signed_by=signed_by,
                origin=origin,
            )
        )
    return out


def read_sources(etc: Path) -> list[Source]:
    """All entries of `etc`/sources.list and `etc`/sources.list.d/*.{list,sources}."""
    files: list[Path] = []
    main = etc / "sources.list"
    if main.is_file():
        files.append(main)
    parts = etc / "sources.list.d"
    if parts.is_dir():
        files += sorted(p for p in parts.iterdir() if p.suffix in (".list", ".sources"))
    sources: list[Source] = []
    for f in files:
        text = f.read_text(errors="replace")
        if f.suffix == ".sources":
            sources += parse_deb822(text, str(f))
        else:
            sources += parse_one_line(text, str(f))
    return sources


def debian_mirror(sources: list[Source]) -> tuple[str, Source]:
    """(URI, entry) of the first Debian release mirror among `sources`; see the contract."""
    for s in sources:
        if "deb" not in s.types or "main" not in s.components:
            continue
        if not any(suite in DEBIAN_SUITES for suite in s.suites):
            continue
        for uri in s.uris:
            if uri.startswith(("http://", "https://")):
                return uri.rstrip("/"), s
    looked = sorted({s.origin for s in sources if s.origin}) or ["(no source entries)"]
    raise AptSourcesError(
        "no Debian mirror (a `deb` entry for a Debian release suite with `main` over "
        f"http/https) in {', '.join(looked)}"
    )


def _dpkg_keyring() -> str | None:
    """The archive keyring file the installed debian-archive-keyring package ships."""
    try:
        listing = subprocess.run(
            ["dpkg", "-L", "debian-archive-keyring"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout
    except OSError:
        return None
    for line in listing.splitlines():
        name = os.path.basename(line)
        if name in ("debian-archive-keyring.pgp", "debian-archive-keyring.gpg") and os.path.isfile(
            line
        ):
            return line
    return None


def archive_keyring(source: Source) -> str:
    """Keyring file for the Release files of the mirror `source` names; see the contract."""
    if source.signed_by and os.path.isfile(source.signed_by):
        return source.signed_by
    for candidate in KEYRING_CANDIDATES:
        if os.path.isfile(candidate):
            return candidate
    shipped = _dpkg_keyring()
    if shipped:
        return shipped
    raise AptSourcesError(
        "no Debian archive keyring: install the package debian-archive-keyring "
        f"(looked for {', '.join(KEYRING_CANDIDATES)})"
    )


def source_list(mirror_uri: str, keyring: str, suites: list[str]) -> str:
    """One-line apt sources for `suites` (component main) on `mirror_uri`, signed by `keyring`."""
    return "".join(f"deb [signed-by={keyring}] {mirror_uri} {suite} main\n" for suite in suites)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("out", type=Path, help="source list file to write")
    ap.add_argument("--etc", type=Path, default=Path("/etc/apt"), help="apt's config directory")
    ap.add_argument("--suite", action="append", dest="suites", help="default: trixie, sid")
    args = ap.parse_args(argv)
    try:
        uri, entry = debian_mirror(read_sources(args.etc))
        keyring = archive_keyring(entry)
    except AptSourcesError as e:
        print(f"apt_sources: {e}", file=sys.stderr)
        return 1
    text = source_list(uri, keyring, args.suites or ["trixie", "sid"])
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, args.out)
    print(f"apt_sources: {args.out}: {uri} (trixie, sid) verified with {keyring}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
