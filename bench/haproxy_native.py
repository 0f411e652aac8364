"""HAProxy 3.2's own ACME client, driven for a benchmark: order N certificates, time it.

`run_native(binary, directory_url, ca_bundle, http_port, workdir, sites)`:
- writes, per site, an EXPIRED self-signed placeholder (site's stable key, site's
  names: HAProxy needs every `ssl-f-use crt` file at start, and `reuse-key on`
  keeps that key for the new certificate), a fresh ECDSA P-256 account key,
  and a config with `expose-experimental-directives`, `acme.scheduler off`
  (nothing is ordered until we ask), `httpclient.ssl.ca-file` = `ca_bundle`,
  one `acme` section and one `ssl-f-use crt FILE acme bench domains "a,b"`
  line per site; the challenge is answered by HAProxy itself from
  `map(virt@acme)` on the HTTP frontend on `http_port` (where Pebble validates);
- starts HAProxy (not timed) and waits until it listens;
- clock START: just before `acme renew FILE` for every site is sent, as one
  line of `;`-separated commands on the stats socket;
- then, every POLL_INTERVAL s, `show ssl cert FILE` for every site not done
  yet; a site is done when the serial HAProxy holds for FILE is no longer the
  placeholder's (HAProxy swaps the certificate into its store itself at the
  end of the order, so that is what it serves from then on);
- clock STOP: the poll in which the last site is seen done (so the time is
  late by at most one poll interval plus one `show ssl cert` round trip);
- afterwards (not timed) checks each site by real TLS handshakes, one per
  name: the served leaf has the serial seen above, is not the placeholder, and
  carries the site's stable key. Raises NativeFailed (with `acme status` and
  HAProxy's whole log) if any order does not finish within `timeout` s (a
  normal run takes 10-14 s; a stall seen here was Pebble's, see
  bench/issuance.py), or if any check fails.
Returns the START-STOP time in seconds.
"""

from __future__ import annotations

import datetime
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from agent import keys
from tests.support.certs import key_pem, make_key
from tests.support.haproxy import HAProxyProcess, free_port
from tests.support.tls import served_leaf

POLL_INTERVAL = 0.05  # seconds between `show ssl cert` sweeps
SOCKET_TIMEOUT = 5.0  # seconds for one stats-socket command

NATIVE_CFG = """\
global
    noreuseport
    expose-experimental-directives
    acme.scheduler off
    httpclient.ssl.ca-file "${PEBBLE_CA}"
    stats socket "${ADMIN_SOCKET}" mode 600 level admin
    log stderr format raw local0 info

acme bench
    directory "${DIRECTORY}"
    account-key "${ACCOUNT_KEY}"
    contact ops@example.com
    challenge http-01
    keytype ECDSA
    curves P-256
    reuse-key on
    map virt@acme

defaults
    mode http
    timeout connect 5s
    timeout client  30s
    timeout server  30s

frontend http
    bind "127.0.0.1:${HTTP_PORT}"
    CHALLENGE_RULE
    http-request return status 404

frontend https
    bind "127.0.0.1:${HTTPS_PORT}" ssl
    http-request return status 200 content-type text/plain string "site"
""".replace(
    # HAProxy answers http-01 itself from the tokens its ACME client puts in the map.
    "CHALLENGE_RULE",
    "http-request return status 200 content-type text/plain"
    ' lf-string "%[path,field(-1,/)].%[path,field(-1,/),map(virt@acme)]\\n"'
    " if { path_beg '/.well-known/acme-challenge/' }",
)


class NativeFailed(RuntimeError):
    """HAProxy's ACME client did not deliver every certificate; the message says which."""


@dataclass(frozen=True)
class Site:
    """One certificate to order: name, its DNS names, its stable key file."""

    name: str
    domains: list[str]
    key_path: Path


def placeholder(site: Site) -> tuple[bytes, int]:
    """(PEM bundle, serial) of an expired self-signed certificate for `site` with its key."""
    key = keys.load_private_key(site.key_path)
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, site.domains[0])])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=2))
        .not_valid_after(now - datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(d) for d in site.domains]), critical=False
        )
        .sign(key, hashes.SHA256())  # type: ignore[arg-type]
    )
    pem = cert.public_bytes(serialization.Encoding.PEM) + keys.private_key_pem(key)
    return pem, cert.serial_number


def stats_command(sock: Path, command: str) -> str:
    """Send one line to HAProxy's stats socket and read the reply to EOF."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(SOCKET_TIMEOUT)
        s.connect(str(sock))
        s.sendall(command.encode() + b"\n")
        chunks = []
        while data := s.recv(65536):
            chunks.append(data)
    return b"".join(chunks).decode(errors="replace")


def served_serials(reply: str) -> dict[str, int]:
    """{filename: serial} from the concatenated replies of several `show ssl cert FILE`."""
    out: dict[str, int] = {}
    current: str | None = None
    for line in reply.splitlines():
        if line.startswith("Filename: "):
            current = line[len("Filename: ") :].strip().lstrip("*")
        elif line.startswith("Serial: ") and current is not None:
            out[current] = int(line[len("Serial: ") :].strip(), 16)
            current = None
    return out


def run_native(
    binary: str,
    directory_url: str,
    ca_bundle: Path,
    http_port: int,
    workdir: Path,
    sites: list[Site],
    timeout: float = 120.0,
) -> float:
    """Order one certificate per site with HAProxy's own client; see the module docstring."""
    workdir.mkdir(parents=True)
    crt_dir = workdir / "certs"
    crt_dir.mkdir(mode=0o700)
    old_serial: dict[str, int] = {}
    files: dict[str, Site] = {}
    uses = []
    for site in sites:
        pem, serial = placeholder(site)
        path = crt_dir / f"{site.name}.pem"
        path.write_bytes(pem)
        path.chmod(0o600)
        old_serial[str(path)] = serial
        files[str(path)] = site
        uses.append(f'    ssl-f-use crt "{path}" acme bench domains "{",".join(site.domains)}"')
    account_key = workdir / "account.key"
    account_key.write_bytes(key_pem(make_key()))
    account_key.chmod(0o600)
    admin = workdir / "admin.sock"
    https_port = free_port()
    env = {
        "PEBBLE_CA": str(ca_bundle),
        "ADMIN_SOCKET": str(admin),
        "DIRECTORY": directory_url,
        "ACCOUNT_KEY": str(account_key),
        "HTTP_PORT": str(http_port),
        "HTTPS_PORT": str(https_port),
    }
    haproxy = HAProxyProcess(binary, NATIVE_CFG + "\n".join(uses) + "\n", env, workdir)
    with haproxy:
        t0 = time.monotonic()
        reply = stats_command(admin, "; ".join(f"acme renew {f}" for f in files))
        if "error" in reply.lower() or "unknown" in reply.lower():
            raise NativeFailed(f"acme renew refused: {reply.strip()[:2000]}")
        pending = set(files)
        new_serial: dict[str, int] = {}
        deadline = t0 + timeout
        while pending:
            if time.monotonic() > deadline:
                status = stats_command(admin, "acme status")
                raise NativeFailed(
                    f"{len(pending)} of {len(files)} certificates not served after {timeout:.0f} s "
                    f"(e.g. {sorted(pending)[0]})\nacme status:\n{status}\n"
                    f"HAProxy log:\n{haproxy.log_text()}"
                )
            time.sleep(POLL_INTERVAL)
            seen = served_serials(
                stats_command(admin, "; ".join(f"show ssl cert {f}" for f in pending))
            )
            for f, serial in seen.items():
                if f in pending and serial != old_serial[f]:
                    pending.discard(f)
                    new_serial[f] = serial
        elapsed = time.monotonic() - t0
        for f, site in files.items():
            for domain in site.domains:
                leaf = served_leaf(https_port, domain)
                what = f"haproxy-native {site.name} ({domain})"
                if leaf.serial_number != new_serial[f]:
                    raise NativeFailed(
                        f"{what}: TLS serves serial {leaf.serial_number:x}, "
                        f"HAProxy's store holds {new_serial[f]:x}"
                    )
                if not keys.same_public_key(
                    leaf.public_key(),  # type: ignore[arg-type]
                    keys.load_private_key(site.key_path),
                ):
                    raise NativeFailed(f"{what}: the certificate does not carry the site's key")
                if leaf.issuer == leaf.subject:
                    raise NativeFailed(f"{what}: still serves the self-signed placeholder")
    return elapsed
