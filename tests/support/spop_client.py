"""A blocking SPOP client that plays HAProxy against the agent, for tests.

Uses the project's codec to build and parse frames; `send_raw` lets a test
put any bytes on the wire. Every read has a timeout so a test cannot hang.
"""

from __future__ import annotations

import socket
import struct
from types import TracebackType

from agent.spop import (
    Ack,
    AgentDisconnect,
    AgentHello,
    Frame,
    HaproxyHello,
    Message,
    Notify,
    decode_frame,
    encode_frame,
)

TIMEOUT = 5.0  # seconds for any single read


def challenge(token: object, stream_id: int = 1, frame_id: int = 1) -> Notify:
    """The NOTIFY HAProxy sends for /.well-known/acme-challenge/<token>."""
    return Notify(stream_id, frame_id, (Message("acme-challenge", (("token", token),)),))  # type: ignore[arg-type]


class SpopClient:
    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = TIMEOUT) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.settimeout(timeout)
        self._buf = b""

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> SpopClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, frame: Frame) -> None:
        self.sock.sendall(encode_frame(frame))

    def _fill(self, n: int) -> bool:
        while len(self._buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                return False
            self._buf += chunk
        return True

    def read_frame(self) -> Frame | None:
        """The next frame from the agent, or None if it closed the connection."""
        if not self._fill(4):
            return None
        (length,) = struct.unpack(">I", self._buf[:4])
        if not self._fill(4 + length):
            return None
        frame, used = decode_frame(self._buf[: 4 + length], max_frame_size=1 << 20)
        self._buf = self._buf[used:]
        return frame

    def at_eof(self) -> bool:
        """True when the agent has closed the connection (after buffered frames)."""
        if self._buf:
            return False
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def hello(
        self,
        versions: tuple[str, ...] = ("2.0",),
        max_frame_size: int = 16380,
        capabilities: tuple[str, ...] = ("pipelining", "async"),
        healthcheck: bool = False,
    ) -> AgentHello:
        self.send(HaproxyHello(versions, max_frame_size, capabilities, healthcheck))
        reply = self.read_frame()
        assert isinstance(reply, AgentHello), reply
        return reply

    def ask(self, token: object, stream_id: int = 1, frame_id: int = 1) -> Ack:
        self.send(challenge(token, stream_id, frame_id))
        reply = self.read_frame()
        assert isinstance(reply, Ack), reply
        return reply

    def expect_disconnect(self) -> AgentDisconnect:
        """Read until AGENT-DISCONNECT; assert the agent then closes."""
        while True:
            frame = self.read_frame()
            assert frame is not None, "agent closed without AGENT-DISCONNECT"
            if isinstance(frame, AgentDisconnect):
                break
        assert self.at_eof(), "agent kept the connection open after AGENT-DISCONNECT"
        return frame
