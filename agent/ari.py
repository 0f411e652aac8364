"""ACME Renewal Information (RFC 9773) and the order fields the `acme` library lacks.

- `cert_id(cert)`: the ARI certificate identifier,
  base64url(AKI keyIdentifier) "." base64url(DER serial content bytes), no padding.
- `fetch_renewal_info(...)`: GET <renewalInfo>/<cert id>, parse `suggestedWindow`
  and `Retry-After` into a `RenewalWindow` (UNIX seconds, UTC).
- `NewOrder`: the library's `messages.NewOrder` plus `replaces` (RFC 9773
  section 5); `profile` is already a field of the library's Order.
"""

from __future__ import annotations

import base64
import datetime
import email.utils
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from acme import messages
from cryptography import x509
from josepy.json_util import field

# RFC 9773 section 4.3: without Retry-After, poll again in about 6 hours; clamp
# what the server asks for to a sane range so a typo there cannot make us hammer
# the CA or go silent for months.
DEFAULT_RETRY_AFTER = 6 * 3600.0
MIN_RETRY_AFTER = 60.0
MAX_RETRY_AFTER = 86400.0


class ARIError(Exception):
    """The renewalInfo resource could not be fetched or parsed."""


class NewOrder(messages.NewOrder):  # type: ignore[misc]
    """newOrder payload with RFC 9773's `replaces` (the ARI id of the certificate replaced)."""

    replaces: str | None = field("replaces", omitempty=True)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def serial_bytes(serial: int) -> bytes:
    """DER INTEGER content octets of a (positive) serial: big-endian two's complement."""
    length = (serial.bit_length() + 8) // 8  # +1 bit for the sign, rounded up to bytes
    return serial.to_bytes(length, "big", signed=True)


def cert_id(cert: x509.Certificate) -> str:
    """RFC 9773 section 4.1 certificate identifier; ValueError if the cert has no AKI keyid."""
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        raise ValueError("certificate has no Authority Key Identifier") from None
    if aki.key_identifier is None:
        raise ValueError("certificate's Authority Key Identifier has no keyIdentifier")
    return f"{_b64url(aki.key_identifier)}.{_b64url(serial_bytes(cert.serial_number))}"


@dataclass(frozen=True)
class RenewalWindow:
    """A CA's suggested renewal window for one certificate.

    start/end: the window (UNIX seconds). selected: the random point inside it
    we chose to renew at (kept as long as the window does not change, so
    repeated checks do not re-roll the dice). next_check: when to ask again
    (from Retry-After). All times UNIX seconds, UTC.
    """

    cert_id: str
    start: float
    end: float
    selected: float
    next_check: float
    explanation_url: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "cert_id": self.cert_id,
            "start": self.start,
            "end": self.end,
            "selected": self.selected,
            "next_check": self.next_check,
            "explanation_url": self.explanation_url,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RenewalWindow:
        return cls(
            cert_id=str(data["cert_id"]),
            start=float(data["start"]),
            end=float(data["end"]),
            selected=float(data["selected"]),
            next_check=float(data["next_check"]),
            explanation_url=data.get("explanation_url"),
        )


def parse_retry_after(value: str | None, now: float, default: float) -> float:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date); default if absent."""
    if not value:
        return default
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return default
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, when.timestamp() - now)


def _rfc3339(value: object, what: str) -> float:
    if not isinstance(value, str):
        raise ARIError(f"suggestedWindow.{what} is missing or not a string")
    try:
        dt = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ARIError(f"suggestedWindow.{what} {value!r} is not an RFC 3339 time") from None
    if dt.tzinfo is None:
        raise ARIError(f"suggestedWindow.{what} {value!r} has no time zone")
    return dt.timestamp()


def parse_renewal_info(
    body: object,
    retry_after_header: str | None,
    cert_identifier: str,
    now: float,
    previous: RenewalWindow | None = None,
    rng: Callable[[float, float], float] = random.uniform,
) -> RenewalWindow:
    """Build a RenewalWindow from a renewalInfo JSON body.

    Keeps `previous.selected` when the window is unchanged; otherwise picks a
    uniformly random point in [start, end] with `rng`.
    """
    if not isinstance(body, dict) or not isinstance(body.get("suggestedWindow"), dict):
        raise ARIError("renewalInfo response has no suggestedWindow object")
    window = body["suggestedWindow"]
    start = _rfc3339(window.get("start"), "start")
    end = _rfc3339(window.get("end"), "end")
    if end < start:
        raise ARIError("suggestedWindow ends before it starts")
    if (
        previous is not None
        and previous.cert_id == cert_identifier
        and previous.start == start
        and previous.end == end
    ):
        selected = previous.selected
    else:
        selected = rng(start, end)
    wait = parse_retry_after(retry_after_header, now, DEFAULT_RETRY_AFTER)
    wait = min(max(wait, MIN_RETRY_AFTER), MAX_RETRY_AFTER)
    url = body.get("explanationURL")
    return RenewalWindow(
        cert_id=cert_identifier,
        start=start,
        end=end,
        selected=selected,
        next_check=now + wait,
        explanation_url=url if isinstance(url, str) else None,
    )


def fetch_renewal_info(
    get: Callable[[str], Any],
    renewal_info_url: str,
    cert: x509.Certificate,
    now: float,
    previous: RenewalWindow | None = None,
    rng: Callable[[float, float], float] = random.uniform,
) -> RenewalWindow:
    """GET the renewalInfo resource for `cert` (unauthenticated, RFC 9773 section 4.2).

    `get(url)` returns a requests-like response and raises on HTTP errors (the
    acme library's `ClientNetwork.get` does). Errors become ARIError.
    """
    ident = cert_id(cert)
    url = renewal_info_url.rstrip("/") + "/" + ident
    try:
        resp = get(url)
        body = resp.json()
    except ARIError:
        raise
    except Exception as e:
        raise ARIError(f"cannot fetch renewal info {url}: {e}") from e
    return parse_renewal_info(body, resp.headers.get("Retry-After"), ident, now, previous, rng)
