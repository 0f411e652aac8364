"""A real HAProxy serving a crt-list from a cert_dir, for deploy-level chaos tests and benches.

Contract: `CrtSite.start(binary, workdir)` writes one throwaway certificate
("site", names site.test) into `cert_dir`, a crt-list naming it, and starts
HAProxy with a TLS frontend on `port` (crt-list) and a second one on
`static_port` that serves a fixed copy of "site" (so a Deployer whose
`verify` points there sees another certificate: every deploy fails and rolls
back). `deployer(...)` builds an agent.deploy.Deployer for it; `served(sni)`
is the leaf a real handshake gets; `stop()` stops HAProxy by its handle.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from agent.deploy import Deployer, DeployTarget
from tests.support.certs import CA, make_bundle, make_ca
from tests.support.haproxy import HAProxyProcess, free_port
from tests.support.tls import served_leaf

CONFIG = """\
global
    noreuseport
    stats socket "${STATE}/admin.sock" mode 600 level admin expose-fd listeners

defaults
    mode http
    timeout connect 2s
    timeout client 5s
    timeout server 5s

frontend tls
    bind "127.0.0.1:${PORT}" ssl crt-list "${STATE}/crt-list.txt"
    bind "127.0.0.1:${STATIC_PORT}" ssl crt "${STATE}/static.pem"
    http-request return status 200 content-type text/plain string ok
"""


@dataclass
class CrtSite:
    haproxy: HAProxyProcess
    ca: CA
    state: Path
    cert_dir: Path
    crt_list: Path
    port: int
    static_port: int
    site_serial: int

    @classmethod
    def start(cls, binary: str, workdir: Path) -> CrtSite:
        state = workdir / "state"
        cert_dir = state / "certs"
        cert_dir.mkdir(parents=True)
        ca = make_ca()
        bundle, cert, _ = make_bundle(ca, ["site.test"])
        (cert_dir / "site.pem").write_bytes(bundle)
        (state / "static.pem").write_bytes(bundle)
        crt_list = state / "crt-list.txt"
        crt_list.write_text(f"{cert_dir / 'site.pem'}\n")
        port, static_port = free_port(), free_port()
        env = {"STATE": str(state), "PORT": str(port), "STATIC_PORT": str(static_port)}
        proc = HAProxyProcess(binary, CONFIG, env, workdir / "haproxy")
        proc.start()
        return cls(proc, ca, state, cert_dir, crt_list, port, static_port, cert.serial_number)

    @property
    def api_address(self) -> str:
        return f"unix:{self.state}/admin.sock"

    def deployer(self, *, failing_verify: bool = False, timeout: float = 10.0) -> Deployer:
        """The agent's Deployer for this site; `failing_verify`: verify against the
        static frontend, which serves another certificate (every deploy rolls back)."""
        port = self.static_port if failing_verify else self.port
        return Deployer(
            [self.api_address],
            self.cert_dir,
            crt_list=self.crt_list,
            verify=[f"127.0.0.1:{port}"],
            timeout=timeout,
        )

    def new_targets(self, prefix: str, count: int) -> list[DeployTarget]:
        """`count` brand-new certificates `<prefix><i>` for `<prefix><i>.test`."""
        out = []
        for i in range(count):
            name = f"{prefix}{i}"
            bundle, cert, _ = make_bundle(self.ca, [f"{name}.test"])
            out.append(DeployTarget(name, bundle, cert.serial_number, [f"{name}.test"]))
        return out

    def served(self, sni: str) -> x509.Certificate:
        return served_leaf(self.port, sni)

    def stop(self) -> None:
        self.haproxy.stop()
