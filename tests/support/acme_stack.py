"""Real HAProxy (the shipped haproxy/ configs) + real Pebble, for ACME end-to-end tests and bench.

`AcmeStack(workdir, haproxy_binary, nonce_reject=..., validity_period=...,
pebble_binary=...)` (pebble_binary: default the first of pebble_binaries()):
HAProxy runs haproxy/haproxy.cfg + haproxy/spoe-acme.conf as shipped (only
`noreuseport` is prepended, and a stub "site" frontend appended) with its
HTTP frontend on `http_port`; Pebble validates http-01 against that port.
The SPOE agent is NOT started here: `haproxy-acme-agent renew` serves it on
`spoa_port` itself. `write_config(certs, ...)` writes an agent config.toml
pointing at all of it.

`validation_port`: Pebble validates http-01 there instead (another node's
HAProxy, in fleet tests).

`answer="map"` runs haproxy/haproxy-map.cfg instead (no SPOE): its map is
`virt@acme` on HAProxy 3.0+ and the empty file <cert_dir>/acme-challenge.map
before (the agent's defaults), and write_config adds `[challenges] answer = "map"`.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.support.certs import write_crt_list
from tests.support.haproxy import HAProxyProcess, _label_of, free_port
from tests.support.pebble import PebbleProcess

REPO = Path(__file__).resolve().parents[2]
SHIPPED_CFG = REPO / "haproxy" / "haproxy.cfg"
SHIPPED_SPOE = REPO / "haproxy" / "spoe-acme.conf"
SHIPPED_MAP_CFG = REPO / "haproxy" / "haproxy-map.cfg"

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
    if isinstance(v, dict):  # an inline table: `keys = [{ key = "...", key_type = "..." }]`
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {v!r} as TOML")


def haproxy_map_name(binary: str, cert_dir: Path) -> str:
    """The agent's default challenge map for this HAProxy build: virt@acme on 3.0+,
    else <cert_dir>/acme-challenge.map."""
    label = _label_of(binary)
    try:
        major, minor = (int(x) for x in label.split(".")[:2])
    except ValueError:
        return str(cert_dir / "acme-challenge.map")
    if (major, minor) >= (3, 0):
        return "virt@acme"
    return str(cert_dir / "acme-challenge.map")


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
        answer: str = "spoe",
        dns_server: str | None = None,
        pebble_binary: str | None = None,
        pebble_profiles: dict[str, int] | None = None,
        validation_port: int | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.answer = answer
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
        shipped = SHIPPED_CFG
        if answer == "map":
            shipped = SHIPPED_MAP_CFG
            self.map_name = haproxy_map_name(haproxy_binary, self.cert_dir)
            if not self.map_name.startswith("virt@"):
                Path(self.map_name).write_text("")  # HAProxy < 3.0 loads it empty
            env["ACME_MAP"] = self.map_name
        config = "global\n    noreuseport\n\n" + shipped.read_text() + SITE_STUB
        self.haproxy = HAProxyProcess(haproxy_binary, config, env, hdir)
        self.pebble = PebbleProcess(
            self.workdir / "pebble",
            validation_port or self.http_port,  # another node's HAProxy (fleet tests)
            nonce_reject=nonce_reject,
            validity_period=validity_period,
            extra_env=pebble_env,
            dns_server=dns_server,
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
        challenges: dict[str, Any] | None = None,
        extra_runtime_api: tuple[str, ...] = (),
        **acme: Any,
    ) -> Path:
        """An agent config.toml for this stack; `acme` overrides [acme] keys,
        `challenges` adds [challenges] keys, `extra_runtime_api` more instances."""
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
        apis = ["unix:" + str(self.haproxy.admin_socket), *extra_runtime_api]
        lines += [
            "[haproxy]",
            f"runtime_api = {toml_value(apis)}",
            f"crt_list = {toml_value(self.crt_list)}",
            f"cert_dir = {toml_value(self.cert_dir)}",
            f'verify = ["127.0.0.1:{self.https_port}"]',
        ]
        chall = {"answer": "map"} if self.answer == "map" else {}
        chall.update(challenges or {})
        if chall:
            lines.append("[challenges]")
            lines += [f"{k} = {toml_value(v)}" for k, v in chall.items()]
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
