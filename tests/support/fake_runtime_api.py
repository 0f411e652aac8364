"""A misbehaving HAProxy runtime API on a unix socket, for chaos tests.

Contract:
- `FakeRuntimeAPI(path, mode)` listens on the unix socket `path`; every
  connection is answered according to `mode` (changeable at any time):
  `"close"` (accept, close at once), `"hang"` (read the command, never
  answer, keep the connection open until stop), `"drip"` (answer one byte of
  a plausible reply every `drip_interval` s, up to `drip_bytes` bytes, then
  keep the connection open), `"flood"` (answer `flood_bytes` bytes of
  garbage lines as fast as the client reads, then close).
- `.connections` counts accepted connections per mode (the faults injected).
- Runs in its own thread; `stop()` closes every connection and joins it
  (bounded), so no client is left blocked by a test that ended.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from pathlib import Path
from types import TracebackType

MODES = ("close", "hang", "drip", "flood")
_DRIP_REPLY = b"# filename\n" + b"/nonexistent/cert.pem\n" * 64


class FakeRuntimeAPI:
    """See the module docstring."""

    def __init__(
        self,
        path: Path,
        mode: str = "hang",
        *,
        drip_interval: float = 0.2,
        drip_bytes: int = 600,
        flood_bytes: int = 20 * 1024 * 1024,
    ) -> None:
        self.path = Path(path)
        self.mode = mode
        self.drip_interval = drip_interval
        self.drip_bytes = drip_bytes
        self.flood_bytes = flood_bytes
        self.connections: dict[str, int] = dict.fromkeys(MODES, 0)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._clients: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._sock: socket.socket | None = None

    @property
    def address(self) -> str:
        """The runtime_api address to put in the agent's config."""
        return f"unix:{self.path}"

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; known: {MODES}")
        self._mode = mode

    def total(self) -> int:
        with self._lock:
            return sum(self.connections.values())

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(self.path))
        os.chmod(self.path, 0o600)
        sock.listen(128)
        sock.settimeout(0.1)
        self._sock = sock
        t = threading.Thread(target=self._accept_loop, daemon=True)
        t.start()
        self._threads.append(t)

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            mode = self.mode
            with self._lock:
                self.connections[mode] += 1
                self._clients.append(client)
            t = threading.Thread(target=self._serve, args=(client, mode), daemon=True)
            t.start()
            with self._lock:
                self._threads.append(t)

    def _read_command(self, client: socket.socket) -> None:
        """Read until the command's newline (or 1 s): like HAProxy, answer after it."""
        client.settimeout(1.0)
        with contextlib.suppress(OSError):
            data = b""
            while b"\n" not in data and len(data) < 1 << 20:
                chunk = client.recv(65536)
                if not chunk:
                    return
                data += chunk

    def _serve(self, client: socket.socket, mode: str) -> None:
        try:
            if mode == "close":
                return
            self._read_command(client)
            if mode == "hang":
                self._stop.wait()
            elif mode == "drip":
                for i in range(min(self.drip_bytes, len(_DRIP_REPLY))):
                    if self._stop.wait(self.drip_interval):
                        return
                    client.sendall(_DRIP_REPLY[i : i + 1])
                self._stop.wait()
            elif mode == "flood":
                line = b"garbage garbage garbage garbage garbage garbage garbage garbage\n"
                block = line * (65536 // len(line))
                sent = 0
                client.settimeout(5.0)
                while sent < self.flood_bytes and not self._stop.is_set():
                    client.sendall(block)
                    sent += len(block)
        except OSError:
            pass  # the client gave up: that is what it should do
        finally:
            with contextlib.suppress(OSError):
                client.close()

    def stop(self) -> None:
        self._stop.set()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        with self._lock:
            clients, threads = list(self._clients), list(self._threads)
        for c in clients:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + 10
        for t in threads:
            t.join(timeout=max(deadline - time.monotonic(), 0.01))
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def __enter__(self) -> FakeRuntimeAPI:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
