"""ARI (RFC 9773): certificate ids, renewalInfo parsing, fetching from an ARI-speaking stand-in.

Pebble 2.4 has no renewalInfo; the stand-in directory (tests/support/fake_acme.py)
serves one on 127.0.0.1.
"""

from __future__ import annotations

import email.utils
import json
import time
from pathlib import Path

import pytest
from acme import client as acme_client
from acme import messages
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from agent import ari
from agent.challenges import MemoryChallengeRegistry
from agent.config import AcmeConfig
from agent.issuer import Issuer
from agent.storage import FileStorage
from tests.support.fake_acme import FakeAcme
from tests.support.issued import TinyCA, utc

KEY = ec.generate_private_key(ec.SECP256R1())
CA = TinyCA()
NOW = time.time()


def test_cert_id_matches_the_rfc_9773_example() -> None:
    aki = bytes.fromhex("69885B6B87464041E1B37B847BA0AE2CDE01C8D4")
    cert = CA.leaf(KEY, ["a.example.com"], NOW - 10, NOW + 100, serial=0x87654321, aki=aki)
    assert ari.cert_id(cert) == "aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE"


@pytest.mark.parametrize("serial", [1, 0x7F, 0x80, 0xFF, 0x0100, 2**159 - 1, 0x87654321])
def test_cert_id_agrees_with_the_acme_librarys_encoding(serial: int) -> None:
    cert = CA.leaf(KEY, ["a.example.com"], NOW - 10, NOW + 100, serial=serial)
    assert ari.cert_id(cert) == acme_client._renewal_info_path_component(cert)


def test_cert_without_aki_has_no_ari_id() -> None:
    cert = (
        x509.CertificateBuilder()
        .subject_name(CA.intermediate.subject)
        .issuer_name(CA.intermediate.subject)
        .public_key(KEY.public_key())
        .serial_number(5)
        .not_valid_before(utc(NOW - 10))
        .not_valid_after(utc(NOW + 10))
        .sign(CA.int_key, hashes.SHA256())
    )
    with pytest.raises(ValueError, match="Authority Key Identifier"):
        ari.cert_id(cert)


WINDOW = {"suggestedWindow": {"start": "2030-01-01T00:00:00Z", "end": "2030-01-03T00:00:00Z"}}
START, END = 1893456000.0, 1893628800.0


def test_renewal_info_window_and_random_point_inside_it() -> None:
    w = ari.parse_renewal_info(WINDOW, None, "id", NOW)
    assert (w.start, w.end) == (START, END)
    assert START <= w.selected <= END
    assert w.next_check == pytest.approx(NOW + ari.DEFAULT_RETRY_AFTER)


def test_unchanged_window_keeps_the_chosen_point_and_a_new_one_rerolls() -> None:
    first = ari.parse_renewal_info(WINDOW, None, "id", NOW, rng=lambda a, b: a + 1)
    again = ari.parse_renewal_info(WINDOW, None, "id", NOW + 5, first, rng=lambda a, b: b)
    assert again.selected == first.selected == START + 1
    moved = {"suggestedWindow": {"start": "2030-02-01T00:00:00Z", "end": "2030-02-02T00:00:00Z"}}
    changed = ari.parse_renewal_info(moved, None, "id", NOW, first, rng=lambda a, b: b)
    assert changed.selected == changed.end


@pytest.mark.parametrize(
    "header, expected",
    [
        ("120", 120.0),
        ("5", ari.MIN_RETRY_AFTER),
        ("9999999", ari.MAX_RETRY_AFTER),
        ("junk", 21600.0),
    ],
)
def test_retry_after_sets_the_next_check_within_sane_bounds(header: str, expected: float) -> None:
    w = ari.parse_renewal_info(WINDOW, header, "id", NOW)
    assert w.next_check - NOW == pytest.approx(expected)


def test_retry_after_as_http_date() -> None:
    header = email.utils.formatdate(NOW + 7200, usegmt=True)
    w = ari.parse_renewal_info(WINDOW, header, "id", NOW)
    assert w.next_check - NOW == pytest.approx(7200, abs=2)


@pytest.mark.parametrize(
    "body, message",
    [
        ({}, "no suggestedWindow"),
        ({"suggestedWindow": {"start": "2030-01-01T00:00:00Z"}}, "end is missing"),
        ({"suggestedWindow": {"start": "yesterday", "end": "2030-01-01T00:00:00Z"}}, "RFC 3339"),
        (
            {"suggestedWindow": {"start": "2030-01-02T00:00:00Z", "end": "2030-01-01T00:00:00Z"}},
            "ends before it starts",
        ),
    ],
)
def test_malformed_renewal_info_is_an_ari_error(body: object, message: str) -> None:
    with pytest.raises(ari.ARIError, match=message):
        ari.parse_renewal_info(body, None, "id", NOW)


def test_window_round_trips_through_json() -> None:
    w = ari.parse_renewal_info({**WINDOW, "explanationURL": "https://ca/why"}, "60", "id", NOW)
    assert ari.RenewalWindow.from_json(json.loads(json.dumps(w.to_json()))) == w
    assert w.explanation_url == "https://ca/why"


def test_new_order_message_carries_replaces_and_profile_only_when_set() -> None:
    ident = [messages.Identifier(typ=messages.IDENTIFIER_FQDN, value="a.example.com")]
    full = json.loads(ari.NewOrder(identifiers=ident, replaces="x.y", profile="p").json_dumps())
    assert full["replaces"] == "x.y" and full["profile"] == "p"
    bare = json.loads(ari.NewOrder(identifiers=ident).json_dumps())
    assert "replaces" not in bare and "profile" not in bare
    assert isinstance(ari.NewOrder(identifiers=ident), messages.NewOrder)


def _issuer(tmp_path: Path, url: str) -> Issuer:
    return Issuer(
        AcmeConfig(directory=url, timeout=5.0),
        FileStorage(tmp_path / "state"),
        MemoryChallengeRegistry(),
    )


def test_issuer_fetches_the_window_from_the_directorys_renewal_info(tmp_path: Path) -> None:
    cert = CA.leaf(KEY, ["a.example.com"], NOW - 10, NOW + 86400)
    with FakeAcme() as fake:
        fake.script(f"/ari/{ari.cert_id(cert)}", [(200, {"Retry-After": "3600"}, WINDOW)])
        w = _issuer(tmp_path, fake.directory_url).renewal_info(cert)
        assert fake.gets("/ari/") == [f"/ari/{ari.cert_id(cert)}"]
    assert w is not None
    assert (w.start, w.end, w.cert_id) == (START, END, ari.cert_id(cert))
    assert w.next_check == pytest.approx(time.time() + 3600, abs=5)


def test_issuer_without_renewal_info_in_the_directory_returns_none(tmp_path: Path) -> None:
    cert = CA.leaf(KEY, ["a.example.com"], NOW - 10, NOW + 86400)
    with FakeAcme(renewal_info=False) as fake:
        assert _issuer(tmp_path, fake.directory_url).renewal_info(cert) is None
        assert fake.gets("/ari/") == []


def test_issuer_renewal_info_error_is_an_ari_error(tmp_path: Path) -> None:
    cert = CA.leaf(KEY, ["a.example.com"], NOW - 10, NOW + 86400)
    with FakeAcme() as fake, pytest.raises(ari.ARIError, match="cannot fetch renewal info"):
        _issuer(tmp_path, fake.directory_url).renewal_info(cert)
