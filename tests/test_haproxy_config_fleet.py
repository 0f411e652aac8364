"""`haproxy-config` prints the same HAProxy pieces for every node of a fleet: the
fleet changes where the agent keeps its state, not what HAProxy is told. Node
configs that differ only in `[fleet] node` (as config management writes them)
must give byte-identical output, equal to the single-node output."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.cli import main

BASE = """\
state_dir = "{d}/state"
[acme]
directory = "https://127.0.0.1:1/dir"
[spoa]
listen = "127.0.0.1:12345"
[haproxy]
runtime_api = ["unix:/run/haproxy/admin.sock"]
cert_dir = "/etc/haproxy/certs"
crt_list = "/etc/haproxy/certs.list"
[[certificates]]
name = "www"
domains = ["www.example.com", "example.com"]
key = "{d}/www.key"
generate_key = true
"""
FLEET = """\
[fleet]
redis = "rediss://redis.internal:6380/0"
ca_file = "{d}/redis-ca.pem"
namespace = "shop"
node = "{node}"
secret_file = "{d}/fleet.secret"
"""


def node_config(tmp_path: Path, node: str | None) -> Path:
    d = tmp_path / (node or "single")
    d.mkdir()
    (d / "redis-ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    secret = d / "fleet.secret"
    secret.write_bytes(os.urandom(32))
    secret.chmod(0o600)
    # Paths are the same on every node (config management), so point at one dir.
    text = BASE.format(d=tmp_path) + ("" if node is None else FLEET.format(d=d, node=node))
    # The same path on every node, as config management installs it.
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("args", [[], ["--full"], ["--spoe"]])
def test_every_node_of_a_fleet_gets_the_same_haproxy_pieces(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    outputs = {}
    for node in (None, "edge-a", "edge-b", "edge-c"):
        config = node_config(tmp_path, node)
        assert main(["haproxy-config", "-c", str(config), "--haproxy-version", "2.6", *args]) == 0
        outputs[node] = capsys.readouterr().out
    assert outputs[None].strip()
    assert outputs["edge-a"] == outputs["edge-b"] == outputs["edge-c"] == outputs[None]
    for node in ("edge-a", "edge-b", "edge-c"):
        assert node not in outputs[node]  # nothing node-specific leaks into HAProxy's config
