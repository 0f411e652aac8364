"""Start a real Pebble (Let's Encrypt's test CA) for tests and benchmarks.

Contract:
- `PebbleProcess(workdir, http_port, ...)` makes a throwaway CA and a
  localhost/127.0.0.1 server certificate for Pebble's HTTPS listener (written
  to `workdir`), picks free ports for the ACME and management listeners and for
  pebble-challtestsrv's DNS server, and writes pebble.json. `http_port` is where
  Pebble sends http-01 validation requests: HAProxy's HTTP frontend. Every name
  resolves to 127.0.0.1 through pebble-challtestsrv.
- `start()` runs pebble-challtestsrv and pebble with PEBBLE_VA_NOSLEEP=1,
  PEBBLE_AUTHZREUSE=0 (orders are validated again; Pebble still reuses a valid
  authorization 1 time in 100: its check is `rand.Intn(100) > percent`),
  PEBBLE_WFE_NONCEREJECT=`nonce_reject` (percent of POSTs rejected with
  badNonce) and never PEBBLE_VA_ALWAYS_VALID; it waits (at most START_TIMEOUT s)
  until the directory answers. `stop()` stops both by their Popen handles.
  `start()` after `stop()` reuses the same ports (a "restarted CA"; Pebble makes
  a new root and forgets all accounts and orders).
- `.directory()` (the parsed directory: "renewalInfo" in it = the CA offers ARI),
  `.directory_url`, `.ca_bundle` (a PEM file that trusts Pebble's HTTPS
  listener, for `acme.ca_bundle` / REQUESTS_CA_BUNDLE), `.root_pem()` (the
  current issuing root from the management interface, to verify chains).
- `pebble_binaries()` lists the Pebble builds the ACME tests run against, as
  (label, path): Debian's /usr/bin/pebble (2.4 on Debian 12) and the 2.10 that
  scripts/fetch_debian.sh unpacks; `PEBBLE_BINS` (colon-separated paths)
  overrides them. The label is the version (from the VERSION file setup writes
  beside an unpacked Pebble, else from the Debian package that owns the path;
  Pebble itself reports "dev"), else the path. pebble-challtestsrv is taken
  from the same directory; its DNS flag (`-dns01` up to 2.4, `-dnsserver`
  later) is chosen from its `-h` output, not from a version.
- A missing binary raises PebbleError (the test fails, it is not skipped).
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import json
import os
import re
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.support.certs import CA, make_ca, make_key
from tests.support.haproxy import free_port, stop_process

START_TIMEOUT = 15.0  # seconds until the directory must answer
STOP_TIMEOUT = 5.0

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BINARIES: list[str] = [
    "/usr/bin/pebble",  # Debian's own: 2.4 on Debian 12, 2.6 on Debian 13
    str(REPO_ROOT / ".cache" / "pebble-2.10" / "usr" / "bin" / "pebble"),
]
_MAJOR_MINOR = re.compile(r"^(?:\d+:)?(\d+\.\d+)")


def _dpkg_version(path: str) -> str | None:
    """Version of the installed Debian package that owns `path`, if any."""
    try:
        owner = subprocess.run(
            ["dpkg-query", "-S", os.path.realpath(path)],
            capture_output=True, text=True, timeout=10, check=False,
        ).stdout  # fmt: skip
        package = owner.split(":", 1)[0].strip() if ":" in owner else ""
        if not package:
            return None
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", package],
            capture_output=True, text=True, timeout=10, check=False,
        ).stdout  # fmt: skip
    except OSError:
        return None
    return out.strip() or None


def pebble_label(binary: str) -> str:
    """'2.10' for a Pebble 2.10.x build; the path when its version cannot be told."""
    unpacked = Path(binary).resolve().parents[2]  # .cache/pebble-2.10 for .../usr/bin/pebble
    version_file = unpacked / "VERSION"
    version = None
    if unpacked.name.startswith("pebble-") and version_file.is_file():
        version = version_file.read_text().strip()
    version = version or _dpkg_version(binary)
    m = _MAJOR_MINOR.match(version or "")
    return m.group(1) if m else binary


def pebble_binaries() -> list[tuple[str, str]]:
    """(label, path) of every Pebble build to test; PEBBLE_BINS overrides the defaults."""
    override = os.environ.get("PEBBLE_BINS", "")
    paths = [p for p in override.split(":") if p.strip()] or list(DEFAULT_BINARIES)
    labelled: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    for path in paths:
        label = pebble_label(path)
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:  # two builds of one version still need distinct test ids
            label = f"{label}-{seen[label]}"
        labelled.append((label, path))
    return labelled


def challtestsrv_of(pebble_binary: str) -> str:
    """pebble-challtestsrv beside `pebble_binary` (or on PATH for a bare name)."""
    if os.sep not in pebble_binary:
        return "pebble-challtestsrv"
    return str(Path(pebble_binary).with_name("pebble-challtestsrv"))


@functools.cache
def _dns_flag(challtestsrv: str) -> list[str]:
    """challtestsrv's DNS listener flag plus its other off-switches, from its `-h` text."""
    try:
        usage = subprocess.run(
            [challtestsrv, "-h"], capture_output=True, text=True, timeout=10, check=False
        )
    except OSError as e:
        raise PebbleError(f"{challtestsrv} cannot be run (apt-get install pebble): {e}") from e
    text = usage.stdout + usage.stderr
    if re.search(r"^\s+-dnsserver\b", text, re.M):  # 2.5+
        extra = ["-doh", ""] if re.search(r"^\s+-doh\b", text, re.M) else []
        return ["-dnsserver", *extra]
    return ["-dns01"]


class PebbleError(RuntimeError):
    """Pebble could not be started; the message carries its log."""


def _server_cert(ca: CA, workdir: Path) -> tuple[Path, Path]:
    """A localhost / 127.0.0.1 certificate signed by `ca` for Pebble's listeners."""
    key = make_key()
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=10))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    # HAProxy 3.2's ACME client checks the CA's name against DNS SANs only.
                    x509.DNSName("127.0.0.1"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    cert_path = workdir / "pebble-server.pem"
    key_path = workdir / "pebble-server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


class PebbleProcess:
    """A Pebble CA plus its DNS helper on 127.0.0.1; see the module docstring."""

    def __init__(
        self,
        workdir: Path,
        http_port: int,
        *,
        nonce_reject: int = 0,
        validity_period: int | None = None,
        eab_keys: dict[str, str] | None = None,
        extra_env: dict[str, str] | None = None,
        binary: str | None = None,
        dns_server: str | None = None,
        profiles: dict[str, int] | None = None,
    ) -> None:
        """`binary`: the pebble to run (default: the first of pebble_binaries()).
        `dns_server` "127.0.0.1:PORT": Pebble resolves through that server (a real BIND,
        tests/support/bind.py) and challtestsrv is not started.
        `profiles`: extra ACME profiles (name -> validity in seconds; Pebble 2.7+)."""
        self.binary = binary or pebble_binaries()[0][1]
        self.challtestsrv = challtestsrv_of(self.binary)
        self.dns_server = dns_server
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.http_port = http_port
        self.nonce_reject = nonce_reject
        self.acme_port = free_port()
        self.management_port = free_port()
        self.dns_port = free_port()
        self.cts_management_port = free_port()
        self.extra_env = dict(extra_env or {})
        self._ca = make_ca("pebble listener test CA")
        cert_path, key_path = _server_cert(self._ca, self.workdir)
        self.ca_bundle = self.workdir / "pebble-listener-ca.pem"
        self.ca_bundle.write_bytes(self._ca.pem)
        self.roots_path = self.workdir / "pebble-roots.pem"  # see roots_file()
        config: dict[str, object] = {
            "listenAddress": f"127.0.0.1:{self.acme_port}",
            "managementListenAddress": f"127.0.0.1:{self.management_port}",
            "certificate": str(cert_path),
            "privateKey": str(key_path),
            "httpPort": http_port,
            "tlsPort": free_port(),  # tls-alpn-01 is never used; keep it off well-known ports
            "ocspResponderURL": "",
            "externalAccountBindingRequired": bool(eab_keys),
        }
        if eab_keys:
            config["externalAccountMACKeys"] = eab_keys
        if validity_period is not None:
            config["certificateValidityPeriod"] = validity_period  # Pebble up to 2.6
            # Pebble 2.7+ takes the lifetime from the order's profile and ignores
            # certificateValidityPeriod (2.10 issued 90-day certificates with it
            # alone); older ones ignore the unknown "profiles" key.
            config["profiles"] = {
                "default": {
                    "description": "test profile: short-lived certificates",
                    "validityPeriod": validity_period,
                }
            }
        if profiles:
            all_profiles = dict(config.get("profiles") or {})  # type: ignore[call-overload]
            all_profiles.setdefault(
                "default", {"description": "test default", "validityPeriod": 7776000}
            )
            for pname, validity in profiles.items():
                all_profiles[pname] = {"description": f"test {pname}", "validityPeriod": validity}
            config["profiles"] = all_profiles
        self.config_path = self.workdir / "pebble.json"
        self.config_path.write_text(json.dumps({"pebble": config}, indent=2))
        self.log_path = self.workdir / "pebble.log"
        self._pebble: subprocess.Popen[bytes] | None = None
        self._cts: subprocess.Popen[bytes] | None = None
        self._logs: list[object] = []

    @property
    def directory_url(self) -> str:
        return f"https://127.0.0.1:{self.acme_port}/dir"

    @property
    def running(self) -> bool:
        return self._pebble is not None and self._pebble.poll() is None

    def _ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_bundle))

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _spawn(self, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._logs.append(log)
        try:
            return subprocess.Popen(
                argv,
                cwd=self.workdir,
                env={**os.environ, **env},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        except FileNotFoundError as e:
            raise PebbleError(
                f"{argv[0]} is not installed (apt-get install pebble; scripts/setup.sh)"
            ) from e

    def start(self) -> None:
        """Start challtestsrv and pebble; return when the directory answers."""
        if self.running:
            raise PebbleError("pebble is already running")
        try:
            dns_flag, *dns_extra = _dns_flag(self.challtestsrv)
            self._cts = None if self.dns_server else self._spawn(
                [
                    self.challtestsrv,
                    dns_flag, f"127.0.0.1:{self.dns_port}",
                    *dns_extra,
                    "-http01", "",
                    "-https01", "",
                    "-tlsalpn01", "",
                    "-management", f"127.0.0.1:{self.cts_management_port}",
                    "-defaultIPv6", "",
                    "-defaultIPv4", "127.0.0.1",
                ],
                {},
            )  # fmt: skip
            env = {
                "PEBBLE_VA_NOSLEEP": "1",
                "PEBBLE_AUTHZREUSE": "0",
                "PEBBLE_WFE_NONCEREJECT": str(self.nonce_reject),
                **self.extra_env,
            }
            env.pop("PEBBLE_VA_ALWAYS_VALID", None)
            self._pebble = self._spawn(
                [
                    self.binary,
                    "-config", str(self.config_path),
                    "-dnsserver", self.dns_server or f"127.0.0.1:{self.dns_port}",
                    "-strict=false",
                ],
                env,
            )  # fmt: skip
            self._wait_ready()
            if self.roots_path.exists():
                self.roots_file()  # a new Pebble has a new root: keep trusted_roots current
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        ctx = self._ssl_context()
        last = "no attempt"
        while time.monotonic() < deadline:
            for name, proc in (("pebble", self._pebble), ("pebble-challtestsrv", self._cts)):
                if proc is not None and proc.poll() is not None:
                    raise PebbleError(
                        f"{name} exited with status {proc.returncode}:\n{self.log_text()[-3000:]}"
                    )
            try:
                with urllib.request.urlopen(self.directory_url, context=ctx, timeout=1) as r:
                    if r.status == 200 and b"newOrder" in r.read():
                        return
            except (OSError, urllib.error.URLError) as e:
                last = str(e)
            time.sleep(0.05)
        raise PebbleError(
            f"pebble not ready after {START_TIMEOUT}s ({last}):\n{self.log_text()[-3000:]}"
        )

    def directory(self) -> dict[str, Any]:
        """The ACME directory object (2.10 lists `renewalInfo` and `meta.profiles`)."""
        with urllib.request.urlopen(
            self.directory_url, context=self._ssl_context(), timeout=5
        ) as r:
            data: dict[str, Any] = json.loads(r.read())
        return data

    def root_pem(self) -> bytes:
        """PEM of Pebble's current root (a new one at every start)."""
        url = f"https://127.0.0.1:{self.management_port}/roots/0"
        with urllib.request.urlopen(url, context=self._ssl_context(), timeout=5) as r:
            data: bytes = r.read()
        return data

    def roots_file(self) -> Path:
        """A PEM file of Pebble's current root, for `[acme] trusted_roots` (rewritten per call)."""
        self.roots_path.write_bytes(self.root_pem())
        return self.roots_path

    def stop(self) -> None:
        """Stop pebble and challtestsrv through their handles (SIGTERM, then SIGKILL)."""
        for attr in ("_pebble", "_cts"):
            proc: subprocess.Popen[bytes] | None = getattr(self, attr)
            setattr(self, attr, None)
            stop_process(proc, STOP_TIMEOUT)
        for log in self._logs:
            log.close()  # type: ignore[attr-defined]
        self._logs.clear()

    def __enter__(self) -> PebbleProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
