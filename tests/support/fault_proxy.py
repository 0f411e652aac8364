"""A fault-injecting HTTPS proxy in front of an ACME CA (Pebble), for chaos tests.

Contract:
- `FaultProxy(upstream_host, upstream_port, upstream_ca, workdir, seed=...)`
  listens on 127.0.0.1:<free port> with TLS (a throwaway CA from
  tests.support.certs; `.ca_bundle` is the PEM file the agent must trust) and
  forwards every request, re-encrypted, to the upstream (trusting
  `upstream_ca`), with the client's Host header, so the CA names the proxy in
  its URLs (any absolute URL naming the upstream is rewritten as well); a
  client given `.directory_url` stays on the proxy.
- Per request, with a `random.Random(seed)`, one fault may be injected:
  `"5xx"` (a 500/503 answer, the request never reaches the CA), `"reset"`
  (TCP RST, no answer), `"truncate"` (the CA's answer cut in the middle of its
  body, Content-Length still the full one), `"garbage"` (the CA's answer
  replaced by invalid JSON with status 200) and, for certificate downloads
  (`application/pem-certificate-chain`), `"leaf_only"` (the chain stripped,
  only the first certificate kept). `rates` maps each fault to a probability;
  `set_rates()` changes them while running (`{}`: a clean proxy).
- `rate_limit(path, times, retry_after)`: the next `times` POSTs to `path`
  (e.g. Pebble's newOrder, "/order-plz") are answered 429 rateLimited with
  `Retry-After: <retry_after>` and never reach the CA; `.rate_limited` counts them.
- `.counts` tallies the faults injected, `.requests` the requests seen,
  `.seen` each one's (method, path) in arrival order.
- `hold(prefix)`: the next request whose path starts with `prefix` waits in
  the proxy (`.held` is set when it arrived) until `release()` (forwarded then)
  or `release(drop=True)` (reset, never reaching the CA); bounded by
  HOLD_TIMEOUT s. A gate holds one request; later ones pass.
- `start()` / `stop()` run the server in a thread; stop joins it (bounded).
"""

from __future__ import annotations

import http.client
import ipaddress
import random
import re
import socket
import ssl
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType

from tests.support.certs import bundle_pem, issue_leaf, make_ca, make_key
from tests.support.haproxy import free_port

FAULTS = ("5xx", "reset", "truncate", "garbage", "leaf_only")
UPSTREAM_TIMEOUT = 30.0  # seconds per forwarded request
HOLD_TIMEOUT = 120.0  # seconds a held request waits for release() at most

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----\n?", re.S)
# Hop-by-hop headers (and the ones we recompute) are not copied from the CA's answer.
_SKIP_HEADERS = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "server",
    "date",
}


class FaultProxy:
    """See the module docstring."""

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        upstream_ca: Path,
        workdir: Path,
        *,
        seed: int = 0,
        rates: dict[str, float] | None = None,
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = free_port()
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.rng = random.Random(seed)
        self._lock = threading.Lock()
        self.rates: dict[str, float] = {}
        self.set_rates(rates or {})
        self.counts: dict[str, int] = dict.fromkeys(FAULTS, 0)
        self._limit: tuple[str, int, int] | None = None  # (path, times left, retry after s)
        self.rate_limited = 0
        self.requests = 0
        self.seen: list[tuple[str, str]] = []
        self._gate: str | None = None
        self.held = threading.Event()
        self._released = threading.Event()
        self._drop = False
        ca = make_ca("fault proxy test CA")
        key = make_key()
        leaf = issue_leaf(ca, key, ["localhost", "127.0.0.1"])
        self.ca_bundle = self.workdir / "fault-proxy-ca.pem"
        self.ca_bundle.write_bytes(ca.pem)
        server_pem = self.workdir / "fault-proxy-server.pem"
        server_pem.write_bytes(bundle_pem(leaf, key))
        self._server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._server_ctx.load_cert_chain(str(server_pem))
        self._upstream_ctx = ssl.create_default_context(cafile=str(upstream_ca))
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        up = f"{upstream_host}:{upstream_port}".encode()
        self._rewrites = [(b"https://" + up, f"https://127.0.0.1:{self.port}".encode())]
        ipaddress.ip_address(upstream_host)  # a literal: no DNS is ever involved

    @property
    def directory_url(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def set_rates(self, rates: dict[str, float]) -> None:
        unknown = set(rates) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}; known: {FAULTS}")
        with self._lock:
            self.rates = dict(rates)

    def rate_limit(self, path: str, times: int, retry_after: int) -> None:
        with self._lock:
            self._limit = (path, times, retry_after)

    def _take_rate_limit(self, method: str, path: str) -> int | None:
        """Retry-After (s) if this request is one to answer rateLimited."""
        with self._lock:
            if self._limit is None or method != "POST" or path != self._limit[0]:
                return None
            limit_path, left, retry_after = self._limit
            if left <= 0:
                return None
            self._limit = (limit_path, left - 1, retry_after)
            self.rate_limited += 1
            return retry_after

    def hold(self, prefix: str) -> None:
        with self._lock:
            self._gate = prefix
            self.held.clear()
            self._released.clear()

    def release(self, *, drop: bool = False) -> None:
        self._drop = drop
        self._released.set()

    def _take_gate(self, method: str, path: str) -> bool:
        with self._lock:
            self.seen.append((method, path))
            if self._gate is None or not path.startswith(self._gate):
                return False
            self._gate = None
        self.held.set()
        return True

    def total_faults(self) -> int:
        with self._lock:
            return sum(self.counts.values())

    def _pick(self, *, cert_download: bool) -> str | None:
        """One fault for this request (or None), from the seeded rng."""
        with self._lock:
            self.requests += 1
            for fault in FAULTS:
                if fault == "leaf_only" and not cert_download:
                    continue
                rate = self.rates.get(fault, 0.0)
                if rate and self.rng.random() < rate:
                    self.counts[fault] += 1
                    return fault
        return None

    def _rewrite(self, data: bytes) -> bytes:
        for old, new in self._rewrites:
            data = data.replace(old, new)
        return data

    def start(self) -> None:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass  # quiet: the counts tell what happened

            def _reset(self) -> None:
                # SO_LINGER 0: close() sends a RST instead of a FIN.
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                self.close_connection = True

            def _send(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)
                self.close_connection = True

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if proxy._take_gate(self.command, self.path):
                    proxy._released.wait(HOLD_TIMEOUT)
                    if proxy._drop:
                        self._reset()
                        return
                limited = proxy._take_rate_limit(self.command, self.path)
                if limited is not None:
                    problem = b'{"type":"urn:ietf:params:acme:error:rateLimited",'
                    problem += b'"detail":"fault proxy: too many new orders","status":429}'
                    self._send(
                        429,
                        [("Content-Type", "application/problem+json"),
                         ("Retry-After", str(limited))],
                        problem,
                    )  # fmt: skip
                    return
                # A pre-request fault (the CA never sees the request): 5xx or reset.
                early = proxy._pick(cert_download=False)
                if early == "5xx":
                    status = proxy.rng.choice([500, 502, 503])
                    problem = b'{"type":"urn:ietf:params:acme:error:serverInternal",'
                    problem += b'"detail":"fault proxy: injected","status":%d}' % status
                    self._send(status, [("Content-Type", "application/problem+json")], problem)
                    return
                if early == "reset":
                    self._reset()
                    return
                conn = http.client.HTTPSConnection(
                    *proxy.upstream, context=proxy._upstream_ctx, timeout=UPSTREAM_TIMEOUT
                )
                try:
                    headers = {
                        k: v
                        for k, v in self.headers.items()
                        if k.lower() not in ("connection", "content-length")
                    }
                    # The client's Host (the proxy) is passed on: Pebble builds its URLs
                    # and checks the JWS "url" against it, so both name the proxy.
                    headers.setdefault("Host", f"127.0.0.1:{proxy.port}")
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    out_headers = [
                        (k, proxy._rewrite(v.encode("latin-1")).decode("latin-1"))
                        for k, v in resp.getheaders()
                        if k.lower() not in _SKIP_HEADERS
                    ]
                    status = resp.status
                finally:
                    conn.close()
                data = proxy._rewrite(data)
                ctype = resp.getheader("Content-Type", "")
                late = None
                if early is None:
                    late = proxy._pick(cert_download="pem-certificate-chain" in ctype)
                if late == "truncate" and len(data) > 1:
                    self.send_response(status)
                    for k, v in out_headers:
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self._reset()
                    return
                if late == "garbage":
                    kept = [(k, v) for k, v in out_headers if k.lower() != "content-type"]
                    kept.append(("Content-Type", "application/json"))
                    self._send(200, kept, b'{"status": "valid", "garbage": [1, 2,')
                    return
                if late == "leaf_only":
                    first = _PEM_CERT.search(data)
                    if first is not None:
                        data = first.group(0)
                self._send(status, out_headers, data)

            def do_GET(self) -> None:
                self._forward()

            def do_POST(self) -> None:
                self._forward()

            def do_HEAD(self) -> None:
                self._forward()

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def get_request(self) -> tuple[socket.socket, object]:
                sock, addr = super().get_request()
                # The handshake runs in the handler's thread (first read), not in accept().
                sock.settimeout(UPSTREAM_TIMEOUT)
                tls = proxy._server_ctx.wrap_socket(
                    sock, server_side=True, do_handshake_on_connect=False
                )
                return tls, addr

            def handle_error(self, request: object, client_address: object) -> None:
                pass  # a client that went away (or a failed TLS handshake) is normal here

        httpd = Server(("127.0.0.1", self.port), Handler)
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
