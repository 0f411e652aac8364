"""Sans-IO codec for SPOP 2.0, the protocol HAProxy's SPOE filter speaks to agents.

Bytes in, typed frames out; frames in, bytes out. Nothing here touches a
socket or an event loop (the asyncio server is `agent.spoa`). The spec is
HAProxy's doc/SPOE.txt (2.6, and 3.1+ which requires FIN on every frame).

Wire format, all integers big-endian::

    <LENGTH:u32> <TYPE:u8> <FLAGS:u32> <STREAM-ID:varint> <FRAME-ID:varint> <PAYLOAD>

Every decoding failure raises a subclass of `SpopError` whose `status_code`
is the SPOP status to put into the AGENT-DISCONNECT frame sent back.

`AgentConnection` is the agent-side state machine (HELLO first, then NOTIFYs,
then DISCONNECT); `FrameDecoder` and `encode_frame`/`decode_frame` are
role-neutral so tests can play HAProxy with the same code.

Speed: every challenge request costs one NOTIFY decode and one ACK encode,
so the NOTIFY path (`AgentConnection.next_event`, `_decode_messages`) and
the ACK helpers (`encode_ack_set_txn_string`, `encode_empty_ack`) are
written for CPython's speed, not for beauty: inlined one-byte varints and
lengths, NamedTuples, small bounded caches. The general decoders behind
them define the semantics; tests check the fast paths agree.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from typing import Final, NamedTuple, TypeAlias

# --------------------------------------------------------------------------- constants


class FrameType(IntEnum):
    """SPOP frame types (doc/SPOE.txt 3.2.2). UNSET (0) only appears in fragments."""

    UNSET = 0
    HAPROXY_HELLO = 1
    HAPROXY_DISCONNECT = 2
    NOTIFY = 3
    AGENT_HELLO = 101
    AGENT_DISCONNECT = 102
    ACK = 103


class DataType(IntEnum):
    """Typed-data type ids (low nibble of the type byte)."""

    NULL = 0
    BOOL = 1
    INT32 = 2
    UINT32 = 3
    INT64 = 4
    UINT64 = 5
    IPV4 = 6
    IPV6 = 7
    STRING = 8
    BINARY = 9


class Scope(IntEnum):
    """Variable scopes of SET-VAR / UNSET-VAR actions."""

    PROC = 0
    SESS = 1
    TXN = 2
    REQ = 3
    RES = 4


class ActionType(IntEnum):
    SET_VAR = 1
    UNSET_VAR = 2


class Status(IntEnum):
    """DISCONNECT status codes (doc/SPOE.txt 3.5, identical in 2.6 and 3.1+)."""

    NORMAL = 0
    IO_ERROR = 1
    TIMEOUT = 2
    TOO_BIG = 3
    INVALID = 4
    NO_VERSION = 5
    NO_FRAME_SIZE = 6
    NO_CAPABILITIES = 7
    BAD_VERSION = 8
    BAD_FRAME_SIZE = 9
    FRAGMENTATION_NOT_SUPPORTED = 10
    INTERLACED_FRAMES = 11
    FRAME_ID_NOT_FOUND = 12
    RESOURCE = 13
    UNKNOWN = 99


# HAProxy's own wording (src/flt_spoe.c spoe_frm_err_reasons), used as default messages.
STATUS_REASONS: Final[dict[int, str]] = {
    Status.NORMAL: "normal",
    Status.IO_ERROR: "I/O error",
    Status.TIMEOUT: "a timeout occurred",
    Status.TOO_BIG: "frame is too big",
    Status.INVALID: "invalid frame received",
    Status.NO_VERSION: "version value not found",
    Status.NO_FRAME_SIZE: "max-frame-size value not found",
    Status.NO_CAPABILITIES: "capabilities value not found",
    Status.BAD_VERSION: "unsupported version",
    Status.BAD_FRAME_SIZE: "max-frame-size too big or too small",
    Status.FRAGMENTATION_NOT_SUPPORTED: "fragmentation not supported",
    Status.INTERLACED_FRAMES: "invalid interlaced frames",
    Status.FRAME_ID_NOT_FOUND: "frame-id not found",
    Status.RESOURCE: "resource allocation error",
    Status.UNKNOWN: "an unknown error occurred",
}

FLAG_FIN: Final = 0x00000001
FLAG_ABORT: Final = 0x00000002

SPOP_VERSION: Final = "2.0"
MIN_FRAME_SIZE: Final = 256  # the spec's floor for max-frame-size
DEFAULT_MAX_FRAME_SIZE: Final = 16380  # HAProxy's default: tune.bufsize (16384) - 4
MAX_VARINT: Final = (1 << 64) - 1
_MAX_VARINT_BYTES: Final = 10  # 4 + 7*9 = 67 bits cover any uint64
_MIN_FRAME: Final = 7  # type + flags + two one-byte varints
_U32 = struct.Struct(">I")
_HDR = struct.Struct(">IBI")  # length, type, flags

# --------------------------------------------------------------------------- errors


class SpopError(Exception):
    """A protocol failure: `SpopError(status_code, message)`.

    `status_code` is what to send in AGENT-DISCONNECT; `message` says what was
    wrong (it becomes the DISCONNECT message, truncated to 255 bytes). The
    subclasses fix the status code and take only the message.
    """

    status_code: int = Status.UNKNOWN

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(status_code, message)
        self.status_code = status_code
        self.message = message

    def __str__(self) -> str:
        reason = STATUS_REASONS.get(self.status_code, "agent-defined")
        return f"SPOP status {self.status_code} ({reason}): {self.message}"


class _FixedStatus(SpopError):
    def __init__(self, message: str) -> None:
        super().__init__(type(self).status_code, message)


class FrameTooBig(_FixedStatus):
    status_code = Status.TOO_BIG


class InvalidFrame(_FixedStatus):
    status_code = Status.INVALID


class NoVersion(_FixedStatus):
    status_code = Status.NO_VERSION


class NoFrameSize(_FixedStatus):
    status_code = Status.NO_FRAME_SIZE


class NoCapabilities(_FixedStatus):
    status_code = Status.NO_CAPABILITIES


class UnsupportedVersion(_FixedStatus):
    status_code = Status.BAD_VERSION


class BadFrameSize(_FixedStatus):
    status_code = Status.BAD_FRAME_SIZE


class FragmentationNotSupported(_FixedStatus):
    status_code = Status.FRAGMENTATION_NOT_SUPPORTED


# --------------------------------------------------------------------------- typed data


class _Sized(int):
    """An int that remembers its SPOP integer type; range-checked at construction."""

    data_type: DataType = DataType.INT64
    lo: int = -(1 << 63)
    hi: int = (1 << 63) - 1

    def __new__(cls, value: int) -> _Sized:
        if not cls.lo <= value <= cls.hi:
            raise ValueError(f"{value} does not fit SPOP {cls.data_type.name}")
        return super().__new__(cls, value)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({int(self)})"


class Int32(_Sized):
    data_type = DataType.INT32
    lo, hi = -(1 << 31), (1 << 31) - 1


class Uint32(_Sized):
    data_type = DataType.UINT32
    lo, hi = 0, (1 << 32) - 1


class Int64(_Sized):
    data_type = DataType.INT64
    lo, hi = -(1 << 63), (1 << 63) - 1


class Uint64(_Sized):
    data_type = DataType.UINT64
    lo, hi = 0, (1 << 64) - 1


# A decoded value: None=NULL, bool, Int32/Uint32/Int64/Uint64 (plain int encodes as
# INT64, or UINT64 when too large), IPv4/IPv6 addresses, str=STRING (UTF-8), bytes=BINARY.
Value: TypeAlias = bool | int | ipaddress.IPv4Address | ipaddress.IPv6Address | str | bytes | None
_INT_TYPES: Final[dict[int, type[_Sized]]] = {
    DataType.INT32: Int32,
    DataType.UINT32: Uint32,
    DataType.INT64: Int64,
    DataType.UINT64: Uint64,
}

# --------------------------------------------------------------------------- varints


def encode_varint(value: int) -> bytes:
    """HAProxy's "peers" varint (include/haproxy/intops.h encode_varint)."""
    if value < 240:
        if value < 0:
            raise ValueError(f"varint cannot encode negative {value}")
        return bytes((value,))
    # Unrolled 2- and 3-byte forms: stream ids of HAProxy 2.6 are its stream
    # counter, so these are on the hot path of every ACK.
    if value < 2288:
        return bytes(((value & 0xFF) | 0xF0, (value - 240) >> 4))
    if value < 264432:
        rest = (value - 240) >> 4
        return bytes(((value & 0xFF) | 0xF0, (rest & 0xFF) | 0x80, (rest - 128) >> 7))
    if value > MAX_VARINT:
        raise ValueError(f"varint cannot encode {value} (> 2**64-1)")
    out = bytearray(((value & 0xFF) | 0xF0,))
    value = (value - 240) >> 4
    while value >= 128:
        out.append((value & 0xFF) | 0x80)
        value = (value - 128) >> 7
    out.append(value)
    return bytes(out)


def decode_varint(data: bytes, pos: int) -> tuple[int, int]:
    """Decode a varint at `pos`; returns (value, next position). Raises InvalidFrame."""
    try:
        value = data[pos]
    except IndexError:
        raise InvalidFrame("truncated varint") from None
    pos += 1
    if value < 240:
        return value, pos
    shift = 4
    end = len(data)
    limit = pos + _MAX_VARINT_BYTES - 1
    while True:
        if pos >= end:
            raise InvalidFrame("truncated varint")
        if pos >= limit:
            raise InvalidFrame("varint longer than 10 bytes")
        b = data[pos]
        pos += 1
        # HAProxy adds the whole byte, continuation bit included; the encoder compensates.
        value += b << shift
        shift += 7
        if b < 128:
            break
    if value > MAX_VARINT:
        raise InvalidFrame("varint exceeds 64 bits")
    return value, pos


_VARINT_CACHE: Final[list[bytes]] = [encode_varint(i) for i in range(4096)]


def _varint(value: int) -> bytes:
    return _VARINT_CACHE[value] if 0 <= value < 4096 else encode_varint(value)


def encode_string(value: str | bytes) -> bytes:
    """<LENGTH:varint><BYTES> without a type byte (names, message names)."""
    raw = value.encode() if isinstance(value, str) else value
    return _varint(len(raw)) + raw


def _decode_bytes(data: bytes, pos: int, end: int) -> tuple[bytes, int]:
    length, pos = decode_varint(data, pos)
    stop = pos + length
    if stop > end:
        raise InvalidFrame(f"string of {length} bytes runs past the end of the frame")
    return data[pos:stop], stop


def _decode_str(data: bytes, pos: int, end: int) -> tuple[str, int]:
    # Hot path: one-byte lengths are decoded inline (one call per string, not three).
    if pos < end and (length := data[pos]) < 240:
        pos += 1
    else:
        length, pos = decode_varint(data, pos)
    stop = pos + length
    if stop > end:
        raise InvalidFrame(f"string of {length} bytes runs past the end of the frame")
    try:
        return data[pos:stop].decode(), stop
    except UnicodeDecodeError:
        raise InvalidFrame(f"string is not valid UTF-8: {data[pos:stop][:40]!r}") from None


def encode_value(value: Value) -> bytes:
    """TYPED-DATA for a Python value (see `Value` for the mapping)."""
    if value is None:
        return b"\x00"
    if value is True:
        return b"\x11"
    if value is False:
        return b"\x01"
    if isinstance(value, str):
        raw = value.encode()
        return b"\x08" + _varint(len(raw)) + raw
    if isinstance(value, bytes | bytearray):
        return b"\x09" + _varint(len(value)) + bytes(value)
    if isinstance(value, int):
        if isinstance(value, _Sized):
            dtype = value.data_type
        elif -(1 << 63) <= value < (1 << 63):
            dtype = DataType.INT64
        elif 0 <= value <= MAX_VARINT:
            dtype = DataType.UINT64
        else:
            raise ValueError(f"integer {value} does not fit 64 bits")
        # Signed values travel as their two's complement (HAProxy casts to uint64).
        return bytes((dtype,)) + encode_varint(int(value) & MAX_VARINT)
    if isinstance(value, ipaddress.IPv4Address):
        return b"\x06" + value.packed
    if isinstance(value, ipaddress.IPv6Address):
        return b"\x07" + value.packed
    raise TypeError(f"no SPOP type for {type(value).__name__}")


def decode_value(data: bytes, pos: int, end: int | None = None) -> tuple[Value, int]:
    """Decode one TYPED-DATA at `pos`; returns (value, next position)."""
    if end is None:
        end = len(data)
    if pos >= end:
        raise InvalidFrame("truncated typed data")
    tbyte = data[pos]
    pos += 1
    dtype = tbyte & 0x0F
    if dtype == 8:  # STRING first: the hot path
        return _decode_str(data, pos, end)
    if dtype == 9:
        return _decode_bytes(data, pos, end)
    if dtype == 0:
        return None, pos
    if dtype == 1:
        return bool(tbyte & 0x10), pos
    if 2 <= dtype <= 5:
        raw, pos = decode_varint(data, pos)
        if pos > end:
            raise InvalidFrame("truncated integer")
        cls = _INT_TYPES[dtype]
        if cls.lo < 0 and raw >= (1 << 63):
            raw -= 1 << 64
        try:
            return cls(raw), pos
        except ValueError as exc:
            raise InvalidFrame(str(exc)) from None
    if dtype == 6:
        if pos + 4 > end:
            raise InvalidFrame("truncated IPv4 address")
        return ipaddress.IPv4Address(data[pos : pos + 4]), pos + 4
    if dtype == 7:
        if pos + 16 > end:
            raise InvalidFrame("truncated IPv6 address")
        return ipaddress.IPv6Address(data[pos : pos + 16]), pos + 16
    raise InvalidFrame(f"unknown typed-data type {dtype}")


KVList: TypeAlias = tuple[tuple[str, Value], ...]


def encode_kv_list(items: KVList) -> bytes:
    return b"".join(encode_string(k) + encode_value(v) for k, v in items)


def decode_kv_list(data: bytes, pos: int, end: int) -> KVList:
    """Decode KV items until `end` (the whole rest of a HELLO/DISCONNECT payload)."""
    items: list[tuple[str, Value]] = []
    while pos < end:
        name, pos = _decode_str(data, pos, end)
        value, pos = decode_value(data, pos, end)
        items.append((name, value))
    if pos != end:
        raise InvalidFrame("KV list runs past the end of the frame")
    return tuple(items)


# --------------------------------------------------------------------------- frames


class Message(NamedTuple):
    """One SPOE message of a NOTIFY: its name and (possibly unnamed) arguments.

    A NamedTuple rather than a dataclass: one is built per NOTIFY on the hot
    path. At most 255 arguments (checked when encoding).
    """

    name: str
    args: KVList = ()

    def arg(self, name: str) -> Value:
        """The value of the first argument called `name`; KeyError when absent."""
        for key, value in self.args:
            if key == name:
                return value
        raise KeyError(name)


@dataclass(frozen=True, slots=True)
class SetVar:
    """ACK action: set variable `name` in `scope` (HAProxy adds the var-prefix)."""

    scope: Scope
    name: str
    value: Value


@dataclass(frozen=True, slots=True)
class UnsetVar:
    scope: Scope
    name: str


Action: TypeAlias = SetVar | UnsetVar


def _check_id(name: str, value: int) -> None:
    if not 0 <= value <= MAX_VARINT:
        raise ValueError(f"{name} {value} outside 0..2**64-1")


@dataclass(frozen=True, slots=True)
class HaproxyHello:
    """HAPROXY-HELLO: what HAProxy offers. `healthcheck` means: answer, then close."""

    supported_versions: tuple[str, ...]
    max_frame_size: int
    capabilities: tuple[str, ...]
    healthcheck: bool = False
    engine_id: str | None = None


@dataclass(frozen=True, slots=True)
class AgentHello:
    version: str
    max_frame_size: int
    capabilities: tuple[str, ...]


class Notify(NamedTuple):
    """NOTIFY: the messages of one stream event; answer with an Ack of the same ids.

    A NamedTuple (one is built per request on the hot path); ids must be in
    0..2**64-1, which the decoder guarantees and `encode_frame` checks.
    """

    stream_id: int
    frame_id: int
    messages: tuple[Message, ...]


@dataclass(frozen=True, slots=True)
class Ack:
    stream_id: int
    frame_id: int
    actions: tuple[Action, ...] = ()

    def __post_init__(self) -> None:
        _check_id("stream-id", self.stream_id)
        _check_id("frame-id", self.frame_id)


@dataclass(frozen=True, slots=True)
class HaproxyDisconnect:
    status_code: int
    message: str


@dataclass(frozen=True, slots=True)
class AgentDisconnect:
    status_code: int
    message: str

    @classmethod
    def for_error(cls, error: SpopError) -> AgentDisconnect:
        return cls(error.status_code, error.message[:255])


Frame: TypeAlias = HaproxyHello | AgentHello | Notify | Ack | HaproxyDisconnect | AgentDisconnect


def _split_list(value: str) -> tuple[str, ...]:
    """Comma-separated list, spaces ignored (versions, capabilities)."""
    return tuple(p.strip() for p in value.split(",") if p.strip())


def frame_bytes(
    frame_type: int, payload: bytes, stream_id: int = 0, frame_id: int = 0, flags: int = FLAG_FIN
) -> bytes:
    """Length-prefixed raw frame; lets tests build anything, valid or not."""
    body = struct.pack(">BI", frame_type, flags) + _varint(stream_id) + _varint(frame_id) + payload
    return _U32.pack(len(body)) + body


def _encode_action(action: Action) -> bytes:
    if isinstance(action, SetVar):
        return (
            b"\x01\x03"
            + bytes((action.scope,))
            + encode_string(action.name)
            + (encode_value(action.value))
        )
    return b"\x02\x02" + bytes((action.scope,)) + encode_string(action.name)


def encode_frame(frame: Frame) -> bytes:
    """Serialize any frame, length prefix included, FIN always set."""
    if isinstance(frame, Ack):
        return frame_bytes(
            FrameType.ACK,
            b"".join(_encode_action(a) for a in frame.actions),
            frame.stream_id,
            frame.frame_id,
        )
    if isinstance(frame, Notify):
        _check_id("stream-id", frame.stream_id)
        _check_id("frame-id", frame.frame_id)
        for m in frame.messages:
            if len(m.args) > 255:
                raise ValueError(f"message {m.name!r} has {len(m.args)} arguments, at most 255")
        payload = b"".join(
            encode_string(m.name) + bytes((len(m.args),)) + encode_kv_list(m.args)
            for m in frame.messages
        )
        return frame_bytes(FrameType.NOTIFY, payload, frame.stream_id, frame.frame_id)
    if isinstance(frame, AgentHello):
        items: KVList = (
            ("version", frame.version),
            ("max-frame-size", Uint32(frame.max_frame_size)),
            ("capabilities", ",".join(frame.capabilities)),
        )
        return frame_bytes(FrameType.AGENT_HELLO, encode_kv_list(items))
    if isinstance(frame, HaproxyHello):
        hello: list[tuple[str, Value]] = [
            ("supported-versions", ",".join(frame.supported_versions)),
            ("max-frame-size", Uint32(frame.max_frame_size)),
            ("capabilities", ",".join(frame.capabilities)),
        ]
        if frame.healthcheck:
            hello.append(("healthcheck", True))
        if frame.engine_id is not None:
            hello.append(("engine-id", frame.engine_id))
        return frame_bytes(FrameType.HAPROXY_HELLO, encode_kv_list(tuple(hello)))
    if isinstance(frame, AgentDisconnect | HaproxyDisconnect):
        ftype = (
            FrameType.AGENT_DISCONNECT
            if isinstance(frame, AgentDisconnect)
            else FrameType.HAPROXY_DISCONNECT
        )
        items = (("status-code", Uint32(frame.status_code)), ("message", frame.message))
        return frame_bytes(ftype, encode_kv_list(items))
    raise TypeError(f"not a SPOP frame: {frame!r}")


_new_tuple = tuple.__new__  # NamedTuple construction without the keyword-handling wrapper


def _decode_messages(data: bytes, pos: int, end: int) -> tuple[Message, ...]:
    """LIST-OF-MESSAGES from data[pos:end].

    Fast path for the shape HAProxy sends for an SPOE message with exactly one
    short STRING argument: its header bytes (name, argument count, argument
    name, type byte) are looked up in a small cache, so only the value is
    decoded. Everything else, and every malformed input, takes the general
    decoder (a differential test checks both agree).
    """
    if pos < end:
        nlen = data[pos]
        head_end = pos + 1 + nlen
        if nlen < 240 and head_end + 1 < end and data[head_end] == 1:
            klen = data[head_end + 1]
            vpos = head_end + 3 + klen  # the value's length byte
            if (
                klen < 240
                and vpos < end
                and data[vpos - 1] == 8
                and data[vpos] < 240
                and vpos + 1 + data[vpos] == end
            ):
                head = data[pos:vpos]
                shape = _SHAPES.get(head)
                if shape is None:
                    shape = _learn_shape(head, nlen, klen)
                try:
                    value = data[vpos + 1 : end].decode()
                except UnicodeDecodeError:
                    raise InvalidFrame(
                        f"string is not valid UTF-8: {data[vpos + 1 : end][:40]!r}"
                    ) from None
                return (_new_tuple(Message, (shape[0], ((shape[1], value),))),)
    return _decode_messages_general(data, pos, end)


_SHAPES: dict[bytes, tuple[str, str]] = {}


def _learn_shape(head: bytes, nlen: int, klen: int) -> tuple[str, str]:
    """(message name, argument name) of a one-string-argument message header."""
    try:
        shape = (head[1 : 1 + nlen].decode(), head[nlen + 3 : nlen + 3 + klen].decode())
    except UnicodeDecodeError:
        raise InvalidFrame(f"string is not valid UTF-8: {head[:40]!r}") from None
    if len(_SHAPES) >= _NAME_CACHE_MAX:
        _SHAPES.clear()  # a peer sending random names must not grow memory
    _SHAPES[head] = shape
    return shape


def _decode_messages_general(data: bytes, pos: int, end: int) -> tuple[Message, ...]:
    # The general path: strings with one-byte lengths: strings with one-byte lengths (message names,
    # argument names, short values) are decoded inline, names through a small
    # cache; anything else falls back to the general decoders.
    messages: list[Message] = []
    names = _NAME_CACHE
    while pos < end:
        length = data[pos]
        stop = pos + 1 + length
        if length < 240 and stop <= end:
            raw = data[pos + 1 : stop]
            name = names.get(raw)
            if name is None:
                name = _cache_name(raw)
            pos = stop
        else:
            name, pos = _decode_str(data, pos, end)
        if pos >= end:
            raise InvalidFrame(f"message {name[:40]!r} has no argument count")
        nargs = data[pos]
        pos += 1
        args: list[tuple[str, Value]] = []
        for _ in range(nargs):
            if pos >= end:
                raise InvalidFrame("truncated message argument")
            length = data[pos]
            stop = pos + 1 + length
            if length < 240 and stop <= end:
                raw = data[pos + 1 : stop]
                key = names.get(raw)
                if key is None:
                    key = _cache_name(raw)
                pos = stop
            else:
                key, pos = _decode_str(data, pos, end)
            # STRING values with a one-byte length: inline too.
            if pos + 1 < end and data[pos] == 8 and (length := data[pos + 1]) < 240:
                stop = pos + 2 + length
                if stop > end:
                    raise InvalidFrame(f"string of {length} bytes runs past the end of the frame")
                try:
                    value: Value = data[pos + 2 : stop].decode()
                except UnicodeDecodeError:
                    raise InvalidFrame(
                        f"string is not valid UTF-8: {data[pos + 2 : stop][:40]!r}"
                    ) from None
                pos = stop
            else:
                value, pos = decode_value(data, pos, end)
            args.append((key, value))
        messages.append(_new_tuple(Message, (name, tuple(args))))
    return tuple(messages)


_NAME_CACHE: dict[bytes, str] = {}
_NAME_CACHE_MAX = 256  # message and argument names come from the HAProxy config: few


def _cache_name(raw: bytes) -> str:
    try:
        name = raw.decode()
    except UnicodeDecodeError:
        raise InvalidFrame(f"string is not valid UTF-8: {raw[:40]!r}") from None
    if len(_NAME_CACHE) >= _NAME_CACHE_MAX:
        _NAME_CACHE.clear()  # a peer sending random names must not grow memory
    _NAME_CACHE[raw] = name
    return name


def _decode_actions(data: bytes, pos: int, end: int) -> tuple[Action, ...]:
    actions: list[Action] = []
    while pos < end:
        if pos + 3 > end:
            raise InvalidFrame("truncated action")
        atype, nargs, scope = data[pos], data[pos + 1], data[pos + 2]
        pos += 3
        if scope > Scope.RES:
            raise InvalidFrame(f"unknown variable scope {scope}")
        name, pos = _decode_str(data, pos, end)
        if atype == ActionType.SET_VAR and nargs == 3:
            value, pos = decode_value(data, pos, end)
            actions.append(SetVar(Scope(scope), name, value))
        elif atype == ActionType.UNSET_VAR and nargs == 2:
            actions.append(UnsetVar(Scope(scope), name))
        else:
            raise InvalidFrame(f"unknown action {atype} with {nargs} arguments")
    return tuple(actions)


def _hello_fields(items: KVList) -> dict[str, Value]:
    # First occurrence wins, like HAProxy's loop; unknown items are ignored.
    fields: dict[str, Value] = {}
    for key, value in items:
        fields.setdefault(key, value)
    return fields


def _int_field(fields: dict[str, Value], key: str, missing: type[_FixedStatus]) -> int:
    value = fields.get(key)
    if value is None:
        raise missing(f"{key} value not found")
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidFrame(f"{key} must be an integer, got {type(value).__name__}")
    return int(value)


def _str_field(fields: dict[str, Value], key: str, missing: type[_FixedStatus]) -> str:
    value = fields.get(key)
    if value is None:
        raise missing(f"{key} value not found")
    if not isinstance(value, str):
        raise InvalidFrame(f"{key} must be a string, got {type(value).__name__}")
    return value


def decode_body(ftype: int, flags: int, data: bytes, pos: int, end: int) -> Frame:
    """Decode the frame whose type/flags are known and whose ids start at `pos`."""
    if not flags & FLAG_FIN or ftype == FrameType.UNSET:
        raise FragmentationNotSupported("fragmented frame (FIN flag not set)")
    stream_id, pos = decode_varint(data, pos)
    if pos < end and (frame_id := data[pos]) < 240:
        pos += 1
    else:
        frame_id, pos = decode_varint(data, pos)
    if pos > end:
        raise InvalidFrame("frame shorter than its stream-id and frame-id")
    if ftype == 3:  # NOTIFY
        return _new_tuple(Notify, (stream_id, frame_id, _decode_messages(data, pos, end)))
    if ftype == FrameType.ACK:
        return Ack(stream_id, frame_id, _decode_actions(data, pos, end))
    if ftype not in (1, 2, 101, 102):
        raise InvalidFrame(f"unknown frame type {ftype}")
    if stream_id or frame_id:
        raise InvalidFrame(f"{FrameType(ftype).name} with non-zero stream-id/frame-id")
    fields = _hello_fields(decode_kv_list(data, pos, end))
    if ftype == FrameType.HAPROXY_HELLO:
        versions = _split_list(_str_field(fields, "supported-versions", NoVersion))
        size = _int_field(fields, "max-frame-size", NoFrameSize)
        caps = _split_list(_str_field(fields, "capabilities", NoCapabilities))
        health = fields.get("healthcheck", False)
        engine = fields.get("engine-id")
        return HaproxyHello(
            versions,
            size,
            caps,
            health is True,
            engine if isinstance(engine, str) else None,
        )
    if ftype == FrameType.AGENT_HELLO:
        return AgentHello(
            _str_field(fields, "version", NoVersion),
            _int_field(fields, "max-frame-size", NoFrameSize),
            _split_list(_str_field(fields, "capabilities", NoCapabilities)),
        )
    code = _int_field(fields, "status-code", InvalidFrame)
    message = _str_field(fields, "message", InvalidFrame)
    if ftype == FrameType.HAPROXY_DISCONNECT:
        return HaproxyDisconnect(code, message)
    return AgentDisconnect(code, message)


def decode_frame(data: bytes, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> tuple[Frame, int]:
    """Decode the first complete frame of `data`: (frame, bytes consumed).

    Raises InvalidFrame when `data` holds less than one whole frame.
    """
    dec = FrameDecoder(max_frame_size)
    dec.receive_data(data)
    frame = dec.next_frame()
    if frame is None:
        raise InvalidFrame("incomplete frame")
    return frame, len(data) - dec.buffered


class _FrameBuffer:
    """Reassembles length-prefixed frames from a byte stream.

    Buffers at most one frame plus what one `receive_data` call hands in: a
    length above `max_frame_size` raises FrameTooBig as soon as its 4 bytes
    are in, before any of its payload is kept.
    """

    __slots__ = ("_buf", "_need", "_pos", "max_frame_size")

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        self.max_frame_size = max_frame_size
        self._buf = b""
        self._pos = 0
        self._need = 4  # bytes needed in the buffer before trying to parse again (>= 4)

    @property
    def buffered(self) -> int:
        """Bytes received but not yet consumed."""
        return len(self._buf) - self._pos

    def receive_data(self, data: bytes) -> None:
        if self._pos:
            self._buf = self._buf[self._pos :] + data
            self._pos = 0
        elif self._buf:
            self._buf += data
        else:
            self._buf = bytes(data)

    def _take_frame(self) -> Frame | None:
        """Decode and consume the next whole frame, or None until more data arrives."""
        buf = self._buf
        pos = self._pos
        avail = len(buf) - pos
        if avail < self._need:
            return None
        (length,) = _U32.unpack_from(buf, pos)
        if length > self.max_frame_size:
            raise FrameTooBig(
                f"frame of {length} bytes exceeds max-frame-size {self.max_frame_size}"
            )
        if length < _MIN_FRAME:
            raise InvalidFrame(f"frame of {length} bytes is shorter than a frame header")
        if avail < 4 + length:
            self._need = 4 + length
            return None
        end = pos + 4 + length
        _, ftype, flags = _HDR.unpack_from(buf, pos)
        self._consume(end)
        return decode_body(ftype, flags, buf, pos + 9, end)

    def _consume(self, end: int) -> None:
        self._need = 4
        if end == len(self._buf):
            self._buf = b""
            self._pos = 0
        else:
            self._pos = end


class FrameDecoder(_FrameBuffer):
    """Role-neutral frame reader (tests playing HAProxy, tools): any frame type."""

    __slots__ = ()

    def next_frame(self) -> Frame | None:
        """The next whole frame, or None until more data arrives. Raises SpopError."""
        return self._take_frame()

    def frames(self) -> Iterator[Frame]:
        """Every whole frame buffered now; raises SpopError at the first bad one."""
        while (frame := self._take_frame()) is not None:
            yield frame


# --------------------------------------------------------------------------- agent state machine


class State(IntEnum):
    AWAIT_HELLO = 0
    READY = 1
    CLOSED = 2


_HAPROXY_TO_AGENT: Final = (HaproxyHello, Notify, HaproxyDisconnect)


_READY: Final = State.READY


class AgentConnection(_FrameBuffer):
    """Agent side of one SPOP connection: validates order and negotiates HELLO.

    Use: `receive_data(bytes)`, then `next_event()` until None; `send(frame)`
    returns the bytes to write. Any SpopError means: send
    `AgentDisconnect.for_error(err)` (via `send`) and close the socket.
    After a HaproxyDisconnect or a health-check HELLO the caller answers and
    closes; the connection is then CLOSED and ignores further input.
    """

    __slots__ = ("capabilities", "peer_capabilities", "state")

    def __init__(
        self,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        capabilities: tuple[str, ...] = ("pipelining",),
    ) -> None:
        if max_frame_size < MIN_FRAME_SIZE:
            raise ValueError(f"max_frame_size must be at least {MIN_FRAME_SIZE}")
        super().__init__(max_frame_size)
        self.capabilities = capabilities
        self.peer_capabilities: tuple[str, ...] = ()
        self.state = State.AWAIT_HELLO

    def receive_data(self, data: bytes) -> None:
        if self.state is not State.CLOSED:
            super().receive_data(data)

    def next_event(self) -> HaproxyHello | Notify | HaproxyDisconnect | None:
        """The next event, or None until more data arrives. Raises SpopError."""
        # Hot path, inlined: a whole, unfragmented NOTIFY on a READY connection.
        # Anything else (partial, oversized, other types, bad flags) goes the
        # general way, which also produces the right error.
        buf = self._buf
        pos = self._pos
        avail = len(buf) - pos
        if avail < self._need:
            return None
        if self.state is _READY and avail >= 11 and buf[pos + 4] == 3 and buf[pos + 8] & 1:
            (length,) = _U32.unpack_from(buf, pos)
            end = pos + 4 + length
            if _MIN_FRAME <= length <= self.max_frame_size and end <= len(buf):
                self._need = 4  # consumed: same as _consume(end), inlined
                if end == len(buf):
                    self._buf = b""
                    self._pos = 0
                else:
                    self._pos = end
                p = pos + 9
                if (stream_id := buf[p]) < 240:
                    p += 1
                else:
                    stream_id, p = decode_varint(buf, p)
                if p < end and (frame_id := buf[p]) < 240:
                    p += 1
                else:
                    frame_id, p = decode_varint(buf, p)
                if p > end:
                    raise InvalidFrame("frame shorter than its stream-id and frame-id")
                return _new_tuple(Notify, (stream_id, frame_id, _decode_messages(buf, p, end)))
        return self._next_event_slow()

    def _next_event_slow(self) -> HaproxyHello | Notify | HaproxyDisconnect | None:
        if self.state is State.CLOSED:
            return None
        frame = self._take_frame()
        if frame is None:
            return None
        if isinstance(frame, Notify):
            if self.state is not State.READY:
                raise InvalidFrame("NOTIFY before HELLO")
            return frame
        if not isinstance(frame, _HAPROXY_TO_AGENT):
            raise InvalidFrame(f"unexpected {type(frame).__name__} frame from HAProxy")
        if isinstance(frame, HaproxyDisconnect):
            self.state = State.CLOSED
            return frame
        if self.state is not State.AWAIT_HELLO:
            raise InvalidFrame("second HAPROXY-HELLO on the same connection")
        self._check_hello(frame)
        return frame

    def events(self) -> Iterator[HaproxyHello | Notify | HaproxyDisconnect]:
        while (event := self.next_event()) is not None:
            yield event

    def _check_hello(self, hello: HaproxyHello) -> None:
        majors = set()
        for v in hello.supported_versions:
            major, dot, minor = v.partition(".")
            if dot and major.isdigit() and minor.isdigit():
                majors.add(int(major))
        if 2 not in majors:
            raise UnsupportedVersion(
                f"HAProxy offers SPOP {','.join(hello.supported_versions) or 'nothing'}, "
                f"this agent speaks {SPOP_VERSION}"
            )
        if hello.max_frame_size < MIN_FRAME_SIZE:
            raise BadFrameSize(f"max-frame-size {hello.max_frame_size} below {MIN_FRAME_SIZE}")
        self.peer_capabilities = hello.capabilities

    def hello_reply(self, hello: HaproxyHello) -> bytes:
        """AGENT-HELLO for `hello`: version 2.0, min(ours, HAProxy's) frame size.

        Switches the connection to READY (or CLOSED for a health check).
        """
        size = min(self.max_frame_size, hello.max_frame_size)
        self.max_frame_size = size
        offered = set(hello.capabilities)
        caps = tuple(c for c in self.capabilities if c in offered)
        self.state = State.CLOSED if hello.healthcheck else State.READY
        return encode_frame(AgentHello(SPOP_VERSION, size, caps))

    def send(self, frame: Ack | AgentDisconnect) -> bytes:
        """Bytes for an agent frame; AGENT-DISCONNECT closes the connection."""
        if isinstance(frame, AgentDisconnect):
            self.state = State.CLOSED
            return encode_frame(frame)
        if self.state is not State.READY:
            raise RuntimeError("ACK before the HELLO handshake")
        data = encode_frame(frame)
        if len(data) - 4 > self.max_frame_size:
            raise FrameTooBig(f"ACK of {len(data) - 4} bytes exceeds max-frame-size")
        return data


# --------------------------------------------------------------------------- hot path helpers

_ACK_PREFIX: Final = bytes((FrameType.ACK,)) + FLAG_FIN.to_bytes(4, "big")


_SET_TXN_SUFFIXES: dict[tuple[str, bytes], bytes] = {}
_SET_TXN_SUFFIXES_MAX = 1024  # pending challenges at once: a few per certificate


def encode_ack_set_txn_string(stream_id: int, frame_id: int, name: str, value: bytes) -> bytes:
    """ACK carrying one `set-var txn <name> <string value>`: the challenge answer.

    Same bytes as encode_frame(Ack(..., (SetVar(Scope.TXN, name, value.decode()),))),
    without building objects on the hot path; the action bytes of recent
    answers are cached (the CA fetches each token several times).
    """
    key = (name, value)
    suffix = _SET_TXN_SUFFIXES.get(key)
    if suffix is None:
        if len(_SET_TXN_SUFFIXES) >= _SET_TXN_SUFFIXES_MAX:
            _SET_TXN_SUFFIXES.clear()
        suffix = b"\x01\x03\x02" + encode_string(name) + b"\x08" + _varint(len(value)) + value
        _SET_TXN_SUFFIXES[key] = suffix
    sid = _VARINT_CACHE[stream_id] if 0 <= stream_id < 4096 else encode_varint(stream_id)
    fid = _VARINT_CACHE[frame_id] if 0 <= frame_id < 4096 else encode_varint(frame_id)
    return b"".join(
        (_U32.pack(5 + len(sid) + len(fid) + len(suffix)), _ACK_PREFIX, sid, fid, suffix)
    )


def set_txn_string_action(name: str, value: str) -> bytes:
    """The action bytes of `set-var txn <name> <string value>`, cached.

    `encode_ack_set_txn_string(s, f, name, value.encode())` is
    `ack_head(len(ids) + len(action)) + ids + action` with `ids` the varints
    of s and f: the SPOA's fast path echoes HAProxy's id bytes instead of
    re-encoding them.
    """
    key = (name, value)
    action = _SET_TXN_ACTIONS.get(key)
    if action is None:
        if len(_SET_TXN_ACTIONS) >= _SET_TXN_SUFFIXES_MAX:
            _SET_TXN_ACTIONS.clear()
        raw = value.encode()
        action = b"\x01\x03\x02" + encode_string(name) + b"\x08" + _varint(len(raw)) + raw
        _SET_TXN_ACTIONS[key] = action
    return action


_SET_TXN_ACTIONS: dict[tuple[str, str], bytes] = {}


def ack_head(rest: int) -> bytes:
    """Length, type and flags of an ACK whose ids and actions take `rest` bytes."""
    return _U32.pack(5 + rest) + _ACK_PREFIX


def encode_empty_ack(stream_id: int, frame_id: int) -> bytes:
    sid = _VARINT_CACHE[stream_id] if 0 <= stream_id < 4096 else encode_varint(stream_id)
    fid = _VARINT_CACHE[frame_id] if 0 <= frame_id < 4096 else encode_varint(frame_id)
    return b"".join((_U32.pack(5 + len(sid) + len(fid)), _ACK_PREFIX, sid, fid))
