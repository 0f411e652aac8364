"""Real HAProxy (the shipped haproxy/ configs) + real Pebble, for ACME end-to-end tests and bench.

`AcmeStack(workdir, haproxy_binary, nonce_reject=..., validity_period=...,
pebble_binary=...)` (pebble_binary: default the first of pebble_binaries()):
HAProxy runs haproxy/haproxy.cfg + haproxy/spoe-acme.conf as shipped (only
`noreuseport` is prepended, and a stub "site" frontend appended) with its
HTTP frontend on `http_port`; Pebble validates http-01 against that port.
The SPOE agent is NOT started here: `haproxy-acme-agent renew` serves it on
`spoa_port` itself. `write_config(certs, ...)` writes an agent config.toml
pointing at all of it.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.support.certs import write_crt_list
from tests.support.haproxy import HAProxyProcess, free_port
from tests.support.pebble import PebbleProcess

REPO = Path(__file__).resolve().parents[2]
SHIPPED_CFG = REPO / "haproxy" / "haproxy.cfg"
SHIPPED_SPOE = REPO / "haproxy" / "spoe-acme.conf"

SITE_STUB = """
# Test only: plays the site's normal backend.
frontend site_stub
    bind "127.0.0.1:${SITE_PORT}"
    http-request return status 404 content-type text/plain string "site"
"""


def toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str | Path):
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


class AcmeStack:
    """HAProxy + Pebble on 127.0.0.1 with free ports; see the module docstring."""

    def __init__(
        self,
        workdir: Path,
        haproxy_binary: str,
        *,
        nonce_reject: int = 0,
        validity_period: int | None = None,
        pebble_env: dict[str, str] | None = None,
        pebble_binary: str | None = None,
        pebble_profiles: dict[str, int] | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        hdir = self.workdir / "haproxy"
        hdir.mkdir(parents=True, exist_ok=True)
        self.http_port = free_port()
        self.https_port = free_port()
        self.spoa_port = free_port()
        site_port = free_port()
        self.cert_dir = hdir / "certs"
        self.cert_dir.mkdir(mode=0o700, exist_ok=True)
        self.crt_list = write_crt_list(hdir, "fallback.test")
        env = {
            "HAPROXY_ADMIN_SOCKET": str(hdir / "admin.sock"),
            "HTTP_BIND": f"127.0.0.1:{self.http_port}",
            "HTTPS_BIND": f"127.0.0.1:{self.https_port}",
            "SPOE_ACME_CONF": str(SHIPPED_SPOE),
            "CRT_LIST": str(self.crt_list),
            "SITE_ADDR": f"127.0.0.1:{site_port}",
            "SITE_PORT": str(site_port),
            "SPOA_ADDR": f"127.0.0.1:{self.spoa_port}",
        }
        config = "global\n    noreuseport\n\n" + SHIPPED_CFG.read_text() + SITE_STUB
        self.haproxy = HAProxyProcess(haproxy_binary, config, env, hdir)
        self.pebble = PebbleProcess(
            self.workdir / "pebble",
            self.http_port,
            nonce_reject=nonce_reject,
            validity_period=validity_period,
            extra_env=pebble_env,
            binary=pebble_binary,
            profiles=pebble_profiles,
        )

    def start(self) -> None:
        self.haproxy.start()
        try:
            self.pebble.start()
        except BaseException:
            self.haproxy.stop()
            raise

    def stop(self) -> None:
        try:
            self.pebble.stop()
        finally:
            self.haproxy.stop()

    def write_config(
        self,
        path: Path,
        certificates: list[dict[str, Any]],
        state_dir: Path | None = None,
        **acme: Any,
    ) -> Path:
        """An agent config.toml for this stack; `acme` overrides [acme] keys."""
        acme_keys: dict[str, Any] = {
            "directory": self.pebble.directory_url,
            "ca_bundle": self.pebble.ca_bundle,
            # Issued chains must lead to a trusted root: Pebble's is private.
            "trusted_roots": self.pebble.roots_file(),
            "email": "ops@example.com",
            "poll_interval": 0.05,
            "timeout": 20,
        }
        acme_keys.update(acme)
        lines = [f"state_dir = {toml_value(state_dir or path.parent / 'state')}", "[acme]"]
        lines += [f"{k} = {toml_value(v)}" for k, v in acme_keys.items()]
        lines += ["[spoa]", f'listen = "127.0.0.1:{self.spoa_port}"']
        assert self.haproxy.admin_socket is not None
        lines += [
            "[haproxy]",
            f"runtime_api = [{toml_value('unix:' + str(self.haproxy.admin_socket))}]",
            f"crt_list = {toml_value(self.crt_list)}",
            f"cert_dir = {toml_value(self.cert_dir)}",
            f'verify = ["127.0.0.1:{self.https_port}"]',
        ]
        for cert in certificates:
            lines.append("[[certificates]]")
            lines += [f"{k} = {toml_value(v)}" for k, v in cert.items()]
        path.write_text(textwrap.dedent("\n".join(lines)) + "\n")
        return path

    def __enter__(self) -> AcmeStack:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
