"""Deploy facts in a fleet: nodes share state.json and often name their runtime
API alike (unix:/run/haproxy/admin.sock everywhere), so each node's facts are
kept under its own key and never read as another node's."""

from __future__ import annotations

import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from agent import layout
from agent.certstate import install_generation, load_meta, undeployed
from agent.deploy import SyncStatus
from agent.renewal import record_sync
from agent.storage import FileStorage
from tests.support.issued import TinyCA

SOCKET = "unix:/run/haproxy/admin.sock"  # the same path on every node


def _stored(tmp_path: Path) -> tuple[FileStorage, int]:
    storage = FileStorage(tmp_path / "state")
    key = ec.generate_private_key(ec.SECP256R1())
    ca = TinyCA()
    now = time.time()
    leaf = ca.leaf(key.public_key(), ["www.example.com"], now - 60, now + 86400, serial=0x51)
    with storage.locked(layout.cert_lock("www")):
        install_generation(storage, "www", leaf, (), now, "https://ca/dir")
    return storage, 0x51


def test_a_node_serving_the_old_serial_is_not_hidden_by_another_nodes_fact(
    tmp_path: Path,
) -> None:
    storage, serial = _stored(tmp_path)
    now = time.time()
    record_sync(storage, [SyncStatus("www", SOCKET, serial, serial, True)], now, "edge-a")
    record_sync(storage, [SyncStatus("www", SOCKET, 0x50, serial, False)], now, "edge-b")
    meta = load_meta(storage, "www")
    assert undeployed(meta, [SOCKET], "edge-a") == []
    assert undeployed(meta, [SOCKET], "edge-b") == [SOCKET]  # B still serves 0x50
    assert undeployed(meta, [SOCKET], "edge-c") == [SOCKET]  # C never reported
    assert meta is not None
    assert set(meta.deployed) == {"edge-a|" + SOCKET, "edge-b|" + SOCKET}


def test_a_single_node_keeps_its_facts_under_the_plain_instance_name(tmp_path: Path) -> None:
    storage, serial = _stored(tmp_path)
    record_sync(storage, [SyncStatus("www", SOCKET, serial, serial, True)], time.time())
    meta = load_meta(storage, "www")
    assert meta is not None and set(meta.deployed) == {SOCKET}
    assert undeployed(meta, [SOCKET]) == []
