"""Unit tests of the sans-IO SPOP codec: bytes in, frames out, and back."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from agent.spop import (
    FLAG_ABORT,
    FLAG_FIN,
    Ack,
    AgentConnection,
    AgentDisconnect,
    AgentHello,
    BadFrameSize,
    FragmentationNotSupported,
    FrameDecoder,
    FrameTooBig,
    FrameType,
    HaproxyDisconnect,
    HaproxyHello,
    Int32,
    Int64,
    InvalidFrame,
    Message,
    NoCapabilities,
    NoFrameSize,
    Notify,
    NoVersion,
    Scope,
    SetVar,
    SpopError,
    State,
    Status,
    Uint32,
    Uint64,
    UnsetVar,
    UnsupportedVersion,
    decode_frame,
    decode_value,
    decode_varint,
    encode_ack_set_txn_string,
    encode_empty_ack,
    encode_frame,
    encode_kv_list,
    encode_string,
    encode_value,
    encode_varint,
    frame_bytes,
)

HELLO = HaproxyHello(("2.0",), 16380, ("pipelining", "async"))


def ready_connection(max_frame_size: int = 16380) -> AgentConnection:
    conn = AgentConnection(max_frame_size)
    conn.receive_data(encode_frame(HELLO))
    hello = conn.next_event()
    assert isinstance(hello, HaproxyHello)
    conn.hello_reply(hello)
    return conn


def notify(token: str, stream_id: int = 7, frame_id: int = 1) -> Notify:
    return Notify(stream_id, frame_id, (Message("acme-challenge", (("token", token),)),))


# ---------------------------------------------------------------- varints and typed data


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (0, 1),
        (239, 1),
        (240, 2),
        (2287, 2),
        (2288, 3),
        (264431, 3),
        (264432, 4),
        (33818863, 4),
        (33818864, 5),
        (4328786159, 5),
        (4328786160, 6),
        ((1 << 64) - 1, 10),
    ],
)
def test_varint_sizes_match_haproxy_peers_encoding_table(value: int, size: int) -> None:
    raw = encode_varint(value)
    assert len(raw) == size
    assert decode_varint(raw, 0) == (value, size)


def test_varint_known_bytes_from_haproxy_encoder() -> None:
    # Computed by hand from intops.h: 240 -> F0 00; 1000 -> (1000&0xff)|F0 = F8, (760>>4)=47.
    assert encode_varint(240) == b"\xf0\x00"
    assert encode_varint(1000) == b"\xf8\x2f"
    assert encode_varint(2288) == b"\xf0\x80\x00"


def test_truncated_varint_is_invalid_frame() -> None:
    with pytest.raises(InvalidFrame) as err:
        decode_varint(b"\xf0\x80", 0)
    assert err.value.status_code == Status.INVALID


def test_varint_longer_than_ten_bytes_is_rejected() -> None:
    with pytest.raises(InvalidFrame, match="longer than 10 bytes"):
        decode_varint(b"\xff" * 11 + b"\x00", 0)


def test_varint_above_64_bits_is_rejected() -> None:
    with pytest.raises(InvalidFrame, match="64 bits"):
        decode_varint(b"\xff" + b"\xff" * 8 + b"\x7f", 0)


def test_negative_varint_cannot_be_encoded() -> None:
    with pytest.raises(ValueError):
        encode_varint(-1)


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        False,
        Int32(-5),
        Int32(2**31 - 1),
        Uint32(2**32 - 1),
        Int64(-(2**63)),
        Uint64(2**64 - 1),
        ipaddress.IPv4Address("192.0.2.1"),
        ipaddress.IPv6Address("2001:db8::1"),
        "",
        "héllo",
        b"\x00\xff",
    ],
)
def test_typed_data_round_trips_with_its_type(value: object) -> None:
    raw = encode_value(value)  # type: ignore[arg-type]
    decoded, pos = decode_value(raw, 0)
    assert pos == len(raw)
    assert decoded == value
    assert type(decoded) is type(value)


def test_boolean_true_is_type_one_with_flag_bit() -> None:
    assert encode_value(True) == b"\x11"
    assert encode_value(False) == b"\x01"


def test_plain_int_encodes_as_int64_and_huge_as_uint64() -> None:
    assert encode_value(-1)[0] == 4
    assert encode_value(2**63)[0] == 5
    with pytest.raises(ValueError):
        encode_value(2**64)


def test_sized_ints_check_their_range() -> None:
    with pytest.raises(ValueError, match="UINT32"):
        Uint32(-1)
    with pytest.raises(ValueError, match="INT32"):
        Int32(2**31)


def test_string_that_is_not_utf8_is_invalid_frame() -> None:
    with pytest.raises(InvalidFrame, match="UTF-8"):
        decode_value(b"\x08\x02\xff\xfe", 0)


def test_string_longer_than_the_frame_is_invalid() -> None:
    with pytest.raises(InvalidFrame, match="past the end"):
        decode_value(b"\x08\x05abc", 0)


def test_unknown_typed_data_type_is_invalid() -> None:
    with pytest.raises(InvalidFrame, match="unknown typed-data type 12"):
        decode_value(b"\x0c", 0)


def test_truncated_ip_addresses_are_invalid() -> None:
    with pytest.raises(InvalidFrame, match="IPv4"):
        decode_value(b"\x06\x01\x02", 0)
    with pytest.raises(InvalidFrame, match="IPv6"):
        decode_value(b"\x07" + b"\x00" * 15, 0)


# ---------------------------------------------------------------- frames


@pytest.mark.parametrize(
    "frame",
    [
        HELLO,
        HaproxyHello(("2.0", "1.5"), 256, (), healthcheck=True, engine_id="e-1"),
        AgentHello("2.0", 16380, ("pipelining",)),
        notify("tok"),
        Notify(2**40, 3, (Message("a", (("", None), ("x", Int32(-1)))), Message("b"))),
        Ack(1, 2, (SetVar(Scope.TXN, "keyauth", "t.k"), UnsetVar(Scope.REQ, "x"))),
        Ack(300, 1),
        HaproxyDisconnect(0, "normal"),
        AgentDisconnect(10, "fragmentation not supported"),
    ],
)
def test_every_frame_type_round_trips(frame: object) -> None:
    raw = encode_frame(frame)  # type: ignore[arg-type]
    decoded, used = decode_frame(raw)
    assert decoded == frame
    assert used == len(raw)


def test_frame_header_layout_matches_the_spec() -> None:
    raw = encode_frame(Ack(1, 2))
    (length,) = struct.unpack(">I", raw[:4])
    assert length == len(raw) - 4
    assert raw[4] == FrameType.ACK
    assert struct.unpack(">I", raw[5:9])[0] == FLAG_FIN
    assert raw[9:] == b"\x01\x02"


def test_set_var_action_bytes_match_the_spec() -> None:
    raw = encode_frame(Ack(1, 1, (SetVar(Scope.TXN, "keyauth", "ab"),)))
    # SET-VAR=1, NB-ARGS=3, scope txn=2, name, STRING(8) len 2 "ab"
    assert raw[11:] == b"\x01\x03\x02\x07keyauth\x08\x02ab"


def test_fast_ack_helpers_match_the_generic_encoder() -> None:
    for sid, fid in [(1, 1), (239, 240), (10**9, 70000)]:
        assert encode_ack_set_txn_string(sid, fid, "keyauth", b"tok.thumb") == encode_frame(
            Ack(sid, fid, (SetVar(Scope.TXN, "keyauth", "tok.thumb"),))
        )
        assert encode_empty_ack(sid, fid) == encode_frame(Ack(sid, fid))


def test_decoder_reassembles_frames_split_at_every_byte() -> None:
    stream = encode_frame(HELLO) + encode_frame(notify("a")) + encode_frame(notify("b", 8))
    dec = FrameDecoder()
    frames: list[object] = []
    for i in range(len(stream)):
        dec.receive_data(stream[i : i + 1])
        frames.extend(dec.frames())
    assert frames == [HELLO, notify("a"), notify("b", 8)]
    assert dec.buffered == 0


def test_decoder_rejects_oversized_length_before_payload_arrives() -> None:
    dec = FrameDecoder(max_frame_size=1000)
    dec.receive_data(struct.pack(">I", 1001))
    with pytest.raises(FrameTooBig) as err:
        dec.next_frame()
    assert err.value.status_code == 3


def test_frame_shorter_than_a_header_is_invalid() -> None:
    dec = FrameDecoder()
    dec.receive_data(struct.pack(">I", 3) + b"\x03\x00\x00")
    with pytest.raises(InvalidFrame, match="shorter than a frame header"):
        dec.next_frame()


def test_fin_clear_is_fragmentation_not_supported() -> None:
    raw = frame_bytes(FrameType.NOTIFY, b"", 1, 1, flags=0)
    with pytest.raises(FragmentationNotSupported) as err:
        decode_frame(raw)
    assert err.value.status_code == 10


def test_unset_type_continuation_fragment_is_fragmentation_not_supported() -> None:
    raw = frame_bytes(FrameType.UNSET, b"", 1, 1, flags=FLAG_FIN | FLAG_ABORT)
    with pytest.raises(FragmentationNotSupported):
        decode_frame(raw)


def test_unknown_frame_type_is_invalid() -> None:
    with pytest.raises(InvalidFrame, match="unknown frame type 42"):
        decode_frame(frame_bytes(42, b""))


def test_hello_with_stream_id_is_invalid() -> None:
    with pytest.raises(InvalidFrame, match="non-zero"):
        decode_frame(frame_bytes(FrameType.HAPROXY_HELLO, b"", 1, 0))


def test_notify_with_truncated_message_is_invalid() -> None:
    payload = encode_string("acme-challenge") + b"\x01" + encode_string("token") + b"\x08\x09ab"
    with pytest.raises(InvalidFrame):
        decode_frame(frame_bytes(FrameType.NOTIFY, payload, 1, 1))


def test_notify_message_without_argument_count_is_invalid() -> None:
    with pytest.raises(InvalidFrame, match="argument count"):
        decode_frame(frame_bytes(FrameType.NOTIFY, encode_string("m"), 1, 1))


def test_message_arg_lookup() -> None:
    m = Message("acme-challenge", (("", 1), ("token", "t")))
    assert m.arg("token") == "t"
    with pytest.raises(KeyError):
        m.arg("missing")


@pytest.mark.parametrize(
    ("items", "error", "status"),
    [
        ((("max-frame-size", Uint32(16380)), ("capabilities", "")), NoVersion, 5),
        ((("supported-versions", "2.0"), ("capabilities", "")), NoFrameSize, 6),
        ((("supported-versions", "2.0"), ("max-frame-size", Uint32(16380))), NoCapabilities, 7),
        (
            (("supported-versions", 2), ("max-frame-size", Uint32(1)), ("capabilities", "")),
            InvalidFrame,
            4,
        ),
    ],
)
def test_hello_missing_items_carry_their_status_code(
    items: tuple[tuple[str, object], ...], error: type[SpopError], status: int
) -> None:
    raw = frame_bytes(FrameType.HAPROXY_HELLO, encode_kv_list(items))  # type: ignore[arg-type]
    with pytest.raises(error) as err:
        decode_frame(raw)
    assert err.value.status_code == status


def test_error_str_names_the_status_code() -> None:
    assert "SPOP status 3 (frame is too big)" in str(FrameTooBig("x"))
    err = SpopError(13, "out of memory")
    assert (err.status_code, err.message) == (13, "out of memory")
    assert str(SpopError(200, "custom")) == "SPOP status 200 (agent-defined): custom"


# ---------------------------------------------------------------- agent state machine


def test_hello_reply_negotiates_version_size_and_pipelining_only() -> None:
    conn = AgentConnection(max_frame_size=16380)
    conn.receive_data(
        encode_frame(HaproxyHello(("2.0",), 8192, ("pipelining", "async", "fragmentation")))
    )
    hello = conn.next_event()
    assert isinstance(hello, HaproxyHello)
    reply, _ = decode_frame(conn.hello_reply(hello))
    assert reply == AgentHello("2.0", 8192, ("pipelining",))
    assert conn.state is State.READY
    assert conn.max_frame_size == 8192


def test_hello_reply_keeps_our_smaller_frame_size() -> None:
    conn = AgentConnection(max_frame_size=1024)
    conn.receive_data(encode_frame(HELLO))
    hello = conn.next_event()
    assert isinstance(hello, HaproxyHello)
    reply, _ = decode_frame(conn.hello_reply(hello))
    assert isinstance(reply, AgentHello) and reply.max_frame_size == 1024


def test_pipelining_not_announced_when_haproxy_lacks_it() -> None:
    conn = AgentConnection()
    conn.receive_data(encode_frame(HaproxyHello(("2.0",), 16380, ())))
    hello = conn.next_event()
    assert isinstance(hello, HaproxyHello)
    reply, _ = decode_frame(conn.hello_reply(hello))
    assert isinstance(reply, AgentHello) and reply.capabilities == ()


def test_health_check_hello_closes_after_reply() -> None:
    conn = AgentConnection()
    conn.receive_data(encode_frame(HaproxyHello(("2.0",), 16380, (), healthcheck=True)))
    hello = conn.next_event()
    assert isinstance(hello, HaproxyHello) and hello.healthcheck
    conn.hello_reply(hello)
    assert conn.state is State.CLOSED


@pytest.mark.parametrize("versions", [("1.0",), ("3.0",), ("abc",), ()])
def test_hello_without_major_version_2_is_version_mismatch(versions: tuple[str, ...]) -> None:
    conn = AgentConnection()
    conn.receive_data(encode_frame(HaproxyHello(versions, 16380, ())))
    with pytest.raises(UnsupportedVersion) as err:
        conn.next_event()
    assert err.value.status_code == 8


def test_hello_announcing_a_later_minor_of_2_is_accepted() -> None:
    conn = AgentConnection()
    conn.receive_data(encode_frame(HaproxyHello(("2.3", "1.0"), 16380, ())))
    assert isinstance(conn.next_event(), HaproxyHello)


def test_hello_with_tiny_max_frame_size_is_rejected() -> None:
    conn = AgentConnection()
    conn.receive_data(encode_frame(HaproxyHello(("2.0",), 255, ())))
    with pytest.raises(BadFrameSize) as err:
        conn.next_event()
    assert err.value.status_code == 9


def test_notify_before_hello_is_invalid_frame() -> None:
    conn = AgentConnection()
    conn.receive_data(encode_frame(notify("a")))
    with pytest.raises(InvalidFrame, match="NOTIFY before HELLO") as err:
        conn.next_event()
    assert err.value.status_code == 4


def test_second_hello_is_invalid() -> None:
    conn = ready_connection()
    conn.receive_data(encode_frame(HELLO))
    with pytest.raises(InvalidFrame, match="second"):
        conn.next_event()


def test_agent_frames_from_haproxy_are_invalid() -> None:
    conn = ready_connection()
    conn.receive_data(encode_frame(Ack(1, 1)))
    with pytest.raises(InvalidFrame, match="unexpected Ack"):
        conn.next_event()


def test_frames_above_negotiated_size_are_too_big() -> None:
    conn = AgentConnection(max_frame_size=16380)
    conn.receive_data(encode_frame(HaproxyHello(("2.0",), 300, ())))
    hello = conn.next_event()
    assert isinstance(hello, HaproxyHello)
    conn.hello_reply(hello)
    conn.receive_data(encode_frame(notify("x" * 400)))
    with pytest.raises(FrameTooBig):
        conn.next_event()


def test_pipelined_notifies_come_out_in_order() -> None:
    conn = ready_connection()
    conn.receive_data(b"".join(encode_frame(notify(f"t{i}", 100 + i)) for i in range(20)))
    events = list(conn.events())
    assert [e.stream_id for e in events if isinstance(e, Notify)] == list(range(100, 120))


def test_valid_frames_before_a_bad_one_are_delivered_first() -> None:
    conn = ready_connection()
    conn.receive_data(encode_frame(notify("a")) + frame_bytes(77, b""))
    assert conn.next_event() == notify("a")
    with pytest.raises(InvalidFrame):
        conn.next_event()


def test_haproxy_disconnect_closes_and_ignores_the_rest() -> None:
    conn = ready_connection()
    conn.receive_data(encode_frame(HaproxyDisconnect(0, "normal")) + b"garbage")
    assert conn.next_event() == HaproxyDisconnect(0, "normal")
    assert conn.state is State.CLOSED
    assert conn.next_event() is None
    raw = conn.send(AgentDisconnect(0, "normal"))
    assert decode_frame(raw)[0] == AgentDisconnect(0, "normal")


def test_ack_before_hello_is_a_local_error() -> None:
    with pytest.raises(RuntimeError):
        AgentConnection().send(Ack(1, 1))


def test_agent_disconnect_for_error_truncates_message() -> None:
    frame = AgentDisconnect.for_error(InvalidFrame("x" * 1000))
    assert frame.status_code == 4 and len(frame.message) == 255


def test_frame_ids_must_fit_64_bits() -> None:
    with pytest.raises(ValueError):
        Ack(-1, 0)
    with pytest.raises(ValueError):
        encode_frame(Notify(0, 2**64, ()))
