"""Certificate generations: atomic install under kill -9, start-up repair, migration
of the old flat layout, and no private key in storage."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent import layout
from agent.certstate import load_current, load_meta, load_state, repair
from agent.config import Config, load_config
from agent.renewal import make_bundle, prepare_state
from agent.storage import FileStorage
from tests.support.issued import TinyCA

REPO = Path(__file__).resolve().parents[1]
DAY = 86400.0


@pytest.fixture
def config(tmp_path: Path) -> Config:
    (tmp_path / "certs").mkdir()
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "www.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(tmp_path / "www.key", 0o600)
    (tmp_path / "config.toml").write_text(
        textwrap.dedent(
            f"""\
            state_dir = "state"
            [acme]
            directory = "https://127.0.0.1:1/dir"
            [haproxy]
            cert_dir = "{tmp_path / "certs"}"
            [[certificates]]
            name = "www"
            domains = ["www.example.com"]
            key = "www.key"
            """
        )
    )
    return load_config(tmp_path / "config.toml")


def _serials_of(pem: bytes) -> list[int]:
    return [c.serial_number for c in x509.load_pem_x509_certificates(pem)]


def served_view(state: Path, name: str) -> dict[str, int | str | None]:
    """What the agent's readers see, file by file: the leaf serial each one names.

    This layout: the files of the generation `current` points to. The flat
    layout of older versions: cert.pem, fullchain.pem, bundle.pem, meta.json.
    """
    d = state / "certificates" / name
    if (d / "current").exists():
        d = d / "gen" / (d / "current").read_text()
        files = ["cert.pem", "fullchain.pem"]
    else:
        files = ["cert.pem", "fullchain.pem", "bundle.pem"]
    view: dict[str, int | str | None] = {}
    for f in files:
        view[f] = _serials_of((d / f).read_bytes())[0] if (d / f).exists() else None
    meta = d / "meta.json"
    view["meta.json"] = int(json.loads(meta.read_text())["serial"], 16) if meta.exists() else None
    return view


INSTALL_LOOP = """
import sys, time
from pathlib import Path
from agent.config import load_config
from agent.challenges import MemoryChallengeRegistry
from agent.renewal import Renewer, check_certificate
from agent import keys
from tests.support.issued import TinyCA

config = load_config(Path(sys.argv[1]))
cfg = config.certificate("www")
key = keys.load_private_key(cfg.key)
renewer = Renewer(config, MemoryChallengeRegistry())
ca = TinyCA()
params = __import__("inspect").signature(renewer.install).parameters
serial = int(time.time() * 1e6)
for i in range(100000):
    serial += 1
    now = time.time()
    leaf = ca.leaf(key.public_key(), ["www.example.com"], now - 60, now + 90 * 86400,
                   serial=serial)
    checked = check_certificate(ca.fullchain(leaf), key, ["www.example.com"], (), now)
    if "key_pem" in params:  # the flat layout of older versions
        renewer.install(cfg, checked, cfg.key.read_bytes())
    else:
        with renewer.storage.locked("cert-www") as token:
            renewer.install(cfg, checked, token)
    if i == 0:
        print("ready", flush=True)
"""


def test_kill_9_during_install_never_leaves_a_mix_or_temp_files(config: Config) -> None:
    script = config.state_dir.parent / "install_loop.py"
    script.write_text(INSTALL_LOOP)
    rng = random.Random(1234)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    kills = mixes = temps_left = 0
    deadline = time.monotonic() + 90
    for _ in range(25):
        if time.monotonic() > deadline:
            break
        proc = subprocess.Popen(
            [sys.executable, str(script), str(config.path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=config.path.parent,
            env=env,
        )
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line == b"ready\n", proc.stderr.read() if proc.stderr else b""
            time.sleep(rng.uniform(0.0, 0.15))
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait(10)
        kills += 1
        view = served_view(config.state_dir, "www")
        if len(set(view.values())) != 1:
            mixes += 1
        # The next start: repair, then no temp file anywhere (state dir, cert_dir).
        if hasattr(sys.modules["agent.renewal"], "prepare_state"):
            prepare_state(config)
        temps_left += len(list(config.state_dir.rglob("*.tmp")))
        temps_left += len(list(config.haproxy.cert_dir.glob(".*.tmp")))
        for p in config.state_dir.rglob("*.tmp"):
            p.unlink()  # count each kill's leftovers once
    print(f"kills={kills} mixes={mixes} temp_files_left={temps_left}")
    assert kills >= 10
    assert mixes == 0
    assert temps_left == 0
    store = FileStorage(config.state_dir)
    gen = load_current(store, "www")
    assert gen is not None
    gens = sorted((config.state_dir / "certificates" / "www" / "gen").iterdir())
    listing = {g.name: sorted(p.name for p in g.iterdir()) for g in gens}
    assert 1 <= len(gens) <= 2 and gens[-1].name == gen.id, (gen.id, listing)


# --- the old flat layout ----------------------------------------------------------------


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def test_a_mix_left_in_the_old_layout_is_migrated_from_the_newest_complete_certificate(
    config: Config,
) -> None:
    cfg = config.certificate("www")
    key_pem = cfg.key.read_bytes()
    key = serialization.load_pem_private_key(key_pem, None)
    ca = TinyCA()
    now = time.time()
    old = ca.leaf(key, ["www.example.com"], now - 40 * DAY, now + 50 * DAY, serial=10)  # type: ignore[arg-type]
    new = ca.leaf(key, ["www.example.com"], now - 60, now + 90 * DAY, serial=11)  # type: ignore[arg-type]
    older = ca.leaf(key, ["www.example.com"], now - 90 * DAY, now + DAY, serial=9)  # type: ignore[arg-type]
    d = config.state_dir / "certificates" / "www"
    d.mkdir(parents=True)
    config.state_dir.chmod(0o700)  # as the old agent left it
    # A kill during the old install: fullchain already new, cert.pem and the bundle still old.
    (d / "fullchain.pem").write_bytes(ca.fullchain(new))
    (d / "cert.pem").write_bytes(_pem(old))
    (d / "chain.pem").write_bytes(ca.fullchain(old)[len(_pem(old)) :])
    (d / "bundle.pem").write_bytes(make_bundle(ca.fullchain(old), key_pem))
    (d / "bundle.prev.pem").write_bytes(make_bundle(ca.fullchain(older), key_pem))
    (d / ".bundle.pem.abcd1234.tmp").write_bytes(make_bundle(ca.fullchain(new), key_pem))
    (d / "meta.json").write_text(
        json.dumps(
            {
                "version": 1, "name": "www", "domains": ["www.example.com"], "serial": "a",
                "not_before": now - 40 * DAY, "not_after": now + 50 * DAY,
                "installed_at": now - 40 * DAY, "directory": "https://ca/dir",
                "last_attempt": {"time": now - 100, "result": "failed", "error": "rate limited"},
                "retry_not_before": now + 3600, "ari": None,
            }
        )
    )  # fmt: skip
    store = FileStorage(config.state_dir)
    report = repair(store, ["www"])
    assert report.migrated == ["www"] and report.temp_files == 1
    gen = load_current(store, "www")
    assert gen is not None
    assert gen.leaf.serial_number == 11  # the newest leaf that parses with its chain
    assert gen.cert_pem == _pem(new) and gen.fullchain_pem == ca.fullchain(new)
    assert gen.chain_pem == ca.fullchain(new)[len(_pem(new)) :]
    meta = load_meta(store, "www")
    assert meta is not None and meta.serial == "b" and meta.directory == "https://ca/dir"
    assert meta.not_after == pytest.approx(new.not_valid_after_utc.timestamp())
    # The attempt and the CA's retry time are kept, in state.json.
    state = load_state(store, "www")
    assert state.last_attempt is not None and state.last_attempt.error == "rate limited"
    assert state.retry_not_before == pytest.approx(now + 3600)
    # The old files are gone, and with them the only copies of the key in the state dir.
    assert sorted(p.name for p in d.iterdir()) == ["current", "gen", "state.json"]
    for p in config.state_dir.rglob("*"):
        assert not p.is_file() or b"PRIVATE KEY" not in p.read_bytes(), p
    # Idempotent: a second start finds nothing to do.
    again = repair(store, ["www"])
    assert again.migrated == [] and again.temp_files == 0 and load_current(store, "www") == gen


def test_an_unparseable_fullchain_falls_back_to_the_newest_complete_material(
    config: Config,
) -> None:
    key_pem = config.certificate("www").key.read_bytes()
    key = serialization.load_pem_private_key(key_pem, None)
    ca = TinyCA()
    now = time.time()
    old = ca.leaf(key, ["www.example.com"], now - 40 * DAY, now + 50 * DAY, serial=10)  # type: ignore[arg-type]
    d = config.state_dir / "certificates" / "www"
    d.mkdir(parents=True)
    config.state_dir.chmod(0o700)  # as the old agent left it
    (d / "fullchain.pem").write_bytes(ca.fullchain(old)[:200])  # truncated
    (d / "bundle.pem").write_bytes(make_bundle(ca.fullchain(old), key_pem))
    store = FileStorage(config.state_dir)
    repair(store, ["www"])
    gen = load_current(store, "www")
    assert gen is not None and gen.leaf.serial_number == 10
    assert b"PRIVATE KEY" not in gen.fullchain_pem


# --- repair at start ------------------------------------------------------------------


def test_start_removes_temp_files_and_incomplete_generations_but_keeps_current(
    config: Config,
) -> None:
    store = FileStorage(config.state_dir)
    key_pem = config.certificate("www").key.read_bytes()
    key = serialization.load_pem_private_key(key_pem, None)
    ca = TinyCA()
    now = time.time()
    leaf = ca.leaf(key, ["www.example.com"], now - 60, now + 90 * DAY, serial=5)  # type: ignore[arg-type]
    from agent.certstate import install_generation

    with store.locked(layout.cert_lock("www")):
        meta = install_generation(store, "www", leaf, [ca.intermediate], now, None)
    # A kill during the next install: a generation with no meta.json, temp files.
    half = layout.new_generation_id(now + 5, 6)
    store.store(layout.generation_key("www", half, "cert.pem"), b"half")
    d = config.state_dir / "certificates" / "www"
    (d / ".state.json.k2j8x9a1.tmp").write_bytes(b"{")
    (d / "gen" / half / ".fullchain.pem.zz99yy88.tmp").write_bytes(b"x")
    cert_dir = config.haproxy.cert_dir
    (cert_dir / ".www.pem.abcdefgh.tmp").write_bytes(make_bundle(ca.fullchain(leaf), key_pem))
    (cert_dir / "other.pem").write_bytes(b"not ours")
    (cert_dir / ".other.pem.abcdefgh.tmp").write_bytes(b"not ours either")
    prepare_state(config)
    assert sorted(p.name for p in (d / "gen").iterdir()) == [meta.generation]
    assert list(config.state_dir.rglob("*.tmp")) == []
    assert sorted(p.name for p in cert_dir.iterdir()) == [".other.pem.abcdefgh.tmp", "other.pem"]
    gen = load_current(store, "www")
    assert gen is not None and gen.leaf.serial_number == 5


def test_a_complete_generation_not_yet_switched_to_is_adopted_and_old_ones_pruned(
    config: Config,
) -> None:
    from agent.certstate import install_generation, write_generation

    store = FileStorage(config.state_dir)
    key = serialization.load_pem_private_key(config.certificate("www").key.read_bytes(), None)
    ca = TinyCA()
    now = time.time()
    leaves = [
        ca.leaf(key, ["www.example.com"], now - 60, now + 90 * DAY, serial=20 + i)  # type: ignore[arg-type]
        for i in range(4)
    ]
    with store.locked(layout.cert_lock("www")):
        for i, leaf in enumerate(leaves[:3]):
            install_generation(store, "www", leaf, [ca.intermediate], now + i, None)
        # A kill after the switch but before the prune: three generations.
        store.store(layout.generation_key("www", layout.new_generation_id(now - 9, 1), "cert.pem"),
                    b"old and incomplete")  # fmt: skip
        old = write_generation(store, "www", leaves[0], [ca.intermediate], now - 5, None)
        # A kill after the newest generation was complete, before the switch.
        newest = write_generation(store, "www", leaves[3], [ca.intermediate], now + 10, None)
    repair(store, ["www"])
    gen = load_current(store, "www")
    assert gen is not None and gen.id == newest.generation and gen.leaf.serial_number == 23
    kept = sorted(p.name for p in (config.state_dir / "certificates" / "www" / "gen").iterdir())
    assert len(kept) == 2 and kept[-1] == newest.generation
    assert old.generation not in kept


def test_start_removes_temp_files_next_to_a_crt_list_outside_cert_dir(tmp_path: Path) -> None:
    # A daemon killed while rewriting the crt-list leaves ".certs.list.XXXX.tmp"
    # in the crt-list's own directory (not cert_dir): the next start removes it,
    # and keeps everything that is not our temp file.
    (tmp_path / "certs").mkdir()
    (tmp_path / "lists").mkdir()
    crt_list = tmp_path / "lists" / "certs.list"
    crt_list.write_text("")
    (tmp_path / "config.toml").write_text(
        textwrap.dedent(
            f"""\
            state_dir = "state"
            [acme]
            directory = "https://127.0.0.1:1/dir"
            [haproxy]
            cert_dir = "{tmp_path / "certs"}"
            crt_list = "{crt_list}"
            [[certificates]]
            name = "www"
            domains = ["www.example.com"]
            key = "www.key"
            generate_key = true
            """
        )
    )
    cfg = load_config(tmp_path / "config.toml")
    leftover = tmp_path / "lists" / ".certs.list.h5gh6kq7.tmp"
    leftover.write_text("/certs/www.pem\n")
    other = tmp_path / "lists" / ".someone-elses.tmp"
    other.write_text("x")
    bundle_tmp = tmp_path / "certs" / ".www.pem.abcd1234.tmp"
    bundle_tmp.write_text("key + cert")
    prepare_state(cfg)
    assert not leftover.exists() and not bundle_tmp.exists()
    assert other.exists() and crt_list.read_text() == ""


def test_load_metas_reads_what_load_meta_reads_for_every_kind_of_store(config: Config) -> None:
    """The daemon's batch read (agent.certstate.load_metas) agrees with
    load_meta: installed, state only, a damaged pointer, a missing meta.json,
    nothing at all."""
    from agent.certstate import CertState, Deployed, install_generation, load_metas, save_state

    store = FileStorage(config.state_dir)
    key = serialization.load_pem_private_key(config.certificate("www").key.read_bytes(), None)
    ca = TinyCA()
    now = time.time()
    leaf = ca.leaf(key, ["www.example.com"], now - 60, now + 90 * DAY, serial=77)  # type: ignore[arg-type]
    for name in ("ok", "bad-pointer", "no-meta"):
        install_generation(store, name, leaf, [ca.intermediate], now, None)
        save_state(store, name, CertState(deployed={"disk": Deployed("4d", now)}))
    save_state(store, "state-only", CertState(retry_not_before=now + 60))
    store.store(layout.current_key("bad-pointer"), b"not-a-generation")
    gen_id = store.load(layout.current_key("no-meta")).decode()
    store.delete(layout.generation_key("no-meta", gen_id, layout.META))
    names = ["ok", "bad-pointer", "no-meta", "state-only", "never"]
    batch = load_metas(store, names)
    assert batch == {n: load_meta(store, n) for n in names}
    ok = batch["ok"]
    assert ok is not None and ok.serial == "4d" and ok.deployed["disk"].serial == "4d"
    assert batch["never"] is None
    assert batch["bad-pointer"] is not None and batch["bad-pointer"].serial is None
