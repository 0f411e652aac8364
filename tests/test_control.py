"""The daemon's local control socket."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path
from typing import Any

import pytest

from agent.control import ControlServer, ControlUnavailable, request


def test_request_reaches_the_handler_and_returns_its_reply(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    seen: list[dict[str, Any]] = []

    async def handler(req: dict[str, Any]) -> dict[str, Any]:
        seen.append(req)
        return {"ok": True, "echo": req["names"]}

    async def scenario() -> tuple[dict[str, Any], dict[str, Any], int]:
        server = ControlServer(path, handler)
        await server.start()
        mode = stat.S_IMODE(path.stat().st_mode)
        good = await asyncio.to_thread(request, path, {"cmd": "renew", "names": ["a"]}, 5.0)
        bad = await asyncio.to_thread(request, path, {"nocmd": 1}, 5.0)
        await server.stop()
        return good, bad, mode

    good, bad, mode = asyncio.run(scenario())
    assert good == {"ok": True, "echo": ["a"]}
    assert bad["ok"] is False and "cmd" in bad["error"]
    assert mode == 0o600
    assert seen == [{"cmd": "renew", "names": ["a"]}]
    assert not path.exists()


def test_no_daemon_means_control_unavailable(tmp_path: Path) -> None:
    with pytest.raises(ControlUnavailable):
        request(tmp_path / "missing.sock", {"cmd": "status"}, 1.0)


def test_a_stale_socket_file_from_a_dead_daemon_is_replaced(tmp_path: Path) -> None:
    import socket

    path = tmp_path / "control.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()  # the file stays, nobody listens

    async def handler(req: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True}

    async def scenario() -> dict[str, Any]:
        server = ControlServer(path, handler)
        await server.start()
        reply = await asyncio.to_thread(request, path, {"cmd": "ping"}, 5.0)
        await server.stop()
        return reply

    assert asyncio.run(scenario()) == {"ok": True}


def test_a_second_daemon_refuses_a_socket_in_use(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"

    async def handler(req: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True}

    async def scenario() -> None:
        first = ControlServer(path, handler)
        await first.start()
        try:
            with pytest.raises(OSError, match="in use"):
                await ControlServer(path, handler).start()
        finally:
            await first.stop()

    asyncio.run(scenario())
