"""FleetSync's batching and its triggers, against a real redis-server with a
recording deployer: a burst of 200 "certificate changed" messages becomes ONE
reconcile of the 200 (one deploy_batch per instance), our own messages are
left to our deploy hook, every (re)subscription compares everything, and a
refused key is reported by name."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis

from agent import fleet_sync
from agent.certstate import install_generation, load_metas
from agent.config import CertificateConfig
from agent.deploy import DeployTarget, KeyMismatch, SyncStatus
from agent.fleet import publish_changed
from agent.fleet_sync import FleetSync, served_serials
from agent.storage import FileStorage
from tests.support.certs import issue_leaf, key_pem, make_ca, make_key
from tests.support.redis import RoundTrips, counting_client, redis_available, shared_redis


@dataclass
class Cert:
    name: str


class Config:
    def __init__(self, names: Iterable[str]) -> None:
        self.certificates = [Cert(n) for n in names]


class RecordingDeployer:
    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def status(self) -> list[SyncStatus]:
        return []

    def instances(self) -> list[str]:
        return ["unix:/run/haproxy/admin.sock"]

    def reconcile(self, targets: Iterable[DeployTarget], instances: Any) -> list[SyncStatus]:
        names = [t.name for t in targets]
        self.calls.append(names)
        inst = "unix:/run/haproxy/admin.sock"
        return [SyncStatus(n, inst, 1, 1, True, pushed=True) for n in names]

    def finish(self) -> bool:
        return False


class FakeDaemon:
    def __init__(self, names: list[str], state: Path) -> None:
        self.config = Config(names)
        self.storage = FileStorage(state)
        self.deployer = RecordingDeployer()
        self._closing = threading.Event()
        self._fresh_metas: dict[str, Any] = {}
        self._heartbeat = None

    def clock(self) -> float:
        return time.time()


NAMES = [f"c{i:03d}" for i in range(200)]


def fake_targets(
    config: Any, storage: Any, names: Iterable[str] | None = None, pointers: Any = None
) -> tuple[list[DeployTarget], dict[str, KeyMismatch]]:
    refused = {"c199": KeyMismatch("certificate 'c199': the private key does not belong", 0x99)}
    targets = [
        DeployTarget(c.name, b"", 1, (f"{c.name}.test",))
        for c in config.certificates
        if c.name not in refused
    ]
    return targets, refused


def test_a_burst_of_200_messages_is_one_reconcile_and_our_own_are_skipped(
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    if not redis_available():
        pytest.fail("redis-server is not installed (scripts/setup.sh installs it)")
    monkeypatch.setattr(fleet_sync, "node_targets", fake_targets)
    monkeypatch.setattr(fleet_sync.FleetSync, "_record", lambda self, statuses, names: None)
    url, ns = shared_redis(tmp_path_factory).url, "t" + os.urandom(8).hex()
    client = redis.Redis.from_url(url)
    daemon = FakeDaemon(NAMES, tmp_path / "state")

    async def main() -> list[list[str]]:
        sync = FleetSync(daemon, client, ns, "edge-b")  # type: ignore[arg-type]
        task = asyncio.create_task(sync.run())
        try:
            for _ in range(500):  # the first subscription: one full pass
                if daemon.deployer.calls and sync.view.key_mismatch:
                    break
                await asyncio.sleep(0.02)
            assert daemon.deployer.calls == [NAMES[:199]]
            assert sync.view.key_mismatch["c199"] is True and sync.refused() == ["c199"]
            # Our own message: our deploy hook deploys it, no pass.
            publish_changed(client, ns, "c000", "1", 1, "edge-b")
            # 200 renewed at once on another node: one burst of messages.
            pipe = client.pipeline(transaction=False)
            for name in NAMES:
                pipe.publish(f"{ns}:certificates", f'{{"name": "{name}", "serial": "1", '
                             f'"fence": 3, "node": "edge-a"}}')  # fmt: skip
            pipe.execute()
            for _ in range(500):
                if len(daemon.deployer.calls) >= 2:
                    break
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.5)  # room for a wrong second batch to show up
            return list(daemon.deployer.calls)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    with caplog.at_level("ERROR"):
        calls = asyncio.run(main())
    client.close()
    assert len(calls) == 2, [len(c) for c in calls]
    assert sorted(calls[1]) == NAMES[:199]  # one batch, without the refused one
    refusals = [r for r in caplog.records if "refuses to deploy certificate c199" in r.message]
    assert len(refusals) == 1 and "node edge-b" in refusals[0].message  # once per serial


def test_the_heartbeat_carries_the_serial_every_instance_serves() -> None:
    statuses = [
        SyncStatus("www", "a", 0x1A, 0x1A, True),
        SyncStatus("www", "b", 0x1A, 0x1A, True),
        SyncStatus("api", "a", 0x2B, 0x2C, False),
        SyncStatus("api", "b", 0x2C, 0x2C, True),
        SyncStatus("old", "a", None, 0x3, False),
    ]
    assert served_serials(statuses) == {"www": "1a", "api": None, "old": None}


class ServingDeployer(RecordingDeployer):
    """Reports every target pushed and served (its status kept, as a Deployer does)."""

    def __init__(self) -> None:
        super().__init__()
        self._served: dict[str, SyncStatus] = {}

    def status(self) -> list[SyncStatus]:
        return list(self._served.values())

    def reconcile(self, targets: Iterable[DeployTarget], instances: Any) -> list[SyncStatus]:
        targets = list(targets)
        self.calls.append([t.name for t in targets])
        inst = self.instances()[0]
        out = [SyncStatus(t.name, inst, t.serial, t.serial, True, pushed=True) for t in targets]
        self._served.update({s.name: s for s in out})
        return out


def _fleet_of(
    url: str, count: int, tmp: Path
) -> tuple[FleetSync, FakeDaemon, RoundTrips, list[str]]:
    """`count` certificates stored in a fresh namespace on the real Redis at `url`
    (one stored generation each, all for one key file), and a FleetSync whose
    storage and client count their round trips."""
    from agent.store_redis import RedisStorage

    ca, key = make_ca(), make_key()
    tmp.mkdir()
    key_path = tmp / "fleet.key"
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem(key))
    client, trips = counting_client(url)
    ns = "t" + os.urandom(8).hex()
    storage = RedisStorage(client, ns, os.urandom(32))
    names = [f"c{i:03d}" for i in range(count)]
    for name in names:
        leaf = issue_leaf(ca, key, [f"{name}.example.test"])
        install_generation(storage, name, leaf, [ca.cert], time.time(), None)
    # The lock scripts are loaded on the server once (SCRIPT LOAD), before counting.
    storage.unlock("warm-up", storage.lock("warm-up", timeout=1))
    daemon = FakeDaemon(names, tmp / "state")
    certs: list[Any] = [
        CertificateConfig(name=n, domains=(f"{n}.example.test",), key=key_path) for n in names
    ]
    daemon.config.certificates = certs
    daemon.config.fleet = SimpleNamespace(node="edge-b")  # type: ignore[attr-defined]
    daemon.storage = storage  # type: ignore[assignment]
    daemon.deployer = ServingDeployer()
    return FleetSync(daemon, client, ns, "edge-b"), daemon, trips, names  # type: ignore[arg-type]


def test_a_pass_over_n_pending_certificates_makes_o_1_redis_round_trips(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Against the real Redis: the round trips of a pass (its pointers, generations,
    deploy facts under the certificates' locks, the nodes' heartbeats) are the same
    for 5 and for 60 pending certificates; so are those of the next pass (targets
    cached), of a cheap CHECK_INTERVAL pass and of a full pass. Every pending
    certificate is deployed in ONE reconcile and its facts are recorded."""
    if not redis_available():
        pytest.fail("redis-server is not installed (scripts/setup.sh installs it)")
    url = shared_redis(tmp_path_factory).url
    counts: dict[int, list[int]] = {}
    for n in (5, 60):
        sync, daemon, trips, names = _fleet_of(url, n, tmp_path / f"n{n}")
        per_pass = []
        for pending, full, check in (
            (set(names), False, False),  # the messages of a burst: new generations
            (set(names), False, False),  # the same again: targets cached
            (set(), False, True),  # CHECK_INTERVAL: nothing differs
            (set(), True, False),  # a (re)subscription: everything
        ):
            before = trips.count
            sync.sync(pending, full, check)
            per_pass.append(trips.count - before)
        counts[n] = per_pass
        assert daemon.deployer.calls[0] == names  # one reconcile of every pending one
        assert daemon.deployer.calls[1:] == [names, names]  # check: none; full: all
        metas = load_metas(daemon.storage, names)
        for name in names:
            meta = metas[name]
            fact = meta.deployed["edge-b|unix:/run/haproxy/admin.sock"] if meta else None
            assert meta is not None and fact is not None and fact.serial == meta.serial
        assert set(daemon._fresh_metas) == set(names)
        assert sync.view.stored == {m.name: m.serial for m in metas.values() if m is not None}
        daemon.storage.client.close()  # type: ignore[attr-defined]
    print("round trips per pass", counts)
    assert counts[5] == counts[60], counts
    assert max(counts[60]) <= 16, counts


def test_a_pass_does_not_wait_for_locks_the_ordering_node_holds(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The ordering node holds each certificate's lock while it deploys it: a pass
    deploys them at once and leaves their deploy facts for a later pass, in a
    fixed number of round trips, instead of waiting for each lock in turn; the
    next pass (a CHECK_INTERVAL one, nothing to deploy) records them."""
    if not redis_available():
        pytest.fail("redis-server is not installed (scripts/setup.sh installs it)")
    from agent import layout
    from agent.store_redis import RedisStorage

    url = shared_redis(tmp_path_factory).url
    sync, daemon, trips, names = _fleet_of(url, 12, tmp_path / "fleet")
    ordering = RedisStorage(redis.Redis.from_url(url), daemon.storage.ns)  # type: ignore[attr-defined]
    held = {n: ordering.lock(layout.cert_lock(n), timeout=1) for n in names}
    fact = "edge-b|unix:/run/haproxy/admin.sock"
    before = trips.count
    sync.sync(set(names), False, False)
    assert trips.count - before <= 16  # not a lock poll per certificate
    assert daemon.deployer.calls == [names]
    metas = load_metas(daemon.storage, names)
    assert all(m is not None and fact not in m.deployed for m in metas.values())
    for n, token in held.items():
        ordering.unlock(layout.cert_lock(n), token)
    sync.sync(set(), False, True)
    assert daemon.deployer.calls == [names]  # nothing deployed again
    metas = load_metas(daemon.storage, names)
    for m in metas.values():
        assert m is not None and m.deployed[fact].serial == m.serial
    ordering.client.close()
    daemon.storage.client.close()  # type: ignore[attr-defined]
