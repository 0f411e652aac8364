"""`haproxy-acme-agent run`: one asyncio process doing everything, unattended.

- the SPOA listener answering HAProxy's challenge lookups;
- the renewal scheduler: per certificate the next attempt comes from the one
  renewal rule (`agent.renewal.next_renewal_time`: ARI window, 1/3 of the
  lifetime, `renew_before`, emergency at 1/20); failures retry with capped
  exponential backoff and jitter; at most `acme.max_concurrent_orders` orders
  run at once, so a thousand due certificates never stampede the CA; a
  rate-limited CA is left alone until its hold ends (`agent.ratelimit`);
- ARI: every installed certificate's renewalInfo is fetched again when the
  CA's Retry-After says (at least every `daemon.check_interval`, at most
  `ARI_CONCURRENCY` at once), and the renewal is rescheduled from the new
  window: a window that moves earlier (a revocation: "renew now") wakes the
  scheduler for it;
- deploys to HAProxy after each renewal (`agent.deploy`), and a reconciler
  that every `daemon.reconcile_interval` checks that each instance serves the
  stored serial, pushing what is stale (an instance that restarted with older
  files, or came back after being down);
- Prometheus metrics and /healthz on `[metrics] listen`;
- a control socket so `renew` hands its work to the daemon.

Signals: SIGHUP reloads the config (validated first; a bad file is logged and
the running config stays); SIGTERM/SIGINT stop gracefully: no new order or
HAProxy transaction starts, the ones in flight get a few seconds to finish
(every HAProxy transaction ends in commit or abort), SPOE connections get a
DISCONNECT. Every file write is atomic, so stopping never leaves half a file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from agent import challenge_map, layout, ratelimit, rollover, wiring
from agent import deploy as deploy_mod
from agent.certstate import load_metas, undeployed
from agent.config import CertificateConfig, Config, ConfigError, load_config, save_key_checks
from agent.control import ControlServer
from agent.deploy import DeployResult, SyncStatus
from agent.fleet_sync import FleetSync, node_targets
from agent.metrics import CertificateView, KeyView, Metrics, MetricsServer
from agent.renewal import (
    ARI_ERROR_RETRY,
    EMERGENCY_FRACTION,
    CertMeta,
    Renewer,
    RenewResult,
    load_meta,
    next_renewal_time,
    prepare_state,
    record_sync,
)
from agent.spoa import SpoaServer, door_settings
from agent.storage import StoreUnavailable, ensure_private_dir

log = logging.getLogger("agent.daemon")

# SIGTERM/SIGINT seen before the event loop installed its own handlers (run_daemon).
STOP_REQUESTED = threading.Event()
SHUTDOWN_GRACE = 3.0  # seconds in-flight work gets after SIGTERM before we leave it
ARI_CONCURRENCY = 4  # renewalInfo GETs in flight at once (cheap, but be polite)
ARI_START_SPREAD = 60.0  # s: certificates without a window are first checked within this
# s a finished renewal's deploy waits for others to join its batch (renewals
# finishing while a batch runs join the next one anyway)
DEPLOY_WINDOW = 0.01


@dataclass
class CertState:
    """The scheduler's view of one certificate. Times: UNIX seconds."""

    next_at: float
    meta: CertMeta | None = None
    failures: int = 0
    running: bool = False
    ari_at: float | None = None  # next renewalInfo check; None: nothing installed to ask about
    ari_running: bool = False
    skips: int = 0  # consecutive runs skipped because the fleet store was unreachable


# A renewal skipped because the fleet store is unreachable is tried again after
# STORE_RETRY_BASE * 2^(skips-1) s, at most STORE_RETRY_MAX s, jittered.
STORE_RETRY_BASE = 2.0
STORE_RETRY_MAX = 60.0


def retry_delay(
    failures: int, base: float, cap: float, lifetime: float | None, rng: random.Random
) -> float:
    """Seconds until the next attempt after `failures` consecutive failures (>= 1).

    base * 2^(failures-1), capped by `cap` and, for short-lived certificates,
    by 1/20 of the lifetime so several attempts fit before expiry; the result
    is jittered to [50%, 100%] so many failing certificates spread out.
    """
    delay = base * 2 ** min(max(failures - 1, 0), 30)
    limit = cap if lifetime is None else min(cap, max(lifetime * EMERGENCY_FRACTION, 1.0))
    delay = min(delay, limit)
    return float(delay * rng.uniform(0.5, 1.0))


class Daemon:
    def __init__(
        self,
        config: Config,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.rng = rng or random.Random()
        self.clock = clock
        self.metrics = Metrics(
            self._views, rate_limits=lambda: dict(self.rate_limits), fleet=self._fleet_view
        )
        self.states: dict[str, CertState] = {}
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._closing = threading.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._renewals: dict[str, asyncio.Task[RenewResult]] = {}
        # The last result of each dual certificate key renewed by its pair mate's task.
        self._pair_results: dict[str, RenewResult] = {}
        self._pairs: dict[str, tuple[str, ...]] = {}
        self._groups: dict[str, tuple[str, ...]] = {}
        self._fresh_metas: dict[str, CertMeta | None] = {}  # set by _reconcile (a thread)
        self._ari_tasks: set[asyncio.Task[None]] = set()
        self._ari_semaphore = asyncio.Semaphore(ARI_CONCURRENCY)
        # directory URL -> end of the CA's rate-limit hold (UNIX s), as last read
        self.rate_limits: dict[str, float] = {}
        self._store_problem: str | None = None  # [fleet]: why the last renewal was skipped
        self._started = False
        self._heartbeat: Any = None  # agent.fleet.Heartbeat with [fleet]
        self._fleet_sync: FleetSync | None = None  # [fleet] fan-out and catch-up
        self._fleet_task: asyncio.Task[None] | None = None
        self._map_follower: Any = None  # agent.fleet_map.MapFollower with [fleet] + map
        # [fleet]: its mirror thread runs from here on; close() ends it.
        self.registry = wiring.make_registry(config)
        try:
            ensure_private_dir(config.state_dir)  # before the loop runs
            self._build(config)
            self._deploys = deploy_mod.DeployCoalescer(self._deploy_batch, window=DEPLOY_WINDOW)
            self.spoa = self._make_spoa()
            self.metrics_server = self._make_metrics_server()
            self.control = ControlServer(config.daemon.control_socket, self._control)
        except BaseException:
            self.close()  # nobody else holds the registry's mirror thread now
            raise

    def close(self) -> None:
        """Blocking: stop the fleet threads ([fleet]: the map follower, the
        heartbeat, the challenge registry's mirror thread and its Redis
        connections). Idempotent. `run` calls it on every way out; whoever builds
        a Daemon and does not run it calls it."""
        follower, self._map_follower = self._map_follower, None
        if follower is not None:
            with contextlib.suppress(Exception):
                follower.stop()
        heartbeat, self._heartbeat = self._heartbeat, None
        if heartbeat is not None:
            with contextlib.suppress(Exception):
                heartbeat.stop()
        with contextlib.suppress(Exception):
            self.registry.close()

    # -- set-up -------------------------------------------------------------------

    def _build(self, config: Config) -> None:
        """Objects that depend on the config (rebuilt on SIGHUP). No storage I/O
        here: it also runs on the event loop (reload)."""
        self.storage = wiring.make_storage(config)
        self.deployer = wiring.make_deployer(config)
        # answer = "map": orders also fill HAProxy's map; the SPOA keeps serving self.registry.
        self.challenge_map = wiring.make_map_registry(config, self.registry)
        self._start_map_follower()
        self.renewer = Renewer(
            config,
            self.registry if self.challenge_map is None else self.challenge_map,
            self.storage,
            on_installed=self._deploy_installed,
        )
        # A dual certificate's key -> the other keys of its pair (agent.pairs).
        groups: dict[str, list[str]] = {}
        for c in config.certificates:
            if c.group is not None:
                groups.setdefault(c.group, []).append(c.name)
        self._pairs = {n: tuple(m for m in g if m != n) for g in groups.values() for n in g}
        self._groups = {g: tuple(names) for g, names in groups.items()}
        self.semaphore = asyncio.Semaphore(config.acme.max_concurrent_orders)
        # Orders run on threads of their own, not asyncio's default executor:
        # a stop must not wait for an order that takes minutes.
        old_executor = getattr(self, "_executor", None)
        self._executor = ThreadPoolExecutor(
            max_workers=config.acme.max_concurrent_orders, thread_name_prefix="order"
        )
        if old_executor is not None:
            old_executor.shutdown(wait=False)

    def _load_metas(self) -> dict[str, CertMeta | None]:
        """Worker thread: the stored metadata of every configured certificate
        (and, on the side, the CAs' rate-limit holds)."""
        self._load_holds()
        return load_metas(self.storage, [cfg.name for cfg in self.config.certificates])

    def _load_holds(self) -> None:
        """Worker thread: refresh `rate_limits` from the state dir."""
        self.rate_limits = {
            d: h.until for d, h in ratelimit.load_holds(self.storage).items()
        }  # fmt: skip

    def _first_ari_check(self, meta: CertMeta | None, now: float) -> float | None:
        """When to ask the CA first about `meta`'s certificate (None: nothing installed)."""
        if meta is None or not meta.installed:
            return None
        if meta.ari is not None:
            return meta.ari.next_check
        return now + self.rng.uniform(0, min(ARI_START_SPREAD, self.config.daemon.check_interval))

    async def _schedule_all(self) -> None:
        """(Re)compute every certificate's next attempt from the stored metadata
        (read on a worker thread: the loop keeps answering SPOE meanwhile). A
        stored certificate some instance is not confirmed to serve is due now:
        the renewer pushes it."""
        config = self.config
        try:
            metas = await asyncio.to_thread(self._load_metas)
        except StoreUnavailable as e:
            # [fleet] Redis away: keep what we knew; a certificate we know
            # nothing of is tried now, skipped, and retried with a backoff.
            log.warning("cannot read the stored certificates: %s", e)
            metas = {n: st.meta for n, st in self.states.items()}
        if config is not self.config:
            return  # reloaded meanwhile: that reload schedules again
        now = self.clock()
        instances = self.renewer.deploy_instances()
        states: dict[str, CertState] = {}
        for cfg in self.config.certificates:
            old = self.states.get(cfg.name)
            meta = metas.get(cfg.name)
            when = _next_at(meta, cfg, now)
            if undeployed(meta, instances, layout.deploy_node(self.config)):
                when = min(when, now)
            if old is not None and old.failures and old.next_at > when:
                when = old.next_at  # keep backing off across a reload
            states[cfg.name] = CertState(
                next_at=when,
                meta=meta,
                failures=old.failures if old else 0,
                running=old.running if old else False,
                ari_at=old.ari_at if old and old.ari_at else self._first_ari_check(meta, now),
                ari_running=old.ari_running if old else False,
            )
        self.states = states

    # -- metrics view ---------------------------------------------------------------

    def _views(self) -> Iterator[CertificateView]:
        sync: dict[str, dict[str, bool]] = {}
        for s in self.deployer.status():
            sync.setdefault(s.name, {})[s.instance] = s.in_sync
        instances = self.renewer.deploy_instances()
        node = layout.deploy_node(self.config)
        dual = {c.name: c for c in self.config.certificates if c.group is not None}
        for name, st in list(self.states.items()):
            meta = st.meta
            variant = dual.get(name)
            last_ok = None
            if meta is not None:
                last_ok = meta.installed_at
                if meta.last_attempt is not None and meta.last_attempt.result == "success":
                    last_ok = meta.last_attempt.time
            yield CertificateView(
                # A dual certificate's key: certificate="NAME", key_type="rsa4096"
                # (docs/metrics.md); a single-key certificate's series are unchanged.
                name=variant.label if variant else name,
                key_type=variant.key_type if variant else None,
                not_before=meta.not_before if meta else None,
                not_after=meta.not_after if meta else None,
                next_renewal=st.next_at,
                last_success=last_ok,
                in_sync=sync.get(name, {}),
                deployed=(
                    {inst: inst not in undeployed(meta, [inst], node) for inst in instances}
                    if meta is not None and meta.installed
                    else {}
                ),
                keys=self._key_view(name, meta),
            )

    def _fleet_view(self) -> Any:
        """The fleet as last read by the fan-out (agent.fleet_sync.FleetView); None
        without [fleet]. Read at scrape time: no Redis I/O."""
        sync = self._fleet_sync
        return sync.view if sync is not None else None

    def _key_view(self, name: str, meta: CertMeta | None) -> KeyView | None:
        try:
            cfg = self.config.certificate(name)
        except KeyError:
            return None
        view = rollover.key_view(cfg, meta, self.clock())
        if view is not None and self.config.fleet is not None:
            view = replace(view, waiting=self.renewer.switch_waits(cfg, meta))
        return view

    def healthy(self) -> bool:
        return self._started and not self._stop.is_set() and all(not t.done() for t in self._tasks)

    # -- deploys ----------------------------------------------------------------------

    def _deploy_installed(self, name: str) -> DeployResult:
        """Renewer hook (worker thread): push the stored certificate with this
        node's key; return the result (the renewer records its facts), raise
        if not served."""
        if self._closing.is_set():
            raise RuntimeError("agent is stopping: deploy left to the next start")
        self._announce_stored(name)
        # Renewals that finish together (a mass renewal) are deployed as one
        # batch: one runtime-API session per instance, not one per certificate.
        try:
            result = self._deploys.deploy(name)
        except deploy_mod.DeployError as e:
            self._count_deploy_errors(e.result)
            raise
        finally:
            if self._heartbeat is not None:
                self._heartbeat.beat_now()  # the fleet sees what we serve now
        self._count_deploy_errors(result)
        return result

    def _count_deploy_errors(self, result: DeployResult) -> None:
        for inst in result.instances:
            if inst.error:
                self.metrics.deploy_errors.labels(result.name, inst.instance).inc()

    def _deploy_batch(self, names: list[str]) -> dict[str, DeployResult | Exception]:
        """DeployCoalescer's batch (worker thread): the stored certificates `names`."""
        config, storage = self.config, self.storage
        return deploy_mod.batch_deploy(
            self.deployer, names, deploy_mod.prefetched_targets(config, storage, names)
        )

    def _reconcile(self, full: bool) -> list[SyncStatus]:
        """Worker thread: make HAProxy serve what is stored (full, or instances that changed)."""
        if self._closing.is_set():
            return []
        try:
            # One certificate's bad bundle (e.g. this node's key does not match
            # it) skips that certificate only (agent.fleet_sync logs it).
            targets, _ = node_targets(self.config, self.storage)
        except (deploy_mod.BundleError, OSError) as e:
            log.error("reconcile: cannot read the stored bundles: %s", e)
            return []
        statuses = self.deployer.reconcile(targets) if full else self.deployer.poll(targets)
        if self.challenge_map is not None:  # restarted instances get pending tokens back
            self.challenge_map.poll()
        for s in statuses:
            if s.pushed and s.in_sync:
                # Pushed through the deploy path: served and TLS-verified.
                log.info(
                    "certificate %s: pushed stored serial %X to %s (verified)",
                    s.name, s.stored_serial, s.instance,
                )  # fmt: skip
            elif s.error:
                log.warning("certificate %s on %s: %s", s.name, s.instance, s.error)
        changed = record_sync(
            self.storage, statuses, self.clock(), layout.deploy_node(self.config)
        )
        self._fresh_metas = {name: load_meta(self.storage, name) for name in changed}
        try:
            self.deployer.finish()
        except deploy_mod.ReloadError as e:
            log.error("%s", e)
        return statuses

    # -- renewals ---------------------------------------------------------------------

    def _renewal_task(self, name: str, force: bool) -> asyncio.Task[RenewResult]:
        """The running renewal of `name`, or a new one (never two at once). A dual
        certificate's keys share one task: the renewer renews them as a pair."""
        mates = self._pairs.get(name, ())
        key = "\0pair:" + min(name, *mates) if mates else name
        running = self._renewals.get(key)
        if running is None or running.done():
            for n in (name, *mates):
                st = self.states.get(n)
                if st is not None:
                    st.running = True  # from now on, not when the task first runs
            running = asyncio.create_task(self._renew(name, force), name=f"renew-{name}")
            self._renewals[key] = running
        return running

    async def renew(self, name: str, force: bool) -> RenewResult:
        """Renew one certificate now (or join the renewal already running)."""
        result = await asyncio.shield(self._renewal_task(name, force))
        if result.name != name:  # the task its pair's other key started
            result = self._pair_results.get(name, replace(result, name=name))
        return result

    async def _renew(self, name: str, force: bool) -> RenewResult:
        st = self.states.get(name)
        if st is None:
            return RenewResult(name, "failed", f"no certificate named {name!r} in the config")
        st.running = True
        mates = self._pairs.get(name, ())
        for m in mates:  # filled by this run only (renew() reads them after it)
            self._pair_results.pop(m, None)
        try:
            async with self.semaphore:
                if self._closing.is_set():
                    return RenewResult(name, "failed", "agent is stopping")
                loop = asyncio.get_running_loop()
                results = await loop.run_in_executor(
                    self._executor, self.renewer.run, [name], force, False
                )
            # A dual certificate's keys are renewed as a pair: one result per key.
            result = next(r for r in results if r.name == name)
            others = [r for r in results if r.name != name]
            if result.status == "skipped":  # the store is unreachable: keep what we know
                meta = st.meta
            else:
                meta = await asyncio.to_thread(load_meta, self.storage, name)
            for r in others:
                self._pair_results[r.name] = r
                mate = self.states.get(r.name)
                if r.status == "skipped":
                    other_meta = mate.meta if mate is not None else None
                else:
                    other_meta = await asyncio.to_thread(load_meta, self.storage, r.name)
                self._after_renewal(r.name, r, other_meta)
            if result.status != "skipped":
                await asyncio.to_thread(self._load_holds)
        except KeyError:
            result = RenewResult(name, "failed", "certificate removed from the config meanwhile")
            meta = st.meta
        except Exception as e:  # one certificate's bug must not stop the scheduler
            log.exception("certificate %s: renewal crashed", name)
            result = RenewResult(name, "failed", f"internal error: {e!r}")
            meta = st.meta
        finally:
            st.running = False
            for m in mates:
                mate = self.states.get(m)
                if mate is not None:
                    mate.running = False
        self._after_renewal(name, result, meta)
        self._wake.set()  # the scheduler skipped us while running: let it see next_at
        if result.status in ("renewed", "deployed"):
            try:
                await asyncio.to_thread(self.deployer.finish)
            except deploy_mod.ReloadError as e:
                log.error("%s", e)
        return result

    def _after_renewal(self, name: str, result: RenewResult, meta: CertMeta | None) -> None:
        """Reschedule `name` after a run; `meta` is what is stored now (read by
        the caller on a worker thread: no storage I/O on the loop)."""
        st = self.states.get(name)
        if st is None:  # dropped by a reload while running
            return
        now = self.clock()
        st.meta = meta
        cfg = self.config.find_certificate(name)
        extra = {"certificate": name, "outcome": result.status, "reason": result.reason}
        if self._fleet_outcome(name, st, result, now):
            return
        if result.failed:
            st.failures += 1
            lifetime = None
            if meta and meta.not_after is not None and meta.not_before is not None:
                lifetime = meta.not_after - meta.not_before
            delay = retry_delay(
                st.failures,
                self.config.daemon.retry_base,
                self.config.daemon.retry_max,
                lifetime,
                self.rng,
            )
            st.next_at = now + delay
            if result.retry_at is not None:
                # The CA holds new orders until then: ask again right after, not later.
                delay = max(result.retry_at - now, 0.0) + self.rng.uniform(0.0, 1.0)
                st.next_at = now + delay
            self.metrics.renewals.labels(name, "failure").inc()
            # deploy failures: deploy_errors, per instance; "pair": a dual certificate's key
            # held back because its sibling's order failed (that one is counted).
            if result.error_type not in ("deploy", "pair"):
                self.metrics.acme_errors.labels(result.error_type or "other").inc()
            log.error("renewal failed; retrying in %.0f s", delay, extra=extra)
            return
        if result.status == "renewed":
            st.failures = 0
            st.ari_at = now  # a new leaf: ask for its window now (install cleared the old one)
            self.metrics.renewals.labels(name, "success").inc()
            log.info("renewal done", extra={**extra, "serial": result.serial})
        elif result.status == "deployed":
            st.failures = 0
            log.info("stored certificate deployed", extra={**extra, "serial": result.serial})
        if cfg is not None:
            st.next_at = _next_at(meta, cfg, now)
            if st.next_at <= now:
                # The renewer said not due (e.g. a concurrent run just renewed,
                # or the CA's retry time): look again shortly, not in a busy loop.
                st.next_at = now + max(1.0, min(60.0, self.config.daemon.retry_base))

    def _fleet_outcome(self, name: str, st: CertState, result: RenewResult, now: float) -> bool:
        """Fleet outcomes of a run: "skipped" (store unreachable: retried with a
        bounded backoff, not a failure) and a fenced install (counted). True when
        `result` was handled here (the caller reschedules nothing more)."""
        if result.error_type == "fence":
            self.metrics.fenced_installs.labels(name, self.renewer.node).inc()
        if result.status != "skipped":
            st.skips = 0
            self._store_problem = None
            return False
        st.skips += 1
        self._store_problem = result.reason
        self.metrics.renewals_skipped.labels(name).inc()
        delay = min(STORE_RETRY_BASE * 2 ** min(st.skips - 1, 20), STORE_RETRY_MAX)
        st.next_at = now + delay * self.rng.uniform(0.5, 1.0)
        log.warning(
            "renewal skipped; trying again in %.0f s", st.next_at - now,
            extra={"certificate": name, "outcome": "skipped", "reason": result.reason},
        )  # fmt: skip
        return True

    def degraded(self) -> str | None:
        """Why this node is degraded (/healthz says so, still 200), or None: the
        fleet store is unreachable (the last renewal was skipped, or the shared
        challenge registry lost its Redis connection)."""
        if self.config.fleet is None:
            return None
        problem: str | None = getattr(self, "_store_problem", None)
        connected = getattr(self.registry, "connected", None)
        if problem is None and connected is not None and not connected.is_set():
            problem = "fleet store unavailable: the challenge registry is not connected to Redis"
        return problem

    def _fleet_rebuild(self) -> None:
        """Worker thread, [fleet]: a store that lost its data (Redis restarted empty)
        gets back the certificates this node serves (`Renewer.rebuild_if_emptied`)."""
        if self.config.fleet is None or self._closing.is_set():
            return
        try:
            for r in self.renewer.rebuild_if_emptied():
                log.info("fleet store rebuilt: %s: %s", r.name, r.reason)
        except Exception as e:  # Redis away again: the next pass tries
            log.warning("fleet store: cannot check whether it lost its data: %s", e)

    # -- loops --------------------------------------------------------------------------

    def _tick(self) -> float:
        """Start the renewals and ARI checks that are due; return when the next is (UNIX s)."""
        now = self.clock()
        soonest = now + self.config.daemon.check_interval
        for name, st in list(self.states.items()):
            if st.running:
                continue
            if st.next_at <= now:
                mates = [self.states.get(n) for n in self._pairs.get(name, ())]
                if any(m is not None and m.running for m in mates):
                    continue  # its pair is being renewed, this key with it
                self._renewal_task(name, False)
                continue
            soonest = min(soonest, st.next_at)
            if st.ari_at is not None and not st.ari_running:
                if st.ari_at <= now:
                    self._ari_task(name)
                else:
                    soonest = min(soonest, st.ari_at)
        return soonest

    async def _scheduler(self) -> None:
        while not self._stop.is_set():
            now = self.clock()
            soonest = self._tick()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=max(0.05, soonest - now))

    def _ari_task(self, name: str) -> asyncio.Task[None]:
        st = self.states[name]
        st.ari_running = True
        task = asyncio.create_task(self._check_ari(name), name=f"ari-{name}")
        self._ari_tasks.add(task)
        task.add_done_callback(self._ari_tasks.discard)
        return task

    async def _check_ari(self, name: str) -> None:
        """Fetch `name`'s renewal window (worker thread) and reschedule its renewal
        from it: earlier when the CA moved the window earlier, now when it is past."""
        meta: CertMeta | None = None
        try:
            async with self._ari_semaphore:
                if self._closing.is_set():
                    return
                meta, next_check = await asyncio.to_thread(self.renewer.check_ari, name)
        except Exception as e:  # ARI is advice: never let it stop the 1/3 fallback
            log.warning("certificate %s: renewal info check failed: %s", name, e)
            next_check = self.clock() + min(ARI_ERROR_RETRY, self.config.daemon.check_interval)
            meta = None
        finally:
            if name in self.states:
                self.states[name].ari_running = False
        st = self.states.get(name)  # a reload may have replaced it meanwhile
        cfg = self.config.find_certificate(name)
        if st is None or cfg is None:
            return
        st.ari_at = next_check
        if st.running or meta is None:
            return  # a running renewal reschedules when it ends
        st.meta = meta
        if st.failures == 0:
            now = self.clock()
            st.next_at = _next_at(meta, cfg, now)
            if undeployed(meta, self.renewer.deploy_instances(), layout.deploy_node(self.config)):
                st.next_at = min(st.next_at, now)
        self._wake.set()

    async def _reconciler(self) -> None:
        full = True
        last_full = self.clock()
        while not self._stop.is_set():
            try:
                await asyncio.to_thread(self._fleet_rebuild)
                await asyncio.to_thread(self._reconcile, full)
                # New deployed facts: the metrics read them from the states.
                for name, meta in self._fresh_metas.items():
                    if name in self.states and not self.states[name].running:
                        self.states[name].meta = meta
                self._fresh_metas = {}
            except Exception:
                log.exception("reconcile failed")
            now = self.clock()
            # `poll` every interval reconciles instances that restarted or came
            # back; a full pass (served serial of every certificate) every 10.
            full = now - last_full >= 10 * self.config.daemon.reconcile_interval
            if full:
                last_full = now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._stop.wait(), timeout=self.config.daemon.reconcile_interval
                )

    # -- control socket -----------------------------------------------------------------

    async def _control(self, request: dict[str, Any]) -> dict[str, Any]:
        cmd = request["cmd"]
        if cmd == "ping":
            return {"ok": True}
        if cmd == "renew":
            names = request.get("names") or [c.name for c in self.config.certificates]
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ValueError("'names' must be a list of strings")
            unknown = [n for n in names if n not in self.states and n not in self._groups]
            if unknown:
                return {"ok": False, "error": f"no certificate named {', '.join(unknown)}"}
            # A dual certificate's config name stands for its keys (renewed as a pair).
            names = [v for n in names for v in self._groups.get(n, (n,))]
            force = bool(request.get("force", False))
            results = await asyncio.gather(*(self.renew(n, force) for n in names))
            self._wake.set()
            return {
                "ok": True,
                "results": [
                    {
                        "name": r.name,
                        "status": r.status,
                        "reason": r.reason,
                        "serial": r.serial,
                        "not_after": r.not_after,
                    }
                    for r in results
                ],
            }
        if cmd == "status":
            return {
                "ok": True,
                "certificates": {
                    n: {
                        "next_at": s.next_at,
                        "failures": s.failures,
                        "running": s.running,
                        "ari_check_at": s.ari_at,
                    }
                    for n, s in self.states.items()
                },
                "rate_limited_until": dict(self.rate_limits),
                "haproxy": [
                    {
                        "certificate": s.name,
                        "instance": s.instance,
                        "in_sync": s.in_sync,
                        "served_serial": None
                        if s.served_serial is None
                        else f"{s.served_serial:x}",
                        "stored_serial": f"{s.stored_serial:x}",
                        "error": s.error,
                    }
                    for s in self.deployer.status()
                ],
            }
        raise ValueError(f"unknown command {cmd!r}")

    # -- reload -------------------------------------------------------------------------

    async def reload(self, path: Path) -> bool:
        """SIGHUP: load and validate the config; switch to it only if it is valid."""
        from agent import permissions

        def load_checked() -> Config:
            config = load_config(path, cached_key_checks=True)
            permissions.startup_checks(config)  # what `run` checks at start, also at reload
            challenge_map.startup_check(config)
            return config

        try:
            new = await asyncio.to_thread(load_checked)
        except (ConfigError, permissions.PermissionsError) as e:
            log.error("reload refused, keeping the running config: %s", e)
            return False
        except OSError as e:
            log.error("reload refused, keeping the running config: %s: %s", path, e)
            return False
        old = self.config
        await asyncio.to_thread(ensure_private_dir, new.state_dir)
        await self._reload_fleet(old, new)
        await asyncio.to_thread(_save_key_checks, new)
        self.config = new
        self._build(new)
        if self._started and old.fleet != new.fleet:
            self._heartbeat = self._start_heartbeat()
            self._start_fleet_sync()
        await self._schedule_all()
        if new.spoa != old.spoa or new.challenges.answer != old.challenges.answer:
            await self._restart_spoa()  # listen address, limits, or on/off with map mode
        if new.metrics.listen != old.metrics.listen:
            await self._restart_metrics()
        log.info("configuration reloaded from %s (%d certificates)", path, len(new.certificates))
        self._wake.set()
        return True

    def _serves_spoe(self) -> bool:
        """Whether the SPOA listener runs: not with `[challenges] answer = "map"`,
        where HAProxy answers from its map and no SPOE agent is configured (the
        port stays free; /healthz and /metrics do not depend on it)."""
        return self.config.challenges.answer != "map"

    async def _restart_spoa(self) -> None:
        await self.spoa.stop()
        self.spoa = self._make_spoa()
        if self._serves_spoe():
            await self.spoa.start()
            await self._announce_spoa()

    async def _announce_spoa(self) -> None:
        """HAProxy may have marked the agent DOWN while we were away: say we are up."""
        if not self.config.haproxy.runtime_api or not self._serves_spoe():
            return
        from agent.agent_health import mark_agent_up

        try:
            await asyncio.to_thread(
                mark_agent_up,
                self.config.haproxy.runtime_api,
                self.config.spoa.listen,
                self.config.haproxy.timeout,
            )
        except Exception as e:  # HAProxy's own checks will find us anyway
            log.warning("could not mark the SPOE agent up in HAProxy: %s", e)

    async def _restart_metrics(self) -> None:
        await self.metrics_server.stop()
        self.metrics_server = self._make_metrics_server()
        await self.metrics_server.start()

    def _make_spoa(self) -> SpoaServer:
        listen = self.config.spoa.listen
        return SpoaServer(
            self.registry,
            listen.host,
            listen.port,
            counters=self.metrics.spoa,  # read at scrape time; survives SPOA restarts
            **door_settings(self.config.spoa),
        )

    def _make_metrics_server(self) -> MetricsServer:
        listen = self.config.metrics.listen
        return MetricsServer(self.metrics, listen.host, listen.port, self.healthy, self.degraded)

    # -- run ----------------------------------------------------------------------------

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the exit code (0 on a graceful stop).
        On every way out (also "cannot start" and an exception) the fleet threads
        end: `close`."""
        try:
            return await self._run()
        finally:
            await asyncio.to_thread(self.close)

    async def _run(self) -> int:
        loop = asyncio.get_running_loop()
        # SIGTERM during start-up (systemd stopping a unit that is still starting)
        # is a graceful stop too: the step under way finishes, nothing new starts.
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        if STOP_REQUESTED.is_set():  # it came while the config was being loaded
            self._stop.set()
        # A crash (kill -9) or an older version may have left temp files,
        # half-written generations or the old flat layout: repair first.
        await asyncio.to_thread(self._prepare_state)
        # The keys passed their checks: the next start only stats unchanged ones.
        await asyncio.to_thread(_save_key_checks, self.config)
        # DNS records a killed order left behind go now, not at the first order.
        recover = getattr(self.renewer.issuer, "recover_leftovers", None)
        if recover is not None and not self._stop.is_set():
            await asyncio.to_thread(recover)
        if self._stop.is_set():
            log.info("stopping before start-up finished")
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            return 0  # run() closes the registry
        await self._schedule_all()
        try:
            await self.control.start()
            if self._serves_spoe():
                await self.spoa.start()
            await self.metrics_server.start()
        except OSError as e:
            log.error("cannot start: %s", e)
            await self._stop_servers()
            return 1
        await self._announce_spoa()
        self._heartbeat = self._start_heartbeat()
        reload_path = self.config.path
        pending_reload: set[asyncio.Task[bool]] = set()

        def on_hup() -> None:
            task = asyncio.create_task(self.reload(reload_path))
            pending_reload.add(task)
            task.add_done_callback(pending_reload.discard)

        loop.add_signal_handler(signal.SIGHUP, on_hup)
        for coro in (self._scheduler(), self._reconciler()):
            task = asyncio.create_task(coro)
            self._tasks.add(task)
        self._start_fleet_sync()
        self._started = True
        log.info(
            "agent running: %d certificates, SPOA on %s, metrics on %s, control %s",
            len(self.states),
            self.config.spoa.listen if self._serves_spoe() else "none (challenges from the map)",
            self.config.metrics.listen,
            self.config.daemon.control_socket,
        )  # fmt: skip
        await self._stop.wait()
        log.info("stopping")
        await self._shutdown()
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        return 0

    async def _shutdown(self) -> None:
        self._closing.set()  # no new order or deploy starts from here on
        self._wake.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        running = [t for t in self._renewals.values() if not t.done()]
        if running:
            _, pending = await asyncio.wait(running, timeout=SHUTDOWN_GRACE)
            if pending:
                log.warning(
                    "leaving %d order(s) in flight; nothing was installed for them",
                    len(pending),
                )
        # Every HAProxy transaction runs under its instance lock: taking them
        # all waits for the ones in flight to commit or abort.
        if not await asyncio.to_thread(self.deployer.wait_idle, SHUTDOWN_GRACE):
            log.warning("an HAProxy certificate transaction is still running at exit")
        await self._stop_servers()
        # [fleet]: the map follower, the heartbeat (our record goes: the others
        # see us gone), the registry's mirror thread and its Redis connections
        # end with us (a daemon embedded in another process must not leave them
        # running).
        await asyncio.to_thread(self.close)

    def _prepare_state(self) -> None:
        """Worker thread: `prepare_state` at start; a fleet store that cannot be
        reached is not repaired now (nothing writes to it until it is back),
        and the node starts serving all the same."""
        try:
            prepare_state(self.config, self.storage)
        except StoreUnavailable as e:
            log.warning("starting without the fleet store: %s", e)

    def _start_map_follower(self) -> None:
        """[fleet] + answer = "map": mirror the tokens other nodes add into this
        node's HAProxy maps (agent.fleet_map.MapFollower, its own thread); the
        previous follower (before a reload) is stopped."""
        old, self._map_follower = self._map_follower, None
        if old is not None:
            old.stop(wait=False)
        from agent.fleet import RedisChallengeRegistry

        fleet = self.config.fleet
        if (fleet is None or self.challenge_map is None
                or not isinstance(self.registry, RedisChallengeRegistry)):  # fmt: skip
            return
        from agent.fleet import redis_client
        from agent.fleet_map import MapFollower, PeerAcks

        acks = self.challenge_map.peers  # wiring.make_map_registry made them for [fleet]
        if not isinstance(acks, PeerAcks):
            acks = PeerAcks(redis_client(fleet), fleet.namespace, fleet.node)
        self._map_follower = MapFollower(self.registry, self.challenge_map, acks).start()

    def _start_heartbeat(self) -> Any:
        """[fleet]: beat every few seconds with the serial of each certificate
        (agent.fleet.Heartbeat, its own thread); None for a single node."""
        fleet = self.config.fleet
        if fleet is None:
            return None
        from agent.fleet import Heartbeat, redis_client

        def serials() -> dict[str, str | None]:
            # What this node's HAProxy serves (as its deployer last saw it).
            served = FleetSync.served_by(self.deployer)
            return {n: served.get(n) for n in list(self.states)}

        def extra() -> dict[str, Any]:
            sync = self._fleet_sync
            return {
                "key_mismatch": sync.refused() if sync is not None else [],
                # Map-mode orders wait for every live node saying "map" (agent.fleet_map).
                "answer": self.config.challenges.answer,
                # A key switch waits for every live node holding the next key
                # (agent.rollover.switch_hold): pins only, never key material.
                "next_keys": rollover.held_next_keys(self.config.certificates),
            }

        return Heartbeat(
            redis_client(fleet), fleet.namespace, fleet.node, serials, extra=extra
        ).start()

    # -- fleet: fan-out, catch-up, reload (agent.fleet_sync) ----------------------------

    def _announce_stored(self, name: str) -> None:
        """[fleet], worker thread: tell the other nodes that `name` was stored (or is
        being pushed again) so they deploy it; a hint only (they also compare serials)."""
        fleet = self.config.fleet
        if fleet is None:
            return
        from agent import layout
        from agent.certstate import read_current
        from agent.fleet import publish_changed

        try:
            gen = read_current(self.storage, name)
            if gen is None:
                return
            fence = None
            with contextlib.suppress(Exception):  # only a RedisStorage hold has one
                fence = self.storage.fence(layout.cert_lock(name))  # type: ignore[attr-defined]
            publish_changed(
                self.storage.client,  # type: ignore[attr-defined]
                fleet.namespace, name, gen.rsplit("-", 1)[1], fence, fleet.node,
            )  # fmt: skip
        except Exception as e:  # the others catch up by comparing serials
            log.warning("fleet: cannot announce certificate %s: %s", name, e)

    def _start_fleet_sync(self) -> None:
        """[fleet]: subscribe to "certificate changed" and run the fan-out/catch-up task."""
        fleet = self.config.fleet
        self._fleet_sync = None
        if fleet is None:
            return
        from agent.fleet import redis_client

        self._fleet_sync = FleetSync(self, redis_client(fleet), fleet.namespace, fleet.node)
        task = asyncio.create_task(self._fleet_sync.run(), name="fleet-sync")
        self._fleet_task = task
        self._tasks.add(task)

    async def _reload_fleet(self, old: Config, new: Config) -> None:
        """SIGHUP with a changed [fleet]: new registry (the SPOA answers from it at once;
        its connections stay), heartbeat and fan-out; the old ones are closed."""
        if old.fleet == new.fleet:
            return
        old_registry, old_hb, old_task = self.registry, self._heartbeat, self._fleet_task
        self.registry = wiring.make_registry(new)
        self.spoa.registry = self.registry
        if old_task is not None:
            self._tasks.discard(old_task)
            old_task.cancel()
            await asyncio.gather(old_task, return_exceptions=True)
            self._fleet_task = None
        if old_hb is not None:
            await asyncio.to_thread(old_hb.stop)
        await asyncio.to_thread(old_registry.close)
        log.info("[fleet] changed: challenge registry, heartbeat and fan-out rebuilt")

    async def _stop_servers(self) -> None:
        for server in (self.spoa, self.metrics_server, self.control):
            with contextlib.suppress(Exception):
                await server.stop()


def _next_at(meta: CertMeta | None, cfg: CertificateConfig, now: float) -> float:
    """When the daemon runs `cfg` next: its renewal time (`next_renewal_time`), or
    earlier to retry a queued keyCompromise revocation (the run revokes, then
    finds the certificate not due: nothing is ordered for it)."""
    when = next_renewal_time(meta, cfg, now, meta.ari if meta else None)
    retry = rollover.revoke_retry_time(meta.keys if meta else None, now)
    return when if retry is None else min(when, retry)


def _save_key_checks(config: Config) -> None:
    """Worker thread: record the key checks `config` passed (agent.config.save_key_checks);
    the cache only saves time, so a failure to write it is logged, not fatal."""
    try:
        save_key_checks(config)
    except OSError as e:
        log.warning("cannot write the key check cache in %s: %s", config.state_dir, e)


def run_daemon(config_path: Path, log_format: str | None = None, verbose: bool = False) -> int:
    """Entry point of `haproxy-acme-agent run`. Raises ConfigError for a bad config
    and PermissionsError for a key others may read under strict_permissions."""
    # Until the event loop takes them over, SIGTERM and SIGINT are remembered,
    # not fatal: a stop while the config and keys are loaded still exits 0.
    STOP_REQUESTED.clear()
    previous = {
        sig: signal.signal(sig, lambda _signo, _frame: STOP_REQUESTED.set())
        for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        return _run_daemon(config_path, log_format, verbose)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run_daemon(config_path: Path, log_format: str | None, verbose: bool) -> int:
    from agent import permissions
    from agent.logs import setup_logging

    # Keys unchanged since the last start are not parsed again (the same
    # checks, from the cache `_save_key_checks` keeps); check-config and
    # renew parse every key.
    config = load_config(config_path, cached_key_checks=True)
    setup_logging(
        log_format or config.daemon.log_format, logging.DEBUG if verbose else logging.INFO
    )
    permissions.startup_checks(config)  # the same checks as check-config and renew
    challenge_map.startup_check(config)  # map mode: admin level and the map on every instance

    async def main() -> int:
        return await Daemon(config).run()

    from agent.spoa import run as run_loop  # uvloop when installed: cheaper SPOE answers

    code = run_loop(main())
    if any(t.name.startswith("order") and t.is_alive() for t in threading.enumerate()):
        # An order is still waiting on the CA. Everything it could write is
        # written atomically and nothing of it is installed: leave now rather
        # than let the interpreter wait for it (SIGTERM must be quick).
        logging.shutdown()
        os._exit(code)
    return code
