"""A backend-port http-01 responder shaped like certbot's standalone plugin.

certbot's `acme.standalone` serves challenges from the stdlib
`http.server.HTTPServer` (one thread, HTTP/1.0: one connection per request)
with a request handler that walks its set of provisioned resources for every
GET under /.well-known/acme-challenge/ and logs each request at debug level.
This reproduces that shape so the benchmark compares against the classic
"route the challenge path to a backend port" setup. It is written for the
benchmark only; the product never uses it.

    python -m bench.standalone_responder --listen 127.0.0.1:PORT --token T=KEYAUTH
"""

from __future__ import annotations

import argparse
import http.server
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any, NamedTuple

log = logging.getLogger(__name__)

CHALLENGE_ROOT = "/.well-known/acme-challenge/"


class Resource(NamedTuple):
    path: str
    validation: str


class ChallengeHandler(http.server.BaseHTTPRequestHandler):
    resources: frozenset[Resource] = frozenset()
    server_version = "standalone http-01 responder (benchmark)"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s - - %s", self.client_address[0], format % args)

    def do_GET(self) -> None:
        if self.path.startswith(CHALLENGE_ROOT):
            for resource in self.resources:
                if resource.path == self.path:
                    self.send_response(200)
                    self.end_headers()
                    self.wfile.write(resource.validation.encode())
                    return
        self.send_response(404, "Not Found")
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(b"404")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.standalone_responder")
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    parser.add_argument("--token", action="append", default=[], help="TOKEN=KEYAUTH")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    resources = set()
    for item in args.token:
        token, _, keyauth = item.partition("=")
        resources.add(Resource(CHALLENGE_ROOT + token, keyauth))
    handler = type("Handler", (ChallengeHandler,), {"resources": frozenset(resources)})
    http.server.HTTPServer.allow_reuse_address = True
    server = http.server.HTTPServer((host, int(port)), handler)
    print(f"listening on {host}:{server.server_address[1]}", flush=True)

    def shutdown(signum: int, frame: object) -> None:
        threading.Thread(target=server.shutdown).start()

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    server.serve_forever()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
