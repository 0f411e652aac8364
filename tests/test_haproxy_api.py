"""Unit tests for the runtime API client: framing, reply parsing, size checks, errors.

The fake server here only replays replies recorded from HAProxy 2.6.12/2.8.25;
the real HAProxy is exercised in tests/integration/test_deploy_haproxy.py.
"""

from __future__ import annotations

import contextlib
import datetime
import random
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.haproxy_api import (
    CertInfo,
    CertSummary,
    CommandFailed,
    HAProxyConnectionError,
    HAProxyError,
    HAProxyTimeout,
    PayloadTooLarge,
    RuntimeAPI,
    Session,
    cert_info_or_none,
    cert_summary_or_none,
    check_arg,
    frame_command,
    parse_address,
    parse_cert_info,
    parse_cert_list,
    parse_cert_summary,
    parse_crt_list,
    parse_info,
    parse_pool_bufsize,
    strip_blank_lines,
)

# HAProxy 2.6 ends two of these lines with a space (kept via {trailing}).
SHOW_CERT_26 = """Filename: /etc/haproxy/certs/a.pem
Status: Used
Serial: 55F0B37F027975FD1D6D4C1E4E48C87CC101C407
notBefore: Nov 26 20:15:16 2026 GMT
notAfter: Nov  8 20:20:16 2027 GMT
Subject Alternative Name: DNS:a.example, DNS:www.a.example, {trailing}
Algorithm: EC256
SHA1 FingerPrint: 81B215DD1D9F6C9299FD7F7E7959DC80CFB512B0
Subject: /CN=a.example
Issuer: /CN=test CA
Chain Subject: /CN=intermediate
Chain Issuer: /CN=test CA
Chain Subject: /CN=test CA
Chain Issuer: /CN=test CA
OCSP Response Key: {trailing}

""".format(trailing="")

PEM = (
    b"-----BEGIN CERTIFICATE-----\nAAAA\n\n-----END CERTIFICATE-----\n\n\r\n"
    b"-----BEGIN PRIVATE KEY-----\nBBBB\n-----END PRIVATE KEY-----\n\n"
)

Handler = Callable[[bytes], bytes | None]


Behaviour = Callable[[socket.socket, threading.Event], None]


class ScriptedPeer:
    """A unix-socket server running `behave(conn, stopped)` on each connection
    (one at a time), standing in for HAProxy in prompt mode."""

    def __init__(self, path: Path, behave: Behaviour) -> None:
        self.path = path
        self.behave = behave
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.sock.settimeout(0.1)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                with contextlib.suppress(OSError):
                    self.behave(conn, self.stopped)

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(5)
        self.sock.close()


class FakeCLI(ScriptedPeer):
    """A unix-socket server that answers each connection once, like HAProxy's
    non-interactive CLI: read one command (to the empty line for `<<`), reply, close.

    `handler(request) -> reply` (None: never answer, to test timeouts).
    """

    def __init__(self, path: Path, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[bytes] = []
        super().__init__(path, self._answer_once)

    def _answer_once(self, conn: socket.socket, stopped: threading.Event) -> None:
        data = b""
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
            first, _, _ = data.partition(b"\n")
            end = b"\n\n" if first.endswith(b"<<") else b"\n"
            if data.endswith(end) and (end == b"\n" or data.count(b"\n") > 1):
                break
        self.requests.append(data)
        reply = self.handler(data)
        if reply is None:
            stopped.wait(2)
            return
        conn.sendall(reply)


Start = Callable[[Handler], tuple[FakeCLI, RuntimeAPI]]


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[Start]:
    servers: list[FakeCLI] = []

    def start(handler: Handler) -> tuple[FakeCLI, RuntimeAPI]:
        server = FakeCLI(tmp_path / f"admin{len(servers)}.sock", handler)
        servers.append(server)
        return server, RuntimeAPI(f"unix:{server.path}", timeout=1.0, probe_bufsize=False)

    yield start
    for server in servers:
        server.close()


# -- addresses ----------------------------------------------------------------


def test_addresses_accept_unix_bare_path_and_tcp_forms() -> None:
    assert str(parse_address("unix:/run/haproxy/admin.sock")) == "unix:/run/haproxy/admin.sock"
    assert parse_address("/run/haproxy/admin.sock").path == "/run/haproxy/admin.sock"
    tcp = parse_address("tcp:127.0.0.1:9999")
    assert (tcp.kind, tcp.host, tcp.port) == ("tcp", "127.0.0.1", 9999)
    v6 = parse_address("tcp:[::1]:9999")
    assert (v6.host, v6.port, str(v6)) == ("::1", 9999, "tcp:[::1]:9999")


@pytest.mark.parametrize(
    "bad", ["relative.sock", "unix:relative.sock", "tcp:127.0.0.1", "tcp:host:0", "http://x"]
)
def test_bad_address_is_rejected_naming_it(bad: str) -> None:
    with pytest.raises(ValueError, match=bad.replace(".", r"\.")):
        parse_address(bad)


# -- framing ------------------------------------------------------------------


def test_payload_is_framed_without_blank_lines_and_ends_with_an_empty_line() -> None:
    message = frame_command("set ssl cert /c/a.pem", PEM)
    assert message.startswith(b"set ssl cert /c/a.pem <<\n-----BEGIN CERTIFICATE-----\nAAAA\n")
    assert message.endswith(b"-----END PRIVATE KEY-----\n\n")
    body = message.split(b"<<\n", 1)[1]
    # exactly one empty line: the terminator
    assert body.count(b"\n\n") == 1
    assert b"\r" not in message


def test_plain_command_is_one_line() -> None:
    assert frame_command("show ssl cert") == b"show ssl cert\n"


def test_command_with_line_break_or_empty_payload_is_refused() -> None:
    with pytest.raises(ValueError):
        frame_command("show info\nshutdown frontend fe")
    with pytest.raises(ValueError, match="payload is empty"):
        frame_command("set ssl cert /a", b"\n\n  \n")


def test_strip_blank_lines_keeps_every_content_line() -> None:
    assert strip_blank_lines(b"a\n\n b\r\n\t\nc\n") == b"a\n b\nc"


@pytest.mark.parametrize("bad", ["/a b.pem", "/a;shutdown", "/a\n", "", "/a\x00"])
def test_unsafe_cli_arguments_are_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match="cannot be sent"):
        check_arg(bad, "certificate path")


# -- parsing ------------------------------------------------------------------


def test_show_ssl_cert_reply_is_parsed() -> None:
    info = parse_cert_info(SHOW_CERT_26)
    assert info is not None
    assert info.serial == 0x55F0B37F027975FD1D6D4C1E4E48C87CC101C407
    assert info.names == ("a.example", "www.a.example")
    assert info.status == "Used"
    assert info.not_after == datetime.datetime(2027, 11, 8, 20, 20, 16, tzinfo=datetime.UTC)
    assert info.subject == "/CN=a.example"
    assert info.chain_subjects == ("/CN=intermediate", "/CN=test CA")
    assert not info.pending


def test_pending_transaction_and_empty_store_are_recognised() -> None:
    pending = parse_cert_info("Filename: */c/a.pem\nStatus: Unused\nSerial: 0A\n\n")
    assert pending is not None and pending.pending and pending.serial == 10
    empty = parse_cert_info("Filename: /c/q.pem\nStatus: Empty\nOCSP Response Key: \n\n")
    assert empty is not None and empty.serial is None and empty.status == "Empty"
    assert parse_cert_info("Can't display the certificate: Not found!\n\n") is None


# Reply shapes `show ssl cert [*]<path>` gives (2.6 to 3.2) and odd ones a
# parser must not read differently: each field once, twice, empty, unreadable.
SUMMARY_REPLIES = (
    SHOW_CERT_26,
    SHOW_CERT_26.replace("\n", "\r\n"),
    "Filename: */c/a.pem\nStatus: Unused\nSerial: 0A\n\n",
    "Filename: /c/q.pem\nStatus: Empty\nOCSP Response Key: \n\n",
    "Can't display the certificate: Not found or the certificate is a bundle!\n",
    "No ongoing transaction!\n",
    "Unknown command\n",
    "Operations on certificates are currently locked!\n",
    "",
    "\n\n",
    "Filename: none\n\n",
    "Filename:\nStatus: Used\nSerial: 1F\n",
    "Status: Used\nSerial: 1F\n",
    "Serial: 1F\nStatus: Used\nFilename: /c/late.pem\n",
    "Filename: /c/a.pem\nFilename: /c/b.pem\nSerial: 01\nSerial: 02\nStatus: Used\n",
    "Filename: /c/a.pem\nStatus: Used\nSerial: \n",
    "Filename: /c/a.pem\nStatus: Used\nSerial: zz\n",
    "Filename: /c/a.pem\nStatus: Used\nSerial: 0x1F\n",
    "  Filename :  /c/a.pem  \n Status :Used\nSerial:1f\n",
    "Filename /c/a.pem\nStatus: Used\nSerial: 1F\n",
    "Chain Subject: /CN=x\nFilename: /c/a.pem\nChain Subject: /CN=y\nSerial: 1F\n",
    "Filename: /c/a:b.pem\nStatus: Used: really\nSerial: 1F:2\n",
    "Filename: /c/a.pem\x0bStatus: Used\x1cSerial: 1F\u2028\n",
)


def _summary_of(info: CertInfo | CertSummary | None) -> tuple[str, str, int | None] | None:
    if info is None:
        return None
    return (info.filename, info.status, info.serial)


def test_summary_reads_filename_status_and_serial_as_the_full_parser_does() -> None:
    for reply in SUMMARY_REPLIES:
        assert _summary_of(parse_cert_summary(reply)) == _summary_of(parse_cert_info(reply)), reply
    summary = parse_cert_summary(SHOW_CERT_26)
    serial = 0x55F0B37F027975FD1D6D4C1E4E48C87CC101C407
    assert summary == ("/etc/haproxy/certs/a.pem", "Used", serial)
    empty = parse_cert_summary("Filename: /c/q.pem\nStatus: Empty\n\n")
    assert empty == ("/c/q.pem", "Empty", None)
    assert parse_cert_summary("No ongoing transaction!\n") is None


def test_summary_agrees_with_the_full_parser_on_shuffled_and_repeated_lines() -> None:
    pieces = [
        "Filename: /c/a.pem", "Filename: */c/a.pem", "Filename:", "Filename", "Status: Used",
        "Status: Unused", "Status:", "Serial: 0A", "Serial: 1f2e", "Serial:", "Serial: -3",
        "Serial: 1_0", "Serial: g", "notBefore: Nov 26 20:15:16 2026 GMT", "Chain Subject: /CN=x",
        "Subject Alternative Name: DNS:a, DNS:b, ", " Serial : 5 ", "", "garbage", "Status",
    ]  # fmt: skip
    rng = random.Random(20260)
    for _ in range(3000):
        lines = rng.choices(pieces, k=rng.randrange(0, 9))
        reply = rng.choice(("\n", "\r\n")).join(lines) + rng.choice(("", "\n", "\n\n"))
        assert _summary_of(parse_cert_summary(reply)) == _summary_of(parse_cert_info(reply)), reply


def test_summary_or_none_keeps_the_full_helper_s_verdicts() -> None:
    for reply in SUMMARY_REPLIES:
        try:
            want: object = _summary_of(cert_info_or_none("unix:/s", "show ssl cert /c/x", reply))
        except CommandFailed as exc:
            want = ("raised", str(exc))
        try:
            got: object = _summary_of(cert_summary_or_none("unix:/s", "show ssl cert /c/x", reply))
        except CommandFailed as exc:
            got = ("raised", str(exc))
        assert got == want, reply
    with pytest.raises(CommandFailed, match=r"unix:/s.*show ssl cert \*/c/a\.pem.*Unknown command"):
        cert_summary_or_none("unix:/s", "show ssl cert */c/a.pem", "Unknown command\n")
    assert cert_summary_or_none("unix:/s", "show ssl cert */c/a", "No ongoing transaction!") is None


def test_cert_list_separates_transactions_from_files() -> None:
    listing = parse_cert_list("# transaction\n*/c/a.pem\n# filename\n/c/a.pem\n/c/b.pem\n\n")
    assert listing.transactions == ("/c/a.pem",)
    assert listing.certificates == ("/c/a.pem", "/c/b.pem")
    assert parse_cert_list("# filename\n/c/a.pem\n\n").transactions == ()


def test_crt_list_entries_with_line_numbers_options_and_filters() -> None:
    reply = "# /l.txt\n/c/a.pem:1\n/c/b.pem:2\n/c/c.pem:3 [alpn h2 ] c.example !d.example\n\n"
    entries = parse_crt_list(reply)
    assert [e.path for e in entries] == ["/c/a.pem", "/c/b.pem", "/c/c.pem"]
    assert entries[2].line == 3
    assert entries[2].options == "alpn h2"
    assert entries[2].filters == ("c.example", "!d.example")


def test_show_info_gives_pid_and_start_time() -> None:
    info = parse_info("Name: HAProxy\nVersion: 2.8.25\nPid: 6421\nStart_time_sec: 1795724562\n")
    assert info is not None and (info.pid, info.start_time) == (6421, 1795724562)
    assert parse_info("Unknown command\n") is None


# -- the client against a fake socket -------------------------------------------


def test_client_reads_reply_to_eof_and_sends_payload_framing(fake: Start) -> None:
    server, api = fake(lambda req: b"Transaction created for certificate /c/a.pem!\n\n")
    assert api.set_cert("/c/a.pem", PEM) == "/c/a.pem"
    request = server.requests[0]
    assert request.startswith(b"set ssl cert /c/a.pem <<\n")
    assert request.endswith(b"\n\n") and b"\n\n" not in request[:-2]


def test_merged_transaction_reports_the_other_path(fake: Start) -> None:
    # HAProxy 2.6: a `set` for b.pem while a.pem's transaction is open updates a.pem's.
    _, api = fake(lambda req: b"Transaction updated for certificate /c/a.pem!\n\n")
    assert api.set_cert("/c/b.pem", PEM) == "/c/a.pem"


def test_commit_failure_raises_with_instance_command_and_reply(fake: Start) -> None:
    reply = (
        b"inconsistencies between private key and certificate loaded '/c/a.pem'.\n"
        b"Can't commit /c/a.pem!\n\n"
    )
    _, api = fake(lambda req: reply)
    with pytest.raises(CommandFailed) as caught:
        api.commit_cert("/c/a.pem")
    err = caught.value
    assert err.instance == api.name and err.command == "commit ssl cert /c/a.pem"
    assert "inconsistencies" in str(err) and api.name in str(err)


def test_abort_without_transaction_returns_false(fake: Start) -> None:
    _, api = fake(lambda req: b"No ongoing transaction!\n\n")
    assert api.abort_cert("/c/a.pem") is False


def test_show_cert_of_unknown_path_is_none(fake: Start) -> None:
    server, api = fake(
        lambda req: b"Can't display the certificate: Not found or the certificate is a bundle!\n\n"
    )
    assert api.show_cert("/c/zz.pem", pending=True) is None
    assert server.requests == [b"show ssl cert */c/zz.pem\n"]


def test_crt_list_addition_uses_payload_form_only_with_options(fake: Start) -> None:
    server, api = fake(
        lambda req: b"Inserting certificate '/c/a.pem' in crt-list '/l'.\nSuccess!\n\n"
    )
    api.add_crt_list("/l", "/c/a.pem")
    api.add_crt_list("/l", "/c/a.pem", options="alpn h2", filters=["a.example", "!b.example"])
    assert server.requests[0] == b"add ssl crt-list /l /c/a.pem\n"
    assert (
        server.requests[1] == b"add ssl crt-list /l <<\n/c/a.pem [alpn h2] a.example !b.example\n\n"
    )


def test_oversize_payload_is_refused_before_sending(fake: Start) -> None:
    server, api = fake(lambda req: b"Transaction created for certificate /c/a.pem!\n\n")
    big = (
        b"-----BEGIN CERTIFICATE-----\n"
        + (b"A" * 64 + b"\n") * 300
        + b"-----END CERTIFICATE-----\n"
    )
    with pytest.raises(PayloadTooLarge, match=r"raise `tune.bufsize`") as caught:
        api.set_cert("/c/a.pem", big)
    assert caught.value.size > 16384 and caught.value.bufsize == 16384
    assert server.requests == []


def test_message_of_exactly_bufsize_bytes_is_refused(fake: Start) -> None:
    # HAProxy 2.6/2.8 spin and abort on a command of exactly tune.bufsize bytes.
    server, api = fake(lambda req: b"Transaction created for certificate /c/a.pem!\n\n")
    api.bufsize = 2048
    head = b"set ssl cert /c/a.pem <<\n"
    line = b"A" * (2048 - len(head) - 2)
    assert len(frame_command("set ssl cert /c/a.pem", line)) == 2048
    with pytest.raises(PayloadTooLarge):
        api.set_cert("/c/a.pem", line)
    api.set_cert("/c/a.pem", line[:-1])
    assert len(server.requests) == 1


def test_empty_reply_to_payload_means_haproxy_bufsize_is_smaller(fake: Start) -> None:
    _, api = fake(lambda req: b"")
    with pytest.raises(PayloadTooLarge, match=r"tune\.bufsize"):
        api.set_cert("/c/a.pem", PEM)


def test_haproxy_28_too_big_message_is_a_payload_error(fake: Start) -> None:
    _, api = fake(
        lambda req: (
            b"The command is too big for the buffer size. Please change tune.bufsize "
            b"in the configuration to use a bigger command.\n\n"
        )
    )
    with pytest.raises(PayloadTooLarge):
        api.set_cert("/c/a.pem", PEM)


def test_silent_server_times_out(fake: Start) -> None:
    _, api = fake(lambda req: None)
    api.timeout = 0.3
    with pytest.raises(HAProxyTimeout, match=r"within 0\.3 s"):
        api.show_cert("/c/a.pem")


def test_unreachable_socket_is_a_connection_error_naming_the_instance(tmp_path: Path) -> None:
    api = RuntimeAPI(f"unix:{tmp_path}/nothing.sock", timeout=0.5)
    with pytest.raises(HAProxyConnectionError) as caught:
        api.list_certs()
    assert str(tmp_path) in str(caught.value) and "show ssl cert" in str(caught.value)
    assert isinstance(caught.value, HAProxyError)


def test_tcp_address_works(fake: Start) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(1024)
            conn.sendall(b"# filename\n/c/a.pem\n\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        api = RuntimeAPI(f"tcp:127.0.0.1:{port}", timeout=2)
        assert api.list_certs().certificates == ("/c/a.pem",)
    finally:
        thread.join(5)
        listener.close()


def test_error_message_shows_empty_reply_explicitly() -> None:
    err = HAProxyError("unix:/s", "commit ssl cert /a", "")
    assert "(empty reply)" in str(err)


def test_locked_certificate_operations_are_retried(fake: Start) -> None:
    replies = [
        b"Can't show!\nOperations on certificates are currently locked!\n\n",
        b"Can't show!\nOperations on certificates are currently locked!\n\n",
        SHOW_CERT_26.encode(),
    ]
    server, api = fake(lambda req: replies.pop(0))
    info = api.show_cert("/etc/haproxy/certs/a.pem")
    assert info is not None and info.status == "Used"
    assert len(server.requests) == 3


def test_lock_that_never_clears_ends_in_an_error_at_the_timeout(fake: Start) -> None:
    _, api = fake(
        lambda req: b"Can't commit!\nOperations on certificates are currently locked!\n\n"
    )
    api.timeout = 0.3
    with pytest.raises(CommandFailed, match="currently locked"):
        api.commit_cert("/c/a.pem")


def test_bufsize_is_read_from_show_pools() -> None:
    reply = "  - Pool hpack_tbl (4096 bytes) : 0 allocated\n  - Pool buffer (32768 bytes) : 2\n"
    assert parse_pool_bufsize(reply) == 32768
    assert parse_pool_bufsize("  - Pool trash (16416 bytes) : 1\n") is None


def test_payload_limit_follows_haproxy_not_the_configured_value(tmp_path: Path) -> None:
    def handler(req: bytes) -> bytes:
        if req == b"show pools\n":
            return b"Dumping pools usage.\n  - Pool buffer (2048 bytes) : 2 allocated\n\n"
        return b"Transaction created for certificate /c/a.pem!\n\n"

    server = FakeCLI(tmp_path / "admin.sock", handler)
    try:
        api = RuntimeAPI(f"unix:{server.path}", timeout=1.0)  # configured 16384
        with pytest.raises(PayloadTooLarge) as caught:
            api.set_cert("/c/a.pem", b"A" * 3000)
        assert caught.value.bufsize == 2048
        assert server.requests == [b"show pools\n"]  # probed, then refused unsent
        assert api.set_cert("/c/a.pem", b"A" * 1000) == "/c/a.pem"
        assert server.requests.count(b"show pools\n") == 1  # cached
    finally:
        server.close()


def test_payload_limit_falls_back_to_configured_value_when_not_shown(fake: Start) -> None:
    _, api = fake(lambda req: b"Unknown command\n\n")
    api.probe_bufsize = True
    api.bufsize = 4096
    assert api.payload_limit() == 4096


def _dying_cli(path: Path) -> threading.Thread:
    """A CLI that reads a whole `set ssl cert` payload, then dies: closes the
    connection without a reply and stops listening (the process is gone)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(2)
            data = b""
            while not data.endswith(b"\n\n"):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
            listener.close()
            path.unlink()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_haproxy_dying_during_set_ssl_cert_is_a_dead_connection_not_bufsize(
    tmp_path: Path,
) -> None:
    path = tmp_path / "admin.sock"
    thread = _dying_cli(path)
    api = RuntimeAPI(f"unix:{path}", timeout=1.0, probe_bufsize=False)
    with pytest.raises(HAProxyError) as caught:
        api.set_cert("/c/a.pem", PEM)
    thread.join(5)
    assert isinstance(caught.value, HAProxyConnectionError)
    assert not isinstance(caught.value, PayloadTooLarge)
    assert "bufsize" not in str(caught.value)
    assert f"unix:{path}" in str(caught.value) and "died or restarted" in str(caught.value)


def test_empty_reply_below_the_bufsize_haproxy_showed_is_a_dropped_connection(
    tmp_path: Path,
) -> None:
    def handler(req: bytes) -> bytes:
        if req == b"show pools\n":
            return b"Dumping pools usage.\n  - Pool buffer (16384 bytes) : 2 allocated\n\n"
        return b""  # alive, but closes without a word

    server = FakeCLI(tmp_path / "admin.sock", handler)
    try:
        api = RuntimeAPI(f"unix:{server.path}", timeout=1.0)
        with pytest.raises(HAProxyConnectionError) as caught:
            api.set_cert("/c/a.pem", PEM)
        assert not isinstance(caught.value, PayloadTooLarge)
        assert "16384" in str(caught.value) and "show pools" in str(caught.value)
    finally:
        server.close()


def test_bufsize_is_found_when_haproxy_merged_the_buffer_pool_into_another() -> None:
    # HAProxy 3.0.11 with tune.bufsize 65536: no "Pool buffer" line; the buffer
    # pool is merged into quic_conn_r (same size), just below trash (+32 bytes).
    reply = (
        "Dumping pools usage. Use SIGQUIT to flush them.\n"
        "  - Pool hpack_tbl (4096 bytes) : 0 allocated (0 bytes), 0 used\n"
        "  - Pool quic_conn_r (65536 bytes) : 11 allocated (720896 bytes), 11 used\n"
        "  - Pool dns_msg_buf (65544 bytes) : 0 allocated (0 bytes), 0 used\n"
        "  - Pool trash (65568 bytes) : 1 allocated (65568 bytes), 1 used\n"
        "  - Pool quic_rxbuf (262144 bytes) : 0 allocated (0 bytes), 0 used\n"
    )
    assert parse_pool_bufsize(reply) == 65536


def test_certificate_times_parse_as_strptime_would_and_bad_ones_are_none() -> None:
    import datetime

    from agent.haproxy_api import _parse_time

    for text in ("Nov 28 20:20:16 2026 GMT", "Dec  1 03:04:05 2026 GMT", "Feb 29 00:00:00 2028 GMT",
                 " Jan 31 23:59:59 2030 GMT "):  # fmt: skip
        want = datetime.datetime.strptime(text.strip(), "%b %d %H:%M:%S %Y GMT")
        assert _parse_time(text) == want.replace(tzinfo=datetime.UTC), text
    bad_times = (
        "", "Nov 28 20:20:16 2026", "Foo 28 20:20:16 2026 GMT", "Feb 30 00:00:00 2026 GMT",
        "Nov 28 25:00:00 2026 GMT", "Nov x 20:20:16 2026 GMT", "Nov 28 20:20 2026 GMT",
    )  # fmt: skip
    for bad in bad_times:
        assert _parse_time(bad) is None, bad


# -- prompt-mode sessions: replies, deadlines --------------------------------------

def _read_line(conn: socket.socket, buffered: list[bytes]) -> bytes | None:
    data = buffered.pop() if buffered else b""
    while b"\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
    line, rest = data.split(b"\n", 1)
    buffered.append(rest)
    return line


def _answering(reply_for: Callable[[str], bytes]) -> Behaviour:
    """Prompt mode: `prompt`, then each command line answered with reply_for(command)."""

    def behave(conn: socket.socket, stopped: threading.Event) -> None:
        buffered: list[bytes] = []
        while not stopped.is_set():
            line = _read_line(conn, buffered)
            if line is None:
                return
            command = line.decode()
            conn.sendall((b"" if command == "prompt" else reply_for(command)) + b"\n> ")

    return behave


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[Callable[[Behaviour], tuple[ScriptedPeer, RuntimeAPI]]]:
    peers: list[ScriptedPeer] = []

    def start(behave: Behaviour) -> tuple[ScriptedPeer, RuntimeAPI]:
        server = ScriptedPeer(tmp_path / f"prompt{len(peers)}.sock", behave)
        peers.append(server)
        return server, RuntimeAPI(f"unix:{server.path}", timeout=0.3, probe_bufsize=False)

    yield start
    for server in peers:
        server.close()


PeerStart = Callable[[Behaviour], tuple[ScriptedPeer, RuntimeAPI]]


def test_session_reads_every_pipelined_reply_in_order_even_when_split_over_reads(
    peer: PeerStart,
) -> None:
    big = b"x" * 300_000  # several recv() calls for one reply

    def reply_for(command: str) -> bytes:
        return big if command == "show big" else f"Filename: {command.split()[-1]}\n".encode()

    _, api = peer(_answering(reply_for))
    steps: list[tuple[str, bytes | None]] = [(f"show ssl cert /c/{i}", None) for i in range(150)]
    steps.insert(70, ("show big", None))
    with Session(api) as session:
        replies = session.pipeline(steps)
        assert replies[70] == big.decode()
        assert replies[:70] + replies[71:] == [f"Filename: /c/{i}\n" for i in range(150)]
        assert session.command("show ssl cert /c/again.pem") == "Filename: /c/again.pem\n"
        assert session.connections == 1


def test_session_without_a_reply_times_out_naming_the_command_and_reconnects_after(
    peer: PeerStart,
) -> None:
    def silent_after_first(conn: socket.socket, stopped: threading.Event) -> None:
        buffered: list[bytes] = []
        while (line := _read_line(conn, buffered)) is not None:
            if line == b"show ssl cert /c/hang.pem":
                while conn.recv(65536):  # never answers; done when the client hangs up
                    pass
                return
            conn.sendall(b"\n> " if line == b"prompt" else b"ok\n\n> ")

    _, api = peer(silent_after_first)
    session = Session(api)
    with pytest.raises(HAProxyTimeout, match=r"within 0\.3 s") as caught:
        session.pipeline([("show ssl cert /c/a.pem", None), ("show ssl cert /c/hang.pem", None)])
    assert caught.value.instance == api.name
    assert caught.value.command == "show ssl cert /c/hang.pem"
    assert session.command("show info") == "ok\n"
    assert session.connections == 2
    session.close()


def test_session_reply_trickling_in_without_its_end_times_out_at_the_deadline(
    peer: PeerStart,
) -> None:
    def trickle(conn: socket.socket, stopped: threading.Event) -> None:
        buffered: list[bytes] = []
        if _read_line(conn, buffered) != b"prompt":
            return
        conn.sendall(b"\n> ")
        _read_line(conn, buffered)
        for _ in range(400):  # a byte every 10 ms, never the prompt: at most 4 s
            if stopped.wait(0.01):
                return
            conn.sendall(b".")

    _, api = peer(trickle)
    with Session(api) as session, pytest.raises(HAProxyTimeout) as caught:
        session.command("show ssl cert /c/slow.pem")
    assert caught.value.command == "show ssl cert /c/slow.pem"


def test_session_peer_that_stops_reading_times_out_sending(peer: PeerStart) -> None:
    def never_reads(conn: socket.socket, stopped: threading.Event) -> None:
        stopped.wait(5)

    _, api = peer(never_reads)
    api.bufsize = 16 * 1024 * 1024
    payload = b"A" * 63 + b"\n"
    payload *= 4 * 1024 * 1024 // len(payload)  # far more than the socket buffers hold
    with Session(api) as session, pytest.raises(HAProxyTimeout, match="could not send") as caught:
        session.command("set ssl cert /c/a.pem", payload)
    assert caught.value.command == "set ssl cert /c/a.pem"
