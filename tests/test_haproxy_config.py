"""`haproxy-config`: the HAProxy pieces printed for a config are accepted by the
real HAProxy (2.6 and 2.8) and, assembled, answer a real challenge through our
SPOE agent while unknown tokens fall through to the site."""

from __future__ import annotations

import http.server
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from agent.challenges import MemoryChallengeRegistry
from agent.config import Config, ConfigError, load_config
from agent.haproxy_config import (
    Options,
    full_config,
    render,
    render_text,
    spoe_conf,
    write_bootstrap_files,
)
from agent.spoa import SpoaThread
from tests.support.haproxy import HAProxyProcess, free_port

REPO = Path(__file__).resolve().parents[1]


def write_config(
    tmp: Path,
    *,
    crt_list: bool,
    spoa_port: int = 12345,
    runtime_api: str | None = None,
    names: tuple[str, ...] = ("www", "api"),
) -> Config:
    state = tmp / "state"
    certs = tmp / "certs"
    for d in (state, certs, tmp / "keys"):
        d.mkdir(exist_ok=True)
    api = runtime_api or f"unix:{tmp / 'admin.sock'}"
    lines = [
        f'state_dir = "{state}"',
        "[acme]",
        'directory = "https://127.0.0.1:14000/dir"',
        "[spoa]",
        f'listen = "127.0.0.1:{spoa_port}"',
        "[haproxy]",
        f'runtime_api = ["{api}"]',
        f'cert_dir = "{certs}"',
    ]
    if crt_list:
        lines.append(f'crt_list = "{tmp / "certs.list"}"')
    for n in names:
        lines += [
            "[[certificates]]",
            f'name = "{n}"',
            f'domains = ["{n}.example.test", "alt.{n}.example.test"]',
            f'key = "{tmp / "keys" / (n + ".key")}"',
            "generate_key = true",
        ]
    path = tmp / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return load_config(path)


def directives(text: str) -> list[str]:
    """Non-comment lines, whitespace collapsed (what HAProxy actually reads)."""
    out = []
    for raw in text.replace("\\\n", "").splitlines():
        line = raw.split("#", 1)[0].strip() if not raw.strip().startswith("#") else ""
        if line:
            out.append(" ".join(line.split()))
    return out


def haproxy_check(binary: str, cfg: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [binary, "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30, check=False
    )


def test_generated_spoe_conf_has_the_shipped_contract() -> None:
    # Same directives as haproxy/spoe-acme.conf (the file helper A ships and tests).
    assert directives(spoe_conf()) == directives((REPO / "haproxy" / "spoe-acme.conf").read_text())
    assert directives(spoe_conf()) == directives((REPO / "docker" / "spoe-acme.conf").read_text())


def test_stats_socket_is_shared_through_the_agents_group(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, crt_list=False)
    s = render(cfg)
    sock = tmp_path / "admin.sock"
    assert f"stats socket {sock} mode 660 group haproxy-acme level admin" in s.global_lines
    numeric = render(cfg, Options(socket_group="10000"))
    assert "mode 660 gid 10000 level admin" in numeric.global_lines


def test_tcp_runtime_api_gets_a_tcp_stats_socket(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, crt_list=False, runtime_api="tcp:127.0.0.1:9999")
    assert "stats socket ipv4@127.0.0.1:9999 level admin" in render(cfg).global_lines


def test_bind_lists_every_certificate_without_crt_list(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, crt_list=False)
    bind = render(cfg).https_bind
    certs = tmp_path / "certs"
    assert bind.split() == [
        "bind",
        ":443",
        "ssl",
        "crt",
        str(certs / "_default.pem"),
        "crt",
        str(certs / "www.pem"),
        "crt",
        str(certs / "api.pem"),
    ]


def test_bind_uses_the_crt_list_when_configured(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, crt_list=True)
    s = render(cfg)
    assert f"crt-list {tmp_path / 'certs.list'}" in s.https_bind
    assert s.crt_list == f"{tmp_path / 'certs' / 'www.pem'}\n{tmp_path / 'certs' / 'api.pem'}\n"


def test_spoa_backend_points_at_the_agents_listen_address(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, crt_list=False, spoa_port=23456)
    assert "server agent1 127.0.0.1:23456 check" in render(cfg).spoa_backend


def test_text_output_holds_every_piece(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, crt_list=True)
    text = render_text(cfg)
    s = render(cfg)
    for piece in (s.spoe_conf, s.global_lines, s.http_frontend, s.https_bind, s.spoa_backend):
        assert piece in text
    assert "www.pem" in text.split("crt-list; the agent appends", 1)[1]


def test_bootstrap_writes_placeholders_once_and_never_the_stable_key(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, crt_list=False)
    written = write_bootstrap_files(cfg)
    certs = tmp_path / "certs"
    assert sorted(written) == sorted([certs / "_default.pem", certs / "www.pem", certs / "api.pem"])
    for p in written:
        assert p.stat().st_mode & 0o777 == 0o600
        leaf = x509.load_pem_x509_certificate(p.read_bytes())
        assert "placeholder" in leaf.subject.rfc4514_string()
    www = x509.load_pem_x509_certificate((certs / "www.pem").read_bytes())
    sans = www.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["www.example.test", "alt.www.example.test"]
    # generate_key keys are the agent's business: bootstrap creates none.
    assert not (tmp_path / "keys" / "www.key").exists()
    before = {p: p.read_bytes() for p in written}
    assert write_bootstrap_files(cfg) == []
    assert {p: p.read_bytes() for p in written} == before


def test_bootstrap_with_crt_list_lists_only_existing_bundles(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, crt_list=True)
    (tmp_path / "certs" / "api.pem").write_bytes(b"issued earlier")
    written = write_bootstrap_files(cfg)
    assert tmp_path / "certs.list" in written
    assert (tmp_path / "certs.list").read_text() == f"{tmp_path / 'certs' / 'api.pem'}\n"
    assert not (tmp_path / "certs" / "www.pem").exists()


def test_bootstrap_names_a_missing_cert_dir(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, crt_list=False)
    (tmp_path / "certs").rmdir()
    with pytest.raises(FileNotFoundError, match=r"\[haproxy\] cert_dir .*certs does not exist"):
        write_bootstrap_files(cfg)


@pytest.mark.integration
@pytest.mark.parametrize("crt_list", [False, True], ids=["crt", "crt-list"])
def test_full_config_passes_haproxy_check(haproxy_bin: str, tmp_path: Path, crt_list: bool) -> None:
    cfg = write_config(tmp_path, crt_list=crt_list)
    write_bootstrap_files(cfg)
    spoe = tmp_path / "spoe-acme.conf"
    spoe.write_text(spoe_conf())
    hcfg = tmp_path / "haproxy.cfg"
    hcfg.write_text(full_config(cfg, Options(spoe_conf=spoe, socket_group="0")))
    r = haproxy_check(haproxy_bin, hcfg)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ALERT" not in r.stdout + r.stderr


@pytest.mark.integration
def test_full_config_without_bootstrap_fails_haproxy_check_naming_the_file(
    haproxy_bin: str, tmp_path: Path
) -> None:
    # Why bootstrap exists: HAProxy refuses to start on a missing certificate.
    cfg = write_config(tmp_path, crt_list=False)
    spoe = tmp_path / "spoe-acme.conf"
    spoe.write_text(spoe_conf())
    hcfg = tmp_path / "haproxy.cfg"
    hcfg.write_text(full_config(cfg, Options(spoe_conf=spoe, socket_group="0")))
    r = haproxy_check(haproxy_bin, hcfg)
    assert r.returncode != 0
    assert "_default.pem" in r.stdout + r.stderr


@pytest.mark.integration
def test_docker_demo_haproxy_cfg_passes_haproxy_check(haproxy_bin: str, tmp_path: Path) -> None:
    # docker/haproxy.cfg with its container paths moved into tmp_path.
    cfg = write_config(tmp_path, crt_list=True, names=("demo",))
    write_bootstrap_files(cfg)
    text = (REPO / "docker" / "haproxy.cfg").read_text()
    text = text.replace(
        "/usr/local/etc/haproxy/spoe-acme.conf", str(REPO / "docker/spoe-acme.conf")
    )
    text = text.replace("/etc/haproxy/certs/certs.list", str(tmp_path / "certs.list"))
    text = text.replace("/etc/haproxy/certs/", str(tmp_path / "certs") + "/")
    text = text.replace("/run/haproxy/admin.sock", str(tmp_path / "admin.sock"))
    text = text.replace("gid 10000", "gid 0")
    (tmp_path / "haproxy.cfg").write_text(text)
    r = haproxy_check(haproxy_bin, tmp_path / "haproxy.cfg")
    assert r.returncode == 0, r.stdout + r.stderr


def test_docker_demo_haproxy_cfg_holds_the_generated_pieces(tmp_path: Path) -> None:
    # docker/config.toml names container paths; move the ones that load_config
    # checks (ca_bundle and trusted_roots must exist, the key's directory must be writable).
    text = (REPO / "docker" / "config.toml").read_text()
    text = text.replace('ca_bundle = "/demo-ca/ca.pem"', "")
    text = text.replace('trusted_roots = "/demo-ca/pebble-roots.pem"', "")
    text = text.replace("/var/lib/haproxy-acme-agent/keys/", f"{tmp_path}/")
    (tmp_path / "config.toml").write_text(text)
    cfg = load_config(tmp_path / "config.toml")
    s = render(
        cfg, Options(socket_group="10000", spoe_conf=Path("/usr/local/etc/haproxy/spoe-acme.conf"))
    )
    docker_cfg = directives((REPO / "docker" / "haproxy.cfg").read_text())
    expected = directives(s.global_lines + s.http_frontend + s.https_bind + s.spoa_backend)
    # The one difference: in compose HAProxy reaches the agent by its service name.
    expected = [ln for ln in expected if not ln.startswith("server agent1 ")]
    missing = [ln for ln in expected if ln not in docker_cfg]
    assert missing == []
    assert (
        "server agent1 agent:12345 check inter 5s downinter 1s "
        "resolvers docker init-addr last,libc,none"
    ) in docker_cfg


# --- end to end: the generated config answers a challenge through our agent -------------


class _Site(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"the site itself\n"
        self.send_response(404 if "acme-challenge" in self.path else 200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def site() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Site)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def http_get(port: int, path: str) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(
            f"GET {path} HTTP/1.1\r\nHost: www.example.test\r\nConnection: close\r\n\r\n".encode()
        )
        data = b""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    return status, body


@pytest.mark.integration
def test_generated_config_serves_challenges_through_the_agent(
    haproxy_bin: str, tmp_path: Path, site: int
) -> None:
    registry = MemoryChallengeRegistry()
    token = "tok_" + "A" * 40
    keyauth = token + ".thumbprint-of-the-account-key"
    registry.add(token, keyauth, time.time() + 300)
    with SpoaThread(registry, "127.0.0.1", 0) as agent:
        cfg = write_config(tmp_path, crt_list=True, spoa_port=agent.port)
        write_bootstrap_files(cfg)
        spoe = tmp_path / "spoe-acme.conf"
        spoe.write_text(spoe_conf())
        http_port, https_port = free_port(), free_port()
        text = full_config(
            cfg,
            Options(
                spoe_conf=spoe,
                socket_group="0",
                http_bind=f"127.0.0.1:{http_port}",
                https_bind=f"127.0.0.1:{https_port}",
                site=f"127.0.0.1:{site}",
            ),
        )
        text = text.replace("global\n", "global\n    noreuseport\n", 1)
        proc = HAProxyProcess(haproxy_bin, text, {}, tmp_path / "run")
        proc.start()
        try:
            status, body = http_get(http_port, f"/.well-known/acme-challenge/{token}")
            assert (status, body) == (200, keyauth.encode()), proc.log_text()
            # Unknown token: the site's own answer, not an HAProxy error.
            status, body = http_get(http_port, "/.well-known/acme-challenge/" + "B" * 43)
            assert (status, body) == (404, b"the site itself\n")
            assert http_get(http_port, "/")[0] == 200
            # TLS is up on the fallback certificate until the first issuance.
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            with (
                socket.create_connection(("127.0.0.1", https_port), timeout=5) as raw,
                ctx.wrap_socket(raw, server_hostname="www.example.test") as tls,
            ):
                der = tls.getpeercert(binary_form=True)
            assert der is not None
            leaf = x509.load_der_x509_certificate(der)
            assert re.search("placeholder", leaf.subject.rfc4514_string())
        finally:
            proc.stop()


def test_cli_prints_the_pieces_and_bootstraps(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, crt_list=True)
    exe = [sys.executable, "-m", "agent.cli", "haproxy-config", "-c", str(cfg.path)]
    r = subprocess.run(exe, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout == render_text(cfg)
    r = subprocess.run([*exe, "--spoe"], capture_output=True, text=True, timeout=60, check=False)
    assert r.stdout == spoe_conf()
    r = subprocess.run(
        [*exe, "--full", "--bootstrap"], capture_output=True, text=True, timeout=60, check=False
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == full_config(cfg)
    assert "_default.pem" in r.stderr
    assert (tmp_path / "certs" / "_default.pem").exists()


def test_cli_names_the_config_key_on_a_bad_config(tmp_path: Path) -> None:
    bad = tmp_path / "config.toml"
    bad.write_text('[acme]\ndirectory = "https://127.0.0.1/dir"\n[spoa]\nlisten = "nope"\n')
    r = subprocess.run(
        [sys.executable, "-m", "agent.cli", "haproxy-config", "-c", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 2
    assert "spoa.listen" in r.stderr
    assert r.stdout == ""


def test_tune_bufsize_matches_the_agents_bufsize(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, crt_list=False)
    assert "tune.bufsize 16384" in render(cfg).global_lines  # HAProxy's default
    text = cfg.path.read_text().replace("[haproxy]\n", "[haproxy]\nbufsize = 32768\n")
    cfg.path.write_text(text)
    assert "tune.bufsize 32768" in render(load_config(cfg.path)).global_lines
    cfg.path.write_text(text.replace("bufsize = 32768", "bufsize = 100"))
    with pytest.raises(ConfigError, match=r"haproxy\.bufsize: must be between 1024"):
        load_config(cfg.path)


def test_without_runtime_api_the_socket_is_suggested_with_a_hint(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, crt_list=False)
    cfg.path.write_text(re.sub(r"runtime_api = .*\n", "", cfg.path.read_text()))
    lines = render(load_config(cfg.path)).global_lines.splitlines()
    assert lines[1].strip().startswith("# add runtime_api = ")
    assert "stats socket /run/haproxy/admin.sock mode 660 group haproxy-acme" in lines[2]
