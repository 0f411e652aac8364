"""Late ACKs: a token the local registry misses is asked of its shared store
(`ChallengeRegistry.fetch`) without holding up the other frames of the
connection; its ACK comes when the store answers (ACKs in any order, as
SPOP pipelining allows: each echoes its own stream-id and frame-id), or
"unknown" at the lookup deadline. Both the fast path and the general decoder."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import pytest

from agent.challenges import MemoryChallengeRegistry
from agent.spoa import SpoaThread
from agent.spop import Ack, SetVar
from tests.support.spop_client import SpopClient, challenge

KNOWN = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA"
REMOTE = "Zm9vYmFyYmF6cXV4cXV1eHF1dXhxdXV4cXV1eA"


class SharedRegistry(MemoryChallengeRegistry):
    """A local registry with a "shared store" the test answers by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[str] = []
        self.futures: dict[str, Future[str | None]] = {}
        self.lock = threading.Lock()

    def fetch(self, token: str) -> Future[str | None] | None:
        with self.lock:
            self.asked.append(token)
            return self.futures.setdefault(token, Future())


def keyauth_of(ack: Ack) -> str | None:
    for action in ack.actions:
        if isinstance(action, SetVar):
            return str(action.value)
    return None


def wait_asked(reg: SharedRegistry, token: str) -> None:
    deadline = time.monotonic() + 10
    while token not in reg.asked:
        assert time.monotonic() < deadline, "the agent never asked the shared store"
        time.sleep(0.005)


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "general"])
def test_a_missed_token_is_answered_late_without_holding_the_next_frame(fast_path: bool) -> None:
    reg = SharedRegistry()
    reg.add(KNOWN, KNOWN + ".k", time.time() + 600)
    with (
        SpoaThread(reg, port=0, fast_path=fast_path, lookup_deadline=30.0) as agent,
        SpopClient(agent.port) as c,
    ):
        c.hello()
        c.send(challenge(REMOTE, stream_id=7, frame_id=1))
        wait_asked(reg, REMOTE)
        c.send(challenge(KNOWN, stream_id=8, frame_id=1))
        first = c.read_frame()  # the known token's ACK comes first: nothing waited for REMOTE
        assert isinstance(first, Ack) and first.stream_id == 8
        assert keyauth_of(first) == KNOWN + ".k"
        reg.futures[REMOTE].set_result(REMOTE + ".remote")
        late = c.read_frame()
        assert isinstance(late, Ack) and (late.stream_id, late.frame_id) == (7, 1)
        assert keyauth_of(late) == REMOTE + ".remote"
        assert agent.server.counters.answered == 2


def test_a_lookup_past_its_deadline_is_answered_unknown_and_the_late_answer_dropped() -> None:
    reg = SharedRegistry()
    with SpoaThread(reg, port=0, lookup_deadline=0.2) as agent, SpopClient(agent.port) as c:
        c.hello()
        c.send(challenge(REMOTE, stream_id=3, frame_id=9))
        ack = c.read_frame()  # the store never answers: HAProxy is not held beyond the deadline
        assert isinstance(ack, Ack) and (ack.stream_id, ack.frame_id) == (3, 9)
        assert ack.actions == ()
        reg.futures[REMOTE].set_result(REMOTE + ".late")  # too late: no second ACK
        assert c.ask(KNOWN, stream_id=4).stream_id == 4  # the next frame's ACK is the next frame
        assert agent.server.counters.unknown == 2


def test_deferred_acks_are_bounded_and_a_registry_without_a_store_answers_at_once() -> None:
    reg = SharedRegistry()
    with (
        SpoaThread(reg, port=0, lookup_deadline=30.0, max_deferred=1) as agent,
        SpopClient(agent.port) as c,
    ):
        c.hello()
        c.send(challenge(REMOTE, stream_id=1))
        wait_asked(reg, REMOTE)
        other = "b" * 43
        ack = c.ask(other, stream_id=2)  # the one slot is taken: unknown now, store not asked
        assert ack.stream_id == 2 and ack.actions == () and other not in reg.asked
        reg.futures[REMOTE].set_result(None)
        late = c.read_frame()
        assert isinstance(late, Ack) and late.stream_id == 1 and late.actions == ()
    plain = MemoryChallengeRegistry()  # fetch() is the base class's: nothing to ask
    with SpoaThread(plain, port=0) as agent, SpopClient(agent.port) as c:
        c.hello()
        assert agent.server.can_fetch is False
        assert c.ask(REMOTE, stream_id=5).actions == ()
