"""`import`: a certbot + scripts layout is adopted into config and state without
re-issuing, and the stable key is never touched: after import and a forced
renewal through real Pebble + HAProxy + our SPOE agent, the key file is
byte-identical and the new leaf carries the same key."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from agent import keys
from agent.config import load_config
from agent.haproxy_config import Options, full_config, spoe_conf, write_bootstrap_files
from agent.importer import SiteImportError, import_sites, scan_site
from agent.renewal import certificate_status
from tests.support.certs import CA, issue_leaf, key_pem, make_ca, make_key
from tests.support.haproxy import HAProxyProcess, free_port
from tests.support.pebble import PebbleProcess
from tests.support.tls import served_leaf

DOMAINS = ["www.example.test", "example.test"]
CLI = [sys.executable, "-m", "agent.cli"]


def intermediate(root: CA) -> CA:
    """An intermediate CA signed by `root` (real chains have one)."""
    key = make_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test intermediate")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(root.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=9))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(root.key, hashes.SHA256())
    )
    return CA(cert, key)


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def classic_site(
    root: Path, name: str = "www.example.test", days: float = 60, rsa: bool = True
) -> dict[str, object]:
    """One site directory as certbot `certonly --csr` + shell scripts leave it."""
    d = root / name
    d.mkdir(parents=True)
    key = make_key(2048 if rsa else None)
    (d / "site.key").write_bytes(key_pem(key))
    os.chmod(d / "site.key", 0o600)
    (d / "site.csr").write_bytes(keys.csr_pem(keys.build_csr(key, DOMAINS)))
    ca = make_ca()
    inter = intermediate(ca)
    now = datetime.datetime.now(datetime.UTC)
    old = issue_leaf(inter, key, DOMAINS, not_after=now + datetime.timedelta(days=5))
    leaf = issue_leaf(inter, key, DOMAINS, not_after=now + datetime.timedelta(days=days))
    stranger = issue_leaf(inter, make_key(), ["other.example.test"])
    (d / "0000_cert.pem").write_bytes(pem(old))  # last time's, superseded
    (d / "0001_cert.pem").write_bytes(pem(leaf))
    (d / "0001_chain.pem").write_bytes(pem(inter.cert))
    (d / "0002_fullchain.pem").write_bytes(pem(leaf, inter.cert, ca.cert))
    (d / "unrelated.crt").write_bytes(pem(stranger))
    return {"dir": d, "key": key, "leaf": leaf, "inter": inter.cert}


def base_config(tmp: Path, extra: str = "") -> Path:
    (tmp / "certs").mkdir(exist_ok=True)
    path = tmp / "config.toml"
    path.write_text(
        f'state_dir = "{tmp / "state"}"\n'
        "# operator's comment, kept\n"
        "[acme]\n"
        'directory = "https://127.0.0.1:14000/dir"\n'
        "[haproxy]\n"
        f'cert_dir = "{tmp / "certs"}"\n' + extra
    )
    path.chmod(0o640)
    return path


def test_scan_picks_the_newest_leaf_of_the_key_and_its_chain(tmp_path: Path) -> None:
    s = classic_site(tmp_path / "sites")
    site = scan_site(s["dir"])  # type: ignore[arg-type]
    assert site.name == "www.example.test"
    assert site.key.name == "site.key" and site.csr is not None and site.csr.name == "site.csr"
    assert sorted(site.domains) == sorted(DOMAINS)
    assert site.leaf == s["leaf"]
    assert site.chain == (s["inter"],)  # the root is not served


def test_import_adds_config_and_state_and_nothing_is_due(tmp_path: Path) -> None:
    s = classic_site(tmp_path / "sites")
    key_file: Path = s["dir"] / "site.key"  # type: ignore[operator]
    key_bytes = key_file.read_bytes()
    cfg_path = base_config(tmp_path)
    result = import_sites(cfg_path, [tmp_path / "sites"])
    assert [x.name for x in result.imported] == ["www.example.test"]

    text = cfg_path.read_text()
    assert "# operator's comment, kept" in text
    assert cfg_path.stat().st_mode & 0o777 == 0o640
    cfg = load_config(cfg_path)
    c = cfg.certificate("www.example.test")
    assert c.key == key_file and c.csr == s["dir"] / "site.csr"  # type: ignore[operator]
    assert sorted(c.domains) == sorted(DOMAINS)

    leaf: x509.Certificate = s["leaf"]  # type: ignore[assignment]
    cert_state = tmp_path / "state" / "certificates" / "www.example.test"
    state = cert_state / "gen" / (cert_state / "current").read_text()
    assert (state / "cert.pem").read_bytes() == pem(leaf)
    assert (state / "fullchain.pem").read_bytes() == pem(leaf, s["inter"])  # type: ignore[arg-type]
    # The key stays where it is: nothing in the state dir holds it.
    for p in (tmp_path / "state").rglob("*"):
        assert not p.is_file() or key_bytes.strip() not in p.read_bytes(), p
    meta = json.loads((state / "meta.json").read_text())
    assert meta["serial"] == format(leaf.serial_number, "x")
    # HAProxy's file, ready for its crt line: full chain + the site's key, 0600.
    assert result.bundles == [tmp_path / "certs" / "www.example.test.pem"]
    assert result.bundles[0].read_bytes().startswith((state / "fullchain.pem").read_bytes())
    assert key_bytes.strip() in result.bundles[0].read_bytes()
    assert result.bundles[0].stat().st_mode & 0o777 == 0o600
    # The agent sees a valid certificate: next renewal at 1/3 of the lifetime left.
    (row,) = certificate_status(cfg)
    assert row["serial"] == meta["serial"]
    assert row["next_renewal"] > time.time() + 30 * 86400
    # The stable key is untouched.
    assert key_file.read_bytes() == key_bytes
    assert key_file.stat().st_mode & 0o777 == 0o600


def test_dry_run_prints_entries_and_writes_nothing(tmp_path: Path) -> None:
    classic_site(tmp_path / "sites")
    cfg_path = base_config(tmp_path)
    before = cfg_path.read_bytes()
    r = subprocess.run(
        [*CLI, "import", "-c", str(cfg_path), "--dry-run", str(tmp_path / "sites")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert "[[certificates]]" in r.stdout and 'name = "www.example.test"' in r.stdout
    assert "would import" in r.stderr
    assert cfg_path.read_bytes() == before
    assert not (tmp_path / "state").exists()


def test_csr_of_another_key_refuses_the_whole_import(tmp_path: Path) -> None:
    classic_site(tmp_path / "sites", "good.example.test")
    bad = classic_site(tmp_path / "sites", "bad.example.test")
    other = make_key()
    (bad["dir"] / "site.csr").write_bytes(  # type: ignore[operator]
        keys.csr_pem(keys.build_csr(other, DOMAINS))
    )
    cfg_path = base_config(tmp_path)
    before = cfg_path.read_bytes()
    with pytest.raises(SiteImportError, match=r"bad\.example\.test/site\.csr: was not made from"):
        import_sites(cfg_path, [tmp_path / "sites"])
    assert cfg_path.read_bytes() == before
    assert not (tmp_path / "state").exists()


def test_two_keys_in_a_site_are_an_error_naming_them(tmp_path: Path) -> None:
    s = classic_site(tmp_path / "sites")
    d: Path = s["dir"]  # type: ignore[assignment]
    (d / "old.key").write_bytes(key_pem(make_key()))
    # site.key wins over other keys; without it, two keys are ambiguous.
    assert scan_site(d).key == d / "site.key"
    (d / "site.key").rename(d / "www.key")
    with pytest.raises(
        SiteImportError, match=r"several key files \(old\.key, www\.key\); keep one"
    ):
        scan_site(d)


def test_expired_certificate_imports_config_only(tmp_path: Path) -> None:
    d = tmp_path / "sites" / "old.example.test"
    d.mkdir(parents=True)
    key = make_key()
    (d / "site.key").write_bytes(key_pem(key))
    ca = make_ca()
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=1)
    (d / "cert.pem").write_bytes(pem(issue_leaf(ca, key, DOMAINS, not_after=past)))
    cfg_path = base_config(tmp_path)
    result = import_sites(cfg_path, [d])
    (site,) = result.imported
    assert site.leaf is None and "expired" in site.note
    assert load_config(cfg_path).certificate("old.example.test").csr is None
    assert not (tmp_path / "state" / "certificates" / "old.example.test" / "cert.pem").exists()


def test_configured_names_are_skipped(tmp_path: Path) -> None:
    classic_site(tmp_path / "sites")
    cfg_path = base_config(tmp_path)
    import_sites(cfg_path, [tmp_path / "sites"])
    once = cfg_path.read_bytes()
    again = import_sites(cfg_path, [tmp_path / "sites"])
    assert again.imported == [] and again.skipped == [("www.example.test", "already in the config")]
    assert cfg_path.read_bytes() == once


# --- import, then renew through real Pebble + HAProxy + our SPOE agent ------------------


@pytest.mark.integration
def test_import_then_forced_renewal_keeps_the_key_byte_identical(
    haproxy_bin: str, tmp_path: Path
) -> None:
    s = classic_site(tmp_path / "sites")
    key_file: Path = s["dir"] / "site.key"  # type: ignore[operator]
    key_bytes = key_file.read_bytes()
    pin_before = keys.spki_pin(keys.load_private_key(key_file))

    http_port, https_port, spoa_port = free_port(), free_port(), free_port()
    with PebbleProcess(tmp_path / "pebble", http_port) as pebble:
        cfg_path = base_config(
            tmp_path,
            f'crt_list = "{tmp_path / "certs.list"}"\n'
            f'runtime_api = ["unix:{tmp_path / "admin.sock"}"]\n'
            f'[spoa]\nlisten = "127.0.0.1:{spoa_port}"\n',
        )
        text = cfg_path.read_text().replace(
            'directory = "https://127.0.0.1:14000/dir"\n',
            f'directory = "{pebble.directory_url}"\nca_bundle = "{pebble.ca_bundle}"\n'
            f'trusted_roots = "{pebble.roots_file()}"\n'
            "poll_interval = 0.1\n",
        )
        cfg_path.write_text(text)
        result = import_sites(cfg_path, [tmp_path / "sites"])
        imported_serial = format(result.imported[0].leaf.serial_number, "x")  # type: ignore[union-attr]
        cfg = load_config(cfg_path)

        # HAProxy from the generated configuration.
        write_bootstrap_files(cfg)
        spoe = tmp_path / "spoe-acme.conf"
        spoe.write_text(spoe_conf())
        hcfg = full_config(
            cfg,
            Options(
                spoe_conf=spoe,
                socket_group="0",
                http_bind=f"127.0.0.1:{http_port}",
                https_bind=f"127.0.0.1:{https_port}",
                site=f"127.0.0.1:{free_port()}",
            ),
        ).replace("global\n", "global\n    noreuseport\n", 1)
        proc = HAProxyProcess(haproxy_bin, hcfg, {}, tmp_path / "haproxy")
        proc.start()
        try:
            r = subprocess.run(
                [*CLI, "renew", "-c", str(cfg_path)],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert r.returncode == 0, r.stdout + r.stderr
            # Adopted, so nothing is issued; no instance was known to serve the
            # imported certificate, so it is deployed (and verified) instead.
            assert "www.example.test: deployed:" in r.stdout, r.stdout
            assert served_leaf(https_port, "www.example.test").serial_number == int(
                imported_serial, 16
            )
            r = subprocess.run(
                [*CLI, "renew", "-c", str(cfg_path), "--force"],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert r.returncode == 0, r.stdout + r.stderr + pebble.log_text() + proc.log_text()
            # The same HAProxy process now serves the renewed certificate.
            served = served_leaf(https_port, "www.example.test").serial_number
            pid = proc.pid
        finally:
            proc.stop()

    cert_state = tmp_path / "state" / "certificates" / "www.example.test"
    state = cert_state / "gen" / (cert_state / "current").read_text()
    leaf = x509.load_pem_x509_certificate((state / "cert.pem").read_bytes())
    assert format(leaf.serial_number, "x") != imported_serial
    assert served == leaf.serial_number and pid > 0
    assert keys.spki_pin(leaf.public_key()) == pin_before  # type: ignore[arg-type]
    assert key_file.read_bytes() == key_bytes
    assert key_bytes.strip() in (tmp_path / "certs" / "www.example.test.pem").read_bytes()
