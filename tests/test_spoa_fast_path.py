"""The SPOA's fast path answers exactly like the general decoder, and costs no metrics call.

Differential: the same byte chunks go to two `_SpoaProtocol`s on fake
transports, one with the fast path and one with `fast_path=False`; every
write (ACKs, AGENT-DISCONNECT with its status and message), the close, and
the counters must be identical. Inputs: well-formed NOTIFYs of the shape
spoe-acme.conf configures, near misses (one byte changed, cut, other
flags/types/names, long ids, non-ASCII or long tokens, answers too big for
the negotiated frame size), and random bytes, cut into random chunks.
"""

from __future__ import annotations

import itertools
import os
import time
from typing import Any

import prometheus_client.metrics
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.challenges import MemoryChallengeRegistry
from agent.metrics import Metrics, _SpoaCollector
from agent.spoa import SpoaServer, SpoaThread, _SpoaProtocol, _whole_notifies
from agent.spop import (
    FLAG_ABORT,
    FLAG_FIN,
    FrameType,
    HaproxyHello,
    Message,
    Notify,
    encode_frame,
    encode_string,
    encode_varint,
    frame_bytes,
)
from tests.support.spop_client import SpopClient

EXAMPLES = settings(max_examples=int(os.environ.get("SPOP_FUZZ_EXAMPLES", "300")), deadline=None)

TOKEN = "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0"
KEYAUTH = TOKEN + ".9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI"
SHORT = "abc"
LONG = "L" * 200  # its key authorization does not fit a 256-byte frame
NON_ASCII_OK = "t\u00e9"  # valid UTF-8, not ASCII: the general decoder's job
KNOWN = {TOKEN: KEYAUTH, SHORT: SHORT + ".x", LONG: LONG + "." + "k" * 100, NON_ASCII_OK: "na.x"}


class FakeTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray) -> None:
        self.writes.append(bytes(data))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


def make_registry() -> MemoryChallengeRegistry:
    registry = MemoryChallengeRegistry(clock=lambda: 1000.0)
    for token, keyauth in KNOWN.items():
        if token == NON_ASCII_OK:  # not an ACME token: bypass add()'s check
            registry._entries[token] = (keyauth, 2000.0)
        else:
            registry.add(token, keyauth, 2000.0)
    return registry


def run(chunks: list[bytes], fast: bool) -> tuple[list[bytes], bool, tuple[object, ...]]:
    server = SpoaServer(make_registry(), port=0, fast_path=fast)
    proto = _SpoaProtocol(server)
    transport = FakeTransport()
    proto.connection_made(transport)  # type: ignore[arg-type]
    for chunk in chunks:
        proto.data_received(chunk)
    c = server.counters
    return transport.writes, transport.closed, (c.answered, c.unknown, dict(c.drops))


def notify(token: str, stream_id: int = 1, frame_id: int = 1) -> bytes:
    message = Message("acme-challenge", (("token", token),))
    return encode_frame(Notify(stream_id, frame_id, (message,)))


def hello(max_frame_size: int = 16380) -> bytes:
    return encode_frame(HaproxyHello(("2.0",), max_frame_size, ("pipelining",), False, "e"))


def assert_same(chunks: list[bytes]) -> list[bytes]:
    fast = run(chunks, fast=True)
    general = run(chunks, fast=False)
    assert fast == general
    return fast[0]


def cut(data: bytes, points: list[int]) -> list[bytes]:
    edges = sorted({p % (len(data) + 1) for p in points} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(edges) if b > a]


# --------------------------------------------------------------------------- strategies

ids = st.one_of(
    st.integers(0, 300), st.integers(0, 2**40), st.integers(0, 2**64 - 1)
)  # 1..10-byte varints
ACME_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
tokens = st.one_of(
    st.sampled_from(sorted(KNOWN)),
    st.text(alphabet=ACME_ALPHABET, max_size=60),
    st.text(max_size=20),
    st.integers(230, 300).map(lambda n: "A" * n),  # one-byte length limit and the 255 cap
)
good_frames = st.builds(notify, tokens, ids, ids)


@st.composite
def near_misses(draw: st.DrawFn) -> bytes:
    frame = bytearray(draw(good_frames))
    kind = draw(st.sampled_from(["byte", "cut", "flags", "type", "name", "arg", "extra", "ids"]))
    if kind == "byte":
        frame[draw(st.integers(0, len(frame) - 1))] = draw(st.integers(0, 255))
    elif kind == "cut":
        frame = frame[: draw(st.integers(0, len(frame) - 1))]
    elif kind == "flags":
        flags = draw(st.sampled_from([0, FLAG_ABORT, FLAG_FIN | FLAG_ABORT, 0x80000001]))
        frame[5:9] = flags.to_bytes(4, "big")
    elif kind == "type":
        frame[4] = draw(st.sampled_from([0, 1, 2, 101, 102, 103, 4]))
    elif kind == "name":
        name = draw(st.sampled_from(["acme-challengf", "acme-challenge2", "", "x" * 14]))
        payload = encode_string(name) + b"\x01" + encode_string("token") + b"\x08\x03abc"
        frame = bytearray(frame_bytes(FrameType.NOTIFY, payload, 7, 1))
    elif kind == "arg":
        payload = encode_string("acme-challenge") + draw(
            st.sampled_from(
                [
                    b"\x01\x05tokem\x08\x03abc",
                    b"\x02\x05token\x08\x03abc\x01a\x00",
                    b"\x01\x05token\x09\x03abc",  # BINARY, not STRING
                    b"\x01\x05token\x18\x03abc",  # STRING type with a flag nibble
                    b"\x00",
                ]
            )
        )
        frame = bytearray(frame_bytes(FrameType.NOTIFY, payload, 7, 1))
    elif kind == "extra":  # a second message after ours
        frame = bytearray(frame[:4] + frame[4:] + encode_string("m") + b"\x00")
        frame[:4] = (len(frame) - 4).to_bytes(4, "big")
    else:  # overlong (non-canonical-length) varint ids: 0xff continuation bytes
        body = b"\x03\x00\x00\x00\x01" + b"\xf0" + b"\x80" * draw(st.integers(1, 11)) + b"\x00\x01"
        body += encode_string("acme-challenge") + b"\x01" + encode_string("token") + b"\x08\x03abc"
        frame = bytearray(len(body).to_bytes(4, "big") + body)
    return bytes(frame)


any_frame = st.one_of(good_frames, near_misses(), st.binary(max_size=80))


# --------------------------------------------------------------------------- differential tests


@EXAMPLES
@given(st.lists(good_frames, min_size=1, max_size=8), st.lists(st.integers(0, 10**6), max_size=6))
def test_well_formed_notifies_get_byte_identical_acks(
    frames: list[bytes], points: list[int]
) -> None:
    writes = assert_same([hello(), *cut(b"".join(frames), points)])
    assert writes  # at least the AGENT-HELLO


@EXAMPLES
@given(
    st.sampled_from([256, 300, 16380]),
    st.lists(any_frame, min_size=1, max_size=6),
    st.lists(st.integers(0, 10**6), max_size=6),
)
def test_near_miss_and_random_frames_get_the_same_answers_and_errors(
    size: int, frames: list[bytes], points: list[int]
) -> None:
    assert_same([hello(size), *cut(b"".join(frames), points)])


@EXAMPLES
@given(st.lists(any_frame, min_size=1, max_size=6))
def test_hello_and_notifies_in_one_chunk_agree(frames: list[bytes]) -> None:
    assert_same([hello() + b"".join(frames)])


def test_known_token_is_answered_on_the_fast_path_with_the_general_bytes() -> None:
    chunks = [hello(), notify(TOKEN, 70000, 3) + notify("nope", 2**40, 1)]
    fast_writes, _, counts = run(chunks, fast=True)
    assert fast_writes == run(chunks, fast=False)[0]
    assert counts[:2] == (1, 1)


def test_answer_too_big_for_the_frame_size_is_unknown_on_both_paths() -> None:
    writes = assert_same([hello(256), notify(LONG, 9, 1)])
    assert writes[-1] == encode_frame(_empty_ack(9, 1))


def test_long_ids_and_cut_frames_take_the_general_path_and_agree() -> None:
    frame = notify(TOKEN, 2**64 - 1, 2**63)
    assert_same([hello(), frame[:11], frame[11:]])
    assert_same([hello(), b"\x00\x00\x00\x03\x03\x00\x01"])  # shorter than a header
    assert encode_varint(2**64 - 1)[0] >= 240


acme_tokens = st.text(alphabet=ACME_ALPHABET, min_size=1, max_size=60)
canonical_ids = st.one_of(st.integers(0, 300), st.integers(0, 2**34))  # 1- to 6-byte varints
ours = st.builds(notify, acme_tokens, canonical_ids, canonical_ids)


def leading(data: bytes) -> tuple[int, list[tuple[bytes, bytes]]]:
    """What the byte loop finds in `data` on a connection past its HELLO."""
    server = SpoaServer(make_registry(), port=0)
    proto = _SpoaProtocol(server)
    proto.connection_made(FakeTransport())  # type: ignore[arg-type]
    return proto._leading_notifies(data)


@EXAMPLES
@given(st.lists(ours, min_size=1, max_size=9))
def test_a_read_of_whole_notifies_takes_the_regex_path_and_answers_alike(
    frames: list[bytes],
) -> None:
    data = b"".join(frames)
    whole = _whole_notifies(data)
    assert whole is not None  # the read under load: one regex call, not the byte loop
    assert (len(data), whole) == leading(data)
    assert_same([hello(), data])


@pytest.mark.parametrize(
    "why",
    ["cut at the end", "a byte in front", "a byte between", "other token alphabet",
     "length one too long", "a byte more inside a frame", "a frame of 256 bytes",
     "other flags", "long ids"],
)  # fmt: skip
def test_a_read_that_is_not_only_whole_notifies_of_our_shape_leaves_the_regex_path(
    why: str,
) -> None:
    a, b = notify(TOKEN, 5, 1), notify("nope", 6, 1)
    data = {
        "cut at the end": a + b[:-1],
        "a byte in front": b"\x00" + a + b,
        "a byte between": a + b"\x00" + b,
        "other token alphabet": a + notify("no.pe", 6, 1),
        "length one too long": a + (len(b) - 3).to_bytes(4, "big") + b[4:] + b"A",
        "a byte more inside a frame": (len(a) - 3).to_bytes(4, "big") + a[4:] + b"\x00" + b,
        "a frame of 256 bytes": a + notify("A" * 230, 6, 1),
        "other flags": a + b[:5] + (FLAG_FIN | FLAG_ABORT).to_bytes(4, "big") + b[9:],
        "long ids": a + notify(TOKEN, 2**40, 1),
    }[why]
    assert _whole_notifies(data) is None
    assert_same([hello(), data])


def _empty_ack(stream_id: int, frame_id: int) -> Any:
    from agent.spop import Ack

    return Ack(stream_id, frame_id)


# --------------------------------------------------------------------------- metrics


def test_no_prometheus_call_per_request_and_counts_are_right_at_scrape(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []
    for cls, method in (
        (prometheus_client.metrics.Counter, "inc"),
        (prometheus_client.metrics.Histogram, "observe"),
        (prometheus_client.metrics.MetricWrapperBase, "labels"),
    ):
        original = getattr(cls, method)

        def spy(*args: Any, _name: str = method, _orig: Any = original, **kw: Any) -> Any:
            calls.append(_name)
            return _orig(*args, **kw)

        monkeypatch.setattr(cls, method, spy)
    collects: list[float] = []
    original_collect = _SpoaCollector.collect

    def counting_collect(self: _SpoaCollector) -> Any:
        collects.append(time.monotonic())
        return original_collect(self)

    monkeypatch.setattr(_SpoaCollector, "collect", counting_collect)

    metrics = Metrics(list)
    registry = MemoryChallengeRegistry()
    registry.add(TOKEN, KEYAUTH, time.time() + 600)
    n = 200
    with (
        SpoaThread(registry, port=0, counters=metrics.spoa) as agent,
        SpopClient(agent.port) as client,
    ):
        client.hello()
        for i in range(n):
            client.ask(TOKEN if i % 2 else "unknownToken", 1000 + i, 1)
    assert calls == [] and collects == []
    text = metrics.render().decode()
    assert len(collects) == 1
    assert f'haproxy_acme_challenges_total{{result="answered",type="http-01"}} {n // 2}.0' in text
    assert f'haproxy_acme_challenges_total{{result="unknown",type="http-01"}} {n // 2}.0' in text
    assert f"haproxy_acme_spoe_request_duration_seconds_count {n}.0" in text
    assert f'haproxy_acme_spoe_request_duration_seconds_bucket{{le="+Inf"}} {n}.0' in text


def test_dropped_peers_are_exported_by_reason() -> None:
    metrics = Metrics(list)
    server = SpoaServer(make_registry(), port=0, counters=metrics.spoa)
    for _ in range(3):
        proto = _SpoaProtocol(server)
        proto.connection_made(FakeTransport())  # type: ignore[arg-type]
        proto.data_received(b"\x00\x00\x00\x07\x99\x00\x00\x00\x01\x00\x00")  # unknown type
    text = metrics.render().decode()
    assert 'haproxy_acme_spoe_dropped_peers_total{reason="malformed"} 3.0' in text
    assert 'haproxy_acme_spoe_dropped_peers_total{reason="hello_deadline"} 0.0' in text
    assert server.drops["malformed"] == 3


def test_counters_survive_a_replaced_server() -> None:
    metrics = Metrics(list)
    for _ in range(2):  # the daemon restarts the SPOA on a config change
        server = SpoaServer(make_registry(), port=0, counters=metrics.spoa)
        proto = _SpoaProtocol(server)
        proto.connection_made(FakeTransport())  # type: ignore[arg-type]
        proto.data_received(hello() + notify(TOKEN))
    rendered = metrics.render().decode()
    assert 'haproxy_acme_challenges_total{result="answered",type="http-01"} 2.0' in rendered
