"""Dual certificates (one RSA and one ECDSA key for the same names) against the real
Pebble and real HAProxy: both leaves loaded for the same SNI through the crt-list
and the runtime API, and HAProxy picking per client by its signature algorithms
(`openssl s_client -sigalgs`), on every HAProxy build (2.6 ... 3.2). A failed
ECDSA order (a fault injected into the issuer: Pebble itself never refuses a
key type) leaves the old pair served and stored; a renewed pair is served
together. See agent/pairs.py and docs/dual-certificates.md.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from agent import keys
from agent.cli import main
from agent.issuer import Issuer, OrderFailed
from tests.support.acme_stack import AcmeStack

pytestmark = pytest.mark.integration

NAME = "dual"
DOMAINS = ["dual.example.com", "www.dual.example.com"]
RSA_ONLY = "RSA-PSS+SHA256:RSA+SHA256"
ECDSA_ONLY = "ECDSA+SHA256"
_PEM = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


@pytest.fixture
def stack(tmp_path: Path, haproxy_bin: str, pebble_bin: str) -> Iterator[AcmeStack]:
    with AcmeStack(tmp_path / "stack", haproxy_bin, pebble_binary=pebble_bin) as s:
        yield s


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def dual_config(stack: AcmeStack, tmp_path: Path) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    cert: dict[str, Any] = {
        "name": NAME,
        "domains": DOMAINS,
        "keys": [
            {"key": str(site / "rsa.key"), "key_type": "rsa4096", "generate_key": True},
            {"key": str(site / "ec.key"), "key_type": "ec256", "generate_key": True},
        ],
    }
    return stack.write_config(tmp_path / "config.toml", [cert])


def s_client_leaf(port: int, sni: str, sigalgs: str, version: str) -> x509.Certificate:
    """The leaf HAProxy presents to `openssl s_client` offering only `sigalgs`."""
    out = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", sni,
         f"-{version}", "-sigalgs", sigalgs],
        input=b"", capture_output=True, timeout=30, check=False,
    ).stdout.decode(errors="replace")  # fmt: skip
    found = _PEM.search(out)
    assert found, f"no certificate from s_client ({version}, {sigalgs}):\n{out[-2000:]}"
    return x509.load_pem_x509_certificate(found.group(0).encode())


def stored_leaf(state: Path, name: str) -> x509.Certificate:
    d = state / "certificates" / name
    gen = (d / "current").read_text()
    return x509.load_pem_x509_certificate((d / "gen" / gen / "cert.pem").read_bytes())


def served_pair(stack: AcmeStack) -> dict[str, int]:
    """{kind: serial} HAProxy serves to RSA-only and ECDSA-only clients, TLS 1.2 and 1.3
    (each must agree across versions and names)."""
    got: dict[str, set[int]] = {"rsa": set(), "ecdsa": set()}
    for version in ("tls1_2", "tls1_3"):
        for sni in DOMAINS:
            rsa_leaf = s_client_leaf(stack.https_port, sni, RSA_ONLY, version)
            ec_leaf = s_client_leaf(stack.https_port, sni, ECDSA_ONLY, version)
            assert isinstance(rsa_leaf.public_key(), rsa.RSAPublicKey)
            assert isinstance(ec_leaf.public_key(), ec.EllipticCurvePublicKey)
            got["rsa"].add(rsa_leaf.serial_number)
            got["ecdsa"].add(ec_leaf.serial_number)
    assert all(len(v) == 1 for v in got.values()), got
    return {k: v.pop() for k, v in got.items()}


def stored_pair(state: Path) -> dict[str, int]:
    return {k: stored_leaf(state, f"{NAME}.{k}").serial_number for k in ("rsa", "ecdsa")}


def test_rsa_only_client_gets_the_rsa_leaf_and_ecdsa_client_the_ecdsa_leaf(
    tmp_path: Path, stack: AcmeStack, capsys: pytest.CaptureFixture[str]
) -> None:
    config = dual_config(stack, tmp_path)
    state = tmp_path / "state"
    rc, out, err = cli(capsys, "renew", "-c", str(config))
    assert rc == 0, err
    assert f"{NAME}.rsa: renewed" in out and f"{NAME}.ecdsa: renewed" in out, out

    first = stored_pair(state)
    for kind, key_file in (("rsa", "rsa.key"), ("ecdsa", "ec.key")):
        leaf = stored_leaf(state, f"{NAME}.{kind}")
        key = keys.load_private_key(tmp_path / "site" / key_file)
        assert keys.spki_pin(leaf.public_key()) == keys.spki_pin(key)  # type: ignore[arg-type]
        assert sorted(keys.cert_domains(leaf)) == sorted(DOMAINS)
        assert (stack.cert_dir / f"{NAME}.{kind}.pem").is_file()
    assert served_pair(stack) == first
    # Both bundles in the crt-list, with no SNI filter: HAProxy matches both by their names.
    lines = stack.crt_list.read_text().splitlines()
    assert str(stack.cert_dir / f"{NAME}.rsa.pem") in lines
    assert str(stack.cert_dir / f"{NAME}.ecdsa.pem") in lines
    pair = json.loads((state / "pairs" / f"{NAME}.json").read_text())
    assert pair["generations"] == {
        f"{NAME}.{k}": (state / "certificates" / f"{NAME}.{k}" / "current").read_text()
        for k in ("rsa", "ecdsa")
    }

    rc, out, _ = cli(capsys, "status", "-c", str(config), "--json")
    assert rc == 0
    rows = {r["name"]: r for r in json.loads(out)}
    assert {n: (r["group"], r["key_type"]) for n, r in rows.items()} == {
        f"{NAME}.rsa": (NAME, "rsa4096"),
        f"{NAME}.ecdsa": (NAME, "ec256"),
    }
    assert all(r["in_sync"] for r in rows.values())

    # The config's name renews the pair; both new leaves are served together.
    rc, out, err = cli(capsys, "renew", "-c", str(config), "--force", NAME)
    assert rc == 0, err
    second = stored_pair(state)
    assert all(second[k] != first[k] for k in first)
    assert served_pair(stack) == second


def test_failed_ecdsa_order_leaves_the_old_pair_served_and_stored(
    tmp_path: Path,
    stack: AcmeStack,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = dual_config(stack, tmp_path)
    state = tmp_path / "state"
    rc, _, err = cli(capsys, "renew", "-c", str(config))
    assert rc == 0, err
    old = stored_pair(state)
    assert served_pair(stack) == old
    pair_file = state / "pairs" / f"{NAME}.json"
    old_pointer = pair_file.read_bytes()

    real_issue = Issuer.issue
    ordered: list[str | None] = []

    def issue(self: Issuer, *args: Any, **kw: Any) -> Any:
        ordered.append(kw.get("cert_name"))
        if kw.get("cert_name") == f"{NAME}.ecdsa":
            raise OrderFailed("order became invalid: injected fault for the ECDSA key")
        return real_issue(self, *args, **kw)

    monkeypatch.setattr(Issuer, "issue", issue)
    rc, out, err = cli(capsys, "renew", "-c", str(config), "--force")
    out += err  # failures are printed on stderr
    assert rc != 0
    assert sorted(str(n) for n in ordered) == [f"{NAME}.ecdsa", f"{NAME}.rsa"]  # both were ordered
    assert "injected fault" in out
    assert re.search(rf"{NAME}\.rsa: failed: issued and checked \(serial [0-9a-f]+\) but not "
                     r"installed: the ecdsa order failed", out), out  # fmt: skip
    # The old pair: still what HAProxy serves, still what is stored, pointer untouched.
    assert served_pair(stack) == old
    assert stored_pair(state) == old
    assert pair_file.read_bytes() == old_pointer
    rc, out, _ = cli(capsys, "status", "-c", str(config), "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows[f"{NAME}.ecdsa"]["last_result"] == "failed"
    assert "injected fault" in rows[f"{NAME}.ecdsa"]["last_error"]
    assert rows[f"{NAME}.rsa"]["last_result"] == "failed"
    assert all(r["in_sync"] for r in rows.values())

    # The CA works again: the next run installs a new pair, served together.
    monkeypatch.setattr(Issuer, "issue", real_issue)
    rc, out, err = cli(capsys, "renew", "-c", str(config), "--force")
    assert rc == 0, err
    new = stored_pair(state)
    assert all(new[k] != old[k] for k in old)
    assert served_pair(stack) == new


class Killed(BaseException):
    """Stands for a kill -9 between the two `current` switches of a pair install."""


def test_a_crash_between_the_two_switches_ends_with_the_new_pair_served_after_the_next_run(
    tmp_path: Path,
    stack: AcmeStack,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from agent import pairs

    config = dual_config(stack, tmp_path)
    state = tmp_path / "state"
    rc, _, err = cli(capsys, "renew", "-c", str(config))
    assert rc == 0, err
    old = stored_pair(state)

    real_switch = pairs.switch_generation  # type: ignore[attr-defined]
    switched: list[str] = []

    def switch(storage: Any, name: str, gen_id: str) -> None:
        if switched:  # the second key: the process "dies" here
            raise Killed(name)
        switched.append(name)
        real_switch(storage, name, gen_id)

    monkeypatch.setattr(pairs, "switch_generation", switch)
    with pytest.raises(Killed):
        main(["renew", "-c", str(config), "--force"])
    capsys.readouterr()
    monkeypatch.setattr(pairs, "switch_generation", real_switch)
    half = stored_pair(state)
    assert half["rsa"] != old["rsa"] and half["ecdsa"] == old["ecdsa"]  # the torn state
    assert served_pair(stack) == old  # nothing was deployed before the crash
    pointer = json.loads((state / "pairs" / f"{NAME}.json").read_text())["generations"]

    # The next run (cron; the daemon's start does the same repair): the pair pointer
    # decides, both keys are pushed, and HAProxy serves the new pair together.
    rc, out, err = cli(capsys, "renew", "-c", str(config))
    assert rc == 0, err
    assert f"{NAME}.ecdsa: deployed" in out and f"{NAME}.rsa: deployed" in out, out
    new = stored_pair(state)
    assert new["rsa"] == half["rsa"] and new["ecdsa"] != old["ecdsa"]
    assert {
        f"{NAME}.{k}": (state / "certificates" / f"{NAME}.{k}" / "current").read_text()
        for k in ("rsa", "ecdsa")
    } == pointer
    assert served_pair(stack) == new
