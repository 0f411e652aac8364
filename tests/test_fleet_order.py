"""Fleet ordering against a real redis-server, with the stand-in CA of test_renewal:
fenced installs (a holder whose lease ran out is refused, the certificate and the
node named), the store unreachable (renewals skipped, the daemon degraded, and
back by itself), and a store that lost its data rebuilt from what a node serves.
The same fencing rules are checked on the file store."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from cryptography.hazmat.primitives import serialization

from agent import keys, layout
from agent.certstate import load_meta, read_current
from agent.challenges import MemoryChallengeRegistry
from agent.config import Config, load_config
from agent.daemon import Daemon
from agent.metrics import MetricsServer
from agent.renewal import Renewer, check_certificate, node_bundle
from agent.storage import FenceRejected, FileStorage, Storage
from agent.store_redis import RedisStorage
from agent.wiring import make_storage
from tests.support.redis import RedisProcess, redis_available
from tests.test_renewal import CA, StandInIssuer


def fleet_config(tmp_path: Path, url: str, ns: str, node: str = "edge-a") -> Config:
    secret = tmp_path / "fleet.secret"
    if not secret.exists():
        secret.write_bytes(os.urandom(32))
        secret.chmod(0o600)
    (tmp_path / "certs").mkdir(exist_ok=True)
    (tmp_path / "roots.pem").write_bytes(CA.root.public_bytes(serialization.Encoding.PEM))
    path = tmp_path / f"config-{node}.toml"
    path.write_text(
        textwrap.dedent(
            f"""\
            state_dir = "state-{node}"
            [acme]
            directory = "https://127.0.0.1:1/dir"
            trusted_roots = "roots.pem"
            timeout = 5
            [haproxy]
            cert_dir = "{tmp_path / "certs"}"
            [daemon]
            control_socket = "{tmp_path / f"control-{node}.sock"}"
            [fleet]
            redis = "{url}"
            namespace = "{ns}"
            node = "{node}"
            secret_file = "fleet.secret"
            [[certificates]]
            name = "www"
            domains = ["www.example.com"]
            key = "www.key"
            generate_key = true
            """
        )
    )
    return load_config(path)


def file_config(tmp_path: Path) -> Config:
    (tmp_path / "roots.pem").write_bytes(CA.root.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "config.toml").write_text(
        textwrap.dedent(
            """\
            state_dir = "state"
            [acme]
            directory = "https://127.0.0.1:1/dir"
            trusted_roots = "roots.pem"
            [[certificates]]
            name = "www"
            domains = ["www.example.com"]
            key = "www.key"
            generate_key = true
            """
        )
    )
    return load_config(tmp_path / "config.toml")


class CountingIssuer(StandInIssuer):
    """The stand-in CA, counting the orders it was asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.orders = 0

    def issue(self, *args: Any, **kwargs: Any) -> Any:
        self.orders += 1
        return super().issue(*args, **kwargs)


def write_bundle(config: Config, name: str) -> None:
    """What a deploy leaves on this node's disk: <cert_dir>/NAME.pem (chain + key)."""
    cfg = config.certificate(name)
    storage = make_storage(config)
    gen = read_current(storage, name)
    assert gen is not None
    fullchain = storage.load(layout.generation_key(name, gen, layout.FULLCHAIN))
    layout.bundle_path(config.haproxy.cert_dir, name).write_bytes(node_bundle(cfg, fullchain))


def _stale_then_fresh(config: Config, stale: Storage, fresh: Storage) -> None:
    """A holder whose lease ran out (paused past it) tries to install after a
    newer holder did: refused, nothing of it stays, the newer install stands."""
    cfg = config.certificate("www")
    issuer = StandInIssuer()
    renewer_a = Renewer(config, MemoryChallengeRegistry(), stale, issuer=issuer)
    renewer_b = Renewer(config, MemoryChallengeRegistry(), fresh, issuer=issuer)
    lock = layout.cert_lock("www")
    token_a = stale.lock(lock, timeout=1, expires_after=0.2)  # no keeper: A is "frozen"
    key = renewer_a._key_for(cfg, create=True)
    chain_a = check_certificate(
        issuer.issue(renewer_a._csr_pem(cfg, key), cfg.domains).fullchain_pem.encode(),
        key, cfg.domains, (), time.time(),
    )  # fmt: skip
    time.sleep(0.01)  # another serial (the stand-in CA numbers by milliseconds)
    token_b = fresh.lock(lock, timeout=5)  # A's lease ran out: B takes over
    chain_b = check_certificate(
        issuer.issue(renewer_b._csr_pem(cfg, key), cfg.domains).fullchain_pem.encode(),
        key, cfg.domains, (), time.time(),
    )  # fmt: skip
    meta_b = renewer_b.install(cfg, chain_b, token_b)
    fresh.unlock(lock, token_b)
    with pytest.raises(FenceRejected):
        renewer_a.install(cfg, chain_a, token_a)
    stored = load_meta(fresh, "www")
    assert stored is not None and stored.serial == meta_b.serial
    assert int(fresh.load(layout.fence_key("www"))) == stored.fence
    assert stored.node == renewer_b.node
    # A's generation was removed again: a repair never adopts it.
    gens = fresh.list(layout.generations_prefix("www"))
    assert [g.rsplit("/", 1)[1] for g in gens] == [stored.generation]
    # Through the renewal path the refusal is a result naming certificate and node.
    token_a = stale.lock(lock, timeout=1, expires_after=0.2)
    fresh.unlock(lock, fresh.lock(lock, timeout=5))  # yet another holder came and went
    result = renewer_a._refused(cfg, chain_a, FenceRejected("lost"))
    assert result.failed and result.error_type == "fence"
    assert "certificate www" in result.reason and f"node {renewer_a.node}" in result.reason


def test_a_stale_holder_cannot_install_over_a_newer_one_in_redis(
    tmp_path: Path, redis_url: str
) -> None:
    ns = "fo" + os.urandom(6).hex()
    config = fleet_config(tmp_path, redis_url, ns)
    _stale_then_fresh(config, make_storage(config), make_storage(config))


def test_a_stale_holder_cannot_install_over_a_newer_one_on_files(tmp_path: Path) -> None:
    config = file_config(tmp_path)
    _stale_then_fresh(config, FileStorage(config.state_dir), FileStorage(config.state_dir))


def test_a_fleet_node_waits_for_the_holder_and_does_not_order_again(
    tmp_path: Path, redis_url: str
) -> None:
    ns = "fo" + os.urandom(6).hex()
    config = fleet_config(tmp_path, redis_url, ns)
    issuer = CountingIssuer()
    holder_store, waiter_store = make_storage(config), make_storage(config)
    holder = Renewer(config, MemoryChallengeRegistry(), holder_store, issuer=issuer)
    waiter = Renewer(config, MemoryChallengeRegistry(), waiter_store, issuer=issuer,
                     on_installed=lambda name: None)  # fmt: skip
    lock = layout.cert_lock("www")
    token = holder_store.lock(lock, timeout=1, expires_after=30)
    results: list[Any] = []

    async def both() -> None:
        task = asyncio.create_task(asyncio.to_thread(waiter.run, None, False, False))
        await asyncio.sleep(2.5)  # past the 2 s a single node would give up after
        assert not task.done()  # still waiting for the holder's result
        cfg = config.certificate("www")
        key = holder._key_for(cfg, create=True)
        holder.install(cfg, check_certificate(
            issuer.issue(holder._csr_pem(cfg, key), cfg.domains).fullchain_pem.encode(),
            key, cfg.domains, (), time.time(),
        ), token)  # fmt: skip
        holder_store.unlock(lock, token)
        results.extend(await task)

    asyncio.run(both())
    assert issuer.orders == 1  # the holder's; the waiter deployed what it stored
    assert results[0].status == "deployed", results[0]


def test_renewals_are_skipped_while_redis_is_down_and_resume_when_it_is_back(
    tmp_path: Path,
) -> None:
    if not redis_available():
        pytest.fail("redis-server is not installed (scripts/setup.sh installs it)")
    server = RedisProcess(tmp_path / "redis").start()
    try:
        config = fleet_config(tmp_path, server.url, "down")
        issuer = CountingIssuer()

        async def main() -> tuple[Any, ...]:
            daemon = Daemon(config)
            try:
                daemon.renewer.issuer = issuer
                await daemon._schedule_all()
                http = MetricsServer(daemon.metrics, "127.0.0.1", 0, lambda: True, daemon.degraded)
                await http.start()
                try:
                    server.stop()
                    down = await daemon.renew("www", True)
                    health_down = await _get(http.port, "/healthz")
                    next_try = daemon.states["www"].next_at - time.time()
                    server.start()
                    back = await daemon.renew("www", True)
                    # The challenge mirror reconnects by itself (backoff up to 2 s):
                    # degraded until it has.
                    await asyncio.to_thread(daemon.registry.connected.wait, 10)  # type: ignore[attr-defined]
                    health_back = await _get(http.port, "/healthz")
                finally:
                    await http.stop()
            finally:
                daemon.close()  # the registry's mirror, also when an assertion failed
            return down, health_down, next_try, back, health_back

        down, health_down, next_try, back, health_back = asyncio.run(main())
        assert down.status == "skipped" and "fleet store unavailable" in down.reason
        assert health_down.startswith("200") and "degraded: fleet store unavailable" in health_down
        assert 0 < next_try <= 60  # retried by itself, soon
        assert back.status == "renewed" and issuer.orders == 1
        assert health_back.startswith("200") and health_back.endswith("ok\n")
    finally:
        server.stop()


async def _get(port: int, path: str) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    raw = (await asyncio.wait_for(reader.read(), 5)).decode()
    writer.close()
    status = raw.split("\r\n", 1)[0].split(" ", 1)[1]
    return status + " " + raw.split("\r\n\r\n", 1)[1]


def test_a_store_restarted_empty_is_rebuilt_from_the_nodes_without_ordering(
    tmp_path: Path,
) -> None:
    if not redis_available():
        pytest.fail("redis-server is not installed (scripts/setup.sh installs it)")
    server = RedisProcess(tmp_path / "redis").start()  # no persistence
    try:
        config = fleet_config(tmp_path, server.url, "empty")
        other = fleet_config(tmp_path, server.url, "empty", node="edge-b")
        issuer = CountingIssuer()
        first = Renewer(config, MemoryChallengeRegistry(), issuer=issuer)
        assert first.run(None, False, False)[0].status == "renewed"
        write_bundle(config, "www")  # what the deploy left on this node
        serial = load_meta(make_storage(config), "www").serial  # type: ignore[union-attr]
        server.stop()
        server.start()  # back, empty
        assert not redis.Redis.from_url(server.url).keys("*")
        results = [
            Renewer(c, MemoryChallengeRegistry(), issuer=issuer).run(None, False, False)[0]
            for c in (config, other, config)
        ]
        assert issuer.orders == 1  # the first one only: none after the restart
        assert [r.status for r in results] == ["deployed", "not-due", "not-due"], results
        stored = load_meta(make_storage(config), "www")
        assert stored is not None and stored.serial == serial
        # The daemon's rebuild does the same without a renewal being due.
        server.stop()
        server.start()
        rebuilt = Renewer(other, MemoryChallengeRegistry(), issuer=issuer).rebuild_if_emptied()
        assert [r.status for r in rebuilt] == ["deployed"] and issuer.orders == 1
        store = make_storage(config)
        assert isinstance(store, RedisStorage) and store.exists(layout.FLEET_MARKER)
        assert Renewer(config, MemoryChallengeRegistry(), issuer=issuer).rebuild_if_emptied() == []
    finally:
        server.stop()


def test_a_daemon_started_while_redis_is_down_serves_and_renews_once_it_is_back(
    tmp_path: Path,
) -> None:
    from tests.support.haproxy import free_port

    if not redis_available():
        pytest.fail("redis-server is not installed (scripts/setup.sh installs it)")
    server = RedisProcess(tmp_path / "redis").start()
    server.stop()  # down before the daemon starts
    config = fleet_config(tmp_path, server.url, "start")
    text = config.path.read_text().replace(
        "[fleet]",
        f'[spoa]\nlisten = "127.0.0.1:{free_port()}"\n'
        f'[metrics]\nlisten = "127.0.0.1:{free_port()}"\n[fleet]',
    )
    config.path.write_text(text)
    config = load_config(config.path)
    issuer = CountingIssuer()

    async def main() -> tuple[str, int, int, str]:
        daemon = Daemon(config)
        daemon.renewer.issuer = issuer
        task = asyncio.create_task(daemon.run())
        try:
            port = config.metrics.listen.port
            for _ in range(400):  # the first run is skipped: degraded, no order
                await asyncio.sleep(0.05)
                if daemon._started and daemon.degraded():
                    break
            health_down = await _get(port, "/healthz")
            orders_down = issuer.orders
            server.start()
            for _ in range(1200):  # retried by itself within its backoff (<= 60 s)
                await asyncio.sleep(0.05)
                st = daemon.states.get("www")
                if issuer.orders and st is not None and st.meta is not None and not st.running:
                    break
            await asyncio.to_thread(daemon.registry.connected.wait, 10)  # type: ignore[attr-defined]
            health_back = await _get(port, "/healthz")
            return health_down, orders_down, issuer.orders, health_back
        finally:
            daemon._stop.set()
            await asyncio.wait_for(task, 30)  # run() closes the registry on its way out

    try:
        health_down, orders_down, orders, health_back = asyncio.run(main())
    finally:
        server.stop()
    assert health_down.startswith("200") and "degraded: fleet store unavailable" in health_down
    assert orders_down == 0
    assert orders == 1
    assert health_back.startswith("200") and health_back.endswith("ok\n"), health_back


def test_a_renewal_after_a_sentinel_failover_succeeds_on_the_new_primary(tmp_path: Path) -> None:
    from tests.support.redis import SentinelProcess

    if not redis_available():
        pytest.fail("redis-server is not installed (scripts/setup.sh installs it)")
    with RedisProcess(tmp_path / "primary") as primary:
        replica = RedisProcess(
            tmp_path / "replica", extra=f"replicaof {primary.host} {primary.port}"
        ).start()
        sentinel = SentinelProcess(tmp_path / "sentinel", primary, "acme").start()
        try:
            config = fleet_config(tmp_path, primary.url, "sent")
            text = config.path.read_text().replace(
                f'redis = "{primary.url}"',
                f'sentinels = ["{sentinel.host}:{sentinel.port}"]\nservice = "acme"',
            )
            config.path.write_text(text)
            config = load_config(config.path)
            issuer = CountingIssuer()
            renewer = Renewer(config, MemoryChallengeRegistry(), issuer=issuer)
            first = renewer.run(None, False, False)[0]
            assert first.status == "renewed", first
            direct = redis.Redis(host=replica.host, port=replica.port)
            for _ in range(500):  # bounded: until the replica has the certificate
                if direct.exists("sent:v:certificates/www/current"):
                    break
                time.sleep(0.02)
            primary.kill()  # SIGKILL: Sentinel promotes the replica
            statuses = []
            second = None
            for _ in range(300):  # bounded: skipped while there is no primary
                second = renewer.run(None, True, False)[0]
                statuses.append(second.status)
                if second.status != "skipped":
                    break
                time.sleep(0.1)
            assert second is not None and second.status == "renewed", (second, statuses)
            assert set(statuses[:-1]) <= {"skipped"}  # never a failure storm, never a crash
            assert direct.execute_command("ROLE")[0] == b"master"  # type: ignore[no-untyped-call]
            on_new = RedisStorage(direct, "sent")
            meta = load_meta(on_new, "www")
            assert meta is not None and meta.serial == second.serial
            assert issuer.orders == 2
            direct.close()
        finally:
            sentinel.stop()
            replica.stop()


def test_a_node_that_creates_a_key_in_a_fleet_says_to_copy_it_to_the_others(
    tmp_path: Path, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Keys never travel through Redis: `generate_key` on one node leaves the
    others without the key, so that node says so, naming certificate, node and file."""
    config = fleet_config(tmp_path, redis_url, "fk" + os.urandom(6).hex())
    renewer = Renewer(config, MemoryChallengeRegistry(), make_storage(config),
                      issuer=CountingIssuer())  # fmt: skip
    cfg = config.certificate("www")
    with caplog.at_level(logging.WARNING, logger="agent.renewal"):
        renewer._key_for(cfg, create=True)
        renewer._key_for(cfg, create=True)  # exists now: loaded, nothing said
    said = [r.getMessage() for r in caplog.records if "created its own key" in r.getMessage()]
    assert len(said) == 1, said
    assert "www" in said[0] and str(cfg.key) in said[0] and config.fleet is not None
    assert config.fleet.node in said[0]
    assert cfg.key.stat().st_mode & 0o777 == 0o600


def test_pins_that_creates_a_key_in_a_fleet_says_to_copy_it_to_the_others(
    tmp_path: Path, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`pins` (and `csr`) create a missing generate_key key too: on a fleet node
    they say so as the renewer does, naming certificate, node and file."""
    from agent.cli import main

    config = fleet_config(tmp_path, redis_url, "fp" + os.urandom(6).hex(), node="edge-p")
    cfg = config.certificate("www")
    assert not cfg.key.exists()
    rc = main(["pins", "--json", "-c", str(tmp_path / "config-edge-p.toml")])
    out, err = capsys.readouterr()
    assert rc == 0, err
    said = [line for line in err.splitlines() if "created its own key" in line]
    assert len(said) == 1, err
    assert "certificate www" in said[0] and "node edge-p" in said[0] and str(cfg.key) in said[0]
    assert cfg.key.stat().st_mode & 0o777 == 0o600
    (row,) = json.loads(out)
    assert row["key_pin"] == keys.spki_pin(keys.load_private_key(cfg.key))
    rc = main(["csr", "www", "-c", str(tmp_path / "config-edge-p.toml")])
    out, err = capsys.readouterr()
    assert rc == 0 and "BEGIN CERTIFICATE REQUEST" in out, err
    assert "created its own key" not in err  # it exists now: loaded, nothing said
