"""Check that an HAProxy bundle (leaf + chain + private key) pairs a leaf with its own key."""

from __future__ import annotations

import re

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent import keys

_KEY = re.compile(
    rb"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----.+?-----END (?:[A-Z]+ )?PRIVATE KEY-----", re.S
)


def bundle_pin(bundle: bytes) -> str:
    """The SPKI pin of a bundle's key; AssertionError unless its leaf has that key."""
    found = _KEY.findall(bundle)
    assert len(found) == 1, f"{len(found)} private keys in the bundle"
    key = serialization.load_pem_private_key(found[0], None)
    leaf = x509.load_pem_x509_certificate(bundle)  # the first certificate block
    key_pin = keys.spki_pin(key)  # type: ignore[arg-type]
    leaf_pin = keys.spki_pin(leaf.public_key())  # type: ignore[arg-type]
    assert key_pin == leaf_pin, f"bundle pairs leaf {leaf_pin} with key {key_pin}"
    return key_pin
