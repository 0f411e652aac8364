"""Stable private keys, their pins, and CSRs built from them.

The operator's key is the fixed point of this project: it is loaded, used to
sign CSRs, and never overwritten, rotated or regenerated. With
`generate_key = true` a missing key is created exactly once (mode 0600).

Pins: the SPKI pin is base64(SHA-256(DER SubjectPublicKeyInfo)) as used by
HPKP (RFC 7469) and app pinning; TLSA "3 1 1" data is the hex of the same hash
(DANE-EE, SPKI, SHA-256; RFC 6698/7671).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from agent.storage import SECRET_MODE, atomic_write, fsync_dir

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey

KEY_TYPES = ("rsa2048", "rsa3072", "rsa4096", "ec256", "ec384")
RSA_MIN_BITS = 2048
RSA_MAX_BITS = 4096
_CURVES: dict[str, type[ec.EllipticCurve]] = {"secp256r1": ec.SECP256R1, "secp384r1": ec.SECP384R1}

# HPKP max-age we print in the ready-made header (60 days, the RFC's example).
HPKP_MAX_AGE = 5184000


class StableKeyError(Exception):
    """Base for key problems; the message names the file."""


class UnsupportedKeyError(StableKeyError):
    """A key of a type or size we do not issue for (e.g. RSA 1024, Ed25519, P-521)."""


class KeyLoadError(StableKeyError):
    """A key file that is missing, unreadable, encrypted or not a private key."""


class CSRError(Exception):
    """A CSR that cannot be parsed, has a bad signature, or does not match."""


def describe_key(key: PrivateKey | PublicKey) -> str:
    """Short human description: "RSA 4096" or "ECDSA P-256"."""
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    return {"secp256r1": "ECDSA P-256", "secp384r1": "ECDSA P-384"}.get(
        key.curve.name, f"ECDSA {key.curve.name}"
    )


def check_supported(key: object, source: str) -> PrivateKey:
    """Return `key` if it is RSA 2048-4096 or ECDSA P-256/P-384, else raise UnsupportedKeyError."""
    if isinstance(key, rsa.RSAPrivateKey):
        if not RSA_MIN_BITS <= key.key_size <= RSA_MAX_BITS:
            raise UnsupportedKeyError(
                f"{source}: RSA key of {key.key_size} bits is not supported "
                f"(use {RSA_MIN_BITS} to {RSA_MAX_BITS} bits)"
            )
        return key
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if key.curve.name not in _CURVES:
            raise UnsupportedKeyError(
                f"{source}: ECDSA curve {key.curve.name} is not supported (use P-256 or P-384)"
            )
        return key
    raise UnsupportedKeyError(
        f"{source}: {type(key).__name__} keys are not supported "
        "(use RSA 2048-4096 or ECDSA P-256/P-384)"
    )


def parse_private_key(data: bytes, source: str) -> PrivateKey:
    """Parse a PEM (or DER) private key; unencrypted only."""
    try:
        if b"-----BEGIN" in data:
            key = serialization.load_pem_private_key(data, password=None)
        else:
            key = serialization.load_der_private_key(data, password=None)
    except TypeError as e:
        # cryptography raises TypeError for an encrypted key without password.
        raise KeyLoadError(f"{source}: encrypted private keys are not supported ({e})") from e
    except Exception as e:  # ValueError, UnsupportedAlgorithm and friends
        raise KeyLoadError(f"{source}: not a readable private key ({e})") from e
    return check_supported(key, source)


def load_private_key(path: Path) -> PrivateKey:
    """Load the stable key at `path`; errors name the file."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError as e:
        raise KeyLoadError(f"file {path} does not exist") from e
    except PermissionError as e:
        raise KeyLoadError(f"file {path} is not readable") from e
    except IsADirectoryError as e:
        raise KeyLoadError(f"{path} is a directory, not a key file") from e
    except OSError as e:
        raise KeyLoadError(f"file {path} cannot be read: {e.strerror}") from e
    return parse_private_key(data, str(path))


# --- key file checks at start, and their cache ---------------------------------------
#
# Parsing a key is the costly part of loading a config (about 0.1 ms for a
# P-256 key, more for RSA; 10,000 keys take over a second). A full check of a
# file (`key_file_facts`) yields its public facts, tied to the file's identity;
# a later check of a file with the same identity (device, inode, size, mtime
# and ctime in ns: a write, chmod, rename over or touch changes one of them)
# can take the facts from the cache instead of parsing again. The cache holds
# no key material: the key's type and its public SPKI pin.

Identity = tuple[int, int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns


@dataclass(frozen=True, slots=True)  # one per certificate: 10,000 at start
class KeyFileFacts:
    """What checking the key file at `path` found: `identity` and `mode` from
    this check's stat; `kind` (`describe_key`, e.g. "ECDSA P-256") and `pin`
    (`spki_pin` of its public key) from parsing it, or from the cache when the
    identity is the one that was parsed. `parsed`: parsed by this check."""

    path: str
    identity: Identity
    mode: int
    kind: str
    pin: str
    parsed: bool = True

    def to_json(self) -> dict[str, object]:
        return {"identity": list(self.identity), "kind": self.kind, "pin": self.pin}


def _identity(st: os.stat_result) -> Identity:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def key_file_facts(path: Path, cached: KeyFileFacts | None = None) -> KeyFileFacts:
    """Check the private key file at `path` (exists, regular, readable,
    parses as a supported unencrypted key) and return its facts. With
    `cached` facts of the same path whose identity equals the file's now, the
    file is stat'ed and access-checked but not read. Raises KeyLoadError
    (or UnsupportedKeyError); the messages name the file."""
    p = str(path)
    try:
        st = os.stat(p)
    except FileNotFoundError as e:
        raise KeyLoadError(f"file {path} does not exist") from e
    except OSError as e:
        raise KeyLoadError(f"file {path} cannot be read: {e.strerror}") from e
    if not stat.S_ISREG(st.st_mode):
        raise KeyLoadError(f"{path} is not a regular file")
    if not os.access(p, os.R_OK):
        raise KeyLoadError(f"file {path} is not readable")
    ident = _identity(st)
    if cached is not None and cached.path == p and cached.identity == ident:
        return KeyFileFacts(p, ident, stat.S_IMODE(st.st_mode), cached.kind, cached.pin, False)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
    except PermissionError as e:
        raise KeyLoadError(f"file {path} is not readable") from e
    except OSError as e:
        raise KeyLoadError(f"file {path} is not readable ({e.strerror})") from e
    try:
        # The identity of what we read: a change while reading changes ctime,
        # so the next check parses again.
        st = os.fstat(fd)
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    except OSError as e:
        raise KeyLoadError(f"file {path} is not readable ({e.strerror})") from e
    finally:
        os.close(fd)
    key = parse_private_key(b"".join(chunks), p)
    return KeyFileFacts(
        p, _identity(st), stat.S_IMODE(st.st_mode), describe_key(key), spki_pin(key), True
    )


def read_key_checks(path: Path) -> dict[str, KeyFileFacts]:
    """The cache of earlier full checks (key file path -> facts; `mode` 0); empty
    when missing or damaged (then every key is parsed: the cache only saves time)."""
    try:
        data = json.loads(Path(path).read_bytes())
        out: dict[str, KeyFileFacts] = {}
        for p, f in data["keys"].items():
            dev, ino, size, mtime, ctime = (int(x) for x in f["identity"])
            ident = (dev, ino, size, mtime, ctime)
            out[str(p)] = KeyFileFacts(str(p), ident, 0, str(f["kind"]), str(f["pin"]), False)
        return out
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def write_key_checks(path: Path, facts: Mapping[str, KeyFileFacts]) -> None:
    """Store `facts` as the cache (atomically, 0600; public facts only)."""
    data = {"version": 1, "keys": {p: f.to_json() for p, f in sorted(facts.items())}}
    atomic_write(Path(path), (json.dumps(data, separators=(",", ":")) + "\n").encode(), SECRET_MODE)


def generate_private_key(key_type: str) -> PrivateKey:
    """A fresh key of `key_type` (one of KEY_TYPES)."""
    if key_type.startswith("rsa"):
        bits = int(key_type[3:])
        return rsa.generate_private_key(public_exponent=65537, key_size=bits)
    if key_type == "ec256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ec384":
        return ec.generate_private_key(ec.SECP384R1())
    raise ValueError(f"unknown key_type {key_type!r} (one of {', '.join(KEY_TYPES)})")


def private_key_pem(key: PrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted (what HAProxy and openssl read)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def create_key_file(path: Path, key_type: str) -> PrivateKey:
    """Generate a key and write it to `path` (0600) ONLY if `path` does not exist.

    The key is written to a temp file in the same directory, fsynced and then
    hard-linked to `path`: the link fails if `path` exists, so a concurrent
    creator or an existing key is never overwritten. Returns the key that is in
    the file afterwards (the existing one if someone else won the race).
    """
    path = Path(path)
    if path.exists():
        return load_private_key(path)
    key = generate_private_key(key_type)
    data = private_key_pem(key)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, SECRET_MODE)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        try:
            os.link(tmp_name, path)
        except FileExistsError:
            return load_private_key(path)
        fsync_dir(path.parent)
    finally:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
    return key


# --- pins ------------------------------------------------------------------------


def spki_der(key: PrivateKey | PublicKey) -> bytes:
    """DER SubjectPublicKeyInfo of a key (public half)."""
    pub = (
        key.public_key() if isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) else key
    )
    return pub.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def spki_pin(key: PrivateKey | PublicKey) -> str:
    """base64 SHA-256 of the SPKI (the HPKP `pin-sha256` value)."""
    return base64.b64encode(hashlib.sha256(spki_der(key)).digest()).decode("ascii")


def tlsa_311(key: PrivateKey | PublicKey) -> str:
    """TLSA 3 1 1 certificate association data: lowercase hex SHA-256 of the SPKI."""
    return hashlib.sha256(spki_der(key)).hexdigest()


def valid_pin(pin: str) -> bool:
    """True for a base64 string decoding to exactly 32 bytes."""
    try:
        return len(base64.b64decode(pin, validate=True)) == 32
    except ValueError:
        return False


def pin_to_tlsa(pin: str) -> str:
    """TLSA 3 1 1 data from a base64 SPKI pin (for backup keys we only know by pin)."""
    return base64.b64decode(pin, validate=True).hex()


def hpkp_report_only_header(
    pins: Sequence[str], max_age: int = HPKP_MAX_AGE, report_uri: str | None = None
) -> str:
    """The value of a `Public-Key-Pins-Report-Only` header announcing `pins` (deduplicated)."""
    seen: list[str] = []
    for p in pins:
        if p not in seen:
            seen.append(p)
    parts = [f'pin-sha256="{p}"' for p in seen]
    parts.append(f"max-age={max_age}")
    if report_uri:
        parts.append(f'report-uri="{report_uri}"')
    return "; ".join(parts)


# --- CSRs ------------------------------------------------------------------------


def build_csr(key: PrivateKey, domains: Sequence[str]) -> x509.CertificateSigningRequest:
    """A CSR signed by `key` whose SANs are exactly `domains` (CN = first domain when it fits)."""
    if not domains:
        raise ValueError("a CSR needs at least one domain")
    builder = x509.CertificateSigningRequestBuilder()
    # CN is limited to 64 characters (RFC 5280 ub-common-name); SANs carry the names anyway.
    if len(domains[0]) <= 64:
        builder = builder.subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domains[0])])
        )
    else:
        builder = builder.subject_name(x509.Name([]))
    builder = builder.add_extension(
        x509.SubjectAlternativeName([x509.DNSName(d) for d in domains]), critical=False
    )
    return builder.sign(key, hashes.SHA256())


def csr_pem(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(serialization.Encoding.PEM)


def parse_csr(data: bytes, source: str) -> x509.CertificateSigningRequest:
    """Parse a PEM or DER CSR and check its self-signature."""
    try:
        if b"-----BEGIN" in data:
            csr = x509.load_pem_x509_csr(data)
        else:
            csr = x509.load_der_x509_csr(data)
    except ValueError as e:
        raise CSRError(f"{source}: not a readable CSR ({e})") from e
    if not csr.is_signature_valid:
        raise CSRError(f"{source}: the CSR's signature is invalid")
    return csr


def load_csr(path: Path) -> x509.CertificateSigningRequest:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError as e:
        raise CSRError(f"file {path} does not exist") from e
    except PermissionError as e:
        raise CSRError(f"file {path} is not readable") from e
    except OSError as e:
        raise CSRError(f"file {path} cannot be read: {e.strerror}") from e
    return parse_csr(data, str(path))


def csr_domains(csr: x509.CertificateSigningRequest) -> list[str]:
    """DNS names the CSR asks for: its SANs, plus the CN when it is not among them."""
    names: list[str] = []
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names.extend(n.lower() for n in san.value.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        pass
    for attr in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
        cn = attr.value if isinstance(attr.value, str) else attr.value.decode()
        if cn.lower() not in names:
            names.append(cn.lower())
    return names


def cert_domains(cert: x509.Certificate) -> list[str]:
    """DNS SANs of a certificate, lower-cased, in certificate order."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return [n.lower() for n in san.value.get_values_for_type(x509.DNSName)]


def same_public_key(a: PrivateKey | PublicKey, b: PrivateKey | PublicKey) -> bool:
    return spki_der(a) == spki_der(b)
