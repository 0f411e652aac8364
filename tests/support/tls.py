"""Real TLS handshakes against a test HAProxy: which leaf does it serve for a name?"""

from __future__ import annotations

import socket
import ssl

from cryptography import x509


def served_leaf(port: int, server_name: str, host: str = "127.0.0.1") -> x509.Certificate:
    """The leaf presented for SNI `server_name` on host:port (no trust check: we compare keys
    and serials, not chains). Raises OSError/ssl.SSLError when no handshake completes."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection((host, port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    if der is None:
        raise ssl.SSLError(f"no certificate from {host}:{port} for {server_name}")
    return x509.load_der_x509_certificate(der)
