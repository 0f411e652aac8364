"""A real BIND9 (Debian's `named`) for dns-01 tests: authoritative, TSIG-signed updates.

Contract:
- `BindServer(workdir, zone="acme.test", names=(...))` writes its own
  named.conf, zone file and TSIG secret (mode 0600, base64, the format
  `[[dns]] tsig_secret_file` reads) in `workdir`, on a free 127.0.0.1 port
  (UDP and TCP), with rndc off (`controls {}`) so it holds no other port.
  The zone has an SOA, `ns.<zone>` as its NS, and an A record 127.0.0.1 for
  every name in `names` (a "*" in them gives a wildcard A record).
- Updates are allowed only signed with `key_name` (hmac-sha256), for TXT
  records anywhere in the zone (`update-policy { grant KEY zonesub TXT; }`).
- `start()` runs `named -f -c CFG` (foreground, logging to `named.log` in
  `workdir`, the update category included) and returns once the zone's SOA
  answers (at most START_TIMEOUT s); `stop()` stops it by its Popen handle.
- `.address` ("127.0.0.1:PORT"), `.secret_file`, `.txt(name)` (TXT values
  answered now, queried with dnspython), `.update_log()` (the log lines of
  applied updates), `.nsupdate_key_file` (a BIND key clause for `nsupdate -k`).
- A missing `named` raises BindError: the test fails, it is not skipped.
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import shutil
import subprocess
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import dns.exception
import dns.message
import dns.query
import dns.rdatatype

from tests.support.haproxy import free_port, stop_process

START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0
NAMED_BIN = os.environ.get("NAMED_BIN", shutil.which("named") or "/usr/sbin/named")


class BindError(RuntimeError):
    pass


class BindServer:
    """A BIND9 authoritative for one zone on 127.0.0.1; see the module docstring."""

    def __init__(
        self,
        workdir: Path,
        zone: str = "acme.test",
        names: Sequence[str] = ("acme.test", "*.acme.test"),
        key_name: str = "acme-update",
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.zone = zone
        self.port = free_port()
        self.key_name = key_name
        self.secret = base64.b64encode(secrets.token_bytes(32)).decode()
        self.secret_file = self.workdir / "tsig.secret"
        self.secret_file.write_text(self.secret + "\n")
        self.secret_file.chmod(0o600)
        self.nsupdate_key_file = self.workdir / "nsupdate.key"
        self.nsupdate_key_file.write_text(
            f'key "{key_name}" {{ algorithm hmac-sha256; secret "{self.secret}"; }};\n'
        )
        self.nsupdate_key_file.chmod(0o600)
        self.log_path = self.workdir / "named.log"
        self.conf_path = self.workdir / "named.conf"
        zone_file = self.workdir / f"{zone}.zone"
        records = "\n".join(
            f"{n.removesuffix(zone).rstrip('.') or '@'} IN A 127.0.0.1" for n in names
        )
        zone_file.write_text(
            textwrap.dedent(f"""\
                $TTL 60
                @ IN SOA ns.{zone}. hostmaster.{zone}. 1 3600 600 86400 60
                @ IN NS ns.{zone}.
                ns IN A 127.0.0.1
                """)
            + records
            + "\n"
        )
        self.conf_path.write_text(
            textwrap.dedent(f"""\
                options {{
                    directory "{self.workdir}";
                    pid-file "{self.workdir}/named.pid";
                    session-keyfile "{self.workdir}/session.key";
                    managed-keys-directory "{self.workdir}";
                    listen-on port {self.port} {{ 127.0.0.1; }};
                    listen-on-v6 {{ none; }};
                    recursion no;
                    dnssec-validation no;
                    allow-query {{ 127.0.0.1; }};
                    notify no;
                }};
                controls {{ }};
                key "{key_name}" {{ algorithm hmac-sha256; secret "{self.secret}"; }};
                logging {{
                    channel main {{ file "{self.log_path}"; severity info; print-time yes;
                                    print-category yes; }};
                    category default {{ main; }};
                    category update {{ main; }};
                    category update-security {{ main; }};
                }};
                zone "{zone}" {{
                    type primary;
                    file "{zone_file}";
                    journal "{zone_file}.jnl";
                    update-policy {{ grant {key_name} zonesub TXT; }};
                }};
                """)
        )
        self._proc: subprocess.Popen[bytes] | None = None
        self._out: object = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        out = open(self.workdir / "named.out", "ab")  # noqa: SIM115 - closed in stop()
        self._out = out
        try:
            self._proc = subprocess.Popen(
                [NAMED_BIN, "-f", "-c", str(self.conf_path), "-n", "1"],
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        except FileNotFoundError as e:
            out.close()
            raise BindError(f"{NAMED_BIN} is not installed (apt-get install bind9)") from e
        deadline = time.monotonic() + START_TIMEOUT
        last = "no attempt"
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BindError(
                    f"named exited with status {self._proc.returncode}:\n{self._logs()[-3000:]}"
                )
            try:
                q = dns.message.make_query(self.zone + ".", dns.rdatatype.SOA)
                r = dns.query.udp(q, "127.0.0.1", timeout=0.5, port=self.port)
                if r.answer:
                    return
            except (dns.exception.DNSException, OSError) as e:
                last = str(e)
            time.sleep(0.05)
        self.stop()
        raise BindError(f"named not ready after {START_TIMEOUT}s ({last}):\n{self._logs()[-3000:]}")

    def _logs(self) -> str:
        text = ""
        for name in ("named.out", "named.log"):
            with contextlib.suppress(FileNotFoundError):
                text += (self.workdir / name).read_text(errors="replace")
        return text

    def txt(self, name: str) -> set[str]:
        """TXT values BIND answers for `name` (trailing dot optional) right now."""
        q = dns.message.make_query(name.rstrip(".") + ".", dns.rdatatype.TXT)
        r = dns.query.tcp(q, "127.0.0.1", timeout=2, port=self.port)
        return {
            b"".join(rd.strings).decode()
            for rrset in r.answer
            if rrset.rdtype == dns.rdatatype.TXT
            for rd in rrset
        }

    def update_log(self) -> list[str]:
        """Log lines of updates BIND applied ("updating zone ..."), in order."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return []
        return [line for line in text.splitlines() if "updating zone" in line]

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        stop_process(proc, STOP_TIMEOUT)
        if self._out is not None:
            self._out.close()  # type: ignore[attr-defined]
            self._out = None

    def __enter__(self) -> BindServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
