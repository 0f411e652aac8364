"""When to renew, what to check before installing, and the renewal run itself.

- `next_renewal_time(meta, cert_cfg, now, ari_window)`: the one renewal rule
  (pure; the daemon's scheduler and `renew` share it):
  no certificate yet / names changed -> now; `renew_before` set -> not_after -
  renew_before; else the CA's ARI window (the random point we picked inside
  it); else when 1/3 of the lifetime is left. Whatever the rule says, never
  later than when 1/20 of the lifetime is left (emergency), and never before a
  rate limit's retry time.
- `check_certificate(...)`: refuse a certificate whose leaf key is not the
  stable key, whose names are not `domains`, whose chain does not parse or
  does not sign the leaf, that is expired, or (with `backup_pins`) whose pin
  set has no real backup.
- `renew_certificates(config, names, force, dry_run, registry, on_installed)`:
  orders the due certificates in parallel (at most
  `acme.max_concurrent_orders`), checks and installs them; a failed order
  never touches installed files. One `RenewResult` per certificate.

Storage: see `agent.layout` (names) and `agent.certstate` (generations,
state.json, repair). A renewal writes a new generation and switches the
`current` pointer to it, under the certificate's lock; no private key is ever
stored: the HAProxy bundle is assembled at deploy time (`node_bundle`).

Deployed state is a fact: after every deploy the per-instance serial HAProxy
was confirmed to serve is recorded in state.json (`record_deploy`), and a run
pushes a stored certificate some instance is not confirmed to serve before it
decides that nothing is due.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from agent import ari, keys, layout, pairs, ratelimit, rollover, wiring
from agent.certstate import Attempt as Attempt
from agent.certstate import CertMeta as CertMeta
from agent.certstate import (
    CertState,
    Deployed,
    install_generation,
    load_current,
    load_metas,
    parse_state,
    repair,
    state_bytes,
    undeployed,
    update_state,
)
from agent.certstate import load_meta as load_meta
from agent.certstate import meta_from_certificate as meta_from_certificate
from agent.chain import ChainError, ChainPolicy, policy_for, verify_chain
from agent.challenges import ChallengeRegistry
from agent.config import CertificateConfig, Config
from agent.issuer import (
    AccountError,
    AcmeError,
    AcmeTimeout,
    AcmeUnreachable,
    IssuedCertificate,
    OrderFailed,
    OrderProgress,
    RateLimited,
    ReplacesRefused,
    ValidationFailed,
)
from agent.storage import FenceRejected, LockLost, LockTimeout, Storage, StoreUnavailable

log = logging.getLogger(__name__)

RENEW_FRACTION = 1 / 3  # renew when this fraction of the lifetime is left
EMERGENCY_FRACTION = 1 / 20  # renew regardless of ARI when this fraction is left
# Orders carrying `replaces` the CA refused for the current leaf before its
# orders go without (the first refusal already re-orders without, once).
REPLACES_MAX_FAILURES = 1
ARI_ERROR_RETRY = 300.0  # s: the next renewalInfo try after an error (at most check_interval)

# The storage layout lives in agent.layout; this name stays for callers.
cert_key = layout.cert_key


# --- when to renew ---------------------------------------------------------------------


def renewal_decision(
    meta: CertMeta | None,
    cert_cfg: CertificateConfig,
    now: float,
    ari_window: ari.RenewalWindow | None,
    switch_held: bool = False,
) -> tuple[float, str]:
    """(when to renew as UNIX seconds, why). Pure: no I/O, no clock, no randomness.
    `switch_held`: a due key switch must wait (`rollover.switch_hold`), so only
    the other reasons count."""
    if meta is None or not meta.installed:
        return now, "no certificate yet"
    assert meta.not_after is not None
    if sorted(meta.domains) != sorted(cert_cfg.domains):
        return now, "domains changed"
    not_before = meta.not_before if meta.not_before is not None else meta.not_after - 90 * 86400
    lifetime = max(meta.not_after - not_before, 1.0)
    emergency = meta.not_after - lifetime * EMERGENCY_FRACTION
    if cert_cfg.renew_before is not None:
        when, why = meta.not_after - cert_cfg.renew_before, "renew_before reached"
    elif ari_window is not None:
        when, why = ari_window.selected, "inside the CA's renewal window (ARI)"
    else:
        when, why = meta.not_after - lifetime * RENEW_FRACTION, "1/3 of the lifetime left"
    if emergency < when:
        when, why = emergency, "less than 1/20 of the lifetime left"
    switch_at = None if switch_held else rollover.switch_time(cert_cfg, meta.keys, now)
    if switch_at is not None and switch_at < when:
        when, why = switch_at, "key rollover"
    if meta.retry_not_before is not None and meta.retry_not_before > when:
        when, why = meta.retry_not_before, why + " (after the CA's rate-limit retry time)"
    if meta.not_after <= now:
        why = "certificate expired"
    return when, why


def next_renewal_time(
    meta: CertMeta | None,
    cert_cfg: CertificateConfig,
    now: float,
    ari_window: ari.RenewalWindow | None,
) -> float:
    """When `cert_cfg`'s certificate is due (UNIX seconds; <= now means due now). Pure."""
    return renewal_decision(meta, cert_cfg, now, ari_window)[0]


# --- checks ----------------------------------------------------------------------------


class CertificateRejected(Exception):
    """The CA's certificate failed a check; nothing was installed."""


_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.+?-----END CERTIFICATE-----", re.S)


@dataclass(frozen=True)
class CheckedChain:
    leaf: x509.Certificate
    chain: tuple[x509.Certificate, ...]

    def pem(self, certs: Sequence[x509.Certificate]) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)

    @property
    def cert_pem(self) -> bytes:
        return self.pem([self.leaf])

    @property
    def chain_pem(self) -> bytes:
        return self.pem(self.chain)

    @property
    def fullchain_pem(self) -> bytes:
        return self.pem([self.leaf, *self.chain])


def check_certificate(
    fullchain_pem: bytes,
    key: keys.PrivateKey,
    domains: Sequence[str],
    backup_pins: Sequence[str],
    now: float,
    *,
    policy: ChainPolicy | None = None,
    name: str = "",
) -> CheckedChain:
    """Parse and check a CA's full chain; raise CertificateRejected saying what is wrong.

    With `policy` (what renewals pass), the chain must also satisfy
    `agent.chain.verify_chain` (leaf's issuer present, leads to a trusted root,
    leaf-only only when allowed); `name` names the certificate in its messages.
    Without it only each adjacent pair's signature is checked (the importer).
    """
    blocks = _PEM_CERT.findall(fullchain_pem)
    if not blocks:
        raise CertificateRejected("the CA's response holds no PEM certificate")
    certs: list[x509.Certificate] = []
    for i, block in enumerate(blocks):
        try:
            certs.append(x509.load_pem_x509_certificate(block))
        except ValueError as e:
            raise CertificateRejected(f"certificate {i} of the chain does not parse: {e}") from e
    leaf, chain = certs[0], tuple(certs[1:])
    key_pin = keys.spki_pin(key)
    leaf_pin = keys.spki_pin(leaf.public_key())  # type: ignore[arg-type]
    if leaf_pin != key_pin:
        raise CertificateRejected(
            f"the leaf's public key is not the stable key (leaf pin {leaf_pin}, key pin {key_pin})"
        )
    names = keys.cert_domains(leaf)
    if sorted(names) != sorted(d.lower() for d in domains):
        raise CertificateRejected(
            f"the leaf's names ({', '.join(sorted(names)) or 'none'}) are not the configured "
            f"domains ({', '.join(sorted(domains))})"
        )
    if leaf.not_valid_after_utc.timestamp() <= now:
        raise CertificateRejected(f"the leaf expired at {leaf.not_valid_after_utc.isoformat()}")
    if policy is not None:
        try:
            verify_chain(leaf, chain, policy, name or ", ".join(domains))
        except ChainError as e:
            raise CertificateRejected(str(e)) from None
    for child, parent in zip(certs, chain, strict=False):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature) as e:
            raise CertificateRejected(
                f"chain does not verify: {child.subject.rfc4514_string()} is not signed by "
                f"{parent.subject.rfc4514_string()} ({e or type(e).__name__})"
            ) from e
    if backup_pins:
        announced = {key_pin, *backup_pins}
        if leaf_pin not in announced:
            raise CertificateRejected(f"the leaf's pin {leaf_pin} is not among backup_pins")
        if not any(p != key_pin for p in backup_pins):
            raise CertificateRejected(
                "backup_pins holds only the key's own pin: pinning needs at least one backup "
                "key's pin, refusing to install"
            )
    return CheckedChain(leaf, chain)


def make_bundle(fullchain_pem: bytes, key_pem: bytes, dhparam_pem: bytes | None = None) -> bytes:
    """The HAProxy bundle: full chain, key [, DH params]; no blank lines (runtime API safe)."""
    parts = [fullchain_pem, key_pem] + ([dhparam_pem] if dhparam_pem else [])
    lines = [ln for p in parts for ln in p.replace(b"\r\n", b"\n").split(b"\n") if ln.strip()]
    return b"\n".join(lines) + b"\n"


# --- results ---------------------------------------------------------------------------


def stable_key(
    cfg: CertificateConfig, fleet_node: str | None, create: bool = True
) -> keys.PrivateKey:
    """`cfg`'s configured key. With `generate_key` (and `create`) a missing key is
    created now, once, mode 0600. On fleet node `fleet_node` that is said as a
    warning: keys never travel through Redis (docs/fleet.md), so the other nodes
    refuse this certificate until they hold the same file."""
    if cfg.generate_key and create and not cfg.key.exists():
        key = keys.create_key_file(cfg.key, cfg.key_type)
        log.info("certificate %s: created key %s (%s)", cfg.name, cfg.key, cfg.key_type)
        if fleet_node is not None:
            log.warning(
                "certificate %s: node %s created its own key %s (generate_key in a "
                "fleet): copy that file (0600) to the same path on every other node, "
                "or they refuse to deploy the certificate ordered for it",
                cfg.name, fleet_node, cfg.key,
            )  # fmt: skip
        return key
    return keys.load_private_key(cfg.key)


@dataclass(frozen=True)
class OrderBasis:
    """What an order in flight is for: the SPKI pin of the key its CSR holds and
    the generation current when it was placed (None: the first). It is recorded
    with the order; a recorded order is only resumed on the same basis."""

    key_pin: str
    base: str | None


@dataclass(frozen=True)
class RenewResult:
    """Outcome for one certificate. status: "renewed", "deployed" (the stored
    certificate was pushed to HAProxy, nothing ordered), "not-due", "failed",
    "dry-run" or "skipped" (the fleet store cannot be reached: nothing was
    attempted, try again later; not a failure of the certificate)."""

    name: str
    status: str
    reason: str
    serial: str | None = None
    not_after: float | None = None
    # For metrics: what kind of failure ("rateLimited", "connection", "validation", ...).
    error_type: str | None = None
    # A rate-limited failure: when the CA's hold on new orders ends (UNIX s).
    retry_at: float | None = None

    @property
    def failed(self) -> bool:
        return self.status == "failed"


_ERROR_TYPES: tuple[tuple[type[BaseException], str], ...] = (
    (RateLimited, "rateLimited"),
    (AcmeUnreachable, "connection"),
    (ValidationFailed, "validation"),
    (AcmeTimeout, "timeout"),
    (OrderFailed, "order"),
    (AccountError, "account"),
    (CertificateRejected, "rejected"),
    (keys.StableKeyError, "key"),
    (keys.CSRError, "csr"),
    (OSError, "io"),
)


def error_type(e: BaseException) -> str:
    """A short, bounded label for a renewal failure (a metrics label: no free text)."""
    for cls, label in _ERROR_TYPES:
        if isinstance(e, cls):
            return label
    problem = getattr(e, "problem_type", None)
    if isinstance(problem, str) and problem.startswith("urn:ietf:params:acme:error:"):
        return problem.rsplit(":", 1)[1][:40]
    return "acme" if isinstance(e, AcmeError) else "other"


def _fmt_time(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


# --- the run ---------------------------------------------------------------------------


class CertificateIssuer(Protocol):
    """What a renewal run needs from an issuer (agent.issuer.Issuer is the real one)."""

    @property
    def renewal_info_url(self) -> str | None: ...

    def connect(self) -> None: ...

    def renewal_info(
        self, cert: x509.Certificate, previous: ari.RenewalWindow | None = None
    ) -> ari.RenewalWindow | None: ...

    def issue(
        self,
        csr_pem: bytes,
        domains: Sequence[str],
        replaces: str | None = None,
        *,
        challenge: str = "http-01",
        cert_name: str | None = None,
    ) -> IssuedCertificate: ...


class Renewer:
    """State of one renewal run over the configured certificates (see renew_certificates).

    `on_installed(name)` deploys the stored certificate `name` (built with
    `node_bundle`) and returns its `agent.deploy.DeployResult` (or None when
    it has no facts to report); it raises (`DeployError`, carrying the result)
    when the certificate is not served everywhere. The renewer records the
    facts in state.json (`record_deploy`). With a hook, a stored certificate
    that some instance is not confirmed to serve is pushed again by the next
    run, before anything is judged not due.
    """

    def __init__(
        self,
        config: Config,
        registry: ChallengeRegistry,
        storage: Storage | None = None,
        issuer: CertificateIssuer | None = None,
        on_installed: Callable[[str], object] | None = None,
        clock: Callable[[], float] = time.time,
        serve_challenges: Callable[[], AbstractContextManager[object]] | None = None,
    ) -> None:
        self.config = config
        self.serve_challenges = serve_challenges
        self.registry = registry
        if storage is None:
            # FileStorage creates the (0700) state dir on the first write, so a
            # dry run or a run with nothing due writes nothing at all.
            storage = wiring.make_storage(config)
        self.storage = storage
        self.issuer: CertificateIssuer = issuer or wiring.make_issuer(config, storage, registry)
        self.on_installed = on_installed
        self.clock = clock
        import socket

        # The node named in fence refusals, order records and meta.json.
        self.node = config.fleet.node if config.fleet is not None else socket.gethostname()
        # Names whose deploy `_run_batched` defers to one batch (None: deploy at once).
        self._deferred: list[str] | None = None
        self._deferred_for: set[str] = set()
        self._deferred_lock = threading.Lock()
        # [fleet] The heartbeats last read (monotonic time, nodes) and, per
        # certificate, why its key switch waits (logged when it changes).
        self._nodes_read: tuple[float, list[dict[str, Any]]] | None = None
        self._holds: dict[str, str] = {}
        self._nodes_client: Any = None

    MIN_LEASE = 30.0  # s: the shortest lease of a certificate's lock

    @property
    def lease(self) -> float:
        """Lease of a certificate's lock (s); renewed from a thread while the order runs."""
        return max(self.MIN_LEASE, self.config.acme.timeout * 2)

    @property
    def lock_wait(self) -> float:
        """How long a run waits for the lock of a certificate another process holds (s).

        Alone: 2 s (a cron run next to the daemon reports it busy). In a fleet,
        the other nodes wait for the holder's result (watching the lock in the
        store, never asking the CA) for as long as an order may take plus one
        lease: a holder that died is taken over when its lease ends."""
        if self.config.fleet is None:
            return 2.0
        return self.lease + self.config.acme.timeout

    # -- the in-flight order (fleet: a node taking over resumes it) --

    def _load_order(self, cfg: CertificateConfig, basis: OrderBasis) -> OrderProgress | None:
        """The recorded order in flight for `cfg`, if it can be carried on: placed with
        this CA for these names, for the key being ordered for now, and on top of the
        generation that is current now (`basis`). Any other record is stale (its
        certificate was installed and a kill came before the record was cleared, or
        it was finalized for another key): None, and the caller places a new order."""
        try:
            data = json.loads(self.storage.load(layout.order_key(cfg.name)))
        except FileNotFoundError:
            return None
        except ValueError:
            return None
        if data.get("directory") != self.config.acme.directory or sorted(
            data.get("domains") or []
        ) != sorted(cfg.domains):
            return None
        if data.get("key_pin") != basis.key_pin or data.get("base") != basis.base:
            log.info(
                "certificate %s: the order recorded in flight (%s) was placed %s: "
                "placing a new one", cfg.name, data.get("url"),
                "for another key" if data.get("key_pin") != basis.key_pin
                else "before the current certificate was installed",
            )  # fmt: skip
            return None
        try:
            return OrderProgress(
                str(data["url"]), str(data["status"]), data.get("finalize"),
                data.get("certificate"),
            )  # fmt: skip
        except KeyError:
            return None

    def _save_order(
        self, cfg: CertificateConfig, p: OrderProgress, fence: int | None, basis: OrderBasis
    ) -> None:
        """Record where the order stands (we hold the cert lock); errors only logged:
        the order itself goes on, a takeover would then place a new one."""
        record = {
            "url": p.url, "status": p.status, "finalize": p.finalize,
            "certificate": p.certificate, "node": self.node, "fence": fence,
            "directory": self.config.acme.directory, "domains": list(cfg.domains),
            "key_pin": basis.key_pin, "base": basis.base, "updated": self.clock(),
        }  # fmt: skip
        try:
            self.storage.store(layout.order_key(cfg.name), json.dumps(record).encode())
        except OSError as e:
            log.warning("certificate %s: cannot record order %s: %s", cfg.name, p.url, e)

    def _clear_order(self, cfg: CertificateConfig) -> None:
        try:
            self.storage.delete(layout.order_key(cfg.name))
        except OSError as e:
            log.warning("certificate %s: cannot clear the order record: %s", cfg.name, e)

    # -- helpers --

    def _current_cert(self, name: str) -> x509.Certificate | None:
        gen = load_current(self.storage, name)
        return gen.leaf if gen is not None else None

    def _refresh_ari(self, cfg: CertificateConfig, meta: CertMeta | None) -> CertMeta | None:
        """Ask the CA for its renewal window when ours is missing or stale; errors only logged."""
        if meta is None or not meta.installed:
            return meta
        cert = self._current_cert(cfg.name)
        if cert is None:
            return meta
        try:
            ident = ari.cert_id(cert)
        except ValueError:
            return meta
        now = self.clock()
        if meta.ari is not None and meta.ari.cert_id == ident and now < meta.ari.next_check:
            return meta
        try:
            window = self.issuer.renewal_info(cert, meta.ari)
        except (AcmeError, ari.ARIError) as e:
            log.warning("certificate %s: no renewal info from the CA: %s", cfg.name, e)
            return meta
        if window is None:
            return meta
        # The CA's Retry-After decides when to ask again, but at least every check_interval.
        window = replace(
            window, next_check=min(window.next_check, now + self.config.daemon.check_interval)
        )
        try:
            with self.storage.locked(layout.cert_lock(cfg.name), timeout=2.0):
                # state.json is shared with a concurrent run: change only the window,
                # and only if the certificate is still the one it is for.
                if self._current_cert(cfg.name) == cert:
                    update_state(self.storage, cfg.name, lambda s: replace(s, ari=window))
        except LockTimeout:
            log.info("certificate %s: busy; the renewal window is stored next time", cfg.name)
        return replace(meta, ari=window)

    def check_ari(self, name: str) -> tuple[CertMeta | None, float]:
        """Refresh `name`'s renewal window if it is missing or its next check is due
        (the daemon's ARI wake-up). Returns (stored meta, when to check again: UNIX s).
        Errors are logged; the next try is then ARI_ERROR_RETRY s away at most."""
        cfg = self.config.certificate(name)
        meta = self._refresh_ari(cfg, load_meta(self.storage, name))
        now = self.clock()
        retry = now + min(ARI_ERROR_RETRY, self.config.daemon.check_interval)
        if meta is None or not meta.installed or self.issuer.renewal_info_url is None:
            return meta, now + self.config.daemon.check_interval
        if meta.ari is not None and meta.ari.next_check > now:
            cert = self._current_cert(name)
            try:
                if cert is not None and ari.cert_id(cert) == meta.ari.cert_id:
                    return meta, meta.ari.next_check
            except ValueError:
                return meta, now + self.config.daemon.check_interval
        return meta, retry

    def _key_for(self, cfg: CertificateConfig, create: bool) -> keys.PrivateKey:
        fleet_node = self.node if self.config.fleet is not None else None
        return stable_key(cfg, fleet_node, create)

    def _csr_pem(self, cfg: CertificateConfig, key: keys.PrivateKey) -> bytes:
        if cfg.csr is None:
            return keys.csr_pem(keys.build_csr(key, cfg.domains))
        # The CSR file may have changed since the config was checked: check again.
        csr = keys.load_csr(cfg.csr)
        if not keys.same_public_key(csr.public_key(), key):  # type: ignore[arg-type]
            raise keys.CSRError(f"{cfg.csr} was not made from the key {cfg.key}")
        if sorted(keys.csr_domains(csr)) != sorted(cfg.domains):
            raise keys.CSRError(f"names in {cfg.csr} differ from domains")
        return keys.csr_pem(csr)

    def _record_failure(
        self, cfg: CertificateConfig, error: str, retry_at: float | None, *, locked: bool
    ) -> None:
        """Remember a failed attempt in state.json (`locked`: we hold the cert lock)."""

        def change(state: CertState) -> CertState:
            return replace(
                state,
                last_attempt=Attempt(self.clock(), "failed", error),
                retry_not_before=retry_at if retry_at is not None else state.retry_not_before,
            )

        try:
            if locked:
                update_state(self.storage, cfg.name, change)
            else:
                with self.storage.locked(layout.cert_lock(cfg.name), timeout=5.0):
                    update_state(self.storage, cfg.name, change)
        except (OSError, LockTimeout) as e:  # the failure itself is what matters: say it
            log.error("certificate %s: cannot record the failed attempt: %s", cfg.name, e)

    def install(
        self,
        cfg: CertificateConfig,
        checked: CheckedChain,
        lock_token: str | None = None,
        key_path: Path | None = None,
    ) -> CertMeta:
        """Store `checked` as a new generation and switch to it. The caller holds
        `layout.cert_lock(cfg.name)`; with its `lock_token`, the switch is a fenced
        commit (`Storage.commit_fenced`): refused with `FenceRejected`, nothing
        switched, when our lease was lost or a newer holder installed since."""
        st = self.storage
        now = self.clock()
        lock = layout.cert_lock(cfg.name)
        fence = st.fence(lock) if lock_token is not None else None

        def commit(values: dict[str, bytes]) -> None:
            assert lock_token is not None and fence is not None
            st.commit_fenced(lock, lock_token, fence, layout.fence_key(cfg.name), values)

        meta = install_generation(
            st, cfg.name, checked.leaf, checked.chain, now, self.config.acme.directory,
            profile=self.config.acme.profile or None,
            key_path=str(key_path if key_path is not None else cfg.key),
            fence=fence, node=self.node, commit=commit if lock_token is not None else None,
        )  # fmt: skip
        return meta.with_state(self._fresh_state(cfg.name, now))

    def _fresh_state(self, name: str, now: float) -> CertState:
        """state.json after a new certificate of `name` was switched to: the old one's
        ARI window and retry time are void, and no instance serves it yet."""
        return update_state(
            self.storage,
            name,
            lambda s: replace(
                s,
                last_attempt=Attempt(now, "success", None, None),
                retry_not_before=None,
                ari=None,
                replaces_failures=0,
            ),
        )

    # -- one certificate --

    def deploy_instances(self) -> list[str]:
        """The instances a deploy must reach: runtime API names, or "disk" (reload mode)."""
        from agent.deploy import DISK_INSTANCE, parse_instances

        return parse_instances(self.config.haproxy.runtime_api) or [DISK_INSTANCE]

    def _due(
        self,
        cfg: CertificateConfig,
        force: bool,
        refresh_ari: bool,
        started_at: float | None = None,
    ) -> tuple[str | None, str, CertMeta | None]:
        """(what to do: "order", "deploy" or None, why, meta). `force` does not
        apply to a certificate installed at or after `started_at` (UNIX s): a
        concurrent run we waited for renewed it after our run began."""
        meta = load_meta(self.storage, cfg.name)
        if (meta is None or not meta.installed) and self.config.fleet is not None:
            local = self._served_locally(cfg)
            if local is not None:
                serial = format(local.leaf.serial_number, "x")
                return "adopt", f"the fleet store lost it; this node serves serial {serial}", meta
        if refresh_ari:
            meta = self._refresh_ari(cfg, meta)
        now = self.clock()
        when, why = renewal_decision(meta, cfg, now, meta.ari if meta else None)
        hold = self._switch_hold(cfg, meta)
        if hold is not None:
            when, why = renewal_decision(meta, cfg, now, meta.ari if meta else None, True)
        # In a fleet every node has its own key file and the certificate is the
        # fleet's: a node whose key differs refuses to deploy it (agent.fleet_sync)
        # instead of ordering one for its own key, which every other node refuses.
        single = self.config.fleet is None
        current_key = rollover.current_key_path(cfg, meta.keys if meta else None)
        if single and meta is not None and meta.installed and current_key.exists() and meta.key_pin:
            try:
                pin = keys.spki_pin(keys.load_private_key(current_key))
            except keys.StableKeyError:
                pin = meta.key_pin
            if pin != meta.key_pin:
                return "order", "the configured key differs from the certificate's", meta
        renewed_meanwhile = (
            force
            and started_at is not None
            and meta is not None
            and meta.installed_at is not None
            and meta.installed_at >= started_at
        )
        if force and not renewed_meanwhile:
            return "order", "forced", meta
        if when <= now:
            return "order", why, meta
        if self.on_installed is not None:
            missing = undeployed(meta, self.deploy_instances(), layout.deploy_node(self.config))
            if missing:
                return "deploy", f"stored serial {meta.serial if meta else '-'} is not " \
                    f"confirmed served by {', '.join(missing)}", meta  # fmt: skip
        if renewed_meanwhile:
            assert meta is not None and meta.installed_at is not None
            return None, f"renewed by a concurrent run at {_fmt_time(meta.installed_at)}", meta
        held = f"; {hold}" if hold is not None else ""
        return None, f"next renewal at {_fmt_time(when)} ({why}){held}", meta

    def _served_locally(self, cfg: CertificateConfig) -> CheckedChain | None:
        """The certificate this node's HAProxy bundle (`<cert_dir>/NAME.pem`) holds,
        if it passes every check an issued one must (our key, the names, a chain
        to a trusted root, not expired); None otherwise. Used to rebuild a fleet
        store that lost its data (Redis restarted empty) without ordering again."""
        path = layout.bundle_path(Path(self.config.haproxy.cert_dir), cfg.name)
        try:
            pem = path.read_bytes()
            key = keys.load_private_key(cfg.key)
            return check_certificate(
                pem, key, cfg.domains, cfg.backup_pins, self.clock(),
                policy=policy_for(self.config.acme, cfg), name=cfg.name,
            )  # fmt: skip
        except (OSError, keys.StableKeyError, CertificateRejected) as e:
            log.debug("certificate %s: %s not usable to rebuild the store: %s", cfg.name, path, e)
            return None

    def _adopt(self, cfg: CertificateConfig, why: str, token: str) -> RenewResult:
        """Install the certificate this node serves as the stored one (we hold the lock)."""
        local = self._served_locally(cfg)
        if local is None:
            return RenewResult(cfg.name, "not-due", "nothing to rebuild the store from")
        try:
            meta = self.install(cfg, local, token)
        except LockLost as e:
            return self._refused(cfg, local, e)
        log.warning("certificate %s: %s: stored it again, no order placed", cfg.name, why)
        if self.on_installed is not None:
            self._deploy(cfg.name, meta.serial)
        return RenewResult(cfg.name, "deployed", why, meta.serial, meta.not_after)

    def _refused(self, cfg: CertificateConfig, checked: CheckedChain, e: LockLost) -> RenewResult:
        serial = format(checked.leaf.serial_number, "x")
        msg = (
            f"certificate {cfg.name}: node {self.node} did not install serial {serial}: {e} "
            "(its lock lease ran out while it worked; another node holds it or installed since)"
        )
        log.error("%s", msg)
        kind = "fence" if isinstance(e, FenceRejected) else "lock"
        return RenewResult(cfg.name, "failed", msg, error_type=kind)

    def _renew_one(self, cfg: CertificateConfig, force: bool, started_at: float) -> RenewResult:
        hold = ratelimit.active_hold(self.storage, self.config.acme.directory, self.clock())
        if hold is not None:
            # The CA said stop: ordering more before its time only digs the hole deeper.
            return self._held(cfg, hold)
        lock = layout.cert_lock(cfg.name)
        try:
            try:
                held = self.storage.locked(lock, timeout=2.0, expires_after=self.lease)
                token = held.__enter__()
            except LockTimeout:
                if self.config.fleet is None:
                    return RenewResult(
                        cfg.name, "not-due", "another process is renewing it right now"
                    )
                owner = self.storage.lock_owner(lock)
                log.info(
                    "certificate %s: %s holds its order; waiting for the result",
                    cfg.name, f"{owner.host} pid {owner.pid}" if owner else "another node",
                )  # fmt: skip
                held = self.storage.locked(lock, timeout=self.lock_wait, expires_after=self.lease)
                token = held.__enter__()
        except LockTimeout:
            return RenewResult(cfg.name, "not-due", "another node is still renewing it")
        except StoreUnavailable as e:
            return RenewResult(cfg.name, "skipped", str(e), error_type="store")
        try:
            self._settle_keys(cfg)
            # Re-check under the lock: a concurrent run may have just renewed it.
            # Forced, but a run we waited for installed it after we started:
            # that is what was asked for; it is not ordered a second time.
            action, why, meta = self._due(cfg, force, refresh_ari=False, started_at=started_at)
            if action == "order":
                return self._order_and_install(cfg, why, meta, token)
            if action == "adopt":
                return self._adopt(cfg, why, token)
            if action == "deploy":
                assert meta is not None
                return self._push_stored(cfg, why, meta)
            return RenewResult(
                cfg.name, "not-due", why, meta.serial if meta else None,
                meta.not_after if meta else None,
            )  # fmt: skip
        finally:
            held.__exit__(None, None, None)

    def _deploy(self, name: str, serial: str | None) -> str | None:
        """Run the deploy hook and record the facts; the error text, or None if served.
        Inside `run` with a batching hook: only note `name` (None); `_flush_deploys`
        deploys the noted ones together and corrects their results."""
        assert self.on_installed is not None
        with self._deferred_lock:
            deferred = self._deferred
            if deferred is not None and name in self._deferred_for:
                deferred.append(name)
                return None
        result: object = None
        error: str | None = None
        try:
            result = self.on_installed(name)
        except Exception as e:
            log.exception("certificate %s: deploy failed", name)
            result = getattr(e, "result", None)
            error = str(e) or type(e).__name__
            remove_bundle_temporaries(self.config, [name])
        now = self.clock()
        node = layout.deploy_node(self.config)
        facts = deploy_facts(result, now, node) if result is not None else {}
        try:
            record_deploy(self.storage, name, facts, now, error)
        except OSError as e:
            log.error("certificate %s: cannot record the deploy: %s", name, e)
        return error

    def _push_stored(self, cfg: CertificateConfig, why: str, meta: CertMeta) -> RenewResult:
        log.info("certificate %s: %s: pushing it", cfg.name, why)
        error = self._deploy(cfg.name, meta.serial)
        if error is not None:
            return RenewResult(
                cfg.name, "failed",
                f"{why}; deploying the stored certificate failed: {error}",
                meta.serial, meta.not_after, error_type="deploy",
            )  # fmt: skip
        return RenewResult(cfg.name, "deployed", why, meta.serial, meta.not_after)

    def _order_and_install(
        self, cfg: CertificateConfig, why: str, meta: CertMeta | None, token: str | None = None
    ) -> RenewResult:
        try:
            switch = self._begin_switch(cfg, meta)
        except (keys.StableKeyError, OSError) as e:
            msg = f"key rollover: {type(e).__name__}: {e}"
            self._record_failure(cfg, msg, None, locked=True)
            return RenewResult(cfg.name, "failed", msg, error_type=error_type(e))
        key_path = Path(switch.new.path) if switch else rollover.current_key_path(
            cfg, meta.keys if meta else None)  # fmt: skip
        checked = self._order_checked(cfg, meta, token, switch, key_path)
        if isinstance(checked, RenewResult):
            return checked
        old_leaf = self._current_cert(cfg.name) if switch else None
        try:
            new_meta = self.install(cfg, checked, token, key_path)
        except LockLost as e:
            return self._refused(cfg, checked, e)
        self._clear_order(cfg)
        if switch is not None:
            self._finish_switch(cfg, switch, old_leaf)
        result = self._installed(cfg, why, new_meta)
        if switch is not None and result.status == "renewed":
            self._revoke_pending(cfg)
        return result

    def _order_checked(
        self,
        cfg: CertificateConfig,
        meta: CertMeta | None,
        token: str | None = None,
        switch: rollover.Switch | None = None,
        key_path: Path | None = None,
    ) -> CheckedChain | RenewResult:
        """Order `cfg`'s certificate (with ARI `replaces` for the current leaf) and
        check it: the chain to install, or the failed RenewResult (recorded in
        state.json: the caller holds the cert lock). Installs nothing.
        `key_path`: the key to order for (None: the current key); `switch`: the
        key rollover this order is for (its pins count as announced)."""
        try:
            if key_path is None:
                key_path = rollover.current_key_path(cfg, meta.keys if meta else None)
            key = (self._key_for(cfg, create=True) if key_path == cfg.key
                   else keys.load_private_key(key_path))  # fmt: skip
            csr_pem = self._csr_pem(cfg, key)
            replaces = None
            if meta is not None and meta.installed and self.issuer.renewal_info_url:
                cert = self._current_cert(cfg.name)
                if cert is not None:
                    try:
                        replaces = ari.cert_id(cert)
                    except ValueError:
                        replaces = None
            if replaces is not None and meta is not None and (
                meta.replaces_failures >= REPLACES_MAX_FAILURES
            ):
                log.warning(
                    "certificate %s: ordering without replaces=%s: the CA refused it %d time(s)",
                    cfg.name, replaces, meta.replaces_failures,
                )  # fmt: skip
                replaces = None
            basis = OrderBasis(keys.spki_pin(key), meta.generation if meta else None)
            issued = self._issue(cfg, csr_pem, replaces, token, basis)
            checked = check_certificate(
                issued.fullchain_pem.encode(), key, cfg.domains,
                rollover.announced_pins(cfg, meta.keys if meta else None, switch), self.clock(),
                policy=policy_for(self.config.acme, cfg), name=cfg.name,
            )  # fmt: skip
        except RateLimited as e:
            hold = self._hold(e)
            self._record_failure(cfg, str(e), hold.until if hold else e.retry_after, locked=True)
            return RenewResult(
                cfg.name, "failed", str(e), error_type=error_type(e),
                retry_at=hold.until if hold else e.retry_after,
            )  # fmt: skip
        except (AcmeError, CertificateRejected, keys.StableKeyError, keys.CSRError, OSError) as e:
            msg = f"{type(e).__name__}: {e}" if isinstance(e, OSError) else str(e)
            if not isinstance(e, AcmeUnreachable | AcmeTimeout):
                # That order is over for us: the next run places a new one. Only
                # a crash, or a CA we could not reach or wait for (the order may
                # still complete there), leaves it recorded to be resumed.
                self._clear_order(cfg)
            self._record_failure(cfg, msg, None, locked=True)
            return RenewResult(cfg.name, "failed", msg, error_type=error_type(e))
        try:
            ratelimit.clear_hold(self.storage, self.config.acme.directory)
        except (OSError, LockTimeout) as e:
            log.warning("cannot clear the CA's rate-limit strikes: %s", e)
        return checked

    def _installed(self, cfg: CertificateConfig, why: str, new_meta: CertMeta) -> RenewResult:
        """Log the install of `new_meta`, deploy it (with a hook) and say how it went."""
        serial, not_after = new_meta.serial, new_meta.not_after
        log.info(
            "certificate %s: renewed (%s), serial %s, valid until %s",
            cfg.name, why, serial, _fmt_time(not_after or 0),
        )  # fmt: skip
        if self.on_installed is not None:
            error = self._deploy(cfg.name, serial)
            if error is not None:
                return RenewResult(
                    cfg.name,
                    "failed",
                    f"renewed and stored (serial {serial}) but deploying it failed: {error}",
                    serial,
                    not_after,
                    error_type="deploy",
                )
        return RenewResult(cfg.name, "renewed", why, serial, not_after)

    # -- key rollover (agent/rollover.py; the caller holds the cert lock) --

    def _settle_keys(self, cfg: CertificateConfig) -> None:
        """Finish a switch a kill interrupted, adopt/create the next key, retry a revocation."""
        try:
            rollover.prepare(self.storage, cfg, self.clock(), create=True)
        except (keys.StableKeyError, OSError) as e:
            log.error("certificate %s: key rollover state: %s", cfg.name, e)
        self._revoke_pending(cfg)

    def _begin_switch(
        self, cfg: CertificateConfig, meta: CertMeta | None
    ) -> rollover.Switch | None:
        """The switch this order is for (recorded in state.json), or None (a renewal:
        also while a fleet node lacks the next key, `_switch_hold`)."""
        if self._switch_hold(cfg, meta) is not None:
            return None
        return rollover.begin_switch(self.storage, cfg, meta, self.clock())

    NODES_FRESH = 2.0  # s a run reuses the heartbeats it read

    def _switch_hold(self, cfg: CertificateConfig, meta: CertMeta | None) -> str | None:
        """[fleet] Why `cfg`'s due scheduled key switch waits (`rollover.switch_hold`:
        a live node lacks the next key; or the heartbeats cannot be read), or None.
        A new or changed reason is logged as a warning, the end of a wait as info."""
        fleet = self.config.fleet
        if fleet is None:
            return None
        ks = meta.keys if meta is not None else None
        now = self.clock()
        hold: str | None = None
        # Nothing to wait for without a due scheduled switch (an emergency or a
        # begun switch never waits; another node may have switched meanwhile).
        if rollover.gated_target(cfg, ks, now) is not None:
            import redis

            try:
                nodes = self._fleet_nodes()
            except (redis.RedisError, OSError) as e:  # no switch on a blind guess
                hold = (
                    f"key rollover waits: cannot read the fleet's nodes to check they "
                    f"hold the next key: {e}"
                )
            else:
                hold = rollover.switch_hold(cfg, ks, now, self.node, nodes)
        before = self._holds.get(cfg.name)
        if hold is None:
            if before is not None:
                self._holds.pop(cfg.name, None)
                log.info("certificate %s: its key switch waits for no node now", cfg.name)
        elif hold != before:
            self._holds[cfg.name] = hold
            log.warning("certificate %s: %s", cfg.name, hold)
        return hold

    def switch_waits(self, cfg: CertificateConfig, meta: CertMeta | None) -> bool:
        """Whether `cfg`'s key switch waits for nodes: the last decision held it
        (`_switch_hold`) and, by `meta` (the stored state now), it is still due and
        not begun: a switch another node made since ends the wait here too."""
        if cfg.name not in self._holds:
            return False
        return rollover.gated_target(cfg, meta.keys if meta else None, self.clock()) is not None

    def _fleet_nodes(self) -> list[dict[str, Any]]:
        """The fleet's heartbeats (agent.fleet.list_nodes), read again after NODES_FRESH s."""
        fleet = self.config.fleet
        assert fleet is not None
        read = self._nodes_read
        if read is not None and time.monotonic() - read[0] < self.NODES_FRESH:
            return read[1]
        from agent.fleet import list_nodes, redis_client

        client = getattr(self.storage, "client", None)  # RedisStorage's, else our own
        if client is None:
            client = self._nodes_client = self._nodes_client or redis_client(fleet)
        nodes = list_nodes(client, fleet.namespace)
        self._nodes_read = (time.monotonic(), nodes)
        return nodes

    def _finish_switch(
        self, cfg: CertificateConfig, switch: rollover.Switch, old_leaf: x509.Certificate | None
    ) -> None:
        try:
            rollover.finish(self.storage, cfg, switch, old_leaf, self.clock())
        except (keys.StableKeyError, OSError) as e:
            log.error("certificate %s: after the key switch: %s", cfg.name, e)

    def _retry_revocation(self, cfg: CertificateConfig) -> None:
        """A not-due certificate with a keyCompromise revocation still queued (the
        CA refused or was away when its key was switched): try it now, under the
        cert lock (held elsewhere: that run retries it). Orders nothing."""
        try:
            with self.storage.locked(layout.cert_lock(cfg.name), timeout=2.0,
                                     expires_after=self.lease):  # fmt: skip
                self._revoke_pending(cfg)
        except LockTimeout:
            log.info("certificate %s: revocation retry left to the run holding its lock",
                     cfg.name)  # fmt: skip
        except (OSError, StoreUnavailable) as e:
            log.error("certificate %s: revocation retry: %s", cfg.name, e)

    def _revoke_pending(self, cfg: CertificateConfig) -> None:
        revoke = getattr(self.issuer, "revoke_with_key", None)
        if revoke is not None:
            rollover.revoke_pending(self.storage, cfg, revoke)

    def _issue(
        self, cfg: CertificateConfig, csr_pem: bytes, replaces: str | None,
        token: str | None = None, basis: OrderBasis | None = None,
    ) -> IssuedCertificate:  # fmt: skip
        """One order; a newOrder carrying `replaces` that the CA refuses (after the
        issuer's retries) is counted in state.json (we hold the cert lock) and
        ordered again without it, once. With an issuer that resumes orders, the
        order in flight is recorded in storage (`layout.order_key`) as it moves
        on, and one recorded by a holder that died is resumed instead of placing
        a new one, if it was placed on `basis` (the key ordered for, the generation
        it replaces): see `_load_order`."""
        extra: dict[str, Any] = {}
        if getattr(self.issuer, "resumes_orders", False) and token is not None and basis:
            fence = self.storage.fence(layout.cert_lock(cfg.name))
            resume = self._load_order(cfg, basis)
            if resume is not None:
                log.info(
                    "certificate %s: an order is recorded in flight (%s, %s): resuming it",
                    cfg.name, resume.url, resume.status,
                )  # fmt: skip
            extra = {
                "resume": resume,
                "progress": lambda p: self._save_order(cfg, p, fence, basis),
            }
        if replaces is not None and not extra.get("resume"):
            log.info("certificate %s: ordering as the replacement of %s (ARI replaces)",
                     cfg.name, replaces)  # fmt: skip
        try:
            return self.issuer.issue(
                csr_pem, cfg.domains, replaces=replaces, challenge=cfg.challenge,
                cert_name=cfg.name, **extra,
            )  # fmt: skip
        except ReplacesRefused as e:
            log.warning(
                "certificate %s: the CA refused an order with replaces=%s (%s); "
                "ordering without it", cfg.name, replaces, e,
            )  # fmt: skip
            try:
                update_state(
                    self.storage, cfg.name,
                    lambda s: replace(s, replaces_failures=s.replaces_failures + 1),
                )  # fmt: skip
            except OSError as err:
                log.error("certificate %s: cannot record the refusal: %s", cfg.name, err)
            extra.pop("resume", None)
            return self.issuer.issue(
                csr_pem, cfg.domains, replaces=None, challenge=cfg.challenge, cert_name=cfg.name,
                **extra,
            )  # fmt: skip

    @staticmethod
    def _held(cfg: CertificateConfig, hold: ratelimit.Hold) -> RenewResult:
        msg = f"not attempted: the CA holds new orders until {_fmt_time(hold.until)} " \
            f"({hold.reason})"  # fmt: skip
        return RenewResult(cfg.name, "failed", msg, error_type="rateLimited", retry_at=hold.until)

    def _hold(self, e: RateLimited) -> ratelimit.Hold | None:
        """Put the CA on hold after its rateLimited answer `e` (persisted)."""
        try:
            hold = ratelimit.set_hold(
                self.storage, self.config.acme.directory, e.retry_after, str(e), self.clock()
            )
        except (OSError, LockTimeout) as err:
            log.error("cannot record the CA's rate limit: %s", err)
            return None
        log.warning(
            "CA %s rate-limited us: no new order before %s",
            self.config.acme.directory, _fmt_time(hold.until),
        )  # fmt: skip
        return hold

    def rebuild_if_emptied(self) -> list[RenewResult]:
        """Fleet: when the store lost its data (`layout.FLEET_MARKER` is missing:
        Redis restarted empty), store again every certificate this node serves
        and the store lacks (`_served_locally`, under its lock, fenced), then
        put the marker back. No CA is contacted. Empty list alone or when
        nothing was lost."""
        if self.config.fleet is None or self.storage.exists(layout.FLEET_MARKER):
            return []
        results = []
        for cfg in self.config.certificates:
            action, _, _ = self._due(cfg, False, refresh_ari=False)
            if action == "adopt":
                results.append(self._renew_one(cfg, False, self.clock()))
        self.storage.store(layout.FLEET_MARKER, self.node.encode())
        return results

    # -- the run --

    def run(
        self,
        names: Sequence[str] | None,
        force: bool,
        dry_run: bool,
        started_at: float | None = None,
    ) -> list[RenewResult]:
        """Renew the due (or all, with force) certificates among `names` (None: all),
        and push stored certificates HAProxy is not confirmed to serve.

        `started_at` (UNIX s, default now) is when the caller's run began: a
        forced certificate installed by a concurrent run after it (one this run
        waited for) is not ordered again.
        """
        started = self.clock() if started_at is None else started_at
        certs = self.config.certificates
        if names:
            # A dual certificate's name (or one of its keys' names) means all its keys.
            wanted = set(self.config.expand_names(names))
            certs = tuple(c for c in certs if c.name in wanted)
        results: dict[str, RenewResult] = {}
        due: list[CertificateConfig] = []
        pushes: list[CertificateConfig] = []
        try:
            self.storage.check_available()
        except StoreUnavailable as e:
            # No lock can be taken: nothing starts, and this is not the
            # certificates' failure (they are served as they are).
            log.warning("renewals skipped: %s", e)
            return [RenewResult(c.name, "skipped", str(e), error_type="store") for c in certs]
        for cfg in certs:
            try:
                action, why, meta = self._due(
                    cfg, force, refresh_ari=not dry_run, started_at=started
                )
            except StoreUnavailable as e:  # went away since the check above
                results[cfg.name] = RenewResult(cfg.name, "skipped", str(e), error_type="store")
                continue
            serial, not_after = (meta.serial, meta.not_after) if meta else (None, None)
            if action is None:
                results[cfg.name] = RenewResult(cfg.name, "not-due", why, serial, not_after)
                if not dry_run and meta is not None and meta.keys and meta.keys.revoke:
                    self._retry_revocation(cfg)
            elif dry_run:
                verb = "would renew" if action == "order" else "would deploy the stored certificate"
                results[cfg.name] = RenewResult(
                    cfg.name, "dry-run", f"{verb}: {why}", serial, not_after
                )
            elif action in ("deploy", "adopt"):
                pushes.append(cfg)
            else:
                due.append(cfg)
        # A dual certificate's keys are ordered together when one of them is due
        # (agent.pairs): its other keys join the orders.
        due, pushes = pairs.order_together(certs, due, pushes, results, dry_run)
        # Pushing what is stored needs no CA and no challenges: do it first.
        results.update(self._run_batched(pushes, force, started))
        if due:
            # The CA holds new orders: say so without contacting it at all.
            hold = ratelimit.active_hold(self.storage, self.config.acme.directory, self.clock())
            if hold is not None:
                for cfg in due:
                    results[cfg.name] = self._held(cfg, hold)
                due = []
        if due:
            try:
                self.issuer.connect()
            except AcmeError as e:
                for cfg in due:
                    self._record_failure(
                        cfg, str(e), getattr(e, "retry_after", None), locked=False
                    )
                    results[cfg.name] = RenewResult(cfg.name, "failed", str(e))
                due = []
        if due:
            try:
                with self.serve_challenges() if self.serve_challenges else nullcontext():
                    results.update(self._run_batched(due, force, started))
            except OSError as e:
                # The challenge server could not start (port taken by a running daemon?).
                for cfg in due:
                    msg = f"cannot answer challenges: {e}"
                    self._record_failure(cfg, msg, None, locked=False)
                    results[cfg.name] = RenewResult(cfg.name, "failed", msg)
        return [results[c.name] for c in certs]

    def _run_batched(
        self, due: list[CertificateConfig], force: bool, started: float
    ) -> dict[str, RenewResult]:
        """`_run_parallel`, with the deploys of what it installed or pushes made
        afterwards as ONE batch when the hook can (`deploy_many(names)`, e.g.
        `agent.deploy.RenewalDeployHook`): one runtime-API session per
        instance instead of one per certificate."""
        deploy_many = getattr(self.on_installed, "deploy_many", None)
        if deploy_many is None or len(due) < 2:
            return self._run_parallel(due, force, started)
        with self._deferred_lock:
            busy = self._deferred is not None  # another batched run of this renewer
            if not busy:
                self._deferred, self._deferred_for = [], {c.name for c in due}
        if busy:  # its deploys go at once, as without batching
            return self._run_parallel(due, force, started)
        try:
            results = self._run_parallel(due, force, started)
        finally:
            with self._deferred_lock:
                noted, self._deferred, self._deferred_for = self._deferred or [], None, set()
        if noted:
            self._flush_deploys(deploy_many, noted, results)
        return results

    def _flush_deploys(
        self,
        deploy_many: Callable[[list[str]], Mapping[str, object]],
        names: list[str],
        results: dict[str, RenewResult],
    ) -> None:
        """Deploy `names` in one batch, record each one's facts (under its lock,
        as `_deploy` does) and turn the result of each that failed into the
        failure `_deploy` would have given."""
        try:
            outcomes = deploy_many(names)
        except Exception as e:  # the whole batch failed: every certificate did
            log.exception("deploying %d certificates failed", len(names))
            outcomes = dict.fromkeys(names, e)
        for name in names:
            outcome = outcomes.get(name)
            error: str | None = None
            result: object = outcome
            if isinstance(outcome, Exception) or outcome is None:
                error = (str(outcome) or type(outcome).__name__) if outcome else "not deployed"
                result = getattr(outcome, "result", None)
                log.error("certificate %s: deploy failed: %s", name, error)
                remove_bundle_temporaries(self.config, [name])
            now = self.clock()
            facts = (
                deploy_facts(result, now, layout.deploy_node(self.config))
                if result is not None
                else {}
            )
            try:
                with self.storage.locked(layout.cert_lock(name), timeout=5.0):
                    record_deploy(self.storage, name, facts, now, error)
            except (OSError, LockTimeout) as e:
                log.error("certificate %s: cannot record the deploy: %s", name, e)
            r = results.get(name)
            if error is None or r is None:
                continue
            if r.status == "deployed":
                reason = f"{r.reason}; deploying the stored certificate failed: {error}"
            elif r.status == "renewed":
                reason = f"renewed and stored (serial {r.serial}) but deploying it failed: {error}"
            else:
                continue
            results[name] = RenewResult(
                name, "failed", reason, r.serial, r.not_after, error_type="deploy"
            )

    def _run_parallel(
        self, due: list[CertificateConfig], force: bool, started: float
    ) -> dict[str, RenewResult]:
        results: dict[str, RenewResult] = {}
        if not due:
            return results
        # One unit per certificate; a dual certificate's keys are one unit (agent.pairs).
        units = pairs.units(due)
        workers = max(1, min(self.config.acme.max_concurrent_orders, len(units)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="order") as pool:
            futures = {
                unit: pool.submit(self._renew_unit, unit, force, started) for unit in units
            }
            for unit, fut in futures.items():
                try:
                    results.update(fut.result())
                except StoreUnavailable as e:  # the fleet store went away mid-run
                    for cfg in unit:
                        results[cfg.name] = RenewResult(
                            cfg.name, "skipped", str(e), error_type="store"
                        )
                except Exception as e:  # a bug must not hide the other results
                    for cfg in unit:
                        log.exception("certificate %s: renewal crashed", cfg.name)
                        results[cfg.name] = RenewResult(
                            cfg.name, "failed", f"internal error: {e!r}"
                        )
        return results

    def _renew_unit(
        self, unit: tuple[CertificateConfig, ...], force: bool, started: float
    ) -> dict[str, RenewResult]:
        if len(unit) == 1 and unit[0].group is None:
            return {unit[0].name: self._renew_one(unit[0], force, started)}
        return pairs.renew_pair(self, unit, force, started)


def deploy_facts(result: object, now: float, node: str | None = None) -> dict[str, Deployed]:
    """Per-instance facts from an `agent.deploy.DeployResult` (duck-typed: `ok`,
    `serial`, `errors`, `instances` with `instance`, `action`, `served_serial`,
    `error`). An instance updated or added serves the new serial; one rolled
    back serves what the rollback reports; one that failed or was unreachable
    is unknown (serial None); "not touched" tells nothing (left out). Without
    any runtime API (no instances), an ok deploy means the file on disk holds
    it ("disk"). `node`: in a fleet, the keys are `layout.deployed_key(node, ...)`."""
    from agent.deploy import DISK_INSTANCE

    facts: dict[str, Deployed] = {}
    instances = list(getattr(result, "instances", []))
    serial = getattr(result, "serial", None)
    errors = list(getattr(result, "errors", []))
    for inst in instances:
        served = inst.served_serial
        if inst.action in ("updated", "added"):
            served = served if served is not None else serial
            facts[inst.instance] = Deployed(None if served is None else f"{served:x}", now)
        elif inst.action == "rolled back":
            facts[inst.instance] = Deployed(
                None if served is None else f"{served:x}", now, errors[0] if errors else None
            )
        elif inst.action != "not touched":
            facts[inst.instance] = Deployed(None, now, inst.error or "failed")
    if not instances:
        if getattr(result, "ok", False) and serial is not None:
            facts[DISK_INSTANCE] = Deployed(f"{serial:x}", now)
        else:
            facts[DISK_INSTANCE] = Deployed(None, now, errors[0] if errors else "not deployed")
    if node is not None:
        return {layout.deployed_key(node, k): v for k, v in facts.items()}
    return facts


def record_deploy(
    storage: Storage,
    name: str,
    facts: Mapping[str, Deployed],
    now: float,
    error: str | None,
    *,
    attempt: bool = True,
) -> CertState:
    """Write deploy facts (and, with `attempt`, the attempt's outcome) to state.json.

    The caller holds `layout.cert_lock(name)`. `error` None means the deploy
    was confirmed everywhere. This is what every deploy path must call after
    a deploy, rollback or reconcile push (`record_sync` for the reconciler).
    """

    def change(state: CertState) -> CertState:
        deployed = {**state.deployed, **facts}
        if not attempt:
            return replace(state, deployed=deployed)
        la = state.last_attempt
        if error is None:
            last = Attempt(now, "success", None, True)
        else:
            last = Attempt(now, "failed", f"deploying it failed: {error}", False)
        if la is not None and la.result == "failed" and la.deployed is None and error is None:
            last = la  # a deploy-only push does not hide an order that failed
        return replace(state, deployed=deployed, last_attempt=last)

    return update_state(storage, name, change)


def record_sync(
    storage: Storage, statuses: Iterable[Any], now: float, node: str | None = None
) -> list[str]:
    """Record what the reconciler saw (`agent.deploy.SyncStatus`: name, instance,
    served_serial, error): per certificate under its lock; a certificate whose
    lock stays busy for 0.5 s (a renewal runs) is skipped, that renewal records
    its own. Returns the names whose facts changed. `node`: see
    `layout.deployed_key`. `record_sync_batch` first (a few storage rounds for
    all of them), then one lock wait per certificate still busy."""
    changed, busy = record_sync_batch(storage, statuses, now, node)
    names = list(changed)
    for name, facts in busy.items():
        try:
            with storage.locked(layout.cert_lock(name), timeout=0.5):
                record_deploy(storage, name, facts, now, None, attempt=False)
        except LockTimeout:
            continue
        except OSError as e:
            log.warning("certificate %s: cannot record what HAProxy serves: %s", name, e)
            continue
        names.append(name)
    return names


RECORD_LEASE = 30.0  # s: the lease of the locks a batch of deploy facts is written under


def record_sync_batch(
    storage: Storage, statuses: Iterable[Any], now: float, node: str | None = None
) -> tuple[dict[str, CertMeta], dict[str, dict[str, Deployed]]]:
    """`record_sync` without waiting, in a fixed number of storage rounds however
    many certificates: their metas (`load_metas`); for those whose facts changed,
    their locks taken together (`Storage.try_lock_many`), their state.json read
    and written together (`load_many`, `store_many`) and the locks released
    together. Returns (name -> the meta as now recorded, for every certificate
    written; name -> facts NOT written because its lock was busy or the batch
    took longer than half its lease, for the caller to retry). A storage error
    (Redis away) is logged and every changed certificate comes back as not
    written."""
    by_name: dict[str, dict[str, Deployed]] = {}
    for s in statuses:
        served = s.served_serial
        by_name.setdefault(s.name, {})[layout.deployed_key(node, s.instance)] = Deployed(
            None if served is None else f"{served:x}", now, s.error
        )
    if not by_name:
        return {}, {}
    try:
        known = load_metas(storage, by_name)
    except OSError as e:
        log.warning("cannot record what HAProxy serves: %s", e)
        return {}, by_name
    todo: dict[str, dict[str, Deployed]] = {}
    for name, facts in by_name.items():
        meta = known.get(name)
        if meta is not None and all(
            meta.deployed.get(inst) is not None
            and (meta.deployed[inst].serial, meta.deployed[inst].error) == (f.serial, f.error)
            for inst, f in facts.items()
        ):
            continue  # nothing new: no write (a full pass covers every certificate)
        todo[name] = facts
    if not todo:
        return {}, {}
    locks = {layout.cert_lock(n): n for n in todo}
    started = time.monotonic()
    try:
        held = storage.try_lock_many(locks, expires_after=RECORD_LEASE)
    except OSError as e:
        log.warning("cannot record what HAProxy serves: %s", e)
        return {}, todo
    mine = {locks[lock]: token for lock, token in held.items()}
    busy = {n: f for n, f in todo.items() if n not in mine}
    written: dict[str, CertMeta] = {}
    try:
        # state.json read again under the locks: what `known` held may have changed.
        raw = storage.load_many([layout.state_key(n) for n in mine])
        values: dict[str, bytes] = {}
        metas: dict[str, CertMeta] = {}
        for name in mine:
            state = parse_state(name, raw.get(layout.state_key(name)))
            state = replace(state, deployed={**state.deployed, **todo[name]})
            values[layout.state_key(name)] = state_bytes(name, state)
            meta = known.get(name) or CertMeta(name=name)
            metas[name] = meta.with_state(state)
        if time.monotonic() - started < RECORD_LEASE / 2:
            storage.store_many(values)
            written = metas
        else:  # our leases may be running out: nothing written, the caller retries
            busy.update({n: todo[n] for n in mine})
    except OSError as e:
        log.warning("cannot record what HAProxy serves: %s", e)
        busy.update({n: todo[n] for n in mine})
    finally:
        try:
            lost = storage.unlock_many({lock: mine[n] for lock, n in locks.items() if n in mine})
        except OSError as e:  # the leases end them by themselves
            log.warning("cannot release the locks of the deploy facts now: %s", e)
        else:
            for lock in lost:
                log.error("lock %r was taken over before we released it", lock)
    return written, busy


def node_bundle(
    cfg: CertificateConfig, fullchain_pem: bytes, key_path: str | None = None
) -> bytes:
    """The HAProxy bundle of `cfg` on this node: the stored full chain, this
    node's key file and the DH parameters (`make_bundle`). `key_path`: the key
    the generation was ordered for (`CertMeta.key_path`; None: the configured
    key). Raises OSError / `keys.StableKeyError` naming the file when the key
    cannot be read."""
    path = rollover.served_key_path(cfg, key_path)
    raw = path.read_bytes()
    key_pem = raw if b"-----BEGIN" in raw else keys.private_key_pem(keys.load_private_key(path))
    dh = Path(cfg.dhparam).read_bytes() if cfg.dhparam else None
    return make_bundle(fullchain_pem, key_pem, dh)


def remove_bundle_temporaries(config: Config, names: Iterable[str] | None = None) -> int:
    """Remove our `atomic_write` temp files next to the bundles in `cert_dir`
    (".NAME.pem.XXXX.tmp", holding key + certificate, left by a kill or a
    failed write). Returns how many. `names` None (at start, nothing else
    deploys): every configured certificate's, and the crt-list file's next to
    it (wherever it lives; under the crt-list's own lock, which every edit of
    it holds, so a concurrent `renew` editing it keeps its temp file); else
    only those certificates' (after their failed deploy: a concurrent deploy
    of another certificate may be writing its own right now)."""
    cert_dir = Path(config.haproxy.cert_dir)
    wanted = [c.name for c in config.certificates] if names is None else list(names)
    removed = _remove_temporaries(
        cert_dir, lambda: {layout.bundle_path(cert_dir, n).name for n in wanted}
    )
    crt_list = config.haproxy.crt_list
    if names is None and crt_list is not None and not Path(crt_list).is_dir():
        from agent.crtlist import CrtListFile

        try:
            with CrtListFile(Path(crt_list)).locked():
                removed += _remove_temporaries(Path(crt_list).parent, lambda: {Path(crt_list).name})
        except (OSError, TimeoutError) as e:
            log.warning("cannot clean temp files next to %s: %s", crt_list, e)
    return removed


def _remove_temporaries(directory: Path, targets: Callable[[], set[str]]) -> int:
    """Remove the temp files in `directory` of the files named `targets()`
    (called only when there are temp files: it may name 10,000 bundles)."""
    removed = 0
    try:
        # Names only: cert_dir holds 10,000 bundles, and only dot-files are temp files.
        names = [n for n in os.listdir(directory) if n[0] == "." and n.endswith(".tmp")]
    except OSError:
        return 0
    wanted = targets() if names else set()
    for n in names:
        if layout.temp_target(n) in wanted:
            try:
                (directory / n).unlink()
            except FileNotFoundError:
                continue
            removed += 1
    if removed:
        log.info("removed %d leftover temp files in %s", removed, directory)
    return removed


def _has_state(config: Config) -> bool:
    """Whether there may be stored state to read: always in a fleet (it is in
    Redis), else once the state dir exists (reading never creates it)."""
    return config.fleet is not None or config.state_dir.is_dir()


def prepare_state(config: Config, storage: Storage | None = None, *, bundles: bool = True,
                  lock_timeout: float = 5.0) -> Storage:  # fmt: skip
    """The start-up step of `run`, `renew` and `status`: repair the stored state
    (`agent.certstate.repair`) and, with `bundles`, remove our temp files in
    cert_dir. A state dir that does not exist yet is left alone."""
    store = storage if storage is not None else wiring.make_storage(config)
    if _has_state(config):
        repair(
            store, [c.name for c in config.certificates], lock_timeout=lock_timeout,
            pinned=pairs.pinned_generations(config, store),
        )  # fmt: skip
    if bundles:
        remove_bundle_temporaries(config)
    return store


def renew_certificates(
    config: Config,
    names: Sequence[str] | None,
    force: bool,
    dry_run: bool,
    registry: ChallengeRegistry,
    on_installed: Callable[[str], object] | None = None,
    *,
    serve_challenges: Callable[[], AbstractContextManager[object]] | None = None,
    started_at: float | None = None,
    storage: Storage | None = None,
) -> list[RenewResult]:
    """Renew due certificates (all of `names`, or every configured one when None/empty).

    `registry` must be served to HAProxy by an SPOE agent while this runs (the
    CLI runs a SpoaThread). `on_installed(name)` deploys (see `Renewer`): it is
    called after each install, and for each stored certificate some HAProxy
    instance is not confirmed to serve. `started_at`: see `Renewer.run`.
    `dry_run` contacts no CA and writes nothing: it reports what would be
    renewed and why. Raises KeyError for an unknown name.
    `serve_challenges()`, when given, is entered around the orders (only when
    something is due): the CLI passes a SpoaThread factory, so a run with
    nothing to do never binds the SPOE port.
    """
    renewer = Renewer(
        config, registry, storage, on_installed=on_installed, serve_challenges=serve_challenges
    )
    return renewer.run(names, force, dry_run, started_at)


# --- status ----------------------------------------------------------------------------


def certificate_status(
    config: Config, now: float | None = None, storage: Storage | None = None
) -> list[dict[str, Any]]:
    """One dict per configured certificate for `status` (and the daemon).

    Tells "stored" from "served": `serial`/`stored_serial` is the stored
    certificate's; `deployed` maps each instance a deploy must reach
    (runtime API name, or "disk" in reload mode) to what was last confirmed
    there (`serial`, `at`, `error`, `matches`: it is the stored serial);
    `in_sync` is True only when every one of them matches.
    """
    from agent.deploy import DISK_INSTANCE, parse_instances

    now = time.time() if now is None else now
    storage = storage if storage is not None else wiring.make_storage(config)
    instances = parse_instances(config.haproxy.runtime_api) or [DISK_INSTANCE]
    node = layout.deploy_node(config)  # a fleet shares state.json: this node's facts
    rows: list[dict[str, Any]] = []
    hold = (
        ratelimit.active_hold(storage, config.acme.directory, now)
        if _has_state(config)
        else None
    )
    for cfg in config.certificates:
        try:
            meta = load_meta(storage, cfg.name) if _has_state(config) else None
        except OSError:
            meta = None
        try:
            pin: str | None = keys.spki_pin(
                keys.load_private_key(rollover.current_key_path(cfg, meta.keys if meta else None))
            )
        except keys.StableKeyError:
            pin = None
        when = next_renewal_time(meta, cfg, now, meta.ari if meta else None)
        la = meta.last_attempt if meta else None
        serial = meta.serial if meta else None
        deployed: dict[str, dict[str, Any]] = {}
        for inst in instances:
            fact = meta.deployed.get(layout.deployed_key(node, inst)) if meta else None
            deployed[inst] = {
                "serial": fact.serial if fact else None,
                "at": fact.at if fact else None,
                "error": fact.error if fact else None,
                "matches": serial is not None and fact is not None and fact.serial == serial,
            }
        rows.append(
            {
                "name": cfg.name,
                # A dual certificate's key (config `keys`): the config's name and the key's
                # type; None for a single-key certificate.
                "group": cfg.group,
                "key_type": cfg.key_type if cfg.group else None,
                "domains": list(cfg.domains),
                "key_pin": pin,
                "serial": serial,
                "stored_serial": serial,
                "generation": meta.generation if meta else None,
                "not_after": meta.not_after if meta else None,
                "days_left": (
                    round((meta.not_after - now) / 86400, 2)
                    if meta and meta.not_after is not None
                    else None
                ),
                "next_renewal": when,
                "ari_window": (
                    {
                        "start": meta.ari.start,
                        "end": meta.ari.end,
                        "selected": meta.ari.selected,
                        "next_check": meta.ari.next_check,
                    }
                    if meta and meta.ari
                    else None
                ),
                "profile": meta.profile if meta else None,
                "replaces_failures": meta.replaces_failures if meta else 0,
                # The CA's hold on new orders after a rateLimited answer (UNIX s), if running.
                "rate_limited_until": hold.until if hold else None,
                "last_result": la.result if la else None,
                "last_attempt": la.time if la else None,
                "last_error": la.error if la else None,
                "last_deployed": la.deployed if la else None,
                "deployed": deployed,
                "in_sync": serial is not None and all(d["matches"] for d in deployed.values()),
                "key_rollover": rollover.status_row(cfg, meta.keys if meta else None, now,
                                                    meta.key_pin if meta else None),
            }
        )
    return rows
