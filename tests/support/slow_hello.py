"""A slow-HELLO flood against an SPOE agent on 127.0.0.1, for tests.

Many TCP connections, each sending one more byte of a HAPROXY-HELLO per
`step()` and never its last byte: the attack of issue 9 ("1000 local TCP
peers trickling one byte of a HELLO every 5 s"). Records how the agent ended
each connection: the SPOP status of its AGENT-DISCONNECT, or None for a close
without one. Bounded in count (sockets) and time (`run(duration)`).
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections import Counter

from agent.spop import AgentDisconnect, FrameDecoder, HaproxyHello, SpopError, encode_frame

HELLO = encode_frame(HaproxyHello(("2.0",), 16380, ("pipelining",)))


class _Trickler:
    __slots__ = ("decoder", "sent", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sent = 0
        self.decoder = FrameDecoder(max_frame_size=1 << 16)


class SlowHelloFlood:
    """`count` trickling connections to 127.0.0.1:`port`.

    With `reconnect_per_step` > 0, up to that many replacements are opened per
    step for connections the agent closed (an attacker coming back).
    """

    def __init__(self, port: int, count: int, reconnect_per_step: int = 0) -> None:
        self.port = port
        self.count = count
        self.reconnect_per_step = reconnect_per_step
        self.open: list[_Trickler] = []
        self.endings: Counter[int | None] = Counter()  # status code (None: no DISCONNECT) -> n
        self.connect_failures = 0
        self.steps = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _connect(self) -> None:
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=2.0)
        except OSError:
            self.connect_failures += 1
            return
        sock.setblocking(False)
        self.open.append(_Trickler(sock))

    def connect_all(self) -> None:
        for _ in range(self.count - len(self.open)):
            self._connect()

    def step(self) -> None:
        """Read what the agent sent, note closed connections, send one byte on the others."""
        self._reap()
        for t in self.open:
            if t.sent < len(HELLO) - 1:
                try:
                    t.sock.send(HELLO[t.sent : t.sent + 1])
                    t.sent += 1
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    pass  # reset: _reap sees it next time
        missing = self.count - len(self.open)
        for _ in range(min(missing, self.reconnect_per_step)):
            self._connect()
        self.steps += 1

    def _reap(self) -> None:
        if not self.open:
            return
        by_fd = {t.sock.fileno(): t for t in self.open}
        poller = select.poll()  # not select(): descriptors above 1024 are likely here
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        for fd, _ in poller.poll(0):
            t = by_fd[fd]
            closed, status = self._read_until_closed(t)
            if closed:
                self.endings[status] += 1
                self.open.remove(t)
                t.sock.close()

    @staticmethod
    def _read_until_closed(t: _Trickler) -> tuple[bool, int | None]:
        """(closed, status of the agent's DISCONNECT or None); (False, None) while open."""
        try:
            while True:
                chunk = t.sock.recv(4096)
                if not chunk:
                    break
                t.decoder.receive_data(chunk)
        except (BlockingIOError, InterruptedError):
            return False, None
        except OSError:
            pass  # reset after (or instead of) the DISCONNECT
        try:
            for frame in t.decoder.frames():
                if isinstance(frame, AgentDisconnect):
                    return True, frame.status_code
        except SpopError:
            pass
        return True, None

    def run(self, duration: float, tick: float = 0.1) -> None:
        """connect_all, then step every `tick` s until `duration` s passed or stop()."""
        self.connect_all()
        deadline = time.monotonic() + duration
        while not self._stop.is_set() and time.monotonic() < deadline:
            self.step()
            self._stop.wait(tick)
        self._reap()

    def start(self, duration: float, tick: float = 0.1) -> None:
        """run() in a thread; stop() ends it."""
        self._thread = threading.Thread(target=self.run, args=(duration, tick), daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        """True while the thread started by start() is still flooding."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None

    def close(self) -> None:
        self.stop()
        for t in self.open:
            t.sock.close()
        self.open.clear()
