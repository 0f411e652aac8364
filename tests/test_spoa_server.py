"""The asyncio SPOA server over real sockets on 127.0.0.1, with a test client playing HAProxy."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvloop

from agent.challenges import MemoryChallengeRegistry
from agent.spoa import SpoaServer, SpoaThread
from agent.spop import (
    Ack,
    AgentDisconnect,
    AgentHello,
    HaproxyDisconnect,
    Message,
    Notify,
    Scope,
    SetVar,
    encode_frame,
)
from tests.support.haproxy import free_port
from tests.support.spop_client import SpopClient, challenge

TOKEN = "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0"
KEYAUTH = TOKEN + ".9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI"
REPO = Path(__file__).resolve().parents[1]


def answer(stream_id: int, frame_id: int, keyauth: str = KEYAUTH) -> Ack:
    return Ack(stream_id, frame_id, (SetVar(Scope.TXN, "keyauth", keyauth),))


@pytest.fixture
def registry() -> MemoryChallengeRegistry:
    reg = MemoryChallengeRegistry()
    reg.add(TOKEN, KEYAUTH, time.time() + 600)
    return reg


@pytest.fixture
def agent(registry: MemoryChallengeRegistry) -> Iterator[SpoaThread]:
    with SpoaThread(registry, port=0) as thread:
        yield thread


def test_pending_token_gets_set_var_txn_keyauth(agent: SpoaThread) -> None:
    with SpopClient(agent.port) as c:
        c.hello()
        assert c.ask(TOKEN, stream_id=4242, frame_id=3) == answer(4242, 3)


def test_unknown_token_gets_ack_without_actions(agent: SpoaThread) -> None:
    with SpopClient(agent.port) as c:
        c.hello()
        assert c.ask("unknownToken", 9, 1) == Ack(9, 1, ())


def test_expired_token_is_not_answered() -> None:
    reg = MemoryChallengeRegistry()
    reg.add(TOKEN, KEYAUTH, time.time() + 0.2)
    with SpoaThread(reg, port=0) as agent, SpopClient(agent.port) as c:
        c.hello()
        assert c.ask(TOKEN) == answer(1, 1)
        time.sleep(0.3)
        assert c.ask(TOKEN, 2, 1) == Ack(2, 1, ())


def test_token_added_while_running_is_answered(
    agent: SpoaThread, registry: MemoryChallengeRegistry
) -> None:
    with SpopClient(agent.port) as c:
        c.hello()
        assert c.ask("lateToken") == Ack(1, 1, ())
        registry.add("lateToken", "lateToken.x", time.time() + 60)
        assert c.ask("lateToken", 2, 1) == answer(2, 1, "lateToken.x")
        registry.remove("lateToken")
        assert c.ask("lateToken", 3, 1) == Ack(3, 1, ())


def test_hello_answer_negotiates_2_0_smaller_frame_size_and_pipelining(agent: SpoaThread) -> None:
    with SpopClient(agent.port) as c:
        reply = c.hello(max_frame_size=4096, capabilities=("pipelining", "async", "fragmentation"))
    assert reply == AgentHello("2.0", 4096, ("pipelining",))


def test_health_check_hello_is_answered_then_closed(agent: SpoaThread) -> None:
    with SpopClient(agent.port) as c:
        assert c.hello(healthcheck=True).version == "2.0"
        assert c.at_eof()


def test_haproxy_disconnect_is_answered_with_agent_disconnect_and_close(
    agent: SpoaThread,
) -> None:
    with SpopClient(agent.port) as c:
        c.hello()
        c.send(HaproxyDisconnect(0, "normal"))
        reply = c.expect_disconnect()
    assert reply == AgentDisconnect(0, "normal")


def test_twenty_notifies_pipelined_right_after_hello(agent: SpoaThread) -> None:
    from agent.spop import HaproxyHello

    frames = [encode_frame(HaproxyHello(("2.0",), 16380, ("pipelining",)))]
    frames += [encode_frame(challenge(TOKEN if i % 2 else "nope", 1000 + i, 1)) for i in range(20)]
    with SpopClient(agent.port) as c:
        c.send_raw(b"".join(frames))  # one write: HAProxy 3.1+ does exactly this
        assert isinstance(c.read_frame(), AgentHello)
        acks = [c.read_frame() for _ in range(20)]
    expected = [answer(1000 + i, 1) if i % 2 else Ack(1000 + i, 1) for i in range(20)]
    assert acks == expected


def test_many_concurrent_connections_are_all_served(agent: SpoaThread) -> None:
    clients = [SpopClient(agent.port) for _ in range(200)]
    try:
        for c in clients:
            c.hello()
        for i, c in enumerate(clients):
            c.send(challenge(TOKEN, stream_id=i + 1))
        for i, c in enumerate(clients):
            assert c.read_frame() == answer(i + 1, 1)
    finally:
        for c in clients:
            c.close()


def test_other_messages_and_missing_token_get_empty_ack(agent: SpoaThread) -> None:
    with SpopClient(agent.port) as c:
        c.hello()
        c.send(Notify(1, 1, (Message("something-else", (("token", TOKEN),)),)))
        assert c.read_frame() == Ack(1, 1)
        c.send(Notify(2, 1, (Message("acme-challenge", (("other", TOKEN),)),)))
        assert c.read_frame() == Ack(2, 1)
        assert c.ask(12345, 3, 1) == Ack(3, 1)  # wrong type: an operator config mistake
        c.send(Notify(4, 1, ()))
        assert c.read_frame() == Ack(4, 1)
        # ...and the connection still answers real challenges.
        assert c.ask(TOKEN, 5, 1) == answer(5, 1)


def test_idle_connection_gets_timeout_disconnect(registry: MemoryChallengeRegistry) -> None:
    with SpoaThread(registry, port=0, idle_timeout=0.3) as agent, SpopClient(agent.port) as c:
        c.hello()
        reply = c.expect_disconnect()
    assert reply.status_code == 2


def test_connections_beyond_the_limit_get_resource_error(
    registry: MemoryChallengeRegistry,
) -> None:
    with SpoaThread(registry, port=0, max_connections=2) as agent:
        a, b = SpopClient(agent.port), SpopClient(agent.port)
        try:
            a.hello()
            b.hello()
            with SpopClient(agent.port) as extra:
                assert extra.expect_disconnect().status_code == 13
            assert a.ask(TOKEN) == answer(1, 1)
        finally:
            a.close()
            b.close()


def test_on_request_reports_result_and_duration(registry: MemoryChallengeRegistry) -> None:
    seen: list[tuple[str, float]] = []

    def record(result: str, seconds: float) -> None:
        seen.append((result, seconds))

    with SpoaThread(registry, port=0, on_request=record) as agent, SpopClient(agent.port) as c:
        c.hello()
        c.ask(TOKEN)
        c.ask("nope", 2, 1)
    assert [r for r, _ in seen] == ["answered", "unknown"]
    assert all(0 <= s < 1 for _, s in seen)


def test_failing_on_request_callback_does_not_break_answers(
    registry: MemoryChallengeRegistry,
) -> None:
    def boom(result: str, seconds: float) -> None:
        raise RuntimeError("metrics down")

    with SpoaThread(registry, port=0, on_request=boom) as agent, SpopClient(agent.port) as c:
        c.hello()
        assert c.ask(TOKEN) == answer(1, 1)


class BrokenRegistry(MemoryChallengeRegistry):
    def lookup(self, token: str) -> str | None:
        raise ConnectionError("shared store unreachable")


def test_registry_failure_answers_unknown_and_keeps_the_connection() -> None:
    seen: list[str] = []

    def record(result: str, seconds: float) -> None:
        seen.append(result)

    with (
        SpoaThread(BrokenRegistry(), port=0, on_request=record) as agent,
        SpopClient(agent.port) as c,
    ):
        c.hello()
        assert c.ask(TOKEN, 1, 1) == Ack(1, 1)
        assert c.ask(TOKEN, 2, 1) == Ack(2, 1)
    assert seen == ["unknown", "unknown"]


def test_graceful_stop_sends_normal_disconnect_to_every_connection(
    registry: MemoryChallengeRegistry,
) -> None:
    agent = SpoaThread(registry, port=0)
    agent.start()
    clients = [SpopClient(agent.port) for _ in range(5)]
    try:
        for c in clients:
            c.hello()
        agent.stop()
        for c in clients:
            reply = c.expect_disconnect()
            assert reply.status_code == 0
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", agent.port), timeout=1).close()
    finally:
        for c in clients:
            c.close()
        agent.stop()


def test_port_in_use_raises_oserror_naming_the_address(registry: MemoryChallengeRegistry) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"127.0.0.1:{port}"), SpoaThread(registry, port=port):
            pass


@pytest.mark.parametrize("loop_factory", ["asyncio", "uvloop"])
def test_spoa_server_runs_inside_an_existing_event_loop(
    registry: MemoryChallengeRegistry, loop_factory: str
) -> None:
    async def scenario() -> tuple[Ack, int]:
        server = SpoaServer(registry, port=0)
        await server.start()
        port = server.port
        result: list[Ack] = []

        def client() -> None:
            with SpopClient(port) as c:
                c.hello()
                result.append(c.ask(TOKEN, 77, 2))

        t = threading.Thread(target=client)
        t.start()
        while t.is_alive():
            await asyncio.sleep(0.01)
        count = server.connection_count
        await server.stop()
        return result[0], count

    factory = asyncio.new_event_loop if loop_factory == "asyncio" else uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        ack, _ = runner.run(asyncio.wait_for(scenario(), timeout=20))
    assert ack == answer(77, 2)


def test_invalid_server_settings_are_refused(registry: MemoryChallengeRegistry) -> None:
    with pytest.raises(ValueError, match="max_frame_size"):
        SpoaServer(registry, max_frame_size=100)
    with pytest.raises(ValueError, match="idle_timeout"):
        SpoaServer(registry, idle_timeout=0)


def test_module_entry_point_serves_given_tokens_and_stops_on_sigterm() -> None:
    token_arg = f"{TOKEN}={KEYAUTH}"
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.spoa", "--listen", f"127.0.0.1:{port}", "--token", token_arg],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert line.strip() == f"listening on 127.0.0.1:{port}"
        with SpopClient(port) as c:
            c.hello()
            assert c.ask(TOKEN) == answer(1, 1)
            proc.send_signal(signal.SIGTERM)
            assert c.expect_disconnect().status_code == 0
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_module_entry_point_rejects_a_bad_token() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "agent.spoa", "--listen", "127.0.0.1:0", "--token", "a/b=x"],
        cwd=REPO,
        capture_output=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 2
    assert b"not a valid ACME token" in proc.stderr
