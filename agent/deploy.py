"""Deploy certificates into running HAProxy instances: persisted, swapped, proven.

Every deploy is a BATCH (`Deployer.deploy_batch`; `deploy` is a batch of one,
`deploy_many` and `reconcile` use it too). For the certificates of a batch:

1. check each bundle locally (leaf + private key that belongs to it, fits in
   `tune.bufsize`): a bad bundle is refused before anything of it is written;
2. write every bundle atomically to `<cert_dir>/<name>.pem` (the file HAProxy's
   config references, so a reload or restart serves the same certificate),
   keeping the previous bytes: temp files fsynced in parallel, renamed, one
   fsync of the directory, all while step 3 runs and finished before the
   crt-list names a new bundle or anything is reported served; then ONE
   locked edit of the crt-list file gives every bundle a line;
3. per runtime API instance ONE session (HAProxy's prompt mode, commands
   pipelined) and one `show ssl cert` listing; then one certificate
   transaction at a time: `set ssl cert` (after `new ssl cert` for a
   certificate HAProxy does not know), the pending serial checked with
   `show ssl cert *<path>`, `commit ssl cert` (or abort), and `add ssl
   crt-list` for a new one; never two transactions open at once;
4. verify: one pipelined `show ssl cert <path>` pass per instance checks every
   serial, AND real TLS handshakes to each `verify` address with SNI set to
   each of the certificate's names return the new leaf (run in parallel, each
   started as soon as its certificate is through its last instance; in a
   batch of more than `handshake_sample` certificates, for every new one plus
   a random sample of the others, and for all of them if one of those fails);
5. a failure rolls back only the certificates it concerns: push the previous
   bundle back (or remove a certificate that was new), remove the crt-list
   lines they added (one edit, before their bundles), restore their bundle
   files, and report why in their `DeployResult`. The others stay deployed
   and verified. A connection that dies mid-batch fails the certificate in
   flight (rolled back) and leaves the rest "unreachable" on that instance
   (their files are on disk for its restart; `poll` reconciles it).

Every edit of the crt-list file goes through agent/crtlist.py (one lock per
file across threads and processes, edits of the current content, never a
line naming a missing file). `status()` is read from HAProxy: after a deploy
it is what `show ssl cert` and the handshakes proved, after a rollback what
the instance serves again (so in_sync is False while the stored serial is
not served).

HAProxy 2.6 has ONE certificate transaction per process and silently merges a
second `set ssl cert` into the open one, so every transaction on an instance
runs under that instance's lock (shared by all Deployers in the process),
always ends in commit or abort, and is checked before commit.

`reconcile` reads each instance's served serials in one pipelined session and
deploys what is stale as one batch through the same path (push, verify, roll
back). It re-parses nothing that did not change: checked bundles are cached
by content (`checked_leaf`), a bundle file is read only when its (st_ino,
st_size, st_mtime_ns) changed, and the crt-list file only when its identity
changed. `poll` notices an instance that came back (or restarted: new PID or
start time) and reconciles it. Without any runtime API, `finish` runs the
configured reload command once if a file changed.

Everything here is synchronous and thread-safe; the asyncio daemon calls it
through `asyncio.to_thread`.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import logging
import os
import random
import re
import select
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL

from agent import wiring
from agent.crtlist import CrtListError, CrtListFile
from agent.haproxy_api import (
    DEFAULT_BUFSIZE,
    CommandFailed,
    HAProxyConnectionError,
    HAProxyError,
    PayloadTooLarge,
    ProcessInfo,
    RuntimeAPI,
    Session,
    cert_summary_or_none,
    check_arg,
    check_size,
    frame_command,
    parse_address,
    parse_set_reply,
)
from agent.storage import fsync_dir, safe_name

log = logging.getLogger(__name__)

BUNDLE_MODE = 0o600  # the bundle holds the private key
# A cert_dir the agent creates: the owner writes, HAProxy's group may read
# (the `0640 root:haproxy` layout agent/permissions.py accepts), others nothing.
CERT_DIR_MODE = 0o750
# How long a transaction someone else opened may stay open before we act (s).
# Ours last milliseconds; one still open after this is left over from a crash.
STALE_TRANSACTION_WAIT = 1.0
# Threads writing + fsyncing bundle files of one batch at once.
FSYNC_WORKERS = 16
# TLS handshakes of one batch's verification running at once (each waits on
# HAProxy most of the time, so more than the cores).
HANDSHAKE_WORKERS = 8
# Bound on the TLS check's handshake loop (each step waits for the socket, so a
# handshake takes a handful; the deadline ends it first).
HANDSHAKE_STEPS = 1000
# Updated certificates of a large batch verified by TLS handshake when all is
# well (see _Handshakes). Handshakes cost HAProxy the CPU its commits need: on
# 3.2, 200 of them during a 200-certificate batch tripled the push time.
DEFAULT_HANDSHAKE_SAMPLE = 32
# Checked bundles kept (name, sha256 of the bundle) -> leaf: a reconcile pass
# over unchanged bundles parses nothing. Bounded: a full cache is emptied.
LEAF_CACHE_SIZE = 50_000
# Disk state reported when no runtime API is configured (reload mode).
DISK_INSTANCE = "disk"

_KEY_BLOCK = re.compile(
    rb"-----BEGIN ((?:RSA |EC |ENCRYPTED )?PRIVATE KEY)-----.+?-----END \1-----", re.DOTALL
)


class DeployError(Exception):
    """A deployment failed; `result` holds the per-instance details."""

    def __init__(self, result: DeployResult) -> None:
        self.result = result
        super().__init__(f"certificate {result.name!r}: " + "; ".join(result.errors))


class InstanceUnreachable(HAProxyConnectionError):
    """An instance could not be reached before anything was changed on it."""


class BundleError(ValueError):
    """A bundle that must not be deployed (no leaf, no or wrong key, bad name)."""


class KeyMismatch(BundleError):
    """The private key (this node's key file) does not belong to the leaf: in a
    fleet, the node's key differs from the one the certificate was issued for."""

    def __init__(self, message: str, serial: int) -> None:
        super().__init__(message)
        self.serial = serial


class ReloadError(RuntimeError):
    """The configured reload command failed."""


# ---------------------------------------------------------------------------
# Values


@dataclass(frozen=True)
class DeployTarget:
    """One certificate to serve: `<cert_dir>/<name>.pem` gets `bundle`.

    `bundle` is HAProxy's combined PEM (leaf, chain, private key); `serial` is
    the leaf's serial and `names` its DNS names / IPs (used as SNI to verify).
    `crt_list_options` (e.g. "alpn h2") and `sni_filters` only apply when the
    certificate is new to HAProxy and gets added to the crt-list.
    """

    name: str
    bundle: bytes
    serial: int
    names: Sequence[str]
    crt_list_options: str = ""
    sni_filters: Sequence[str] = ()
    # One key of a dual certificate ("rsa" or "ecdsa", agent.pairs): HAProxy serves
    # this or its sibling for the same names by the client's signature algorithms,
    # so the TLS check asks for this kind only (TLS 1.2, aRSA / aECDSA ciphers).
    key_kind: str | None = None

    def __post_init__(self) -> None:
        # Accept lists from callers but keep the value hashable and immutable.
        object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "sni_filters", tuple(self.sni_filters))

    @classmethod
    def from_bundle(
        cls,
        name: str,
        bundle: bytes,
        crt_list_options: str = "",
        sni_filters: Sequence[str] = (),
        key_kind: str | None = None,
    ) -> DeployTarget:
        """Build a target from a bundle, reading serial and names from its leaf
        (checked once per bundle content: see `checked_leaf`)."""
        leaf = checked_leaf(name, bundle)
        return cls(
            name, bundle, leaf.serial, leaf.names, crt_list_options, tuple(sni_filters), key_kind
        )


@dataclass(frozen=True)
class InstanceResult:
    """What happened on one HAProxy instance. `action`: "updated", "added",
    "failed", "rolled back" or "not touched"."""

    instance: str
    action: str
    served_serial: int | None = None
    error: str | None = None


@dataclass(frozen=True)
class HandshakeResult:
    """One TLS handshake to a `verify` address with SNI `server_name` (None: no SNI)."""

    address: str
    server_name: str | None
    served_serial: int | None
    ok: bool
    error: str | None = None


@dataclass
class DeployResult:
    """The outcome of `Deployer.deploy`. `ok` only if served and verified everywhere."""

    name: str
    path: Path
    serial: int
    ok: bool = False
    file_changed: bool = False
    rolled_back: bool = False
    instances: list[InstanceResult] = field(default_factory=list)
    handshakes: list[HandshakeResult] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def raise_for_errors(self) -> DeployResult:
        """Return self if ok, else raise DeployError."""
        if not self.ok:
            raise DeployError(self)
        return self


@dataclass(frozen=True)
class SyncStatus:
    """Whether `instance` serves the stored certificate `name`.

    `instance` is the runtime API address, or "disk" without a runtime API
    (then it says whether the file matches the stored bundle). `pushed`: the
    reconciler just pushed the stored bundle. `error` is set when the instance
    could not be checked or updated (then `in_sync` is False).
    """

    name: str
    instance: str
    served_serial: int | None
    stored_serial: int
    in_sync: bool
    pushed: bool = False
    error: str | None = None


# ---------------------------------------------------------------------------
# Bundle checks (no I/O)


def _cert_names(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        cn = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
        return tuple(str(a.value) for a in cn)
    names = [str(n) for n in san.get_values_for_type(x509.DNSName)]
    names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return tuple(names)


def inspect_bundle(name: str, bundle: bytes) -> x509.Certificate:
    """Return the leaf of `bundle` if it is deployable; raise BundleError otherwise.

    Deployable: at least one certificate, exactly one unencrypted private key,
    and the key belongs to the first (leaf) certificate.
    """
    try:
        certs = x509.load_pem_x509_certificates(bundle)
    except ValueError as exc:
        raise BundleError(f"certificate {name!r}: bundle holds no readable certificate") from exc
    keys = _KEY_BLOCK.findall(bundle)
    if len(keys) != 1:
        raise BundleError(
            f"certificate {name!r}: bundle must hold exactly one private key, found {len(keys)}"
        )
    match = _KEY_BLOCK.search(bundle)
    assert match is not None
    try:
        key = serialization.load_pem_private_key(match.group(0), password=None)
    except (ValueError, TypeError) as exc:
        raise BundleError(f"certificate {name!r}: unreadable or encrypted private key") from exc
    leaf = certs[0]
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(
        serialization.Encoding.DER, spki
    ) != leaf.public_key().public_bytes(serialization.Encoding.DER, spki):
        raise KeyMismatch(
            f"certificate {name!r}: the private key does not belong to the leaf certificate "
            f"(serial {leaf.serial_number:X})",
            leaf.serial_number,
        )
    return leaf


@dataclass(frozen=True)
class CheckedLeaf:
    """What `inspect_bundle` found in a deployable bundle."""

    serial: int
    names: tuple[str, ...]
    der: bytes


_LEAF_GUARD = threading.Lock()
_LEAF_CACHE: dict[tuple[str, bytes], CheckedLeaf] = {}


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def checked_leaf(name: str, bundle: bytes) -> CheckedLeaf:
    """`inspect_bundle` once per (name, bundle content): later calls with the same
    bytes return the cached leaf without parsing (a refused bundle is never
    cached, so it raises BundleError every time)."""
    key = (name, _digest(bundle))
    with _LEAF_GUARD:
        hit = _LEAF_CACHE.get(key)
    if hit is not None:
        return hit
    leaf = inspect_bundle(name, bundle)
    checked = CheckedLeaf(
        leaf.serial_number, _cert_names(leaf), leaf.public_bytes(serialization.Encoding.DER)
    )
    with _LEAF_GUARD:
        if len(_LEAF_CACHE) >= LEAF_CACHE_SIZE:
            _LEAF_CACHE.clear()
        _LEAF_CACHE[key] = checked
    return checked


def _sni_for(name: str) -> str | None:
    """The SNI to send to reach `name`: None for an IP, a concrete label for a wildcard."""
    try:
        ipaddress.ip_address(name)
        return None
    except ValueError:
        pass
    if name.startswith("*."):
        return "haproxy-acme-agent-check" + name[1:]
    return name


def _verify_names(target: DeployTarget) -> tuple[str, ...]:
    """The names a handshake must get this certificate for: its positive SNI filters
    if it has any (HAProxy routes only those to it), else all its names."""
    positive = tuple(f for f in target.sni_filters if not f.startswith("!"))
    return positive or tuple(target.names) or ("",)


def _client_context(key_kind: str | None = None) -> SSL.Context:
    """The TLS check's client; with `key_kind` ("rsa", "ecdsa") it offers TLS 1.2
    with only that kind's cipher suites, so a server holding an RSA and an ECDSA
    certificate for one name must present that kind's (neither OpenSSL binding
    limits TLS 1.3 signature algorithms). Checked on HAProxy 2.6, 2.8, 3.0 and 3.2.

    pyOpenSSL, not the standard library's `ssl`: it runs on the OpenSSL that
    cryptography's wheel bundles, whose client handshake takes about 60% of
    the CPU of Debian 12's OpenSSL 3.0 (1.2 against 2.0 ms per check here;
    3.0 spends most of it decoding the server's certificate). The check is on
    the critical path of every swap.
    """
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_verify(SSL.VERIFY_NONE)
    if key_kind is not None:
        context.set_max_proto_version(SSL.TLS1_2_VERSION)
        context.set_cipher_list({"rsa": b"aRSA", "ecdsa": b"aECDSA"}[key_kind])
    return context


# One context per kind for every check (safe to share between threads: a check
# only creates connections from it; building one costs more than a handshake).
_CLIENT_CONTEXTS = {kind: _client_context(kind) for kind in (None, "rsa", "ecdsa")}


def _wait_socket(sock: socket.socket, events: int, deadline: float, address: str) -> None:
    """Wait until `sock` is ready for `events` (select.POLLIN / POLLOUT); raises
    TimeoutError once `deadline` (time.monotonic()) has passed."""
    poller = select.poll()
    poller.register(sock, events)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"TLS handshake with {address} timed out")
        if poller.poll(left * 1000):
            return


def tls_leaf(
    address: str, server_name: str | None, timeout: float, key_kind: str | None = None
) -> bytes:
    """DER of the leaf certificate a TLS server at "host:port" presents for `server_name`
    (to a client that supports only `key_kind` keys, if given: see `_client_context`).
    The connection and the whole handshake end within `timeout` seconds.

    Chain and hostname are deliberately not validated: this checks WHICH
    certificate is served, not whether a client would trust it. The handshake
    is complete, so the server proved it holds that certificate's key.
    Raises OSError (TimeoutError, ConnectionRefusedError, ssl.SSLError for a
    TLS failure) or ValueError (a malformed `address`).
    """
    host, port = _split_host_port(address)
    deadline = time.monotonic() + timeout
    with socket.create_connection((host, port), timeout=timeout) as raw:
        raw.setblocking(False)
        conn = SSL.Connection(_CLIENT_CONTEXTS[key_kind], raw)
        if server_name:
            conn.set_tlsext_host_name(server_name.encode("idna"))
        conn.set_connect_state()
        for _ in range(HANDSHAKE_STEPS):
            try:
                conn.do_handshake()
                break
            except SSL.WantReadError:
                _wait_socket(raw, select.POLLIN, deadline, address)
            except SSL.WantWriteError:
                _wait_socket(raw, select.POLLOUT, deadline, address)
            except SSL.SysCallError as exc:
                code, message = exc.args if len(exc.args) == 2 else (-1, str(exc))
                if code > 0:
                    raise OSError(code, f"TLS handshake with {address}: {message}") from exc
                raise ssl.SSLError(f"TLS handshake with {address}: {message}") from exc
            except SSL.Error as exc:
                raise ssl.SSLError(f"TLS handshake with {address} failed: {exc}") from exc
        else:
            raise ssl.SSLError(f"TLS handshake with {address} did not finish")
        leaf = conn.get_peer_certificate(as_cryptography=True)
    if leaf is None:
        raise ssl.SSLError(f"{address} presented no certificate")
    return leaf.public_bytes(serialization.Encoding.DER)


def _split_host_port(address: str) -> tuple[str, int]:
    match = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:]+):(\d+)", address.strip())
    if not match:
        raise ValueError(f"verify address {address!r}: expected HOST:PORT or [IPv6]:PORT")
    return (match.group(1) or match.group(3)), int(match.group(2) or match.group(4))


# ---------------------------------------------------------------------------
# Per-instance locks, shared by every Deployer in the process


_LOCKS_GUARD = threading.Lock()
_INSTANCE_LOCKS: dict[str, threading.Lock] = {}
_FILE_LOCKS: dict[str, threading.Lock] = {}


def _instance_lock(instance: str) -> threading.Lock:
    """Held for every certificate transaction on `instance`."""
    with _LOCKS_GUARD:
        return _INSTANCE_LOCKS.setdefault(instance, threading.Lock())


def _file_lock(path: Path) -> threading.Lock:
    """Held for a whole deploy (write, swap, verify, roll back) of the bundle at `path`."""
    with _LOCKS_GUARD:
        return _FILE_LOCKS.setdefault(str(path), threading.Lock())


@contextlib.contextmanager
def _locked(lock: threading.Lock, timeout: float, what: str) -> Iterator[None]:
    if not lock.acquire(timeout=timeout):
        raise TimeoutError(f"{what}: still busy after {timeout:g} s")
    try:
        yield
    finally:
        lock.release()


# ---------------------------------------------------------------------------
# One certificate of a batch


@dataclass(eq=False)
class _Item:
    """One target of a batch and what the batch did with it so far."""

    target: DeployTarget
    path: Path
    leaf_der: bytes
    apis: list[RuntimeAPI]  # the instances it goes to
    result: DeployResult = field(init=False)
    old: bytes | None = None  # the file before the batch (None: did not exist)
    old_target: DeployTarget | None = None
    added_line: str | None = None  # the crt-list line the batch added
    touched: list[tuple[RuntimeAPI, str]] = field(default_factory=list)  # (api, action)
    unreachable: set[str] = field(default_factory=set)
    done: bool = False  # finished early: crt-list refused, or no instance reachable
    refused: str | None = None  # why the instances were refused it (for status)

    def __post_init__(self) -> None:
        self.result = DeployResult(self.target.name, self.path, self.target.serial)

    @property
    def failed(self) -> bool:
        return bool(self.result.errors)

    def wants(self, api: RuntimeAPI) -> bool:
        return any(a.name == api.name for a in self.apis)

    def touched_on(self, api: RuntimeAPI) -> bool:
        return any(a.name == api.name for a, _ in self.touched)

    def fail(self, api: RuntimeAPI, exc: BaseException) -> None:
        self.result.instances.append(InstanceResult(api.name, "failed", error=str(exc)))
        self.result.errors.append(str(exc))


def _handshake(
    address: str, sni: str | None, timeout: float, key_kind: str | None = None
) -> bytes | Exception:
    try:
        return tls_leaf(address, sni, timeout, key_kind)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        return exc


_POOLS: dict[str, tuple[int, ThreadPoolExecutor]] = {}
_POOLS_GUARD = threading.Lock()


def _shared_pool(kind: str, workers: int) -> ThreadPoolExecutor:
    """The process's `kind` pool ("verify", "write", "fsync"), made on first use.

    Shared by every deploy instead of a pool (and its threads) per deploy:
    starting threads was a visible part of a one-certificate swap. Pool
    tasks never wait on tasks of their own kind. A forked child gets its own.
    """
    with _POOLS_GUARD:
        got = _POOLS.get(kind)
        if got is None or got[0] != os.getpid():
            got = (os.getpid(), ThreadPoolExecutor(workers, thread_name_prefix=kind))
            _POOLS[kind] = got
        return got[1]


class _Handshakes:
    """The TLS checks of one batch, started as soon as a certificate is through
    its last instance (while the batch pushes the next ones), at most
    HANDSHAKE_WORKERS at a time.

    Which certificates: every one, unless the batch holds more than the
    deployer's `handshake_sample`; then every certificate added to the
    crt-list (its SNI routing is new) plus `handshake_sample` of the others
    picked at random, and every serial is still checked by the `show ssl
    cert` pass. If any handshake of the sample fails, the skipped ones are
    checked too (`check_skipped`), so each certificate's fate rests on its own
    handshake and a failure never rolls back a random few.
    """

    def __init__(self, deployer: Deployer, items: Sequence[_Item]) -> None:
        self.verify = list(deployer.verify)
        self.timeout = deployer.timeout
        sample = deployer.handshake_sample
        self.sampled: set[int] | None = None
        if sample is not None and len(items) > sample:
            self.sampled = {id(it) for it in random.sample(list(items), sample)}
        self.skipped: list[_Item] = []
        self._jobs: list[tuple[_Item, str, str | None, Future[bytes | Exception]]] = []

    def pushed(self, it: _Item, api: RuntimeAPI) -> None:
        """`it` is through `api`: start its checks if that was its last instance."""
        if not self.verify or it.failed or not it.touched or it.apis[-1].name != api.name:
            return
        added = any(action == "added" for _, action in it.touched)
        if self.sampled is not None and not added and id(it) not in self.sampled:
            self.skipped.append(it)
            return
        self._submit(it)

    def _submit(self, it: _Item) -> None:
        pool = _shared_pool("verify", HANDSHAKE_WORKERS)
        for address in self.verify:
            for name in _verify_names(it.target):
                sni = _sni_for(name) if name else None
                future = pool.submit(
                    _handshake, address, sni, self.timeout, it.target.key_kind
                )
                self._jobs.append((it, address, sni, future))

    def check_skipped(self) -> None:
        """Start the checks of every certificate the sample skipped (still pushed
        and not failed)."""
        skipped, self.skipped = self.skipped, []
        for it in skipped:
            if not it.failed:
                self._submit(it)

    def collect(self) -> list[tuple[_Item, str, str | None, bytes | Exception]]:
        """Wait for every check started so far; (item, address, sni, leaf DER or
        the error)."""
        out = [(it, address, sni, future.result()) for it, address, sni, future in self._jobs]
        self._jobs = []
        return out

    def close(self) -> None:
        """Cancel the checks not started yet and wait for the running ones (the
        pool is shared: it stays)."""
        jobs, self._jobs = self._jobs, []
        for *_, future in jobs:
            future.cancel()
        wait([future for *_, future in jobs])


# ---------------------------------------------------------------------------
# The deployer


class HAProxySettings(Protocol):
    """The `[haproxy]` config section as agent/config.py provides it."""

    @property
    def runtime_api(self) -> Sequence[str]: ...
    @property
    def cert_dir(self) -> Path: ...
    @property
    def crt_list(self) -> Path | None: ...
    @property
    def verify(self) -> Sequence[Any]: ...
    @property
    def reload_command(self) -> Sequence[str]: ...
    @property
    def timeout(self) -> float: ...


class Deployer:
    """Deploys certificates to HAProxy instances; see the module docstring.

    `instances`: runtime API addresses ("unix:/path", "/path", "tcp:host:port").
    `cert_dir`: where bundles go, as HAProxy's config names them (absolute).
    `crt_list`: crt-list file (or `crt` directory) new certificates are added
    to; None: new certificates cannot be added at runtime. `verify`: TLS
    frontends ("host:port") checked after every swap. `reload_command`: run by
    `finish` when no runtime API is configured. `timeout`: seconds per runtime
    API call and per handshake. `bufsize`: HAProxy's `tune.bufsize`, used where
    HAProxy does not show it in `show pools` (or with `probe_bufsize` False).
    `handshake_sample` (default DEFAULT_HANDSHAKE_SAMPLE): in a batch of more
    certificates than that, TLS handshakes go to every name of each certificate
    added to the crt-list plus that many updated ones picked at random, and to
    all of them as soon as one of those fails (every serial is still checked
    by `show ssl cert`); smaller batches, and any batch with None, get a
    handshake for every name of every certificate.
    """

    def __init__(
        self,
        instances: Sequence[str],
        cert_dir: Path | str,
        crt_list: Path | str | None = None,
        verify: Sequence[str] = (),
        reload_command: Sequence[str] = (),
        timeout: float = 5.0,
        bufsize: int = DEFAULT_BUFSIZE,
        reload_timeout: float = 120.0,
        probe_bufsize: bool = True,
        handshake_sample: int | None = DEFAULT_HANDSHAKE_SAMPLE,
    ) -> None:
        self.apis = [RuntimeAPI(address, timeout, bufsize, probe_bufsize) for address in instances]
        names = [api.name for api in self.apis]
        if len(set(names)) != len(names):
            raise ValueError(f"[haproxy] runtime_api lists an instance twice: {names}")
        # HAProxy knows files by the literal path in its config: no resolve().
        self.cert_dir = Path(os.path.abspath(cert_dir))
        self.crt_list = Path(os.path.abspath(crt_list)) if crt_list else None
        check_arg(str(self.cert_dir), "[haproxy] cert_dir")
        if self.crt_list is not None:
            check_arg(str(self.crt_list), "[haproxy] crt_list")
        for address in verify:
            _split_host_port(address)
        self.verify = list(verify)
        self.reload_command = list(reload_command)
        self.timeout = timeout
        self.bufsize = bufsize
        self.reload_timeout = reload_timeout
        self._lock_timeout = max(30.0, timeout * 6)
        self._state = threading.Lock()
        self._changed = False
        self._status: dict[tuple[str, str], SyncStatus] = {}
        self._seen: dict[str, ProcessInfo | None] = {}
        # Bundle files last found equal to a bundle: path -> (identity, sha256).
        self._disk: dict[Path, tuple[tuple[int, int, int], bytes]] = {}
        # The crt-list file as we last left it (identity) and the paths it names.
        self._crt_list_known: tuple[tuple[int, int, int], frozenset[str]] | None = None
        self.handshake_sample = handshake_sample

    @classmethod
    def from_config(cls, haproxy: HAProxySettings | Any) -> Deployer:
        """Build from the `[haproxy]` section (or a whole Config with `.haproxy`)."""
        section = getattr(haproxy, "haproxy", haproxy)
        return cls(
            instances=list(section.runtime_api),
            cert_dir=section.cert_dir,
            crt_list=section.crt_list or None,
            verify=[str(v) for v in section.verify],
            reload_command=list(section.reload_command),
            timeout=float(section.timeout),
            bufsize=int(getattr(section, "bufsize", DEFAULT_BUFSIZE)),
            handshake_sample=getattr(section, "handshake_sample", DEFAULT_HANDSHAKE_SAMPLE),
        )

    # -- helpers -------------------------------------------------------------

    def path_for(self, name: str) -> Path:
        """Where the bundle of certificate `name` lives."""
        safe_name(name)
        return self.cert_dir / f"{name}.pem"

    def instances(self) -> list[str]:
        """The runtime API instance names, as used in results and metrics labels."""
        return [api.name for api in self.apis]

    def _remember(self, status: SyncStatus) -> SyncStatus:
        with self._state:
            self._status[(status.name, status.instance)] = status
        return status

    def _mark_down(self, instance: str) -> None:
        with self._state:
            self._seen[instance] = None

    def status(self) -> list[SyncStatus]:
        """The last known in-sync state per (certificate, instance), sorted."""
        with self._state:
            return [self._status[k] for k in sorted(self._status)]

    def _check_target(self, target: DeployTarget) -> tuple[Path, bytes]:
        """Refuse a target that must not be deployed; return its path and leaf DER."""
        try:
            path = self.path_for(target.name)
        except ValueError as exc:
            raise BundleError(f"certificate name {target.name!r}: {exc}") from exc
        leaf = checked_leaf(target.name, target.bundle)
        if leaf.serial != target.serial:
            raise BundleError(
                f"certificate {target.name!r}: serial {target.serial:X} given but the bundle's "
                f"leaf has {leaf.serial:X}"
            )
        if self.apis:
            command = f"set ssl cert {path}"
            message = frame_command(command, target.bundle)
            # The smallest tune.bufsize of all instances (read from HAProxy where it
            # shows it): refuse before anything is written.
            api = min(self.apis, key=lambda a: a.payload_limit())
            check_size(api.name, command, message, api.payload_limit())
        return path, leaf.der

    # -- files ---------------------------------------------------------------

    def _crt_list_file(self) -> Path | None:
        """The crt-list FILE to edit; None without one or when it is a `crt` directory."""
        if self.crt_list is None or self.crt_list.is_dir():
            return None
        return self.crt_list

    def _crt_list_line(self, path: Path, target: DeployTarget) -> str:
        line = str(path)
        if target.crt_list_options:
            line += f" [{target.crt_list_options}]"
        if target.sni_filters:
            line += " " + " ".join(target.sni_filters)
        return line

    def _crt_list_editor(self) -> CrtListFile | None:
        crt_list = self._crt_list_file()
        return None if crt_list is None else CrtListFile(crt_list, self._lock_timeout)

    # -- one session per instance ------------------------------------------------

    def _start_session(self, session: Session) -> set[str]:
        """First call of a batch on an instance: one `show ssl cert` listing. Waits
        (bounded) for an open transaction to end; then aborts one left open under
        cert_dir (ours, from a crashed run) and refuses to run next to anyone
        else's. Returns the loaded certificate paths. Raises InstanceUnreachable
        if the instance cannot be reached (nothing changed on it yet).
        """
        deadline = time.monotonic() + STALE_TRANSACTION_WAIT
        while True:
            try:
                listing = session.list_certs()
            except HAProxyConnectionError as exc:
                raise InstanceUnreachable(exc.instance, exc.command, exc.reply) from exc
            if not listing.transactions or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        for pending in listing.transactions:
            if os.path.dirname(pending) == str(self.cert_dir):
                session.command(f"abort ssl cert {check_arg(pending, 'certificate path')}")
            else:
                raise HAProxyError(
                    session.name,
                    "show ssl cert",
                    f"another client has a certificate transaction open for {pending}; "
                    "not starting one next to it (HAProxy 2.6 would merge them)",
                )
        return set(listing.certificates)

    def _transaction(self, session: Session, path: Path, target: DeployTarget, exists: bool) -> str:
        """Make the instance serve `target` from `path` in ONE certificate transaction
        (opened, checked, committed or aborted before this returns). Returns
        "updated" or "added". Round trips: [show or new, set, show *pending]
        pipelined; then commit; then `add ssl crt-list` for a store not in use.
        The caller holds the instance lock. On any error the transaction is
        aborted (and a store this call created deleted) and the error raised.
        """
        created, status = self._open_checked(session, path, target, exists)
        return self._commit(session, path, target, created, status)

    def _needs_add(self, created: bool, status: str) -> bool:
        """Whether a committed store must still get an `add ssl crt-list`."""
        return self.crt_list is not None and (created or status != "Used")

    def _open_checked(
        self,
        session: Session,
        path: Path,
        target: DeployTarget,
        exists: bool,
        before: Sequence[tuple[str, bytes | None]] = (),
        settle: Callable[[list[str]], None] | None = None,
    ) -> tuple[bool, str]:
        """Open the transaction of `path` with `target`'s bundle and check its
        pending serial; returns (store created, its status before). One round
        trip: `before` (the commit + abort closing the previous certificate's
        transaction, so HAProxy runs them first) + [show or new, set, show
        *pending]; `settle` gets the replies of `before` as soon as they are
        in, before anything is checked. On an error after sending, this
        transaction is aborted (a store it created deleted) and the error raised.
        """
        p = check_arg(str(path), "certificate path")
        name = session.name
        if not exists and self.crt_list is None:
            raise HAProxyError(
                name,
                f"show ssl cert {p}",
                f"HAProxy does not load {p} and [haproxy] crt_list is not set, so "
                f"certificate {target.name!r} cannot be added at runtime",
            )
        first = f"show ssl cert {p}" if exists else f"new ssl cert {p}"
        set_command = f"set ssl cert {p}"
        replies = session.pipeline(
            [
                *before,
                (first, None),
                (set_command, target.bundle),
                (f"show ssl cert *{p}", None),
            ]
        )
        if settle is not None:
            settle(replies[: len(before)])
        r_first, r_set, r_pending = replies[len(before) :]
        created = False
        try:
            status = ""
            if exists:
                info = cert_summary_or_none(name, first, r_first)
                status = info.status if info is not None else ""
            elif "New empty certificate store" in r_first:
                created = True
            else:
                raise CommandFailed(name, first, r_first)
            owner = parse_set_reply(r_set)
            if owner is None:
                raise CommandFailed(name, set_command, r_set)
            if owner != p:
                # 2.6 merged our payload into another open transaction: that
                # transaction now holds our bundle and must not be committed.
                session.command(f"abort ssl cert {check_arg(owner, 'certificate path')}")
                raise HAProxyError(
                    name,
                    set_command,
                    f"HAProxy put the payload into the open transaction of {owner}; aborted it",
                )
            pending = cert_summary_or_none(name, f"show ssl cert *{p}", r_pending)
            if pending is None or pending.serial != target.serial:
                got = "none" if pending is None or pending.serial is None else f"{pending.serial:X}"
                raise HAProxyError(
                    name,
                    f"show ssl cert *{p}",
                    f"pending transaction holds serial {got}, expected {target.serial:X}",
                )
        except BaseException:
            self._abort(session, p, created)
            raise
        return created, status

    def _abort(self, session: Session, p: str, created: bool) -> None:
        with contextlib.suppress(HAProxyError):
            session.command(f"abort ssl cert {p}")
        if created:
            with contextlib.suppress(HAProxyError):
                session.command(f"del ssl cert {p}")

    def _commit(
        self, session: Session, path: Path, target: DeployTarget, created: bool, status: str
    ) -> str:
        """Commit the checked transaction of `path` (then `add ssl crt-list` if
        needed). Returns "updated" or "added"; on error aborts and raises."""
        p = str(path)
        commit = f"commit ssl cert {p}"
        try:
            reply = session.command(commit)
            if "Success!" not in reply:
                raise CommandFailed(session.name, commit, reply)
        except BaseException:
            self._abort(session, p, created)
            raise
        if not self._needs_add(created, status):
            return "updated"
        try:
            self._add_live(session, p, target)
        except BaseException:
            if created:
                with contextlib.suppress(HAProxyError):
                    session.command(f"del ssl cert {p}")
            raise
        return "added"

    def _add_live(self, session: Session, p: str, target: DeployTarget) -> None:
        """`add ssl crt-list` for `p` (options and SNI filters in the payload form)."""
        assert self.crt_list is not None
        crt_list = check_arg(str(self.crt_list), "crt-list")
        options = target.crt_list_options.strip()
        if self.crt_list.is_dir() or (not options and not target.sni_filters):
            # A `crt /dir/` bind: its crt-list is named without the slash and
            # takes no options.
            command, payload = f"add ssl crt-list {crt_list} {p}", None
        else:
            if any(c in options for c in "[];\n"):
                raise ValueError(f"crt-list options {options!r} contain '[', ']', ';' or a newline")
            line = p + (f" [{options}]" if options else "")
            for item in target.sni_filters:
                line += " " + check_arg(item, "SNI filter")
            command, payload = f"add ssl crt-list {crt_list}", line.encode()
        reply = session.command(command, payload)
        if "Success!" not in reply:
            raise CommandFailed(session.name, command, reply)

    def _remove_live(self, session: Session, path: Path) -> None:
        """Undo an "added": drop the crt-list entry, then the certificate."""
        p = check_arg(str(path), "certificate path")
        steps: list[tuple[str, bytes | None]] = []
        if self.crt_list is not None:
            steps.append(
                (f"del ssl crt-list {check_arg(str(self.crt_list), 'crt-list')} {p}", None)
            )
        steps.append((f"del ssl cert {p}", None))
        reply = session.pipeline(steps)[-1]
        if "deleted!" not in reply:
            raise CommandFailed(session.name, f"del ssl cert {p}", reply)

    # -- files -------------------------------------------------------------------

    def _read_file(self, path: Path) -> bytes | None:
        """The bytes of `path`, None if it does not exist."""
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None

    def _remember_disk(self, path: Path, bundle: bytes) -> None:
        try:
            st = os.stat(path)
        except OSError:
            return
        with self._state:
            self._disk[path] = ((st.st_ino, st.st_size, st.st_mtime_ns), _digest(bundle))

    def _disk_matches(self, path: Path, bundle: bytes) -> bool:
        """Whether the file at `path` holds `bundle`. Read only when its identity
        (st_ino, st_size, st_mtime_ns) changed since it was last found equal."""
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return False
        with self._state:
            known = self._disk.get(path)
        if known == ((st.st_ino, st.st_size, st.st_mtime_ns), _digest(bundle)):
            return True
        same = self._read_file(path) == bundle
        if same:
            self._remember_disk(path, bundle)
        return same

    def _write_files(self, files: Sequence[tuple[Path, bytes]]) -> None:
        """Write every (path, data) atomically, mode BUNDLE_MODE: temp files written
        and fsynced in parallel, renamed over their targets, then ONE fsync per
        directory. On an error before the renames nothing is changed."""
        if not files:
            return

        def write_tmp(item: tuple[Path, bytes]) -> Path:
            path, data = item
            fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            try:
                os.fchmod(fd, BUNDLE_MODE)
                with os.fdopen(fd, "wb") as f:
                    fd = -1
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            except BaseException:
                if fd >= 0:
                    os.close(fd)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp_name)
                raise
            return Path(tmp_name)

        if len(files) == 1:
            tmps = [write_tmp(files[0])]
        else:
            pool = _shared_pool("fsync", FSYNC_WORKERS)
            futures = [pool.submit(write_tmp, item) for item in files]
            wait(futures)
            errors = [f.exception() for f in futures if f.exception() is not None]
            if errors:
                for f in futures:
                    if f.exception() is None:
                        with contextlib.suppress(FileNotFoundError):
                            f.result().unlink()
                raise errors[0]  # type: ignore[misc]
            tmps = [f.result() for f in futures]
        for (path, _), tmp in zip(files, tmps, strict=True):
            os.replace(tmp, path)
        for directory in {path.parent for path, _ in files}:
            fsync_dir(directory)
        for path, data in files:
            self._remember_disk(path, data)

    def _restore_files(self, items: Sequence[_Item]) -> None:
        """Put each item's bundle file back as it was (deleted if it did not exist)."""
        rewrite = [
            (it.path, it.old) for it in items if it.old is not None and it.result.file_changed
        ]
        for it in items:
            if it.old is None:
                with contextlib.suppress(FileNotFoundError):
                    it.path.unlink()
            it.result.file_changed = False
        self._write_files([(p, old) for p, old in rewrite if old is not None])

    # -- public API --------------------------------------------------------------

    def deploy(self, target: DeployTarget) -> DeployResult:
        """Persist, swap and verify one certificate; roll everything back on failure.

        Never raises for HAProxy or verification problems: they are in the
        result (`ok` False, `errors`). Raises BundleError for a bundle that
        must not be deployed (nothing is written then) and OSError if the file
        cannot be written. Afterwards `status()` holds, per instance, what it
        serves (read back with `show ssl cert`) against `target.serial`: after
        a rollback that is the old serial and in_sync False.

        The same path as `deploy_batch`, with a batch of one: one runtime-API
        session per instance.
        """
        path, leaf_der = self._check_target(target)
        return self._run_batch([_Item(target, path, leaf_der, list(self.apis))])[0]

    def deploy_batch(self, targets: Iterable[DeployTarget]) -> list[DeployResult]:
        """Deploy `targets` together as ONE batch; results in the order given.

        Per instance one runtime-API session (prompt mode, pipelined) and one
        `show ssl cert` listing; one certificate transaction at a time in it
        (set, pending serial checked, commit or abort); every file written with
        parallel fsyncs and one directory fsync; the crt-list file edited once
        (adding every new line); verified by one pipelined `show ssl cert` pass
        for every serial plus TLS handshakes in parallel (see `handshake_sample`).
        A failure rolls back only the certificates it concerns; the others stay
        deployed and verified. A target named twice goes in a later batch.

        A BundleError (or PayloadTooLarge / ValueError) of one target is raised
        after all the others are done; nothing of that target is written.
        """
        items: list[_Item] = []
        first_error: Exception | None = None
        for target in targets:
            try:
                path, leaf_der = self._check_target(target)
            except (BundleError, PayloadTooLarge, ValueError) as exc:
                first_error = first_error or exc
                continue
            items.append(_Item(target, path, leaf_der, list(self.apis)))
        results: dict[int, DeployResult] = {}
        # Rounds in which no bundle path appears twice (by set: 1,000 targets
        # compared pairwise were a second of CPU before the first command).
        rounds: list[list[_Item]] = []
        round_paths: list[set[Path]] = []
        for it in items:
            for batch, paths in zip(rounds, round_paths, strict=True):
                if it.path not in paths:
                    batch.append(it)
                    paths.add(it.path)
                    break
            else:
                rounds.append([it])
                round_paths.append({it.path})
        for batch in rounds:
            for it, result in zip(batch, self._run_batch(batch), strict=True):
                results[id(it)] = result
        if first_error is not None:
            raise first_error
        return [results[id(it)] for it in items]

    def deploy_many(self, targets: Iterable[DeployTarget], workers: int = 4) -> list[DeployResult]:
        """`deploy_batch(targets)` (kept for callers; `workers` is ignored: the
        batch sets its own parallelism for fsyncs and handshakes)."""
        del workers
        return self.deploy_batch(targets)

    def _ensure_cert_dir(self) -> None:
        """Create cert_dir (and missing parents) with CERT_DIR_MODE whatever the
        umask; a directory that already exists is never chmodded."""
        missing: list[Path] = []
        d = self.cert_dir
        while not d.exists() and d != d.parent:
            missing.append(d)
            d = d.parent
        for d in reversed(missing):
            try:
                os.mkdir(d, CERT_DIR_MODE)
            except FileExistsError:
                continue  # created by someone else meanwhile: not ours to chmod
            os.chmod(d, CERT_DIR_MODE)  # mkdir's mode was masked by the umask

    def _run_batch(self, items: list[_Item]) -> list[DeployResult]:
        """Take the file lock of every item (in path order), run the batch, sort
        each result's instances into configuration order."""
        with contextlib.ExitStack() as stack:
            for path in sorted({it.path for it in items}):
                stack.enter_context(
                    _locked(_file_lock(path), self._lock_timeout, f"certificate {path.stem!r}")
                )
            self._deploy_batch(items)
        order = {name: i for i, name in enumerate(self.instances())}
        for it in items:
            it.result.instances.sort(key=lambda r: order.get(r.instance, len(order)))
        return [it.result for it in items]

    def _deploy_batch(self, items: Sequence[_Item]) -> None:
        """The batch (the caller holds every item's file lock). Each item is
        deployed to its own `apis` (all of them, or the stale ones of a reconcile)."""
        if not items:
            return
        self._ensure_cert_dir()
        for it in items:
            it.old = self._read_file(it.path)
        changed = [it for it in items if it.old != it.target.bundle]
        # The files are written (fsyncs on the disk) while the instances are
        # pushed (CPU in HAProxy); both are done before the crt-list file names
        # a new bundle and before anything is reported served.
        written = _shared_pool("write", 4).submit(
            self._write_files, [(it.path, it.target.bundle) for it in changed]
        )
        live = list(items)
        sessions: dict[str, Session] = {}
        checks = _Handshakes(self, live)
        write_error: BaseException | None = None
        try:
            try:
                for api in self.apis:
                    todo = [it for it in live if it.wants(api) and not it.failed]
                    if todo:
                        self._push_all(api, sessions, todo, checks.pushed)
            finally:
                write_error = written.exception()
                for it in changed:
                    it.result.file_changed = True
            if write_error is not None:
                for it in live:
                    it.result.errors.append(f"cannot write the bundle files: {write_error}")
            else:
                self._add_crt_list_lines([it for it in live if not it.failed])
            for it in live:
                if it.apis and not it.touched and not it.failed:
                    it.result.errors.append(
                        "no HAProxy runtime API instance reachable; the file is written and "
                        "is pushed when an instance answers again"
                    )
                    it.done = True
            self._verify_batch(
                [it for it in live if it.touched and not it.done and not it.failed],
                sessions,
                checks,
            )
            failed = [it for it in live if it.failed and not it.done]
            if failed:
                self._roll_back_batch(failed, sessions)
            refused = [it for it in items if it.refused is not None]
            if refused:
                self._observe(refused, sessions)
        finally:
            checks.close()
            for session in sessions.values():
                session.close()
        if write_error is not None:
            raise write_error
        for it in live:
            if it.failed:
                continue
            for api, action in it.touched:
                it.result.instances.append(InstanceResult(api.name, action, it.target.serial))
                # The show pass read this serial back and the handshakes returned
                # this leaf: a fact, not an assumption.
                self._remember(
                    SyncStatus(it.target.name, api.name, it.target.serial, it.target.serial, True)
                )
            if not self.apis:
                self._remember(
                    SyncStatus(
                        it.target.name, DISK_INSTANCE, it.target.serial, it.target.serial, True
                    )
                )
                if it.result.file_changed or it.added_line is not None:
                    with self._state:
                        self._changed = True
            it.result.ok = True

    def _add_crt_list_lines(self, items: Sequence[_Item]) -> None:
        """One locked edit of the crt-list file giving every item's path a line
        (the bundles are written). An item whose line is refused fails (and is
        rolled back by the caller)."""
        editor = self._crt_list_editor()
        if editor is None or self._crt_list_names_all(editor, [it.path for it in items]):
            return
        try:
            added = editor.add_many(
                [(it.path, self._crt_list_line(it.path, it.target)) for it in items]
            )
        except (CrtListError, TimeoutError) as exc:
            # The whole edit was refused: retry one by one to find the culprits.
            added = []
            for it in items:
                try:
                    added.append(editor.add(it.path, self._crt_list_line(it.path, it.target)))
                except (CrtListError, TimeoutError) as one:
                    it.result.errors.append(str(one))
                    added.append(None)
            del exc  # each item got its own verdict
        for it, line in zip(items, added, strict=True):
            it.added_line = line
        self._crt_list_seen(editor, [it.path for it in items if not it.failed])

    def _crt_list_names_all(self, editor: CrtListFile, paths: Sequence[Path]) -> bool:
        """True if the crt-list file is as we last left it (same st_ino, st_size,
        st_mtime_ns) and named all `paths` then: no need to read it again."""
        try:
            st = os.stat(editor.path)
        except OSError:
            return False
        with self._state:
            known = self._crt_list_known
        return (
            known is not None
            and known[0] == (st.st_ino, st.st_size, st.st_mtime_ns)
            and all(str(p) in known[1] for p in paths)
        )

    def _crt_list_seen(self, editor: CrtListFile, paths: Sequence[Path]) -> None:
        """Remember that the crt-list file, as it is now, names `paths`."""
        try:
            st = os.stat(editor.path)
        except OSError:
            return
        identity = (st.st_ino, st.st_size, st.st_mtime_ns)
        with self._state:
            known = self._crt_list_known
            before = known[1] if known is not None and known[0] == identity else frozenset()
            self._crt_list_known = (identity, before | {str(p) for p in paths})

    def _push_all(
        self,
        api: RuntimeAPI,
        sessions: dict[str, Session],
        todo: list[_Item],
        pushed: Callable[[_Item, RuntimeAPI], None],
    ) -> None:
        """Push every item of `todo` to `api` in one session, one transaction at a
        time; `pushed(item, api)` is called as soon as each item is through."""
        session = sessions.setdefault(api.name, Session(api))
        try:
            self._push_each(api, session, todo, pushed)
        except TimeoutError as exc:
            for it in todo:
                if not it.touched_on(api):
                    it.fail(api, exc)

    def _push_each(
        self,
        api: RuntimeAPI,
        session: Session,
        todo: list[_Item],
        pushed: Callable[[_Item, RuntimeAPI], None],
    ) -> None:
        with _locked(_instance_lock(api.name), self._lock_timeout, f"HAProxy {api.name}"):
            try:
                loaded = self._start_session(session)
            except InstanceUnreachable as exc:
                for it in todo:
                    self._unreachable(it, api, exc)
                    pushed(it, api)
                return
            except (HAProxyError, ValueError) as exc:
                for it in todo:
                    it.fail(api, exc)
                return
            # An updated certificate's commit (+ an abort that closes its
            # transaction even if the commit failed) travels in front of the
            # next certificate's set: one round trip per certificate, and
            # still one transaction open at a time, checked before its commit.
            carried: _Item | None = None

            def closing(it: _Item) -> list[tuple[str, bytes | None]]:
                p = check_arg(str(it.path), "certificate path")
                return [(f"commit ssl cert {p}", None), (f"abort ssl cert {p}", None)]

            def settle(replies: list[str]) -> None:
                nonlocal carried
                it, carried = carried, None
                assert it is not None
                if "Success!" in replies[0]:
                    it.touched.append((api, "updated"))
                    pushed(it, api)
                else:
                    it.fail(api, CommandFailed(api.name, f"commit ssl cert {it.path}", replies[0]))

            for i, it in enumerate(todo):
                try:
                    before = closing(carried) if carried is not None else []
                    created, status = self._open_checked(
                        session,
                        it.path,
                        it.target,
                        str(it.path) in loaded,
                        before,
                        settle if before else None,
                    )
                    if not created and not self._needs_add(created, status):
                        carried = it
                        continue
                    action = self._commit(session, it.path, it.target, created, status)
                except HAProxyConnectionError as exc:
                    # The connection died mid-batch (HAProxy killed or
                    # restarted): this one (and a commit in flight) may be
                    # half done and is rolled back; nothing was sent for the
                    # rest, whose files are on disk for its restart, and
                    # poll() reconciles it.
                    for dead in [carried, it] if carried is not None else [it]:
                        dead.fail(api, exc)
                    carried = None
                    for rest in todo[i + 1 :]:
                        self._unreachable(rest, api, exc)
                        pushed(rest, api)
                    return
                except (HAProxyError, ValueError) as exc:
                    it.fail(api, exc)
                    continue
                it.touched.append((api, action))
                loaded.add(str(it.path))
                pushed(it, api)
            if carried is not None:
                try:
                    settle(session.pipeline(closing(carried)))
                except HAProxyError as exc:
                    carried.fail(api, exc)

    def _unreachable(self, it: _Item, api: RuntimeAPI, exc: Exception) -> None:
        # Not a reason to hold the deploy back from the others: the file is on
        # disk for its restart and poll() pushes it when it answers again.
        it.result.instances.append(InstanceResult(api.name, "unreachable", error=str(exc)))
        it.result.warnings.append(str(exc))
        it.unreachable.add(api.name)
        self._mark_down(api.name)
        self._remember(
            SyncStatus(it.target.name, api.name, None, it.target.serial, False, error=str(exc))
        )

    # -- verification ----------------------------------------------------------

    def _verify_batch(
        self, items: Sequence[_Item], sessions: dict[str, Session], checks: _Handshakes
    ) -> None:
        """Per instance one pipelined `show ssl cert <path>` pass (every serial);
        then the outcome of the TLS handshakes `checks` ran while the batch was
        pushing. Problems go into each item's result."""
        if not items:
            return
        for api in self.apis:
            mine = [it for it in items if it.touched_on(api)]
            if not mine:
                continue
            session = sessions.setdefault(api.name, Session(api))
            commands = [f"show ssl cert {it.path}" for it in mine]
            try:
                replies = session.pipeline([(c, None) for c in commands])
            except HAProxyError as exc:
                for it in mine:
                    it.result.errors.append(str(exc))
                continue
            for it, command, reply in zip(mine, commands, replies, strict=True):
                try:
                    info = cert_summary_or_none(api.name, command, reply)
                except HAProxyError as exc:
                    it.result.errors.append(str(exc))
                    continue
                served = info.serial if info else None
                if served != it.target.serial:
                    it.result.errors.append(
                        f"HAProxy {api.name}: `show ssl cert {it.path}` reports serial "
                        f"{'none' if served is None else f'{served:X}'}, "
                        f"expected {it.target.serial:X}"
                    )
        checked: set[int] = set()
        outcomes = checks.collect()
        if checks.skipped and any(
            not isinstance(o, bytes) or o != it.leaf_der for it, _, _, o in outcomes
        ):
            # The sample saw a problem: no certificate is left to chance.
            checks.check_skipped()
            outcomes += checks.collect()
        for it, address, sni, outcome in outcomes:
            checked.add(id(it))
            result = it.result
            if isinstance(outcome, ConnectionRefusedError):
                # Nothing listens (that HAProxy is down): proves nothing either
                # way; the instance catches up from disk or via poll().
                result.handshakes.append(HandshakeResult(address, sni, None, False, str(outcome)))
                result.warnings.append(f"TLS check of {address} (SNI {sni}) skipped: {outcome}")
                continue
            if isinstance(outcome, Exception):
                result.handshakes.append(HandshakeResult(address, sni, None, False, str(outcome)))
                result.errors.append(f"TLS handshake to {address} (SNI {sni}) failed: {outcome}")
                continue
            ok = outcome == it.leaf_der
            # The leaf checked before the push has the target's serial; only
            # another leaf needs parsing (for the message).
            served = (
                it.target.serial if ok else x509.load_der_x509_certificate(outcome).serial_number
            )
            result.handshakes.append(HandshakeResult(address, sni, served, ok))
            if not ok:
                result.errors.append(
                    f"TLS handshake to {address} with SNI {sni} returned serial {served:X}, "
                    f"expected {it.target.serial:X}"
                )
        for it in items:
            if (
                id(it) in checked
                and not any(h.ok for h in it.result.handshakes)
                and not it.result.errors
            ):
                it.result.errors.append(
                    f"no TLS frontend answered ({', '.join(self.verify)}): the swap is not proven"
                )

    # -- rollback ----------------------------------------------------------------

    def _roll_back_batch(self, items: Sequence[_Item], sessions: dict[str, Session]) -> None:
        """Put back what was served and on disk before, for the failed `items` only;
        of the crt-list file remove only the lines they added (one edit)."""
        for it in items:
            if it.old is not None:
                try:
                    it.old_target = DeployTarget.from_bundle(
                        it.target.name, it.old, key_kind=it.target.key_kind
                    )
                except BundleError as exc:
                    it.result.errors.append(f"cannot roll back to the previous file: {exc}")
        for api in self.apis:
            work = [(it, action) for it in items for a, action in it.touched if a.name == api.name]
            if not work:
                continue
            session = sessions.setdefault(api.name, Session(api))
            try:
                with _locked(_instance_lock(api.name), self._lock_timeout, f"HAProxy {api.name}"):
                    for it, action in work:
                        try:
                            if action == "added":
                                self._remove_live(session, it.path)
                                served = None
                            elif it.old_target is not None:
                                self._transaction(session, it.path, it.old_target, exists=True)
                                served = it.old_target.serial
                            else:
                                raise HAProxyError(
                                    api.name, "rollback", "no previous bundle to put back"
                                )
                            it.result.instances.append(
                                InstanceResult(api.name, "rolled back", served)
                            )
                        except (HAProxyError, ValueError) as exc:
                            it.result.instances.append(
                                InstanceResult(api.name, "failed", error=str(exc))
                            )
                            it.result.errors.append(f"rollback failed: {exc}")
            except TimeoutError as exc:
                for it, _ in work:
                    it.result.errors.append(f"rollback failed: {exc}")
        for it in items:
            for api in it.apis:
                if not any(r.instance == api.name for r in it.result.instances):
                    it.result.instances.append(InstanceResult(api.name, "not touched"))
            it.refused = "deploy rolled back: " + it.result.errors[0]
        # Files last: if HAProxy restarts now it serves what it served before.
        # The lines go before their bundles: a line never names a deleted file.
        editor = self._crt_list_editor()
        keep: set[int] = set()
        lines = [it.added_line for it in items if it.added_line is not None]
        if lines and editor is not None:
            try:
                editor.remove_lines(lines)
            except (CrtListError, TimeoutError) as exc:
                for it in items:
                    if it.added_line is not None:
                        it.result.errors.append(f"rollback of the crt-list file failed: {exc}")
                        if it.old is None:
                            keep.add(id(it))  # the line still names the bundle: keep it
        self._restore_files([it for it in items if id(it) not in keep])
        for it in items:
            it.result.rolled_back = True
            it.result.file_changed = False

    def _observe(self, items: Sequence[_Item], sessions: dict[str, Session]) -> None:
        """Record what each instance serves now for failed items (one pipelined
        pass per instance): in sync only if it serves the stored serial and the
        deploy did not change it there."""
        for api in self.apis:
            mine = [it for it in items if it.wants(api) and api.name not in it.unreachable]
            if not mine:
                continue
            session = sessions.setdefault(api.name, Session(api))
            commands = [f"show ssl cert {it.path}" for it in mine]
            try:
                replies: list[str | HAProxyError] = list(
                    session.pipeline([(c, None) for c in commands])
                )
            except HAProxyError as exc:
                replies = [exc] * len(mine)
            for it, command, reply in zip(mine, commands, replies, strict=True):
                target = it.target
                try:
                    if isinstance(reply, HAProxyError):
                        raise reply
                    info = cert_summary_or_none(api.name, command, reply)
                except HAProxyError as exc:
                    self._remember(
                        SyncStatus(
                            target.name, api.name, None, target.serial, False, error=str(exc)
                        )
                    )
                    continue
                served = info.serial if info else None
                # An instance this deploy changed (rolled back, failed) was refused
                # the stored certificate, whatever it serves now.
                changed = any(
                    r.instance == api.name and r.action != "not touched"
                    for r in it.result.instances
                )
                in_sync = served == target.serial and not changed
                self._remember(
                    SyncStatus(
                        target.name,
                        api.name,
                        served,
                        target.serial,
                        in_sync,
                        error=None if in_sync else it.refused,
                    )
                )

    def remove(self, name: str) -> list[str]:
        """Stop serving certificate `name`: on every instance `del ssl crt-list`
        (each entry) then `del ssl cert`; drop its crt-list file line(s) and
        its bundle file. Returns the problems (empty: done everywhere).
        The file is removed even if an instance is unreachable (its restart
        must not load it again); an instance where it stays loaded is reported.
        The bundle is kept if its crt-list line could not be removed.
        """
        path = self.path_for(name)
        p = str(path)
        errors: list[str] = []
        with _locked(_file_lock(path), self._lock_timeout, f"certificate {name!r}"):
            for api in self.apis:
                try:
                    with _locked(
                        _instance_lock(api.name), self._lock_timeout, f"HAProxy {api.name}"
                    ):
                        if p not in api.list_certs().certificates:
                            continue
                        if self.crt_list is not None:
                            crt_list = str(self.crt_list)
                            entries = [e for e in api.show_crt_list(crt_list) if e.path == p]
                            for entry in entries:
                                target = p if len(entries) == 1 else f"{p}:{entry.line}"
                                api.del_crt_list(crt_list, target)
                        api.del_cert(p)
                except (HAProxyError, TimeoutError) as exc:
                    errors.append(str(exc))
            editor = self._crt_list_editor()
            try:
                if editor is not None and editor.remove(path):
                    with self._state:
                        self._changed = True
            except (CrtListError, TimeoutError) as exc:
                errors.append(str(exc))
            else:
                if path.exists():
                    path.unlink()
                    with self._state:
                        self._changed = True
        with self._state:
            for key in [k for k in self._status if k[0] == name]:
                del self._status[key]
        return errors

    def reconcile(
        self, targets: Iterable[DeployTarget], instances: Sequence[str] | None = None
    ) -> list[SyncStatus]:
        """Make every instance (or only `instances`) serve the stored `targets`.

        Each instance's served serials are read first, in one session (one
        pipelined `show ssl cert <path>` per target); an instance that does not
        answer is given up on after that one failure (error statuses for all
        its certificates, marked down for `poll`). The targets an instance
        serves stale are deployed as ONE batch through the same path as
        `deploy_batch` (push, `show ssl cert` + TLS handshakes, roll back on
        mismatch) to the stale instances: a certificate the TLS check refuses
        is rolled back, never left served. The others get their file (for a
        restart) and crt-list line made to match, which also repairs a line
        lost earlier. Returns one SyncStatus per (target, instance), also kept
        for `status()`. Never raises for HAProxy problems.

        Nothing is re-parsed or re-read when nothing changed: bundles are
        checked once per content (cached by name and bytes), and a bundle file
        is read only when its (st_ino, st_size, st_mtime_ns) changed since it
        was last found equal to the stored bundle.
        """
        targets = list(targets)
        if instances is None:
            # A full reconcile names every certificate: forget the ones no longer
            # configured so status() (and the in-sync metric) drops them.
            keep = {t.name for t in targets}
            with self._state:
                for key in [k for k in self._status if k[0] not in keep]:
                    del self._status[key]
        checked: list[tuple[DeployTarget, Path, bytes]] = []
        for target in targets:
            try:
                path, leaf_der = self._check_target(target)
            except (BundleError, PayloadTooLarge, ValueError) as exc:
                for inst in self.instances() or [DISK_INSTANCE]:
                    self._remember(
                        SyncStatus(target.name, inst, None, target.serial, False, error=str(exc))
                    )
                continue
            checked.append((target, path, leaf_der))
        if not self.apis:
            with self._files_locked([path for _, path, _ in checked]):
                self._ensure_cert_dir()
                stale_files = [(t, p) for t, p, _ in checked if not self._disk_matches(p, t.bundle)]
                self._write_files([(p, t.bundle) for t, p in stale_files])
                if stale_files:
                    with self._state:
                        self._changed = True
            pushed = {t.name for t, _ in stale_files}
            for target, _, _ in checked:
                self._remember(
                    SyncStatus(
                        target.name,
                        DISK_INSTANCE,
                        target.serial,
                        target.serial,
                        True,
                        pushed=target.name in pushed,
                    )
                )
            return self._statuses_of([DISK_INSTANCE], targets)
        wanted = [api for api in self.apis if instances is None or api.name in set(instances)]
        # 1. What every wanted instance serves (one session each; one failure
        #    gives up on it).
        served: dict[tuple[str, str], int | None] = {}
        for api in wanted:
            commands = [f"show ssl cert {path}" for _, path, _ in checked]
            try:
                with Session(api) as session:
                    replies = session.pipeline([(c, None) for c in commands])
            except HAProxyError as exc:
                if isinstance(exc, HAProxyConnectionError):
                    self._mark_down(api.name)
                for target, _, _ in checked:
                    self._remember(
                        SyncStatus(
                            target.name, api.name, None, target.serial, False, error=str(exc)
                        )
                    )
                continue
            for (target, _, _), command, reply in zip(checked, commands, replies, strict=True):
                try:
                    info = cert_summary_or_none(api.name, command, reply)
                except HAProxyError as exc:
                    self._remember(
                        SyncStatus(
                            target.name, api.name, None, target.serial, False, error=str(exc)
                        )
                    )
                    continue
                served[(target.name, api.name)] = info.serial if info else None
        # 2. Deploy what is stale as one batch, with the full verification and rollback.
        items: list[_Item] = []
        in_step: list[tuple[DeployTarget, Path]] = []
        for target, path, leaf_der in checked:
            stale = [
                api
                for api in wanted
                if (target.name, api.name) in served
                and served[(target.name, api.name)] != target.serial
            ]
            if stale:
                items.append(_Item(target, path, leaf_der, stale))
            else:
                in_step.append((target, path))
        crt_errors: dict[str, str] = {}
        with self._files_locked([path for _, path, _ in checked]):
            self._deploy_batch(items)
            # Nothing to push for these: the file (for a restart) and its crt-list
            # line are still made to match what is stored.
            if in_step:
                self._ensure_cert_dir()
                self._write_files(
                    [(p, t.bundle) for t, p in in_step if not self._disk_matches(p, t.bundle)]
                )
                crt_errors = self._ensure_crt_list_lines(in_step)
        for it in items:
            if it.result.ok:
                for api in it.apis:
                    with self._state:
                        status = self._status.get((it.target.name, api.name))
                    if status is not None:
                        self._remember(replace(status, pushed=True))
        for target, _, _ in checked:
            for api in wanted:
                if served.get((target.name, api.name), -1) != target.serial:
                    continue
                error = crt_errors.get(target.name)
                self._remember(
                    SyncStatus(
                        target.name,
                        api.name,
                        target.serial,
                        target.serial,
                        error is None,
                        error=error,
                    )
                )
        return self._statuses_of([api.name for api in wanted], targets)

    def _ensure_crt_list_lines(
        self, entries: Sequence[tuple[DeployTarget, Path]]
    ) -> dict[str, str]:
        """Give every path a crt-list line (one edit); returns name -> error for
        those that could not get one. Nothing is read while the crt-list file is
        as we last left it, with all these paths named."""
        editor = self._crt_list_editor()
        paths = [p for _, p in entries]
        if editor is None or not entries or self._crt_list_names_all(editor, paths):
            return {}
        errors: dict[str, str] = {}
        try:
            editor.add_many([(p, self._crt_list_line(p, t)) for t, p in entries])
        except (CrtListError, TimeoutError):
            for target, path in entries:
                try:
                    editor.add(path, self._crt_list_line(path, target))
                except (CrtListError, TimeoutError) as exc:
                    errors[target.name] = str(exc)
        self._crt_list_seen(editor, [p for t, p in entries if t.name not in errors])
        return errors

    @contextlib.contextmanager
    def _files_locked(self, paths: Iterable[Path]) -> Iterator[None]:
        """Hold the file lock of every path (taken in path order: no deadlock)."""
        with contextlib.ExitStack() as stack:
            for path in sorted(set(paths)):
                stack.enter_context(
                    _locked(_file_lock(path), self._lock_timeout, f"certificate {path.stem!r}")
                )
            yield

    def _statuses_of(
        self,
        instance_names: Sequence[str],
        targets: Sequence[DeployTarget],
    ) -> list[SyncStatus]:
        """The recorded statuses of `targets` on `instance_names`, in target order."""
        out: list[SyncStatus] = []
        with self._state:
            for target in targets:
                for inst in instance_names or [DISK_INSTANCE]:
                    status = self._status.get((target.name, inst))
                    if status is not None:
                        out.append(status)
        return out

    def served(self, targets: Iterable[DeployTarget]) -> list[SyncStatus]:
        """Read-only: what each instance serves for each target (nothing pushed,
        nothing recorded). Per instance ONE session: a `show ssl cert` listing,
        then a pipelined `show ssl cert <path>` per certificate it loads; a
        connection failure or timeout gives up on that instance, so an
        unresponsive one costs one timeout, not one per certificate, and all
        its certificates get that error. Ordered by instance, then target.
        """
        targets = list(targets)
        out: list[SyncStatus] = []
        for api in self.apis:
            try:
                with Session(api) as session:
                    loaded = set(session.list_certs().certificates)
                    paths = [str(self.path_for(t.name)) for t in targets]
                    asked = [(t, p) for t, p in zip(targets, paths, strict=True) if p in loaded]
                    commands = [f"show ssl cert {p}" for _, p in asked]
                    replies = dict(
                        zip(
                            [t.name for t, _ in asked],
                            zip(
                                commands,
                                session.pipeline([(c, None) for c in commands]),
                                strict=True,
                            ),
                            strict=True,
                        )
                    )
            except HAProxyError as exc:
                down = f"instance unreachable: {exc}"
                out += [
                    SyncStatus(t.name, api.name, None, t.serial, False, error=down) for t in targets
                ]
                continue
            for target in targets:
                if target.name not in replies:
                    out.append(SyncStatus(target.name, api.name, None, target.serial, False))
                    continue
                command, reply = replies[target.name]
                try:
                    info = cert_summary_or_none(api.name, command, reply)
                except HAProxyError as exc:
                    out.append(
                        SyncStatus(
                            target.name, api.name, None, target.serial, False, error=str(exc)
                        )
                    )
                    continue
                serial = info.serial if info else None
                out.append(
                    SyncStatus(
                        target.name, api.name, serial, target.serial, serial == target.serial
                    )
                )
        return out

    def poll(self, targets: Iterable[DeployTarget]) -> list[SyncStatus]:
        """Check every instance; reconcile those that are new, came back after being
        unreachable, or restarted (new PID or start time). Returns their statuses.

        Call periodically (e.g. every few seconds); the first call reconciles all.
        """
        targets = list(targets)
        due: list[str] = []
        for api in self.apis:
            try:
                info = api.show_info()
            except HAProxyError:
                with self._state:
                    was_seen = api.name in self._seen
                    self._seen[api.name] = None
                if not was_seen:
                    due.append(api.name)  # first look: record the error statuses
                continue
            with self._state:
                before = self._seen.get(api.name, "never")
                self._seen[api.name] = info
            if before != info:
                due.append(api.name)
        if not due:
            return []
        return self.reconcile(targets, due)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no certificate transaction runs on any of our instances (for
        a clean shutdown). Returns False if one was still running at `timeout` s."""
        deadline = time.monotonic() + timeout
        for name in self.instances():
            lock = _instance_lock(name)
            if not lock.acquire(timeout=max(deadline - time.monotonic(), 0)):
                return False
            lock.release()
        return True

    def reachable(self, instance: str) -> bool | None:
        """Whether `poll`/`reconcile` last reached `instance`; None if never polled."""
        with self._state:
            if instance not in self._seen:
                return None
            return self._seen[instance] is not None

    def finish(self) -> bool:
        """Run the reload command if a file changed since the last call and no
        runtime API is configured. Returns True if it ran; raises ReloadError
        if it failed (the change stays pending for the next call).
        """
        with self._state:
            if not self._changed or self.apis or not self.reload_command:
                return False
        try:
            proc = subprocess.run(
                self.reload_command,
                capture_output=True,
                timeout=self.reload_timeout,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ReloadError(f"[haproxy] reload_command {self.reload_command}: {exc}") from exc
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).decode(errors="replace").strip()[-500:]
            raise ReloadError(
                f"[haproxy] reload_command {self.reload_command} exited with "
                f"{proc.returncode}: {tail}"
            )
        with self._state:
            self._changed = False
        return True


def parse_instances(addresses: Iterable[str]) -> list[str]:
    """Normalised instance names for `addresses` (as used in results and metrics)."""
    return [str(parse_address(a)) for a in addresses]


# ---------------------------------------------------------------------------
# Wiring to the rest of the agent (config + storage)


def stored_targets(config: Any, storage: Any | None = None) -> list[DeployTarget]:
    """DeployTargets for every configured certificate that has a stored generation.

    `config` is agent.config.Config; `storage` an agent.storage.Storage
    (default: FileStorage at the state dir). The bundle is assembled here, on
    the deploying node, from the stored full chain and this node's key file
    (`agent.renewal.node_bundle`): storage never holds a private key.
    Certificates without a stored generation are skipped; one whose key
    cannot be read, or does not belong to the stored leaf, raises BundleError
    naming the certificate and the key file.

    Cached per `storage` object (see `stored_targets_of`, two storage rounds
    at most): a certificate whose generation and key file did not change
    costs its pointer and a stat or two, no PEM parse. Certificates no
    longer configured leave the cache.
    """

    store = storage if storage is not None else wiring.make_storage(config)
    targets = []
    got = stored_targets_of(config.certificates, store)
    for cert in config.certificates:
        target = got[cert.name]
        if isinstance(target, BundleError):
            raise target
        if target is not None:
            targets.append(target)
    with _TARGET_GUARD:
        cache = _TARGET_CACHE.get(store)
        if cache is not None:
            names = {c.name for c in config.certificates}
            for name in [n for n in cache if n not in names]:
                del cache[name]
    return targets


# storage object -> certificate name -> (identity, target). The identity is the
# current generation id (generations are immutable: the id names the full
# chain's bytes) plus the key file's and DH file's path and (st_dev, st_ino,
# st_size, st_mtime_ns): a new generation, a replaced or rewritten key file, or
# another key path in the config misses. Weak keys: a storage dropped by a
# reload takes its cache with it.
_TARGET_GUARD = threading.Lock()
_TARGET_CACHE: weakref.WeakKeyDictionary[Any, dict[str, tuple[tuple[object, ...], DeployTarget]]]
_TARGET_CACHE = weakref.WeakKeyDictionary()


def _file_identity(path: Path | None) -> tuple[object, ...] | None:
    """(path, st_dev, st_ino, st_size, st_mtime_ns) of `path`; None for no path
    or a file that cannot be stat'ed (then the caller reads it and reports why)."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def stored_target(cert: Any, storage: Any) -> DeployTarget | None:
    """The DeployTarget of one certificate (`agent.config.CertificateConfig`)
    from its current stored generation; None when none is stored (or it is
    unreadable: logged). Raises KeyMismatch / BundleError naming the
    certificate and the key file. `stored_targets_of` for one certificate."""
    got = stored_targets_of([cert], storage)[cert.name]
    if isinstance(got, BundleError):
        raise got
    return got


def stored_targets_of(
    certs: Sequence[Any], storage: Any, pointers: Mapping[str, str | None] | None = None
) -> dict[str, DeployTarget | BundleError | None]:
    """The DeployTarget of each of `certs` (`agent.config.CertificateConfig`) from
    its current stored generation, in at most TWO storage rounds however many
    certificates (`Storage.load_many`): the `current` pointers (skipped when
    `pointers`, name -> generation id or None as `certstate.read_currents`
    returns them, are given), then every file of the generations the cache
    does not hold. Per certificate name: the target; None when no generation
    is stored or it is unreadable (logged); or the BundleError (KeyMismatch:
    the key does not belong to the stored leaf) naming the certificate and
    the key file, returned, not raised, so one bad certificate skips only
    itself. Storage errors (Redis away) are raised.

    An unchanged certificate is answered from a cache (see `_TARGET_CACHE`)
    after its pointer and a stat of the key file (and of the DH file, if
    any); otherwise the generation is cross-checked, the bundle assembled and
    checked (key belongs to the leaf), and cached."""
    from agent.certstate import load_generations, read_currents

    certs = list(certs)
    if pointers is None or any(c.name not in pointers for c in certs):
        pointers = {**(pointers or {}), **read_currents(storage, [c.name for c in certs])}
    out: dict[str, DeployTarget | BundleError | None] = {}
    misses: dict[str, tuple[Any, str, tuple[object, ...] | None]] = {}
    for cert in certs:
        gen_id = pointers.get(cert.name)
        if gen_id is None:
            out[cert.name] = None
            continue
        # The key file is the one the generation was ordered for (its meta.json,
        # agent.rollover.served_key_path): a key rollover never pairs a leaf with
        # the other key. A cached entry of the same generation names it already.
        with _TARGET_GUARD:
            hit = _TARGET_CACHE.get(storage, {}).get(cert.name)
        key_file = Path(cert.key)
        if hit is not None and hit[0][0] == gen_id and isinstance(hit[0][1], tuple):
            key_file = Path(str(hit[0][1][0]))
        key_id = _file_identity(key_file)
        dh = getattr(cert, "dhparam", None)
        dh_id = _file_identity(dh) if dh is not None else ()
        if key_id is not None and dh_id is not None:
            identity = (gen_id, key_id, dh_id, str(cert.key))
            if hit is not None and hit[0] == identity:
                out[cert.name] = hit[1]
                continue
        misses[cert.name] = (cert, gen_id, dh_id)
    if not misses:
        return out
    generations = load_generations(storage, {n: g for n, (_, g, _) in misses.items()})
    for name, (cert, gen_id, dh_id) in misses.items():
        gen = generations[name]
        if isinstance(gen, Exception):
            log.warning("certificate %s: current generation %s unreadable: %s", name, gen_id, gen)
            out[name] = None
            continue
        try:
            out[name] = _target_of(cert, gen, dh_id, storage)
        except BundleError as exc:
            out[name] = exc
    return out


def _target_of(cert: Any, gen: Any, dh_id: tuple[object, ...] | None, storage: Any) -> DeployTarget:
    """The DeployTarget of `cert` from its checked generation `gen` (certstate.Generation)
    with this node's key file; cached for `storage` when the key file stood still."""
    from agent.keys import StableKeyError
    from agent.renewal import node_bundle
    from agent.rollover import served_key_path

    key_file = served_key_path(cert, gen.meta.key_path)
    key_id = _file_identity(key_file)
    identity = (gen.id, key_id, dh_id, str(cert.key)) if key_id is not None and dh_id is not None \
        else None  # fmt: skip
    try:
        bundle = node_bundle(cert, gen.fullchain_pem, gen.meta.key_path)
    except FileNotFoundError as exc:
        if key_file.exists():  # the DH file, not the key
            raise BundleError(f"certificate {cert.name!r}: {exc}") from exc
        # This node does not hold the key the stored certificate was ordered for
        # (in a fleet: a next key not yet copied here): the same refusal as a
        # key that does not match, with the same metric.
        raise KeyMismatch(
            f"certificate {cert.name!r}: this node has no key file {key_file}, the key "
            f"stored generation {gen.id} was ordered for",
            gen.leaf.serial_number,
        ) from exc
    except (OSError, StableKeyError) as exc:
        raise BundleError(
            f"certificate {cert.name!r}: cannot read its key {key_file}: {exc}"
        ) from exc
    try:
        target = DeployTarget.from_bundle(
            cert.name, bundle, key_kind=getattr(cert, "key_kind", None)
        )
    except KeyMismatch as exc:
        raise KeyMismatch(
            f"{exc} (key file {key_file}, stored generation {gen.id})", exc.serial
        ) from exc
    except BundleError as exc:
        raise BundleError(f"{exc} (key file {key_file}, stored generation {gen.id})") from exc
    if identity is not None and _file_identity(key_file) == key_id:
        # Cached only if the key file did not change while we read it.
        with _TARGET_GUARD:
            try:
                per_store = _TARGET_CACHE.setdefault(storage, {})
            except TypeError:  # a storage that cannot be weakly referenced: no cache
                return target
            per_store[cert.name] = (identity, target)
    return target


def prefetched_targets(
    config: Any, storage: Any, names: Sequence[str]
) -> Callable[[str], DeployTarget | None]:
    """`target_of(name)` for `batch_deploy`: the stored targets of every configured
    one of `names` read in ONE `stored_targets_of` (two storage rounds at most,
    not five per certificate); `target_of` raises as `stored_target` would
    (KeyError for a name not configured, BundleError / KeyMismatch, the
    storage's OSError when the batch read failed)."""
    certs = []
    for name in dict.fromkeys(names):
        with contextlib.suppress(KeyError):  # raised again by target_of, for that name only
            certs.append(config.certificate(name))
    got: dict[str, DeployTarget | BundleError | None] = {}
    failed: OSError | ValueError | None = None
    try:
        got = stored_targets_of(certs, storage)
    except (OSError, ValueError) as exc:  # the store is away: every certificate fails with it
        failed = exc

    def target_of(name: str) -> DeployTarget | None:
        config.certificate(name)
        if failed is not None:
            raise failed
        target = got[name]
        if isinstance(target, BundleError):
            raise target
        return target

    return target_of


class RenewalDeployHook:
    """`on_installed(name)` for `renew_certificates`: deploys the stored
    certificate `name` (bundle built on this node, see `stored_target`),
    returns the DeployResult (the renewer records its per-instance facts) and
    raises DeployError if it is not served everywhere. Call `finish()` once
    at the end of the run (runs the reload command in reload mode). `results`
    keeps every DeployResult of the run.
    """

    def __init__(self, config: Any, storage: Any | None = None) -> None:

        self.config = config
        self.storage = storage if storage is not None else wiring.make_storage(config)
        self.deployer = Deployer.from_config(config)
        self.results: list[DeployResult] = []

    def __call__(self, name: str) -> DeployResult:
        cert = self.config.certificate(name)
        target = stored_target(cert, self.storage)
        if target is None:
            raise BundleError(f"certificate {name!r}: nothing stored to deploy")
        result = self.deployer.deploy(target)
        self.results.append(result)
        return result.raise_for_errors()

    def deploy_many(self, names: Sequence[str]) -> dict[str, DeployResult | Exception]:
        """Deploy the stored certificates `names` as ONE `Deployer.deploy_batch`
        (one runtime-API session per instance; a failure rolls back only the
        certificates it concerns). Per name: its DeployResult when served
        everywhere, else the exception (`DeployError` carrying the result,
        `BundleError` when nothing was deployed for it)."""
        return batch_deploy(
            self.deployer, names, prefetched_targets(self.config, self.storage, names), self.results
        )

    def finish(self) -> bool:
        """Run the reload command if needed (see Deployer.finish)."""
        return self.deployer.finish()


def batch_deploy(
    deployer: Deployer,
    names: Sequence[str],
    target_of: Callable[[str], DeployTarget | None],
    results: list[DeployResult] | None = None,
) -> dict[str, DeployResult | Exception]:
    """`deploy_batch` of the targets of `names` with an outcome per name: the
    DeployResult when served everywhere, else the exception (a target that
    cannot be built or is refused before anything is written is left out of
    the batch, so it fails alone). `results` collects every DeployResult."""
    out: dict[str, DeployResult | Exception] = {}
    targets: list[DeployTarget] = []
    for name in dict.fromkeys(names):
        try:
            target = target_of(name)
            if target is None:
                raise BundleError(f"certificate {name!r}: nothing stored to deploy")
            deployer._check_target(target)  # refused alone, before the batch writes anything
        except (BundleError, PayloadTooLarge, ValueError, OSError, KeyError) as exc:
            out[name] = exc
            continue
        targets.append(target)
    if not targets:
        return out
    try:
        batch = deployer.deploy_batch(targets)
    except Exception as exc:  # the whole batch: every certificate in it gets the error
        for t in targets:
            out[t.name] = exc
        return out
    for result in batch:
        if results is not None:
            results.append(result)
        out[result.name] = result if result.ok else DeployError(result)
    return out


class DeployCoalescer:
    """Turns concurrent one-certificate deploys into batches.

    `deploy(name)` (from any thread) blocks until the batch holding `name`
    was deployed and returns its outcome (or raises it). The first caller of
    a batch waits `window` seconds for others (renewals that finish
    together), then runs `run_batch(names)` for all of them; callers that
    arrive while a batch runs form the next one. `run_batch` returns an
    outcome per name (DeployResult, or the exception to raise).
    """

    def __init__(
        self,
        run_batch: Callable[[list[str]], dict[str, DeployResult | Exception]],
        window: float = 0.05,
    ) -> None:
        self.run_batch = run_batch
        self.window = window
        self._lock = threading.Lock()
        self._pending: dict[str, list[Future[DeployResult]]] = {}
        self._leader = False
        self._running = threading.Lock()  # one batch at a time
        self.batches: list[list[str]] = []  # names of every batch run (for tests and logs)

    def deploy(self, name: str) -> DeployResult:
        fut: Future[DeployResult] = Future()
        with self._lock:
            self._pending.setdefault(name, []).append(fut)
            lead = not self._leader
            if lead:
                self._leader = True
        if lead:
            self._lead()
        return fut.result()

    def _lead(self) -> None:
        time.sleep(self.window)
        with self._running:
            with self._lock:
                pending, self._pending = self._pending, {}
                self._leader = False
            names = list(pending)
            self.batches.append(names)
            try:
                outcomes = self.run_batch(names)
            except Exception as exc:
                outcomes = dict.fromkeys(names, exc)
            for name, futs in pending.items():
                outcome = outcomes.get(name) or RuntimeError(f"certificate {name!r}: not deployed")
                for f in futs:
                    if isinstance(outcome, Exception):
                        f.set_exception(outcome)
                    else:
                        f.set_result(outcome)
