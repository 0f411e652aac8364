"""The solver seam: how one certificate's authorizations are proven to the CA.

Each certificate names a challenge type (`challenge = "http-01" | "dns-01" |
"dns-persist-01"` in its config). The issuer picks that challenge from every
authorization of an order (an authorization that offers none of it is a
`NoMatchingChallenge` naming the certificate and the types offered), makes one
`ChallengeTask` per authorization and hands all of them to the solver at once:

- `present(cert_name, tasks)` publishes everything the CA will look at and
  returns once it is visible (one wait for the whole order). It raises
  `SolverError` naming what failed; the issuer then calls `cleanup` anyway.
- `cleanup(cert_name, tasks)` removes what `present` published. It never
  raises (problems are logged): it runs in a `finally`, also after failures.
- `recover()` removes what a process that died between `present` and `cleanup`
  left behind (dns-01 keeps a journal for this); called once per issuer when
  it connects.

`Http01Solver` puts key authorizations in the challenge registry, which the
SPOE agent serves through HAProxy (the behaviour before this seam existed).
DNS solvers live in agent/dns01.py. `CHALLENGE_RESULTS` counts authorization
outcomes by (type, result) for the metrics ("valid", "invalid", "error").
"""

from __future__ import annotations

import collections
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from acme import challenges, messages

from agent.challenges import ChallengeRegistry
from agent.config import Config
from agent.storage import Storage

CHALLENGE_TYPES = ("http-01", "dns-01", "dns-persist-01")
DEFAULT_CHALLENGE = "http-01"

# Authorization outcomes since the process started, by (challenge type, result).
CHALLENGE_RESULTS: collections.Counter[tuple[str, str]] = collections.Counter()
_RESULTS_LOCK = threading.Lock()
# Called with (type, result) for every outcome; agent.metrics.Metrics adds itself
# (weakly: a dropped Metrics stops listening).
_LISTENERS: list[weakref.WeakMethod[Callable[[str, str], None]]] = []


def count_challenge(challenge_type: str, result: str) -> None:
    """Count one authorization outcome (`result` is "valid", "invalid" or "error")."""
    with _RESULTS_LOCK:
        CHALLENGE_RESULTS[(challenge_type, result)] += 1
        listeners = [ref() for ref in _LISTENERS]
        _LISTENERS[:] = [ref for ref, fn in zip(_LISTENERS, listeners, strict=True) if fn]
    for fn in listeners:
        if fn is not None:
            fn(challenge_type, result)


def listen_to_challenge_results(method: Callable[[str, str], None]) -> None:
    """Have the bound `method(type, result)` called for every later outcome."""
    with _RESULTS_LOCK:
        _LISTENERS.append(weakref.WeakMethod(method))


class SolverError(Exception):
    """A solver could not publish or check what the CA needs (DNS update refused, hook
    failed, record not visible in time). The message names the zone/server/hook."""


@dataclass(frozen=True)
class ChallengeTask:
    """One authorization to prove.

    `domain` is the identifier as the CA gives it (a wildcard's base name,
    without "*."), `wildcard` says whether it is the wildcard's authorization,
    `validation` is what the CA will look for: the key authorization (http-01),
    the TXT value (dns-01) or "" (dns-persist-01).
    """

    domain: str
    wildcard: bool
    challenge: messages.ChallengeBody
    validation: str

    @property
    def name(self) -> str:
        """The name as written in the certificate ("*.example.com" for a wildcard)."""
        return f"*.{self.domain}" if self.wildcard else self.domain


class Solver(ABC):
    """See the module docstring for the contract."""

    challenge_type: str

    @abstractmethod
    def present(self, cert_name: str, tasks: Sequence[ChallengeTask]) -> None: ...

    @abstractmethod
    def cleanup(self, cert_name: str, tasks: Sequence[ChallengeTask]) -> None: ...

    def recover(self) -> None:
        """Remove leftovers of a process that died mid-order (default: nothing to do)."""
        return None


class Http01Solver(Solver):
    """http-01 through the challenge registry (served by the SPOE agent)."""

    challenge_type = "http-01"

    def __init__(self, registry: ChallengeRegistry, lifetime: float) -> None:
        """`lifetime`: seconds a token stays answerable if we die before removing it."""
        self.registry = registry
        self.lifetime = lifetime

    def present(self, cert_name: str, tasks: Sequence[ChallengeTask]) -> None:
        expires = time.time() + self.lifetime
        for task in tasks:
            chall = task.challenge.chall
            assert isinstance(chall, challenges.HTTP01)
            self.registry.add(chall.encode("token"), task.validation, expires)

    def cleanup(self, cert_name: str, tasks: Sequence[ChallengeTask]) -> None:
        for task in tasks:
            chall = task.challenge.chall
            if isinstance(chall, challenges.HTTP01):
                self.registry.remove(chall.encode("token"))


class DnsPersist01Solver(Solver):
    """dns-persist-01: the `_validation-persist` record is published once by the operator
    (`haproxy-acme-agent dns-persist NAME` prints it); orders write nothing to DNS."""

    challenge_type = "dns-persist-01"

    def present(self, cert_name: str, tasks: Sequence[ChallengeTask]) -> None:
        return None

    def cleanup(self, cert_name: str, tasks: Sequence[ChallengeTask]) -> None:
        return None


def challenge_type_of(challb: messages.ChallengeBody) -> str:
    """The "type" of a challenge, also for types the acme library does not know."""
    chall = challb.chall
    typ = getattr(chall, "typ", None)
    if isinstance(typ, str) and typ:
        return typ
    jobj = getattr(chall, "jobj", None) or {}
    return str(jobj.get("type", "unknown"))


class _ChallengeAnswer(challenges.KeyAuthorizationChallengeResponse):  # type: ignore[misc]
    # Built on the key-authorization response on purpose: its (never serialised)
    # field makes the object truthy, and the library sends an empty, falsy object
    # as a POST-as-GET instead of "{}".
    typ = "generic-answer"


def challenge_answer() -> challenges.ChallengeResponse:
    """The `{}` POSTed to a challenge URL to say "validate now" (RFC 8555 section 7.5.1),
    for types the acme library has no response class of (dns-persist-01)."""
    return _ChallengeAnswer(key_authorization="")


def pick_challenge(
    cert_name: str, authz: messages.Authorization, wanted: str
) -> messages.ChallengeBody:
    """The challenge of type `wanted` in `authz`; NoMatchingChallenge if it has none."""
    for challb in authz.challenges:
        if challenge_type_of(challb) == wanted:
            return challb
    offered = sorted({challenge_type_of(c) for c in authz.challenges})
    raise NoMatchingChallenge(cert_name, authz.identifier.value, wanted, offered)


class NoMatchingChallenge(Exception):
    """The CA offers none of the configured challenge types for an authorization."""

    def __init__(self, cert_name: str, domain: str, wanted: str, offered: Sequence[str]) -> None:
        super().__init__(
            f"certificate {cert_name}: the CA offers no {wanted} challenge for {domain} "
            f"(offered: {', '.join(offered) or 'none'})"
        )
        self.cert_name = cert_name
        self.domain = domain
        self.wanted = wanted
        self.offered = tuple(offered)


def build_solvers(config: Config, storage: Storage) -> dict[str, Solver]:
    """The DNS solvers a configuration needs (http-01 is the issuer's own default)."""
    from agent.dns01 import Dns01Solver

    solvers: dict[str, Solver] = {"dns-persist-01": DnsPersist01Solver()}
    if config.dns:
        solvers["dns-01"] = Dns01Solver(config.dns, storage)
    return solvers
