"""The shipped HAProxy configs with the real agent, on every tested HAProxy version.

HAProxy runs haproxy/haproxy.cfg and haproxy/spoe-acme.conf as shipped (only
`noreuseport` is prepended and a stub "site" frontend appended, which plays
the site's normal backend). Requests go over real HTTP/TLS to 127.0.0.1.
"""

from __future__ import annotations

import http.client
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from agent.challenges import MemoryChallengeRegistry
from agent.spoa import SpoaThread
from tests.support.certs import write_crt_list
from tests.support.haproxy import HAProxyProcess, free_port
from tests.support.slow_hello import SlowHelloFlood

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SHIPPED_CFG = REPO / "haproxy" / "haproxy.cfg"
SHIPPED_SPOE = REPO / "haproxy" / "spoe-acme.conf"

TOKEN = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA"
KEYAUTH = TOKEN + ".9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI"
CHALLENGE = "/.well-known/acme-challenge/"

SITE_STUB = """
# Test only: plays the site's normal backend and shows which path it got.
frontend site_stub
    bind "127.0.0.1:${SITE_PORT}"
    http-request return status 200 content-type text/plain lf-string "site:%[path]"
"""


@dataclass
class Response:
    status: int
    content_type: str
    body: str


def get(port: int, path: str, timeout: float = 5.0) -> Response:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": "example.test"})
        resp = conn.getresponse()
        return Response(resp.status, resp.getheader("content-type", ""), resp.read().decode())
    finally:
        conn.close()


class Stack:
    """HAProxy (shipped config) + the agent in a thread + call counting."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.registry = MemoryChallengeRegistry()
        self.registry.add(TOKEN, KEYAUTH, time.time() + 600)
        self.requests: list[str] = []
        self._lock = threading.Lock()
        self.spoa_port = free_port()
        self.http_port = free_port()
        self.https_port = free_port()
        site_port = free_port()
        config = "global\n    noreuseport\n\n" + SHIPPED_CFG.read_text() + SITE_STUB
        env = {
            "HAPROXY_ADMIN_SOCKET": str(workdir / "admin.sock"),
            "HTTP_BIND": f"127.0.0.1:{self.http_port}",
            "HTTPS_BIND": f"127.0.0.1:{self.https_port}",
            "SPOE_ACME_CONF": str(SHIPPED_SPOE),
            "CRT_LIST": str(write_crt_list(workdir, "example.test")),
            "SITE_ADDR": f"127.0.0.1:{site_port}",
            "SITE_PORT": str(site_port),
            "SPOA_ADDR": f"127.0.0.1:{self.spoa_port}",
        }
        self.haproxy = HAProxyProcess(binary, config, env, workdir)
        self.agent: SpoaThread | None = None

    def _count(self, result: str, seconds: float) -> None:
        with self._lock:
            self.requests.append(result)

    def start_agent(self, **settings: Any) -> None:
        """Start the agent; `settings` are SpoaServer's keyword arguments (limits)."""
        self.agent = SpoaThread(
            self.registry, port=self.spoa_port, on_request=self._count, **settings
        )
        self.agent.start()

    def stop_agent(self) -> None:
        if self.agent is not None:
            self.agent.stop()
            self.agent = None

    def server_status(self) -> str:
        """Health-check status of the agent server as HAProxy sees it (UP, DOWN, ...)."""
        for line in self.haproxy.admin_command("show stat").splitlines():
            fields = line.split(",")
            if len(fields) > 17 and fields[0] == "acme-spoa" and fields[1] == "agent1":
                return fields[17]
        raise AssertionError("acme-spoa/agent1 not in show stat")

    def wait_for(self, what: str, check: Callable[[], bool], timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.05)
        raise AssertionError(f"{what}: not true after {timeout}s\n{self.haproxy.log_text()}")


@pytest.fixture
def stack(haproxy_bin: str, tmp_path: Path) -> Iterator[Stack]:
    s = Stack(haproxy_bin, tmp_path)
    s.start_agent()
    try:
        s.haproxy.start()
        yield s
    finally:
        s.haproxy.stop()
        s.stop_agent()


def test_pending_token_is_answered_by_haproxy_with_the_key_authorization(stack: Stack) -> None:
    resp = get(stack.http_port, CHALLENGE + TOKEN)
    assert resp == Response(200, "text/plain", KEYAUTH)
    assert stack.requests == ["answered"]


def test_unknown_token_falls_through_to_the_normal_backend(stack: Stack) -> None:
    resp = get(stack.http_port, CHALLENGE + "someoneElsesToken_1")
    assert resp.status == 200
    assert resp.body == "site:" + CHALLENGE + "someoneElsesToken_1"
    assert stack.requests == ["unknown"]


def test_non_challenge_paths_never_reach_the_agent(stack: Stack) -> None:
    for path in ["/", "/index.html", CHALLENGE, CHALLENGE + "a.b", CHALLENGE + TOKEN + "/x"]:
        assert get(stack.http_port, path).body == "site:" + path
    assert get(stack.http_port, CHALLENGE + "A" * 256).body == "site:" + CHALLENGE + "A" * 256
    assert stack.requests == []


def test_token_at_the_length_limit_is_still_asked(stack: Stack) -> None:
    token = "B" * 255
    stack.registry.add(token, token + ".thumb", time.time() + 60)
    assert get(stack.http_port, CHALLENGE + token).body == token + ".thumb"


def test_agent_stopped_falls_through_without_haproxy_error(stack: Stack) -> None:
    stack.stop_agent()
    for _ in range(5):
        resp = get(stack.http_port, CHALLENGE + TOKEN)
        assert resp.status == 200
        assert resp.body == "site:" + CHALLENGE + TOKEN
    assert get(stack.http_port, "/").body == "site:/"
    assert stack.haproxy.running


def test_restarted_agent_answers_again_without_haproxy_reload(stack: Stack) -> None:
    pid = stack.haproxy.pid
    assert get(stack.http_port, CHALLENGE + TOKEN).body == KEYAUTH
    stack.stop_agent()
    assert get(stack.http_port, CHALLENGE + TOKEN).body == "site:" + CHALLENGE + TOKEN
    stack.start_agent()
    stack.wait_for(
        "restarted agent answers",
        lambda: get(stack.http_port, CHALLENGE + TOKEN).body == KEYAUTH,
    )
    assert stack.haproxy.pid == pid


def test_health_check_sees_the_agent_up(stack: Stack) -> None:
    stack.wait_for("agent1 UP", lambda: stack.server_status() == "UP")


def test_parallel_challenges_are_all_answered_correctly(stack: Stack) -> None:
    tokens = [f"tok{i:03d}" for i in range(40)]
    for t in tokens:
        stack.registry.add(t, t + ".thumb", time.time() + 60)
    wanted = [*tokens, "unknownOne", "unknownTwo"] * 5

    def fetch(token: str) -> tuple[str, str]:
        return token, get(stack.http_port, CHALLENGE + token).body

    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(fetch, wanted))
    for token, body in results:
        expected = token + ".thumb" if token in tokens else "site:" + CHALLENGE + token
        assert body == expected


def test_https_frontend_serves_the_crt_list_certificate(stack: Stack) -> None:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    conn = http.client.HTTPSConnection("127.0.0.1", stack.https_port, timeout=5, context=ctx)
    try:
        conn.request("GET", "/", headers={"Host": "example.test"})
        assert conn.getresponse().read() == b"site:/"
        assert conn.sock is not None
        der = conn.sock.getpeercert(binary_form=True)
    finally:
        conn.close()
    assert der is not None
    cert = x509.load_der_x509_certificate(der)
    assert cert.subject.rfc4514_string() == "CN=example.test"


def test_challenges_are_answered_while_a_slow_hello_flood_runs(
    haproxy_bin: str, tmp_path: Path
) -> None:
    # Small limits: 200 local peers trickling HELLO bytes (and coming back when
    # dropped) against a cap of 30, from the same 127.0.0.1 as HAProxy.
    s = Stack(haproxy_bin, tmp_path)
    s.start_agent(max_connections=30, max_pending_per_peer=20, hello_timeout=1.0)
    assert s.agent is not None
    flood = SlowHelloFlood(s.spoa_port, count=200, reconnect_per_step=20)
    flood.start(duration=30.0)
    try:
        # The flood holds the agent's slots before HAProxy opens its first SPOE connection.
        s.wait_for("flood in place", lambda: flood.steps >= 5)
        s.haproxy.start()

        def fetch(i: int) -> str:
            return get(s.http_port, CHALLENGE + TOKEN).body

        with ThreadPoolExecutor(max_workers=8) as pool:
            bodies = list(pool.map(fetch, range(40)))
        assert bodies == [KEYAUTH] * 40
        assert flood.running
        drops = s.agent.server.drops
    finally:
        flood.close()
        s.haproxy.stop()
        s.stop_agent()
    # Closed to make room (status 13), or at the HELLO deadline (status 2).
    print(f"flood endings by status: {dict(flood.endings)}; agent drops: {drops}")
    assert s.requests.count("answered") == 40
    assert set(flood.endings) <= {2, 13}


def test_shipped_configs_use_the_contract_names() -> None:
    spoe = SHIPPED_SPOE.read_text()
    assert re.search(r"^\[acme\]$", spoe, re.M)
    assert re.search(r"^spoe-message acme-challenge$", spoe, re.M)
    assert re.search(r"args token=", spoe)
    assert re.search(r"option var-prefix acme$", spoe, re.M)
    cfg = SHIPPED_CFG.read_text()
    assert "filter spoe engine acme config" in cfg
    assert "var(txn.acme.keyauth)" in cfg
    assert re.search(r"stats socket .* level admin", cfg)
    assert "crt-list" in cfg
