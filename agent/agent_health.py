"""Tell HAProxy that a freshly started SPOE agent is up (for `renew` run from cron).

HAProxy health-checks the agent's backend server (`option spop-check`,
`check inter 5s` in haproxy/haproxy.cfg). Between two cron runs no agent
listens, so the server is DOWN, and a new agent would only be used after the
next successful check, seconds later: the CA's validation request, which comes
within milliseconds of our answer, would fall through to the site and fail.

`mark_agent_up` asks every configured HAProxy instance, over the runtime API,
which servers point at the agent's listen address (`show servers state`) and
forces their health UP (`set server B/S health up`), the command HAProxy
documents for "slow health checks". The regular checks then keep it honest.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from agent.config import Listen
from agent.haproxy_api import HAProxyError, RuntimeAPI

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerState:
    backend: str
    server: str
    address: str
    port: int
    operational: bool  # srv_op_state 2 = running


def parse_servers_state(reply: str) -> list[ServerState]:
    """Parse `show servers state` (format 1: a "1" line, a "# field ..." header, rows)."""
    lines = [ln for ln in reply.splitlines() if ln.strip()]
    header: list[str] | None = None
    out: list[ServerState] = []
    for line in lines:
        if line.startswith("#"):
            header = line.lstrip("#").split()
            continue
        if header is None:
            continue  # the format version line
        fields = line.split()
        if len(fields) < len(header) - 3:  # trailing optional columns may be missing
            continue
        row = dict(zip(header, fields, strict=False))
        try:
            port = int(row.get("srv_port", "0"))
        except ValueError:
            port = 0
        out.append(
            ServerState(
                backend=row.get("be_name", ""),
                server=row.get("srv_name", ""),
                address=row.get("srv_addr", ""),
                port=port,
                operational=row.get("srv_op_state") == "2",
            )
        )
    return out


def _same_address(server_addr: str, listen_host: str) -> bool:
    if listen_host in ("0.0.0.0", "::", "*", ""):
        return True
    try:
        return ipaddress.ip_address(server_addr) == ipaddress.ip_address(listen_host)
    except ValueError:
        return server_addr == listen_host


def agent_servers(states: Sequence[ServerState], listen: Listen) -> list[ServerState]:
    """The servers that are our SPOE agent: same port, and same address (or wildcard listen)."""
    return [s for s in states if s.port == listen.port and _same_address(s.address, listen.host)]


def mark_agent_up(runtime_apis: Sequence[str], listen: Listen, timeout: float) -> list[str]:
    """Force HAProxy's agent servers UP on every instance; returns "instance backend/server".

    Problems are logged, never raised: at worst HAProxy notices the agent at
    its next health check.
    """
    done: list[str] = []
    for address in runtime_apis:
        try:
            api = RuntimeAPI(address, timeout=timeout)
            servers = agent_servers(parse_servers_state(api.command("show servers state")), listen)
            if not servers:
                log.warning(
                    "HAProxy %s has no server pointing at the SPOE agent %s", address, listen
                )
            for s in servers:
                if s.operational:
                    continue
                reply = api.command(f"set server {s.backend}/{s.server} health up")
                if reply.strip():
                    log.warning("HAProxy %s: set server health: %s", address, reply.strip())
                    continue
                done.append(f"{address} {s.backend}/{s.server}")
        except (HAProxyError, OSError, ValueError) as e:
            log.warning("cannot tell HAProxy %s that the SPOE agent is up: %s", address, e)
    return done
