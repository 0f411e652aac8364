"""Issuer retries, typed errors, account handling, `replaces`/`profile`: against a stand-in CA.

The full order flow with real validation is proven against the real Pebble in
tests/integration/test_issuance_pebble.py; these tests pin the behaviours
Pebble cannot be made to show on demand (503, rateLimited, exact badNonce
counts, refused `replaces`, profiles, EAB).
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent import keys
from agent.challenges import MemoryChallengeRegistry
from agent.config import AcmeConfig
from agent.issuer import (
    MAX_BAD_NONCE,
    AccountError,
    AcmeServerError,
    AcmeUnreachable,
    Issuer,
    RateLimited,
    account_slug,
)
from agent.storage import FileStorage
from tests.support.fake_acme import FakeAcme, problem
from tests.support.haproxy import free_port


@pytest.fixture
def ca() -> Iterator[FakeAcme]:
    with FakeAcme() as fake:
        yield fake


def make_issuer(tmp_path: Path, directory: str, **acme: object) -> Issuer:
    settings: dict[str, object] = {"email": "ops@example.com", "timeout": 5.0, **acme}
    cfg = AcmeConfig(directory=directory, **settings)  # type: ignore[arg-type]
    return Issuer(cfg, FileStorage(tmp_path / "state"), MemoryChallengeRegistry())


CSR_KEY = ec.generate_private_key(ec.SECP256R1())
CSR = keys.csr_pem(keys.build_csr(CSR_KEY, ["a.example.com"]))


def test_account_key_is_created_once_0600_and_reused(tmp_path: Path, ca: FakeAcme) -> None:
    make_issuer(tmp_path, ca.directory_url).connect()
    key_file = tmp_path / "state" / "accounts" / account_slug(ca.directory_url) / "account.key"
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    first = key_file.read_bytes()
    make_issuer(tmp_path, ca.directory_url).connect()
    assert key_file.read_bytes() == first
    reg = ca.posts("/acct")
    assert reg[0]["termsOfServiceAgreed"] is True
    assert reg[0]["contact"] == ["mailto:ops@example.com"]


def test_existing_account_is_found_by_its_key(tmp_path: Path, ca: FakeAcme) -> None:
    # RFC 8555 7.3.1: 200 + Location for a key that is already registered.
    ca.script("/acct", [(200, {"Location": ca.base + "/acct/42"}, {"status": "valid"})])
    issuer = make_issuer(tmp_path, ca.directory_url)
    issuer.connect()
    assert issuer.account is not None and issuer.account.uri == ca.base + "/acct/42"


def test_bad_nonces_are_retried_beyond_the_librarys_single_retry(
    tmp_path: Path, ca: FakeAcme
) -> None:
    ca.script("/acct", [problem("badNonce")] * 5)
    make_issuer(tmp_path, ca.directory_url).connect()
    assert len(ca.posts("/acct")) == 6


def test_endless_bad_nonces_give_up_with_an_account_error(tmp_path: Path, ca: FakeAcme) -> None:
    ca.script("/acct", [problem("badNonce")] * (MAX_BAD_NONCE + 5))
    with pytest.raises(AccountError, match="badNonce"):
        make_issuer(tmp_path, ca.directory_url).connect()
    assert len(ca.posts("/acct")) == MAX_BAD_NONCE + 1


def test_5xx_is_retried_after_the_cas_retry_after(tmp_path: Path, ca: FakeAcme) -> None:
    ca.script(
        "/acct", [(503, {"Retry-After": "1"}, b"busy"), problem("serverInternal", status=500)]
    )
    t0 = time.monotonic()
    make_issuer(tmp_path, ca.directory_url).connect()
    assert time.monotonic() - t0 >= 1.0
    assert len(ca.posts("/acct")) == 3


def test_persistent_5xx_gives_up_within_the_deadline(tmp_path: Path, ca: FakeAcme) -> None:
    ca.script("/dir", [(502, {}, b"bad gateway")] * 200)
    with pytest.raises(AcmeServerError, match="HTTP 502"):
        make_issuer(tmp_path, ca.directory_url, timeout=1.0).connect()


def test_retry_after_beyond_the_deadline_fails_at_once_and_says_so(
    tmp_path: Path, ca: FakeAcme
) -> None:
    ca.script("/dir", [(503, {"Retry-After": "600"}, b"maintenance")])
    t0 = time.monotonic()
    with pytest.raises(AcmeServerError, match="retry after 600 s"):
        make_issuer(tmp_path, ca.directory_url, timeout=2.0).connect()
    assert time.monotonic() - t0 < 2.0


def test_unreachable_ca_is_a_typed_error(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/dir"
    with pytest.raises(AcmeUnreachable, match="connection refused"):
        make_issuer(tmp_path, url, timeout=0.5).connect()


def test_rate_limited_stops_at_once_with_the_retry_time(tmp_path: Path, ca: FakeAcme) -> None:
    reply = problem("rateLimited", "too many certificates for example.com", 429)
    ca.script("/order", [(reply[0], {**reply[1], "Retry-After": "3600"}, reply[2])])
    issuer = make_issuer(tmp_path, ca.directory_url)
    with pytest.raises(RateLimited) as e:
        issuer.issue(CSR, ["a.example.com"])
    assert "rate limited by the CA: too many certificates for example.com" in str(e.value)
    assert e.value.retry_after is not None
    assert 3500 < e.value.retry_after - time.time() <= 3600
    assert len(ca.posts("/order")) == 1


def test_order_carries_replaces_and_is_retried_without_it_when_refused(
    tmp_path: Path, ca: FakeAcme
) -> None:
    ca.script(
        "/order",
        [
            problem("alreadyReplaced", "certificate already replaced", 409),
            problem("unauthorized", "stop here", 403),
        ],
    )
    issuer = make_issuer(tmp_path, ca.directory_url)
    with pytest.raises(AcmeServerError, match="unauthorized: stop here"):
        issuer.issue(CSR, ["a.example.com"], replaces="aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE")
    first, second = ca.posts("/order")
    assert first["replaces"] == "aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE"
    assert first["identifiers"] == [{"type": "dns", "value": "a.example.com"}]
    assert "replaces" not in second


def test_profile_is_sent_when_the_ca_offers_it(tmp_path: Path) -> None:
    with FakeAcme(profiles={"shortlived": "6-day certificates"}) as fake:
        fake.script("/order", [problem("unauthorized", "stop here", 403)])
        with pytest.raises(AcmeServerError):
            make_issuer(tmp_path, fake.directory_url, profile="shortlived").issue(
                CSR, ["a.example.com"]
            )
        assert fake.posts("/order")[0]["profile"] == "shortlived"


def test_profile_the_ca_does_not_offer_is_refused_by_name(tmp_path: Path) -> None:
    with FakeAcme(profiles={"classic": "x"}) as fake:
        with pytest.raises(
            AcmeServerError, match=r"acme\.profile 'tlsserver' is not offered.*classic"
        ):
            make_issuer(tmp_path, fake.directory_url, profile="tlsserver").connect()
        assert fake.posts("/acct") == []


def test_eab_is_sent_and_required_eab_is_explained(tmp_path: Path) -> None:
    with FakeAcme(eab_required=True) as fake:
        with pytest.raises(AccountError, match=r"acme\.eab_kid and acme\.eab_hmac_key"):
            make_issuer(tmp_path, fake.directory_url).connect()
        make_issuer(
            tmp_path, fake.directory_url, eab_kid="kid-1", eab_hmac_key="c2VjcmV0LWhtYWMta2V5"
        ).connect()
        eab = fake.posts("/acct")[0]["externalAccountBinding"]
        assert set(eab) == {"protected", "payload", "signature"}


def test_registration_refused_is_an_account_error(tmp_path: Path, ca: FakeAcme) -> None:
    ca.script("/acct", [problem("invalidContact", "mail domain does not exist", 400)])
    with pytest.raises(AccountError, match="invalidContact: mail domain does not exist"):
        make_issuer(tmp_path, ca.directory_url).connect()


def test_polling_starts_fast_doubles_to_the_cap_and_follows_retry_after() -> None:
    from agent.issuer import PollSchedule

    polls = PollSchedule(cap=2.0)
    waits = []
    for _ in range(8):
        waits.append(polls.wait)
        polls.step()
    assert waits == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    polls.retry_after(5.0)  # the CA asks for longer than the cap: it wins
    assert polls.wait == 5.0
    polls.step()
    polls.retry_after(0.3)  # and for shorter: that too
    assert polls.wait == 0.3
    polls.step()
    polls.retry_after(None)  # no header: doubling goes on from there
    assert polls.wait == 0.6
