"""`haproxy-acme-agent import`: adopt a certbot + scripts setup without re-issuing.

The classic layout is one directory per site holding the stable key
(`site.key` or `<anything>.key`), usually the CSR made from it (`*.csr`) and
the current certificate, as certbot `certonly --csr` leaves it
(`0000_cert.pem`, `0000_chain.pem`, `0001_chain.pem`) or as the scripts named
it (`site.crt`, `fullchain.pem`, a combined HAProxy `.pem` holding the key
too). `scan_site(dir)` finds the key, the CSR and, among every certificate in
the directory, the newest leaf whose public key IS that key, with the chain
that signs it.

`import_sites(config_path, dirs)` then, all or nothing:
1. checks every site (key loads and is supported, CSR made from the key,
   leaf checked exactly like a renewed one: key, names, chain, not expired);
2. appends one `[[certificates]]` entry per new site to the config file
   (atomically; the key and CSR are referenced where they are, never copied,
   rewritten or regenerated) and validates the resulting config;
3. stores each current certificate in the state directory the way a renewal
   installs it (a generation: cert, chain, fullchain, meta.json; never the
   key), so the agent's next `renew` finds it valid and issues nothing until
   it is due (it deploys it, verified, since no instance is known to serve it).
A site whose name is already configured is skipped. Nothing is written when
any site has a problem; errors name the directory and the file.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from agent import keys, layout
from agent.config import Config, ConfigError, load_config
from agent.storage import SECRET_MODE, atomic_write

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.+?-----END CERTIFICATE-----", re.S)
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
CERT_SUFFIXES = (".pem", ".crt", ".cer")


class SiteImportError(Exception):
    """A site that cannot be imported; the message names the directory and the file."""


@dataclass(frozen=True)
class Site:
    """One site directory, checked: what `import` adds to the config and the state."""

    name: str
    directory: Path
    key: Path
    csr: Path | None
    domains: tuple[str, ...]
    leaf: x509.Certificate | None  # None: no valid certificate (the agent will issue one)
    chain: tuple[x509.Certificate, ...]
    note: str = ""

    def toml(self) -> str:
        """The `[[certificates]]` entry for this site."""
        lines = [
            "",
            f"# imported from {self.directory} on {time.strftime('%Y-%m-%d', time.gmtime())}",
            "[[certificates]]",
            f"name = {_toml_str(self.name)}",
            "domains = [" + ", ".join(_toml_str(d) for d in self.domains) + "]",
            f"key = {_toml_str(str(self.key))}",
        ]
        if self.csr is not None:
            lines.append(f"csr = {_toml_str(str(self.csr))}")
        return "\n".join(lines) + "\n"


def _toml_str(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def site_name(directory: Path) -> str:
    """The certificate name for a site directory: its name, made safe for the state dir."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", directory.name).lstrip("._-")
    name = name.replace("..", ".")[:100]
    if not name or not _NAME_OK.match(name):
        raise SiteImportError(f"{directory}: cannot derive a certificate name from the directory")
    return name


def _one(directory: Path, pattern: str, what: str, preferred: str) -> Path | None:
    found = sorted(p for p in directory.glob(pattern) if p.is_file())
    if not found:
        return None
    if len(found) == 1:
        return found[0]
    pref = directory / preferred
    if pref in found:
        return pref
    names = ", ".join(p.name for p in found)
    raise SiteImportError(f"{directory}: several {what} files ({names}); keep one")


def _certificates_in(directory: Path, skip: set[Path]) -> list[x509.Certificate]:
    certs: list[x509.Certificate] = []
    for path in sorted(directory.iterdir()):
        if path in skip or not path.is_file() or path.suffix.lower() not in CERT_SUFFIXES:
            continue
        try:
            data = path.read_bytes()
        except OSError as e:
            raise SiteImportError(f"{path}: cannot read ({e.strerror})") from None
        for block in _PEM_CERT.findall(data):
            try:
                certs.append(x509.load_pem_x509_certificate(block))
            except ValueError as e:
                raise SiteImportError(f"{path}: a certificate does not parse ({e})") from None
    return certs


def _chain_for(
    leaf: x509.Certificate, pool: list[x509.Certificate]
) -> tuple[x509.Certificate, ...]:
    """Intermediates from `pool` that sign `leaf`, in order; stops at a self-signed root."""
    chain: list[x509.Certificate] = []
    current = leaf
    for _ in range(8):  # real chains are 1-3 long; bound the walk
        parent = next(
            (
                c
                for c in pool
                if c.subject == current.issuer
                and c != current
                and c not in chain
                and _signs(c, current)
            ),
            None,
        )
        if parent is None or parent.subject == parent.issuer:  # roots are not served
            break
        chain.append(parent)
        current = parent
    return tuple(chain)


def _signs(parent: x509.Certificate, child: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def scan_site(directory: Path, now: float | None = None) -> Site:
    """Find and check the key, CSR and current certificate of one site directory."""
    from agent.renewal import CertificateRejected, check_certificate

    now = time.time() if now is None else now
    directory = Path(os.path.abspath(directory))
    if not directory.is_dir():
        raise SiteImportError(f"{directory}: not a directory")
    key_path = _one(directory, "*.key", "key", "site.key")
    if key_path is None:
        raise SiteImportError(f"{directory}: no private key (*.key) found")
    try:
        key = keys.load_private_key(key_path)
    except keys.StableKeyError as e:
        raise SiteImportError(f"{directory}: {e}") from None
    csr_path = _one(directory, "*.csr", "CSR", "site.csr")
    csr_domains: list[str] | None = None
    if csr_path is not None:
        try:
            csr = keys.load_csr(csr_path)
        except keys.CSRError as e:
            raise SiteImportError(f"{directory}: {e}") from None
        if not keys.same_public_key(csr.public_key(), key):  # type: ignore[arg-type]
            raise SiteImportError(f"{csr_path}: was not made from the key {key_path}")
        csr_domains = keys.csr_domains(csr)

    pool = _certificates_in(directory, {key_path, *([csr_path] if csr_path else [])})
    pin = keys.spki_pin(key)
    leaves = [c for c in pool if keys.spki_pin(c.public_key()) == pin]  # type: ignore[arg-type]
    leaf = max(leaves, key=lambda c: c.not_valid_after_utc, default=None)
    domains = csr_domains if csr_domains is not None else (keys.cert_domains(leaf) if leaf else [])
    if not domains:
        raise SiteImportError(
            f"{directory}: no CSR and no certificate for the key {key_path}: "
            "cannot tell the domains"
        )
    name = site_name(directory)
    if leaf is None:
        note = "no certificate for this key: the agent will issue one"
        return Site(name, directory, key_path, csr_path, tuple(domains), None, (), note)
    chain = _chain_for(leaf, pool)
    fullchain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (leaf, *chain))
    try:
        checked = check_certificate(fullchain, key, domains, (), now)
    except CertificateRejected as e:
        if leaf.not_valid_after_utc.timestamp() <= now:
            note = f"current certificate expired ({e}): the agent will issue one"
            return Site(name, directory, key_path, csr_path, tuple(domains), None, (), note)
        raise SiteImportError(f"{directory}: current certificate rejected: {e}") from None
    if not chain:
        note = "no intermediate certificate found next to the leaf: serving the leaf alone"
    else:
        note = ""
    return Site(
        name, directory, key_path, csr_path, tuple(domains), checked.leaf, checked.chain, note
    )


def site_directories(paths: list[Path]) -> list[Path]:
    """Each path is a site directory (it holds a *.key) or a parent of site directories."""
    dirs: list[Path] = []
    for p in paths:
        if not p.is_dir():
            raise SiteImportError(f"{p}: not a directory")
        if any(p.glob("*.key")):
            dirs.append(p)
            continue
        subs = sorted(d for d in p.iterdir() if d.is_dir() and any(d.glob("*.key")))
        if not subs:
            raise SiteImportError(f"{p}: no site directory (one holding a *.key) found")
        dirs += subs
    return dirs


@dataclass(frozen=True)
class ImportResult:
    imported: list[Site]
    skipped: list[tuple[str, str]]  # (name, why)
    config_text: str  # what was (or would be) appended to the config file
    bundles: list[Path] = field(default_factory=list)  # HAProxy bundles written to cert_dir


def import_sites(
    config_path: Path, paths: list[Path], dry_run: bool = False, now: float | None = None
) -> ImportResult:
    """Adopt the site directories under `paths` into the config and state; see the module doc."""
    from agent.challenges import MemoryChallengeRegistry
    from agent.renewal import CheckedChain, Renewer, node_bundle

    config = load_config(config_path)
    known = {c.name: c for c in config.certificates}
    known_keys = {os.path.realpath(c.key): c.name for c in config.certificates}
    sites: list[Site] = []
    skipped: list[tuple[str, str]] = []
    errors: list[str] = []
    for d in site_directories(paths):
        try:
            site = scan_site(d, now)
        except SiteImportError as e:
            errors.append(str(e))
            continue
        if site.name in known:
            skipped.append((site.name, "already in the config"))
            continue
        if os.path.realpath(site.key) in known_keys:
            owner = known_keys[os.path.realpath(site.key)]
            skipped.append((site.name, f"its key is already used by certificate {owner!r}"))
            continue
        if any(s.name == site.name for s in sites):
            errors.append(f"{d}: two site directories are both named {site.name!r}")
            continue
        sites.append(site)
    if errors:
        raise SiteImportError("nothing imported:\n  " + "\n  ".join(errors))
    text = "".join(s.toml() for s in sites)
    if dry_run or not sites:
        return ImportResult(sites, skipped, text)

    # Config first, validated before the state is touched; restored if it fails.
    original = config_path.read_bytes()
    mode = config_path.stat().st_mode & 0o777
    sep = b"" if original.endswith(b"\n") or not original else b"\n"
    atomic_write(config_path, original + sep + text.encode(), mode)
    try:
        new_config: Config = load_config(config_path)
    except ConfigError:
        atomic_write(config_path, original, mode)
        raise
    renewer = Renewer(new_config, MemoryChallengeRegistry())
    written: list[Path] = []
    for s in sites:
        if s.leaf is None:
            continue
        cfg = new_config.certificate(s.name)
        with renewer.storage.locked(layout.cert_lock(s.name), timeout=30.0) as token:
            renewer.install(cfg, CheckedChain(s.leaf, s.chain), token)
        # The file HAProxy's crt line will name, assembled here from the chain
        # and the site's key (storage holds no key); an existing one is left
        # to the agent's deploy (it is replaced, verified, at the next run:
        # no instance is recorded as serving the imported certificate yet).
        target = layout.bundle_path(new_config.haproxy.cert_dir, s.name)
        if new_config.haproxy.cert_dir.is_dir() and not target.exists():
            atomic_write(target, node_bundle(cfg, CheckedChain(s.leaf, s.chain).fullchain_pem),
                         SECRET_MODE)  # fmt: skip
            written.append(target)
    return ImportResult(sites, skipped, text, written)


# --- `haproxy-acme-agent import` (registered in agent/cli.py) -------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "paths",
        nargs="+",
        type=Path,
        metavar="DIR",
        help="a site directory (holding its .key, .csr and certificate) or a parent of several",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the [[certificates]] entries and what would be stored; write nothing",
    )


def run(args: argparse.Namespace) -> int:
    """Import; exit 0 on success, 1 when a site cannot be imported (nothing written)."""
    try:
        result = import_sites(Path(args.config), list(args.paths), args.dry_run)
    except SiteImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for name, why in result.skipped:
        print(f"{name}: skipped: {why}", file=sys.stderr)
    for s in result.imported:
        state = (
            f"certificate serial {format(s.leaf.serial_number, 'x')} valid until "
            f"{s.leaf.not_valid_after_utc.strftime('%Y-%m-%dT%H:%M:%SZ')}"
            if s.leaf is not None
            else "no valid certificate"
        )
        verb = "would import" if args.dry_run else "imported"
        pin = keys.spki_pin(keys.load_private_key(s.key))
        print(
            f"{s.name}: {verb}: key {s.key} (pin {pin}), {state}"
            + (f"; {s.note}" if s.note else ""),
            file=sys.stderr,
        )
    if args.dry_run:
        sys.stdout.write(result.config_text)
    for path in result.bundles:
        print(f"wrote HAProxy bundle {path}", file=sys.stderr)
    if not args.dry_run and result.imported:
        print(
            f"appended {len(result.imported)} [[certificates]] entries to {args.config}",
            file=sys.stderr,
        )
    return 0
