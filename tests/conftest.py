"""Shared pytest fixtures. Helpers append their own fixtures below with small edits.

Version matrix of the integration tests (README "Tested versions"):
- `haproxy_bin`: every test that uses it runs once per HAProxy build of
  haproxy_binaries() (2.6, 2.8, 3.0, 3.2 by default; HAPROXY_BINS overrides).
- `pebble_bin`: every ACME test runs on every Pebble of pebble_binaries()
  (2.4 and 2.10 by default; PEBBLE_BINS overrides). A test that takes both is
  sampled: it runs on every HAProxy with the first Pebble, and on every other
  Pebble with the last (newest) HAProxy; so every version runs every test, but
  not every pair. Tests marked `every_version` (the heavy end-to-end cases)
  run on every pair. FULL_MATRIX=1 runs every pair of every test. Sampled-out
  pairs are reported as deselected, never as passed or skipped.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.support.haproxy import haproxy_binaries
from tests.support.pebble import pebble_binaries
from tests.support.redis import redis_available, shared_redis

_HAPROXY_BINARIES = haproxy_binaries()
_PEBBLE_BINARIES = pebble_binaries()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "every_version: run on every HAProxy x Pebble pair, not a sample (see tests/conftest.py)",
    )


@pytest.fixture(
    params=[path for _, path in _HAPROXY_BINARIES], ids=[label for label, _ in _HAPROXY_BINARIES]
)
def haproxy_bin(request: pytest.FixtureRequest) -> Iterator[str]:
    """Path of one HAProxy build; every test using it runs once per build (2.6 ... 3.2).

    A missing binary is still yielded: starting it fails the test (never a skip).
    """
    path: str = request.param
    yield path


@pytest.fixture(
    params=[path for _, path in _PEBBLE_BINARIES],
    ids=[f"pebble{label}" for label, _ in _PEBBLE_BINARIES],
)
def pebble_bin(request: pytest.FixtureRequest) -> Iterator[str]:
    """Path of one Pebble build (2.4, 2.10); a missing one fails the test when started."""
    path: str = request.param
    yield path


@pytest.fixture
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The session's shared redis-server (tests/support/redis.py); each test uses
    its own namespace."""
    if not redis_available():
        pytest.fail("redis-server is not installed (scripts/setup.sh installs it)")
    return shared_redis(tmp_path_factory).url


def _sampled_out(item: pytest.Item) -> bool:
    """True for a HAProxy x Pebble pair the sampling above leaves out."""
    callspec = getattr(item, "callspec", None)
    if callspec is None or item.get_closest_marker("every_version") is not None:
        return False
    params = callspec.params
    if "haproxy_bin" not in params or "pebble_bin" not in params:
        return False
    first_pebble = _PEBBLE_BINARIES[0][1]
    last_haproxy = _HAPROXY_BINARIES[-1][1]
    return bool(params["pebble_bin"] != first_pebble and params["haproxy_bin"] != last_haproxy)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("FULL_MATRIX", "") not in ("", "0"):
        return
    dropped = [item for item in items if _sampled_out(item)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if not _sampled_out(item)]
