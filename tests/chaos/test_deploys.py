"""Many brand-new certificates deployed at once through the agent's Deployer, on a real
HAProxy: with deploys that succeed (every site must still get its own certificate
after an HAProxy restart) and with deploys that all fail and roll back (the
crt-list must still load: `haproxy -c`, and a restart must work)."""

from __future__ import annotations

import random
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos.harness import bundle_problems, crt_list_entries, env_int
from tests.chaos.harness import rounds as chaos_rounds
from tests.support.crt_site import CrtSite

pytestmark = [pytest.mark.integration, pytest.mark.chaos]


@pytest.fixture
def crt_site(tmp_path: Path, chaos_haproxy: str) -> Iterator[CrtSite]:
    s = CrtSite.start(chaos_haproxy, tmp_path)
    try:
        yield s
    finally:
        s.stop()


def certs_per_round() -> int:
    """CHAOS_CERTS: brand-new certificates deployed at once per round; default 8."""
    return max(2, env_int("CHAOS_CERTS", 8))


def haproxy_c(site: CrtSite) -> subprocess.CompletedProcess[str]:
    proc = site.haproxy
    return subprocess.run(
        [proc.binary, "-c", "-f", str(proc.config_path)],
        env={**proc.env},
        cwd=proc.workdir,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def file_problems(site: CrtSite) -> list[str]:
    problems = [p for f in sorted(site.cert_dir.glob("*.pem")) for p in bundle_problems(f)]
    problems += [
        f"crt-list names a missing file {e}"
        for e in crt_list_entries(site.crt_list)
        if not e.exists()
    ]
    check = haproxy_c(site)
    if check.returncode != 0:
        problems.append(f"`haproxy -c` refuses the config: {(check.stdout + check.stderr)[-800:]}")
    return problems


def test_many_new_certificates_deployed_at_once_each_keep_their_site_after_haproxy_restarts(
    crt_site: CrtSite, tally: Counter[str]
) -> None:
    rng = random.Random(tally["seed"])
    deployer = crt_site.deployer()
    deployed = []
    for r in range(chaos_rounds()):
        targets = crt_site.new_targets(f"r{r}n", certs_per_round())
        results = deployer.deploy_many(targets, workers=rng.choice([4, 8]))
        tally["deploys"] += len(targets)
        failed = [(res.name, res.errors) for res in results if not res.ok]
        assert not failed, f"deploys failed: {failed}"
        deployed += targets
        tally["rounds"] += 1
    crt_site.haproxy.restart()
    tally["haproxy_restarts"] += 1
    problems = file_problems(crt_site)
    lost = [t.name for t in deployed if crt_site.served(f"{t.name}.test").serial_number != t.serial]
    tally["lost_after_restart"] += len(lost)
    assert not lost and not problems, (
        f"{len(lost)} of {len(deployed)} sites lost their certificate after the restart: {lost}; "
        f"{problems}"
    )


def test_many_new_certificates_whose_deploys_all_roll_back_leave_a_crt_list_haproxy_loads(
    crt_site: CrtSite, tally: Counter[str]
) -> None:
    rng = random.Random(tally["seed"])
    # Verification against a frontend that serves another certificate: every deploy fails.
    deployer = crt_site.deployer(failing_verify=True)
    for r in range(chaos_rounds()):
        targets = crt_site.new_targets(f"f{r}n", certs_per_round())
        results = deployer.deploy_many(targets, workers=rng.choice([4, 8]))
        tally["deploys"] += len(targets)
        tally["rolled_back"] += sum(res.rolled_back for res in results)
        assert not any(res.ok for res in results), "a deploy passed a verify that must fail"
        tally["rounds"] += 1
        problems = file_problems(crt_site)
        assert not problems, f"after round {r} of rolled-back deploys: {problems}"
    crt_site.haproxy.restart()
    assert crt_site.served("site.test").serial_number == crt_site.site_serial
