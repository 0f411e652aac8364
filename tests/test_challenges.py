"""The challenge registry: only tokens we issued, only until they expire."""

from __future__ import annotations

import threading

import pytest

from agent.challenges import MAX_TOKEN_LENGTH, MemoryChallengeRegistry, valid_token

TOKEN = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA"
KEYAUTH = TOKEN + ".9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_added_token_is_found_until_removed() -> None:
    reg = MemoryChallengeRegistry()
    reg.add(TOKEN, KEYAUTH, expires_at=2e9)
    assert reg.lookup(TOKEN) == KEYAUTH
    assert len(reg) == 1
    reg.remove(TOKEN)
    assert reg.lookup(TOKEN) is None
    assert len(reg) == 0


def test_unknown_and_malformed_tokens_are_none_not_errors() -> None:
    reg = MemoryChallengeRegistry()
    reg.add(TOKEN, KEYAUTH, expires_at=2e9)
    for token in ["", "nope", TOKEN + "x", "../../etc/passwd", "\x00", "x" * 10_000]:
        assert reg.lookup(token) is None


def test_expired_token_is_absent_and_dropped() -> None:
    clock = Clock()
    reg = MemoryChallengeRegistry(clock=clock)
    reg.add(TOKEN, KEYAUTH, expires_at=1010.0)
    assert reg.lookup(TOKEN) == KEYAUTH
    clock.now = 1010.0
    assert len(reg) == 0
    assert reg.lookup(TOKEN) is None
    clock.now = 900.0  # even if the clock goes back, the entry is gone
    assert reg.lookup(TOKEN) is None


def test_adding_again_replaces_key_authorization_and_expiry() -> None:
    clock = Clock()
    reg = MemoryChallengeRegistry(clock=clock)
    reg.add(TOKEN, KEYAUTH, expires_at=1001.0)
    reg.add(TOKEN, TOKEN + ".other", expires_at=5000.0)
    clock.now = 2000.0
    assert reg.lookup(TOKEN) == TOKEN + ".other"


def test_remove_is_idempotent() -> None:
    reg = MemoryChallengeRegistry()
    reg.remove(TOKEN)
    reg.remove(TOKEN)
    assert len(reg) == 0


@pytest.mark.parametrize("token", ["", "a/b", "a b", "tök", "x" * (MAX_TOKEN_LENGTH + 1), "a.b"])
def test_add_rejects_tokens_outside_the_acme_alphabet(token: str) -> None:
    with pytest.raises(ValueError, match="not a valid ACME token"):
        MemoryChallengeRegistry().add(token, token + ".k", expires_at=2e9)


def test_add_rejects_key_authorization_of_another_token() -> None:
    with pytest.raises(ValueError, match="does not belong"):
        MemoryChallengeRegistry().add(TOKEN, "other.thumb", expires_at=2e9)


def test_valid_token_shape() -> None:
    assert valid_token(TOKEN)
    assert valid_token("x" * MAX_TOKEN_LENGTH)
    assert not valid_token("x" * (MAX_TOKEN_LENGTH + 1))
    assert not valid_token("abc\n")


def test_concurrent_adds_and_lookups_stay_consistent() -> None:
    reg = MemoryChallengeRegistry()
    tokens = [f"tok{i}" for i in range(200)]

    def writer() -> None:
        for t in tokens:
            reg.add(t, t + ".k", expires_at=2e9)

    def reader() -> None:
        for _ in range(5):
            for t in tokens:
                value = reg.lookup(t)
                assert value is None or value == t + ".k"

    threads = [threading.Thread(target=writer)] + [
        threading.Thread(target=reader) for _ in range(3)
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=10)
    assert len(reg) == 200
