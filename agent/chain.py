"""Is a CA's chain one that clients can build a path through? (checked before installing)

`verify_chain(leaf, chain, policy, name)` raises `ChainError` saying what is
wrong and what the operator can do. `agent.renewal.check_certificate` calls it
for every issued certificate. What is checked:

1. Order and signatures: every certificate is signed by the next one (name AND
   signature, RFC 8555 section 9.1 order).
2. The leaf's issuer is in the chain. A leaf-only answer is refused unless the
   leaf is signed directly by a trusted root, or `allow_leaf_only = true`
   (per certificate or in [acme]): the operator serves the chain some other
   way (e.g. HAProxy's `issuers-chain-path`).
3. The chain leads to a trust anchor, where that is knowable:
   - `[acme] trusted_roots` set (a PEM file of roots): some certificate of the
     chain is one of those roots or is signed by one. Nothing else is accepted.
   - unset: some certificate of the chain is a root of the system trust store
     (the OpenSSL default CA file and directory, plus certifi's bundle when
     installed) or is signed by one, or the chain ends in a self-signed root
     (the CA sent its root itself). A chain ending in an intermediate whose
     issuer is in no known store is refused: it may be missing a certificate.
     With no system trust store at all, only 1 and 2 are checked.
   "Some certificate", not "the last one": a chain may carry a cross-sign past
   the root clients trust (a TLS client stops at the first anchor it knows).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import ssl
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes

if TYPE_CHECKING:
    from agent.config import AcmeConfig, CertificateConfig

log = logging.getLogger(__name__)

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.+?-----END CERTIFICATE-----", re.S)


class ChainError(Exception):
    """The chain fails a check; the message names the certificate and the fix."""


@dataclass(frozen=True)
class ChainPolicy:
    """What `verify_chain` accepts for one certificate.

    `trusted_roots`: the roots a chain must lead to; None: those of
    `trusted_roots_file` when set, else the system trust store.
    `allow_leaf_only`: a chain-less answer is fine (the chain is served another way).
    """

    trusted_roots: tuple[x509.Certificate, ...] | None = None
    allow_leaf_only: bool = False
    trusted_roots_file: Path | None = None

    def roots(self) -> tuple[x509.Certificate, ...] | None:
        """The configured roots (None: none configured); ChainError if the file is unreadable."""
        if self.trusted_roots is not None or self.trusted_roots_file is None:
            return self.trusted_roots
        try:
            return load_roots(self.trusted_roots_file)
        except (OSError, ValueError) as e:
            raise ChainError(
                f"[acme] trusted_roots: cannot read {self.trusted_roots_file}: {e}"
            ) from e


def policy_for(acme: AcmeConfig, cert: CertificateConfig) -> ChainPolicy:
    """The chain policy of one configured certificate (the roots file is read when checking)."""
    allow = cert.allow_leaf_only if cert.allow_leaf_only is not None else acme.allow_leaf_only
    return ChainPolicy(None, allow, acme.trusted_roots)


def load_roots(path: Path) -> tuple[x509.Certificate, ...]:
    """Every certificate of a PEM file; ValueError when there is none or one does not parse."""
    data = Path(path).read_bytes()
    blocks = _PEM_CERT.findall(data)
    if not blocks:
        raise ValueError(f"{path} holds no PEM certificate")
    return tuple(x509.load_pem_x509_certificate(b) for b in blocks)


def _certs_of_file(path: str) -> list[x509.Certificate]:
    try:
        data = Path(path).read_bytes()
    except OSError:
        return []
    out = []
    for block in _PEM_CERT.findall(data):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # old store entries (negative serials...)
                out.append(x509.load_pem_x509_certificate(block))
        except ValueError:
            continue  # one odd entry must not hide the rest of the store
    return out


@functools.lru_cache(maxsize=1)
def system_roots() -> tuple[x509.Certificate, ...]:
    """The system trust store (OpenSSL default CA file + directory, certifi if installed).

    Read once per process. Empty when none of them exists.
    """
    paths = ssl.get_default_verify_paths()
    files: list[str] = []
    for f in (paths.cafile, paths.openssl_cafile):
        if f and os.path.isfile(f):
            files.append(f)
    for d in (paths.capath, paths.openssl_capath):
        if d and os.path.isdir(d):
            try:
                entries = sorted(os.listdir(d))
            except OSError:
                entries = []
            # Hashed links (abcd1234.0) point at the same files: read those only.
            files += [os.path.join(d, e) for e in entries if re.fullmatch(r"[0-9a-f]{8}\.\d+", e)]
    try:
        import certifi

        files.append(certifi.where())
    except ImportError:
        pass
    seen: set[bytes] = set()
    roots: list[x509.Certificate] = []
    for f in dict.fromkeys(os.path.realpath(p) for p in files):
        for cert in _certs_of_file(f):
            fp = cert.fingerprint(hashes.SHA256())
            if fp not in seen:
                seen.add(fp)
                roots.append(cert)
    return tuple(roots)


def _signed_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _same(a: x509.Certificate, b: x509.Certificate) -> bool:
    return a.subject == b.subject and a.public_key() == b.public_key()


def _self_signed(cert: x509.Certificate) -> bool:
    return cert.subject == cert.issuer and _signed_by(cert, cert)


def _anchored(cert: x509.Certificate, roots: Iterable[x509.Certificate]) -> bool:
    """`cert` is one of `roots` (same name and key) or is signed by one of them."""
    for root in roots:
        if _same(cert, root):
            return True
        if cert.issuer == root.subject and _signed_by(cert, root):
            return True
    return False


def _dn(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "(empty subject)"


def verify_chain(
    leaf: x509.Certificate,
    chain: Sequence[x509.Certificate],
    policy: ChainPolicy,
    name: str,
) -> None:
    """Raise ChainError unless `leaf` + `chain` passes the checks of the module docstring.

    `name` is the certificate's config name, used in messages.
    """
    certs = [leaf, *chain]
    for child, parent in zip(certs, chain, strict=False):
        if child.issuer != parent.subject:
            who = "the leaf's" if child is leaf else f"{_dn(child)}'s"
            raise ChainError(
                f"certificate {name!r}: {who} issuer {child.issuer.rfc4514_string()} is not "
                f"in the chain (the next certificate is {_dn(parent)})"
            )
        if not _signed_by(child, parent):
            raise ChainError(
                f"certificate {name!r}: chain does not verify: {_dn(child)} is not signed by "
                f"{_dn(parent)}"
            )
    configured = policy.roots()
    if configured is not None:
        roots: Sequence[x509.Certificate] = configured
        where = f"[acme] trusted_roots ({policy.trusted_roots_file or 'configured roots'})"
    else:
        roots = system_roots()
        where = "the system trust store"
    if not chain:
        if _anchored(leaf, roots):
            return  # issued directly by a trusted root: nothing is missing
        if policy.allow_leaf_only:
            return
        raise ChainError(
            f"certificate {name!r}: the CA's answer holds only the leaf, no intermediate "
            f"(the leaf's issuer {leaf.issuer.rfc4514_string()} is missing): clients could not "
            "build a chain. If HAProxy serves the chain some other way (issuers-chain-path), "
            f"set allow_leaf_only = true in this certificate's [[certificates]] entry or in [acme]"
        )
    if any(_anchored(c, roots) for c in certs):
        return
    last = certs[-1]
    if configured is None:
        if _self_signed(last):
            return  # the CA sent its own root: the chain is complete
        if not roots:
            log.debug("certificate %s: no system trust store; chain trust not checked", name)
            return
        raise ChainError(
            f"certificate {name!r}: the chain ends at {_dn(last)}, whose issuer "
            f"{last.issuer.rfc4514_string()} is neither in the chain nor in {where}: the chain "
            "may be missing a certificate. If the CA's root is private, set [acme] "
            "trusted_roots to a PEM file holding it"
        )
    raise ChainError(
        f"certificate {name!r}: the chain (ending at {_dn(last)}, issued by "
        f"{last.issuer.rfc4514_string()}) does not lead to a root of {where}"
    )
