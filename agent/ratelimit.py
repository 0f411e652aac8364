"""Per-CA rate-limit holds: after a `rateLimited` answer, no new order goes to
that CA (keyed by its directory URL) until the CA's Retry-After, or a bounded
backoff when it sent none, and no longer.

The holds live in the state dir (`ratelimits.json`, written atomically under
the `ratelimits` lock), so the daemon and a cron `renew` honour each other's.
A hold that has ended is kept (with its strike count) until an order to that
CA succeeds: a CA that rate-limits again soon after gets a longer backoff.

All times are UNIX seconds, UTC.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from agent.storage import Storage

log = logging.getLogger(__name__)

HOLDS_KEY = "ratelimits.json"
LOCK = "ratelimits"
BACKOFF_FIRST = 60.0  # s: without Retry-After, the first hold; doubled per strike
BACKOFF_MAX = 3600.0
# A Retry-After beyond this is clamped: a typo at the CA must not silence us for months.
MAX_HOLD = 7 * 86400.0


@dataclass(frozen=True)
class Hold:
    """No order to `directory` before `until`. `reason`: the CA's problem text;
    `strikes`: rateLimited answers in a row (reset by a successful order)."""

    directory: str
    until: float
    reason: str
    set_at: float
    strikes: int = 1

    def to_json(self) -> dict[str, Any]:
        return {
            "until": self.until,
            "reason": self.reason,
            "set_at": self.set_at,
            "strikes": self.strikes,
        }

    @classmethod
    def from_json(cls, directory: str, data: dict[str, Any]) -> Hold:
        return cls(
            directory,
            float(data["until"]),
            str(data.get("reason") or ""),
            float(data.get("set_at") or 0.0),
            int(data.get("strikes") or 1),
        )


def load_holds(storage: Storage) -> dict[str, Hold]:
    """Every recorded hold by directory URL (ended ones too); {} when none or unreadable."""
    try:
        raw = json.loads(storage.load(HOLDS_KEY))
        return {str(d): Hold.from_json(str(d), h) for d, h in (raw.get("holds") or {}).items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("%s unreadable, ignoring the rate-limit holds in it: %s", HOLDS_KEY, e)
        return {}


def _save(storage: Storage, holds: dict[str, Hold]) -> None:
    data = {"version": 1, "holds": {d: h.to_json() for d, h in sorted(holds.items())}}
    storage.store(HOLDS_KEY, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def active_hold(storage: Storage, directory: str, now: float) -> Hold | None:
    """The hold on `directory` if it has not ended at `now`."""
    hold = load_holds(storage).get(directory)
    return hold if hold is not None and hold.until > now else None


def set_hold(
    storage: Storage, directory: str, retry_at: float | None, reason: str, now: float
) -> Hold:
    """Record a `rateLimited` answer from `directory`: hold until `retry_at` (the
    CA's Retry-After as a UNIX time), or a backoff doubling per strike from
    BACKOFF_FIRST to BACKOFF_MAX when the CA gave none; never past now + MAX_HOLD.
    A hold already running to a later time is kept (concurrent answers)."""
    with storage.locked(LOCK, timeout=5.0):
        holds = load_holds(storage)
        previous = holds.get(directory)
        strikes = previous.strikes + 1 if previous is not None else 1
        if retry_at is not None:
            until = retry_at
        else:
            until = now + min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** min(strikes - 1, 20))
        until = min(until, now + MAX_HOLD)
        if previous is not None and previous.until > until:
            until = previous.until
        hold = Hold(directory, until, reason, now, strikes)
        holds[directory] = hold
        _save(storage, holds)
    return hold


def clear_hold(storage: Storage, directory: str) -> None:
    """An order to `directory` succeeded: forget its strikes (no write when none)."""
    if directory not in load_holds(storage):
        return
    with storage.locked(LOCK, timeout=5.0):
        holds = load_holds(storage)
        if holds.pop(directory, None) is not None:
            _save(storage, holds)
