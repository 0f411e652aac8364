"""Fleet fan-out and catch-up on one node: the daemon's side of [fleet].

Message (agent.fleet.publish_changed), on the pub/sub channel NS:certificates:

    {"name": certificate, "serial": lowercase hex, "fence": int | null, "node": publisher}

The node that stored a certificate publishes it right after the store (the
daemon's deploy hook, before its own deploy). A message is only a hint:

- `FleetSync` subscribes (agent.fleet.ChangeListener, its own thread). A
  message adds its certificate to the pending set and wakes `run()`, a
  coroutine on the daemon's loop, which waits until no message came for
  DEBOUNCE s (at most DEBOUNCE_MAX s after the first one of a burst) and then
  runs ONE pass for every pending certificate on a worker thread: 200
  certificates renewed at once make one `Deployer.reconcile`, i.e. per
  instance one session reading the served serials and one `deploy_batch` of
  the stale ones, never 200 deploys. Nothing of it runs on the loop.
- Catch-up: every (re)subscription (the first one, and each time the pub/sub
  connection comes back after Redis or the link was away) triggers a FULL
  pass: every configured certificate's stored serial against what this
  node's HAProxy instances serve (read over the runtime API), pushing what
  differs. Between messages, every CHECK_INTERVAL s a cheap pass compares the
  stored serials (every `current` pointer, in one pipelined read) with what
  the deployer last saw served, and reconciles only what differs; so a lost
  message costs at most CHECK_INTERVAL s even while the subscription looked
  healthy.
- Round trips: a pass reads only what it covers (the pending names of a
  message pass; every certificate in a full or check pass) and makes a fixed
  number of Redis round trips however many certificates it covers (about
  ten for a burst of new certificates, two to four when nothing changed):
  one for the pointers, one for the generations not cached, a few for the
  deploy facts, whose certificate locks are taken and released together
  (`agent.renewal.record_sync_batch`). A certificate whose lock is busy (the
  ordering node still holds it while it deploys) is not waited for: its facts
  are written at a later pass.
- Key check: the bundle is built on this node from its own key file
  (`agent.deploy.stored_target`). A key that does not belong to the stored
  leaf (`agent.deploy.KeyMismatch`) is refused: nothing of that certificate
  is deployed, HAProxy keeps serving what it has, an error names the
  certificate, the node and the key file (once per stored serial), and
  `key_mismatch` (the metric haproxy_acme_fleet_key_mismatch) says 1 for it.
  The other certificates, and the other nodes, go on.
- `view`: what the metrics and `status` read without touching Redis
  (refreshed by every pass: list of nodes from the heartbeats, stored serials,
  whether Redis answered).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agent import deploy as deploy_mod
from agent import layout
from agent.certstate import read_currents
from agent.deploy import DeployTarget, KeyMismatch, SyncStatus, stored_targets_of

if TYPE_CHECKING:
    from agent.config import Config
    from agent.daemon import Daemon

log = logging.getLogger(__name__)

DEBOUNCE = 0.05  # s without a new message before the pending batch runs
DEBOUNCE_MAX = 0.3  # s at most from the first message of a burst to its pass
CHECK_INTERVAL = 5.0  # s between the cheap serial comparisons


@dataclass(frozen=True)
class FleetView:
    """The fleet as this node last read it from Redis. `nodes`: agent.fleet.list_nodes
    (each with "node", "alive", "serials" {certificate: served serial or None});
    `stored`: certificate -> stored serial (hex) or None; `key_mismatch`: this
    node's certificates -> True when its key file does not match the stored
    leaf; `redis_up`: the last read of Redis worked; `at`: UNIX s of that read."""

    node: str
    redis_up: bool = False
    nodes: tuple[dict[str, Any], ...] = ()
    stored: dict[str, str | None] = field(default_factory=dict)
    key_mismatch: dict[str, bool] = field(default_factory=dict)
    at: float | None = None

    def in_sync(self) -> dict[tuple[str, str], bool]:
        """(certificate, node) -> that alive node's HAProxy serves the stored serial."""
        out: dict[tuple[str, str], bool] = {}
        for n in self.nodes:
            if not n.get("alive"):
                continue
            serials = n.get("serials") or {}
            for cert, stored in self.stored.items():
                if stored is None:
                    continue
                out[(cert, str(n["node"]))] = serials.get(cert) == stored
        return out


def node_targets(
    config: Config,
    storage: Any,
    names: Iterable[str] | None = None,
    pointers: Mapping[str, str | None] | None = None,
) -> tuple[list[DeployTarget], dict[str, KeyMismatch]]:
    """The DeployTargets of the configured certificates (only `names`, if given)
    that have a stored generation, each built with this node's key, and the
    ones refused because the key does not match. Another bundle error of one
    certificate is logged and skips only it. Two storage rounds at most,
    however many certificates (`agent.deploy.stored_targets_of`; one when
    `pointers`, name -> `current` generation id, are given and nothing
    changed); a storage error (Redis away) is raised."""
    wanted = None if names is None else set(names)
    certs = [c for c in config.certificates if wanted is None or c.name in wanted]
    got = stored_targets_of(certs, storage, pointers)
    targets: list[DeployTarget] = []
    refused: dict[str, KeyMismatch] = {}
    for cert in certs:
        target = got[cert.name]
        if isinstance(target, KeyMismatch):
            refused[cert.name] = target
        elif isinstance(target, deploy_mod.BundleError):
            log.error("certificate %s: not deployable: %s", cert.name, target)
        elif target is not None:
            targets.append(target)
    return targets, refused


def stored_serial(gen_id: str | None) -> str | None:
    """The leaf serial (lowercase hex) a generation id names (agent.layout), None for none."""
    return gen_id.rsplit("-", 1)[1] if gen_id else None


def _serial_int(gen_id: str | None) -> int | None:
    serial = stored_serial(gen_id)
    return None if serial is None else int(serial, 16)


def served_serials(statuses: Iterable[SyncStatus]) -> dict[str, str | None]:
    """certificate -> the serial (hex) every instance serves, None when they
    differ or one is unknown (what this node's heartbeat carries)."""
    per: dict[str, set[int | None]] = {}
    for s in statuses:
        per.setdefault(s.name, set()).add(s.served_serial)
    out: dict[str, str | None] = {}
    for name, serials in per.items():
        only = next(iter(serials)) if len(serials) == 1 else None
        out[name] = None if only is None else format(only, "x")
    return out


class FleetSync:
    """Fan-out and catch-up of one daemon (see the module doc). Reads the daemon's
    current `config`, `storage` and `deployer` at every pass, so a SIGHUP that
    rebuilds them needs nothing here; a changed [fleet] section gets a new
    FleetSync (the daemon stops the old one)."""

    def __init__(self, daemon: Daemon, client: Any, namespace: str, node: str) -> None:
        from agent.fleet import ChangeListener

        self.daemon, self.client, self.namespace, self.node = daemon, client, namespace, node
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        self._lock = threading.Lock()
        self._pending: set[str] = set()
        self._full = True  # the first pass compares everything
        self._first_pending_at: float | None = None
        self._refused_logged: dict[str, int] = {}  # certificate -> serial logged as refused
        # certificate -> statuses whose deploy facts are not recorded yet (lock busy)
        self._unrecorded: dict[str, list[SyncStatus]] = {}
        self.view = FleetView(node)
        self.passes = 0  # passes run (tests, bench)
        self.batches = 0  # passes that deployed something
        self.listener = ChangeListener(client, namespace, self._on_change, self._on_connect)

    # -- listener thread --

    def _on_change(self, name: str, serial: str, fence: int | None, node: str) -> None:
        del serial, fence
        if node == self.node:
            return  # we stored it: our own deploy hook is pushing it right now
        with self._lock:
            self._pending.add(name)
            if self._first_pending_at is None:
                self._first_pending_at = time.monotonic()
        self._wake_soon()

    def _on_connect(self) -> None:
        with self._lock:
            self._full = True
        self._wake_soon()

    def _wake_soon(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop is closing
                loop.call_soon_threadsafe(self._wake.set)

    # -- the loop's side --

    async def run(self) -> None:
        """Until cancelled: wait for a message, a reconnect or CHECK_INTERVAL, debounce,
        then one pass on a worker thread."""
        self._loop = asyncio.get_running_loop()
        self.listener.start()
        try:
            last_check = time.monotonic()
            while True:
                # asyncio.timeout, not wait_for: on 3.11 a cancel that meets the
                # wake-up inside wait_for can be lost, and the daemon's stop hangs.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(CHECK_INTERVAL):
                        await self._wake.wait()
                self._wake.clear()
                await self._debounce()
                with self._lock:
                    names, self._pending = self._pending, set()
                    full, self._full = self._full, False
                    self._first_pending_at = None
                now = time.monotonic()
                check = now - last_check >= CHECK_INTERVAL
                if not (names or full or check):
                    continue
                if check or full:
                    last_check = now
                try:
                    await asyncio.to_thread(self.sync, names, full, check)
                except Exception:
                    log.exception("fleet: a sync pass failed")
        finally:
            await asyncio.to_thread(self.listener.stop)

    async def _debounce(self) -> None:
        """Wait while messages keep coming (DEBOUNCE s of quiet), at most DEBOUNCE_MAX."""
        # Bounded by time (DEBOUNCE_MAX), not by the number of wake-ups: every
        # message of a burst wakes us once.
        for _ in range(1_000_000):
            with self._lock:
                first = self._first_pending_at
            left = DEBOUNCE_MAX - (time.monotonic() - first) if first is not None else 0.0
            if left <= 0:
                return
            self._wake.clear()
            try:
                async with asyncio.timeout(min(DEBOUNCE, left)):
                    await self._wake.wait()
            except TimeoutError:
                return  # quiet (or the burst's time is up): run the batch

    # -- worker thread --

    def sync(self, names: set[str], full: bool, check: bool) -> list[SyncStatus]:
        """One pass (worker thread): `full` every certificate against HAProxy; else the
        `names` of messages, plus (with `check`) every certificate whose stored serial
        differs from what the deployer last saw served. Returns the statuses.

        Storage rounds per pass, however many certificates: one for the
        `current` pointers of the certificates it covers (every configured one
        with `full` or `check`, else only `names`), one for the generations of
        those whose target is not cached, one or two for the deploy facts
        (`record_sync`), plus the nodes' heartbeats for the view."""
        daemon = self.daemon
        if daemon._closing.is_set():
            return []
        self.passes += 1
        started = time.monotonic()
        config, storage, deployer = daemon.config, daemon.storage, daemon.deployer
        configured = [c.name for c in config.certificates]
        covered = configured if (full or check) else [n for n in configured if n in names]
        redis_up = True
        pointers: dict[str, str | None] = {}
        try:
            pointers = read_currents(storage, covered) if covered else {}
            if full:
                wanted = covered
            else:
                known = {(s.name, s.instance): s.served_serial for s in deployer.status()}
                instances = deployer.instances() or [deploy_mod.DISK_INSTANCE]
                wanted = [
                    n
                    for n in covered
                    if n in names
                    or any(known.get((n, i), -1) != _serial_int(pointers[n]) for i in instances)
                ]
            todo, refused = node_targets(config, storage, wanted, pointers) if wanted \
                else ([], {})  # fmt: skip
        except Exception as e:  # Redis away: keep serving what we have
            log.warning("fleet: cannot read the stored certificates: %s", e)
            todo, refused, redis_up, wanted = [], {}, False, []
        self._report_refused(refused, wanted, configured)
        statuses: list[SyncStatus] = []
        pushed: list[SyncStatus] = []
        if todo:
            statuses = deployer.reconcile(todo, deployer.instances())
            pushed = [s for s in statuses if s.pushed]
            if pushed:
                self.batches += 1
            for s in statuses:
                if s.pushed and s.in_sync:
                    log.info(
                        "fleet: certificate %s: deployed stored serial %X to %s on node %s",
                        s.name, s.stored_serial, s.instance, self.node,
                    )  # fmt: skip
                elif s.error:
                    log.warning("fleet: certificate %s on %s: %s", s.name, s.instance, s.error)
            heartbeat = getattr(daemon, "_heartbeat", None)
            if heartbeat is not None and pushed:
                heartbeat.beat_now()  # the others see the new serial now, not in 5 s
            try:
                deployer.finish()
            except deploy_mod.ReloadError as e:
                log.error("%s", e)
        if (statuses or self._unrecorded) and redis_up:
            self._record(statuses, configured)
        if pushed:
            log.info(
                "fleet: pass over %d certificates: %d deployed on node %s in %.3f s",
                len(todo), len({s.name for s in pushed}), self.node, time.monotonic() - started,
            )  # fmt: skip
        self._refresh_view(config, pointers if redis_up else None, redis_up)
        return statuses

    def _record(self, statuses: list[SyncStatus], configured: Iterable[str]) -> None:
        """Record what HAProxy serves (the deploy facts in state.json) without waiting
        for a busy certificate lock: those (a renewal holds it) are kept and
        retried at the next pass (at most CHECK_INTERVAL s later), not waited for
        one by one while the next burst of messages waits behind us."""
        from agent.renewal import record_sync_batch

        daemon = self.daemon
        todo = dict(self._unrecorded)
        todo.update({s.name: [] for s in statuses})
        for s in statuses:
            todo[s.name].append(s)
        wanted = set(configured)
        todo = {n: ss for n, ss in todo.items() if n in wanted}
        if not todo:
            self._unrecorded = {}
            return
        try:
            written, busy = record_sync_batch(
                daemon.storage,
                [s for ss in todo.values() for s in ss],
                daemon.clock(),
                layout.deploy_node(daemon.config),
            )
            daemon._fresh_metas.update(written)
            self._unrecorded = {n: todo[n] for n in busy}
        except Exception as e:  # the facts are advice; what HAProxy serves is what counts
            log.warning("fleet: cannot record what HAProxy serves: %s", e)
            self._unrecorded = todo

    def _report_refused(
        self, refused: dict[str, KeyMismatch], covered: Iterable[str], configured: list[str]
    ) -> None:
        """Log each refusal once per stored serial; `covered`: the certificates whose
        targets this pass built (a refusal of another one stands until a pass
        covers it again; one no longer configured is dropped)."""
        for name, e in refused.items():
            if self._refused_logged.get(name) != e.serial:
                self._refused_logged[name] = e.serial
                log.error(
                    "fleet: node %s refuses to deploy certificate %s: its key file does not "
                    "match the stored certificate's public key; HAProxy keeps serving what it "
                    "has. %s",
                    self.node, name, e,
                )  # fmt: skip
        gone = set(covered) - set(refused) | set(self._refused_logged) - set(configured)
        for name in [n for n in self._refused_logged if n in gone]:
            del self._refused_logged[name]

    def _refresh_view(
        self, config: Config, pointers: Mapping[str, str | None] | None, redis_up: bool
    ) -> None:
        """The view after a pass: the nodes' heartbeats (one round), the stored
        serials this pass read (`pointers`; the others as last read), refusals."""
        from agent.fleet import list_nodes

        nodes: tuple[dict[str, Any], ...] = self.view.nodes
        configured = [c.name for c in config.certificates]
        stored = {n: self.view.stored.get(n) for n in configured}
        if redis_up and pointers is not None:
            try:
                nodes = tuple(list_nodes(self.client, self.namespace))
                stored.update({n: stored_serial(g) for n, g in pointers.items()})
            except Exception as e:
                log.warning("fleet: cannot read the fleet's state from Redis: %s", e)
                redis_up = False
        redis_up = redis_up and self.listener.connected.is_set()
        mismatch = {n: n in self._refused_logged for n in configured}
        self.view = FleetView(
            self.node, redis_up, nodes, stored, mismatch, time.time() if redis_up else self.view.at
        )

    @staticmethod
    def served_by(deployer: Any) -> dict[str, str | None]:
        """Heartbeat payload: what this node's HAProxy serves per certificate."""
        return served_serials(deployer.status())

    def refused(self) -> list[str]:
        """Heartbeat payload: this node's certificates refused for a key mismatch."""
        return sorted(self._refused_logged)
