"""A scriptable stand-in ACME server on 127.0.0.1 for UNIT tests of the client side.

Pebble 2.4 has no renewalInfo (ARI) and cannot be made to answer 503,
rateLimited or a precise number of badNonce errors, so these behaviours are
tested against this stand-in. It does not verify JWS signatures; it decodes
the payloads so tests can look at what the client sent. Integration tests use
the real Pebble (tests/support/pebble.py), never this.

Script responses per path with `server.script(path, [(status, headers, body), ...])`;
once a path's script is used up it falls back to its default answer.
`script_order(server, domain, fullchain_pem)` scripts one complete http-01 order.
"""

from __future__ import annotations

import base64
import itertools
import json
import threading
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

Reply = tuple[int, dict[str, str], Any]
# A reply header (not sent) making the stand-in send only that many bytes of the body while
# announcing its full Content-Length, then close the connection: a truncated answer.
# "drop": close the connection without any answer (the request was received).
TRUNCATE = "X-Fake-Truncate"


def problem(code: str, detail: str = "", status: int = 400) -> Reply:
    """An RFC 8555 problem document reply."""
    return (
        status,
        {"Content-Type": "application/problem+json"},
        {"type": f"urn:ietf:params:acme:error:{code}", "detail": detail or code},
    )


def _b64d(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


class FakeAcme:
    """See the module docstring. `requests` records (method, path, decoded payload)."""

    def __init__(
        self, renewal_info: bool = True, profiles: dict[str, str] | None = None,
        eab_required: bool = False,
    ) -> None:  # fmt: skip
        self.renewal_info = renewal_info
        self.profiles = profiles
        self.eab_required = eab_required
        self.requests: list[tuple[str, str, Any]] = []
        self._scripts: dict[str, list[Reply]] = defaultdict(list)
        self._lock = threading.Lock()
        self._nonce = itertools.count(1)
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _reply(self, reply: Reply, head: bool = False) -> None:
                status, headers, body = reply
                if headers.get(TRUNCATE) == "drop":  # hang up without an answer
                    self.close_connection = True
                    return
                data = b""
                if body is not None:
                    data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                headers = {"Content-Type": "application/json", **headers}
                headers.setdefault("Replay-Nonce", fake.new_nonce())
                cut = headers.pop(TRUNCATE, None)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not head:
                    # TRUNCATE: announce the whole length, send the start, hang up.
                    self.wfile.write(data if cut is None else data[: int(cut)])
                if cut is not None:
                    self.close_connection = True

            def do_HEAD(self) -> None:
                fake._record("HEAD", self.path, None)
                self._reply((200, {}, None), head=True)

            def do_GET(self) -> None:
                fake._record("GET", self.path, None)
                self._reply(fake.answer("GET", self.path, None))

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                raw = self.rfile.read(length)
                payload: Any = None
                try:
                    jws = json.loads(raw)
                    body = _b64d(jws.get("payload", ""))
                    payload = json.loads(body) if body else None
                except ValueError:
                    payload = "<not a JWS>"
                fake._record("POST", self.path, payload)
                self._reply(fake.answer("POST", self.path, payload))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self._thread: threading.Thread | None = None

    @property
    def directory_url(self) -> str:
        return self.base + "/dir"

    def new_nonce(self) -> str:
        return base64.urlsafe_b64encode(f"nonce-{next(self._nonce)}".encode()).decode().rstrip("=")

    def _record(self, method: str, path: str, payload: Any) -> None:
        with self._lock:
            self.requests.append((method, path, payload))

    def posts(self, path: str) -> list[Any]:
        """Payloads POSTed to `path`, in order."""
        with self._lock:
            return [p for m, pa, p in self.requests if m == "POST" and pa == path]

    def gets(self, prefix: str) -> list[str]:
        with self._lock:
            return [pa for m, pa, _ in self.requests if m == "GET" and pa.startswith(prefix)]

    def script(self, path: str, replies: list[Reply]) -> None:
        with self._lock:
            self._scripts[path].extend(replies)

    def answer(self, method: str, path: str, payload: Any) -> Reply:
        with self._lock:
            key = path if path in self._scripts else path.rsplit("/", 1)[0] + "/*"
            if self._scripts.get(key):
                return self._scripts[key].pop(0)
        if path == "/dir":
            d: dict[str, Any] = {
                "newNonce": self.base + "/nonce",
                "newAccount": self.base + "/acct",
                "newOrder": self.base + "/order",
                "revokeCert": self.base + "/revoke",
                "keyChange": self.base + "/key-change",
                "meta": {"termsOfService": self.base + "/tos"},
            }
            if self.renewal_info:
                d["renewalInfo"] = self.base + "/ari"
            if self.profiles is not None:
                d["meta"]["profiles"] = self.profiles
            if self.eab_required:
                d["meta"]["externalAccountRequired"] = True
            return 200, {}, d
        if path == "/nonce":
            return 200, {}, None
        if path == "/acct":
            return 201, {"Location": self.base + "/acct/1"}, {"status": "valid"}
        return problem("malformed", f"stand-in has no answer for {method} {path}", 404)

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> FakeAcme:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def script_order(fake: FakeAcme, domain: str, fullchain_pem: bytes, token: str) -> None:
    """Script one whole order for `domain` that becomes valid (the stand-in validates nothing):
    newOrder /order -> authz /authz/1 (pending, then valid) -> challenge /chall/1 ->
    finalize /finalize/1 -> certificate /cert/1 (`fullchain_pem`)."""
    b = fake.base
    ident = {"type": "dns", "value": domain}
    chall = {"type": "http-01", "url": b + "/chall/1", "token": token, "status": "pending"}
    pending = {"status": "pending", "identifier": ident, "challenges": [chall]}
    valid = {"status": "valid", "identifier": ident, "challenges": [{**chall, "status": "valid"}]}
    order = {
        "status": "pending",
        "identifiers": [ident],
        "authorizations": [b + "/authz/1"],
        "finalize": b + "/finalize/1",
    }
    fake.script("/order", [(201, {"Location": b + "/order/1"}, order)])
    fake.script("/authz/1", [(200, {}, pending), (200, {}, valid)])
    fake.script(
        "/chall/1",
        [(200, {"Link": f'<{b}/authz/1>;rel="up"'}, {**chall, "status": "processing"})],
    )
    done = {**order, "status": "valid", "certificate": b + "/cert/1"}
    fake.script("/finalize/1", [(200, {"Location": b + "/order/1"}, done)])
    fake.script("/order/1", [(200, {}, done)])
    fake.script(
        "/cert/1", [(200, {"Content-Type": "application/pem-certificate-chain"}, fullchain_pem)]
    )
