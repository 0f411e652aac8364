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
