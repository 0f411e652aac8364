"""Errors that say what happened: truncated and dropped CA answers are retried, malformed ones
are a named AcmeProtocolError (no traceback), and key authorizations never leave the issuer.

Against the scripted stand-in CA on 127.0.0.1 (tests/support/fake_acme.py), which can cut an
answer short on demand; the leak of a key authorization is also checked against the real
Pebble in tests/integration/test_issuance_pebble.py.
"""

from __future__ import annotations

import json
import logging
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from acme import messages
from cryptography.hazmat.primitives.asymmetric import ec

from agent import issuer as issuer_mod
from agent import keys
from agent.challenges import MemoryChallengeRegistry
from agent.config import AcmeConfig, load_config
from agent.issuer import (
    AcmeProtocolError,
    Issuer,
    ValidationFailed,
    _problem_text,
    redact_key_authorizations,
)
from agent.renewal import Renewer
from agent.storage import FileStorage
from tests.support.fake_acme import TRUNCATE, FakeAcme, script_order
from tests.support.issued import TinyCA

CA = TinyCA()
CSR_KEY = ec.generate_private_key(ec.SECP256R1())
CSR = keys.csr_pem(keys.build_csr(CSR_KEY, ["a.example.com"]))
TOKEN = "tK9mZp3vQx7Lr2Wn5Yb8Cd4Fg6Hj1Ks0Ae-_Uo9Iy3Tq"
THUMB = "Yh7oP0aQ1lR8nS5cT2eV9mW6xZ3bU4dF7gH0jK1iL2o"  # 43 characters, like a SHA-256 b64url
KEY_AUTHZ = f"{TOKEN}.{THUMB}"


@pytest.fixture
def ca() -> Iterator[FakeAcme]:
    with FakeAcme() as fake:
        yield fake


def make_issuer(tmp_path: Path, ca: FakeAcme) -> Issuer:
    cfg = AcmeConfig(directory=ca.directory_url, timeout=10.0, poll_interval=0.01)
    return Issuer(cfg, FileStorage(tmp_path / "state"), MemoryChallengeRegistry())


def fullchain(domain: str = "a.example.com") -> bytes:
    import time

    now = time.time()
    return CA.fullchain(CA.leaf(CSR_KEY, [domain], now - 60, now + 86400))


def retries(cause: str) -> int:
    return issuer_mod.RETRY_COUNTS[cause]


def test_answer_shorter_than_its_content_length_is_retried_and_the_order_succeeds(
    tmp_path: Path, ca: FakeAcme
) -> None:
    cut = {"status": "pending", "authorizations": [ca.base + "/authz/1"], "finalize": "x" * 50}
    ca.script("/order", [(201, {TRUNCATE: "20", "Location": ca.base + "/order/1"}, cut)])
    chain = fullchain()
    script_order(ca, "a.example.com", chain, TOKEN)
    before = retries("truncated")
    issued = make_issuer(tmp_path, ca).issue(CSR, ["a.example.com"])
    assert issued.fullchain_pem.encode() == chain
    assert len(ca.posts("/order")) == 2
    assert retries("truncated") == before + 1


def test_json_body_cut_off_before_its_end_is_retried(tmp_path: Path, ca: FakeAcme) -> None:
    # The Content-Length matches, but the document stops mid-way (a proxy cut it).
    body = json.dumps({"status": "pending", "identifier": {"type": "dns"}}).encode()[:25]
    ca.script("/authz/1", [(200, {}, body)])
    script_order(ca, "a.example.com", fullchain(), TOKEN)
    before = retries("truncated")
    make_issuer(tmp_path, ca).issue(CSR, ["a.example.com"])
    assert retries("truncated") == before + 1
    assert len(ca.posts("/authz/1")) == 3  # cut, pending, valid


def test_connection_dropped_without_an_answer_is_retried(tmp_path: Path, ca: FakeAcme) -> None:
    ca.script("/cert/1", [(200, {TRUNCATE: "drop"}, b"")])  # remote end closed, no reply
    chain = fullchain()
    script_order(ca, "a.example.com", chain, TOKEN)
    before = retries("connection")
    issued = make_issuer(tmp_path, ca).issue(CSR, ["a.example.com"])
    assert issued.fullchain_pem.encode() == chain
    assert retries("connection") == before + 1
    assert len(ca.posts("/cert/1")) == 2


def test_garbage_instead_of_json_is_a_named_error(tmp_path: Path, ca: FakeAcme) -> None:
    ca.script("/order", [(201, {"Location": ca.base + "/order/1"}, b"<html>gateway</html>")])
    with pytest.raises(AcmeProtocolError) as e:
        make_issuer(tmp_path, ca).issue(CSR, ["a.example.com"])
    assert str(e.value).startswith(f"the CA's answer to POST {ca.base}/order is not valid JSON")
    assert len(ca.posts("/order")) == 1  # not retried: the same answer would come back


@pytest.mark.parametrize(
    "body, message",
    [
        ([], "is JSON list, not an order object"),
        ({"status": "pending"}, "an order object without authorizations, finalize"),
        ({"status": "sideways", "authorizations": ["x"], "finalize": "y"}, "not a valid order"),
    ],
)
def test_json_of_the_wrong_shape_is_a_named_error(
    tmp_path: Path, ca: FakeAcme, body: object, message: str
) -> None:
    ca.script("/order", [(201, {"Location": ca.base + "/order/1"}, body)])
    with pytest.raises(AcmeProtocolError, match=message):
        make_issuer(tmp_path, ca).issue(CSR, ["a.example.com"])


def test_malformed_answer_fails_the_renewal_with_its_reason_and_no_traceback(
    tmp_path: Path, ca: FakeAcme, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "config.toml").write_text(
        textwrap.dedent(
            f"""\
            state_dir = "state"
            [acme]
            directory = "{ca.directory_url}"
            poll_interval = 0.01
            [[certificates]]
            name = "www"
            domains = ["a.example.com"]
            key = "www.key"
            generate_key = true
            """
        )
    )
    config = load_config(tmp_path / "config.toml")
    ca.script("/order", [(201, {"Location": ca.base + "/order/1"}, b"{not json at all}")])
    caplog.set_level(logging.DEBUG)
    [result] = Renewer(config, MemoryChallengeRegistry()).run(None, force=False, dry_run=False)
    assert result.status == "failed"
    assert result.reason.startswith(f"the CA's answer to POST {ca.base}/order is not valid JSON")
    assert [r for r in caplog.records if r.exc_info] == []
    assert "Traceback" not in caplog.text


# --- key authorizations ----------------------------------------------------------------

PEBBLE_DETAIL = (
    'The key authorization file from the server did not match this challenge "'
    + KEY_AUTHZ
    + '" != "wrong"'
)


def test_redaction_keeps_the_token_and_drops_the_thumbprint() -> None:
    clean = redact_key_authorizations(PEBBLE_DETAIL)
    assert KEY_AUTHZ not in clean and THUMB not in clean
    assert f"{TOKEN}.{issuer_mod.REDACTED}" in clean
    # Host names and URLs are left alone.
    url = "http://a.example.com/.well-known/acme-challenge/" + TOKEN
    assert redact_key_authorizations(url) == url


def test_problem_texts_and_validation_errors_hold_no_key_authorization() -> None:
    err = messages.Error.from_json(
        {
            "type": "urn:ietf:params:acme:error:unauthorized",
            "detail": PEBBLE_DETAIL,
            "subproblems": [
                {
                    "type": "urn:ietf:params:acme:error:unauthorized",
                    "detail": PEBBLE_DETAIL,
                    "identifier": {"type": "dns", "value": "a.example.com"},
                }
            ],
        }
    )
    assert KEY_AUTHZ not in _problem_text(err)
    assert KEY_AUTHZ not in str(ValidationFailed("a.example.com", PEBBLE_DETAIL))


def test_failed_validation_from_the_ca_carries_no_key_authorization(
    tmp_path: Path, ca: FakeAcme, caplog: pytest.LogCaptureFixture
) -> None:
    script_order(ca, "a.example.com", fullchain(), TOKEN)
    chall = {
        "type": "http-01",
        "url": ca.base + "/chall/1",
        "token": TOKEN,
        "status": "invalid",
        "error": {"type": "urn:ietf:params:acme:error:unauthorized", "detail": PEBBLE_DETAIL},
    }
    invalid = {
        "status": "invalid",
        "identifier": {"type": "dns", "value": "a.example.com"},
        "challenges": [chall],
    }
    ca._scripts["/authz/1"][1] = (200, {}, invalid)  # pending first, then invalid
    caplog.set_level(logging.DEBUG)  # the acme library dumps every answer at DEBUG
    with pytest.raises(ValidationFailed) as e:
        make_issuer(tmp_path, ca).issue(CSR, ["a.example.com"])
    assert "did not match" in str(e.value)
    assert KEY_AUTHZ not in str(e.value)
    assert THUMB not in caplog.text


def test_directory_answered_with_an_html_page_is_a_named_error(
    tmp_path: Path, ca: FakeAcme
) -> None:
    ca.script("/dir", [(200, {"Content-Type": "text/html"}, b"<html>captive portal</html>")])
    with pytest.raises(AcmeProtocolError) as e:
        make_issuer(tmp_path, ca).connect()
    assert str(e.value).startswith(f"the CA's answer to GET {ca.directory_url} is not valid JSON")
    assert "text/html" in str(e.value)


def test_directory_cut_off_is_retried(tmp_path: Path, ca: FakeAcme) -> None:
    ca.script("/dir", [(200, {}, b'{"newNonce": "http://127.0.0.1:1/n')])
    before = retries("truncated")
    make_issuer(tmp_path, ca).connect()
    assert retries("truncated") == before + 1
    assert len(ca.gets("/dir")) == 2
