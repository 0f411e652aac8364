"""Every storage key and HAProxy file path of a certificate comes from agent.layout."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from agent import layout
from agent.storage import StorageKeyError

GEN = "1800000000123-1a2b"

# (what, function, arguments, expected)
TABLE: list[tuple[str, Callable[..., object], tuple[object, ...], object]] = [
    ("prefix", layout.cert_prefix, ("www",), "certificates/www"),
    ("pointer", layout.current_key, ("www",), "certificates/www/current"),
    ("state", layout.state_key, ("www.example.com",), "certificates/www.example.com/state.json"),
    ("generations", layout.generations_prefix, ("www",), "certificates/www/gen"),
    ("generation", layout.generation_prefix, ("www", GEN), f"certificates/www/gen/{GEN}"),
    ("leaf", layout.generation_key, ("www", GEN, "cert.pem"),
     f"certificates/www/gen/{GEN}/cert.pem"),
    ("chain", layout.generation_key, ("www", GEN, "chain.pem"),
     f"certificates/www/gen/{GEN}/chain.pem"),
    ("fullchain", layout.generation_key, ("www", GEN, "fullchain.pem"),
     f"certificates/www/gen/{GEN}/fullchain.pem"),
    ("meta", layout.generation_key, ("www", GEN, "meta.json"),
     f"certificates/www/gen/{GEN}/meta.json"),
    ("old bundle", layout.legacy_key, ("www", "bundle.pem"), "certificates/www/bundle.pem"),
    ("old meta", layout.legacy_key, ("www", "meta.json"), "certificates/www/meta.json"),
    ("any file", layout.cert_key, ("www", "state.json"), "certificates/www/state.json"),
    ("lock", layout.cert_lock, ("www",), "cert-www"),
    ("bundle file", layout.bundle_path, (Path("/etc/haproxy/certs"), "www"),
     Path("/etc/haproxy/certs/www.pem")),
    ("generation id", layout.new_generation_id, (1_800_000_000.1234, 0x1A2B), GEN),
    ("early id sorts first", layout.new_generation_id, (99.0, 1), "0000000099000-1"),
    ("temp of a bundle", layout.temp_target, (".www.pem.k2j_8x9a.tmp",), "www.pem"),
    ("not a temp", layout.temp_target, ("www.pem",), None),
    ("dns-01 journal", layout.dns_pending_key, ("www", "0a1b"), "dns/pending/www-0a1b.json"),
    ("dns-persist records", layout.dns_persist_key, ("www",), "dns/persist/www.json"),
    ("dual: rsa key's name", layout.variant_name, ("www", "rsa"), "www.rsa"),
    ("dual: ecdsa key's name", layout.variant_name, ("www", "ecdsa"), "www.ecdsa"),
    ("dual: pair pointer", layout.pair_key, ("www",), "pairs/www.json"),
    ("dual: rsa bundle file", layout.bundle_path, (Path("/c"), "www.rsa"), Path("/c/www.rsa.pem")),
    ("dual: rsa key storage", layout.current_key, ("www.rsa",), "certificates/www.rsa/current"),
    ("key kind of rsa4096", layout.key_kind, ("rsa4096",), "rsa"),
    ("key kind of ec384", layout.key_kind, ("ec384",), "ecdsa"),
]  # fmt: skip


@pytest.mark.parametrize(("what", "fn", "args", "expected"), TABLE, ids=[t[0] for t in TABLE])
def test_layout_names(
    what: str, fn: Callable[..., object], args: tuple[object, ...], expected: object
) -> None:
    assert fn(*args) == expected


@pytest.mark.parametrize(
    ("fn", "args"),
    [
        (layout.current_key, ("../etc",)),
        (layout.state_key, ("a/b",)),
        (layout.cert_key, ("www", "../x")),
        (layout.bundle_path, (Path("/c"), "../../etc/passwd")),
        (layout.cert_lock, (".hidden",)),
        (layout.dns_pending_key, ("../x", "00")),
        (layout.dns_persist_key, ("a/b",)),
        (layout.variant_name, ("../x", "rsa")),
        (layout.pair_key, ("a/b",)),
    ],
)
def test_hostile_names_are_refused(fn: Callable[..., object], args: tuple[object, ...]) -> None:
    with pytest.raises(StorageKeyError):
        fn(*args)


@pytest.mark.parametrize("bad", ["", "current", "123-abc", "1800000000123-XYZ", "../1"])
def test_generation_ids_are_checked(bad: str) -> None:
    with pytest.raises(ValueError, match="generation id"):
        layout.generation_prefix("www", bad)


def test_a_generation_has_exactly_its_four_files_and_meta_is_written_last() -> None:
    assert layout.GENERATION_FILES[-1] == "meta.json"
    with pytest.raises(ValueError, match="not a file of a generation"):
        layout.generation_key("www", GEN, "bundle.pem")  # no key material in a generation


def test_generation_ids_sort_by_install_time() -> None:
    ids = [layout.new_generation_id(t, s) for t, s in [(1e9, 0xFFFF), (2e9, 1), (1.5e9, 7)]]
    assert sorted(ids) == [ids[0], ids[2], ids[1]]
