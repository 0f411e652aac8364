"""Throwaway CA and leaf certificates for tests and benchmarks (no ACME needed).

Keys are EC P-256 by default because they are fast to generate; pass
`rsa_bits` to get RSA keys (e.g. to make a bundle too large for tune.bufsize).
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True)
class CA:
    """A self-signed certificate authority."""

    cert: x509.Certificate
    key: PrivateKey

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def make_key(rsa_bits: int | None = None) -> PrivateKey:
    """A fresh private key: EC P-256, or RSA of `rsa_bits` bits."""
    if rsa_bits:
        return rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
    return ec.generate_private_key(ec.SECP256R1())


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def make_ca(common_name: str = "haproxy-acme-agent test CA") -> CA:
    """A self-signed CA valid from one hour ago for ten days."""
    key = make_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=10))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return CA(cert, key)


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def issue_leaf(
    ca: CA,
    key: PrivateKey,
    names: list[str],
    not_after: datetime.datetime | None = None,
    serial: int | None = None,
) -> x509.Certificate:
    """A server certificate for `names` (DNS names or IP literals) signed by `ca`.

    `not_after` defaults to two days from now; `serial` to a random one.
    """
    if not names:
        raise ValueError("a leaf certificate needs at least one name")
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(serial if serial is not None else x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(not_after or now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([_san(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )


def key_pem(key: PrivateKey) -> bytes:
    """The key as unencrypted PKCS#8 PEM."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def bundle_pem(
    cert: x509.Certificate,
    key: PrivateKey,
    chain: list[x509.Certificate] | None = None,
) -> bytes:
    """HAProxy's combined PEM: leaf, then the chain, then the private key."""
    parts = [cert.public_bytes(serialization.Encoding.PEM)]
    parts += [c.public_bytes(serialization.Encoding.PEM) for c in chain or []]
    parts.append(key_pem(key))
    return b"".join(parts)


def make_bundle(
    ca: CA,
    names: list[str],
    key: PrivateKey | None = None,
    serial: int | None = None,
) -> tuple[bytes, x509.Certificate, PrivateKey]:
    """Issue a leaf for `names` and return (bundle PEM with the CA as chain, leaf, key)."""
    key = key or make_key()
    cert = issue_leaf(ca, key, names, serial=serial)
    return bundle_pem(cert, key, [ca.cert]), cert, key


def write_crt_list(workdir: Path, name: str) -> Path:
    """A crt-list naming one throwaway certificate for `name` (bundle 0600), so an
    HAProxy `bind ... ssl crt-list` can start before any real certificate exists."""
    ca = make_ca(f"{name} throwaway CA")
    key = make_key()
    pem = workdir / f"{name}.pem"
    pem.write_bytes(bundle_pem(issue_leaf(ca, key, [name]), key, [ca.cert]))
    pem.chmod(0o600)
    crt_list = workdir / "certs.list"
    crt_list.write_text(f"{pem}\n")
    return crt_list
