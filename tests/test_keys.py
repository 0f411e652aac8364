"""Stable keys: loading, one-time generation, pins, CSRs."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from agent import keys


def _write_key(path: Path, key: object) -> Path:
    assert isinstance(
        key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
    )
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL
            if not isinstance(key, ed25519.Ed25519PrivateKey)
            else serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def test_loads_rsa_and_ecdsa_keys(tmp_path: Path) -> None:
    k1 = _write_key(tmp_path / "r.key", rsa.generate_private_key(65537, 2048))
    k2 = _write_key(tmp_path / "e.key", ec.generate_private_key(ec.SECP384R1()))
    assert keys.describe_key(keys.load_private_key(k1)) == "RSA 2048"
    assert keys.describe_key(keys.load_private_key(k2)) == "ECDSA P-384"


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: rsa.generate_private_key(65537, 1024), "RSA key of 1024 bits"),
        (lambda: ec.generate_private_key(ec.SECP521R1()), "curve secp521r1"),
        (lambda: ed25519.Ed25519PrivateKey.generate(), "Ed25519PrivateKey keys"),
    ],
)
def test_rejects_unsupported_key_types_with_the_file_name(
    tmp_path: Path, make: object, expected: str
) -> None:
    assert callable(make)
    path = _write_key(tmp_path / "bad.key", make())
    with pytest.raises(keys.UnsupportedKeyError) as e:
        keys.load_private_key(path)
    assert expected in str(e.value)
    assert str(path) in str(e.value)


def test_missing_and_garbage_key_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(keys.KeyLoadError, match="does not exist"):
        keys.load_private_key(tmp_path / "nope.key")
    (tmp_path / "junk.key").write_text("hello")
    with pytest.raises(keys.KeyLoadError, match="not a readable private key"):
        keys.load_private_key(tmp_path / "junk.key")


def test_encrypted_key_is_rejected(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "enc.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(keys.KeyLoadError, match="encrypted"):
        keys.load_private_key(tmp_path / "enc.key")


def test_generated_key_is_0600_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "gen.key"
    key = keys.create_key_file(path, "ec256")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    before = path.read_bytes()
    again = keys.create_key_file(path, "rsa2048")
    assert path.read_bytes() == before
    assert keys.spki_pin(again) == keys.spki_pin(key)
    assert not [p for p in tmp_path.iterdir() if p.name != "gen.key"], "temp files left behind"


def test_pin_and_tlsa_match_openssl(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    path = _write_key(tmp_path / "k.pem", key)
    der = subprocess.run(
        ["openssl", "pkey", "-in", str(path), "-pubout", "-outform", "DER"],
        check=True,
        capture_output=True,
    ).stdout
    digest = hashlib.sha256(der).digest()
    assert keys.spki_pin(key) == base64.b64encode(digest).decode()
    assert keys.tlsa_311(key) == digest.hex()
    assert keys.pin_to_tlsa(keys.spki_pin(key)) == digest.hex()


def test_hpkp_header_lists_each_pin_once_with_max_age() -> None:
    header = keys.hpkp_report_only_header(["A" * 43 + "=", "B" * 43 + "=", "A" * 43 + "="])
    assert header == f'pin-sha256="{"A" * 43}="; pin-sha256="{"B" * 43}="; max-age=5184000'
    assert header.endswith("max-age=5184000")
    assert 'report-uri="https://r.example/"' in keys.hpkp_report_only_header(
        ["x"], report_uri="https://r.example/"
    )


def test_valid_pin_requires_32_bytes_of_base64() -> None:
    assert keys.valid_pin(base64.b64encode(b"\0" * 32).decode())
    assert not keys.valid_pin(base64.b64encode(b"\0" * 31).decode())
    assert not keys.valid_pin("not base64!")


def test_built_csr_has_exactly_the_domains_as_sans_and_the_stable_key() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = keys.build_csr(key, ["a.example.com", "b.example.com"])
    assert csr.is_signature_valid
    assert keys.csr_domains(csr) == ["a.example.com", "b.example.com"]
    assert keys.same_public_key(csr.public_key(), key)  # type: ignore[arg-type]
    parsed = keys.parse_csr(keys.csr_pem(csr), "test")
    assert keys.csr_domains(parsed) == ["a.example.com", "b.example.com"]


def test_csr_loader_rejects_garbage_and_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "x.csr").write_text("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n")
    with pytest.raises(keys.CSRError, match=str(tmp_path / "x.csr")):
        keys.load_csr(tmp_path / "x.csr")


def test_openssl_made_csr_with_cn_only_reports_cn(tmp_path: Path) -> None:
    key_path = _write_key(tmp_path / "k.pem", ec.generate_private_key(ec.SECP256R1()))
    subprocess.run(
        [
            "openssl",
            "req",
            "-new",
            "-key",
            str(key_path),
            "-subj",
            "/CN=Only.Example.com",
            "-out",
            str(tmp_path / "r.csr"),
        ],
        check=True,
        capture_output=True,
    )
    assert keys.csr_domains(keys.load_csr(tmp_path / "r.csr")) == ["only.example.com"]
