"""Property tests of the SPOP codec: round trips, and hostile bytes raise only SpopError."""

from __future__ import annotations

import ipaddress
import os

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.spop import (
    Ack,
    AgentConnection,
    AgentDisconnect,
    AgentHello,
    FrameDecoder,
    HaproxyDisconnect,
    HaproxyHello,
    Int32,
    Int64,
    Message,
    Notify,
    Scope,
    SetVar,
    SpopError,
    Uint32,
    Uint64,
    UnsetVar,
    Value,
    decode_frame,
    decode_value,
    decode_varint,
    encode_frame,
    encode_value,
    encode_varint,
)

# SPOP_FUZZ_EXAMPLES=5000 for a deeper run than CI's.
FAST = settings(max_examples=int(os.environ.get("SPOP_FUZZ_EXAMPLES", "300")), deadline=None)

ids = st.integers(0, 2**64 - 1)
values: st.SearchStrategy[Value] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**31), 2**31 - 1).map(Int32),
    st.integers(0, 2**32 - 1).map(Uint32),
    st.integers(-(2**63), 2**63 - 1).map(Int64),
    st.integers(0, 2**64 - 1).map(Uint64),
    st.ip_addresses(v=4).map(lambda a: ipaddress.IPv4Address(int(a))),
    st.ip_addresses(v=6).map(lambda a: ipaddress.IPv6Address(int(a))),
    st.text(max_size=40),
    st.binary(max_size=40),
)
names = st.text(max_size=20)
list_items = st.text(
    alphabet=st.characters(blacklist_characters=",", blacklist_categories=("Zs", "Cc", "Cs")),
    min_size=1,
    max_size=10,
)
messages = st.builds(Message, names, st.lists(st.tuples(names, values), max_size=5).map(tuple))
actions = st.one_of(
    st.builds(SetVar, st.sampled_from(Scope), names, values),
    st.builds(UnsetVar, st.sampled_from(Scope), names),
)
frames = st.one_of(
    st.builds(
        HaproxyHello,
        st.lists(list_items, max_size=3).map(tuple),
        st.integers(0, 2**32 - 1),
        st.lists(list_items, max_size=3).map(tuple),
        st.booleans(),
        st.none() | st.text(max_size=20),
    ),
    st.builds(
        AgentHello,
        st.text(max_size=8),
        st.integers(0, 2**32 - 1),
        st.lists(list_items, max_size=3).map(tuple),
    ),
    st.builds(Notify, ids, ids, st.lists(messages, max_size=4).map(tuple)),
    st.builds(Ack, ids, ids, st.lists(actions, max_size=4).map(tuple)),
    st.builds(HaproxyDisconnect, st.integers(0, 2**32 - 1), st.text(max_size=40)),
    st.builds(AgentDisconnect, st.integers(0, 2**32 - 1), st.text(max_size=40)),
)


@FAST
@given(ids)
def test_varint_round_trips(value: int) -> None:
    raw = encode_varint(value)
    assert decode_varint(raw + b"tail", 0) == (value, len(raw))


@FAST
@given(values)
def test_typed_data_round_trips(value: Value) -> None:
    raw = encode_value(value)
    decoded, pos = decode_value(raw, 0)
    assert decoded == value and type(decoded) is type(value) and pos == len(raw)


@FAST
@given(frames)
def test_frames_round_trip(frame: object) -> None:
    raw = encode_frame(frame)  # type: ignore[arg-type]
    decoded, used = decode_frame(raw, max_frame_size=1 << 20)
    assert decoded == frame
    assert used == len(raw)


@FAST
@given(st.binary(max_size=300), st.integers(1, 64))
def test_random_bytes_raise_only_spop_errors(data: bytes, chunk: int) -> None:
    dec = FrameDecoder(max_frame_size=4096)
    try:
        for i in range(0, len(data), chunk):
            dec.receive_data(data[i : i + chunk])
            for _ in dec.frames():
                pass
    except SpopError as err:
        assert 0 <= err.status_code <= 99


@FAST
@given(st.lists(frames, min_size=1, max_size=3), st.data())
def test_mutated_valid_frames_raise_only_spop_errors(
    frame_list: list[object], data: st.DataObject
) -> None:
    raw = bytearray(b"".join(encode_frame(f) for f in frame_list))  # type: ignore[arg-type]
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = data.draw(st.integers(0, max(0, len(raw) - 1)))
        if op == "flip" and raw:
            raw[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "cut":
            del raw[pos : pos + data.draw(st.integers(1, 8))]
        else:
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=4))
    conn = AgentConnection(max_frame_size=1 << 16)
    try:
        conn.receive_data(bytes(raw))
        for event in conn.events():
            if isinstance(event, HaproxyHello):
                conn.hello_reply(event)
    except SpopError as err:
        assert 0 <= err.status_code <= 99


@FAST
@given(st.binary(max_size=200))
def test_random_typed_data_raises_only_spop_errors(data: bytes) -> None:
    pos = 0
    try:
        while pos < len(data):
            _, pos = decode_value(data, pos)
    except SpopError:
        pass


def _messages_outcome(fn: object, data: bytes) -> object:
    try:
        return fn(data, 0, len(data))  # type: ignore[operator]
    except SpopError as err:
        return ("error", err.status_code)


one_string_messages = st.builds(
    lambda name, key, value: Message(name, ((key, value),)),
    names,
    names,
    st.text(max_size=300),
)


@FAST
@given(st.lists(st.one_of(messages, one_string_messages), min_size=1, max_size=2), st.data())
def test_fast_message_decoder_agrees_with_the_general_one(
    message_list: list[Message], data: st.DataObject
) -> None:
    from agent.spop import _decode_messages, _decode_messages_general

    raw = bytearray(encode_frame(Notify(1, 1, tuple(message_list)))[11:])
    if raw and data.draw(st.booleans()):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    payload = bytes(raw)
    fast = _messages_outcome(_decode_messages, payload)
    assert fast == _messages_outcome(_decode_messages_general, payload)
    assert fast == _messages_outcome(_decode_messages, payload)  # cached shape, same answer
