"""Map mode: http-01 tokens put into an HAProxy map over the runtime API.

With `[challenges] answer = "map"`, HAProxy answers challenges by itself:

    http-request set-var(txn.acme.keyauth) path,field(4,/),map(<map>) if { path_beg ... }
    http-request return status 200 content-type text/plain lf-string "%[var(txn.acme.keyauth)]" ...

and `HAProxyMapRegistry` keeps that map filled. It decorates another
`ChallengeRegistry` (the one the SPOE agent serves, so SPOE keeps answering
during a switch-over):

- `add` records the token in the inner registry, then puts it into the map of
  EVERY configured runtime API instance (`set map`, or `add map` when absent),
  and returns only when all of them took it. An instance that cannot be
  updated is retried (backoff from 0.25 s to 2 s) until `timeout` seconds have
  passed; then the token is taken back out everywhere and `ChallengeMapError`
  names the instance and the map. The issuer calls `add` before it tells the
  CA to validate, so the order fails without the CA being asked.
- `remove` deletes the token from every instance (best effort: a failure is
  logged and retried by `poll`) and from the inner registry.
- An instance that restarted (new PID or start time in `show info`, the rule
  `Deployer.poll` uses for certificates) or came back after being unreachable
  has an empty map again: `add` checks that cheaply before each push, and
  `poll` (called from the daemon's reconciler) re-adds every pending token
  through `resync`.

In a fleet ([fleet] with answer = "map"), every node's HAProxy needs the
token, because the CA may validate against any of them: `peers`
(agent.fleet_map.PeerAcks) makes `add` also wait until every live map-mode
node said its HAProxy took the token, and each node's daemon runs an
agent.fleet_map.MapFollower that `mirror`s the tokens other nodes add into
its own instances.

Which map: `[challenges] map` when set. Otherwise per instance, from the maps
it declares (`show map`): "virt@acme" (HAProxy 3.0+; 2.6 and 2.8 have no
virtual maps) or else the empty file `<cert_dir>/acme-challenge.map`, which
the agent creates and never writes to (HAProxy loads it empty at every start;
only the runtime API changes it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from agent.challenges import ChallengeRegistry
from agent.config import DEFAULT_MAP_FILE, Config, ConfigError
from agent.haproxy_api import (
    HAProxyError,
    ProcessInfo,
    RuntimeAPI,
    check_key_authorization,
    check_map_name,
    check_map_token,
)
from agent.issuer import AcmeError

log = logging.getLogger("agent.challenge_map")

VIRTUAL_MAP = "virt@acme"
_NEVER = ProcessInfo(pid=-1, start_time=-1, version="")  # identity not learned yet


class ChallengeMapError(AcmeError):
    """A token could not be put into HAProxy's map on every instance.

    An AcmeError, so the issuer passes it through unchanged and the renewal
    records a failed order (before the CA was asked to validate).
    """

    def __init__(self, message: str, instance: str, map_name: str | None) -> None:
        self.instance = instance
        self.map_name = map_name
        super().__init__(message)


class MapNotDeclared(Exception):
    """The instance declares no map the agent may use."""


class Peers(Protocol):
    """The other nodes of a fleet (agent.fleet_map.PeerAcks)."""

    def acknowledge(self, token: str, expires_at: float) -> None:
        """Say this node's HAProxy instances all hold `token`."""

    def wait(self, token: str, timeout: float) -> None:
        """Return once every other live map-mode node acknowledged `token`;
        raise ChallengeMapError naming the nodes that did not within `timeout` s."""


@dataclass
class _Instance:
    api: RuntimeAPI
    info: ProcessInfo | None = _NEVER  # None: unreachable at the last look
    map_name: str | None = None  # resolved for `info`
    lock: threading.Lock = field(default_factory=threading.Lock)


def haproxy_version(version: str) -> tuple[int, int] | None:
    """(major, minor) from `show info`'s Version ("2.6.12-1+deb12u4"); None if unreadable."""
    parts = version.split(".")
    try:
        return int(parts[0]), int(parts[1].split("-")[0])
    except (IndexError, ValueError):
        return None


class HAProxyMapRegistry(ChallengeRegistry):
    """A ChallengeRegistry that also fills an HAProxy map on every instance; see the module.

    `map_name`: the map as HAProxy names it; None picks per instance
    ("virt@acme" if declared, else `default_file`). `timeout`: seconds `add`
    keeps retrying instances that fail (no new attempt starts after it; one in
    flight is bounded by the RuntimeAPI's own timeout). Thread-safe.
    """

    def __init__(
        self,
        inner: ChallengeRegistry,
        instances: Sequence[RuntimeAPI],
        map_name: str | None = None,
        *,
        default_file: str | None = None,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        peers: Peers | None = None,
    ) -> None:
        if not instances:
            raise ValueError("map mode needs at least one runtime API instance")
        if map_name is not None:
            check_map_name(map_name)
        if default_file is not None:
            check_map_name(default_file)
        self.inner = inner
        self.map_name = map_name
        self.default_file = default_file
        self.timeout = timeout
        self._clock = clock
        self._sleep = sleep
        self.peers = peers
        self._instances = [_Instance(api) for api in instances]
        self._pending: dict[str, tuple[str, float]] = {}  # token -> (keyauth, expires_at)
        self._stale: dict[str, set[str]] = {}  # token -> instances its `del map` failed on
        self._lock = threading.Lock()

    # -- the ChallengeRegistry contract ------------------------------------------

    def add(self, token: str, key_authorization: str, expires_at: float) -> None:
        """Record the token, then put it on every instance; raise ChallengeMapError
        (after taking it back out everywhere) if one instance did not take it."""
        check_map_token(token)
        check_key_authorization(token, key_authorization)
        self.inner.add(token, key_authorization, expires_at)
        with self._lock:
            self._pending[token] = (key_authorization, expires_at)
            self._stale.pop(token, None)
        start = time.monotonic()
        waited = 0.0  # the sleeps alone: bounds the loop even with an injected sleep
        todo = list(self._instances)
        errors: dict[str, str] = {}
        delay = 0.25
        while True:
            failed = []
            for inst in todo:
                try:
                    self._push(inst, token, key_authorization)
                except (HAProxyError, MapNotDeclared) as e:
                    errors[inst.api.name] = str(e)
                    failed.append(inst)
            todo = failed
            elapsed = max(time.monotonic() - start, waited)
            if not todo or elapsed + delay > self.timeout:
                break
            self._sleep(delay)
            waited += delay
            delay = min(delay * 2, 2.0)
        if todo:
            self.remove(token)
            first = todo[0]
            names = ", ".join(i.api.name for i in todo)
            raise ChallengeMapError(
                f"challenge map {self._map_label(first)} on HAProxy {names} could not take the "
                f"token within {self.timeout:g} s ([challenges] map_timeout), so the CA was not "
                f"asked to validate: {errors[first.api.name]}",
                first.api.name,
                first.map_name or self.map_name,
            )
        if self.peers is not None:
            left = max(0.0, self.timeout - max(time.monotonic() - start, waited))
            try:
                self.peers.acknowledge(token, expires_at)
                self.peers.wait(token, left)
            except ChallengeMapError:
                self.remove(token)
                raise

    def remove(self, token: str) -> None:
        with self._lock:
            self._pending.pop(token, None)
        for inst in self._instances:
            self._delete(inst, token)
        self.inner.remove(token)

    def lookup(self, token: str) -> str | None:
        return self.inner.lookup(token)

    # -- tokens of other fleet nodes ------------------------------------------------

    def mirror(self, token: str, key_authorization: str, expires_at: float) -> list[str]:
        """Put a token ANOTHER node added (the fleet registry already holds it) on
        every instance of this node, without touching the inner registry. One
        attempt per instance; returns the instances that did not take it (`poll`
        re-adds it to them when they come back)."""
        check_map_token(token)
        check_key_authorization(token, key_authorization)
        with self._lock:
            self._pending[token] = (key_authorization, expires_at)
            self._stale.pop(token, None)
        failed: list[str] = []
        for inst in self._instances:
            try:
                self._push(inst, token, key_authorization)
            except (HAProxyError, MapNotDeclared) as e:
                log.warning("challenge map on HAProxy %s: %s", inst.api.name, e)
                failed.append(inst.api.name)
        return failed

    def unmirror(self, token: str) -> None:
        """Take a token another node removed off this node's instances (best effort)."""
        with self._lock:
            known = self._pending.pop(token, None) is not None
        if known:
            for inst in self._instances:
                self._delete(inst, token)

    def __len__(self) -> int:
        return len(self.inner)

    # -- restarts ---------------------------------------------------------------------

    def pending(self) -> dict[str, str]:
        """Unexpired pending tokens {token: key authorization}."""
        now = self._clock()
        with self._lock:
            for token in [t for t, (_, exp) in self._pending.items() if exp <= now]:
                del self._pending[token]
            return {t: ka for t, (ka, _) in self._pending.items()}

    def resync(self, instance: str) -> int:
        """Put every pending token on `instance` (a runtime API name) again; returns
        how many. Raises HAProxyError / MapNotDeclared if the instance refuses."""
        inst = next((i for i in self._instances if i.api.name == instance), None)
        if inst is None:
            raise KeyError(f"no runtime API instance {instance!r}")
        with inst.lock:
            return self._resync_locked(inst)

    def poll(self) -> list[str]:
        """Re-add pending tokens to instances that restarted or came back, and retry
        failed deletions. Returns the instances resynced. Never raises for HAProxy
        problems (they are logged); cheap when nothing is pending (no I/O)."""
        pending = self.pending()
        with self._lock:
            stale = {t: set(names) for t, names in self._stale.items()}
        resynced: list[str] = []
        if not pending and not stale:
            return resynced
        for inst in self._instances:
            try:
                with inst.lock:
                    changed = bool(pending) and self._check(inst)
                if changed:
                    resynced.append(inst.api.name)
            except (HAProxyError, MapNotDeclared) as e:
                log.warning("challenge map on HAProxy %s: %s", inst.api.name, e)
        for token, names in stale.items():
            for inst in self._instances:
                if inst.api.name in names:
                    self._delete(inst, token)
        return resynced

    # -- start-up ---------------------------------------------------------------------

    def check_ready(self) -> list[tuple[str, str, str]]:
        """(instance, config key, problem) for every reachable instance that cannot serve
        the map: a socket below level admin ("haproxy.runtime_api"), or no usable map
        declared ("challenges.map"). Unreachable instances are logged, not listed
        (HAProxy may start after the agent)."""
        problems: list[tuple[str, str, str]] = []
        for inst in self._instances:
            try:
                level = inst.api.cli_level()
                if level != "admin":
                    problems.append(
                        (
                            inst.api.name,
                            "haproxy.runtime_api",
                            f"the socket is at level {level!r}, map mode needs level admin",
                        )
                    )
                    continue
                with inst.lock:
                    self._check(inst)
            except MapNotDeclared as e:
                problems.append((inst.api.name, "challenges.map", str(e)))
            except HAProxyError as e:
                log.warning("challenge map: cannot check HAProxy %s now: %s", inst.api.name, e)
        return problems

    # -- internals --------------------------------------------------------------------

    def _map_label(self, inst: _Instance) -> str:
        name = inst.map_name or self.map_name
        if name is not None:
            return name
        return f"{VIRTUAL_MAP} or {self.default_file}" if self.default_file else VIRTUAL_MAP

    def _resolve(self, inst: _Instance, info: ProcessInfo) -> str:
        declared = inst.api.list_maps()
        candidates = [self.map_name] if self.map_name else [VIRTUAL_MAP, self.default_file]
        for name in candidates:
            if name is not None and name in declared:
                return name
        version = haproxy_version(info.version)
        hint = ""
        if self.map_name and self.map_name.startswith("virt@") and version and version < (3, 0):
            hint = f" (HAProxy {info.version} has no virt@ maps, they came in 3.0: use a file)"
        wanted = " or ".join(c for c in candidates if c)
        return self._raise_missing(inst, wanted, declared, hint)

    @staticmethod
    def _raise_missing(inst: _Instance, wanted: str, declared: list[str], hint: str) -> str:
        raise MapNotDeclared(
            f"HAProxy {inst.api.name} declares no map {wanted}{hint}; it declares "
            f"{', '.join(declared) or 'none'}: add the lines `haproxy-acme-agent haproxy-config` "
            "prints to haproxy.cfg"
        )

    def _check(self, inst: _Instance) -> bool:
        """Caller holds inst.lock. Learn the instance's identity; if it changed (restart,
        back from unreachable, first look) resolve its map and re-add every pending
        token. Returns True if it resynced."""
        try:
            info = inst.api.show_info()
        except HAProxyError:
            inst.info = None
            raise
        if info == inst.info and inst.map_name is not None:
            return False
        inst.map_name = self._resolve(inst, info)
        before = inst.info
        self._resync_locked(inst)
        inst.info = info  # only once the tokens are back: a failure retries next time
        if before is not _NEVER:
            log.info(
                "challenge map %s on HAProxy %s: instance restarted or came back; "
                "pending tokens re-added",
                inst.map_name, inst.api.name,
            )  # fmt: skip
        return True

    def _resync_locked(self, inst: _Instance) -> int:
        if inst.map_name is None:
            info = inst.api.show_info()
            inst.map_name = self._resolve(inst, info)
        pending = self.pending()
        for token, key_authorization in pending.items():
            inst.api.put_map(inst.map_name, token, key_authorization)
        return len(pending)

    def _push(self, inst: _Instance, token: str, key_authorization: str) -> None:
        with inst.lock:
            self._check(inst)  # a restarted instance gets the other pending tokens back too
            assert inst.map_name is not None
            inst.api.put_map(inst.map_name, token, key_authorization)

    def _delete(self, inst: _Instance, token: str) -> None:
        """Best effort `del map`; a failure is logged and remembered for `poll`."""
        name = inst.map_name
        if name is None:  # never reached: nothing of ours can be in its map
            return
        try:
            inst.api.del_map(name, token)
        except HAProxyError as e:
            log.warning(
                "challenge map %s on HAProxy %s: %s (retried later)", name, inst.api.name, e
            )
            with self._lock:
                self._stale.setdefault(token, set()).add(inst.api.name)
            return
        with self._lock:
            names = self._stale.get(token)
            if names is not None:
                names.discard(inst.api.name)
                if not names:
                    del self._stale[token]


# -- wiring (daemon and `renew`) ----------------------------------------------------------


def default_map_file(config: Config) -> Path:
    """The empty map file HAProxy before 3.0 declares: <cert_dir>/acme-challenge.map."""
    return config.haproxy.cert_dir / DEFAULT_MAP_FILE


def map_file(config: Config) -> Path | None:
    """The map FILE this config may use (None when the map is virtual)."""
    name = config.challenges.map
    if name is None:
        return default_map_file(config)
    return None if name.startswith("virt@") else Path(name)


def from_config(
    config: Config, inner: ChallengeRegistry, peers: Peers | None = None
) -> HAProxyMapRegistry | None:
    """The map registry wrapping `inner` when `[challenges] answer = "map"`, else None.
    `peers`: the fleet's other nodes (agent.wiring.make_map_registry passes them).
    Does no I/O."""
    if config.challenges.answer != "map":
        return None
    apis = [
        RuntimeAPI(address, config.haproxy.timeout, config.haproxy.bufsize)
        for address in config.haproxy.runtime_api
    ]
    return HAProxyMapRegistry(
        inner,
        apis,
        config.challenges.map,
        default_file=str(default_map_file(config)),
        timeout=config.challenges.map_timeout,
        peers=peers,
    )


def ensure_map_file(config: Config) -> Path | None:
    """Create the empty map file if map mode may use one and it is missing (mode 0640,
    never truncated: HAProxy reads it at start, the agent never writes entries to it).
    Returns the path when it was created."""
    from agent.storage import atomic_write

    path = map_file(config)
    if config.challenges.answer != "map" or path is None or path.exists():
        return None
    if not path.parent.is_dir():
        return None  # cert_dir is created by the first deploy; haproxy-config --bootstrap too
    atomic_write(path, b"", 0o640)
    return path


def startup_check(config: Config) -> None:
    """At `run`, `renew` and reload: in map mode, every reachable instance must be at
    level admin and declare the map. Raises ConfigError naming the key to fix."""
    registry = from_config(config, _NullRegistry())
    if registry is None:
        return
    ensure_map_file(config)
    for instance, key, problem in registry.check_ready():
        raise ConfigError(config.path, key, f'{instance}: {problem} ([challenges] answer = "map")')


class _NullRegistry(ChallengeRegistry):
    """Inner registry for start-up checks (never used for a token)."""

    def add(self, token: str, key_authorization: str, expires_at: float) -> None:
        raise AssertionError("start-up check registry")

    def remove(self, token: str) -> None:
        pass

    def lookup(self, token: str) -> str | None:
        return None

    def __len__(self) -> int:
        return 0
