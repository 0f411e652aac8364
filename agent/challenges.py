"""The challenge registry: http-01 tokens the ACME side issued, served by the SPOE agent.

The ACME issuer adds a token before it tells the CA to validate and removes it
when the authorization is done; the SPOA looks tokens up for every
/.well-known/acme-challenge/ request HAProxy forwards. Only tokens in the
registry are ever answered.

`ChallengeRegistry` is the contract a shared backend (Redis, for a fleet of
HAProxy nodes) implements; `MemoryChallengeRegistry` is the single-process one.
"""

from __future__ import annotations

import re
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future
from typing import Self

# RFC 8555 section 8.3: a token is base64url without padding; at least 128 bits
# of entropy (22 chars). We accept the URL-safe alphabet only and cap the length
# so a hostile request can never make us hash or store something large.
TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{1,255}$")
MAX_TOKEN_LENGTH = 255


def valid_token(token: str) -> bool:
    """True when `token` has the shape of an ACME http-01 token."""
    # fullmatch, not match: "$" would also accept a trailing newline.
    return TOKEN_RE.fullmatch(token) is not None


class ChallengeRegistry(ABC):
    """Pending http-01 challenges, keyed by token.

    Contract for implementations:
    - `add` makes the token visible to `lookup` (on every node of a cluster)
      before it returns; adding an existing token replaces it.
    - `lookup` returns the key authorization for a pending, unexpired token and
      None otherwise; it never raises for an unknown or malformed token and
      must be cheap (it runs on the SPOE hot path).
    - `remove` is idempotent.
    - `expires_at` is a UNIX timestamp in seconds (UTC); an expired entry is
      treated as absent and may be dropped at any time.
    """

    @abstractmethod
    def add(self, token: str, key_authorization: str, expires_at: float) -> None: ...

    @abstractmethod
    def remove(self, token: str) -> None: ...

    @abstractmethod
    def lookup(self, token: str) -> str | None: ...

    @abstractmethod
    def __len__(self) -> int:
        """Number of pending (unexpired) entries."""

    def fetch(self, token: str) -> Future[str | None] | None:
        """After `lookup` missed: a Future of the answer from a slower, shared
        source (a fleet's Redis), or None when there is none to ask. Must never
        block; the SPOE agent sends that frame's ACK when the Future completes
        or its lookup deadline passes. Local registries have nothing more."""
        del token
        return None

    def close(self) -> None:
        """Stop what this registry itself started (a fleet registry's mirror
        thread and its Redis connections); idempotent. A wrapper (the map
        registry) does not close the registry it wraps. Local registries hold
        nothing: a no-op."""
        return None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MemoryChallengeRegistry(ChallengeRegistry):
    """In-process registry; thread-safe (the ACME flow may run in a worker thread)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._entries: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def add(self, token: str, key_authorization: str, expires_at: float) -> None:
        if not valid_token(token):
            raise ValueError(f"not a valid ACME token: {token[:40]!r}")
        if not key_authorization.startswith(token + "."):
            raise ValueError("key authorization does not belong to the token")
        with self._lock:
            self._entries[token] = (key_authorization, expires_at)

    def remove(self, token: str) -> None:
        with self._lock:
            self._entries.pop(token, None)

    def lookup(self, token: str) -> str | None:
        # dict.get is atomic under the GIL: no lock on the hot path.
        entry = self._entries.get(token)
        if entry is None:
            return None
        key_authorization, expires_at = entry
        if expires_at <= self._clock():
            self.remove(token)
            return None
        return key_authorization

    def __len__(self) -> int:
        now = self._clock()
        with self._lock:
            return sum(1 for _, exp in self._entries.values() if exp > now)
