"""The deployer's TLS check (`agent.deploy.tls_leaf`) against a real TLS server
on 127.0.0.1 (the standard library's `ssl`, a different OpenSSL binding from the
check's), and how it fails: every failure is an OSError, within its timeout."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from agent.deploy import _handshake, tls_leaf
from tests.support.certs import issue_leaf, key_pem, make_ca, make_key

ACCEPT_TIMEOUT = 5.0  # s: each server thread gives up after this


@contextlib.contextmanager
def serving(handle: Callable[[socket.socket], None]) -> Iterator[str]:
    """A listener on 127.0.0.1 whose first accepted connection goes to `handle`;
    yields "127.0.0.1:PORT"."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(ACCEPT_TIMEOUT)

    def run() -> None:
        with contextlib.suppress(OSError):
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(ACCEPT_TIMEOUT)
                with contextlib.suppress(OSError):
                    handle(conn)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()
        thread.join(ACCEPT_TIMEOUT + 1)


def tls_server(tmp_path: Path, rsa_bits: int | None, seen: list[str | None]) -> tuple[
    Callable[[socket.socket], None], bytes
]:
    """A handler completing a TLS handshake with a fresh leaf (EC, or RSA of
    `rsa_bits`), recording the SNI it got into `seen`; and that leaf's DER."""
    ca = make_ca()
    key = make_key(rsa_bits)
    leaf = issue_leaf(ca, key, ["check.test"])
    cert_file, key_file = tmp_path / "leaf.pem", tmp_path / "leaf.key"
    cert_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key_pem(key))
    key_file.chmod(0o600)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    context.sni_callback = lambda sock, name, ctx: seen.append(name)  # type: ignore[assignment,misc,return-value]

    def handle(conn: socket.socket) -> None:
        with context.wrap_socket(conn, server_side=True) as tls:
            seen.append(tls.version())
            tls.recv(1)  # until the client goes away

    return handle, leaf.public_bytes(serialization.Encoding.DER)


def test_tls_check_returns_the_served_leaf_and_sends_the_sni(tmp_path: Path) -> None:
    seen: list[str | None] = []
    handle, der = tls_server(tmp_path, None, seen)
    with serving(handle) as address:
        assert tls_leaf(address, "check.test", 5.0) == der
    assert seen == ["check.test", "TLSv1.3"]


def test_tls_check_without_a_name_sends_no_sni(tmp_path: Path) -> None:
    seen: list[str | None] = []
    handle, der = tls_server(tmp_path, None, seen)
    with serving(handle) as address:
        assert tls_leaf(address, None, 5.0) == der
    assert seen == [None, "TLSv1.3"]


def test_tls_check_for_one_key_kind_speaks_tls12_with_that_kinds_ciphers(tmp_path: Path) -> None:
    seen: list[str | None] = []
    handle, der = tls_server(tmp_path, 2048, seen)
    with serving(handle) as address:
        assert tls_leaf(address, "check.test", 5.0, key_kind="rsa") == der
    assert seen == ["check.test", "TLSv1.2"]


def test_tls_check_for_ecdsa_refuses_a_server_with_only_an_rsa_key(tmp_path: Path) -> None:
    handle, _ = tls_server(tmp_path, 2048, [])
    with serving(handle) as address, pytest.raises(ssl.SSLError, match=address):
        tls_leaf(address, "check.test", 5.0, key_kind="ecdsa")


def test_tls_check_of_a_silent_server_times_out() -> None:
    def silent(conn: socket.socket) -> None:
        conn.recv(65536)  # the ClientHello, never answered
        conn.recv(1)  # until the client gives up

    with serving(silent) as address, pytest.raises(TimeoutError, match=address):
        tls_leaf(address, "check.test", 0.3)


def test_tls_check_of_a_server_that_is_not_tls_is_an_ssl_error() -> None:
    def plain(conn: socket.socket) -> None:
        conn.recv(65536)
        conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")

    with serving(plain) as address, pytest.raises(ssl.SSLError, match=address):
        tls_leaf(address, "check.test", 5.0)


def test_tls_check_of_a_server_that_hangs_up_is_an_oserror_the_deployer_reports() -> None:
    def hang_up(conn: socket.socket) -> None:
        conn.recv(65536)

    with serving(hang_up) as address:
        outcome = _handshake(address, "check.test", 5.0)
    assert isinstance(outcome, OSError)
    assert address in str(outcome)


def test_tls_check_of_a_closed_port_is_connection_refused() -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    outcome = _handshake(f"127.0.0.1:{port}", "check.test", 5.0)
    assert isinstance(outcome, ConnectionRefusedError)
