"""Hostile and broken peers: raw bytes to the running agent over real sockets.

Each bad connection must get AGENT-DISCONNECT with the right SPOP status code
and be closed, while a healthy connection opened before keeps being served.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import time
from collections.abc import Iterator

import pytest

from agent.challenges import MemoryChallengeRegistry
from agent.spoa import SpoaThread
from agent.spop import (
    Ack,
    FrameType,
    HaproxyHello,
    Scope,
    SetVar,
    encode_frame,
    encode_kv_list,
    encode_string,
    frame_bytes,
)
from tests.support.spop_client import SpopClient, challenge

TOKEN = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA"
KEYAUTH = TOKEN + ".9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI"
HELLO = encode_frame(HaproxyHello(("2.0",), 16380, ("pipelining",)))


@pytest.fixture(scope="module")
def agent() -> Iterator[SpoaThread]:
    reg = MemoryChallengeRegistry()
    reg.add(TOKEN, KEYAUTH, time.time() + 3600)
    with SpoaThread(reg, port=0, max_frame_size=16380) as thread:
        yield thread


@pytest.fixture
def healthy(agent: SpoaThread) -> Iterator[SpopClient]:
    """A well-behaved connection that must survive every bad neighbour."""
    with SpopClient(agent.port) as c:
        c.hello()
        yield c
        assert c.ask(TOKEN, 99, 9) == Ack(99, 9, (SetVar(Scope.TXN, "keyauth", KEYAUTH),))


def notify_payload(token_bytes: bytes) -> bytes:
    return (
        encode_string("acme-challenge")
        + b"\x01"
        + encode_string("token")
        + b"\x08"
        + encode_string(token_bytes)
    )


CASES: dict[str, tuple[bytes, int]] = {
    # name: (bytes sent on a fresh connection, expected status code)
    "length_above_max_frame_size": (struct.pack(">I", 16381) + b"\x01", 3),
    "length_4_gigabytes": (b"\xff\xff\xff\xff", 3),
    "length_below_header_size": (struct.pack(">I", 2) + b"\x01\x00", 4),
    "unknown_frame_type": (frame_bytes(42, b""), 4),
    "agent_frame_type_from_haproxy": (frame_bytes(FrameType.ACK, b"", 1, 1), 4),
    "fin_clear_fragment": (HELLO + frame_bytes(FrameType.NOTIFY, b"", 1, 1, flags=0), 10),
    "unset_type_fragment": (HELLO + frame_bytes(FrameType.UNSET, b"", 1, 1), 10),
    "fragmented_hello": (frame_bytes(FrameType.HAPROXY_HELLO, b"", flags=0), 10),
    "notify_before_hello": (encode_frame(challenge(TOKEN)), 4),
    "wrong_version": (encode_frame(HaproxyHello(("1.0",), 16380, ())), 8),
    "hello_missing_version": (
        frame_bytes(
            FrameType.HAPROXY_HELLO,
            encode_kv_list((("max-frame-size", 16380), ("capabilities", ""))),
        ),
        5,
    ),
    "hello_missing_max_frame_size": (
        frame_bytes(
            FrameType.HAPROXY_HELLO,
            encode_kv_list((("supported-versions", "2.0"), ("capabilities", ""))),
        ),
        6,
    ),
    "hello_tiny_max_frame_size": (encode_frame(HaproxyHello(("2.0",), 100, ())), 9),
    "second_hello": (HELLO + HELLO, 4),
    "truncated_notify_payload": (
        HELLO + frame_bytes(FrameType.NOTIFY, notify_payload(b"abc")[:-2], 1, 1),
        4,
    ),
    "varint_overflow_in_ids": (
        HELLO + struct.pack(">IBI", 16, 3, 1) + b"\xff" * 11,
        4,
    ),
    "non_utf8_token": (HELLO + frame_bytes(FrameType.NOTIFY, notify_payload(b"\xff\xfe"), 1, 1), 4),
    "over_long_token": (
        HELLO + frame_bytes(FrameType.NOTIFY, notify_payload(b"A" * 256), 1, 1),
        4,
    ),
    "unknown_typed_data": (
        HELLO
        + frame_bytes(
            FrameType.NOTIFY,
            encode_string("acme-challenge") + b"\x01" + encode_string("token") + b"\x0e",
            1,
            1,
        ),
        4,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_input_gets_agent_disconnect_with_status(
    agent: SpoaThread, healthy: SpopClient, case: str
) -> None:
    data, status = CASES[case]
    with SpopClient(agent.port) as bad:
        bad.send_raw(data)
        reply = bad.expect_disconnect()
    assert reply.status_code == status, reply


def test_frame_over_negotiated_size_is_too_big(agent: SpoaThread, healthy: SpopClient) -> None:
    with SpopClient(agent.port) as bad:
        bad.hello(max_frame_size=300)
        bad.send_raw(frame_bytes(FrameType.NOTIFY, notify_payload(b"A" * 300), 1, 1))
        assert bad.expect_disconnect().status_code == 3


def test_valid_notifies_before_garbage_are_still_answered(
    agent: SpoaThread, healthy: SpopClient
) -> None:
    with SpopClient(agent.port) as bad:
        bad.send_raw(HELLO + encode_frame(challenge(TOKEN, 5, 1)) + frame_bytes(42, b""))
        bad.read_frame()  # AGENT-HELLO
        assert bad.read_frame() == Ack(5, 1, (SetVar(Scope.TXN, "keyauth", KEYAUTH),))
        assert bad.expect_disconnect().status_code == 4


def test_peer_closing_mid_frame_leaves_the_agent_serving(
    agent: SpoaThread, healthy: SpopClient
) -> None:
    for cut in (1, 3, 10):
        with SpopClient(agent.port) as bad:
            bad.send_raw((HELLO + encode_frame(challenge(TOKEN)))[: len(HELLO) + cut])
            # closed here, half a frame in the agent's buffer


def test_peer_resetting_the_connection_leaves_the_agent_serving(
    agent: SpoaThread, healthy: SpopClient
) -> None:
    bad = SpopClient(agent.port)
    bad.hello()
    bad.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    bad.send_raw(encode_frame(challenge(TOKEN)))
    bad.close()  # RST instead of FIN


def test_frame_dribbled_one_byte_at_a_time_is_answered(agent: SpoaThread) -> None:
    with SpopClient(agent.port) as slow:
        for b in HELLO + encode_frame(challenge(TOKEN, 3, 4)):
            slow.send_raw(bytes((b,)))
        slow.read_frame()
        assert slow.read_frame() == Ack(3, 4, (SetVar(Scope.TXN, "keyauth", KEYAUTH),))


def test_random_garbage_connections_all_get_disconnected(
    agent: SpoaThread, healthy: SpopClient
) -> None:
    rng_bytes = os.urandom(64 * 50)
    for i in range(50):
        chunk = rng_bytes[i * 64 : (i + 1) * 64]
        with SpopClient(agent.port) as bad:
            bad.send_raw(chunk)
            bad.sock.shutdown(socket.SHUT_WR)  # a short "frame" must not leave us waiting
            frame = bad.read_frame()
            # Random bytes either declare a huge frame (status 3) or are not a valid
            # HELLO (some status); the agent never answers them with anything else.
            if frame is not None:
                assert type(frame).__name__ == "AgentDisconnect", frame


def test_peer_that_never_reads_acks_is_paused_not_buffered(
    agent: SpoaThread, healthy: SpopClient
) -> None:
    frame = encode_frame(challenge(TOKEN, 70000, 1))
    chunk = frame * 2000  # ~140 kB of NOTIFYs per send
    hog = SpopClient(agent.port, timeout=1.0)
    try:
        hog.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        hog.hello()
        sent = 0
        deadline = time.monotonic() + 10
        try:
            while time.monotonic() < deadline and sent < 64_000_000:
                hog.sock.sendall(chunk)
                sent += len(chunk)
        except TimeoutError:
            pass  # the agent stopped reading: what we want
        assert sent < 64_000_000, "agent kept reading from a peer that never reads"
        time.sleep(0.2)
        buffered = sum(
            c._transport.get_write_buffer_size()
            for c in agent.server._connections
            if c._transport is not None
        )
        print(f"sent {sent} bytes of NOTIFYs; agent holds {buffered} bytes of ACKs")
        # High-water mark (256 KiB) plus the ACKs of one read; far below what was sent.
        assert buffered < 2_000_000
        assert sent > 4 * buffered  # the bound is real, not "nothing was sent"
    finally:
        hog.close()


def test_stuck_peer_is_dropped_after_two_idle_periods() -> None:
    reg = MemoryChallengeRegistry()
    reg.add(TOKEN, KEYAUTH, time.time() + 60)
    with SpoaThread(reg, port=0, idle_timeout=0.3) as agent:
        hog = SpopClient(agent.port, timeout=1.0)
        try:
            hog.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            hog.hello()
            frames = encode_frame(challenge(TOKEN, 70000, 1)) * 2000
            # Until the agent pauses reading from us (timeout) or already dropped us (reset).
            with contextlib.suppress(TimeoutError, ConnectionResetError, BrokenPipeError):
                for _ in range(400):
                    hog.sock.sendall(frames)
            deadline = time.monotonic() + 5
            while agent.server.connection_count and time.monotonic() < deadline:
                time.sleep(0.05)
            assert agent.server.connection_count == 0
        finally:
            hog.close()
