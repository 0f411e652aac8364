"""A root + intermediate that issue ACME-like leaves (with AKI, chosen serial and dates).

For unit tests of the checks and ARI code: what a CA would return, without a CA.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def utc(ts: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC)


class TinyCA:
    """Root -> intermediate -> leaves. `fullchain(...)` returns PEM like an ACME CA's."""

    def __init__(self) -> None:
        now = datetime.datetime.now(datetime.UTC)
        self.root_key = ec.generate_private_key(ec.SECP256R1())
        self.root = (
            x509.CertificateBuilder()
            .subject_name(_name("tiny root"))
            .issuer_name(_name("tiny root"))
            .public_key(self.root_key.public_key())
            .serial_number(1)
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.root_key, hashes.SHA256())
        )
        self.int_key = ec.generate_private_key(ec.SECP256R1())
        self.intermediate = (
            x509.CertificateBuilder()
            .subject_name(_name("tiny intermediate"))
            .issuer_name(self.root.subject)
            .public_key(self.int_key.public_key())
            .serial_number(2)
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.int_key.public_key()), False
            )
            .sign(self.root_key, hashes.SHA256())
        )

    def leaf(
        self,
        key: PrivateKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
        domains: Sequence[str],
        not_before: float,
        not_after: float,
        serial: int = 0x87654321,
        aki: bytes | None = None,
        signer: PrivateKey | None = None,
    ) -> x509.Certificate:
        public = key.public_key() if isinstance(key, PrivateKey) else key
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(domains[0]))
            .issuer_name(self.intermediate.subject)
            .public_key(public)
            .serial_number(serial)
            .not_valid_before(utc(not_before))
            .not_valid_after(utc(not_after))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(d) for d in domains]), False)
        )
        if aki is None:
            ext = x509.AuthorityKeyIdentifier.from_issuer_public_key(self.int_key.public_key())
        else:
            ext = x509.AuthorityKeyIdentifier(aki, None, None)
        builder = builder.add_extension(ext, False)
        return builder.sign(signer or self.int_key, hashes.SHA256())

    def fullchain(self, leaf: x509.Certificate) -> bytes:
        return leaf.public_bytes(serialization.Encoding.PEM) + self.intermediate.public_bytes(
            serialization.Encoding.PEM
        )
