"""Start a real `redis-server` for tests: own config file, own dir, free loopback port.

Contract:
- `RedisProcess(workdir)` writes `workdir/redis.conf` (bind 127.0.0.1, a port
  from `free_port`, `dir workdir`, no RDB snapshots unless `save` is given,
  AOF only with `appendonly=True`, protected mode off since it only binds
  loopback), starts Debian's `/usr/bin/redis-server` on it in the foreground,
  and waits, bounded, until PING answers. It keeps the Popen handle and stops
  the process through it (SIGTERM, then SIGKILL), never by name.
- `kill()` is SIGKILL (a crash: nothing flushed); `start()` again reuses the
  same port and dir (a restart; with `appendonly=False` it comes back empty).
- `SentinelProcess(workdir, primary, service)` starts Debian's `redis-sentinel`
  monitoring `primary` (quorum 1, down after 500 ms) with its own config
  (which Sentinel rewrites) and port; stopped by its handle like the server.
- `counting_client(url)` is a real redis-py client whose `RoundTrips` counts
  every write to the server (one command, or one whole pipeline): tests that
  a pass makes O(1) round trips, not one per certificate.
- `REDIS_SERVER` is the binary; `redis_available()` says whether it exists
  (scripts/setup.sh installs Debian's redis-server and redis-sentinel).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from shutil import which
from types import TracebackType

import redis

from tests.support.haproxy import free_port, stop_process

REDIS_SERVER = os.environ.get("REDIS_SERVER", "/usr/bin/redis-server")
START_TIMEOUT = 10.0  # s until PING must answer


def redis_available() -> bool:
    return Path(REDIS_SERVER).is_file() or which(REDIS_SERVER) is not None


class RedisError(RuntimeError):
    """redis-server did not start or answer; the message holds its log tail."""


class RedisProcess:
    BINARY = REDIS_SERVER  # the server `start` runs (SentinelProcess: redis-sentinel)
    def __init__(
        self,
        workdir: Path,
        *,
        appendonly: bool = False,
        save: str = "",
        extra: str = "",
        port: int | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.appendonly = appendonly
        self.save = save
        self.extra = extra
        self.conf = self.workdir / "redis.conf"
        self.log = self.workdir / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def _write_conf(self) -> None:
        self.conf.write_text(
            "\n".join(
                [
                    f"port {self.port}",
                    f"bind {self.host}",
                    "protected-mode no",
                    f"dir {self.workdir}",
                    f"logfile {self.log}",
                    "daemonize no",
                    f'save "{self.save}"',
                    f"appendonly {'yes' if self.appendonly else 'no'}",
                    "appendfsync always",
                    self.extra,
                    "",
                ]
            )
        )

    def start(self) -> RedisProcess:
        self._write_conf()
        self.proc = subprocess.Popen(
            [self.BINARY, str(self.conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        import redis

        deadline = time.monotonic() + START_TIMEOUT
        client = redis.Redis(host=self.host, port=self.port, socket_timeout=1)
        try:
            for _ in range(1000):
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RedisError(f"redis-server exited {self.proc.returncode}: {self._tail()}")
                try:
                    if client.ping():
                        return
                except (redis.AuthenticationError, redis.ResponseError):
                    return  # it answered: a server whose default user is off (ACL tests)
                except redis.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    break
                time.sleep(0.02)
        finally:
            client.close()
        self.stop()
        raise RedisError(f"redis-server on port {self.port} did not answer: {self._tail()}")

    def _tail(self) -> str:
        try:
            return self.log.read_text()[-2000:]
        except OSError:
            return "(no log)"

    def kill(self) -> None:
        """SIGKILL through the handle (a crash)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is None:
            return
        stop_process(self.proc, 10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None

    def __enter__(self) -> RedisProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


REDIS_SENTINEL = os.environ.get("REDIS_SENTINEL", "/usr/bin/redis-sentinel")


class SentinelProcess(RedisProcess):
    BINARY = REDIS_SENTINEL

    def __init__(self, workdir: Path, primary: RedisProcess, service: str = "fleet") -> None:
        super().__init__(workdir)
        self.primary = primary
        self.service = service

    def _write_conf(self) -> None:
        self.conf.write_text(
            "\n".join(
                [
                    f"port {self.port}",
                    f"bind {self.host}",
                    "protected-mode no",
                    f"dir {self.workdir}",
                    f"logfile {self.log}",
                    "daemonize no",
                    f"sentinel monitor {self.service} {self.primary.host} {self.primary.port} 1",
                    f"sentinel down-after-milliseconds {self.service} 500",
                    f"sentinel failover-timeout {self.service} 3000",
                    f"sentinel parallel-syncs {self.service} 1",
                    "",
                ]
            )
        )


def shared_redis(tmp_path_factory: object) -> RedisProcess:
    """One redis-server per test session (tests isolate themselves by namespace).

    Used by the `redis_server` fixture below; started lazily, stopped at exit."""
    global _SHARED
    if _SHARED is None:
        import atexit

        base = tmp_path_factory.mktemp("redis")  # type: ignore[attr-defined]
        _SHARED = RedisProcess(base).start()
        atexit.register(_SHARED.stop)
    return _SHARED


_SHARED: RedisProcess | None = None


class RoundTrips:
    """Counts the round trips of a redis-py client made by `counting_client`: one per
    write to the server of one command or of one whole pipeline (redis-py sends a
    pipeline's commands in one write, then reads the replies)."""

    def __init__(self) -> None:
        self.count = 0
        self.lock = threading.Lock()


def counting_client(url: str) -> tuple[redis.Redis, RoundTrips]:
    """A real redis-py client on `url` whose connections count their round trips."""
    trips = RoundTrips()

    class Counting(redis.Connection):
        def send_packed_command(self, command: object, check_health: bool = True) -> None:
            with trips.lock:
                trips.count += 1
            super().send_packed_command(command, check_health)  # type: ignore[no-untyped-call]

    pool = redis.ConnectionPool.from_url(url, connection_class=Counting)
    return redis.Redis(connection_pool=pool), trips
