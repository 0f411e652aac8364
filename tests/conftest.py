"""Shared pytest fixtures. Helpers append their own fixtures below with small edits."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.haproxy import haproxy_binaries

_HAPROXY_BINARIES = haproxy_binaries()


@pytest.fixture(
    params=[path for _, path in _HAPROXY_BINARIES], ids=[label for label, _ in _HAPROXY_BINARIES]
)
def haproxy_bin(request: pytest.FixtureRequest) -> Iterator[str]:
    """Path of one HAProxy build; every test using it runs once per build (2.6, 2.8).

    A missing binary is still yielded: starting it fails the test (never a skip).
    """
    path: str = request.param
    yield path
