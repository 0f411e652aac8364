"""Scheduler arithmetic of the daemon (the real-process tests are in tests/integration)."""

from __future__ import annotations

import random
import textwrap
from pathlib import Path

from agent.daemon import retry_delay


def test_retry_delay_doubles_with_each_failure_within_jitter() -> None:
    rng = random.Random(1)
    delays = [retry_delay(n, 60, 6 * 3600, None, rng) for n in (1, 2, 3, 4)]
    for n, d in enumerate(delays, start=1):
        full = 60 * 2 ** (n - 1)
        assert full * 0.5 <= d <= full


def test_retry_delay_is_capped_by_retry_max() -> None:
    rng = random.Random(2)
    assert all(retry_delay(40, 60, 3600, None, rng) <= 3600 for _ in range(100))


def test_short_lived_certificates_retry_within_a_twentieth_of_their_lifetime() -> None:
    rng = random.Random(3)
    six_days = 6 * 86400
    assert all(retry_delay(10, 60, 6 * 3600, six_days, rng) <= six_days / 20 for _ in range(50))
    five_minutes = 300
    assert all(retry_delay(3, 60, 6 * 3600, five_minutes, rng) <= 15 for _ in range(50))


def test_jitter_spreads_many_failing_certificates_apart() -> None:
    rng = random.Random(4)
    values = {round(retry_delay(3, 60, 6 * 3600, None, rng), 3) for _ in range(200)}
    assert len(values) > 150


def test_the_daemon_touches_storage_only_off_the_event_loop(tmp_path: Path) -> None:
    """SPOE answers come from the loop: schedule, renew and reschedule must do
    their storage I/O on worker threads (issue 11 item 0)."""
    import asyncio
    import threading

    from cryptography.hazmat.primitives import serialization

    from agent.config import load_config
    from agent.daemon import Daemon
    from agent.storage import FileStorage
    from tests.test_renewal import CA, StandInIssuer

    (tmp_path / "certs").mkdir()
    (tmp_path / "roots.pem").write_bytes(CA.root.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "config.toml").write_text(
        textwrap.dedent(
            f"""\
            state_dir = "state"
            [acme]
            directory = "https://127.0.0.1:1/dir"
            trusted_roots = "roots.pem"
            [haproxy]
            cert_dir = "{tmp_path / "certs"}"
            [daemon]
            control_socket = "{tmp_path / "control.sock"}"
            [[certificates]]
            name = "www"
            domains = ["www.example.com"]
            key = "www.key"
            generate_key = true
            """
        )
    )
    config = load_config(tmp_path / "config.toml")
    on_loop: list[str] = []
    off_loop: list[str] = []

    class Watched(FileStorage):
        def _path(self, key: str) -> Path:
            (on_loop if threading.current_thread() is loop_thread else off_loop).append(key)
            return super()._path(key)

    async def main() -> str:
        daemon = Daemon(config)
        store = Watched(config.state_dir)
        daemon.storage = daemon.renewer.storage = store
        daemon.renewer.issuer = StandInIssuer()
        await daemon._schedule_all()
        result = await daemon.renew("www", False)
        await daemon._schedule_all()
        return result.status

    loop_thread = threading.current_thread()
    assert asyncio.run(main()) == "renewed"
    assert on_loop == []
    assert "certificates/www/current" in off_loop  # it did read the store, elsewhere


def _one_cert_config(tmp_path: Path) -> Path:
    from cryptography.hazmat.primitives import serialization

    from tests.test_renewal import CA

    (tmp_path / "certs").mkdir()
    (tmp_path / "roots.pem").write_bytes(CA.root.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "config.toml").write_text(
        textwrap.dedent(
            f"""\
            state_dir = "state"
            [acme]
            directory = "https://127.0.0.1:1/dir"
            trusted_roots = "roots.pem"
            [haproxy]
            cert_dir = "{tmp_path / "certs"}"
            [daemon]
            control_socket = "{tmp_path / "control.sock"}"
            [[certificates]]
            name = "www"
            domains = ["www.example.com"]
            key = "www.key"
            generate_key = true
            """
        )
    )
    return tmp_path / "config.toml"


def test_scheduler_wakes_for_ari_and_renews_when_the_window_moves_into_the_past(
    tmp_path: Path,
) -> None:
    """Install clears the window; the daemon asks for the new leaf's window, and
    when the CA later moves it into the past (a revocation), renews (fake clock)."""
    import asyncio
    import time

    from agent import ari
    from agent.config import load_config
    from agent.daemon import Daemon
    from tests.test_renewal import StandInIssuer

    config = load_config(_one_cert_config(tmp_path))
    now = [time.time()]
    far = now[0] + 40 * 86400
    issuer = StandInIssuer(ari.RenewalWindow("x", far, far + 86400, far + 600, now[0] + 7200))

    async def main() -> None:
        daemon = Daemon(config, clock=lambda: now[0], rng=random.Random(5))
        daemon.renewer.clock = lambda: now[0]
        daemon.renewer.issuer = issuer
        await daemon._schedule_all()
        assert (await daemon.renew("www", False)).status == "renewed"
        st = daemon.states["www"]
        assert st.ari_at == now[0]  # the new leaf's window is asked for at once
        daemon._tick()
        await asyncio.gather(*daemon._ari_tasks)
        assert st.next_at == far + 600  # the CA's window, not the 1/3 point
        # Retry-After (2 h) is beyond check_interval (1 h): asked again within the hour.
        assert st.ari_at == now[0] + config.daemon.check_interval
        # The CA revokes it: renewalInfo now says "an hour ago".
        issuer.window = ari.RenewalWindow(
            "x", now[0] - 3600, now[0] - 1800, now[0] - 2000, now[0] + 7200
        )
        assert daemon._tick() == st.ari_at  # the scheduler wakes for the check
        now[0] = st.ari_at + 1
        daemon._tick()
        await asyncio.gather(*daemon._ari_tasks)
        assert st.next_at <= now[0]  # due now
        daemon._tick()
        result = await daemon._renewals["www"]
        assert result.status == "renewed"
        assert issuer.replaces[-1] is not None  # the new order names the one it replaces

    asyncio.run(main())


def test_daemon_retries_a_rate_limited_ca_when_its_hold_ends_not_later(tmp_path: Path) -> None:
    import asyncio
    import time

    from agent.config import load_config
    from agent.daemon import Daemon
    from agent.issuer import RateLimited
    from tests.test_renewal import StandInIssuer

    config = load_config(_one_cert_config(tmp_path))
    now = [time.time()]
    issuer = StandInIssuer()
    issuer.fail = RateLimited("rate limited by the CA: slow down", now[0] + 2)

    async def main() -> None:
        daemon = Daemon(config, clock=lambda: now[0], rng=random.Random(6))
        daemon.renewer.clock = lambda: now[0]
        daemon.renewer.issuer = issuer
        await daemon._schedule_all()
        assert (await daemon.renew("www", False)).status == "failed"
        st = daemon.states["www"]
        assert now[0] + 2 <= st.next_at <= now[0] + 3  # not retry_base (60 s) later
        assert daemon.rate_limits == {config.acme.directory: now[0] + 2}
        text = daemon.metrics.render().decode()
        assert "haproxy_acme_rate_limited_until_timestamp_seconds{directory=" in text
        issuer.fail = None
        now[0] = st.next_at
        daemon._tick()
        assert (await daemon._renewals["www"]).status == "renewed"

    asyncio.run(main())


def test_renewals_finishing_together_are_deployed_as_one_batch(tmp_path: Path) -> None:
    """Daemon._deploy_installed goes through a DeployCoalescer: two renewals
    whose deploys are pending at the same time share one deploy_batch."""
    import asyncio
    import time

    from agent.config import load_config
    from agent.daemon import Daemon
    from tests.test_renewal import StandInIssuer

    path = _one_cert_config(tmp_path)
    path.write_text(
        path.read_text()
        + '[[certificates]]\nname = "api"\ndomains = ["api.example.com"]\n'
        + 'key = "api.key"\ngenerate_key = true\n'
    )
    config = load_config(path)
    batches: list[list[str]] = []

    async def main() -> list[str]:
        daemon = Daemon(config)
        daemon.renewer.issuer = StandInIssuer()
        real = daemon._deploys.run_batch

        def recording(names: list[str]) -> dict[str, object]:
            batches.append(sorted(names))
            return real(names)  # type: ignore[return-value]

        daemon._deploys.run_batch = recording  # type: ignore[assignment]
        await daemon._schedule_all()
        # Hold the batch runner until both deploys wait: then they are one batch.
        daemon._deploys._running.acquire()
        tasks = [asyncio.create_task(daemon.renew(n, True)) for n in ("www", "api")]
        deadline = time.monotonic() + 60
        while len(daemon._deploys._pending) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        daemon._deploys._running.release()
        results = await asyncio.gather(*tasks)
        return [r.status for r in results]

    assert asyncio.run(main()) == ["renewed", "renewed"]
    assert batches == [["api", "www"]]


_EARLY_STOP = """
import os, signal, sys
from pathlib import Path
import agent.daemon as d

where = sys.argv[2]
if where == "load":
    original_load = d.load_config
    def load_config(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return original_load(*args, **kwargs)
    d.load_config = load_config
else:
    original_prepare = d.Daemon._prepare_state
    def _prepare_state(self):
        os.kill(os.getpid(), signal.SIGTERM)
        return original_prepare(self)
    d.Daemon._prepare_state = _prepare_state
sys.exit(d.run_daemon(Path(sys.argv[1])))
"""


def test_sigterm_while_the_daemon_starts_is_a_graceful_stop_that_starts_nothing(
    tmp_path: Path,
) -> None:
    """systemd may stop a unit that is still loading keys or repairing state:
    that is exit 0 and no listener, not death by the signal (-15)."""
    import subprocess
    import sys

    config = _one_cert_config(tmp_path)
    repo = Path(__file__).resolve().parents[1]
    for where in ("load", "prepare"):
        run = subprocess.run(
            [sys.executable, "-c", _EARLY_STOP, str(config), where],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, (where, run.returncode, run.stderr[-2000:])
        assert "stopping before start-up finished" in run.stderr, (where, run.stderr[-2000:])
        assert "agent running" not in run.stderr
        assert not (tmp_path / "control.sock").exists()


def test_a_failed_keycompromise_revocation_is_retried_within_minutes_not_at_the_next_renewal(
    tmp_path: Path,
) -> None:
    """An emergency rollover queues the old leaf for revocation. When the CA
    refuses or cannot be reached, the daemon tries again after 60 s, doubling,
    at most hourly; each retry orders nothing (fake clock)."""
    import asyncio
    import time

    from agent import certstate, rollover
    from agent.config import load_config
    from agent.daemon import Daemon
    from tests.test_renewal import StandInIssuer

    config = load_config(_one_cert_config(tmp_path))
    now = [time.time()]
    issuer = StandInIssuer()
    revoked: list[int] = []
    refuse = [2]

    def revoke_with_key(cert: object, key: object, reason: int) -> None:
        if refuse[0] > 0:
            refuse[0] -= 1
            raise ConnectionError("the CA is unreachable")
        revoked.append(reason)

    issuer.revoke_with_key = revoke_with_key  # type: ignore[attr-defined]

    async def main() -> None:
        daemon = Daemon(config, clock=lambda: now[0], rng=random.Random(7))
        daemon.renewer.clock = lambda: now[0]
        daemon.renewer.issuer = issuer
        await daemon._schedule_all()
        assert (await daemon.renew("www", False)).status == "renewed"
        orders = len(issuer.replaces)
        st = daemon.states["www"]
        renewal_at = st.next_at
        assert renewal_at > now[0] + 86400  # weeks away
        # What an emergency rollover leaves when a kill comes before the revocation.
        meta = certstate.load_meta(daemon.storage, "www")
        assert meta is not None and meta.generation is not None
        leaf = certstate.load_generation(daemon.storage, "www", meta.generation).leaf
        from cryptography.hazmat.primitives import serialization

        pem = leaf.public_bytes(serialization.Encoding.PEM).decode()
        queued = rollover.Revoke(meta.serial or "", pem, str(config.certificate("www").key))
        with daemon.storage.locked("cert-www"):
            certstate.update_state(
                daemon.storage, "www", lambda s: replace(s, keys=rollover.KeyState(revoke=queued))
            )
        await daemon._schedule_all()
        st = daemon.states["www"]
        assert st.next_at <= now[0]  # never tried: at once
        for expected_delay in (60.0, 120.0):
            daemon._tick()
            assert (await daemon._renewals["www"]).status == "not-due"
            assert now[0] + expected_delay - 1 <= st.next_at <= now[0] + expected_delay + 1
            now[0] = st.next_at
        daemon._tick()
        assert (await daemon._renewals["www"]).status == "not-due"
        assert revoked == [rollover.KEY_COMPROMISE]
        assert len(issuer.replaces) == orders  # no order for any of it
        assert st.next_at >= renewal_at - 1  # back to the renewal time

    from dataclasses import replace

    asyncio.run(main())
