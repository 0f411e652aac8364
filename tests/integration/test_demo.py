"""README's demo command runs end to end (so the demo cannot rot)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def test_demo_serves_three_certificates_from_stable_keys_and_stops_cleanly() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "demo.py")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert out.count("(the stable key: yes)") == 3
    for domain in ("www.demo.test", "api.demo.test", "shop.demo.test"):
        assert f"{domain}: served by HAProxy" in out
    assert 'haproxy_acme_challenges_total{result="answered",type="http-01"}' in out
    assert "agent exited with 0" in out
