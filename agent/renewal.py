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

Storage layout (keys of `agent.storage.Storage`), per certificate NAME:
certificates/NAME/{cert.pem, chain.pem, fullchain.pem, meta.json} (0644) and
certificates/NAME/{bundle.pem, bundle.prev.pem} (fullchain + key [+ dhparam],
the HAProxy bundle, 0600).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from agent import ari, keys
from agent.chain import ChainError, ChainPolicy, policy_for, verify_chain
from agent.challenges import ChallengeRegistry
from agent.config import CertificateConfig, Config
from agent.issuer import (
    AccountError,
    AcmeError,
    AcmeTimeout,
    AcmeUnreachable,
    IssuedCertificate,
    Issuer,
    OrderFailed,
    RateLimited,
    ValidationFailed,
)
from agent.solvers import build_solvers
from agent.storage import FileStorage, LockTimeout, Storage, safe_name

log = logging.getLogger(__name__)

RENEW_FRACTION = 1 / 3  # renew when this fraction of the lifetime is left
EMERGENCY_FRACTION = 1 / 20  # renew regardless of ARI when this fraction is left

CERT_FILES = ("cert.pem", "chain.pem", "fullchain.pem", "bundle.pem", "bundle.prev.pem")


def cert_key(name: str, filename: str) -> str:
    """Storage key of one file of certificate `name`."""
    return f"certificates/{safe_name(name)}/{filename}"


# --- metadata --------------------------------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    """The last renewal attempt: UNIX time, "success" or "failed", and the error text."""

    time: float
    result: str
    error: str | None = None


@dataclass(frozen=True)
class CertMeta:
    """meta.json: what we know about a certificate's installed state. Times: UNIX s, UTC."""

    name: str
    domains: tuple[str, ...] = ()
    serial: str | None = None  # lowercase hex
    not_before: float | None = None
    not_after: float | None = None
    key_pin: str | None = None
    installed_at: float | None = None
    ari: ari.RenewalWindow | None = None
    last_attempt: Attempt | None = None
    retry_not_before: float | None = None  # from a rateLimited Retry-After
    directory: str | None = None

    @property
    def installed(self) -> bool:
        return self.serial is not None and self.not_after is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "version": 1,
            "name": self.name,
            "domains": list(self.domains),
            "serial": self.serial,
            "not_before": self.not_before,
            "not_after": self.not_after,
            "key_pin": self.key_pin,
            "installed_at": self.installed_at,
            "ari": self.ari.to_json() if self.ari else None,
            "last_attempt": (
                {
                    "time": self.last_attempt.time,
                    "result": self.last_attempt.result,
                    "error": self.last_attempt.error,
                }
                if self.last_attempt
                else None
            ),
            "retry_not_before": self.retry_not_before,
            "directory": self.directory,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CertMeta:
        la = data.get("last_attempt")
        return cls(
            name=str(data["name"]),
            domains=tuple(data.get("domains") or ()),
            serial=data.get("serial"),
            not_before=_opt_float(data.get("not_before")),
            not_after=_opt_float(data.get("not_after")),
            key_pin=data.get("key_pin"),
            installed_at=_opt_float(data.get("installed_at")),
            ari=ari.RenewalWindow.from_json(data["ari"]) if data.get("ari") else None,
            last_attempt=(
                Attempt(float(la["time"]), str(la["result"]), la.get("error")) if la else None
            ),
            retry_not_before=_opt_float(data.get("retry_not_before")),
            directory=data.get("directory"),
        )


def _opt_float(v: object) -> float | None:
    return None if v is None else float(v)  # type: ignore[arg-type]


def meta_from_certificate(name: str, cert: x509.Certificate) -> CertMeta:
    """Metadata derived from a certificate alone (when meta.json is missing or damaged)."""
    return CertMeta(
        name=name,
        domains=tuple(keys.cert_domains(cert)),
        serial=format(cert.serial_number, "x"),
        not_before=cert.not_valid_before_utc.timestamp(),
        not_after=cert.not_valid_after_utc.timestamp(),
        key_pin=keys.spki_pin(cert.public_key()),  # type: ignore[arg-type]
    )


def load_meta(storage: Storage, name: str) -> CertMeta | None:
    """The certificate's metadata; rebuilt from cert.pem if meta.json is missing or damaged."""
    try:
        meta = CertMeta.from_json(json.loads(storage.load(cert_key(name, "meta.json"))))
        if meta.name == name:
            return meta
    except FileNotFoundError:
        pass
    except (ValueError, KeyError, TypeError) as e:
        log.warning("certificate %s: meta.json is damaged (%s); using cert.pem", name, e)
    try:
        cert = x509.load_pem_x509_certificate(storage.load(cert_key(name, "cert.pem")))
    except (FileNotFoundError, ValueError):
        return None
    return meta_from_certificate(name, cert)


def save_meta(storage: Storage, meta: CertMeta) -> None:
    data = json.dumps(meta.to_json(), indent=2, sort_keys=True) + "\n"
    storage.store(cert_key(meta.name, "meta.json"), data.encode())


# --- when to renew ---------------------------------------------------------------------


def renewal_decision(
    meta: CertMeta | None,
    cert_cfg: CertificateConfig,
    now: float,
    ari_window: ari.RenewalWindow | None,
) -> tuple[float, str]:
    """(when to renew as UNIX seconds, why). Pure: no I/O, no clock, no randomness."""
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


@dataclass(frozen=True)
class RenewResult:
    """Outcome for one certificate. status: "renewed", "not-due", "failed" or "dry-run"."""

    name: str
    status: str
    reason: str
    serial: str | None = None
    not_after: float | None = None
    # For metrics: what kind of failure ("rateLimited", "connection", "validation", ...).
    error_type: str | None = None

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
    """State of one renewal run over the configured certificates (see renew_certificates)."""

    def __init__(
        self,
        config: Config,
        registry: ChallengeRegistry,
        storage: Storage | None = None,
        issuer: CertificateIssuer | None = None,
        on_installed: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.time,
        serve_challenges: Callable[[], AbstractContextManager[object]] | None = None,
    ) -> None:
        self.config = config
        self.serve_challenges = serve_challenges
        self.registry = registry
        if storage is None:
            # FileStorage creates the (0700) state dir on the first write, so a
            # dry run or a run with nothing due writes nothing at all.
            storage = FileStorage(config.state_dir)
        self.storage = storage
        self.issuer: CertificateIssuer = issuer or Issuer(
            config.acme, storage, registry, solvers=build_solvers(config, storage)
        )
        self.on_installed = on_installed
        self.clock = clock
        self._issuer_lock = threading.Lock()
        self._rate_limited: RateLimited | None = None  # set once the CA rate-limits this run

    # -- helpers --

    def _current_cert(self, name: str) -> x509.Certificate | None:
        try:
            return x509.load_pem_x509_certificate(self.storage.load(cert_key(name, "cert.pem")))
        except (FileNotFoundError, ValueError):
            return None

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
        meta = replace(meta, ari=window)
        save_meta(self.storage, meta)
        return meta

    def _key_for(self, cfg: CertificateConfig, create: bool) -> keys.PrivateKey:
        if cfg.generate_key and create and not cfg.key.exists():
            key = keys.create_key_file(cfg.key, cfg.key_type)
            log.info("certificate %s: created key %s (%s)", cfg.name, cfg.key, cfg.key_type)
            return key
        return keys.load_private_key(cfg.key)

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

    def _key_pem(self, cfg: CertificateConfig, key: keys.PrivateKey) -> bytes:
        raw = Path(cfg.key).read_bytes()
        return raw if b"-----BEGIN" in raw else keys.private_key_pem(key)

    def _record_failure(self, cfg: CertificateConfig, error: str, retry_at: float | None) -> None:
        meta = load_meta(self.storage, cfg.name) or CertMeta(name=cfg.name)
        meta = replace(
            meta,
            last_attempt=Attempt(self.clock(), "failed", error),
            retry_not_before=retry_at if retry_at is not None else meta.retry_not_before,
        )
        try:
            save_meta(self.storage, meta)
        except OSError as e:  # the failure itself is what matters; say it, don't mask it
            log.error("certificate %s: cannot record the failed attempt: %s", cfg.name, e)

    def install(self, cfg: CertificateConfig, checked: CheckedChain, key_pem: bytes) -> CertMeta:
        """Write the new certificate files; keep the previous bundle as bundle.prev.pem."""
        st = self.storage
        dh = Path(cfg.dhparam).read_bytes() if cfg.dhparam else None
        bundle = make_bundle(checked.fullchain_pem, key_pem, dh)
        if st.exists(cert_key(cfg.name, "bundle.pem")):
            st.store(
                cert_key(cfg.name, "bundle.prev.pem"),
                st.load(cert_key(cfg.name, "bundle.pem")),
                secret=True,
            )
        st.store(cert_key(cfg.name, "cert.pem"), checked.cert_pem)
        st.store(cert_key(cfg.name, "chain.pem"), checked.chain_pem)
        st.store(cert_key(cfg.name, "fullchain.pem"), checked.fullchain_pem)
        st.store(cert_key(cfg.name, "bundle.pem"), bundle, secret=True)
        now = self.clock()
        meta = replace(
            meta_from_certificate(cfg.name, checked.leaf),
            installed_at=now,
            last_attempt=Attempt(now, "success"),
            directory=self.config.acme.directory,
        )
        save_meta(st, meta)
        return meta

    # -- one certificate --

    def _due(
        self, cfg: CertificateConfig, force: bool, refresh_ari: bool
    ) -> tuple[bool, str, CertMeta | None]:
        meta = load_meta(self.storage, cfg.name)
        if refresh_ari:
            meta = self._refresh_ari(cfg, meta)
        now = self.clock()
        when, why = renewal_decision(meta, cfg, now, meta.ari if meta else None)
        if meta is not None and meta.installed:
            if not self.storage.exists(cert_key(cfg.name, "bundle.pem")):
                return True, "the HAProxy bundle is missing", meta
            if cfg.key.exists() and meta.key_pin:
                try:
                    pin = keys.spki_pin(keys.load_private_key(cfg.key))
                except keys.StableKeyError:
                    pin = meta.key_pin
                if pin != meta.key_pin:
                    return True, "the configured key differs from the certificate's", meta
        if force:
            return True, "forced", meta
        if when <= now:
            return True, why, meta
        return False, f"next renewal at {_fmt_time(when)} ({why})", meta

    def _renew_one(self, cfg: CertificateConfig, force: bool) -> RenewResult:
        limited = self._rate_limited
        if limited is not None:
            # The CA said stop: ordering more in this run only digs the hole deeper.
            msg = f"not attempted: {limited}"
            return RenewResult(cfg.name, "failed", msg, error_type=error_type(limited))
        lock_name = f"cert-{cfg.name}"
        try:
            self.storage.lock(
                lock_name, timeout=2.0, expires_after=self.config.acme.timeout * 4 + 60
            )
        except LockTimeout:
            return RenewResult(cfg.name, "not-due", "another process is renewing it right now")
        try:
            # Re-check under the lock: a concurrent run may have just renewed it.
            due, why, meta = self._due(cfg, force, refresh_ari=False)
            if not due:
                return RenewResult(
                    cfg.name, "not-due", why, meta.serial if meta else None,
                    meta.not_after if meta else None,
                )  # fmt: skip
            return self._order_and_install(cfg, why, meta)
        finally:
            self.storage.unlock(lock_name)

    def _order_and_install(
        self, cfg: CertificateConfig, why: str, meta: CertMeta | None
    ) -> RenewResult:
        try:
            key = self._key_for(cfg, create=True)
            csr_pem = self._csr_pem(cfg, key)
            key_pem = self._key_pem(cfg, key)
            replaces = None
            if meta is not None and meta.installed and self.issuer.renewal_info_url:
                cert = self._current_cert(cfg.name)
                if cert is not None:
                    try:
                        replaces = ari.cert_id(cert)
                    except ValueError:
                        replaces = None
            issued = self.issuer.issue(
                csr_pem, cfg.domains, replaces=replaces, challenge=cfg.challenge, cert_name=cfg.name
            )
            checked = check_certificate(
                issued.fullchain_pem.encode(), key, cfg.domains, cfg.backup_pins, self.clock(),
                policy=policy_for(self.config.acme, cfg), name=cfg.name,
            )  # fmt: skip
        except RateLimited as e:
            self._rate_limited = e
            self._record_failure(cfg, str(e), e.retry_after)
            return RenewResult(cfg.name, "failed", str(e), error_type=error_type(e))
        except (AcmeError, CertificateRejected, keys.StableKeyError, keys.CSRError, OSError) as e:
            msg = f"{type(e).__name__}: {e}" if isinstance(e, OSError) else str(e)
            self._record_failure(cfg, msg, None)
            return RenewResult(cfg.name, "failed", msg, error_type=error_type(e))
        new_meta = self.install(cfg, checked, key_pem)
        serial, not_after = new_meta.serial, new_meta.not_after
        log.info(
            "certificate %s: renewed (%s), serial %s, valid until %s",
            cfg.name, why, serial, _fmt_time(not_after or 0),
        )  # fmt: skip
        if self.on_installed is not None:
            try:
                self.on_installed(cfg.name)
            except Exception as e:
                log.exception("certificate %s: on_installed hook failed", cfg.name)
                return RenewResult(
                    cfg.name,
                    "failed",
                    f"renewed and stored (serial {serial}) but deploying it failed: {e}",
                    serial,
                    not_after,
                    error_type="deploy",
                )
        return RenewResult(cfg.name, "renewed", why, serial, not_after)

    # -- the run --

    def run(self, names: Sequence[str] | None, force: bool, dry_run: bool) -> list[RenewResult]:
        """Renew the due (or all, with force) certificates among `names` (None: all)."""
        certs = self.config.certificates
        if names:
            unknown = [n for n in names if n not in {c.name for c in certs}]
            if unknown:
                raise KeyError(f"no certificate named {', '.join(map(repr, unknown))}")
            certs = tuple(c for c in certs if c.name in names)
        results: dict[str, RenewResult] = {}
        due: list[tuple[CertificateConfig, str, CertMeta | None]] = []
        for cfg in certs:
            is_due, why, meta = self._due(cfg, force, refresh_ari=not dry_run)
            if not is_due:
                results[cfg.name] = RenewResult(
                    cfg.name, "not-due", why, meta.serial if meta else None,
                    meta.not_after if meta else None,
                )  # fmt: skip
            elif dry_run:
                results[cfg.name] = RenewResult(
                    cfg.name, "dry-run", f"would renew: {why}", meta.serial if meta else None,
                    meta.not_after if meta else None,
                )  # fmt: skip
            else:
                due.append((cfg, why, meta))
        if due:
            try:
                self.issuer.connect()
            except AcmeError as e:
                for cfg, _, _ in due:
                    self._record_failure(cfg, str(e), getattr(e, "retry_after", None))
                    results[cfg.name] = RenewResult(cfg.name, "failed", str(e))
                due = []
        if due:
            try:
                with self.serve_challenges() if self.serve_challenges else nullcontext():
                    results.update(self._run_orders([cfg for cfg, _, _ in due], force))
            except OSError as e:
                # The challenge server could not start (port taken by a running daemon?).
                for cfg, _, _ in due:
                    msg = f"cannot answer challenges: {e}"
                    self._record_failure(cfg, msg, None)
                    results[cfg.name] = RenewResult(cfg.name, "failed", msg)
        return [results[c.name] for c in certs]

    def _run_orders(self, due: list[CertificateConfig], force: bool) -> dict[str, RenewResult]:
        results: dict[str, RenewResult] = {}
        workers = max(1, min(self.config.acme.max_concurrent_orders, len(due)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="order") as pool:
            futures = {cfg.name: pool.submit(self._renew_one, cfg, force) for cfg in due}
            for name, fut in futures.items():
                try:
                    results[name] = fut.result()
                except Exception as e:  # a bug must not hide the other results
                    log.exception("certificate %s: renewal crashed", name)
                    results[name] = RenewResult(name, "failed", f"internal error: {e!r}")
        return results


def renew_certificates(
    config: Config,
    names: Sequence[str] | None,
    force: bool,
    dry_run: bool,
    registry: ChallengeRegistry,
    on_installed: Callable[[str], None] | None = None,
    *,
    serve_challenges: Callable[[], AbstractContextManager[object]] | None = None,
) -> list[RenewResult]:
    """Renew due certificates (all of `names`, or every configured one when None/empty).

    `registry` must be served to HAProxy by an SPOE agent while this runs (the
    CLI runs a SpoaThread). `on_installed(name)` is called after each
    successful install. `dry_run` contacts no CA and writes nothing: it reports
    what would be renewed and why. Raises KeyError for an unknown name.
    `serve_challenges()`, when given, is entered around the orders (only when
    something is due): the CLI passes a SpoaThread factory, so a run with
    nothing to do never binds the SPOE port.
    """
    renewer = Renewer(
        config, registry, on_installed=on_installed, serve_challenges=serve_challenges
    )
    return renewer.run(names, force, dry_run)


# --- status ----------------------------------------------------------------------------


def certificate_status(config: Config, now: float | None = None) -> list[dict[str, Any]]:
    """One dict per configured certificate for `status` (and the daemon): read-only."""
    now = time.time() if now is None else now
    storage = FileStorage(config.state_dir)
    rows: list[dict[str, Any]] = []
    for cfg in config.certificates:
        try:
            meta = load_meta(storage, cfg.name) if config.state_dir.is_dir() else None
        except OSError:
            meta = None
        try:
            pin: str | None = keys.spki_pin(keys.load_private_key(cfg.key))
        except keys.StableKeyError:
            pin = None
        when = next_renewal_time(meta, cfg, now, meta.ari if meta else None)
        la = meta.last_attempt if meta else None
        rows.append(
            {
                "name": cfg.name,
                "domains": list(cfg.domains),
                "key_pin": pin,
                "serial": meta.serial if meta else None,
                "not_after": meta.not_after if meta else None,
                "days_left": (
                    round((meta.not_after - now) / 86400, 2)
                    if meta and meta.not_after is not None
                    else None
                ),
                "next_renewal": when,
                "ari_window": (
                    {"start": meta.ari.start, "end": meta.ari.end} if meta and meta.ari else None
                ),
                "last_result": la.result if la else None,
                "last_attempt": la.time if la else None,
                "last_error": la.error if la else None,
            }
        )
    return rows
