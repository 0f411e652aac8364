"""A client for HAProxy's runtime API (the "stats socket" CLI): certificate and map commands.

HAProxy's CLI in non-interactive mode takes one command per connection and
closes the connection after its reply, so every call here is: connect, send the
command (plus a payload for `<<` commands), read to EOF. Every step has a
timeout: a client that never sends the payload's final empty line makes HAProxy
wait forever, and a hung HAProxy must not hang the agent.

The framing and the reply parsing are plain functions (`frame_command`,
`parse_cert_info`, ...) that never touch a socket; `RuntimeAPI` only moves
bytes. Replies are classified by the success text HAProxy prints (checked on
2.6.12 and 2.8.25); anything else raises `CommandFailed` with the instance,
the command and HAProxy's own words.

Payload size: HAProxy reads a whole command, payload included, into one buffer
of `tune.bufsize` bytes (16384 by default). A longer command gets an EMPTY
reply on 2.6 ("The command is too big for the buffer size" on 2.8), and one of
exactly `tune.bufsize` bytes made both versions spin and abort the process in
our tests. So the size is checked before anything is sent.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import re
import select
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

DEFAULT_BUFSIZE = 16384
DEFAULT_TIMEOUT = 5.0
PROBE_TTL = 5.0  # seconds a tune.bufsize read from `show pools` is trusted
# Replies are small except `show ssl crt-list` / `show ssl cert` on a host
# with very many certificates; the cap bounds memory if a peer misbehaves.
MAX_REPLY_BYTES = 64 * 1024 * 1024
# HAProxy's answer while another session holds the certificate lock (ckch_lock).
LOCKED_REPLY = "Operations on certificates are currently locked"

# Arguments are split on whitespace and `;` chains commands: a path holding
# either (or a control character) would make HAProxy run something else.
_UNSAFE_ARG = re.compile(r"[\s;\x00-\x1f\x7f]")


class HAProxyError(Exception):
    """A runtime API call failed. Names the instance (socket address) and the command."""

    def __init__(self, instance: str, command: str, reply: str) -> None:
        self.instance = instance
        self.command = command
        self.reply = reply
        super().__init__(self._message())

    def _message(self) -> str:
        reply = self.reply.strip().replace("\n", " | ") or "(empty reply)"
        return f"HAProxy {self.instance}: `{self.command}` failed: {reply}"


class HAProxyConnectionError(HAProxyError):
    """The socket could not be reached, or the connection broke mid-reply."""


class HAProxyTimeout(HAProxyConnectionError):
    """No complete reply within the timeout."""


class CommandFailed(HAProxyError):
    """HAProxy answered, with an error."""


class PayloadTooLarge(HAProxyError):
    """The command plus payload does not fit in HAProxy's `tune.bufsize`."""

    def __init__(self, instance: str, command: str, size: int, bufsize: int) -> None:
        self.size = size
        self.bufsize = bufsize
        super().__init__(
            instance,
            command,
            f"the command with its payload is {size} bytes but HAProxy reads at most "
            f"{bufsize - 1} (tune.bufsize {bufsize}); raise `tune.bufsize` in HAProxy's "
            f"global section (e.g. `tune.bufsize {_suggest_bufsize(size)}`) and restart "
            f"HAProxy (the agent reads the value through `show pools`; where it cannot, "
            f"also set [haproxy] bufsize)",
        )


def _suggest_bufsize(size: int) -> int:
    # Next multiple of 16 KiB with room to spare for a longer chain.
    return ((size + 4096) // 16384 + 1) * 16384


# ---------------------------------------------------------------------------
# Addresses


@dataclass(frozen=True)
class Address:
    """Where a runtime API listens: a unix socket path or a TCP host and port."""

    kind: Literal["unix", "tcp"]
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


def parse_address(text: str) -> Address:
    """Parse "unix:/path", "/abs/path" (unix) or "tcp:host:port" ("tcp:[::1]:9999").

    Raises ValueError naming the bad value.
    """
    value = text.strip()
    if value.startswith("unix:"):
        path = value[len("unix:") :]
        if not path.startswith("/"):
            raise ValueError(f"runtime API address {text!r}: a unix socket path must be absolute")
        return Address("unix", path=path)
    if value.startswith("/"):
        return Address("unix", path=value)
    if value.startswith("tcp:"):
        rest = value[len("tcp:") :]
        match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]]+):(\d+)", rest)
        if not match:
            raise ValueError(
                f"runtime API address {text!r}: expected tcp:HOST:PORT (IPv6 as tcp:[::1]:PORT)"
            )
        host = match.group(1) or match.group(3)
        port = int(match.group(2) or match.group(4))
        if not 0 < port < 65536:
            raise ValueError(f"runtime API address {text!r}: port out of range")
        return Address("tcp", host=host, port=port)
    raise ValueError(
        f"runtime API address {text!r}: expected unix:/path, an absolute path or tcp:HOST:PORT"
    )


# ---------------------------------------------------------------------------
# Framing (no I/O)


def check_arg(value: str, what: str = "argument") -> str:
    """Return `value` if it is safe as one CLI argument; raise ValueError otherwise."""
    if not value or _UNSAFE_ARG.search(value):
        raise ValueError(
            f"{what} {value!r} cannot be sent to HAProxy's CLI: it is empty or contains "
            "whitespace, ';' or a control character"
        )
    return value


# A map key is an ACME token (base64url); its value a key authorization,
# token "." base64url(thumbprint). Both go on the CLI as plain words.
_MAP_KEY = re.compile(r"[A-Za-z0-9_-]{1,255}")
_KEY_AUTHORIZATION = re.compile(r"([A-Za-z0-9_-]{1,255})\.[A-Za-z0-9_-]{1,128}")
# Also no ',', '(', ')', quotes or '\\': the name goes into `map(<name>)` in haproxy.cfg.
_MAP_NAME = re.compile(r"virt@[A-Za-z0-9._-]{1,100}|/[^\s;\x00-\x1f\x7f#,()\"'\\]{1,4000}")


def check_map_name(name: str) -> str:
    """Return `name` if it is a map HAProxy can be asked about: "virt@NAME" or an
    absolute file path without whitespace, control characters or any of ;#,()"'\\."""
    if _MAP_NAME.fullmatch(name) is None:
        raise ValueError(
            f"map {name!r} is not virt@NAME (letters, digits, '.', '_', '-') or an absolute "
            "file path without whitespace, control characters or any of ;#,()\"'\\"
        )
    return name


def check_map_token(token: str) -> str:
    """Return `token` if it is base64url (an ACME http-01 token); raise ValueError."""
    if _MAP_KEY.fullmatch(token) is None:
        raise ValueError(f"map key {token[:40]!r} is not an ACME token (base64url, 1-255 chars)")
    return token


def check_key_authorization(token: str, key_authorization: str) -> str:
    """Return `key_authorization` if it is `token`.base64url; raise ValueError."""
    match = _KEY_AUTHORIZATION.fullmatch(key_authorization)
    if match is None or match.group(1) != token:
        # The value itself is never echoed: it is not secret, but it is long and noisy.
        raise ValueError(
            f"map value for {token[:40]!r} is not a key authorization <token>.<thumbprint>"
        )
    return key_authorization


def strip_blank_lines(payload: bytes) -> bytes:
    """The payload without blank lines (HAProxy ends a payload at the first empty line)."""
    lines = payload.replace(b"\r\n", b"\n").split(b"\n")
    return b"\n".join(line for line in lines if line.strip())


def frame_command(command: str, payload: bytes | None = None) -> bytes:
    """The bytes to send for `command`, with `payload` as a `<<` payload if given.

    A payload is sent as `command <<\\n` + its non-blank lines + `\\n\\n`: the
    empty line is what ends it.
    """
    if "\n" in command or "\r" in command:
        raise ValueError(f"command {command!r} contains a line break")
    if payload is None:
        return command.encode() + b"\n"
    body = strip_blank_lines(payload)
    if not body:
        raise ValueError(f"command {command!r}: the payload is empty")
    return command.encode() + b" <<\n" + body + b"\n\n"


def check_size(instance: str, command: str, message: bytes, bufsize: int) -> None:
    """Raise PayloadTooLarge unless `message` fits in HAProxy's `tune.bufsize`."""
    # A message of exactly bufsize bytes hung HAProxy 2.6 and 2.8: strictly less.
    if len(message) >= bufsize:
        raise PayloadTooLarge(instance, command, len(message), bufsize)


# ---------------------------------------------------------------------------
# Reply parsing (no I/O)


@dataclass(frozen=True)
class CertInfo:
    """What `show ssl cert <path>` reports about one certificate store.

    `serial` is None for an empty store (`new ssl cert` without a commit yet).
    `status` is HAProxy's "Used" (referenced by a bind/crt-list), "Unused" or "Empty".
    Times are UTC.
    """

    filename: str
    status: str
    serial: int | None = None
    not_before: datetime.datetime | None = None
    not_after: datetime.datetime | None = None
    subject: str = ""
    issuer: str = ""
    names: tuple[str, ...] = ()
    algorithm: str = ""
    sha1_fingerprint: str = ""
    chain_subjects: tuple[str, ...] = ()

    @property
    def pending(self) -> bool:
        """True when this describes an uncommitted transaction (`*path`)."""
        return self.filename.startswith("*")


_MONTHS = {m: i for i, m in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1)}


def _parse_time(value: str) -> datetime.datetime | None:
    # OpenSSL's ASN1_TIME_print: "Nov 28 20:20:16 2026 GMT" (day padded with a space).
    # By hand, not strptime: a batch of 1,000 parses 6,000 of these (0.2 s).
    parts = value.split()
    if len(parts) != 5 or parts[4] != "GMT" or parts[0] not in _MONTHS:
        return None
    hms = parts[2].split(":")
    if len(hms) != 3 or not all(x.isdigit() for x in (parts[1], parts[3], *hms)):
        return None
    try:
        return datetime.datetime(
            int(parts[3]), _MONTHS[parts[0]], int(parts[1]),
            int(hms[0]), int(hms[1]), int(hms[2]), tzinfo=datetime.UTC,
        )  # fmt: skip
    except ValueError:  # "Feb 30", hour 25
        return None


def _parse_names(value: str) -> tuple[str, ...]:
    # "DNS:a.example, DNS:b.example, " (2.6 prints IP entries as empty items)
    names = []
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        _, sep, name = item.partition(":")
        names.append(name.strip() if sep else item)
    return tuple(n for n in names if n)


def _parse_serial(text: str) -> int | None:
    # Hex as HAProxy prints it; empty (an empty store) or unreadable: None.
    try:
        return int(text, 16) if text else None
    except ValueError:
        return None


class CertSummary(NamedTuple):
    """The fields of a `show ssl cert <path>` reply a deploy checks: its
    `filename` ("*path" for a pending transaction), `status` and `serial`
    (None for an empty store), read exactly as `parse_cert_info` reads them."""

    filename: str
    status: str
    serial: int | None


_SUMMARY_KEYS = frozenset(("Filename", "Status", "Serial"))


def parse_cert_summary(reply: str) -> CertSummary | None:
    """Filename, Status and Serial of a `show ssl cert <path>` reply; None if it
    holds no `Filename:` line. Same answer as `parse_cert_info` for those three
    fields on every reply (first occurrence of each key wins), at a fraction of
    the cost: it stops once all three are seen (HAProxy prints them first) and
    parses no times, names or chain (a batch of 1,000 reads 3,000 replies).
    """
    found: dict[str, str] = {}
    for line in reply.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip()
        if key in _SUMMARY_KEYS and key not in found:
            found[key] = value.strip()
            if len(found) == len(_SUMMARY_KEYS):
                break
    filename = found.get("Filename")
    if filename is None:
        return None
    return CertSummary(filename, found.get("Status", ""), _parse_serial(found.get("Serial", "")))


def parse_cert_info(reply: str) -> CertInfo | None:
    """Parse a `show ssl cert <path>` reply; None if it holds no `Filename:` line."""
    fields: dict[str, str] = {}
    chain: list[str] = []
    for line in reply.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip()
        value = value.strip()
        if key == "Chain Subject":
            chain.append(value)
        elif key not in fields:
            fields[key] = value
    if "Filename" not in fields:
        return None
    return CertInfo(
        filename=fields["Filename"],
        status=fields.get("Status", ""),
        serial=_parse_serial(fields.get("Serial", "")),
        not_before=_parse_time(fields.get("notBefore", "")),
        not_after=_parse_time(fields.get("notAfter", "")),
        subject=fields.get("Subject", ""),
        issuer=fields.get("Issuer", ""),
        names=_parse_names(fields.get("Subject Alternative Name", "")),
        algorithm=fields.get("Algorithm", ""),
        sha1_fingerprint=fields.get("SHA1 FingerPrint", ""),
        chain_subjects=tuple(chain),
    )


@dataclass(frozen=True)
class CertList:
    """`show ssl cert` without an argument: open transactions and loaded certificates."""

    transactions: tuple[str, ...] = ()
    certificates: tuple[str, ...] = ()


def parse_cert_list(reply: str) -> CertList:
    """Parse the `# transaction` / `# filename` sections of `show ssl cert`."""
    section = ""
    transactions: list[str] = []
    certificates: list[str] = []
    for raw in reply.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            section = line.lstrip("# ").strip()
            continue
        if section == "transaction":
            transactions.append(line.removeprefix("*"))
        elif section == "filename":
            certificates.append(line)
    return CertList(tuple(transactions), tuple(certificates))


@dataclass(frozen=True)
class CrtListEntry:
    """One line of `show ssl crt-list -n <list>`."""

    path: str
    line: int | None = None
    options: str = ""
    filters: tuple[str, ...] = field(default_factory=tuple)


def parse_crt_list(reply: str) -> list[CrtListEntry]:
    """Parse `show ssl crt-list [-n] <list>`: `path[:line] [options] filters...`."""
    entries: list[CrtListEntry] = []
    for raw in reply.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        options = ""
        match = re.search(r"\[([^\]]*)\]", line)
        if match:
            options = " ".join(match.group(1).split())
            head = line[: match.start()].strip()
            rest = line[match.end() :].split()
        else:
            head, *rest = line.split()
        path, lineno = head, None
        number = re.fullmatch(r"(.*):(\d+)", head)
        if number:
            path, lineno = number.group(1), int(number.group(2))
        entries.append(CrtListEntry(path, lineno, options, tuple(rest)))
    return entries


def parse_crt_lists(reply: str) -> list[str]:
    """Parse `show ssl crt-list` without an argument: the names of the crt-lists."""
    return [line.strip() for line in reply.splitlines() if line.strip()]


def parse_map(reply: str) -> dict[str, str]:
    """Parse `show map <map>`: `0x<ref> <key> <value>` lines into {key: value}.

    A key listed twice (HAProxy keeps duplicates from `add map`) keeps its first
    value, the one HAProxy's exact-match lookup returns.
    """
    entries: dict[str, str] = {}
    for line in reply.splitlines():
        parts = line.split(None, 2)
        if len(parts) == 3 and parts[0].startswith("0x"):
            entries.setdefault(parts[1], parts[2].strip())
    return entries


def parse_map_list(reply: str) -> list[str]:
    """Parse `show map` (no argument): the names of the maps, as `(name)` in each line."""
    names = []
    for line in reply.splitlines():
        match = re.match(r"\s*-?\d+\s+\((.*?)\)\s", line + " ")
        if match:
            names.append(match.group(1))
    return names


_POOL_LINE = re.compile(r"Pool (\S+) \((\d+) bytes\)")
# The trash chunk is one buffer plus its `struct buffer` header: 4 words, 32
# bytes on 64-bit builds (16 on 32-bit ones).
_BUFFER_HEADER_SIZES = (32, 16)


def parse_pool_bufsize(reply: str) -> int | None:
    """tune.bufsize (bytes) from a `show pools` reply, or None if it cannot tell.

    The "buffer" pool's size is tune.bufsize. HAProxy merges pools of the
    same size, so that line may carry another pool's name (3.0 with
    tune.bufsize 65536 shows it as `quic_conn_r`): then it is the pool whose
    size is the "trash" pool's minus a `struct buffer` header.
    """
    pools = [(name, int(size)) for name, size in _POOL_LINE.findall(reply)]
    for name, size in pools:
        if name == "buffer":
            return size
    sizes = {size for _, size in pools}
    for name, trash in pools:
        if name == "trash":
            for header in _BUFFER_HEADER_SIZES:
                if trash - header in sizes:
                    return trash - header
    return None


@dataclass(frozen=True)
class ProcessInfo:
    """The identity of a running HAProxy process, from `show info`."""

    pid: int
    start_time: int
    version: str


def parse_info(reply: str) -> ProcessInfo | None:
    """Parse `show info`; None if it lacks a Pid."""
    fields = {}
    for line in reply.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    try:
        return ProcessInfo(
            pid=int(fields["Pid"]),
            start_time=int(fields.get("Start_time_sec", "0")),
            version=fields.get("Version", ""),
        )
    except (KeyError, ValueError):
        return None


# ---------------------------------------------------------------------------
# The client


class RuntimeAPI:
    """Synchronous client for one HAProxy instance. Thread-safe: every call is its
    own connection.

    `timeout` (seconds) bounds each call as a whole: connect, send and read.
    `bufsize` is HAProxy's `tune.bufsize` as configured for the agent; with
    `probe_bufsize` the real value is read from `show pools` (cached for
    PROBE_TTL seconds) and used instead whenever HAProxy shows it.
    """

    def __init__(
        self,
        address: str,
        timeout: float = DEFAULT_TIMEOUT,
        bufsize: int = DEFAULT_BUFSIZE,
        probe_bufsize: bool = True,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"HAProxy {address}: timeout must be positive, got {timeout}")
        if bufsize < 1024:
            raise ValueError(f"HAProxy {address}: bufsize {bufsize} is below HAProxy's minimum")
        self.address = parse_address(address)
        self.name = str(self.address)
        self.timeout = timeout
        self.bufsize = bufsize
        self.probe_bufsize = probe_bufsize
        self._probed: tuple[float, int | None] | None = None  # (monotonic time, value)

    def __repr__(self) -> str:
        return f"RuntimeAPI({self.name!r})"

    # -- transport ---------------------------------------------------------

    def _connect(self, deadline: float) -> socket.socket:
        remaining = max(deadline - time.monotonic(), 0.001)
        if self.address.kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(remaining)
                sock.connect(self.address.path)
            except BaseException:
                sock.close()
                raise
            return sock
        return socket.create_connection((self.address.host, self.address.port), timeout=remaining)

    def command(self, command: str, payload: bytes | None = None) -> str:
        """Send one command (with an optional `<<` payload) and return the whole reply.

        Raises HAProxyConnectionError / HAProxyTimeout on transport problems and
        PayloadTooLarge before sending anything too big. A reply saying that
        certificate operations are "currently locked" (another CLI session is
        committing) is retried until the timeout: HAProxy checks that lock
        before doing anything, so the command had no effect.
        """
        message = frame_command(command, payload)
        limit = self.bufsize
        if payload is not None:
            limit = self.payload_limit()
            check_size(self.name, command, message, limit)
        deadline = time.monotonic() + self.timeout
        delay = 0.005
        while True:
            reply = self._exchange(command, message, payload is not None, deadline, limit)
            if LOCKED_REPLY not in reply or time.monotonic() + delay >= deadline:
                return reply
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def _exchange(
        self, command: str, message: bytes, has_payload: bool, deadline: float, limit: int
    ) -> str:
        chunks: list[bytes] = []
        size = 0
        try:
            with self._connect(deadline) as sock:
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                sock.sendall(message)
                while True:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError
                    sock.settimeout(remaining)
                    data = sock.recv(65536)
                    if not data:
                        break
                    chunks.append(data)
                    size += len(data)
                    if size > MAX_REPLY_BYTES:
                        raise HAProxyConnectionError(
                            self.name, command, f"reply larger than {MAX_REPLY_BYTES} bytes"
                        )
        except TimeoutError as exc:
            raise HAProxyTimeout(
                self.name, command, f"no complete reply within {self.timeout:g} s"
            ) from exc
        except OSError as exc:
            raise HAProxyConnectionError(self.name, command, str(exc) or repr(exc)) from exc
        # 2.6 prints a NUL inside crt-list options ("[alpn h2\0]"): drop NULs.
        reply = b"".join(chunks).decode("utf-8", errors="replace").replace("\x00", "")
        if has_payload and not reply.strip():
            self._explain_empty_reply(command, len(message), limit, deadline)
        if has_payload and "too big for the buffer size" in reply:
            raise PayloadTooLarge(self.name, command, len(message), limit)
        return reply

    def _explain_empty_reply(self, command: str, size: int, limit: int, deadline: float) -> None:
        """Raise the right error for a payload command answered by a bare close.

        2.6 answers an over-size command with nothing at all, but so does a
        HAProxy that dies (or restarts) while reading it. The bufsize symptom
        needs a live process that did not tell us its own tune.bufsize (a limit
        read from `show pools` already passed our size check): anything else
        is a dead connection, never "raise tune.bufsize".
        """
        try:
            # A fresh connection: a process that is gone refuses it.
            self._exchange(
                "show info",
                b"show info\n",
                False,
                max(deadline, time.monotonic() + 1.0),
                self.bufsize,
            )
        except HAProxyConnectionError as exc:
            raise HAProxyConnectionError(
                self.name,
                command,
                "the connection closed with no reply and the instance no longer answers "
                f"({exc.reply}): HAProxy died or restarted during the command",
            ) from exc
        if self.probe_bufsize and self._probed is not None and self._probed[1] is not None:
            raise HAProxyConnectionError(
                self.name,
                command,
                f"the connection closed with no reply although the {size}-byte command fits "
                f"in HAProxy's tune.bufsize {self._probed[1]} (read from `show pools`): "
                "HAProxy dropped the connection",
            )
        raise PayloadTooLarge(self.name, command, size, limit)

    def _expect(self, command: str, reply: str, *markers: str) -> str:
        if any(marker in reply for marker in markers):
            return reply
        raise CommandFailed(self.name, command, reply)

    # -- generic -----------------------------------------------------------

    def show_info(self) -> ProcessInfo:
        """Pid and start time of the process (changes when HAProxy restarts)."""
        reply = self.command("show info")
        info = parse_info(reply)
        if info is None:
            raise CommandFailed(self.name, "show info", reply)
        return info

    def bufsize_from_pools(self) -> int | None:
        """HAProxy's buffer size read from `show pools`, or None if not shown.

        Best effort: pools of equal size may be merged under another name.
        """
        return parse_pool_bufsize(self.command("show pools"))

    def payload_limit(self) -> int:
        """The `tune.bufsize` a payload command must stay below: HAProxy's own
        (from `show pools`, cached PROBE_TTL s) if it shows it, else `bufsize`."""
        if not self.probe_bufsize:
            return self.bufsize
        now = time.monotonic()
        if self._probed is None or now - self._probed[0] > PROBE_TTL:
            try:
                value = self.bufsize_from_pools()
            except HAProxyError:
                value = None
            self._probed = (now, value)
        return self._probed[1] or self.bufsize

    # -- certificates ------------------------------------------------------

    def list_certs(self) -> CertList:
        """`show ssl cert`: loaded certificate paths and open transactions."""
        return parse_cert_list(self.command("show ssl cert"))

    def show_cert(self, path: str, pending: bool = False) -> CertInfo | None:
        """`show ssl cert [*]<path>`; None if HAProxy has no such certificate (or transaction)."""
        check_arg(path, "certificate path")
        command = f"show ssl cert {'*' if pending else ''}{path}"
        reply = self.command(command)
        info = parse_cert_info(reply)
        if info is not None:
            return info
        if "Not found" in reply or "No ongoing transaction" in reply:
            return None
        raise CommandFailed(self.name, command, reply)

    def set_cert(self, path: str, bundle: bytes) -> str:
        """`set ssl cert <path> <<bundle`: open (or update) the transaction for `path`.

        Returns the path HAProxy says the transaction is about. On 2.6 that can
        be ANOTHER path (one transaction per process, silently updated):
        callers must compare it with `path`.
        """
        check_arg(path, "certificate path")
        command = f"set ssl cert {path}"
        reply = self.command(command, bundle)
        match = re.search(r"Transaction (?:created|updated) for certificate (\S+?)!", reply)
        if not match:
            raise CommandFailed(self.name, command, reply)
        return match.group(1)

    def commit_cert(self, path: str) -> None:
        """`commit ssl cert <path>`: make the transaction live (raises if HAProxy refuses)."""
        check_arg(path, "certificate path")
        command = f"commit ssl cert {path}"
        self._expect(command, self.command(command), "Success!")

    def abort_cert(self, path: str) -> bool:
        """`abort ssl cert <path>`: drop the transaction. False if none was open."""
        check_arg(path, "certificate path")
        command = f"abort ssl cert {path}"
        reply = self.command(command)
        if "No ongoing transaction" in reply:
            return False
        self._expect(command, reply, "Transaction aborted")
        return True

    def new_cert(self, path: str) -> None:
        """`new ssl cert <path>`: create an empty certificate store."""
        check_arg(path, "certificate path")
        command = f"new ssl cert {path}"
        self._expect(command, self.command(command), "New empty certificate store")

    def del_cert(self, path: str) -> None:
        """`del ssl cert <path>` (only works once no crt-list references it)."""
        check_arg(path, "certificate path")
        command = f"del ssl cert {path}"
        self._expect(command, self.command(command), "deleted!")

    def add_crt_list(
        self,
        crt_list: str,
        path: str,
        options: str = "",
        filters: Sequence[str] = (),
    ) -> None:
        """`add ssl crt-list <list> <path>`; with `options` (e.g. "alpn h2") or SNI
        `filters` the payload form `<list> <<\\n<path> [options] filters\\n\\n` is used.
        """
        check_arg(crt_list, "crt-list")
        check_arg(path, "certificate path")
        for item in filters:
            check_arg(item, "SNI filter")
        if "]" in options or "[" in options or "\n" in options or ";" in options:
            raise ValueError(f"crt-list options {options!r} contain '[', ']', ';' or a newline")
        if not options and not filters:
            command = f"add ssl crt-list {crt_list} {path}"
            reply = self.command(command)
        else:
            command = f"add ssl crt-list {crt_list}"
            line = path
            if options.strip():
                line += f" [{options.strip()}]"
            if filters:
                line += " " + " ".join(filters)
            reply = self.command(command, line.encode())
        self._expect(command, reply, "Success!")

    def del_crt_list(self, crt_list: str, path: str) -> None:
        """`del ssl crt-list <list> <path>` (`<path>:<line>` when listed more than once)."""
        check_arg(crt_list, "crt-list")
        check_arg(path, "certificate path")
        command = f"del ssl crt-list {crt_list} {path}"
        self._expect(command, self.command(command), "deleted in crtlist")

    def show_crt_lists(self) -> list[str]:
        """`show ssl crt-list`: the names of all crt-lists."""
        return parse_crt_lists(self.command("show ssl crt-list"))

    def show_crt_list(self, crt_list: str) -> list[CrtListEntry]:
        """`show ssl crt-list -n <list>`: its entries with line numbers."""
        check_arg(crt_list, "crt-list")
        command = f"show ssl crt-list -n {crt_list}"
        reply = self.command(command)
        if not reply.lstrip().startswith("#"):
            raise CommandFailed(self.name, command, reply)
        return parse_crt_list(reply)

    # -- maps ----------------------------------------------------------------
    # HAProxy answers a successful add/set/del map with an empty reply and an
    # error with one line of text ("Unknown map identifier...", "entry not
    # found.", "Key not found."): anything but whitespace is a failure.

    def cli_level(self) -> str:
        """`show cli level`: "admin", "operator" or "user" (this socket's level)."""
        reply = self.command("show cli level").strip()
        if reply not in ("admin", "operator", "user"):
            raise CommandFailed(self.name, "show cli level", reply)
        return reply

    def list_maps(self) -> list[str]:
        """`show map`: the names of the maps this process declares."""
        reply = self.command("show map")
        if not reply.lstrip().startswith("#"):
            raise CommandFailed(self.name, "show map", reply)
        return parse_map_list(reply)

    def show_map(self, map_name: str) -> dict[str, str]:
        """`show map <map>`: its entries {key: value}; CommandFailed for an unknown map."""
        check_map_name(map_name)
        command = f"show map {map_name}"
        reply = self.command(command)
        if "Unknown map identifier" in reply:
            raise CommandFailed(self.name, command, reply)
        return parse_map(reply)

    def _map_command(self, command: str) -> str:
        reply = self.command(command)
        if reply.strip():
            raise CommandFailed(self.name, command, reply)
        return reply

    def add_map(self, map_name: str, token: str, key_authorization: str) -> None:
        """`add map <map> <token> <keyauth>` (adds a duplicate if the key is there)."""
        check_map_name(map_name)
        check_map_token(token)
        check_key_authorization(token, key_authorization)
        self._map_command(f"add map {map_name} {token} {key_authorization}")

    def set_map(self, map_name: str, token: str, key_authorization: str) -> bool:
        """`set map <map> <token> <keyauth>`; False if the map has no such key."""
        check_map_name(map_name)
        check_map_token(token)
        check_key_authorization(token, key_authorization)
        command = f"set map {map_name} {token} {key_authorization}"
        reply = self.command(command)
        if "entry not found" in reply.lower():
            return False
        if reply.strip():
            raise CommandFailed(self.name, command, reply)
        return True

    def put_map(self, map_name: str, token: str, key_authorization: str) -> None:
        """Make `token` map to `key_authorization`: `set map`, or `add map` if absent,
        so re-adding never piles up duplicates."""
        if not self.set_map(map_name, token, key_authorization):
            self.add_map(map_name, token, key_authorization)

    def del_map(self, map_name: str, token: str) -> bool:
        """`del map <map> <token>` (every entry with that key); False if there was none."""
        check_map_name(map_name)
        check_map_token(token)
        command = f"del map {map_name} {token}"
        reply = self.command(command)
        if "Key not found" in reply:
            return False
        if reply.strip():
            raise CommandFailed(self.name, command, reply)
        return True

# ---------------------------------------------------------------------------
# One prompt-mode session: many commands over one connection

PROMPT = b"\n> "
# 2.6 prints "+ " for every payload line it reads in prompt mode, before the reply.
_PAYLOAD_PROMPTS = re.compile(r"^(?:\+ )+")
_SET_REPLY = re.compile(r"Transaction (?:created|updated) for certificate (\S+?)!")
# Commands sent ahead of their replies: small enough that what HAProxy writes
# back before we read it (about 1 KB per `show ssl cert <path>`) fits in the
# socket buffers, so neither side blocks on a full buffer.
PIPELINE_WINDOW = 64


def parse_set_reply(reply: str) -> str | None:
    """The path a `set ssl cert` reply says the transaction is about (None: refused)."""
    match = _SET_REPLY.search(reply)
    return match.group(1) if match else None


class Session:
    """One connection to an instance in HAProxy's prompt mode (`prompt`, then one
    command after another; each reply ends at the next "\\n> " prompt).

    `pipeline` sends several commands before reading their replies (at most
    PIPELINE_WINDOW ahead), in order: HAProxy runs them one after the other
    in this session, so a command always sees the effect of the ones before.
    Payload rules are those of `RuntimeAPI.command`: blank lines stripped, the
    command plus payload checked against `tune.bufsize` before anything is
    sent. Every read has the API's timeout (per command, counted from when it
    was sent); a connection that dies or hangs raises HAProxyConnectionError
    / HAProxyTimeout naming the instance and the command, and the session is
    closed (a later call reconnects). Not thread-safe: one user at a time.
    """

    def __init__(self, api: RuntimeAPI) -> None:
        self.api = api
        self.name = api.name
        self._sock: socket.socket | None = None
        self._buffer = b""
        self._prompt_pending = False
        self._readable = select.poll()
        self._writable = select.poll()
        self.connections = 0  # connections opened so far (tests count them)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (HAProxy ends the session; nothing is left open
        as long as every transaction was committed or aborted)."""
        sock, self._sock = self._sock, None
        self._buffer = b""
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    def _open(self, deadline: float) -> socket.socket:
        if self._sock is not None:
            return self._sock
        try:
            sock = self.api._connect(deadline)
        except TimeoutError as exc:
            raise HAProxyTimeout(
                self.name, "prompt", f"no connection within {self.api.timeout:g} s"
            ) from exc
        except OSError as exc:
            raise HAProxyConnectionError(self.name, "prompt", str(exc) or repr(exc)) from exc
        try:
            # Non-blocking, waiting with poll() against the command's deadline:
            # the same syscalls as a timeout socket's recv (poll + recv) without
            # a settimeout (an ioctl) before every read to keep the deadline exact.
            sock.setblocking(False)
            readable = select.poll()
            readable.register(sock, select.POLLIN)
            writable = select.poll()
            writable.register(sock, select.POLLOUT)
        except BaseException:
            sock.close()
            raise
        self.connections += 1
        self._sock = sock
        self._readable = readable
        self._writable = writable
        self._buffer = b""
        # `prompt` goes out with the first commands (HAProxy switches modes before
        # reading the next line); its own empty reply is read before theirs.
        self._prompt_pending = True
        return sock

    def _send(self, sock: socket.socket, data: bytes, deadline: float) -> None:
        """All of `data` by `deadline` (monotonic s) on the non-blocking socket;
        TimeoutError if the peer stops reading, OSError from the socket."""
        view = memoryview(data)
        while view:
            try:
                view = view[sock.send(view) :]
                continue
            except BlockingIOError:
                pass  # the socket buffer is full: wait until HAProxy reads
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            self._writable.poll(math.ceil(remaining * 1000))

    def _read_reply(self, command: str, deadline: float) -> str:
        sock = self._sock
        assert sock is not None
        while True:
            end = self._buffer.find(PROMPT)
            if end >= 0:
                raw, self._buffer = self._buffer[:end], self._buffer[end + len(PROMPT) :]
                text = raw.decode("utf-8", errors="replace").replace("\x00", "")
                return _PAYLOAD_PROMPTS.sub("", text.lstrip("\n"))
            if len(self._buffer) > MAX_REPLY_BYTES:
                raise HAProxyConnectionError(
                    self.name, command, f"reply larger than {MAX_REPLY_BYTES} bytes"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise HAProxyTimeout(
                    self.name, command, f"no complete reply within {self.api.timeout:g} s"
                )
            try:
                # Rounded up to whole ms: never a busy 0 ms poll; the deadline
                # is checked again above before the next one.
                if not self._readable.poll(math.ceil(remaining * 1000)):
                    continue
                data = sock.recv(65536)
            except BlockingIOError:
                continue  # woken without data after all: wait again
            except OSError as exc:
                raise HAProxyConnectionError(self.name, command, str(exc) or repr(exc)) from exc
            if not data:
                raise HAProxyConnectionError(
                    self.name,
                    command,
                    "the connection closed in the middle of the session"
                    + (f" (partial reply {self._buffer[-200:]!r})" if self._buffer.strip() else ""),
                )
            self._buffer += data

    def pipeline(self, steps: Sequence[tuple[str, bytes | None]]) -> list[str]:
        """Run `steps` ((command, payload or None), in order) and return their replies.

        A reply saying certificate operations are "currently locked" (another
        session is committing) means that command had no effect: it and every
        later step are run again, one at a time, until the timeout. On any
        transport error the session is closed and the error raised (the steps
        not answered may or may not have run).
        """
        replies = self._run(steps)
        for i, reply in enumerate(replies):
            if LOCKED_REPLY in reply:
                return replies[:i] + [self.command(c, p) for c, p in steps[i:]]
        return replies

    def _run(self, steps: Sequence[tuple[str, bytes | None]]) -> list[str]:
        """Send `steps` (windowed) and read their replies; no lock retry."""
        messages: list[tuple[str, bytes, bool]] = []
        for command, payload in steps:
            message = frame_command(command, payload)
            if payload is not None:
                check_size(self.name, command, message, self.api.payload_limit())
            messages.append((command, message, payload is not None))
        replies: list[str] = []
        try:
            for start in range(0, len(messages), PIPELINE_WINDOW):
                window = messages[start : start + PIPELINE_WINDOW]
                deadline = time.monotonic() + self.api.timeout
                sock = self._open(deadline)
                prompt = b"prompt\n" if self._prompt_pending else b""
                try:
                    self._send(sock, prompt + b"".join(m for _, m, _ in window), deadline)
                except TimeoutError as exc:
                    raise HAProxyTimeout(
                        self.name, window[0][0], f"could not send within {self.api.timeout:g} s"
                    ) from exc
                except OSError as exc:
                    raise HAProxyConnectionError(
                        self.name, window[0][0], str(exc) or repr(exc)
                    ) from exc
                if prompt:
                    self._read_reply("prompt", deadline)  # the prompt after `prompt`
                    self._prompt_pending = False
                for command, message, has_payload in window:
                    try:
                        reply = self._read_reply(command, deadline)
                    except HAProxyTimeout:
                        raise
                    except HAProxyConnectionError:
                        if (
                            has_payload
                            and not _PAYLOAD_PROMPTS.sub(
                                "", self._buffer.decode(errors="replace")
                            ).strip()
                        ):
                            self.close()
                            # 2.6 drops an over-size command with no reply: tell
                            # that apart from a HAProxy that died.
                            limit = self.api.payload_limit()
                            self.api._explain_empty_reply(command, len(message), limit, deadline)
                        raise
                    if has_payload and "too big for the buffer size" in reply:
                        raise PayloadTooLarge(
                            self.name, command, len(message), self.api.payload_limit()
                        )
                    replies.append(reply)
        except BaseException:
            self.close()
            raise
        return replies

    def command(self, command: str, payload: bytes | None = None) -> str:
        """Run one command (retrying a "currently locked" reply until the timeout)."""
        deadline = time.monotonic() + self.api.timeout
        delay = 0.005
        while True:
            [reply] = self._run([(command, payload)])
            if LOCKED_REPLY not in reply or time.monotonic() + delay >= deadline:
                return reply
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    # -- typed helpers (each one round trip) ---------------------------------

    def list_certs(self) -> CertList:
        """`show ssl cert`: loaded certificate paths and open transactions."""
        return parse_cert_list(self.command("show ssl cert"))

    def show_certs(self, paths: Sequence[str], pending: bool = False) -> list[CertInfo | None]:
        """`show ssl cert [*]<path>` for every path, pipelined; None where HAProxy
        has no such certificate (or transaction). Raises CommandFailed on a
        reply that is neither."""
        commands = [
            f"show ssl cert {'*' if pending else ''}{check_arg(p, 'certificate path')}"
            for p in paths
        ]
        replies = self.pipeline([(c, None) for c in commands])
        return [cert_info_or_none(self.name, c, r) for c, r in zip(commands, replies, strict=True)]


def cert_info_or_none(instance: str, command: str, reply: str) -> CertInfo | None:
    """The CertInfo of a `show ssl cert` reply; None for "not found" / "no transaction";
    CommandFailed for anything else."""
    info = parse_cert_info(reply)
    if info is not None:
        return info
    _absent_or_raise(instance, command, reply)
    return None


def cert_summary_or_none(instance: str, command: str, reply: str) -> CertSummary | None:
    """`cert_info_or_none` for callers that need only filename, status and serial:
    the CertSummary of a `show ssl cert` reply; None for "not found" / "no
    transaction"; CommandFailed for anything else."""
    summary = parse_cert_summary(reply)
    if summary is not None:
        return summary
    _absent_or_raise(instance, command, reply)
    return None


def _absent_or_raise(instance: str, command: str, reply: str) -> None:
    # A reply with no Filename: HAProxy's "not found" / "no transaction", or an error.
    if "Not found" in reply or "No ongoing transaction" in reply:
        return
    raise CommandFailed(instance, command, reply)
