"""Faults around the agent: a CA behind a fault proxy, a misbehaving runtime API, and a
slow-HELLO flood against the SPOA. After each: the invariants hold and HAProxy is
brought in sync."""

from __future__ import annotations

import json
import resource
import socket
import struct
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.deploy import Deployer, DeployResult, DeployTarget
from tests.chaos.conftest import make_site
from tests.chaos.harness import (
    Site,
    assert_in_sync,
    check_invariants,
    daemon_table,
    run_agent,
    spawn_agent,
    terminate,
    wait_in_sync,
    wait_until,
)
from tests.chaos.harness import rounds as chaos_rounds
from tests.support.certs import make_bundle, make_ca
from tests.support.fake_runtime_api import MODES, FakeRuntimeAPI
from tests.support.fault_proxy import FaultProxy

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

FAULT_RATES = {"5xx": 0.05, "reset": 0.05, "truncate": 0.05, "garbage": 0.05, "leaf_only": 0.5}


def test_ca_behind_a_fault_proxy_never_installs_a_broken_certificate_and_recovers(
    site: Site, tally: Counter[str]
) -> None:
    pebble = site.stack.pebble
    with FaultProxy(
        "127.0.0.1", pebble.acme_port, pebble.ca_bundle, site.root / "proxy", seed=tally["seed"]
    ) as proxy:
        site.write_config(directory=proxy.directory_url, ca_bundle=proxy.ca_bundle, timeout=20)
        cp = run_agent("renew", "-c", str(site.config))
        assert cp.returncode == 0, cp.stdout + cp.stderr
        site.remember_keys()
        assert_in_sync(site)
        proxy.set_rates(FAULT_RATES)
        tracebacks = []
        try:
            for _ in range(chaos_rounds() + 1):
                cp = run_agent("renew", "--force", "-c", str(site.config))
                tally["rounds"] += 1
                tally["renew_failed"] += cp.returncode != 0
                if "Traceback" in cp.stderr:
                    tracebacks.append(cp.stderr[-1500:])
                check_invariants(site)
        finally:
            for fault, n in proxy.counts.items():
                tally[f"fault_{fault}"] = n
            tally["faults"] = proxy.total_faults()
            tally["ca_requests"] = proxy.requests
        assert proxy.total_faults() > 0, "the proxy injected nothing"
        # The CA is healthy again: the next cron run leaves every site served and sound.
        proxy.set_rates({})
        cp = run_agent("renew", "-c", str(site.config))
        assert cp.returncode == 0, cp.stdout + cp.stderr
        check_invariants(site, after_restart=True)
        assert_in_sync(site)
        assert not tracebacks, "CA faults ended in a traceback:\n" + "\n---\n".join(tracebacks)


@pytest.fixture
def big_site(tmp_path: Path, chaos_haproxy: str) -> Iterator[Site]:
    """Eight certificates: enough that one timeout per certificate adds up."""
    names = {f"s{i}": f"s{i}.chaos.test" for i in range(8)}
    yield from make_site(tmp_path, chaos_haproxy, names)


def _deploy_into(deployer: Deployer, target: DeployTarget, box: list[DeployResult]) -> None:
    box.append(deployer.deploy(target))


API_TIMEOUT = 3.0  # [haproxy] timeout against the fake runtime API


def test_status_and_deploys_against_a_runtime_api_that_closes_hangs_drips_and_floods(
    big_site: Site, tally: Counter[str]
) -> None:
    site = big_site
    site.write_config(timeout=20)
    cp = run_agent("renew", "-c", str(site.config))
    assert cp.returncode == 0, cp.stdout + cp.stderr
    site.remember_keys()
    real_api = f"unix:{site.stack.haproxy.admin_socket}"
    ca = make_ca("intruder CA")
    with FakeRuntimeAPI(site.root / "fake.sock") as fake:
        site.set_runtime_api([fake.address], timeout=API_TIMEOUT)
        try:
            for mode in MODES:
                fake.mode = mode
                # `status` gives up on an unresponsive instance after one timeout (plus
                # start-up), not one timeout per certificate.
                try:
                    cp = run_agent(
                        "status", "--json", "-c", str(site.config), timeout=API_TIMEOUT * 2 + 15
                    )
                except subprocess.TimeoutExpired as exc:
                    raise AssertionError(
                        f"`status` against a runtime API that does {mode!r} did not give up "
                        f"after one [haproxy] timeout ({API_TIMEOUT} s) for "
                        f"{len(site.names)} certificates"
                    ) from exc
                tally["status_runs"] += 1
                assert cp.returncode in (0, 1), (
                    f"{mode}: status exited {cp.returncode}: {cp.stderr}"
                )
                assert "Traceback" not in cp.stderr, f"{mode}: status crashed:\n{cp.stderr[-2000:]}"
                # It says which instance is in trouble (in its JSON or on stderr)...
                assert str(fake.path) in cp.stdout + cp.stderr, f"{mode}: the instance is not named"
                # ...and never calls a certificate in sync with an instance that answers nothing.
                if cp.returncode == 0:
                    for row in json.loads(cp.stdout):
                        for entry in row.get("haproxy", []):
                            assert entry.get("in_sync") is not True, f"{mode}: in sync? {entry}"
                # The Deployer against it: a brand-new certificate, bounded, not ok.
                deployer = Deployer(
                    [fake.address],
                    site.stack.cert_dir,
                    crt_list=site.stack.crt_list,
                    verify=[f"127.0.0.1:{site.stack.https_port}"],
                    timeout=API_TIMEOUT,
                )
                domain = f"intruder-{mode}.chaos.test"
                bundle, cert, _ = make_bundle(ca, [domain])
                target = DeployTarget(f"intruder-{mode}", bundle, cert.serial_number, [domain])
                box: list[DeployResult] = []
                t = threading.Thread(target=_deploy_into, args=(deployer, target, box), daemon=True)
                t.start()
                t.join(timeout=120)
                assert not t.is_alive(), (
                    f"deploy against a runtime API that does {mode} never ended"
                )
                assert box, f"deploy against a runtime API that does {mode} raised"
                assert not box[0].ok, f"{mode}: a deploy to a fake API reported ok"
                tally["rounds"] += 1
                check_invariants(site)
        finally:
            for mode, n in fake.connections.items():
                tally[f"fault_{mode}"] = n
            tally["faults"] = fake.total()
    site.set_runtime_api([real_api])
    cp = run_agent("renew", "-c", str(site.config))
    assert cp.returncode == 0, cp.stdout + cp.stderr
    check_invariants(site, after_restart=True)
    assert_in_sync(site)


# --- slow-HELLO flood ------------------------------------------------------------------

FLOOD_CONNECTIONS = 1100  # more than the SPOA's flat cap of 1000
DRIP_INTERVAL = 2.0  # s between the bytes each flood connection sends
# The start of a HAPROXY-HELLO frame (length 4096, type 1, FIN): never completed.
_HELLO_START = struct.pack(">IBI", 4096, 1, 1) + b"\x00\x00" + b"\x00" * 64


class SlowHelloFlood:
    """FLOOD_CONNECTIONS local TCP peers (127.0.0.2-5), each trickling one byte of a HELLO every
    DRIP_INTERVAL s (bounded by `stop`). Counts connections made and closed by the agent."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.socks: list[socket.socket] = []
        self.closed_by_agent = 0
        self.refused = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        for i in range(FLOOD_CONNECTIONS):
            s = socket.socket()
            s.settimeout(2.0)
            try:
                # From loopback aliases, not HAProxy's 127.0.0.1: an agent may limit
                # connections per peer address without locking HAProxy out.
                s.bind((f"127.0.0.{2 + i % 4}", 0))
                s.connect(("127.0.0.1", self.port))
            except OSError:
                self.refused += 1
                s.close()
                continue
            s.setblocking(False)
            self.socks.append(s)
        self._thread.start()

    def _run(self) -> None:
        pos = 0
        while not self._stop.wait(DRIP_INTERVAL) and pos < len(_HELLO_START):
            byte = _HELLO_START[pos : pos + 1]
            pos += 1
            for s in list(self.socks):
                try:
                    s.send(byte)
                except OSError:
                    self.closed_by_agent += 1
                    self.socks.remove(s)
                    s.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=DRIP_INTERVAL + 10)
        for s in self.socks:
            s.close()


def test_slow_hello_flood_does_not_lock_haproxy_out_of_the_spoa(
    site: Site, tally: Counter[str]
) -> None:
    # The flood needs more descriptors than a 1024 soft limit, here and in the daemon
    # (which inherits the limit).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = FLOOD_CONNECTIONS * 2 + 512
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.fail(f"RLIMIT_NOFILE hard limit {hard} < {need}: cannot run the flood")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    control = site.root / "control.sock"
    site.write_config(daemon_table() + f'control_socket = "{control}"\n', timeout=20)
    log = site.root / "daemon.log"
    daemon = spawn_agent("run", "-c", str(site.config), log=log)
    flood = SlowHelloFlood(site.stack.spoa_port)
    try:
        wait_in_sync(site)
        site.remember_keys()
        flood.start()
        tally["flood_connections"] = len(flood.socks)
        # HAProxy restarted: it has to open new connections to the agent, past the flood.
        site.stack.haproxy.restart()
        wait_until("the control socket", control.exists, 30)
        for _ in range(chaos_rounds()):
            # Two tries per round: an agent may need its HELLO deadline to pass once
            # before it has room for the restarted HAProxy; locked out is never ok.
            outputs = []
            for _attempt in range(2):
                cp = run_agent("renew", "--force", "-c", str(site.config), timeout=150)
                tally["renew_runs"] += 1
                outputs.append(cp.stdout + cp.stderr[-1500:])
                if cp.returncode == 0 and all(f"{n}: renewed" in cp.stdout for n in site.names):
                    break
            else:
                raise AssertionError(
                    "validation failed under a slow-HELLO flood:\n" + "\n---\n".join(outputs)
                )
            tally["rounds"] += 1
        check_invariants(site)
        wait_in_sync(site)
    finally:
        tally["closed_by_agent"] = flood.closed_by_agent
        flood.stop()
        assert terminate(daemon) == 0, log.read_text()[-3000:]
