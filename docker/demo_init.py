"""One-shot set-up for the compose demo (docker/compose.yaml), run by the `init` service.

Makes, once (existing files are kept):
- a throwaway demo CA and the HTTPS certificate Pebble serves (names "pebble",
  "localhost"), in --ca-dir; the agent trusts that CA through [acme] ca_bundle
  (with --ca-only it stops here: the `init-ca` service, which Pebble needs);
- Pebble's issuing root, fetched from its management API (`--pebble-roots`) into
  --ca-dir/pebble-roots.pem, where [acme] trusted_roots points: the agent
  refuses chains that lead to no trusted root, and Pebble makes a new root at
  every start, so it is fetched at every `up` (before the config is loaded);
- the agent's key directory (0700, owned by the agent's uid/gid);
- what HAProxy needs to start before the first issuance, through
  `haproxy-acme-agent haproxy-config --bootstrap` (self-signed fallback and
  crt-list), owned by the agent so it can replace them.
Nothing here is a production secret: every key is made for the demo.
"""

from __future__ import annotations

import argparse
import datetime
import os
import ssl
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.config import load_config


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_ca(ca_dir: Path) -> None:
    if (ca_dir / "ca.pem").exists():
        return
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "haproxy-acme-agent demo CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pebble")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("pebble"), x509.DNSName("localhost")]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    (ca_dir / "pebble.key").write_bytes(_pem_key(key))
    os.chmod(ca_dir / "pebble.key", 0o600)
    (ca_dir / "pebble.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    # Written last: its presence means the directory is complete.
    (ca_dir / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))


def fetch_roots(url: str, ca_dir: Path, timeout: float = 60.0) -> None:
    """Write Pebble's root (PEM) to ca_dir/pebble-roots.pem; wait for Pebble, bounded."""
    ctx = ssl.create_default_context(cafile=str(ca_dir / "ca.pem"))
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5, context=ctx) as r:
                pem = r.read()
            break
        except OSError as e:
            if time.monotonic() >= deadline:
                raise SystemExit(f"cannot fetch Pebble's root from {url}: {e}") from e
            time.sleep(1)
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise SystemExit(f"{url} did not answer a PEM certificate")
    tmp = ca_dir / ".pebble-roots.pem.tmp"
    tmp.write_bytes(pem)
    os.chmod(tmp, 0o644)
    os.replace(tmp, ca_dir / "pebble-roots.pem")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--ca-dir", type=Path, required=True)
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--uid", type=int, default=10000)
    p.add_argument("--gid", type=int, default=10000)
    p.add_argument("--ca-only", action="store_true", help="only make the demo CA")
    p.add_argument("--pebble-roots", default="https://pebble:15000/roots/0")
    a = p.parse_args()
    make_ca(a.ca_dir)
    if a.ca_only:
        return 0
    fetch_roots(a.pebble_roots, a.ca_dir)
    # The config must load, and generate_key needs the key directory to exist.
    raw = tomllib.loads(a.config.read_text())
    for cert in raw.get("certificates", []):
        key_dir = Path(cert["key"]).parent
        key_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chown(key_dir, a.uid, a.gid)
    cfg = load_config(a.config)
    cfg.haproxy.cert_dir.mkdir(parents=True, exist_ok=True)
    os.chown(cfg.haproxy.cert_dir, a.uid, a.gid)
    # As the agent's user, so every file it writes is the agent's.
    r = subprocess.run(
        ["haproxy-acme-agent", "haproxy-config", "-c", str(a.config), "--bootstrap"],
        user=a.uid,
        group=a.gid,
        extra_groups=[],
        check=False,
    )
    return r.returncode


if __name__ == "__main__":
    sys.exit(main())
