"""`stored_targets` caches by generation id and key file identity.

A reconcile pass over unchanged certificates must not re-read and re-parse
every generation and key: at 10,000 certificates that is seconds of CPU
every pass. These tests count PEM parses and storage reads (never time).
"""

from __future__ import annotations

import os
import types
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent import certstate, renewal
from agent.config import CertificateConfig
from agent.deploy import stored_targets
from agent.storage import FileStorage
from tests.support.certs import CA, issue_leaf, key_pem, make_ca, make_key


class CountingStorage(FileStorage):
    """A FileStorage that records every key it loads."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.loads: list[str] = []

    def load(self, key: str) -> bytes:
        self.loads.append(key)
        return super().load(key)

    def load_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        keys = list(keys)
        self.loads.extend(keys)
        return super().load_many(keys)


@pytest.fixture
def ca() -> CA:
    return make_ca()


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every PEM parse (certificate or private key) and key-file bundle assembly."""
    seen: list[str] = []

    def counting(label: str, fn: Any) -> Any:
        def wrapped(*a: Any, **kw: Any) -> Any:
            seen.append(label)
            return fn(*a, **kw)

        return wrapped

    monkeypatch.setattr(
        x509, "load_pem_x509_certificate", counting("cert", x509.load_pem_x509_certificate)
    )
    monkeypatch.setattr(
        x509, "load_pem_x509_certificates", counting("certs", x509.load_pem_x509_certificates)
    )
    monkeypatch.setattr(
        serialization, "load_pem_private_key", counting("key", serialization.load_pem_private_key)
    )
    monkeypatch.setattr(renewal, "node_bundle", counting("node_bundle", renewal.node_bundle))
    yield seen


def _install(storage: FileStorage, ca: CA, name: str, key: Any, installed_at: float) -> str:
    leaf = issue_leaf(ca, key, [f"{name}.example.test"])
    meta = certstate.install_generation(storage, name, leaf, [ca.cert], installed_at, None)
    assert meta.generation is not None
    return format(leaf.serial_number, "x")


def _write_key(path: Path, key: Any) -> None:
    tmp = path.with_suffix(".new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem(key))
    os.replace(tmp, path)  # a new inode, as a key rollover's atomic write makes


def _setup(tmp_path: Path, ca: CA, count: int = 3) -> tuple[CountingStorage, Any, list[Any]]:
    storage = CountingStorage(tmp_path / "state")
    certs = []
    node_keys = []
    for i in range(count):
        name = f"site{i}"
        key = make_key()
        key_path = tmp_path / f"{name}.key"
        _write_key(key_path, key)
        _install(storage, ca, name, key, 1_800_000_000.0 + i)
        certs.append(CertificateConfig(name=name, domains=(f"{name}.example.test",), key=key_path))
        node_keys.append(key)
    return storage, types.SimpleNamespace(certificates=certs), node_keys


def _only_pointer_reads(loads: list[str]) -> bool:
    return all(k.endswith("/current") for k in loads)


def test_second_pass_with_nothing_changed_parses_nothing_and_reads_only_pointers(
    tmp_path: Path, ca: CA, parses: list[str]
) -> None:
    storage, config, _ = _setup(tmp_path, ca)
    first = stored_targets(config, storage)
    assert len(first) == 3
    assert parses and storage.loads  # the first pass reads and checks everything
    parses.clear()
    storage.loads.clear()
    second = stored_targets(config, storage)
    assert second == first
    assert parses == []
    assert len(storage.loads) == 3 and _only_pointer_reads(storage.loads)


def test_a_new_generation_is_picked_up(tmp_path: Path, ca: CA, parses: list[str]) -> None:
    storage, config, node_keys = _setup(tmp_path, ca)
    first = {t.name: t for t in stored_targets(config, storage)}
    serial = _install(storage, ca, "site1", node_keys[1], 1_800_000_100.0)
    parses.clear()
    storage.loads.clear()
    second = {t.name: t for t in stored_targets(config, storage)}
    assert format(second["site1"].serial, "x") == serial != format(first["site1"].serial, "x")
    assert second["site0"] == first["site0"] and second["site2"] == first["site2"]
    # Only site1's generation was read again.
    assert {k for k in storage.loads if not k.endswith("/current")} and all(
        k.startswith("certificates/site1/") for k in storage.loads if not k.endswith("/current")
    )
    assert parses.count("node_bundle") == 1


def test_a_replaced_key_file_is_picked_up_and_checked(
    tmp_path: Path, ca: CA, parses: list[str]
) -> None:
    storage, config, node_keys = _setup(tmp_path, ca)
    stored_targets(config, storage)
    key_path = config.certificates[2].key
    # The same key rewritten (new inode): the bundle is rebuilt from the file.
    _write_key(key_path, node_keys[2])
    parses.clear()
    again = {t.name: t for t in stored_targets(config, storage)}
    assert parses.count("node_bundle") == 1
    assert key_pem(node_keys[2]).strip() in again["site2"].bundle
    # A foreign key: refused (never served from the cache), naming the key file.
    _write_key(key_path, make_key())
    with pytest.raises(ValueError, match=str(key_path)):
        stored_targets(config, storage)


def test_a_key_path_changed_in_the_config_misses_the_cache(
    tmp_path: Path, ca: CA, parses: list[str]
) -> None:
    storage, config, node_keys = _setup(tmp_path, ca, count=1)
    stored_targets(config, storage)
    other = tmp_path / "moved.key"
    _write_key(other, node_keys[0])
    config.certificates[0] = CertificateConfig(
        name="site0", domains=("site0.example.test",), key=other
    )
    parses.clear()
    assert len(stored_targets(config, storage)) == 1
    assert parses.count("node_bundle") == 1


def test_a_generation_ordered_for_a_next_key_this_node_lacks_is_a_key_mismatch(
    tmp_path: Path, ca: CA
) -> None:
    """In a fleet the ordering node switched to its next key; a node the operator
    has not yet copied that file to refuses the certificate as a key mismatch
    (the fleet's metric and log), naming the missing file, not a generic error."""
    from agent.deploy import KeyMismatch, stored_target

    storage = FileStorage(tmp_path / "state")
    key_path = tmp_path / "www.key"
    _write_key(key_path, make_key())
    next_path = tmp_path / "www.next.key"  # configured, not on this node yet
    next_key = make_key()
    leaf = issue_leaf(ca, next_key, ["www.example.test"])
    certstate.install_generation(
        storage, "www", leaf, [ca.cert], 1_800_000_000.0, None, key_path=str(next_path)
    )
    cert = CertificateConfig(
        name="www", domains=("www.example.test",), key=key_path, next_key=next_path
    )
    with pytest.raises(KeyMismatch) as caught:
        stored_target(cert, storage)
    assert caught.value.serial == leaf.serial_number
    assert str(next_path) in str(caught.value) and "'www'" in str(caught.value)
    _write_key(next_path, next_key)  # the copy arrives: deployable
    target = stored_target(cert, storage)
    assert target is not None
