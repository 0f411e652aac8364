"""Local control socket: how `renew` (and `status`) talk to a running daemon.

A unix socket (mode 0600, inside the 0700 state dir by default) carrying one
JSON object per line each way: a request `{"cmd": "renew", ...}` and its
reply. It is deliberately not the metrics port: only local processes of the
agent's own user may ask the daemon to act.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class ControlUnavailable(Exception):
    """No daemon answers on the control socket."""


class ControlServer:
    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self._handler = handler
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        if self.path.exists() or self.path.is_symlink():
            if _answers(self.path):
                raise OSError(f"control socket {self.path} is in use: is another daemon running?")
            self.path.unlink()  # left behind by a daemon that died
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._handle, path=str(self.path), limit=MAX_REQUEST
            )
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def stop(self) -> None:
        if self._server is None:
            return  # never started: the path may belong to another daemon
        self._server.close()
        await self._server.wait_closed()
        self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=10.0)
            try:
                request = json.loads(line)
                if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
                    raise ValueError("a request is a JSON object with a string 'cmd'")
                reply = await self._handler(request)
            except (ValueError, KeyError, TypeError) as e:
                reply = {"ok": False, "error": f"bad control request: {e}"}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        except Exception:
            log.exception("control socket: request failed")
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(path))
        except OSError:
            return False
        return True


def request(path: Path, message: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Send one request to the daemon and return its reply.

    Raises ControlUnavailable when nothing listens on `path`; `timeout` (seconds)
    bounds the whole exchange, since a renewal may take minutes.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise ControlUnavailable(str(path)) from e
        s.sendall(json.dumps(message).encode() + b"\n")
        buf = bytearray()
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
            if len(buf) > 64 * 1024 * 1024:
                raise ValueError(f"control reply from {path} is too large")
    if not buf:
        raise ControlUnavailable(f"{path}: the daemon closed the connection without a reply")
    reply = json.loads(buf)
    if not isinstance(reply, dict):
        raise ValueError(f"control reply from {path} is not a JSON object")
    return reply
