"""Key rollover for pinned sites: the next key, its announcement, and the switch.

One certificate has, at any time, exactly one *current* key: the key its
current stored generation was ordered for (`CertMeta.key_path`, recorded in
the generation's meta.json). The HAProxy bundle is built from that recorded
path (`served_key_path`), and the generation is switched to by one atomic
pointer store after it is complete, so a bundle always pairs a certificate
with its own key, whenever a process dies. The old key file is never
modified or deleted: after a switch it is listed as *previous* for
`previous_pin_for` seconds.

The rest lives in `KeyState` (state.json's "keys", read-modify-written under
the certificate's lock like all of state.json):

- `next`: the key being announced (path, pin, `announced_at`: the first time
  `pins` showed it or it was exported; set once, never moved later);
- `request`: a switch asked for by `keys rollover` (scheduled or emergency);
- `switch`: a switch under way (written before the order, cleared after the
  install; a kill in between is finished by `settle`, which compares the
  current generation's key pin with the switch's target);
- `previous`: keys retired by a switch; `current`: the key a switch moved to
  (with the configured `key` path at that time: an operator editing `key`
  later takes over again);
- `revoke`: an old leaf to revoke (keyCompromise) once the new one is served.

Policy (`status_of`, pure, injected clock): a switch is *requested* by a
`request` or by config `rollover_at` (once: a switch after it consumes it),
and *allowed* when the next key has been announced for `announce_for`
seconds; an emergency request to a backup key is allowed at once.

Everything here is per certificate and names no key type: a dual (RSA +
ECDSA) certificate is one certificate per key type (`NAME.rsa`,
`NAME.ecdsa`), each with its own next key and `KeyState`; agent/pairs.py
begins, orders and finishes each one's switch under the pair rule. No private
key material is ever stored here: paths and SPKI pins only.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.metrics import KeyView

from agent import keys

log = logging.getLogger(__name__)

SCHEDULED = "scheduled"
EMERGENCY = "emergency"

# haproxy_acme_key_rollover_state values (docs/metrics.md).
STATE_CODES = {"none": 0, "announced": 1, "allowed": 2, "switched": 3}

KEY_COMPROMISE = 1  # RFC 5280 CRLReason keyCompromise


class RolloverError(Exception):
    """A rollover that cannot be asked for or done; the message names the certificate."""


@dataclass(frozen=True)
class KeyRef:
    """A key file known by its path and SPKI pin (never its material)."""

    path: str
    pin: str

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "pin": self.pin}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> KeyRef:
        return cls(str(d["path"]), str(d["pin"]))


@dataclass(frozen=True)
class NextKey:
    """The key being announced. `announced_at`: UNIX s of its first showing (None: not yet)."""

    path: str
    pin: str
    announced_at: float | None = None
    generated: bool = False  # created by the agent (generate_next_key)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "pin": self.pin,
            "announced_at": self.announced_at,
            "generated": self.generated,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> NextKey:
        at = d.get("announced_at")
        return cls(
            str(d["path"]),
            str(d["pin"]),
            None if at is None else float(at),
            bool(d.get("generated")),
        )


@dataclass(frozen=True)
class PreviousKey:
    """A key a switch retired at `retired_at`; pinned until `until` (UNIX s)."""

    path: str
    pin: str
    retired_at: float
    until: float

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "pin": self.pin,
            "retired_at": self.retired_at,
            "until": self.until,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> PreviousKey:
        return cls(str(d["path"]), str(d["pin"]), float(d["retired_at"]), float(d["until"]))


@dataclass(frozen=True)
class Request:
    """A switch asked for at `requested_at`. Emergency: to `to` (a backup key) at once."""

    requested_at: float
    mode: str = SCHEDULED
    to: KeyRef | None = None
    revoke: bool = False
    force_unannounced: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "requested_at": self.requested_at,
            "mode": self.mode,
            "to": self.to.to_json() if self.to else None,
            "revoke": self.revoke,
            "force_unannounced": self.force_unannounced,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Request:
        to = d.get("to")
        return cls(
            float(d["requested_at"]),
            str(d.get("mode") or SCHEDULED),
            KeyRef.from_json(to) if to else None,
            bool(d.get("revoke")),
            bool(d.get("force_unannounced")),
        )


@dataclass(frozen=True)
class Switch:
    """A switch under way from `old` to `new` (started at `started_at`, UNIX s)."""

    old: KeyRef
    new: KeyRef
    started_at: float
    mode: str = SCHEDULED
    revoke: bool = False
    announced_at: float | None = None  # the new key's (carried to `current`)

    def to_json(self) -> dict[str, Any]:
        return {
            "old": self.old.to_json(),
            "new": self.new.to_json(),
            "started_at": self.started_at,
            "mode": self.mode,
            "revoke": self.revoke,
            "announced_at": self.announced_at,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Switch:
        at = d.get("announced_at")
        return cls(
            KeyRef.from_json(d["old"]),
            KeyRef.from_json(d["new"]),
            float(d["started_at"]),
            str(d.get("mode") or SCHEDULED),
            bool(d.get("revoke")),
            None if at is None else float(at),
        )


@dataclass(frozen=True)
class Revoke:
    """An old leaf (PEM, public) to revoke with keyCompromise, signed by the key at `key_path`."""

    serial: str
    cert_pem: str
    key_path: str
    errors: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "serial": self.serial,
            "cert_pem": self.cert_pem,
            "key_path": self.key_path,
            "errors": self.errors,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Revoke:
        return cls(
            str(d["serial"]), str(d["cert_pem"]), str(d["key_path"]), int(d.get("errors") or 0)
        )


@dataclass(frozen=True)
class KeyState:
    """state.json "keys": see the module doc. Times: UNIX s, UTC."""

    next: NextKey | None = None
    request: Request | None = None
    switch: Switch | None = None
    previous: tuple[PreviousKey, ...] = ()
    current: KeyRef | None = None
    current_announced_at: float | None = None
    config_key: str | None = None  # the configured `key` when `current` was switched to
    last_switch_at: float | None = None
    revoke: Revoke | None = None
    warnings: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return {
            "next": self.next.to_json() if self.next else None,
            "request": self.request.to_json() if self.request else None,
            "switch": self.switch.to_json() if self.switch else None,
            "previous": [p.to_json() for p in self.previous],
            "current": self.current.to_json() if self.current else None,
            "current_announced_at": self.current_announced_at,
            "config_key": self.config_key,
            "last_switch_at": self.last_switch_at,
            "revoke": self.revoke.to_json() if self.revoke else None,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> KeyState:
        def opt(k: str, f: Any) -> Any:
            v = d.get(k)
            return f(v) if v else None

        cat = d.get("current_announced_at")
        lsa = d.get("last_switch_at")
        return cls(
            next=opt("next", NextKey.from_json),
            request=opt("request", Request.from_json),
            switch=opt("switch", Switch.from_json),
            previous=tuple(PreviousKey.from_json(p) for p in d.get("previous") or ()),
            current=opt("current", KeyRef.from_json),
            current_announced_at=None if cat is None else float(cat),
            config_key=d.get("config_key"),
            last_switch_at=None if lsa is None else float(lsa),
            revoke=opt("revoke", Revoke.from_json),
        )


# --- which key is which -----------------------------------------------------------------


def current_key_path(cfg: Any, ks: KeyState | None) -> Path:
    """The key new orders (renewals) are made for: the key a switch moved to, as
    long as the configured `key` is still what it was then; else `key`."""
    if ks is not None and ks.current is not None and ks.config_key == str(cfg.key):
        return Path(ks.current.path)
    return Path(cfg.key)


def served_key_path(cfg: Any, generation_key_path: str | None) -> Path:
    """The key file a generation's bundle is built from: the one it was ordered
    for (recorded in its meta.json), or the configured key for generations
    of older versions that recorded none.

    The recorded path is honoured only where this node keeps its keys: the
    configured `key` or `next_key`, or the directory they live in (where
    `generate_next_key` creates next keys). In a fleet the path was recorded
    by the ordering node; a path elsewhere is that node's file, never read
    here: this node builds from its own configured key, and a key that does
    not match the certificate is refused by the deploy (KeyMismatch)."""
    if not generation_key_path:
        return Path(cfg.key)
    recorded = Path(generation_key_path)
    own = [Path(cfg.key)] + ([Path(cfg.next_key)] if getattr(cfg, "next_key", None) else [])
    if recorded in own or recorded.parent in {p.parent for p in own}:
        return recorded
    return Path(cfg.key)


def settle(
    ks: KeyState, current_pin: str | None, now: float, previous_pin_for: float, config_key: str
) -> KeyState:
    """Finish a switch a kill interrupted (pure): when the current generation's
    key pin is the switch's target, the switch happened; record it (`config_key`:
    the configured `key` path). Also drop previous keys whose grace period is over."""
    if ks.switch is not None and current_pin is not None and current_pin == ks.switch.new.pin:
        ks = finish_switch(ks, ks.switch, None, now, previous_pin_for, config_key=config_key)
    kept = tuple(p for p in ks.previous if p.until > now)
    return ks if kept == ks.previous else replace(ks, previous=kept)


def finish_switch(
    ks: KeyState,
    sw: Switch,
    revoke: Revoke | None,
    now: float,
    previous_pin_for: float,
    *,
    config_key: str | None,
) -> KeyState:
    """The state after the generation for `sw.new` became current (pure)."""
    previous = tuple(p for p in ks.previous if p.pin not in (sw.old.pin, sw.new.pin))
    previous += (PreviousKey(sw.old.path, sw.old.pin, now, now + previous_pin_for),)
    nxt = ks.next if ks.next is not None and ks.next.pin != sw.new.pin else None
    return replace(
        ks,
        next=nxt,
        request=None,
        switch=None,
        previous=previous,
        current=sw.new,
        current_announced_at=sw.announced_at,
        config_key=config_key,
        last_switch_at=now,
        revoke=revoke if revoke is not None else ks.revoke,
    )


def announce(ks: KeyState, now: float) -> KeyState:
    """Record that the next key was shown (pins, export) now, if it never was (pure)."""
    if ks.next is None or ks.next.announced_at is not None:
        return ks
    return replace(ks, next=replace(ks.next, announced_at=now))


# --- policy -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RolloverStatus:
    """What `status` and metrics say. `state`: none / announced / allowed /
    switched (see STATE_CODES); `requested`: a switch is asked for; `due`:
    the renewer should order for `target` now; `allowed_at`: UNIX s when
    announce_for is over (None: no announced next key); `why`: one line."""

    state: str
    requested: bool
    due: bool
    allowed_at: float | None
    why: str
    target: KeyRef | None = None
    scheduled_at: float | None = None  # when the switch was asked for (rollover_at or request)


def status_of(cfg: Any, ks: KeyState | None, now: float) -> RolloverStatus:
    """The rollover policy (pure: no I/O, no clock). See the module doc."""
    ks = ks or KeyState()
    if ks.switch is not None:
        sw = ks.switch
        return RolloverStatus(
            "allowed",
            True,
            True,
            None,
            f"switching to {sw.new.path} (pin {sw.new.pin}): in progress",
            sw.new,
            sw.started_at,
        )
    req = ks.request
    if req is not None and req.mode == EMERGENCY and req.to is not None:
        return RolloverStatus(
            "allowed",
            True,
            True,
            req.requested_at,
            f"emergency rollover to {req.to.path} asked for",
            req.to,
            req.requested_at,
        )
    scheduled_at: float | None = None
    if req is not None:
        scheduled_at = req.requested_at
    rat = getattr(cfg, "rollover_at", None)
    if rat is not None and (ks.last_switch_at is None or ks.last_switch_at < rat):
        scheduled_at = rat if scheduled_at is None else min(scheduled_at, rat)
    requested = scheduled_at is not None and scheduled_at <= now
    nxt = ks.next
    if nxt is None:
        why = "no next key (set next_key or generate_next_key)"
        if requested:
            why = "rollover asked for, but " + why
        state = "switched" if _recent_switch(ks, now) else "none"
        return RolloverStatus(state, requested, False, None, why, None, scheduled_at)
    target = KeyRef(nxt.path, nxt.pin)
    if nxt.announced_at is None:
        why = f"next key {nxt.path} not announced yet: run `pins` and publish its pin"
        state = "switched" if _recent_switch(ks, now) else "none"
        return RolloverStatus(state, requested, False, None, why, target, scheduled_at)
    allowed_at = nxt.announced_at + cfg.announce_for
    if now < allowed_at:
        why = (
            f"next key announced at {_fmt(nxt.announced_at)}; a switch is allowed from "
            f"{_fmt(allowed_at)} (announce_for)"
        )
        if requested:
            why = "rollover asked for, waiting: " + why
        elif scheduled_at is not None:
            why += f"; scheduled for {_fmt(scheduled_at)}"
        return RolloverStatus("announced", requested, False, allowed_at, why, target, scheduled_at)
    if requested:
        return RolloverStatus(
            "allowed",
            True,
            True,
            allowed_at,
            f"rollover to the next key {nxt.path} (announced since {_fmt(nxt.announced_at)})",
            target,
            scheduled_at,
        )
    why = f"a switch to {nxt.path} is allowed; not asked for"
    if scheduled_at is not None:
        why = f"a switch to {nxt.path} is allowed; scheduled for {_fmt(scheduled_at)}"
    return RolloverStatus("allowed", False, False, allowed_at, why, target, scheduled_at)


def switch_time(cfg: Any, ks: KeyState | None, now: float) -> float | None:
    """When the renewer must order for the next key (UNIX s; <= now: due), or None. Pure."""
    st = status_of(cfg, ks, now)
    if st.due:
        return now
    if st.target is None or st.allowed_at is None or st.scheduled_at is None:
        return None
    return max(st.allowed_at, st.scheduled_at)


def _recent_switch(ks: KeyState, now: float) -> bool:
    return ks.last_switch_at is not None and any(p.until > now for p in ks.previous)


def _fmt(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


# --- the next key (file I/O) ------------------------------------------------------------


def generated_key_path(cfg: Any, now: float) -> Path:
    """Where generate_next_key creates a fresh key: next_key's path when it
    does not exist yet, else `<dir>/<name>.next-<unix s>.key` beside it."""
    if cfg.next_key is not None and not Path(cfg.next_key).exists():
        return Path(cfg.next_key)
    directory = Path(cfg.next_key or cfg.key).parent
    path = directory / f"{cfg.name}.next-{int(now)}.key"
    n = 0
    while path.exists():  # two switches within a second: rare, but never overwrite
        n += 1
        path = directory / f"{cfg.name}.next-{int(now)}-{n}.key"
    return path


def _pin_of(path: Path) -> str:
    return keys.spki_pin(keys.load_private_key(path))


def ensure_next(
    cfg: Any, ks: KeyState, current_pin: str | None, now: float, create: bool,
    shared: bool = False,
) -> KeyState:  # fmt: skip
    """The state with its next key resolved (reads key files; with `create`
    and generate_next_key, creates one: 0600, never over an existing file).

    An operator's `next_key` is adopted when it is neither the current key
    nor a previous one (a key that was switched away from never comes back
    as "next" by itself). A recorded next key whose file now holds another
    key is dropped (its announcement was for the other key); so is one whose
    file is gone, unless the state is `shared` by a fleet: a node without the
    file only lacks the key (the switch waits for it, `switch_hold`), the fleet's
    announcement stands. Raises StableKeyError naming the file when a key cannot
    be read."""
    known_old = {p.pin for p in ks.previous} | ({current_pin} if current_pin else set())
    if ks.next is not None:
        try:
            pin = _pin_of(Path(ks.next.path))
        except keys.KeyLoadError:
            pin = None
            if shared:
                log.warning(
                    "certificate %s: this node cannot read the next key %s (pin %s) the "
                    "fleet announces: copy that file (0600) here before the switch",
                    cfg.name, ks.next.path, ks.next.pin,
                )  # fmt: skip
                return ks
        if pin != ks.next.pin or pin in known_old:
            log.warning(
                "certificate %s: next key %s changed or is in use; announcing again",
                cfg.name,
                ks.next.path,
            )
            ks = replace(ks, next=None)
    if ks.next is not None:
        return ks
    if cfg.next_key is not None and Path(cfg.next_key).exists():
        pin = _pin_of(Path(cfg.next_key))
        if pin not in known_old:
            return replace(ks, next=NextKey(str(cfg.next_key), pin))
    if cfg.generate_next_key and create:
        path = generated_key_path(cfg, now)
        key = keys.create_key_file(path, _key_type(cfg, current_pin))
        log.info("certificate %s: created next key %s", cfg.name, path)
        return replace(ks, next=NextKey(str(path), keys.spki_pin(key), None, True))
    return ks


_TYPE_NAMES = {
    "RSA 2048": "rsa2048",
    "RSA 3072": "rsa3072",
    "RSA 4096": "rsa4096",
    "ECDSA P-256": "ec256",
    "ECDSA P-384": "ec384",
}


def _key_type(cfg: Any, current_pin: str | None) -> str:
    """The current key's type (a rollover keeps it), else config key_type."""
    try:
        key = keys.load_private_key(Path(cfg.key))
    except keys.StableKeyError:
        return str(cfg.key_type)
    desc = keys.describe_key(key)
    return {
        "RSA 2048": "rsa2048",
        "RSA 3072": "rsa3072",
        "RSA 4096": "rsa4096",
        "ECDSA P-256": "ec256",
        "ECDSA P-384": "ec384",
    }.get(desc, str(cfg.key_type))


def emergency_request(
    cfg: Any,
    to: Path,
    current_pin: str | None,
    now: float,
    *,
    revoke: bool,
    force_unannounced: bool,
) -> tuple[Request, list[str]]:
    """An emergency Request to backup key `to`, checked; (request, warnings).

    Refuses (RolloverError) a key that cannot be read, is the current key, or
    whose pin is not in backup_pins unless `force_unannounced`."""
    try:
        key = keys.load_private_key(to)
    except keys.StableKeyError as e:
        raise RolloverError(f"certificate {cfg.name}: --to: {e}") from None
    pin = keys.spki_pin(key)
    if pin == current_pin:
        raise RolloverError(f"certificate {cfg.name}: --to {to} is the current key")
    warnings: list[str] = []
    if pin not in cfg.backup_pins:
        if not force_unannounced:
            raise RolloverError(
                f"certificate {cfg.name}: --to {to}: its pin {pin} is not in backup_pins: "
                "clients pinning this site would reject it (add it to backup_pins and publish "
                "it first, or pass --force-unannounced)"
            )
        warnings.append(
            f"WARNING: certificate {cfg.name}: switching to {to} whose pin {pin} was NEVER "
            "announced (not in backup_pins): clients that pin this site will refuse it"
        )
    return Request(
        now, EMERGENCY, KeyRef(str(to.resolve()), pin), revoke, force_unannounced
    ), warnings


# --- stored state (callers hold layout.cert_lock(cfg.name)) ------------------------------


def _current_pin(storage: Any, name: str) -> str | None:
    from agent import certstate

    gen_id = certstate.read_current(storage, name)
    if gen_id is None:
        return None
    try:
        return certstate.load_generation_meta(storage, name, gen_id).key_pin
    except (FileNotFoundError, certstate.GenerationError):
        return None


def _change(storage: Any, name: str, change: Callable[[KeyState], KeyState]) -> KeyState:
    """Apply `change(KeyState) -> KeyState` to state.json's "keys" (written only if it changed)."""
    from agent import certstate

    state = certstate.load_state(storage, name)
    old = state.keys or KeyState()
    new = change(old)
    if new != old:
        certstate.save_state(storage, name, replace(state, keys=new))
    return new


def prepare(storage: Any, cfg: Any, now: float, create: bool) -> KeyState:
    """Settle an interrupted switch, drop expired previous keys, resolve the next
    key (creating one with `create` and generate_next_key). Returns the state."""
    current_pin = _current_pin(storage, cfg.name)
    shared = bool(getattr(storage, "shared", False))
    if current_pin is None:
        try:
            current_pin = _pin_of(current_key_path(cfg, None))
        except keys.StableKeyError:
            current_pin = None

    def change(ks: KeyState) -> KeyState:
        ks = settle(ks, current_pin, now, cfg.previous_pin_for, str(cfg.key))
        if cfg.next_key is None and not cfg.generate_next_key and ks.next is None:
            return ks
        return ensure_next(cfg, ks, current_pin, now, create, shared)

    return _change(storage, cfg.name, change)


def record_shown(storage: Any, cfg: Any, now: float) -> KeyState:
    """`pins` (or an export) showed the keys now: resolve the next key (creating it
    with generate_next_key) and record its announcement time if it has none."""
    prepare(storage, cfg, now, create=True)
    return _change(storage, cfg.name, lambda ks: announce(ks, now))


def record_request(storage: Any, cfg: Any, request: Request) -> KeyState:
    """Store a `keys rollover` request (replacing an earlier one that did not start)."""
    return _change(storage, cfg.name, lambda ks: replace(ks, request=request))


def begin_switch(storage: Any, cfg: Any, meta: Any, now: float) -> Switch | None:
    """When a switch is due: record it (state.json, before the order) and return
    it; else None. A switch already recorded (a killed run) is resumed."""
    ks: KeyState | None = meta.keys if meta is not None else None
    if ks is None:
        return None
    st = status_of(cfg, ks, now)
    if not st.due or st.target is None:
        return None
    if ks.switch is not None:
        return ks.switch
    old_path = current_key_path(cfg, ks)
    old_pin = meta.key_pin or _pin_of(old_path)
    req = ks.request
    emergency = req is not None and req.mode == EMERGENCY and req.to is not None
    announced_at = None if emergency or ks.next is None else ks.next.announced_at
    sw = Switch(
        KeyRef(str(old_path), old_pin),
        st.target,
        now,
        EMERGENCY if emergency else SCHEDULED,
        bool(req.revoke) if req is not None else False,
        announced_at,
    )
    _change(storage, cfg.name, lambda k: replace(k, switch=sw))
    log.warning(
        "certificate %s: key rollover (%s) from %s to %s: ordering",
        cfg.name,
        sw.mode,
        sw.old.path,
        sw.new.path,
    )
    return sw


def finish(storage: Any, cfg: Any, sw: Switch, old_leaf: Any, now: float) -> KeyState:
    """After the generation for `sw.new` became current: the old key becomes
    previous, the request is done, a revocation is queued (with `sw.revoke`),
    and with generate_next_key a fresh next key is created."""
    from cryptography.hazmat.primitives import serialization

    revoke = None
    if sw.revoke and old_leaf is not None:
        revoke = Revoke(
            format(old_leaf.serial_number, "x"),
            old_leaf.public_bytes(serialization.Encoding.PEM).decode(),
            sw.old.path,
        )
    ks = _change(
        storage,
        cfg.name,
        lambda k: finish_switch(k, sw, revoke, now, cfg.previous_pin_for, config_key=str(cfg.key)),
    )
    log.warning(
        "certificate %s: now on key %s (pin %s); %s is previous until %s",
        cfg.name,
        sw.new.path,
        sw.new.pin,
        sw.old.path,
        _fmt(now + cfg.previous_pin_for),
    )
    if cfg.generate_next_key or cfg.next_key is not None:
        ks = prepare(storage, cfg, now, create=True)
    return ks


def revoke_pending(storage: Any, cfg: Any, revoke_with_key: Any) -> bool:
    """Revoke a queued old leaf (keyCompromise, signed by its own key through
    `revoke_with_key(cert, key, reason)`); True when none is left queued."""
    from agent import certstate

    ks = certstate.load_state(storage, cfg.name).keys
    if ks is None or ks.revoke is None:
        return True
    rv = ks.revoke
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(rv.cert_pem.encode())
        key = keys.load_private_key(Path(rv.key_path))
        revoke_with_key(cert, key, KEY_COMPROMISE)
    except Exception as e:  # the CA's answer, the network, the key file: retried next run
        if "alreadyRevoked" not in str(e):
            log.error(
                "certificate %s: revoking serial %s (keyCompromise) failed: %s",
                cfg.name,
                rv.serial,
                e,
            )
            _change(
                storage,
                cfg.name,
                lambda k: replace(
                    k, revoke=replace(rv, errors=rv.errors + 1) if k.revoke == rv else k.revoke
                ),
            )
            return False
    log.warning("certificate %s: revoked serial %s (keyCompromise)", cfg.name, rv.serial)
    _change(storage, cfg.name, lambda k: replace(k, revoke=None) if k.revoke == rv else k)
    return True


REVOKE_RETRY_BASE = 60.0  # s after the first failed keyCompromise revocation
REVOKE_RETRY_MAX = 3600.0  # s: a compromised key's certificate is retried at least hourly


def revoke_retry_time(ks: KeyState | None, now: float) -> float | None:
    """When the daemon should try a queued keyCompromise revocation (next) (UNIX s;
    None: none queued). At once when it was never tried (a kill came between
    the switch and the revocation), then 60 s after a failure, doubling with
    each one, at most an hour apart: a certificate whose key is compromised
    must not wait for its next renewal to be revoked."""
    if ks is None or ks.revoke is None:
        return None
    errors = ks.revoke.errors
    if errors <= 0:
        return now
    delay: float = min(REVOKE_RETRY_BASE * 2.0 ** min(errors - 1, 16), REVOKE_RETRY_MAX)
    return now + delay


def announced_pins(cfg: Any, ks: KeyState | None, sw: Switch | None) -> list[str]:
    """The pin set a new leaf is checked against (`check_certificate`'s
    backup_pins): backup_pins plus the announced next key. An emergency switch
    that leaves no other backup is not blocked (it only warns): staying on a
    compromised key is worse."""
    pins = list(cfg.backup_pins)
    if not pins:
        return pins
    nxt = ks.next if ks is not None else None
    if nxt is not None and nxt.announced_at is not None and nxt.pin not in pins:
        pins.append(nxt.pin)
    if sw is not None and sw.mode == EMERGENCY:
        if sw.new.pin not in pins:
            pins.append(sw.new.pin)  # --force-unannounced: warned when asked for
        if not any(p != sw.new.pin for p in pins):
            log.warning(
                "certificate %s: after this emergency switch NO backup pin is left: "
                "add a new backup key to backup_pins and publish it",
                cfg.name,
            )
            return []
    return pins


def status_row(cfg: Any, ks: KeyState | None, now: float, served_pin: str | None) -> dict[str, Any]:
    """The `status` (and metrics) view of a certificate's keys: paths, pins and times only."""
    st = status_of(cfg, ks, now)
    ks = ks or KeyState()
    return {
        "state": st.state,
        "requested": st.requested,
        "due": st.due,
        "allowed_at": st.allowed_at,
        "scheduled_at": st.scheduled_at,
        "why": st.why,
        "current_key": str(current_key_path(cfg, ks)),
        "next_key": ks.next.path if ks.next else None,
        "next_pin": ks.next.pin if ks.next else None,
        "announced_at": ks.next.announced_at if ks.next else None,
        "announce_for": cfg.announce_for,
        "previous": [
            {"path": p.path, "pin": p.pin, "until": p.until} for p in ks.previous if p.until > now
        ],
        "last_switch_at": ks.last_switch_at,
        "revocation_pending": ks.revoke.serial if ks.revoke else None,
        "served_pinned": served_pinned(cfg, ks, served_pin),
    }


def served_pinned(cfg: Any, ks: KeyState | None, served_pin: str | None) -> bool | None:
    """Whether the stored (served) leaf's key was announced: the configured key
    before any switch, a backup pin, or a next key that was announced when the
    switch moved to it. None for a certificate that does not pin (no
    backup_pins, no next key) or has no certificate yet."""
    ks = ks or KeyState()
    pinning = bool(cfg.backup_pins) or cfg.next_key is not None or cfg.generate_next_key
    if served_pin is None or not pinning:
        return None
    if served_pin in cfg.backup_pins:
        return True
    if ks.current is not None and ks.current.pin == served_pin:
        return ks.current_announced_at is not None
    # No switch yet: still on the key the operator configured (and pinned) from the start.
    return ks.current is None


_LABELS: dict[tuple[str, int], str] = {}


def key_label(path: Path) -> str:
    """The key type of the key file at `path` ("ec256", "rsa4096", ...; "unknown"
    when unreadable), cached by path and mtime: a metrics label, no key material."""
    try:
        ident = (str(path), os.stat(path).st_mtime_ns)
    except OSError:
        return "unknown"
    label = _LABELS.get(ident)
    if label is None:
        try:
            key = keys.load_private_key(path)
        except keys.StableKeyError:
            return "unknown"
        label = _TYPE_NAMES.get(keys.describe_key(key), "unknown")
        if len(_LABELS) > 10000:
            _LABELS.clear()
        _LABELS[ident] = label
    return label


_PINS: dict[tuple[str, int, int, int], str] = {}


def file_pin(path: str | Path) -> str | None:
    """The SPKI pin of the key file at `path`, None when it is missing or unreadable;
    cached by path, inode, size and mtime (a heartbeat asks for every next key)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    ident = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    pin = _PINS.get(ident)
    if pin is None:
        try:
            pin = _pin_of(Path(path))
        except keys.StableKeyError:
            return None
        if len(_PINS) > 20000:
            _PINS.clear()
        _PINS[ident] = pin
    return pin


def held_next_keys(certs: Iterable[Any]) -> dict[str, str | None]:
    """{certificate: pin of its configured next_key file on this node, or None when
    this node lacks it} for every certificate with a next_key: what a fleet node's
    heartbeat says it holds, so the node that switches knows the others can serve
    the new certificate (`switch_hold`)."""
    return {c.name: file_pin(c.next_key) for c in certs if c.next_key is not None}


def gated_target(cfg: Any, ks: KeyState | None, now: float) -> KeyRef | None:
    """The next key of a due scheduled switch not begun yet: what a fleet's nodes
    must hold before it goes (`switch_hold`). None for anything else. Pure."""
    if ks is None or ks.switch is not None:
        return None
    if ks.request is not None and ks.request.mode == EMERGENCY:
        return None
    st = status_of(cfg, ks, now)
    return st.target if st.due else None


def switch_hold(
    cfg: Any, ks: KeyState | None, now: float, node: str, nodes: Sequence[Mapping[str, Any]]
) -> str | None:
    """[fleet] Why a due scheduled switch of `cfg` must wait, or None: some node
    does not hold the next key yet. `node` is this node (its next_key file, else
    the target's path, is read here); `nodes` are the fleet's heartbeats
    (agent.fleet.list_nodes): every live node must report that key's pin
    (`held_next_keys`); a node whose agent does not report it counts as lacking
    it. A switch under way and an emergency switch never wait: the nodes without
    the key keep serving what they have."""
    target = gated_target(cfg, ks, now)
    if target is None:
        return None
    own = file_pin(cfg.next_key if cfg.next_key is not None else target.path)
    lacking = [] if own == target.pin else [node]
    for n in nodes:
        name = str(n.get("node"))
        if not n.get("alive") or name == node:
            continue
        held = n.get("next_keys")
        if not isinstance(held, Mapping) or held.get(cfg.name) != target.pin:
            lacking.append(name)
    if not lacking:
        return None
    return (
        f"key rollover waits: node(s) {', '.join(sorted(lacking))} do not hold the next "
        f"key {target.path} (pin {target.pin}); copy that file (0600) to each of them"
    )


def key_view(cfg: Any, meta: Any, now: float) -> KeyView | None:
    """The metrics view (agent.metrics.KeyView) of a certificate that rolls keys
    (next_key, generate_next_key, backup_pins or a stored key state), else None."""
    from agent.metrics import KeyView  # at run time too (agent.metrics imports much)

    ks: KeyState | None = meta.keys if meta is not None else None
    if not (cfg.next_key or cfg.generate_next_key or cfg.backup_pins or ks):
        return None
    st = status_of(cfg, ks, now)
    label = key_label(current_key_path(cfg, ks))
    return KeyView(
        key=label,
        state=STATE_CODES[st.state],
        announced_at=ks.next.announced_at if ks is not None and ks.next else None,
        scheduled_at=st.scheduled_at,
        announce_for=float(cfg.announce_for),
        pinned=served_pinned(cfg, ks, meta.key_pin if meta is not None else None),
    )
