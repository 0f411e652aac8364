"""The ACME flow (RFC 8555) on certbot's `acme` library, with our own retries and polling.

`Issuer(acme_cfg, storage, registry)`:
- `connect()` fetches the directory, loads or creates the account key (once,
  0600 in the storage) and registers / finds the account (email, ToS
  agreement, optional EAB). A `newAccount` for a key the CA already knows
  returns the existing account, so a restarted or different CA instance is
  handled by the same request.
- `issue(csr_pem, domains, replaces=None, challenge="http-01", cert_name=None)`
  runs one order: newOrder (with `replaces` and `profile` when applicable) ->
  the `challenge` type picked from every authorization (none offered: a
  ValidationFailed naming the certificate and the types offered) -> the
  solver of that type publishes all of them at once (agent/solvers.py: http-01
  key authorizations in the challenge registry, served by the SPOE agent;
  dns-01 TXT records, agent/dns01.py) -> answer -> poll every `poll_interval`
  seconds -> finalize -> poll -> download the full chain. What the solver
  published is removed whatever happens. `connect()` first lets every solver
  remove leftovers of a process that died mid-order (`Solver.recover`).
  Thread-safe: every call uses its own HTTP session, so orders run in parallel.

Retries (the library retries badNonce only once): badNonce is retried at once
(up to `MAX_BAD_NONCE` times per request); connection errors (refused, reset,
remote disconnected, timeouts), truncated answers (a body shorter than its
Content-Length, a broken chunked body, a JSON body cut off before its end) and
5xx with exponential backoff; a `Retry-After` from the CA is honoured; all
within the order's deadline (`acme.timeout` seconds). `rateLimited` is never
retried: it raises `RateLimited` with the CA's explanation and retry time.

A complete answer that is not what RFC 8555 says (not JSON where JSON is
required, JSON of the wrong shape, missing fields) raises `AcmeProtocolError`
naming the request ("the CA's answer to POST <url> is not valid JSON: ...").

Problem texts from the CA go through `redact_key_authorizations` before they
are put in an exception (and so in logs, meta.json and `status`): a failed
http-01 validation's detail quotes the key authorization.
"""

from __future__ import annotations

import collections
import hashlib
import http.client
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests
from acme import challenges, client, errors, messages
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from josepy import errors as jose_errors
from josepy.jwa import ES256, ES384, RS256
from josepy.jwk import JWK, JWKEC, JWKRSA

from agent import ari, keys
from agent.challenges import ChallengeRegistry
from agent.config import AcmeConfig
from agent.solvers import (
    DEFAULT_CHALLENGE,
    ChallengeTask,
    Http01Solver,
    NoMatchingChallenge,
    Solver,
    SolverError,
    challenge_answer,
    count_challenge,
    pick_challenge,
)
from agent.storage import Storage

log = logging.getLogger(__name__)

USER_AGENT = "haproxy-acme-agent"
MAX_BAD_NONCE = 10
BACKOFF_START = 0.1  # seconds; doubled per attempt
BACKOFF_MAX = 2.0
# Retries by cause ("badNonce", "5xx", "connection") since the process started: for logs,
# metrics and tests that must prove a fault really happened.
RETRY_COUNTS: collections.Counter[str] = collections.Counter()
_RETRY_COUNTS_LOCK = threading.Lock()


def _count_retry(cause: str) -> None:
    with _RETRY_COUNTS_LOCK:
        RETRY_COUNTS[cause] += 1


# A key authorization (RFC 8555 section 8.1): token "." base64url(SHA-256 thumbprint), the
# thumbprint 43 characters. The token is in the challenge URL anyway: keep it for debugging.
_KEY_AUTHZ = re.compile(
    r"(?<![A-Za-z0-9_-])([A-Za-z0-9_-]{16,})\.[A-Za-z0-9_-]{43}(?![A-Za-z0-9_-])"
)
REDACTED = "<key-authorization-redacted>"


def redact_key_authorizations(text: str) -> str:
    """`text` with every key authorization `<token>.<thumbprint>` made `<token>.<redacted>`."""
    return _KEY_AUTHZ.sub(lambda m: f"{m.group(1)}.{REDACTED}", text)


class _RedactingFilter(logging.Filter):
    """Redacts key authorizations from the acme library's DEBUG dumps of CA answers."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact_key_authorizations(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


logging.getLogger("acme.client").addFilter(_RedactingFilter())


# A `malformed` newOrder problem about `replaces` ("... replaces ...", or Pebble's
# "parsing ARI CertID failed" after a CA restart changed the issuer).
_REPLACES_DETAIL = re.compile(r"replace|\bARI\b", re.I)

# How long a token stays answerable if we die before removing it (seconds past the deadline).
TOKEN_GRACE = 60.0


# --- errors ----------------------------------------------------------------------------


class AcmeError(Exception):
    """Base of everything that can go wrong talking to the CA."""


class AcmeUnreachable(AcmeError):
    """The CA could not be reached (connection refused, timeouts) within the deadline."""


class AcmeProtocolError(AcmeError):
    """The CA's complete answer is not what RFC 8555 says: not JSON where JSON is required,
    JSON of the wrong shape, missing fields. Not retried (a retry gets the same answer)."""

    problem_type = None


class AcmeServerError(AcmeError):
    """The CA answered with an error: 5xx after retries, or a problem document we cannot fix.

    `problem_type` is the RFC 8555 error type URN (or None), `status` the HTTP status.
    """

    def __init__(self, message: str, problem_type: str | None = None, status: int | None = None):
        super().__init__(message)
        self.problem_type = problem_type
        self.status = status


class RateLimited(AcmeServerError):
    """The CA says we hit a rate limit. Stop; `retry_after` is a UNIX time or None."""

    def __init__(self, message: str, retry_after: float | None) -> None:
        super().__init__(message, "urn:ietf:params:acme:error:rateLimited", 429)
        self.retry_after = retry_after


class ReplacesRefused(AcmeServerError):
    """A newOrder carrying `replaces` failed with a CA error even after retries
    (seen: Pebble 2.10's 500 for some serials). The caller orders without it."""


class AccountError(AcmeError):
    """The account could not be created or found (bad EAB, ToS, contact...)."""


class ValidationFailed(AcmeError):
    """The CA could not validate a domain (its http-01 request did not get our answer)."""

    def __init__(self, domain: str, detail: str) -> None:
        detail = redact_key_authorizations(detail)
        super().__init__(f"validation of {domain} failed: {detail}")
        self.domain = domain
        self.detail = detail


class ChallengeSetupFailed(AcmeError):
    """The solver could not publish what the CA needs (DNS update refused, hook failed,
    record not visible in time); the CA was not asked to validate."""


class OrderFailed(AcmeError):
    """The order became invalid or finalization was refused."""


class AcmeTimeout(AcmeError):
    """The order did not complete within `acme.timeout` seconds."""


def problem_code(err: messages.Error) -> str:
    """The short error type ("badNonce", "alreadyReplaced"), also for types the library lacks."""
    return str(err.typ).rsplit(":", maxsplit=1)[-1]


def _problem_text(err: messages.Error) -> str:
    """ "code: detail [subproblems]" of a CA problem, key authorizations redacted."""
    parts = [err.detail or err.description or "no detail"]
    parts.insert(0, problem_code(err) + ":")
    for sub in getattr(err, "subproblems", None) or ():
        ident = getattr(sub.identifier, "value", None) if sub.identifier else None
        parts.append(f"[{ident}: {sub.detail}]" if ident else f"[{sub.detail}]")
    return redact_key_authorizations(" ".join(parts))


class _Truncated(Exception):
    """An answer cut off before its end (retryable)."""


_JSON_TYPES = ("application/json", "application/problem+json")


def _is_json_type(resp: requests.Response) -> bool:
    ct = (resp.headers.get("Content-Type") or "").split(";")[0].strip().lower()
    return ct in _JSON_TYPES or ct.endswith("+json")


def _json_problem(resp: requests.Response) -> tuple[bool, str] | None:
    """None if the body parses as JSON; else (truncated?, why).

    A decode error at the very end of the body means the document was cut off
    (a proxy or a dying CA); anywhere else the body is simply not JSON.
    """
    text = resp.content.decode("utf-8", errors="replace")
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        stripped = text.rstrip()
        truncated = bool(stripped) and (
            e.pos >= len(stripped) or e.msg.startswith("Unterminated string")
        )
        return truncated, f"{e.msg} at character {e.pos} of {len(text)}"
    return None


# --- network with retries --------------------------------------------------------------


class RetryingNetwork(client.ClientNetwork):  # type: ignore[misc]
    """`ClientNetwork` whose POSTs and GETs retry transient failures until `deadline`.

    `deadline` is a `time.monotonic()` value; every single HTTP request also
    gets a timeout no longer than what is left.
    """

    def __init__(self, *, deadline: float, request_timeout: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.deadline = deadline
        self.request_timeout = request_timeout
        self.last_response: requests.Response | None = None
        self.last_what = "the first request"  # "POST <url>" of the latest request, for errors

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def _send_request(self, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:
        left = self.remaining()
        if left <= 0:
            raise AcmeTimeout(f"deadline passed before {method} {url}")
        kwargs["timeout"] = max(0.1, min(self.request_timeout, left))
        self.last_response = None
        response: requests.Response = super()._send_request(method, url, *args, **kwargs)
        self.last_response = response
        return response

    def _retry_wait(self, attempt: int, what: str, retry_after: float | None) -> None:
        """Sleep before the next attempt, or raise if that would pass the deadline."""
        delay = min(BACKOFF_MAX, BACKOFF_START * (2**attempt))
        if retry_after is not None:
            delay = max(delay, retry_after)
        if delay >= self.remaining():
            if retry_after is not None and retry_after >= self.remaining():
                raise AcmeServerError(
                    f"{what}; the CA asked to retry after {retry_after:.0f} s, "
                    "beyond this order's deadline",
                    status=self.last_response.status_code if self.last_response else None,
                )
            raise _GiveUp()
        time.sleep(delay)

    def _with_retries(self, what: str, call: Any) -> requests.Response:
        attempt = 0
        bad_nonces = 0
        last_problem = "no attempt made"
        self.last_what = what
        while True:
            cause = "5xx"
            try:
                result: requests.Response = call()
                if _is_json_type(result) and (bad := _json_problem(result)) is not None:
                    if bad[0]:
                        raise _Truncated(bad[1])
                    raise AcmeProtocolError(
                        f"the CA's answer to {what} is not valid JSON: {bad[1]}"
                    )
                return result
            except _Truncated as e:
                last_problem = f"truncated answer from the CA ({e})"
                retry_after = None
                cause = "truncated"
            except messages.Error as e:
                resp = self.last_response
                status = resp.status_code if resp is not None else None
                if problem_code(e) == "badNonce" and bad_nonces < MAX_BAD_NONCE:
                    bad_nonces += 1
                    _count_retry("badNonce")
                    log.debug("%s: badNonce, retrying (%d)", what, bad_nonces)
                    continue  # a fresh nonce comes from newNonce; no need to wait
                if problem_code(e) == "rateLimited":
                    wait = ari.parse_retry_after(
                        resp.headers.get("Retry-After") if resp is not None else None,
                        time.time(),
                        -1.0,
                    )
                    when = time.time() + wait if wait >= 0 else None
                    hint = (
                        f"; retry after {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(when))}"
                        if when
                        else ""
                    )
                    detail = redact_key_authorizations(e.detail or "no detail")
                    raise RateLimited(f"rate limited by the CA: {detail}{hint}", when) from e
                if status is not None and status >= 500:
                    last_problem = f"HTTP {status} {_problem_text(e)}"
                    retry_after = _retry_after_of(resp)
                else:
                    raise
            except errors.ClientError as e:
                # Non-JSON error bodies (a proxy's 502 page...) arrive as ClientError(response),
                # and every 409 as ConflictError, even with a problem document (RFC 9773's
                # alreadyReplaced): surface that document as the messages.Error it is.
                resp = self.last_response
                status = resp.status_code if resp is not None else None
                bad = _json_problem(resp) if resp is not None and _is_json_type(resp) else None
                if bad is not None and bad[0]:
                    # A JSON answer cut off: the library saw "not JSON"; retry it.
                    last_problem = f"truncated answer from the CA ({bad[1]})"
                    retry_after = None
                    cause = "truncated"
                elif (
                    resp is not None
                    and resp.ok
                    and not isinstance(e, errors.NonceError)
                    and (bad := bad or _json_problem(resp)) is not None
                ):
                    # A 2xx whose body is not the JSON the library needs (nonce problems
                    # are ClientErrors too: those go on below as before).
                    raise AcmeProtocolError(
                        f"the CA's answer to {what} is not valid JSON: {bad[1]} "
                        f"(Content-Type {_content_type(resp)})"
                    ) from None
                else:
                    if status == 409 and resp is not None:
                        problem = _problem_of(resp)
                        if problem is not None:
                            raise problem from e
                    if status is None or status < 500:
                        raise
                    last_problem = f"HTTP {status} from the CA"
                    retry_after = _retry_after_of(resp)
            except (
                requests.exceptions.ChunkedEncodingError,
                requests.exceptions.ContentDecodingError,
                http.client.IncompleteRead,
            ) as e:
                # Body shorter than its Content-Length, or a broken chunked body.
                last_problem = f"truncated answer from the CA ({_short_conn_error(e)})"
                retry_after = None
                cause = "truncated"
            except (
                requests.ConnectionError,
                requests.Timeout,
                http.client.RemoteDisconnected,
                ConnectionResetError,
                ConnectionAbortedError,
                BrokenPipeError,
            ) as e:
                last_problem = f"cannot reach the CA: {_short_conn_error(e)}"
                retry_after = None
                cause = "connection"
            _count_retry(cause)
            log.debug("%s: %s; retrying", what, last_problem)
            try:
                self._retry_wait(attempt, f"{what}: {last_problem}", retry_after)
            except _GiveUp:
                if last_problem.startswith("cannot reach"):
                    raise AcmeUnreachable(f"{what}: {last_problem}") from None
                raise AcmeServerError(f"{what}: {last_problem} (gave up after retries)") from None
            attempt += 1

    def post(self, *args: Any, **kwargs: Any) -> requests.Response:
        url = args[0] if args else kwargs.get("url", "?")
        return self._with_retries(f"POST {url}", lambda: self._post_once(*args, **kwargs))

    def get(self, url: str, *args: Any, **kwargs: Any) -> requests.Response:
        parent_get = super().get
        return self._with_retries(f"GET {url}", lambda: parent_get(url, *args, **kwargs))


class _GiveUp(Exception):
    pass


def _problem_of(resp: requests.Response) -> messages.Error | None:
    try:
        body = resp.json()
        return messages.Error.from_json(body) if isinstance(body, dict) and "type" in body else None
    except (ValueError, jose_errors.DeserializationError):
        return None


def _retry_after_of(resp: requests.Response | None) -> float | None:
    if resp is None or "Retry-After" not in resp.headers:
        return None
    return ari.parse_retry_after(resp.headers["Retry-After"], time.time(), 1.0)


def _content_type(resp: requests.Response) -> str:
    return resp.headers.get("Content-Type") or "none"


def _parse(cls: Any, resp: requests.Response, what: str, required: Sequence[str] = ()) -> Any:
    """`cls.from_json(resp.json())`; a body that is not JSON, not a JSON object, not a valid
    `cls` or lacking one of the `required` fields raises AcmeProtocolError naming the
    request `what` ("POST <url>")."""
    kind = cls.__name__.lower()
    try:
        body = resp.json()
    except ValueError as e:
        raise AcmeProtocolError(f"the CA's answer to {what} is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise AcmeProtocolError(
            f"the CA's answer to {what} is JSON {type(body).__name__}, not an {kind} object"
        )
    missing = [f for f in required if body.get(f) in (None, "", [])]
    if missing:
        raise AcmeProtocolError(
            f"the CA's answer to {what} is an {kind} object without {', '.join(missing)}"
        )
    try:
        return cls.from_json(body)
    except (jose_errors.DeserializationError, TypeError, KeyError, AttributeError, ValueError) as e:
        raise AcmeProtocolError(
            f"the CA's answer to {what} is not a valid {kind} object: {e}"
        ) from None


def _short_conn_error(e: BaseException) -> str:
    text = str(e)
    for marker in (
        "Connection refused",
        "timed out",
        "Name or service not known",
        "reset",
        "Remote end closed connection",
        "IncompleteRead",
        "Connection broken",
    ):
        if marker in text:
            return marker.lower()
    return text[:200]


# --- polling ---------------------------------------------------------------------------

POLL_FIRST = 0.05  # seconds: Pebble and Boulder validate a challenge in tens of ms


class PollSchedule:
    """Waits between polls of one resource (authorizations, or the order).

    The first wait is `POLL_FIRST` (s), each next one doubles, up to `cap`
    (`acme.poll_interval`). A CA's Retry-After (s) sets the next wait instead,
    as it asks (bounded by the order's deadline where the caller sleeps).
    """

    def __init__(self, cap: float, first: float = POLL_FIRST) -> None:
        self.cap = max(cap, 0.0)
        self.wait = min(first, self.cap)
        self._asked: float | None = None

    def retry_after(self, seconds: float | None) -> None:
        """The CA's Retry-After on the latest poll (None: it sent none)."""
        if seconds is not None:
            self._asked = seconds if self._asked is None else max(self._asked, seconds)
            self.wait = self._asked

    def step(self) -> None:
        """A poll went out: the next wait doubles (up to the cap)."""
        self._asked = None
        self.wait = min(self.cap, max(self.wait * 2, POLL_FIRST))


# --- the issuer ------------------------------------------------------------------------


@dataclass(frozen=True)
class IssuedCertificate:
    """What a successful order returns: PEM text of the full chain as the CA sent it."""

    fullchain_pem: str
    order_url: str | None


@dataclass(frozen=True)
class OrderProgress:
    """Where an order stands, as `Issuer.issue` reports it to `progress` and takes
    it back as `resume`: the order URL, its status ("pending", "ready",
    "processing", "valid"), and the finalize and certificate URLs once known."""

    url: str
    status: str
    finalize: str | None = None
    certificate: str | None = None


OrderProgressHook = Callable[[OrderProgress], None]


@dataclass(frozen=True)
class PersistChallenge:
    """One authorization's dns-persist-01 challenge: the name (a wildcard's base name),
    whether it is a wildcard, the CA's issuer domain names and our account URI."""

    domain: str
    wildcard: bool
    issuer_domain_names: tuple[str, ...]
    account_uri: str


def account_slug(directory_url: str) -> str:
    """Storage key part for the account of one CA directory (host + short hash of the URL)."""
    host = urlsplit(directory_url).hostname or "ca"
    safe_host = "".join(c if c.isalnum() or c in ".-" else "-" for c in host).strip(".-") or "ca"
    return f"{safe_host}-{hashlib.sha256(directory_url.encode()).hexdigest()[:12]}"


class Issuer:
    """One CA account; issues certificates. See the module docstring for the flow."""

    # `issue` takes `resume` / `progress` (a renewer checks this before passing them).
    resumes_orders = True

    def __init__(
        self,
        acme_cfg: AcmeConfig,
        storage: Storage,
        registry: ChallengeRegistry,
        user_agent: str = USER_AGENT,
        solvers: Mapping[str, Solver] | None = None,
    ) -> None:
        """`solvers` maps a challenge type to its solver (agent/solvers.py); http-01
        through `registry` is always there unless `solvers` replaces it."""
        self.cfg = acme_cfg
        self.storage = storage
        self.registry = registry
        self.user_agent = user_agent
        self.solvers: dict[str, Solver] = {
            "http-01": Http01Solver(registry, acme_cfg.timeout + TOKEN_GRACE),
            **(solvers or {}),
        }
        self.directory: messages.Directory | None = None
        self.account: messages.RegistrationResource | None = None
        self.account_key: JWKEC | None = None
        self._lock = threading.Lock()
        self._recovered = False

    # -- plumbing --

    def _verify(self) -> bool | str:
        return str(self.cfg.ca_bundle) if self.cfg.ca_bundle else True

    def _net(self, deadline: float | None = None, with_account: bool = True) -> RetryingNetwork:
        return RetryingNetwork(
            deadline=deadline if deadline is not None else time.monotonic() + self.cfg.timeout,
            request_timeout=self.cfg.timeout,
            key=self.account_key,
            account=self.account if with_account else None,
            alg=ES256,
            verify_ssl=self._verify(),
            user_agent=self.user_agent,
        )

    def _client(self, net: RetryingNetwork) -> client.ClientV2:
        assert self.directory is not None
        return client.ClientV2(self.directory, net)

    @property
    def account_prefix(self) -> str:
        return f"accounts/{account_slug(self.cfg.directory)}"

    @property
    def renewal_info_url(self) -> str | None:
        """The directory's renewalInfo URL (ARI), or None when the CA has none."""
        if self.directory is None:
            return None
        try:
            url = self.directory["renewalInfo"]
        except KeyError:
            return None
        return str(url) if url else None

    # -- account --

    def _load_or_create_account_key(self) -> JWKEC:
        key_name = f"{self.account_prefix}/account.key"
        with self.storage.locked(f"account-{account_slug(self.cfg.directory)}", timeout=30):
            if self.storage.exists(key_name):
                pem = self.storage.load(key_name)
                key = keys.parse_private_key(pem, key_name)
                if not isinstance(key, ec.EllipticCurvePrivateKey):
                    raise AccountError(f"{key_name}: account key must be ECDSA P-256")
            else:
                key = ec.generate_private_key(ec.SECP256R1())
                self.storage.store(key_name, keys.private_key_pem(key), secret=True)
        return JWKEC(key=key)

    def load_directory(self) -> messages.Directory:
        """Fetch (once) and return the CA's directory; needs no account."""
        with self._lock:
            if self.directory is None:
                self.directory = self._fetch_directory()
            return self.directory

    def _fetch_directory(self) -> messages.Directory:
        net = self._net(with_account=False)
        try:
            directory = client.ClientV2.get_directory(self.cfg.directory, net)
        except AcmeError:
            raise
        except (messages.Error, errors.Error, ValueError) as e:
            raise AcmeServerError(
                f"cannot read the ACME directory {self.cfg.directory}: {e}"
            ) from e
        finally:
            net.session.close()
        if self.cfg.profile:
            profiles = getattr(directory.meta, "profiles", None) or {}
            if self.cfg.profile not in profiles:
                offered = ", ".join(sorted(profiles)) or "none"
                raise AcmeServerError(
                    f"acme.profile {self.cfg.profile!r} is not offered by the CA "
                    f"(profiles: {offered})"
                )
        return directory

    def connect(self) -> None:
        """Fetch the directory and make sure the account exists. Idempotent."""
        self.load_directory()
        with self._lock:
            if self.account is not None:
                return
            assert self.directory is not None
            self.account_key = self._load_or_create_account_key()
            net = self._net(with_account=False)
            try:
                self.account = self._register(client.ClientV2(self.directory, net))
            finally:
                net.session.close()
            self._save_account_json()
        self.recover_leftovers()

    def recover_leftovers(self) -> None:
        """Once per issuer: remove what a process that died mid-order left behind
        (DNS records in the solvers' journals). Needs no CA; the daemon calls it
        at start, `connect` before the first order. Errors are logged, not raised."""
        with self._lock:
            if self._recovered:
                return
            self._recovered = True
        for solver in self.solvers.values():
            try:
                solver.recover()
            except Exception:  # a broken journal must not stop renewals
                log.exception("cleaning up after an earlier run (%s) failed", solver.challenge_type)

    def _register(self, acme: client.ClientV2) -> messages.RegistrationResource:
        assert self.directory is not None and self.account_key is not None
        eab = None
        if self.cfg.eab_kid and self.cfg.eab_hmac_key:
            eab = messages.ExternalAccountBinding.from_data(
                account_public_key=self.account_key.public_key(),
                kid=self.cfg.eab_kid,
                hmac_key=self.cfg.eab_hmac_key,
                directory=self.directory,
            )
        elif acme.external_account_required():
            raise AccountError(
                "the CA requires external account binding: set acme.eab_kid and acme.eab_hmac_key"
            )
        reg = messages.NewRegistration.from_data(
            email=self.cfg.email,
            terms_of_service_agreed=True,
            external_account_binding=eab,
        )
        try:
            return acme.new_account(reg)
        except errors.ConflictError as e:
            # The key is already registered: the error carries the account URL.
            location = str(e.location) if hasattr(e, "location") else str(e)
            return messages.RegistrationResource(body=messages.Registration(), uri=location)
        except messages.Error as e:
            raise AccountError(f"account registration failed: {_problem_text(e)}") from e
        except (ValueError, jose_errors.DeserializationError) as e:
            what = getattr(acme.net, "last_what", "newAccount")
            raise AcmeProtocolError(f"the CA's answer to {what} is not valid: {e}") from None

    def _save_account_json(self) -> None:
        assert self.account is not None
        info = {
            "directory": self.cfg.directory,
            "uri": self.account.uri,
            "email": self.cfg.email,
            "checked_at": time.time(),
        }
        name = f"{self.account_prefix}/account.json"
        data = (json.dumps(info, indent=2) + "\n").encode()
        try:
            if (
                self.storage.exists(name)
                and json.loads(self.storage.load(name)).get("uri") == info["uri"]
            ):
                return  # unchanged: keep the file (and its mtime) as is
        except (ValueError, OSError):
            pass
        self.storage.store(name, data)

    # -- ARI --

    def renewal_info(
        self, cert: x509.Certificate, previous: ari.RenewalWindow | None = None
    ) -> ari.RenewalWindow | None:
        """The CA's suggested window for `cert`, or None when the CA has no ARI."""
        self.load_directory()
        url = self.renewal_info_url
        if url is None:
            return None
        net = self._net(with_account=False)
        try:
            return ari.fetch_renewal_info(
                lambda u: net.get(u, content_type="application/json"),
                url,
                cert,
                time.time(),
                previous,
            )
        finally:
            net.session.close()

    def revoke_with_key(self, cert: x509.Certificate, key: keys.PrivateKey, reason: int) -> None:
        """Revoke `cert` (RFC 8555 7.6) with a request signed by the certificate's own
        private `key` (a JWK header, no account): what a key compromise calls for,
        and it works whichever account ordered the certificate. `reason`: an RFC
        5280 CRLReason code (1 = keyCompromise). Raises AcmeServerError."""
        self.load_directory()
        assert self.directory is not None
        if isinstance(key, ec.EllipticCurvePrivateKey):
            jwk: JWK = JWKEC(key=key)
            alg = {"secp256r1": ES256, "secp384r1": ES384}[key.curve.name]
        else:
            jwk, alg = JWKRSA(key=key), RS256
        net = RetryingNetwork(
            deadline=time.monotonic() + self.cfg.timeout, request_timeout=self.cfg.timeout,
            key=jwk, account=None, alg=alg, verify_ssl=self._verify(), user_agent=self.user_agent,
        )  # fmt: skip
        try:
            client.ClientV2(self.directory, net).revoke(cert, reason)
        except AcmeError:
            raise
        except (messages.Error, errors.Error) as e:
            raise AcmeServerError(
                f"revoking serial {cert.serial_number:x}: {e}",
                problem_type=getattr(e, "typ", None),
            ) from e
        finally:
            net.session.close()

    # -- orders --

    def issue(
        self,
        csr_pem: bytes,
        domains: Sequence[str],
        replaces: str | None = None,
        *,
        challenge: str = DEFAULT_CHALLENGE,
        cert_name: str | None = None,
        resume: OrderProgress | None = None,
        progress: OrderProgressHook | None = None,
    ) -> IssuedCertificate:
        """Run one order to completion; raise an AcmeError subclass on failure.

        `challenge` is the certificate's challenge type: the solver of that type
        proves every authorization. `cert_name` names the certificate in errors.
        `resume`: an order placed earlier (by this account, maybe by another node
        that died): it is fetched and carried on from where it stands (`valid`:
        download; `ready`/`processing`: finalize or poll; `pending`: answer its
        challenges again); one that is invalid, expired, unknown to the CA or for
        other names is dropped and a new order placed. `progress(p)` is called
        each time the order moves on (placed, validated, finalized, valid).
        """
        solver = self.solvers.get(challenge)
        label = cert_name or ", ".join(domains)
        if solver is None:
            raise ValidationFailed(label, f"no solver for challenge {challenge!r} is configured")
        self.connect()
        assert self.directory is not None and self.account_key is not None
        deadline = time.monotonic() + self.cfg.timeout
        net = self._net(deadline)
        acme = self._client(net)
        presented: list[list[ChallengeTask]] = []
        order = _OrderSolver(solver, label, presented)
        try:
            try:
                return self._issue(
                    acme, net, csr_pem, domains, replaces, order, deadline, resume, progress
                )
            except messages.Error as e:
                code = problem_code(e)
                if replaces and (
                    code == "alreadyReplaced"
                    or (code == "malformed" and _REPLACES_DETAIL.search(e.detail or ""))
                ):
                    # RFC 9773 section 5: the CA may refuse `replaces`; order without it.
                    log.warning(
                        "CA refused replaces=%s (%s); ordering without it",
                        replaces,
                        _problem_text(e),
                    )
                    return self._issue(
                        acme, net, csr_pem, domains, None, order, deadline, None, progress
                    )
                raise
        except AcmeError:
            raise
        except messages.Error as e:
            raise AcmeServerError(f"the CA refused: {_problem_text(e)}", e.typ) from e
        except errors.Error as e:
            raise AcmeServerError(
                f"ACME protocol error after {net.last_what}: {redact_key_authorizations(str(e))}"
            ) from e
        except (ValueError, jose_errors.DeserializationError) as e:
            # The library parsing an answer (poll, challenge) that is not the JSON it needs.
            why = redact_key_authorizations(str(e))
            raise AcmeProtocolError(
                f"the CA's answer to {net.last_what} is not valid: {why}"
            ) from None
        finally:
            for tasks in presented:
                solver.cleanup(label, tasks)
            net.session.close()

    def persist_challenges(self, domains: Sequence[str]) -> list[PersistChallenge]:
        """What the CA's dns-persist-01 challenges for `domains` ask for: one entry per
        authorization, with the issuer domain names and the account URI.

        Places a new order and reads its authorizations without answering any
        challenge (the order simply expires at the CA). Raises ValidationFailed
        when an authorization offers no dns-persist-01 challenge.
        """
        self.connect()
        assert self.directory is not None and self.account is not None
        net = self._net(time.monotonic() + self.cfg.timeout)
        try:
            order_msg = ari.NewOrder(
                identifiers=[
                    messages.Identifier(typ=messages.IDENTIFIER_FQDN, value=d) for d in domains
                ],
                profile=self.cfg.profile or None,
            )
            resp = net.post(
                self.directory["newOrder"], order_msg, new_nonce_url=self.directory["newNonce"]
            )
            order = _parse(messages.Order, resp, net.last_what, ("authorizations",))
            out: list[PersistChallenge] = []
            for authz_url in order.authorizations:
                authz = _parse(
                    messages.Authorization,
                    self._post_as_get(net, authz_url),
                    net.last_what,
                    ("identifier", "challenges"),
                )
                try:
                    challb = pick_challenge(", ".join(domains), authz, "dns-persist-01")
                except NoMatchingChallenge as e:
                    raise ValidationFailed(authz.identifier.value, str(e)) from None
                jobj = challb.chall.to_partial_json()
                names = jobj.get("issuer-domain-names") or []
                if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                    raise AcmeProtocolError(
                        f"the CA's answer to {net.last_what} has a dns-persist-01 challenge "
                        "without a list of issuer-domain-names"
                    )
                out.append(
                    PersistChallenge(
                        domain=authz.identifier.value,
                        wildcard=bool(authz.wildcard),
                        issuer_domain_names=tuple(names),
                        account_uri=str(jobj.get("accounturi") or self.account.uri),
                    )
                )
            return out
        except messages.Error as e:
            raise AcmeServerError(f"the CA refused: {_problem_text(e)}", e.typ) from e
        finally:
            net.session.close()

    def _post_as_get(self, net: RetryingNetwork, url: str) -> requests.Response:
        assert self.directory is not None
        return net.post(url, None, new_nonce_url=self.directory["newNonce"])

    def _issue(
        self,
        acme: client.ClientV2,
        net: RetryingNetwork,
        csr_pem: bytes,
        domains: Sequence[str],
        replaces: str | None,
        solving: _OrderSolver,
        deadline: float,
        resume: OrderProgress | None = None,
        progress: OrderProgressHook | None = None,
    ) -> IssuedCertificate:
        assert self.directory is not None and self.account_key is not None

        def report(status: str, certificate: str | None = None) -> None:
            if progress is not None:
                progress(OrderProgress(order_url, status, str(order.finalize), certificate))

        resumed = self._resume(net, resume, domains, solving.label) if resume else None
        if resumed is not None:
            order, order_url = resumed, resume.url  # type: ignore[union-attr]
        else:
            order, order_url = self._new_order(net, domains, replaces)
            report("pending")
        return self._complete(acme, net, csr_pem, order, order_url, solving, deadline, report)

    def _resume(
        self, net: RetryingNetwork, resume: OrderProgress, domains: Sequence[str], label: str
    ) -> messages.Order | None:
        """The order at `resume.url` if it can be carried on, else None (logged)."""
        try:
            order = _parse(
                messages.Order, self._post_as_get(net, resume.url), net.last_what,
                ("status", "authorizations", "finalize"),
            )  # fmt: skip
        except (
            AcmeServerError, AcmeProtocolError, messages.Error, errors.Error, ValueError,
            jose_errors.DeserializationError,
        ) as e:  # fmt: skip
            # Unknown to the CA (404), another account's, or not an order: a new one.
            why = redact_key_authorizations(str(e)) or type(e).__name__
            log.warning("certificate %s: cannot resume order %s: %s", label, resume.url, why)
            return None
        names = sorted(i.value for i in order.identifiers)
        expired = order.expires is not None and order.expires.timestamp() <= time.time()
        status = order.status.name
        if status in ("invalid", "expired") or expired or names != sorted(domains):
            why = "expired" if expired else status if status != "pending" else "other names"
            log.warning(
                "certificate %s: order %s is %s: placing a new one", label, resume.url, why
            )
            return None
        log.info("certificate %s: resuming order %s (%s)", label, resume.url, status)
        resumed: messages.Order = order
        return resumed

    def _new_order(
        self, net: RetryingNetwork, domains: Sequence[str], replaces: str | None
    ) -> tuple[messages.Order, str]:
        assert self.directory is not None
        order_msg = ari.NewOrder(
            identifiers=[
                messages.Identifier(typ=messages.IDENTIFIER_FQDN, value=d) for d in domains
            ],
            profile=self.cfg.profile or None,
            replaces=replaces,
        )
        try:
            resp = net.post(
                self.directory["newOrder"], order_msg, new_nonce_url=self.directory["newNonce"]
            )
        except AcmeServerError as e:
            if replaces is None or isinstance(e, RateLimited):
                raise
            raise ReplacesRefused(str(e), e.problem_type, e.status) from e
        order = _parse(
            messages.Order, resp, net.last_what, ("status", "authorizations", "finalize")
        )
        order_url = resp.headers.get("Location")
        if not order_url:
            raise AcmeServerError("the CA's newOrder response has no Location header")
        return order, str(order_url)

    def _complete(
        self,
        acme: client.ClientV2,
        net: RetryingNetwork,
        csr_pem: bytes,
        order: messages.Order,
        order_url: str,
        solving: _OrderSolver,
        deadline: float,
        report: Callable[..., None],
    ) -> IssuedCertificate:
        """Carry `order` from where it stands to its certificate."""
        assert self.directory is not None and self.account_key is not None

        # Start every pending authorization first, then poll them together: the
        # CA validates the domains in parallel.
        pending: list[messages.AuthorizationResource] = []
        tasks: list[ChallengeTask] = []
        answers: list[tuple[messages.ChallengeBody, challenges.ChallengeResponse]] = []
        for authz_url in order.authorizations:
            authzr = messages.AuthorizationResource(
                body=_parse(
                    messages.Authorization,
                    self._post_as_get(net, authz_url),
                    net.last_what,
                    ("status", "identifier", "challenges"),
                ),
                uri=authz_url,
            )
            status = authzr.body.status
            if status == messages.STATUS_VALID:
                continue
            if status != messages.STATUS_PENDING:
                raise ValidationFailed(
                    authzr.body.identifier.value, f"authorization is {status.name} before we began"
                )
            try:
                challb = pick_challenge(solving.label, authzr.body, solving.solver.challenge_type)
            except NoMatchingChallenge as e:
                raise ValidationFailed(authzr.body.identifier.value, str(e)) from None
            if isinstance(challb.chall, challenges.KeyAuthorizationChallenge):
                response: challenges.ChallengeResponse
                response, validation = challb.chall.response_and_validation(self.account_key)
            else:  # dns-persist-01: nothing to compute, the answer is {}
                response, validation = challenge_answer(), ""
            tasks.append(
                ChallengeTask(
                    domain=authzr.body.identifier.value,
                    wildcard=bool(authzr.body.wildcard),
                    challenge=challb,
                    validation=validation,
                )
            )
            answers.append((challb, response))
            pending.append(authzr)

        # Publish everything (one propagation wait for all names), then answer.
        # The order's deadline (acme.timeout) covers talking to the CA; the DNS propagation
        # wait has its own bound (propagation_timeout), so it moves the deadline on.
        if tasks:
            waited = solving.present(tasks)
            deadline += waited
            net.deadline += waited
        for challb, response in answers:
            if challb.status == messages.STATUS_PENDING:  # not one answered before a takeover
                acme.answer_challenge(challb, response)

        polls = PollSchedule(self.cfg.poll_interval)
        while pending:
            self._sleep(polls.wait, deadline, "waiting for domain validation")
            polls.step()
            still: list[messages.AuthorizationResource] = []
            for authzr in pending:
                updated, poll_response = acme.poll(authzr)
                polls.retry_after(_retry_after_of(poll_response))
                status = updated.body.status
                if status == messages.STATUS_VALID:
                    count_challenge(solving.solver.challenge_type, "valid")
                    continue
                if status == messages.STATUS_INVALID:
                    count_challenge(solving.solver.challenge_type, "invalid")
                    raise ValidationFailed(updated.body.identifier.value, _authz_error(updated))
                still.append(updated)
            pending = still

        # Finalize (unless a resumed order already was), then poll it until the
        # certificate is there.
        wrapped = messages.CertificateRequest(csr=x509.load_pem_x509_csr(csr_pem))
        if order.status not in (messages.STATUS_VALID, messages.STATUS_PROCESSING):
            report("ready")
            try:
                resp = net.post(order.finalize, wrapped, new_nonce_url=self.directory["newNonce"])
                order = _parse(messages.Order, resp, net.last_what, ("status",))
                report(order.status.name)
            except messages.Error as e:
                if problem_code(e) != "orderNotReady":
                    raise OrderFailed(f"finalization refused: {_problem_text(e)}") from e
        polls = PollSchedule(self.cfg.poll_interval)
        while True:
            if order.status == messages.STATUS_VALID:
                if not order.certificate:
                    raise AcmeProtocolError(
                        f"the CA's answer to {net.last_what} is a valid order without certificate"
                    )
                break
            if order.status == messages.STATUS_INVALID:
                detail = _problem_text(order.error) if order.error else "no detail from the CA"
                raise OrderFailed(f"order became invalid: {detail}")
            polls.retry_after(_retry_after_of(net.last_response))
            self._sleep(polls.wait, deadline, "waiting for the certificate")
            polls.step()
            resp = self._post_as_get(net, order_url)
            order = _parse(messages.Order, resp, net.last_what, ("status",))
            if order.status == messages.STATUS_READY:
                # A finalize that got lost (e.g. retried after a connection reset).
                resp = net.post(order.finalize, wrapped, new_nonce_url=self.directory["newNonce"])
                order = _parse(messages.Order, resp, net.last_what, ("status",))
        report("valid", str(order.certificate))
        cert_resp = self._post_as_get(net, order.certificate)
        return IssuedCertificate(fullchain_pem=cert_resp.text, order_url=order_url)

    @staticmethod
    def _sleep(seconds: float, deadline: float, what: str) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AcmeTimeout(f"timed out {what}")
        time.sleep(min(seconds, left))


class _OrderSolver:
    """One order's solver and what it presented (the issuer cleans that up in `finally`)."""

    def __init__(self, solver: Solver, label: str, presented: list[list[ChallengeTask]]) -> None:
        self.solver = solver
        self.label = label
        self.presented = presented

    def present(self, tasks: list[ChallengeTask]) -> float:
        """Present `tasks`; return the seconds it took."""
        # Recorded before presenting: a half-done present is cleaned up too.
        self.presented.append(tasks)
        start = time.monotonic()
        try:
            self.solver.present(self.label, tasks)
        except SolverError as e:
            count_challenge(self.solver.challenge_type, "error")
            raise ChallengeSetupFailed(f"certificate {self.label}: {e}") from None
        return time.monotonic() - start


def _authz_error(authzr: messages.AuthorizationResource) -> str:
    for challb in authzr.body.challenges:
        if challb.error is not None:
            return _problem_text(challb.error)
    return "the authorization is invalid (the CA gave no detail)"
