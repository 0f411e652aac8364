"""kill -9 of `renew`, of the daemon and of HAProxy at random points, and stale locks.

Every scenario runs on real Pebble + real HAProxy; after each kill the
invariants of tests.chaos.harness hold, and after the last one a restarted
agent (a plain cron `renew`, or `run`) brings HAProxy in sync with what the
agent stored.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.chaos.harness import (
    Site,
    assert_in_sync,
    check_invariants,
    daemon_table,
    env_int,
    kill9,
    run_agent,
    spawn_agent,
    terminate,
    wait_in_sync,
    wait_until,
)
from tests.chaos.harness import rounds as chaos_rounds

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

ACME_TIMEOUT = 20  # [acme] timeout: also how long a `renew` waits for the renew lock


def first_issue(site: Site) -> float:
    """Issue every certificate once (a clean run); return how long a run takes (s)."""
    started = time.monotonic()
    cp = run_agent("renew", "-c", str(site.config))
    took = time.monotonic() - started
    assert cp.returncode == 0, cp.stdout + cp.stderr
    site.remember_keys()
    assert_in_sync(site)
    check_invariants(site)
    return took


def mtimes(site: Site) -> dict[str, int]:
    return {n: site.bundle(n).stat().st_mtime_ns for n in site.names if site.bundle(n).exists()}


def wait_for_bundle_change(
    site: Site, before: dict[str, int], proc: subprocess.Popen[bytes], limit: float
) -> bool:
    """Poll (5 ms, at most `limit` s) until a bundle in cert_dir changes: the deploy
    has started. False if the process ended or nothing changed in time."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if mtimes(site) != before:
                return True
        except FileNotFoundError:
            return True  # a bundle was replaced right now
        time.sleep(0.005)
    return False


def kill_point(
    rng: random.Random, site: Site, proc: subprocess.Popen[bytes], run_time: float
) -> str:
    """Wait for a random point of `proc`'s run: either a random delay within a typical
    run, or right as a bundle file changes (the deploy step) plus 0-50 ms."""
    if rng.random() < 0.5:
        time.sleep(rng.uniform(0.2, max(run_time * 1.1, 0.5)))
        return "random"
    before = mtimes(site)
    wait_for_bundle_change(site, before, proc, run_time * 3 + 10)
    time.sleep(rng.uniform(0, 0.05))
    return "at-deploy"


def test_renew_killed_at_random_points_then_a_cron_renew_brings_haproxy_in_sync(
    site: Site, tally: Counter[str]
) -> None:
    rng = random.Random(tally["seed"])
    site.write_config(timeout=ACME_TIMEOUT)
    run_time = first_issue(site)
    for i in range(chaos_rounds()):
        log = site.root / f"renew-{i}.log"
        proc = spawn_agent("renew", "--force", "-c", str(site.config), log=log)
        tally["kills_" + kill_point(rng, site, proc, run_time)] += 1
        if proc.poll() is None:
            kill9(proc)
            tally["kills"] += 1
        else:
            tally["finished_before_kill"] += 1
        tally["rounds"] += 1
        check_invariants(site)
    # The next cron run: whatever the kills left, HAProxy must serve what is stored.
    cp = run_agent("renew", "-c", str(site.config))
    assert cp.returncode == 0, cp.stdout + cp.stderr
    check_invariants(site, after_restart=True)
    assert_in_sync(site)


def start_daemon(site: Site, log: Path) -> subprocess.Popen[bytes]:
    return spawn_agent("run", "-c", str(site.config), log=log)


def control_socket(site: Site) -> Path:
    return site.root / "control.sock"


def daemon_config(site: Site) -> None:
    extra = daemon_table() + f'control_socket = "{control_socket(site)}"\n'
    site.write_config(extra, timeout=ACME_TIMEOUT)


def test_daemon_killed_at_random_points_then_a_restarted_daemon_brings_haproxy_in_sync(
    site: Site, tally: Counter[str]
) -> None:
    rng = random.Random(tally["seed"])
    daemon_config(site)
    run_time = 5.0
    for i in range(chaos_rounds() + 1):
        daemon = start_daemon(site, site.root / f"daemon-{i}.log")
        client: subprocess.Popen[bytes] | None = None
        try:
            if i > 0:
                # Give the daemon work to be killed in: a forced renewal of everything.
                wait_until("the control socket", lambda: _unix_accepting(control_socket(site)), 60)
                client = spawn_agent(
                    "renew", "--force", "-c", str(site.config), log=site.root / f"client-{i}.log"
                )
            tally["kills_" + kill_point(rng, site, daemon, run_time)] += 1
            if daemon.poll() is None:
                tally["kills"] += 1
            kill9(daemon)
        finally:
            kill9(daemon)
            if client is not None:
                terminate(client)
        tally["rounds"] += 1
        if (
            i == 0
            and not site.keys
            and all((site.key_dir / f"{n}.key").exists() for n in site.names)
        ):
            site.remember_keys()
        check_invariants(site)
    daemon = start_daemon(site, site.root / "daemon-final.log")
    try:
        wait_in_sync(site)
        if not site.keys:
            site.remember_keys()
        check_invariants(site, after_restart=True)
    finally:
        assert terminate(daemon) == 0, (site.root / "daemon-final.log").read_text()[-3000:]


def kill_haproxy(site: Site) -> None:
    """SIGKILL HAProxy by its Popen handle's PID, reap it, start it again from its files."""
    os.kill(site.stack.haproxy.pid, signal.SIGKILL)
    site.stack.haproxy.stop()  # reaps the killed process through its handle
    site.stack.haproxy.start()


def test_haproxy_killed_mid_transaction_then_a_cron_renew_brings_it_in_sync(
    site: Site, tally: Counter[str]
) -> None:
    rng = random.Random(tally["seed"])
    site.write_config(timeout=ACME_TIMEOUT)
    run_time = first_issue(site)
    for i in range(chaos_rounds()):
        before = mtimes(site)
        proc = spawn_agent(
            "renew", "--force", "-c", str(site.config), log=site.root / f"renew-{i}.log"
        )
        try:
            if wait_for_bundle_change(site, before, proc, run_time * 3 + 20):
                time.sleep(rng.uniform(0, 0.02))
                kill_haproxy(site)
                tally["haproxy_kills"] += 1
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                kill9(proc)
        tally["rounds"] += 1
        check_invariants(site)
    assert tally["haproxy_kills"] > 0, "no round reached the deploy step"
    cp = run_agent("renew", "-c", str(site.config))
    assert cp.returncode == 0, cp.stdout + cp.stderr
    check_invariants(site, after_restart=True)
    assert_in_sync(site)


def test_haproxy_killed_under_the_daemon_is_brought_in_sync_after_its_restart(
    site: Site, tally: Counter[str]
) -> None:
    rng = random.Random(tally["seed"])
    daemon_config(site)
    log = site.root / "daemon.log"
    daemon = start_daemon(site, log)
    try:
        wait_in_sync(site)
        site.remember_keys()
        for i in range(chaos_rounds()):
            before = mtimes(site)
            client = spawn_agent(
                "renew", "--force", "-c", str(site.config), log=site.root / f"client-{i}.log"
            )
            try:
                if wait_for_bundle_change(site, before, client, 60):
                    time.sleep(rng.uniform(0, 0.02))
                    kill_haproxy(site)
                    tally["haproxy_kills"] += 1
                client.wait(timeout=120)
            finally:
                terminate(client)
            tally["rounds"] += 1
            check_invariants(site)
        assert tally["haproxy_kills"] > 0, "no round reached the deploy step"
        wait_in_sync(site)
        check_invariants(site)
    finally:
        assert terminate(daemon) == 0, log.read_text()[-3000:]


# --- stale locks from another host name or PID 1 --------------------------------------


def _spoa_listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _unix_accepting(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(0.5)
        return s.connect_ex(str(path)) == 0


def _listening_or_done(site: Site, proc: subprocess.Popen[bytes]) -> Callable[[], bool]:
    return lambda: _spoa_listening(site.stack.spoa_port) or proc.poll() is not None


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return []
    return [int(x) for x in text.split()]


@pytest.mark.parametrize("where", ["other-hostname", "pid-1"])
def test_renew_killed_in_another_uts_or_pid_namespace_does_not_block_the_next_renew(
    site: Site, tally: Counter[str], where: str
) -> None:
    if os.geteuid() != 0:
        pytest.fail("this scenario needs root for unshare (CI runs as root)")
    rng = random.Random(tally["seed"])
    site.write_config(timeout=ACME_TIMEOUT)
    first_issue(site)
    if where == "other-hostname":
        prefix = ["unshare", "--uts", "sh", "-c", 'hostname chaos-other-host && exec "$@"', "sh"]
    else:
        prefix = ["unshare", "--pid", "--fork", "--mount-proc"]
    killed = False
    for attempt in range(3):  # a run that finishes before the kill is tried again
        log = site.root / f"namespaced-renew-{attempt}.log"
        proc = spawn_agent("renew", "--force", "-v", "-c", str(site.config), log=log, prefix=prefix)
        try:
            # It holds the renew lock once its SPOA listens (the lock is taken first);
            # its orders take a second or more after that.
            wait_until("the namespaced renew's SPOA", _listening_or_done(site, proc), 60, 0.01)
            time.sleep(rng.uniform(0.0, 0.1))
            if proc.poll() is not None:
                tally["finished_before_kill"] += 1
                continue
            if where == "pid-1":
                # The agent is PID 1 of the new namespace: unshare's child. Killing it
                # kills the namespace; unshare then exits.
                for kid in _children(proc.pid):
                    os.kill(kid, signal.SIGKILL)
                proc.wait(timeout=30)
            kill9(proc)
            tally["kills"] += 1
            killed = True
            break
        finally:
            kill9(proc)
    assert killed, "the namespaced renew always finished before it could be killed"
    # The next normal runs: a dead holder's lock may delay them (a lease), not block them.
    budget = env_int("CHAOS_STALE_LOCK_SECONDS", 75)
    deadline = time.monotonic() + budget
    outputs = []
    while True:
        cp = run_agent("renew", "--force", "-c", str(site.config))
        tally["rounds"] += 1
        outputs.append(cp.stdout + cp.stderr)
        renewed = all(f"{n}: renewed" in cp.stdout for n in site.names)
        if renewed or time.monotonic() >= deadline:
            break
    assert renewed, (
        f"no `renew` within {budget} s renewed after the killed one "
        f"({where}):\n" + "\n---\n".join(o[-600:] for o in outputs)
    )
    check_invariants(site, after_restart=True)
    assert_in_sync(site)
