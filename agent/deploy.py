"""Deploy certificates into running HAProxy instances: persisted, swapped, proven.

The flow for one certificate (`Deployer.deploy`):

1. check the bundle locally (leaf + private key that belongs to it, fits in
   `tune.bufsize`): a bad bundle is refused before anything is written;
2. write it atomically to `<cert_dir>/<name>.pem` (the file HAProxy's config
   references, so a reload or restart serves the same certificate), keeping
   the previous bytes; a certificate HAProxy has never seen also gets a line
   in the crt-list file;
3. on every runtime API instance, in one transaction each: `set ssl cert`,
   check the pending transaction's serial, `commit ssl cert` (a certificate
   HAProxy does not know yet is created with `new ssl cert` and added with
   `add ssl crt-list`);
4. verify: `show ssl cert` reports the new serial on every instance AND a real
   TLS handshake to each `verify` address, with SNI set to each of the
   certificate's names, returns the new leaf;
5. on any failure: abort open transactions, push the previous bundle back
   (or remove a certificate that was new), remove the crt-list line this
   deploy added (before its bundle), restore the bundle file, and report why
   in the `DeployResult`.

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

`reconcile` compares each instance's served serial with the stored bundle and
deploys what is stale through the same path (push, verify, roll back);
`poll` notices an instance that came back (or restarted: new PID or start
time) and reconciles it. Without any runtime API, `finish`
runs the configured reload command once if a file changed.

Everything here is synchronous and thread-safe; the asyncio daemon calls it
through `asyncio.to_thread`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.crtlist import CrtListError, CrtListFile
from agent.haproxy_api import (
    DEFAULT_BUFSIZE,
    HAProxyConnectionError,
    HAProxyError,
    PayloadTooLarge,
    ProcessInfo,
    RuntimeAPI,
    check_arg,
    check_size,
    frame_command,
    parse_address,
)
from agent.storage import atomic_write, safe_name

BUNDLE_MODE = 0o600  # the bundle holds the private key
# A cert_dir the agent creates: the owner writes, HAProxy's group may read
# (the `0640 root:haproxy` layout agent/permissions.py accepts), others nothing.
CERT_DIR_MODE = 0o750
# How long a transaction someone else opened may stay open before we act (s).
# Ours last milliseconds; one still open after this is left over from a crash.
STALE_TRANSACTION_WAIT = 1.0
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
    ) -> DeployTarget:
        """Build a target from a bundle, reading serial and names from its leaf."""
        leaf = inspect_bundle(name, bundle)
        return cls(
            name,
            bundle,
            leaf.serial_number,
            _cert_names(leaf),
            crt_list_options,
            tuple(sni_filters),
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
        raise BundleError(
            f"certificate {name!r}: the private key does not belong to the leaf certificate "
            f"(serial {leaf.serial_number:X})"
        )
    return leaf


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


def tls_leaf(address: str, server_name: str | None, timeout: float) -> bytes:
    """DER of the leaf certificate a TLS server at "host:port" presents for `server_name`.

    Chain and hostname are deliberately not validated: this checks WHICH
    certificate is served, not whether a client would trust it.
    """
    host, port = _split_host_port(address)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        context.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    if not der:
        raise ssl.SSLError(f"{address} presented no certificate")
    return der


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
        leaf = inspect_bundle(target.name, target.bundle)
        if leaf.serial_number != target.serial:
            raise BundleError(
                f"certificate {target.name!r}: serial {target.serial:X} given but the bundle's "
                f"leaf has {leaf.serial_number:X}"
            )
        if self.apis:
            command = f"set ssl cert {path}"
            message = frame_command(command, target.bundle)
            # The smallest tune.bufsize of all instances (read from HAProxy where it
            # shows it): refuse before anything is written.
            api = min(self.apis, key=lambda a: a.payload_limit())
            check_size(api.name, command, message, api.payload_limit())
        return path, leaf.public_bytes(serialization.Encoding.DER)

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

    def _add_to_crt_list_file(self, path: Path, target: DeployTarget) -> str | None:
        """Give `path` a line in the crt-list file if none names it (the bundle must
        already be written). Returns the line added (None: nothing changed).
        Raises CrtListError if the result would not load."""
        editor = self._crt_list_editor()
        if editor is None:
            return None
        return editor.add(path, self._crt_list_line(path, target))

    # -- one transaction on one instance --------------------------------------

    def _clear_stale_transaction(self, api: RuntimeAPI) -> None:
        """Wait (bounded) for an open transaction to end; then abort one left open
        under cert_dir (ours, from a crashed run) and refuse to run next to
        anyone else's. Raises InstanceUnreachable if `api` cannot be reached:
        this is the first call of every transaction, so nothing changed yet.
        """
        deadline = time.monotonic() + STALE_TRANSACTION_WAIT
        while True:
            try:
                transactions = api.list_certs().transactions
            except HAProxyConnectionError as exc:
                raise InstanceUnreachable(exc.instance, exc.command, exc.reply) from exc
            if not transactions or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        for pending in transactions:
            if os.path.dirname(pending) == str(self.cert_dir):
                api.abort_cert(pending)
            else:
                raise HAProxyError(
                    api.name,
                    "show ssl cert",
                    f"another client has a certificate transaction open for {pending}; "
                    "not starting one next to it (HAProxy 2.6 would merge them)",
                )

    def _push(self, api: RuntimeAPI, path: Path, target: DeployTarget) -> str:
        """Make `api` serve `target` from `path`. Returns "updated" or "added".

        Holds the instance lock for the whole transaction; on any error the
        transaction is aborted (and a store we created is deleted) and the
        error is raised.
        """
        p = str(path)
        with _locked(_instance_lock(api.name), self._lock_timeout, f"HAProxy {api.name}"):
            self._clear_stale_transaction(api)
            info = api.show_cert(p)
            created = False
            if info is None:
                if self.crt_list is None:
                    raise HAProxyError(
                        api.name,
                        f"show ssl cert {p}",
                        f"HAProxy does not load {p} and [haproxy] crt_list is not set, so "
                        f"certificate {target.name!r} cannot be added at runtime",
                    )
                api.new_cert(p)
                created = True
            try:
                owner = api.set_cert(p, target.bundle)
                if owner != p:
                    # 2.6 merged our payload into another open transaction:
                    # that transaction now holds our bundle and must not be committed.
                    api.abort_cert(owner)
                    raise HAProxyError(
                        api.name,
                        f"set ssl cert {p}",
                        f"HAProxy put the payload into the open transaction of {owner}; aborted it",
                    )
                pending = api.show_cert(p, pending=True)
                if pending is None or pending.serial != target.serial:
                    got = (
                        "none"
                        if pending is None or pending.serial is None
                        else (f"{pending.serial:X}")
                    )
                    raise HAProxyError(
                        api.name,
                        f"show ssl cert *{p}",
                        f"pending transaction holds serial {got}, expected {target.serial:X}",
                    )
                api.commit_cert(p)
            except BaseException:
                with contextlib.suppress(HAProxyError):
                    api.abort_cert(p)
                if created:
                    with contextlib.suppress(HAProxyError):
                        api.del_cert(p)
                raise
            if self.crt_list is not None and (
                created or (info is not None and info.status != "Used")
            ):
                try:
                    if self.crt_list.is_dir():
                        # A `crt /dir/` bind: its crt-list is named without the slash
                        # and takes no options.
                        api.add_crt_list(str(self.crt_list), p)
                    else:
                        api.add_crt_list(
                            str(self.crt_list), p, target.crt_list_options, target.sni_filters
                        )
                except BaseException:
                    if created:
                        with contextlib.suppress(HAProxyError):
                            api.del_cert(p)
                    raise
                return "added"
            return "updated"

    def _remove(self, api: RuntimeAPI, path: Path) -> None:
        """Undo an "added": drop the crt-list entry, then the certificate."""
        p = str(path)
        with _locked(_instance_lock(api.name), self._lock_timeout, f"HAProxy {api.name}"):
            if self.crt_list is not None:
                with contextlib.suppress(HAProxyError):
                    api.del_crt_list(str(self.crt_list), p)
            api.del_cert(p)

    # -- verification ----------------------------------------------------------

    def _verify(
        self,
        path: Path,
        target: DeployTarget,
        leaf_der: bytes,
        result: DeployResult,
        apis: Sequence[RuntimeAPI],
    ) -> None:
        for api in apis:
            try:
                info = api.show_cert(str(path))
            except HAProxyError as exc:
                result.errors.append(str(exc))
                continue
            served = info.serial if info else None
            if served != target.serial:
                result.errors.append(
                    f"HAProxy {api.name}: `show ssl cert {path}` reports serial "
                    f"{'none' if served is None else f'{served:X}'}, expected {target.serial:X}"
                )
        for address in self.verify:
            for name in _verify_names(target):
                sni = _sni_for(name) if name else None
                try:
                    der = tls_leaf(address, sni, self.timeout)
                except ConnectionRefusedError as exc:
                    # Nothing listens (that HAProxy is down): proves nothing either
                    # way; the instance catches up from disk or via poll().
                    result.handshakes.append(HandshakeResult(address, sni, None, False, str(exc)))
                    result.warnings.append(f"TLS check of {address} (SNI {sni}) skipped: {exc}")
                    continue
                except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                    result.handshakes.append(HandshakeResult(address, sni, None, False, str(exc)))
                    result.errors.append(f"TLS handshake to {address} (SNI {sni}) failed: {exc}")
                    continue
                served = x509.load_der_x509_certificate(der).serial_number
                ok = der == leaf_der
                result.handshakes.append(HandshakeResult(address, sni, served, ok))
                if not ok:
                    result.errors.append(
                        f"TLS handshake to {address} with SNI {sni} returned serial {served:X}, "
                        f"expected {target.serial:X}"
                    )
        if self.verify and not any(h.ok for h in result.handshakes) and not result.errors:
            result.errors.append(
                f"no TLS frontend answered ({', '.join(self.verify)}): the swap is not proven"
            )

    # -- public API --------------------------------------------------------------

    def deploy(self, target: DeployTarget) -> DeployResult:
        """Persist, swap and verify one certificate; roll everything back on failure.

        Never raises for HAProxy or verification problems: they are in the
        result (`ok` False, `errors`). Raises BundleError for a bundle that
        must not be deployed (nothing is written then) and OSError if the file
        cannot be written. Afterwards `status()` holds, per instance, what it
        serves (read back with `show ssl cert`) against `target.serial`: after
        a rollback that is the old serial and in_sync False.
        """
        path, leaf_der = self._check_target(target)
        result = DeployResult(target.name, path, target.serial)
        with _locked(_file_lock(path), self._lock_timeout, f"certificate {target.name!r}"):
            self._deploy(target, path, leaf_der, result, self.apis)
        order = {name: i for i, name in enumerate(self.instances())}
        result.instances.sort(key=lambda r: order.get(r.instance, len(order)))
        return result

    def deploy_many(self, targets: Iterable[DeployTarget], workers: int = 4) -> list[DeployResult]:
        """`deploy` each target, `workers` at a time; results in the order given.

        Transactions still run one at a time per instance (its lock); what
        overlaps is file writing and TLS verification. A BundleError or
        OSError for one target is raised after all others are done.
        """
        items = list(targets)
        if workers <= 1 or len(items) <= 1:
            return [self.deploy(t) for t in items]
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="deploy") as pool:
            futures = [pool.submit(self.deploy, t) for t in items]
            wait(futures)
        return [f.result() for f in futures]

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

    def _deploy(
        self,
        target: DeployTarget,
        path: Path,
        leaf_der: bytes,
        result: DeployResult,
        apis: Sequence[RuntimeAPI],
    ) -> DeployResult:
        """The deploy of `target` to `apis` (all of them, or the stale ones of a
        reconcile). The caller holds the file lock of `path`."""
        self._ensure_cert_dir()
        old = path.read_bytes() if path.exists() else None
        if old != target.bundle:
            atomic_write(path, target.bundle, BUNDLE_MODE)
            result.file_changed = True
        try:
            added_line = self._add_to_crt_list_file(path, target)
        except (CrtListError, TimeoutError) as exc:
            result.errors.append(str(exc))
            added_line = None
            self._restore_file(path, old, result)
            self._observe_all(target, path, apis, result, refused=str(exc))
            return result
        touched: list[tuple[RuntimeAPI, str]] = []
        unreachable: set[str] = set()
        for api in apis:
            try:
                action = self._push(api, path, target)
            except InstanceUnreachable as exc:
                # Not a reason to hold the renewal back from the others: the
                # file is on disk for its restart and poll() pushes it when
                # it answers again.
                result.instances.append(InstanceResult(api.name, "unreachable", error=str(exc)))
                result.warnings.append(str(exc))
                unreachable.add(api.name)
                self._mark_down(api.name)
                self._remember(
                    SyncStatus(target.name, api.name, None, target.serial, False, error=str(exc))
                )
                continue
            except (HAProxyError, TimeoutError) as exc:
                result.instances.append(InstanceResult(api.name, "failed", error=str(exc)))
                result.errors.append(str(exc))
                break
            touched.append((api, action))
        if apis and not touched and not result.errors:
            result.errors.append(
                "no HAProxy runtime API instance reachable; the file is written and is "
                "pushed when an instance answers again"
            )
            return result
        if not result.errors and apis:
            # Reload mode proves nothing until `finish` has reloaded.
            self._verify(path, target, leaf_der, result, [api for api, _ in touched])
        if result.errors and apis:
            self._roll_back(path, target, old, added_line, touched, result, apis)
            reached = [api for api in apis if api.name not in unreachable]
            self._observe_all(
                target, path, reached, result, refused="deploy rolled back: " + result.errors[0]
            )
            return result
        for api, action in touched:
            result.instances.append(InstanceResult(api.name, action, target.serial))
            # _verify read this serial back with `show ssl cert` and the
            # handshakes returned this leaf: a fact, not an assumption.
            self._remember(SyncStatus(target.name, api.name, target.serial, target.serial, True))
        if not self.apis:
            self._remember(
                SyncStatus(target.name, DISK_INSTANCE, target.serial, target.serial, True)
            )
            if result.file_changed or added_line is not None:
                with self._state:
                    self._changed = True
        result.ok = True
        return result

    def _observe_all(
        self,
        target: DeployTarget,
        path: Path,
        apis: Sequence[RuntimeAPI],
        result: DeployResult,
        refused: str,
    ) -> None:
        """Record what each instance serves now, after a failed deploy: in sync only
        if it serves the stored serial and the deploy did not refuse it."""
        for api in apis:
            try:
                info = api.show_cert(str(path))
            except HAProxyError as exc:
                self._remember(
                    SyncStatus(target.name, api.name, None, target.serial, False, error=str(exc))
                )
                continue
            served = info.serial if info else None
            # An instance this deploy changed (rolled back, failed) was refused
            # the stored certificate, whatever it serves now.
            changed = any(
                r.instance == api.name and r.action != "not touched" for r in result.instances
            )
            in_sync = served == target.serial and not changed
            self._remember(
                SyncStatus(
                    target.name,
                    api.name,
                    served,
                    target.serial,
                    in_sync,
                    error=None if in_sync else refused,
                )
            )

    def _restore_file(self, path: Path, old: bytes | None, result: DeployResult) -> None:
        """Put the bundle file back as it was (None: it did not exist)."""
        if old is None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        elif result.file_changed:
            atomic_write(path, old, BUNDLE_MODE)
        result.file_changed = False

    def _roll_back(
        self,
        path: Path,
        target: DeployTarget,
        old: bytes | None,
        added_line: str | None,
        touched: list[tuple[RuntimeAPI, str]],
        result: DeployResult,
        apis: Sequence[RuntimeAPI],
    ) -> None:
        """Put back what was served and on disk before the deploy started; of the
        crt-list file, remove only the line this deploy added."""
        old_target: DeployTarget | None = None
        if old is not None:
            try:
                old_target = DeployTarget.from_bundle(target.name, old)
            except BundleError as exc:
                result.errors.append(f"cannot roll back to the previous file: {exc}")
        touched_names = {api.name for api, _ in touched}
        for api in apis:
            if api.name not in touched_names:
                if not any(r.instance == api.name for r in result.instances):
                    result.instances.append(InstanceResult(api.name, "not touched"))
                continue
            action = dict((a.name, act) for a, act in touched)[api.name]
            try:
                if action == "added":
                    self._remove(api, path)
                    served = None
                elif old_target is not None:
                    self._push(api, path, old_target)
                    served = old_target.serial
                else:
                    raise HAProxyError(api.name, "rollback", "no previous bundle to put back")
                result.instances.append(InstanceResult(api.name, "rolled back", served))
            except (HAProxyError, TimeoutError) as exc:
                result.instances.append(InstanceResult(api.name, "failed", error=str(exc)))
                result.errors.append(f"rollback failed: {exc}")
        # Files last: if HAProxy restarts now it serves what it served before.
        # The line goes before its bundle: a line never names a deleted file.
        editor = self._crt_list_editor()
        keep_file = False
        if added_line is not None and editor is not None:
            try:
                editor.remove_line(added_line)
            except (CrtListError, TimeoutError) as exc:
                result.errors.append(f"rollback of the crt-list file failed: {exc}")
                keep_file = old is None  # the line still names the bundle: keep it
        if not keep_file:
            self._restore_file(path, old, result)
        result.rolled_back = True
        result.file_changed = False

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

        Each instance's served serials are read first (`show ssl cert`); an
        instance that does not answer is given up on after that one failure
        (error statuses for all its certificates, marked down for `poll`). A
        target whose file on disk differs from the stored bundle, or that an
        instance serves stale, is deployed through the same path as `deploy`
        (push, `show ssl cert` + TLS handshakes, roll back on mismatch) to the
        stale instances: a certificate the TLS check refuses is rolled back,
        never left served. Returns one SyncStatus per (target, instance), also
        kept for `status()`. Never raises for HAProxy problems.
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
            for target, path, _ in checked:
                with _locked(_file_lock(path), self._lock_timeout, f"certificate {target.name!r}"):
                    self._ensure_cert_dir()
                    disk = path.read_bytes() if path.exists() else None
                    if disk != target.bundle:
                        atomic_write(path, target.bundle, BUNDLE_MODE)
                        with self._state:
                            self._changed = True
                self._remember(
                    SyncStatus(
                        target.name,
                        DISK_INSTANCE,
                        target.serial,
                        target.serial,
                        True,
                        pushed=disk != target.bundle,
                    )
                )
            return self._statuses_of([DISK_INSTANCE], targets)
        wanted = [api for api in self.apis if instances is None or api.name in set(instances)]
        # 1. What every wanted instance serves (one failure gives up on it).
        served: dict[tuple[str, str], int | None] = {}
        for api in wanted:
            down: str | None = None
            for target, path, _ in checked:
                if down is None:
                    try:
                        info = api.show_cert(str(path))
                    except HAProxyConnectionError as exc:
                        down = str(exc)
                        self._mark_down(api.name)
                    except HAProxyError as exc:
                        self._remember(
                            SyncStatus(
                                target.name, api.name, None, target.serial, False, error=str(exc)
                            )
                        )
                        continue
                    else:
                        served[(target.name, api.name)] = info.serial if info else None
                        continue
                self._remember(
                    SyncStatus(target.name, api.name, None, target.serial, False, error=down)
                )
        # 2. Deploy what is stale, with the full verification and rollback.
        for target, path, leaf_der in checked:
            stale = [
                api
                for api in wanted
                if (target.name, api.name) in served
                and served[(target.name, api.name)] != target.serial
            ]
            fresh = [
                api for api in wanted if served.get((target.name, api.name), -1) == target.serial
            ]
            crt_error: str | None = None
            with _locked(_file_lock(path), self._lock_timeout, f"certificate {target.name!r}"):
                if stale:
                    result = DeployResult(target.name, path, target.serial)
                    self._deploy(target, path, leaf_der, result, stale)
                    if result.ok:
                        for api in stale:
                            with self._state:
                                status = self._status.get((target.name, api.name))
                            if status is not None:
                                self._remember(replace(status, pushed=True))
                else:
                    # Nothing to push: the file (for a restart) and its crt-list
                    # line are still made to match what is stored, which also
                    # repairs a line lost earlier.
                    self._ensure_cert_dir()
                    disk = path.read_bytes() if path.exists() else None
                    if disk != target.bundle:
                        atomic_write(path, target.bundle, BUNDLE_MODE)
                    try:
                        self._add_to_crt_list_file(path, target)
                    except (CrtListError, TimeoutError) as exc:
                        crt_error = str(exc)
            for api in fresh:
                self._remember(
                    SyncStatus(
                        target.name,
                        api.name,
                        target.serial,
                        target.serial,
                        crt_error is None,
                        error=crt_error,
                    )
                )
        return self._statuses_of([api.name for api in wanted], targets)

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
        nothing recorded). Per instance, one `show ssl cert` listing, then one
        `show ssl cert <path>` per certificate it loads; the first connection
        failure or timeout gives up on that instance, so an unresponsive one
        costs one timeout, not one per certificate, and all its certificates
        get that error. Ordered by instance, then target.
        """
        targets = list(targets)
        out: list[SyncStatus] = []
        for api in self.apis:
            down: str | None = None
            try:
                loaded = set(api.list_certs().certificates)
            except HAProxyError as exc:
                down = f"instance unreachable: {exc}"
                loaded = set()
            for target in targets:
                if down is not None:
                    out.append(
                        SyncStatus(target.name, api.name, None, target.serial, False, error=down)
                    )
                    continue
                p = str(self.path_for(target.name))
                if p not in loaded:
                    out.append(SyncStatus(target.name, api.name, None, target.serial, False))
                    continue
                try:
                    info = api.show_cert(p)
                except HAProxyConnectionError as exc:
                    down = f"instance unreachable: {exc}"
                    out.append(
                        SyncStatus(target.name, api.name, None, target.serial, False, error=down)
                    )
                    continue
                except HAProxyError as exc:
                    out.append(
                        SyncStatus(
                            target.name, api.name, None, target.serial, False, error=str(exc)
                        )
                    )
                    continue
                served = info.serial if info else None
                out.append(
                    SyncStatus(
                        target.name, api.name, served, target.serial, served == target.serial
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
    """
    from agent.storage import FileStorage

    store = storage if storage is not None else FileStorage(config.state_dir)
    targets = []
    for cert in config.certificates:
        target = stored_target(cert, store)
        if target is not None:
            targets.append(target)
    return targets


def stored_target(cert: Any, storage: Any) -> DeployTarget | None:
    """The DeployTarget of one certificate (`agent.config.CertificateConfig`)
    from its current stored generation; None when none is stored."""
    from agent.certstate import load_current
    from agent.keys import StableKeyError
    from agent.renewal import node_bundle

    gen = load_current(storage, cert.name)
    if gen is None:
        return None
    try:
        bundle = node_bundle(cert, gen.fullchain_pem)
    except (OSError, StableKeyError) as exc:
        raise BundleError(
            f"certificate {cert.name!r}: cannot read its key {cert.key}: {exc}"
        ) from exc
    try:
        return DeployTarget.from_bundle(cert.name, bundle)
    except BundleError as exc:
        raise BundleError(f"{exc} (key file {cert.key}, stored generation {gen.id})") from exc


class RenewalDeployHook:
    """`on_installed(name)` for `renew_certificates`: deploys the stored
    certificate `name` (bundle built on this node, see `stored_target`),
    returns the DeployResult (the renewer records its per-instance facts) and
    raises DeployError if it is not served everywhere. Call `finish()` once
    at the end of the run (runs the reload command in reload mode). `results`
    keeps every DeployResult of the run.
    """

    def __init__(self, config: Any, storage: Any | None = None) -> None:
        from agent.storage import FileStorage

        self.config = config
        self.storage = storage if storage is not None else FileStorage(config.state_dir)
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

    def finish(self) -> bool:
        """Run the reload command if needed (see Deployer.finish)."""
        return self.deployer.finish()
