"""Finding HAProxy's SPOE agent servers in `show servers state` (output captured from 2.6.12).

That forcing them UP makes the first validation succeed is shown end to end in
tests/integration/test_issuance_pebble.py (HAProxy starts with the agent DOWN).
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path

from agent.agent_health import agent_servers, mark_agent_up, parse_servers_state
from agent.config import Listen

SHOW_SERVERS_STATE = """1
# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr srv_agent_addr srv_agent_port
4 site 1 site1 127.0.0.1 2 0 1 1 0 1 0 2 0 0 0 0 - 38597 - 0 0 - - 0
5 acme-spoa 1 agent1 127.0.0.1 0 0 1 1 0 8 2 0 6 0 0 0 - 34285 - 0 0 - - 0

"""  # noqa: E501


def test_parses_backend_server_address_port_and_state() -> None:
    states = parse_servers_state(SHOW_SERVERS_STATE)
    assert [(s.backend, s.server, s.address, s.port, s.operational) for s in states] == [
        ("site", "site1", "127.0.0.1", 38597, True),
        ("acme-spoa", "agent1", "127.0.0.1", 34285, False),
    ]


def test_agent_servers_match_port_and_address_or_wildcard_listen() -> None:
    states = parse_servers_state(SHOW_SERVERS_STATE)
    assert [s.server for s in agent_servers(states, Listen("127.0.0.1", 34285))] == ["agent1"]
    assert [s.server for s in agent_servers(states, Listen("0.0.0.0", 34285))] == ["agent1"]
    assert agent_servers(states, Listen("10.0.0.1", 34285)) == []
    assert agent_servers(states, Listen("127.0.0.1", 12345)) == []


def test_mark_agent_up_sends_set_server_health_up_for_down_agents(tmp_path: Path) -> None:
    # A stand-in stats socket: one command per connection, like HAProxy's CLI.
    path = tmp_path / "admin.sock"
    received: list[str] = []
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen()

    def serve() -> None:
        for _ in range(2):
            conn, _ = server.accept()
            with conn:
                command = conn.recv(4096).decode().strip()
                received.append(command)
                conn.sendall(SHOW_SERVERS_STATE.encode() if command.startswith("show") else b"\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        done = mark_agent_up([f"unix:{path}"], Listen("127.0.0.1", 34285), timeout=2.0)
    finally:
        thread.join(5)
        server.close()
    assert received == ["show servers state", "set server acme-spoa/agent1 health up"]
    assert done == [f"unix:{path} acme-spoa/agent1"]


def test_unreachable_haproxy_is_only_logged(tmp_path: Path) -> None:
    assert mark_agent_up([f"unix:{tmp_path}/nope.sock"], Listen("127.0.0.1", 1), 0.5) == []
