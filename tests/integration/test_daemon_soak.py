"""The daemon over many renewal cycles: nothing accumulates, nothing drifts.

A long-lived daemon renews the same certificates again and again. What a
single renewal test cannot see shows up here: a descriptor or thread kept per
order, a flag set once and never reset, certificate objects or map entries
piling up in HAProxy, generations or temp files left in the state dir, a
second order for one renewal.

Real Pebble (40 s certificates, `renew_before` 32 s: each is due about 8 s
after it was issued), real HAProxy (its PID never changes), three
certificates, the daemon as its own process until every certificate was
renewed CYCLES times. SPOE on the newest HAProxy, map mode on the oldest
(the map file of 2.6/2.8, or virt@ on 3.0+ when only that is given).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509

from agent.haproxy_api import parse_map
from tests.integration.test_daemon_pebble import scrape
from tests.support.acme_stack import AcmeStack
from tests.support.haproxy import free_port, haproxy_binaries
from tests.support.pebble import pebble_binaries
from tests.support.tls import served_leaf

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
NAMES = {"one": "one.soak.test", "two": "two.soak.test", "three": "three.soak.test"}
VALIDITY = 40
CYCLES = int(os.environ.get("SOAK_CYCLES", "4"))  # more for a longer local soak
DEADLINE = 60.0 * CYCLES  # s for the whole run: ~CYCLES x 10 s on a quiet machine
FD_SLACK = 2  # a leak of one descriptor per renewal adds 3 per cycle
# The daemon's thread pools (TLS checks, fsyncs) start threads lazily, up to
# the concurrency they have seen: after the first cycle, three certificates can
# still add two TLS-check and three fsync threads once. A leak of one thread
# per renewal adds 3 per cycle, at least 6 by the last samples.
THREAD_SLACK = 5

_BINARIES = haproxy_binaries()
CASES = [
    pytest.param("spoe", _BINARIES[-1][1], id=f"spoe-{_BINARIES[-1][0]}"),
    pytest.param("map", _BINARIES[0][1], id=f"map-{_BINARIES[0][0]}"),
]


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError(f"no Threads: line for pid {pid}")


def served(stack: AcmeStack, domain: str) -> int | None:
    """The serial HAProxy serves for `domain`; None before its first certificate
    (HAProxy's fallback certificate does not name it)."""
    try:
        leaf = served_leaf(stack.https_port, domain)
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, x509.ExtensionNotFound):
        return None
    return leaf.serial_number if domain in san.get_values_for_type(x509.DNSName) else None


def orders_placed(stack: AcmeStack) -> int:
    """newOrder requests Pebble took (it logs each as it adds the order)."""
    return len(re.findall(r"Added order \"", stack.pebble.log_text()))


def ssl_certs(stack: AcmeStack) -> list[str]:
    """`show ssl cert`: the certificate objects HAProxy holds ('*' = a transaction)."""
    reply = stack.haproxy.admin_command("show ssl cert")
    return [ln.strip() for ln in reply.splitlines() if ln.strip() and not ln.startswith("#")]


@pytest.mark.parametrize(("answer", "haproxy_binary"), CASES)
def test_a_daemon_renewing_for_many_cycles_leaks_nothing_and_stays_in_sync(
    tmp_path: Path, answer: str, haproxy_binary: str
) -> None:
    pebble = pebble_binaries()[-1][1]
    with AcmeStack(
        tmp_path / "stack",
        haproxy_binary,
        validity_period=VALIDITY,
        pebble_binary=pebble,
        answer=answer,
    ) as stack:
        keys = tmp_path / "keys"
        keys.mkdir()
        state = tmp_path / "state"
        config = stack.write_config(
            tmp_path / "config.toml",
            [
                {
                    "name": name,
                    "domains": [domain],
                    "key": str(keys / f"{name}.key"),
                    "generate_key": True,
                    "renew_before": "32s",
                }
                for name, domain in NAMES.items()
            ],
            state_dir=state,
        )
        metrics_port = free_port()
        with config.open("a") as f:
            f.write(
                f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n'
                '[daemon]\nreconcile_interval = "2s"\nretry_base = "2s"\n'
            )
        log_path = tmp_path / "agent.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "run", "-c", str(config)],
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        haproxy_pid = stack.haproxy.pid

        def fail(what: str) -> str:
            return f"{what}\n--- agent log ---\n{log_path.read_text()[-4000:]}"

        seen: dict[str, list[int]] = {name: [] for name in NAMES}
        samples: list[dict[str, int]] = []
        map_sizes: list[int] = []
        deadline = time.monotonic() + DEADLINE
        try:
            while min(len(s) for s in seen.values()) < CYCLES + 1:
                assert time.monotonic() < deadline, fail(f"renewals seen so far: {seen}")
                assert proc.poll() is None, fail(f"the daemon exited with {proc.returncode}")
                for name, domain in NAMES.items():
                    serial = served(stack, domain)
                    if serial is None:
                        continue
                    if serial not in seen[name]:
                        seen[name].append(serial)
                    # Never back to an older certificate once a newer one was served.
                    assert serial == seen[name][-1], fail(f"{name}: {serial:x} came back")
                if answer == "map":
                    entries = parse_map(stack.haproxy.admin_command(f"show map {stack.map_name}"))
                    map_sizes.append(len(entries))
                cycle = min(len(s) for s in seen.values())
                if cycle >= 2:
                    # One sample per cycle (every certificate renewed once more):
                    # the FLOOR of what each poll of that cycle saw. An order in
                    # flight holds a few threads and sockets for a moment; a leak
                    # raises the floor.
                    now = {
                        "fds": fds(proc.pid),
                        "threads": threads(proc.pid),
                        # (a swap under way adds its "*" transaction line)
                        "ssl_certs": len([c for c in ssl_certs(stack) if not c.startswith("*")]),
                    }
                    if len(samples) < cycle - 1:
                        samples.append(now)
                    else:
                        samples[-1] = {k: min(v, now[k]) for k, v in samples[-1].items()}
                time.sleep(0.5)

            # Let the last renewals' deploys and metrics settle, then compare.
            metrics = scrape(metrics_port)
            for name, domain in NAMES.items():
                leaf = served_leaf(stack.https_port, domain)
                key = (
                    f'haproxy_acme_certificate_expiration_timestamp_seconds{{certificate="{name}"}}'
                )
                if metrics.get(key) != leaf.not_valid_after_utc.timestamp():
                    time.sleep(2)
                    metrics = scrape(metrics_port)
                assert metrics[key] == leaf.not_valid_after_utc.timestamp(), fail(name)

            # A renewal is counted when its run returns (after the deploy and its
            # TLS check): the last ones may be served a moment before that.
            def counted(result: str) -> float:
                return sum(
                    metrics.get(
                        f'haproxy_acme_renewals_total{{certificate="{n}",result="{result}"}}', 0
                    )
                    for n in NAMES
                )

            settle = time.monotonic() + 15
            while True:
                successes, failures = counted("success"), counted("failure")
                if successes + failures >= orders_placed(stack) or time.monotonic() > settle:
                    break
                time.sleep(0.5)
                metrics = scrape(metrics_port)
            rss_kb = int(
                next(
                    ln.split()[1]
                    for ln in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                    if ln.startswith("VmRSS:")
                )
            )
            print(f"samples={samples} rss_kb={rss_kb} successes={successes} failures={failures}")

            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=20)
            assert code == 0, fail("SIGTERM did not end the daemon cleanly")
            assert time.monotonic() - started < 15
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)

        # Nothing accumulated in the daemon: descriptors and threads stay at the
        # level of the first cycle (slack for pools warming up), not +N per cycle.
        assert len(samples) >= CYCLES, samples
        # (the newest sample holds the polls of a cycle that had only just begun)
        base, last = samples[0], {k: min(s[k] for s in samples[-2:]) for k in samples[0]}
        assert last["fds"] <= base["fds"] + FD_SLACK, samples
        assert last["threads"] <= base["threads"] + THREAD_SLACK, samples
        # ...nor in HAProxy: one certificate object per certificate, no transaction
        # left open, the crt-list one line per certificate, the same process.
        assert last["ssl_certs"] <= samples[0]["ssl_certs"], samples
        assert not [c for c in ssl_certs(stack) if c.startswith("*")]
        assert stack.haproxy.pid == haproxy_pid and stack.haproxy.running
        listed = stack.crt_list.read_text().splitlines()
        for name in NAMES:
            assert len([ln for ln in listed if f"/{name}.pem" in ln]) == 1, listed
        if answer == "map":
            # At most one pending token per certificate at any moment, none at the end.
            assert max(map_sizes) <= len(NAMES), map_sizes
            entries = parse_map(stack.haproxy.admin_command(f"show map {stack.map_name}"))
            assert entries == {}, entries
        # ...nor in the state dir: the current generation and one before it, no
        # temp file anywhere.
        for name in NAMES:
            gens = list((state / "certificates" / name / "gen").iterdir())
            assert 1 <= len(gens) <= 2, (name, gens)
        temps = [p for root in (state, stack.cert_dir) for p in root.rglob("*.tmp")]
        assert temps == []
        # One order per renewal: every order placed ended as a success or a
        # counted failure, and nothing was re-ordered behind the counters' back.
        assert successes >= len(NAMES) * (CYCLES + 1)
        assert orders_placed(stack) == successes + failures, (
            orders_placed(stack),
            successes,
            failures,
        )
