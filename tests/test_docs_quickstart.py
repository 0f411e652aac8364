"""docs/quickstart.md runs: its ```sh doctest blocks (and its ```toml
doctest-file=PATH block) are executed in order against real Pebble and real
HAProxy, so the quickstart cannot rot.

Substitutions (the only differences from what an operator types):
- absolute paths move into a temp dir (/etc/haproxy-acme-agent, /etc/haproxy,
  /var/lib/haproxy-acme-agent, /run/haproxy/admin.sock);
- the Let's Encrypt directory aliases become Pebble's URL plus its ca_bundle,
  so "staging" and "production" are the same Pebble here;
- loopback ports become free ports; `haproxy-config` gets binds on those
  ports and `--socket-group 0` (the haproxy-acme group does not exist here);
- `haproxy` is the HAProxy build under test.
What root does by hand in the plain ```sh blocks (creating the directories)
the harness does. After the block that runs `haproxy -c`, the harness starts
HAProxy from the generated haproxy.cfg (systemctl's job in the quickstart).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent import keys
from tests.support.haproxy import HAProxyProcess, free_port
from tests.support.pebble import PebbleProcess
from tests.support.tls import served_leaf

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "docs" / "quickstart.md"

FENCE = re.compile(r"^```(\S+)([^\n]*)\n(.*?)^```\s*$", re.S | re.M)


@dataclass(frozen=True)
class Block:
    lang: str
    info: str
    body: str
    line: int


def blocks(text: str) -> list[Block]:
    out = []
    for m in FENCE.finditer(text):
        out.append(
            Block(m.group(1), m.group(2).strip(), m.group(3), text[: m.start()].count("\n") + 1)
        )
    return out


def doctest_blocks() -> list[Block]:
    return [b for b in blocks(QUICKSTART.read_text()) if "doctest" in b.info]


def test_quickstart_has_runnable_blocks_for_every_step() -> None:
    runnable = doctest_blocks()
    text = "\n".join(b.body for b in runnable)
    for command in ("check-config", "pins", "haproxy-config", "renew", "status", " run "):
        assert command in text, command
    assert sum(1 for b in runnable if b.info.startswith("doctest-file=")) == 1


@pytest.mark.integration
def test_quickstart_commands_work_against_pebble_and_haproxy(
    haproxy_bin: str, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    http, https, spoa, metrics, site = (free_port() for _ in range(5))
    with PebbleProcess(tmp_path / "pebble", http) as pebble:
        paths = [
            ("/etc/haproxy-acme-agent/", f"{root}/etc/haproxy-acme-agent/"),
            ("/var/lib/haproxy-acme-agent", f"{root}/var/lib/haproxy-acme-agent"),
            ("/etc/haproxy/", f"{root}/etc/haproxy/"),
            ("/run/haproxy/admin.sock", f"{root}/run/haproxy/admin.sock"),
            ("127.0.0.1:12345", f"127.0.0.1:{spoa}"),
            ("127.0.0.1:9810", f"127.0.0.1:{metrics}"),
        ]
        directory = (
            f'"{pebble.directory_url}"\nca_bundle = "{pebble.ca_bundle}"\n'
            f'trusted_roots = "{pebble.roots_file()}"\npoll_interval = 0.1'
        )
        commands = [
            (
                "haproxy-acme-agent haproxy-config",
                f"haproxy-acme-agent haproxy-config --spoe-conf {root}/etc/haproxy/spoe-acme.conf"
                f" --http-bind 127.0.0.1:{http} --https-bind 127.0.0.1:{https}"
                f" --site 127.0.0.1:{site} --socket-group 0",
            ),
            ("haproxy -c", f"{haproxy_bin} -c"),
        ]

        def subst(text: str, extra: list[tuple[str, str]]) -> str:
            for a, b in paths + extra:
                text = text.replace(a, b)
            return text

        # What the plain (root) blocks of step 1 create.
        for d in ("etc/haproxy-acme-agent", "etc/haproxy/certs", "run/haproxy"):
            (root / d).mkdir(parents=True, exist_ok=True)
        (root / "var/lib/haproxy-acme-agent").mkdir(parents=True, mode=0o700)

        env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        }
        proc: HAProxyProcess | None = None
        outputs: list[str] = []
        try:
            for b in doctest_blocks():
                where = f"docs/quickstart.md line {b.line}"
                if b.info.startswith("doctest-file="):
                    target = Path(subst(b.info.split("=", 1)[1], []))
                    body = re.sub(r'"letsencrypt(-staging)?"', directory, b.body)
                    target.write_text(subst(body, []))
                    continue
                script = subst(b.body, commands)
                r = subprocess.run(
                    ["bash", "-euo", "pipefail", "-c", script],
                    capture_output=True,
                    text=True,
                    timeout=120,
                    env=env,
                    cwd=tmp_path,
                    check=False,
                )
                log = proc.log_text() if proc else ""
                assert r.returncode == 0, f"{where}:\n{script}\n{r.stdout}\n{r.stderr}\n{log}"
                outputs.append(r.stdout)
                if "haproxy -c -f" in b.body:
                    cfg = (root / "etc/haproxy/haproxy.cfg").read_text()
                    cfg = cfg.replace("global\n", "global\n    noreuseport\n", 1)
                    proc = HAProxyProcess(haproxy_bin, cfg, {}, tmp_path / "haproxy")
                    proc.start()
            assert proc is not None, "no doctest block ran `haproxy -c -f`"
            # What the quickstart promises at the end: the same HAProxy process
            # serves the production certificate, from the pinned key.
            state = root / "var/lib/haproxy-acme-agent/certificates/www"
            current = state / "gen" / (state / "current").read_text() / "cert.pem"
            stored = x509.load_pem_x509_certificate(current.read_bytes())
            served = served_leaf(https, "www.example.com")
            assert served.serial_number == stored.serial_number
            assert proc.running
        finally:
            if proc is not None:
                proc.stop()

    joined = "\n".join(outputs)
    pin = keys.spki_pin(keys.load_private_key(root / "var/lib/haproxy-acme-agent/www.key"))
    # The pin printed before the first order is the served certificate's.
    assert f"pin-sha256 key     {pin}" in joined
    assert keys.spki_pin(served.public_key()) == pin  # type: ignore[arg-type]
    assert "renewed" in joined and "not-due" in joined
    assert "haproxy_acme_certificate_expiration_timestamp_seconds" in joined
    bundle = (root / "etc/haproxy/certs/www.pem").read_bytes()
    assert stored.public_bytes(serialization.Encoding.PEM).strip() in bundle


# --- the other docs: reference tables and links that match the code ---------------------

DOCS = REPO / "docs"
_GETTER = re.compile(
    r'\.(?:get|get_str|get_number|get_path|get_str_list|has|section)\(\s*"([a-z_]+)"'
    r'|\._listen\(\w+, "([a-z_]+)"'
)
_DURATION_KEY = re.compile(r'\(\s*"([a-z_]+)",\s*[\d*\s]+\),')


def config_keys() -> set[str]:
    """Every key agent/config.py reads (its getters and its duration table)."""
    src = (REPO / "agent" / "config.py").read_text()
    found = {a or b for a, b in _GETTER.findall(src)}
    return found | set(_DURATION_KEY.findall(src))


def test_configuration_reference_documents_every_key() -> None:
    keys_read = config_keys()
    assert {"state_dir", "directory", "listen", "check_interval", "backup_pins"} <= keys_read
    doc = (DOCS / "configuration.md").read_text()
    # keys as `key`, tables as `[table]` / `[[table]]`
    missing = sorted(k for k in keys_read if f"`{k}`" not in doc and f"[{k}]" not in doc)
    assert missing == [], f"undocumented config keys: {missing}"


def test_configuration_example_loads(tmp_path: Path) -> None:
    from agent.config import load_config

    (toml,) = [b.body for b in blocks((DOCS / "configuration.md").read_text()) if b.lang == "toml"]
    keydir = tmp_path / "keys"
    keydir.mkdir()
    for name, domains in (
        ("www", ["www.example.com", "example.com"]),
        ("api", ["api.example.com"]),
    ):
        k = keys.create_key_file(keydir / f"{name}.key", "ec256")
        (keydir / f"{name}.csr").write_bytes(keys.csr_pem(keys.build_csr(k, domains)))
    text = toml.replace("/etc/haproxy-acme-agent/keys/", f"{keydir}/")
    text = text.replace("/var/lib/haproxy-acme-agent", str(tmp_path / "state"))
    (tmp_path / "config.toml").write_text(text)
    cfg = load_config(tmp_path / "config.toml")
    assert [c.name for c in cfg.certificates] == ["www", "api"]
    assert cfg.strict_permissions is True


def test_every_command_is_in_the_reference() -> None:
    from agent.cli import COMMANDS

    doc = (DOCS / "configuration.md").read_text()
    for name in COMMANDS:
        assert f"| `{name} " in doc or f"| `{name}`" in doc, name


def test_docs_links_point_at_existing_files() -> None:
    for md in [*DOCS.glob("*.md"), REPO / "README.md"]:
        if not md.exists():
            continue
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", md.read_text()):
            if "://" in target:
                continue
            assert (md.parent / target).exists(), f"{md.name}: broken link {target}"


def test_metrics_reference_lists_every_exported_metric() -> None:
    from tests.test_packaging import exported_metric_names

    doc = (DOCS / "metrics.md").read_text()
    for name in exported_metric_names():
        if name.endswith("_created"):  # prometheus-client's creation-time companions
            continue
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        assert f"`{base}`" in doc, base
