"""The SPOA's door: HELLO deadline, idle timeout on complete frames, per-peer and
global connection limits that keep room for HAProxy, throttled drop warnings.

Real sockets on 127.0.0.1 against the agent in a thread; small limits keep the
tests quick. Every loop is bounded in count and time.
"""

from __future__ import annotations

import logging
import re
import select
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from agent.challenges import MemoryChallengeRegistry
from agent.spoa import SpoaServer, SpoaThread, _DropLog
from agent.spop import Ack, FrameType, Scope, SetVar, frame_bytes
from tests.support.slow_hello import HELLO, SlowHelloFlood
from tests.support.spop_client import SpopClient

TOKEN = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA"
KEYAUTH = TOKEN + ".9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI"
ANSWER = (SetVar(Scope.TXN, "keyauth", KEYAUTH),)


@pytest.fixture
def registry() -> MemoryChallengeRegistry:
    reg = MemoryChallengeRegistry()
    reg.add(TOKEN, KEYAUTH, time.time() + 600)
    return reg


def wait_until(what: str, check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not true after {timeout} s")
        time.sleep(0.01)


def served(c: SpopClient, stream_id: int) -> bool:
    return c.ask(TOKEN, stream_id, 1) == Ack(stream_id, 1, ANSWER)


@pytest.fixture
def clients() -> Iterator[list[SpopClient]]:
    opened: list[SpopClient] = []
    yield opened
    for c in opened:
        c.close()


# --------------------------------------------------------------------------- slow-HELLO flood


def test_slow_hello_flood_leaves_room_for_haproxy_and_is_closed_by_the_hello_deadline(
    registry: MemoryChallengeRegistry,
) -> None:
    with SpoaThread(
        registry, port=0, max_connections=40, max_pending_per_peer=1000, hello_timeout=1.0
    ) as agent:
        flood = SlowHelloFlood(agent.port, count=300)
        try:
            flood.connect_all()
            for _ in range(3):
                flood.step()
                time.sleep(0.05)
            # The flood holds every slot of the cap, all of them before HELLO.
            with SpopClient(agent.port, timeout=3.0) as haproxy:
                haproxy.hello()
                assert served(haproxy, 1)
                deadline = time.monotonic() + 15
                while flood.open and time.monotonic() < deadline:
                    flood.step()
                    time.sleep(0.1)
                assert not flood.open, f"{len(flood.open)} trickling connections still open"
                assert served(haproxy, 2)  # authenticated: kept through all of it
                drops = agent.server.drops
        finally:
            flood.close()
    print(f"flood endings by status: {dict(flood.endings)}; drops: {drops}")
    assert set(flood.endings) <= {2, 13}
    assert flood.endings[2] >= 1 and drops["hello_deadline"] == flood.endings[2]
    assert drops["evicted"] >= 300 - 40
    assert drops["refused"] == 0


# --------------------------------------------------------------------------- idle timeout


def test_bytes_of_a_frame_that_never_completes_do_not_reset_the_idle_timeout(
    registry: MemoryChallengeRegistry,
) -> None:
    # A NOTIFY header declaring 1000 bytes; at most 60 of them are ever sent.
    partial = frame_bytes(FrameType.NOTIFY, b"x" * 990, 1, 1)
    with (
        SpoaThread(registry, port=0, idle_timeout=0.5) as agent,
        SpopClient(agent.port, timeout=2.0) as c,
    ):
        c.hello()
        for i in range(60):  # 6 s at most, 12 idle periods
            if select.select([c.sock], [], [], 0.1)[0]:
                break  # the agent spoke while the bytes kept coming: its DISCONNECT
            c.send_raw(partial[i : i + 1])
        else:
            pytest.fail("60 bytes of an unfinished frame kept the connection open")
        assert c.expect_disconnect().status_code == 2


def test_complete_frames_keep_a_connection_past_the_idle_timeout(
    registry: MemoryChallengeRegistry,
) -> None:
    with (
        SpoaThread(registry, port=0, idle_timeout=1.0) as agent,
        SpopClient(agent.port, timeout=2.0) as c,
    ):
        c.hello()
        for i in range(15):  # 3 s: three idle periods of NOTIFYs every 0.2 s
            assert served(c, i + 1)
            time.sleep(0.2)


def test_connection_without_hello_is_closed_at_the_hello_deadline(
    registry: MemoryChallengeRegistry,
) -> None:
    with (
        SpoaThread(registry, port=0, hello_timeout=0.3) as agent,
        SpopClient(agent.port, timeout=5.0) as c,
    ):
        c.send_raw(HELLO[:5])
        assert c.expect_disconnect().status_code == 2
        assert agent.server.drops["hello_deadline"] == 1


# --------------------------------------------------------------------------- limits


def test_new_connection_from_an_address_at_its_limit_closes_its_oldest_pending_one(
    registry: MemoryChallengeRegistry, clients: list[SpopClient]
) -> None:
    with SpoaThread(registry, port=0, max_pending_per_peer=3) as agent:
        early = [SpopClient(agent.port, timeout=2.0) for _ in range(3)]
        clients += early
        wait_until("3 connections accepted", lambda: agent.server.connection_count == 3)
        newcomer = SpopClient(agent.port, timeout=2.0)
        clients.append(newcomer)
        assert early[0].expect_disconnect().status_code == 13
        newcomer.hello()
        assert served(newcomer, 1)
        early[1].hello()  # the others were left alone
        assert served(early[1], 2)
        assert agent.server.drops["peer_limit"] == 1


def test_per_peer_limit_counts_only_connections_without_hello(
    registry: MemoryChallengeRegistry, clients: list[SpopClient]
) -> None:
    # HAProxy's connections share 127.0.0.1 with everyone else on the host.
    with SpoaThread(registry, port=0, max_pending_per_peer=2) as agent:
        haproxy: list[SpopClient] = []
        for _ in range(6):  # more than the limit, each one through HELLO
            haproxy.append(SpopClient(agent.port, timeout=2.0))
            clients.append(haproxy[-1])
            haproxy[-1].hello()
        pending = [SpopClient(agent.port, timeout=2.0) for _ in range(3)]
        clients += pending
        assert pending[0].expect_disconnect().status_code == 13
        for i, c in enumerate(haproxy):
            assert served(c, i + 1)
        assert agent.server.authenticated_count == 6
        assert agent.server.pending_count == 2


def test_at_the_cap_pending_connections_make_room_and_authenticated_ones_never_do(
    registry: MemoryChallengeRegistry, clients: list[SpopClient]
) -> None:
    with SpoaThread(registry, port=0, max_connections=4) as agent:
        haproxy = [SpopClient(agent.port, timeout=2.0) for _ in range(2)]
        clients += haproxy
        for c in haproxy:
            c.hello()
        pending = [SpopClient(agent.port, timeout=2.0) for _ in range(2)]
        clients += pending
        wait_until("4 connections accepted", lambda: agent.server.connection_count == 4)
        for oldest in pending:  # each newcomer closes the oldest pending connection
            newcomer = SpopClient(agent.port, timeout=2.0)
            clients.append(newcomer)
            assert oldest.expect_disconnect().status_code == 13
            newcomer.hello()
            haproxy.append(newcomer)
        # All 4 slots are HAProxy's now: a fifth connection is refused, nobody is dropped.
        with SpopClient(agent.port, timeout=2.0) as extra:
            assert extra.expect_disconnect().status_code == 13
        for i, c in enumerate(haproxy):
            assert served(c, i + 1)
        assert agent.server.drops["evicted"] == 2
        assert agent.server.drops["refused"] == 1


def test_invalid_door_settings_are_refused(registry: MemoryChallengeRegistry) -> None:
    for name in ("hello_timeout", "max_connections", "max_pending_per_peer", "warning_interval"):
        settings: dict[str, Any] = {name: 0}
        with pytest.raises(ValueError, match=name):
            SpoaServer(registry, **settings)


# --------------------------------------------------------------------------- warnings


def _dropped_count(message: str) -> int:
    m = re.match(r"SPOE agent: dropped (?:peer |(\d+) peers: )", message)
    assert m, message
    return int(m.group(1) or 1)


def test_malformed_peers_are_counted_in_a_few_warning_lines(
    registry: MemoryChallengeRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="agent.spoa")
    with SpoaThread(registry, port=0) as agent:
        for _ in range(50):
            with SpopClient(agent.port, timeout=2.0) as bad:
                bad.send_raw(frame_bytes(42, b""))  # unknown frame type
                assert bad.expect_disconnect().status_code == 4
        server = agent.server
    lines = [r.getMessage() for r in caplog.records if r.name == "agent.spoa"]
    print("\n".join(lines))
    assert 1 <= len(lines) <= 3
    assert sum(_dropped_count(line) for line in lines) == 50
    assert "malformed SPOP" in lines[-1]
    assert server.drops["malformed"] == 50


def test_drop_log_writes_one_line_per_kind_and_interval_with_the_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="agent.spoa")
    drops = _DropLog(interval=10.0)
    for i in range(313):
        drops.count("hello_deadline", f"127.0.0.1:{40000 + i}", "no valid HELLO within 5 s")
    drops.count("malformed", "127.0.0.1:1", "bad frame")
    assert len(caplog.records) == 2  # the first of each kind, at once
    drops.flush(time.monotonic())  # within the interval: nothing more
    assert len(caplog.records) == 2
    drops.flush(time.monotonic() + 10.0)
    assert [r.getMessage() for r in caplog.records[2:]] == [
        "SPOE agent: dropped 312 peers: HELLO deadline, in the last 10 s "
        "(latest 127.0.0.1:40312: no valid HELLO within 5 s)"
    ]
    assert drops.totals["hello_deadline"] == 313 and drops.totals["malformed"] == 1
