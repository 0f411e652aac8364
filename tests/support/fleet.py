"""A three-node fleet for integration tests and bench/fleet.py: one real redis-server,
one Pebble (+ pebble-challtestsrv), and per node a real HAProxy + a real agent
daemon (`haproxy-acme-agent run`) on its own loopback address.

Topology (all of 127/8 reaches `lo` on Linux):

    node a  127.0.0.2   HAProxy :HTTP (challenges) :HTTPS (crt-list)  agent SPOA/metrics
    node b  127.0.0.3   the same ports, bound on its own address
    node c  127.0.0.4
    Redis   127.0.0.1:<free>   (each node reaches it through its own `Relay`,
                                so one node can be cut off)
    Pebble  127.0.0.1:<free>   httpPort = HTTP, the same on every node

Contract:
- `Fleet(workdir, haproxy_binary, ...)` picks one HTTP and one HTTPS port free on
  every node address (Pebble's `httpPort` must be the same for all), writes each
  node's HAProxy config (the shipped haproxy/haproxy.cfg + spoe-acme.conf, with
  an access log to stdout: `fleet-node=<name> ... uri=<path> status=<code>`
  lines in `<node>/haproxy/haproxy.log`), one TLS key for the certificates
  copied to every node (0600, as an operator provisions it), one fleet secret
  (0600) copied to every node, and each node's agent config (`[fleet]` with the
  same namespace, `node = <name>`). Nothing runs until `start()`.
- `start()` starts Redis, Pebble, the three HAProxy and then the agents
  (`start_agents=False` leaves the agents to the test). `stop()` stops
  everything by its own handle (SIGTERM then SIGKILL; a SIGSTOPped agent is
  continued first), agents first, Redis last.
- `point(domain, node, ...)` makes challtestsrv answer `domain` with the node's
  address (`/add-a`): Pebble's http-01 validation for it reaches that node's
  HAProxy. A name never pointed resolves to 127.0.0.1, where nothing listens
  on the HTTP port: its validation fails.
- `FleetNode`: `start_agent()` (waits, bounded, for /healthz to answer and the
  SPOA port to accept), `stop_agent()`, `kill_agent()` (SIGKILL),
  `pause_agent()` / `resume_agent()` (SIGSTOP / SIGCONT), `served_serial(domain)`
  (a real TLS handshake to the node's address; None for the fallback
  certificate), `challenge_hits()` (the challenge tokens this HAProxy answered
  200, from its log), `healthz()`, `metrics()`, `cli(...)` (the agent CLI on this
  node's config), `relay.cut()` / `relay.restore()`; `Fleet.validated_tokens(name)`
  (the tokens Pebble's validations asked that name for, from Pebble's log).
- As root (CI) each agent runs in its own UTS namespace (`unshare --uts`) with
  the node name as host name, so the lock records of two nodes name two hosts
  and a dead node's lock is judged by its lease, as between machines; without
  root they share the host name and a dead holder is seen at once by its PID.
- Every wait is bounded; the fixture sends traffic only to 127.0.0.0/8.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.support.acme_stack import SHIPPED_CFG, SHIPPED_SPOE, toml_value
from tests.support.certs import key_pem, make_key, write_crt_list
from tests.support.haproxy import HAProxyProcess, free_port, stop_process
from tests.support.pebble import PebbleProcess
from tests.support.redis import RedisProcess, SentinelProcess
from tests.support.tls import served_leaf

REPO = Path(__file__).resolve().parents[2]
NODE_ADDRESSES = {"a": "127.0.0.2", "b": "127.0.0.3", "c": "127.0.0.4"}
AGENT_START_TIMEOUT = 20.0  # s until a started agent answers /healthz
AGENT_STOP_TIMEOUT = 10.0

# Injected into the shipped haproxy.cfg: an access log on stdout naming the node.
LOG_GLOBAL = """global
    noreuseport
    log stdout format raw local0
"""
LOG_DEFAULTS = (
    "    log global\n"
    '    log-format "fleet-node=${FLEET_NODE} client=%ci method=%HM uri=%HU status=%ST"\n'
)
SITE_STUB = """
# Test only: plays the site's normal backend.
frontend site_stub
    bind "${SITE_BIND}"
    http-request return status 404 content-type text/plain string "site"
"""
_HIT = re.compile(r"fleet-node=(\S+) client=(\S+) method=GET uri=/\.well-known/acme-challenge/"
                  r"([A-Za-z0-9_-]+) status=(\d+)")  # fmt: skip


_RST_LINGER = struct.pack("ii", 1, 0)  # close() sends RST: the peer sees a broken link


class FleetError(RuntimeError):
    """A fleet process did not start; the message holds its log tail."""


def free_port_on(addresses: Iterable[str]) -> int:
    """A TCP port free on 127.0.0.1 (free_port's rules) and on every one of `addresses`."""
    addrs = list(addresses)
    for _ in range(200):
        port = free_port()
        ok = True
        for addr in addrs:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind((addr, port))
                except OSError:
                    ok = False
                    break
        if ok:
            return port
    raise FleetError(f"no TCP port free on all of {addrs}")


def haproxy_config_text() -> str:
    """The shipped haproxy.cfg with `noreuseport`, a stdout access log and a site stub."""
    shipped = SHIPPED_CFG.read_text()
    if "\ndefaults\n" not in shipped:
        raise FleetError(f"{SHIPPED_CFG} has no `defaults` section to add the access log to")
    shipped = shipped.replace("\ndefaults\n", "\ndefaults\n" + LOG_DEFAULTS, 1)
    return LOG_GLOBAL + "\n" + shipped + SITE_STUB


class Relay:
    """A TCP relay 127.0.0.1:<port> -> upstream that a test can cut and restore.

    `cut()` closes the listener and every relayed connection (the node's Redis
    connections break and new ones are refused); `restore()` listens again on the
    same port. One thread, selectors, bounded buffers; stopped by `close()`.
    `requests` counts the reads from the node's side (each command or pipeline
    a client sends is one read unless TCP splits it: about its round trips)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = free_port()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._pairs: dict[socket.socket, socket.socket] = {}
        self._sel = selectors.DefaultSelector()
        self._stop = threading.Event()
        self._wakeup_r, self._wakeup_w = socket.socketpair()
        self._sel.register(self._wakeup_r, selectors.EVENT_READ, "wakeup")
        self._thread = threading.Thread(target=self._run, name="fleet-relay", daemon=True)
        self.cut_now = False
        self._clients: set[socket.socket] = set()
        self.requests = 0  # reads from the node's side: about one per Redis round trip

    def start(self) -> Relay:
        self._listen()
        self._thread.start()
        return self

    def _listen(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        s.setblocking(False)
        with self._lock:
            self._listener = s
            self._sel.register(s, selectors.EVENT_READ, "accept")
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wakeup_w.send(b"x")

    def cut(self) -> None:
        """Break every relayed connection and refuse new ones until `restore()`."""
        with self._lock:
            self.cut_now = True
            if self._listener is not None:
                self._sel.unregister(self._listener)
                self._listener.close()
                self._listener = None
            for a in list(self._pairs):
                self._drop(a)
        self._wake()

    def restore(self) -> None:
        with self._lock:
            self.cut_now = False
        self._listen()

    def _drop(self, sock: socket.socket) -> None:
        other = self._pairs.pop(sock, None)
        for s in (sock, other):
            if s is None:
                continue
            self._pairs.pop(s, None)
            self._clients.discard(s)
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(s)
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST_LINGER)
            s.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._sel.select(timeout=0.2):
                with self._lock:
                    if key.data == "wakeup":
                        with contextlib.suppress(OSError):
                            self._wakeup_r.recv(4096)
                    elif key.data == "accept":
                        self._accept(key.fileobj)  # type: ignore[arg-type]
                    else:
                        self._pump(key.fileobj)  # type: ignore[arg-type]

    def _accept(self, listener: socket.socket) -> None:
        try:
            client, _ = listener.accept()
        except OSError:
            return
        try:
            upstream = socket.create_connection(self.upstream, timeout=2)
        except OSError:
            client.close()
            return
        for s in (client, upstream):
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._pairs[client], self._pairs[upstream] = upstream, client
        self._clients.add(client)
        self._sel.register(client, selectors.EVENT_READ, "pump")
        self._sel.register(upstream, selectors.EVENT_READ, "pump")

    def _pump(self, sock: socket.socket) -> None:
        other = self._pairs.get(sock)
        if other is None:
            return
        try:
            data = sock.recv(65536)
            if not data:
                raise OSError("closed")
            if sock in self._clients:
                self.requests += 1
            other.setblocking(True)
            other.settimeout(5)
            other.sendall(data)
            other.setblocking(False)
        except OSError:
            self._drop(sock)

    def close(self) -> None:
        self.cut()
        self._stop.set()
        self._wake()
        if self._thread.is_alive():
            self._thread.join(5)
        self._sel.close()
        self._wakeup_r.close()
        self._wakeup_w.close()


class FleetNode:
    """One node: HAProxy + agent daemon on `address`; see the module docstring."""

    def __init__(self, fleet: Fleet, name: str, address: str, haproxy_binary: str) -> None:
        self.fleet = fleet
        self.name = name
        self.node_name = f"edge-{name}"  # [fleet] node
        self.address = address
        self.workdir = fleet.workdir / f"node-{name}"
        hdir = self.workdir / "haproxy"
        hdir.mkdir(parents=True, exist_ok=True)
        self.http_port = fleet.http_port
        self.https_port = fleet.https_port
        self.spoa_port = fleet.spoa_port
        self.metrics_port = fleet.metrics_port
        self.cert_dir = self.workdir / "certs"
        self.cert_dir.mkdir(mode=0o700, exist_ok=True)
        self.crt_list = write_crt_list(hdir, f"fallback-{name}.test")
        self.admin_socket = hdir / "admin.sock"
        self.key_dir = self.workdir / "keys"
        self.key_dir.mkdir(mode=0o700, exist_ok=True)
        self.secret_file = self.workdir / "fleet.secret"
        self.state_dir = self.workdir / "state"
        self.control_socket = self.workdir / "control.sock"
        self.config_path = self.workdir / "agent.toml"
        self.agent_log = self.workdir / "agent.log"
        self.relay: Relay | None = None
        self.extra_config: list[str] = []  # more TOML lines (sections) before [[certificates]]
        self.solo = False  # True: no [fleet] section (a single node, file storage)
        # Per certificate: keys this node's [[certificates]] entry sets differently
        # (None: leaves the key out), e.g. a node whose config lags behind.
        self.cert_extra: dict[str, dict[str, Any]] = {}
        env = {
            "FLEET_NODE": name,
            "HAPROXY_ADMIN_SOCKET": str(self.admin_socket),
            "HTTP_BIND": f"{address}:{self.http_port}",
            "HTTPS_BIND": f"{address}:{self.https_port}",
            "SPOE_ACME_CONF": str(SHIPPED_SPOE),
            "CRT_LIST": str(self.crt_list),
            "SITE_ADDR": f"{address}:{fleet.site_port}",
            "SITE_BIND": f"{address}:{fleet.site_port}",
            "SPOA_ADDR": f"{address}:{self.spoa_port}",
        }
        self.haproxy = HAProxyProcess(haproxy_binary, haproxy_config_text(), env, hdir)
        self.proc: subprocess.Popen[bytes] | None = None
        self._paused = False

    # --- provisioning ---

    def key_path(self, cert: str) -> Path:
        return self.key_dir / f"{cert}.key"

    def provision_key(self, cert: str, pem: bytes) -> Path:
        """Write `pem` as this node's key for `cert` (0600), as an operator would."""
        path = self.key_path(cert)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        return path

    def redis_url(self) -> str:
        if self.relay is not None:
            return f"redis://127.0.0.1:{self.relay.port}/0"
        return self.fleet.redis_url

    def write_config(self) -> Path:
        """This node's agent config.toml from the fleet's certificates and settings."""
        f = self.fleet
        acme = {
            "directory": f.directory_url,
            "ca_bundle": f.ca_bundle,
            "trusted_roots": f.pebble.roots_file(),
            "email": "ops@example.com",
            "poll_interval": 0.05,
            "timeout": f.acme_timeout,
            **f.acme_extra,
        }
        lines = [f"state_dir = {toml_value(self.state_dir)}", "[acme]"]
        lines += [f"{k} = {toml_value(v)}" for k, v in acme.items()]
        lines += ["[spoa]", f'listen = "{self.address}:{self.spoa_port}"']
        lines += [
            "[haproxy]",
            f"runtime_api = {toml_value(['unix:' + str(self.admin_socket)])}",
            f"crt_list = {toml_value(self.crt_list)}",
            f"cert_dir = {toml_value(self.cert_dir)}",
            f'verify = ["{self.address}:{self.https_port}"]',
            "[metrics]",
            f'listen = "{self.address}:{self.metrics_port}"',
            "[daemon]",
            f"control_socket = {toml_value(self.control_socket)}",
        ]
        lines += [f"{k} = {toml_value(v)}" for k, v in f.daemon.items()]
        lines += [] if self.solo else self._fleet_lines()
        lines += self.extra_config
        for cert in f.certificates:
            lines.append("[[certificates]]")
            entry = {"key": self.key_path(cert["name"]), **cert,
                     **self.cert_extra.get(cert["name"], {})}  # fmt: skip
            lines += [f"{k} = {toml_value(v)}" for k, v in entry.items() if v is not None]
        self.config_path.write_text("\n".join(lines) + "\n")
        return self.config_path

    def _fleet_lines(self) -> list[str]:
        f = self.fleet
        lines = ["[fleet]"]
        if f.sentinel is not None:
            lines += [
                f'sentinels = ["127.0.0.1:{f.sentinel.port}"]',
                f"service = {toml_value(f.sentinel.service)}",
            ]
        else:
            lines += [f"redis = {toml_value(self.redis_url())}"]
        lines += [
            f"namespace = {toml_value(f.namespace)}",
            f"node = {toml_value(self.node_name)}",
            f"secret_file = {toml_value(self.secret_file)}",
        ]
        return lines

    # --- the agent process ---

    def agent_argv(self, *args: str) -> list[str]:
        argv = [sys.executable, "-m", "agent.cli", *args]
        if self.fleet.own_hosts:
            # Own host name: lock records of different nodes name different hosts.
            argv = ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"',
                    f"fleet-node-{self.name}", *argv]  # fmt: skip
        return argv

    def agent_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        env.pop("REQUESTS_CA_BUNDLE", None)
        return env

    def cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run `haproxy-acme-agent ARGS -c <this node's config>` (in the node's UTS ns)."""
        return subprocess.run(
            self.agent_argv(*args, "-c", str(self.config_path)),
            cwd=REPO, env=self.agent_env(), capture_output=True, text=True,
            timeout=timeout, check=False,
        )  # fmt: skip

    def start_agent(self, wait: bool = True) -> None:
        if self.running:
            raise FleetError(f"node {self.name}: the agent is already running")
        self.write_config()
        log = self.agent_log.open("ab")
        try:
            self.proc = subprocess.Popen(
                self.agent_argv("run", "-c", str(self.config_path)),
                cwd=REPO, env=self.agent_env(), stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        finally:
            log.close()
        self._paused = False
        if wait:
            self.wait_agent_up()

    def wait_agent_up(self, timeout: float = AGENT_START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise FleetError(f"node {self.name}: agent exited ({code}):\n{self.log_tail()}")
            if self.healthz() is not None and self._spoa_accepts():
                return
            time.sleep(0.05)
        raise FleetError(f"node {self.name}: agent not up after {timeout} s:\n{self.log_tail()}")

    def _spoa_accepts(self) -> bool:
        with socket.socket() as s:
            s.settimeout(0.5)
            try:
                s.connect((self.address, self.spoa_port))
            except OSError:
                return False
        return True

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise FleetError(f"node {self.name}: no agent process")
        return self.proc.pid

    def stop_agent(self) -> int | None:
        """SIGTERM (continued first if paused), then SIGKILL; the exit code."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if self._paused and proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            self._paused = False
        stop_process(proc, AGENT_STOP_TIMEOUT)
        return proc.returncode

    def kill_agent(self) -> None:
        """SIGKILL by the handle: a crash, nothing flushed or released."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(AGENT_STOP_TIMEOUT)
        self.proc = None

    def pause_agent(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self._paused = True

    def resume_agent(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self._paused = False

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.agent_log.read_text(errors="replace")[-n:]
        except FileNotFoundError:
            return "(no agent log)"

    # --- observations ---

    def served_serial(self, domain: str) -> int | None:
        """The serial this node's HAProxy presents for SNI `domain` (a real handshake),
        None when it serves a certificate without `domain` (its fallback)."""
        from cryptography import x509

        leaf = served_leaf(self.https_port, domain, host=self.address)
        try:
            san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return None
        if domain not in san.get_values_for_type(x509.DNSName):
            return None
        return int(leaf.serial_number)

    def served_pin(self, domain: str) -> str:
        """The SPKI pin of the leaf this node's HAProxy presents for SNI `domain`."""
        from agent import keys

        leaf = served_leaf(self.https_port, domain, host=self.address)
        return keys.spki_pin(leaf.public_key())  # type: ignore[arg-type]

    def challenge_hits(self) -> list[tuple[str, int]]:
        """(token, HTTP status) of every challenge request this node's HAProxy logged."""
        hits = []
        for m in _HIT.finditer(self.haproxy.log_text()):
            if m.group(1) == self.name:
                hits.append((m.group(3), int(m.group(4))))
        return hits

    def answered_tokens(self) -> set[str]:
        return {t for t, status in self.challenge_hits() if status == 200}

    def _get(self, path: str) -> tuple[int, str] | None:
        url = f"http://{self.address}:{self.metrics_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")
        except OSError:
            return None

    def healthz(self) -> tuple[int, str] | None:
        """(status, body) of /healthz, None if the agent does not answer."""
        return self._get("/healthz")

    def metrics(self) -> dict[str, float]:
        got = self._get("/metrics")
        if got is None:
            raise FleetError(f"node {self.name}: /metrics does not answer")
        samples: dict[str, float] = {}
        for line in got[1].splitlines():
            if line and not line.startswith("#"):
                key, value = line.rsplit(" ", 1)
                samples[key] = float(value)
        return samples

    def status_json(self) -> Any:
        cp = self.cli("status", "--json")
        if cp.returncode != 0:
            raise FleetError(f"node {self.name}: status failed: {cp.stdout}{cp.stderr}")
        return json.loads(cp.stdout)


class Fleet:
    """Redis + Pebble + three nodes; see the module docstring."""

    def __init__(
        self,
        workdir: Path,
        haproxy_binary: str,
        certificates: list[dict[str, Any]],
        *,
        pebble_binary: str | None = None,
        validity_period: int | None = None,
        nonce_reject: int = 0,
        nodes: Iterable[str] = ("a", "b", "c"),
        relays: bool = True,
        sentinel: bool = False,
        redis_appendonly: bool = False,
        daemon: dict[str, Any] | None = None,
        acme_timeout: float = 20,
        acme_extra: dict[str, Any] | None = None,
        own_hosts: bool | None = None,
        acme_proxy: Callable[[PebbleProcess, Path], Any] | None = None,
    ) -> None:
        """`certificates`: [[certificates]] entries (name, domains, ...) without `key`:
        each node's key is its copy of the one provisioned TLS key (`key_pem`).
        `daemon`: extra [daemon] keys, `acme_extra` extra [acme] keys. `relays`: each
        node reaches Redis through its own `Relay` (not with `sentinel`).
        `acme_proxy(pebble, workdir)` returns an object with `.directory_url`,
        `.ca_bundle`, `start()`, `stop()` the nodes use instead of Pebble (e.g. a
        FaultProxy)."""
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        names = list(nodes)
        addresses = [NODE_ADDRESSES[n] for n in names]
        self.http_port = free_port_on(addresses)
        self.https_port = free_port_on(addresses)
        self.spoa_port = free_port_on(addresses)
        self.metrics_port = free_port_on(addresses)
        self.site_port = free_port_on(addresses)
        self.certificates = [dict(c) for c in certificates]
        # The production reconcile interval: a node must learn of a new certificate
        # from the fleet (fan-out, catch-up), not from a fast local polling loop.
        self.daemon = {"reconcile_interval": "30s", "retry_base": "2s", **(daemon or {})}
        self.acme_timeout = acme_timeout
        self.acme_extra = dict(acme_extra or {})  # more [acme] keys
        self.namespace = "fleet" + os.urandom(6).hex()
        self.own_hosts = (os.geteuid() == 0 and shutil.which("unshare") is not None) \
            if own_hosts is None else own_hosts  # fmt: skip
        self.redis = RedisProcess(self.workdir / "redis", appendonly=redis_appendonly)
        self.replica: RedisProcess | None = None
        self.sentinel: SentinelProcess | None = None
        if sentinel:
            self.replica = RedisProcess(
                self.workdir / "redis-replica",
                extra=f"replicaof 127.0.0.1 {self.redis.port}",
            )
            self.sentinel = SentinelProcess(self.workdir / "sentinel", self.redis, "fleet")
            relays = False
        self.pebble = PebbleProcess(
            self.workdir / "pebble", self.http_port, nonce_reject=nonce_reject,
            validity_period=validity_period, binary=pebble_binary,
        )  # fmt: skip
        self.proxy = acme_proxy(self.pebble, self.workdir / "proxy") if acme_proxy else None
        self.key = key_pem(make_key())  # the certificates' TLS key, provisioned on each node
        self.secret = os.urandom(32)
        self.nodes = {n: FleetNode(self, n, NODE_ADDRESSES[n], haproxy_binary) for n in names}
        self._relays = relays
        for node in self.nodes.values():
            fd = os.open(node.secret_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(self.secret)
            for cert in self.certificates:
                node.provision_key(cert["name"], self.key)

    # --- addresses ---

    @property
    def redis_url(self) -> str:
        return self.redis.url

    @property
    def directory_url(self) -> str:
        return str(self.proxy.directory_url if self.proxy else self.pebble.directory_url)

    @property
    def ca_bundle(self) -> Path:
        return Path(self.proxy.ca_bundle if self.proxy else self.pebble.ca_bundle)

    def __getitem__(self, name: str) -> FleetNode:
        return self.nodes[name]

    def __iter__(self) -> Iterator[FleetNode]:
        return iter(self.nodes.values())

    def redis_client(self) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=self.redis.port, socket_timeout=5)

    # --- DNS (challtestsrv) ---

    def _cts(self, path: str, body: dict[str, Any]) -> None:
        url = f"http://127.0.0.1:{self.pebble.cts_management_port}{path}"
        req = urllib.request.Request(
            url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=5) as r:
            if r.status != 200:
                raise FleetError(f"challtestsrv {path} answered {r.status}")

    def point(self, domain: str, *nodes: str) -> None:
        """Resolve `domain` (A) to the addresses of `nodes` for Pebble's validation."""
        self._cts("/clear-a", {"host": domain})
        self._cts("/add-a", {"host": domain, "addresses": [self.nodes[n].address for n in nodes]})

    # --- Pebble's log ---

    def accounts_created(self) -> int:
        """ACME accounts Pebble holds now (it logs the count after each new one)."""
        counts = re.findall(r"There are now (\d+) accounts in memory", self.pebble.log_text())
        return int(counts[-1]) if counts else 0

    def orders_placed(self) -> int:
        """newOrder requests Pebble took (it logs each as it adds the order)."""
        return len(re.findall(r"Added order \"", self.pebble.log_text()))

    def validated_tokens(self, domain: str) -> set[str]:
        """The http-01 tokens Pebble asked `domain` for (it logs each validation's URL).
        A name whose valid authorization Pebble reused for an order has none for it:
        Pebble reuses one 1 time in 100 even with PEBBLE_AUTHZREUSE=0."""
        pattern = (r"Attempting to validate w/ HTTP: http://" + re.escape(domain)
                   + r"(?::\d+)?/\.well-known/acme-challenge/([A-Za-z0-9_-]+)")  # fmt: skip
        return set(re.findall(pattern, self.pebble.log_text()))

    # --- life cycle ---

    def start(self, start_agents: bool = True) -> None:
        try:
            self.redis.start()
            if self.replica is not None:
                self.replica.start()
            if self.sentinel is not None:
                self.sentinel.start()
            self.pebble.start()
            if self.proxy is not None:
                self.proxy.start()
            for node in self.nodes.values():
                if self._relays:
                    node.relay = Relay(("127.0.0.1", self.redis.port)).start()
                node.write_config()
                node.haproxy.start()
            if start_agents:
                self.start_agents()
        except BaseException:
            self.stop()
            raise

    def start_agents(self, names: Iterable[str] | None = None) -> None:
        chosen = [self.nodes[n] for n in (names or self.nodes)]
        for node in chosen:
            node.start_agent(wait=False)
        for node in chosen:
            node.wait_agent_up()

    def stop(self) -> None:
        for node in self.nodes.values():
            with contextlib.suppress(Exception):
                node.stop_agent()
        for node in self.nodes.values():
            with contextlib.suppress(Exception):
                node.haproxy.stop()
            if node.relay is not None:
                with contextlib.suppress(Exception):
                    node.relay.close()
                node.relay = None
        if self.proxy is not None:
            with contextlib.suppress(Exception):
                self.proxy.stop()
        with contextlib.suppress(Exception):
            self.pebble.stop()
        for proc in (self.sentinel, self.replica, self.redis):
            if proc is not None:
                with contextlib.suppress(Exception):
                    proc.stop()

    def __enter__(self) -> Fleet:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def wait_until(what: str, check: Callable[[], bool], timeout: float, poll: float = 0.02,
               logs: Callable[[], str] | None = None) -> float:  # fmt: skip
    """Poll `check` (bounded: `timeout` s, at most 100k tries); return the seconds it
    took; AssertionError naming `what` (with `logs()` appended) when it never holds."""
    started = time.monotonic()
    deadline = started + timeout
    for _ in range(100_000):
        try:
            if check():
                return time.monotonic() - started
        except (OSError, ValueError):
            pass  # a handshake during a swap, a half-written file: look again
        if time.monotonic() > deadline:
            break
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}"
                         + ("\n" + logs() if logs else ""))  # fmt: skip
