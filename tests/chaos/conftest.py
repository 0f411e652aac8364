"""Chaos suite fixtures: the HAProxy versions it runs on, the site, and the tally.

Versions: labels "2.6" and "3.2" of tests.support.haproxy.haproxy_binaries().
"3.2" is used as soon as that list has it; "2.6" is required: without it the
tests FAIL (never skip).

Budget (environment): CHAOS_ROUNDS (default 3) rounds per scenario,
CHAOS_SEED (default random; printed), CHAOS_STALE_LOCK_SECONDS (default 75)
how long a dead run's lock may block the next one.

Each test records what it did (kills, faults injected, rounds) in `tally`;
the counts are printed at the end of the session.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos.harness import Site, seed
from tests.support.acme_stack import AcmeStack
from tests.support.haproxy import haproxy_binaries

CHAOS_VERSIONS = ("2.6", "3.2")
REQUIRED = "2.6"
MISSING = "(missing)"


def chaos_binaries() -> list[tuple[str, str]]:
    """(label, path) of the builds the chaos suite runs on; a missing 2.6 stays listed."""
    found = dict(haproxy_binaries())
    out = [(label, found[label]) for label in CHAOS_VERSIONS if label in found]
    if REQUIRED not in found:
        out.insert(0, (REQUIRED, MISSING))
    return out


_BINARIES = chaos_binaries()
_TALLY: dict[str, Counter[str]] = {}


@pytest.fixture(params=[p for _, p in _BINARIES], ids=[label for label, _ in _BINARIES])
def chaos_haproxy(request: pytest.FixtureRequest) -> str:
    path: str = request.param
    if path == MISSING:
        pytest.fail(
            f"HAProxy {REQUIRED} is not in haproxy_binaries() ({haproxy_binaries()}): "
            "the chaos suite must run on it"
        )
    return path


@pytest.fixture
def tally(request: pytest.FixtureRequest) -> Iterator[Counter[str]]:
    """Counts of what the test did (kills, faults, rounds), printed at the end."""
    counts: Counter[str] = Counter()
    counts["seed"] = seed()
    _TALLY[request.node.nodeid] = counts
    yield counts


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _TALLY:
        return
    terminalreporter.section("chaos tally")
    for nodeid, counts in _TALLY.items():
        items = ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
        terminalreporter.write_line(f"{nodeid}: {items}")
    total: Counter[str] = Counter()
    for counts in _TALLY.values():
        for k, v in counts.items():
            if k != "seed":
                total[k] += v
    terminalreporter.write_line("total: " + ", ".join(f"{k}={v}" for k, v in sorted(total.items())))


def make_site(
    tmp_path: Path, binary: str, names: dict[str, str], **stack_options: object
) -> Iterator[Site]:
    with AcmeStack(tmp_path / "stack", binary, **stack_options) as stack:  # type: ignore[arg-type]
        yield Site(stack, tmp_path, names)


@pytest.fixture
def site(tmp_path: Path, chaos_haproxy: str) -> Iterator[Site]:
    """Pebble + HAProxy + a config for three certificates (not issued yet)."""
    names = {f"c{i}": f"c{i}.chaos.test" for i in range(3)}
    yield from make_site(tmp_path, chaos_haproxy, names)
