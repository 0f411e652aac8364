"""The daemon with many certificates in its store: start-up, memory, scrape time.

Certificates are made locally with a throwaway CA (no ACME) and laid out in
the state dir exactly as the renewer stores them (agent.layout: one
generation of cert.pem, chain.pem, fullchain.pem, meta.json, the `current`
pointer, and a state.json recording that the bundle on disk holds it, as a
running agent leaves it), valid for 60 days so none is due. Then
`haproxy-acme-agent run` is started as its own process, for 1,000 and for
10,000 certificates in the same run:

  startup   from exec until /healthz answers 200 (config validated, every
            key checked, every meta.json read, listeners up, scheduler running),
            the first start on the new store (every key parsed)
  restart   the same after a stop: keys unchanged since the last start are
            checked from the daemon's key check cache (agent.keys), not parsed
  rss       the daemon's resident memory after start-up and scrapes
  scrape    wall time of GET /metrics (median of 5), which must list them all
  reconcile a full reconcile pass in-process on the same store (stored_targets +
            Deployer.reconcile, as the daemon's reconciler runs it), cold (first
            pass after start) and warm (second pass, nothing changed). Disk
            mode: no runtime API, so it compares every bundle file in cert_dir
            with the stored one; no HAProxy is involved (the `show ssl cert`
            pass against a real HAProxy is measured by bench/swap.py)

Targets for 10,000: start-up <= 3 s, RSS <= 100 MB, scrape <= 0.5 s (on a
quiet machine; the load average is printed). Ratios against the figures of
the flat layout (README before generations) are printed too.
The last line is `startup_s=<seconds for the largest count>`.

    .venv/bin/python -m bench.scale [--counts 1000,10000]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent import layout
from agent.certstate import CertState, Deployed, load_meta
from agent.config import load_config
from agent.deploy import Deployer, stored_targets
from agent.renewal import make_bundle, meta_from_certificate
from agent.storage import FileStorage
from tests.support.certs import issue_leaf, key_pem, make_ca
from tests.support.haproxy import free_port

REPO = Path(__file__).resolve().parents[1]

# The flat layout's figures (README before generations): count -> (start-up s, RSS MB, scrape s).
OLD = {1000: (0.4, 52.0, 0.02), 10000: (2.08, 81.0, 0.22)}


def build_store(root: Path, count: int) -> tuple[Path, int]:
    """Keys, config and a filled state dir for `count` certificates; returns (config, port)."""
    ca = make_ca("scale bench CA")
    ca_pem = ca.pem
    keys_dir = root / "keys"
    state = root / "state"
    cert_dir = root / "certs"
    for d in (keys_dir, state, cert_dir):
        d.mkdir(mode=0o700)
    metrics_port = free_port()
    lines = [
        f'state_dir = "{state}"',
        "[acme]",
        'directory = "https://127.0.0.1:9/dir"',  # never contacted: nothing is due
        "[spoa]",
        f'listen = "127.0.0.1:{free_port()}"',
        "[haproxy]",
        f'cert_dir = "{cert_dir}"',
        "[metrics]",
        f'listen = "127.0.0.1:{metrics_port}"',
    ]
    not_after = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=60)
    for i in range(count):
        name = f"site{i:05d}"
        key = ec.generate_private_key(ec.SECP256R1())
        kp = key_pem(key)
        key_path = keys_dir / f"{name}.key"
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(kp)
        leaf = issue_leaf(ca, key, [f"{name}.example.test"], not_after=not_after)
        leaf_pem = leaf.public_bytes(serialization.Encoding.PEM)
        now = time.time()
        gen_id = layout.new_generation_id(now, leaf.serial_number)
        g = state.joinpath(*layout.generation_prefix(name, gen_id).split("/"))
        g.mkdir(parents=True, mode=0o700)
        bundle = make_bundle(leaf_pem + ca_pem, kp)
        # Bench set-up only: plain writes (the product writes atomically, with fsync).
        (g / layout.CERT).write_bytes(leaf_pem)
        (g / layout.CHAIN).write_bytes(ca_pem)
        (g / layout.FULLCHAIN).write_bytes(leaf_pem + ca_pem)
        meta = meta_from_certificate(name, leaf)
        meta = dataclasses.replace(meta, installed_at=now, generation=gen_id)
        (g / layout.META).write_text(json.dumps(meta.to_json()))
        (state / layout.current_key(name)).write_text(gen_id)
        facts = CertState(deployed={"disk": Deployed(meta.serial, now)})
        (state / layout.state_key(name)).write_text(json.dumps(facts.to_json(name)))
        path = layout.bundle_path(cert_dir, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(bundle)
        lines += [
            "[[certificates]]",
            f'name = "{name}"',
            f'domains = ["{name}.example.test"]',
            f'key = "{key_path}"',
        ]
    config = root / "config.toml"
    config.write_text("\n".join(lines) + "\n")
    return config, metrics_port


def check_faithful(config_path: Path, count: int) -> None:
    """The store loads through the agent's own readers: every certificate has
    its meta (with the deployed fact) and a deploy target from its generation."""
    config = load_config(config_path)
    storage = FileStorage(config.state_dir)
    for cfg in config.certificates[:: max(1, count // 50)]:
        meta = load_meta(storage, cfg.name)
        if meta is None or not meta.installed or meta.deployed["disk"].serial != meta.serial:
            raise RuntimeError(f"bench store: {cfg.name} does not load as installed+deployed")


def reconcile_passes(config_path: Path, count: int) -> tuple[float, float]:
    """Seconds of two full reconcile passes (cold, then warm with nothing changed)."""
    config = load_config(config_path)
    storage = FileStorage(config.state_dir)
    deployer = Deployer.from_config(config.haproxy)
    times = []
    for _ in range(2):
        t = time.monotonic()
        statuses = deployer.reconcile(stored_targets(config, storage))
        times.append(time.monotonic() - t)
        if len(statuses) != count or not all(s.in_sync and not s.pushed for s in statuses):
            raise RuntimeError("reconcile: the bench store is not in sync with cert_dir")
    return times[0], times[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def start_daemon(
    root: Path, config: Path, port: int, repo: Path = REPO
) -> tuple[subprocess.Popen[bytes], float]:
    """Start `haproxy-acme-agent run` from `repo`; returns it and the seconds until /healthz."""
    log = (root / "agent.log").open("ab")
    # As installed (pip compiles the package): bytecode may be cached. With
    # PYTHONDONTWRITEBYTECODE set (this machine's shell), every start compiled
    # the whole package again, 0.4 s of each one.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run(
        [sys.executable, "-c", "import agent.cli, agent.daemon, agent.fleet, agent.fleet_sync"],
        cwd=repo, env={**env, "PYTHONPATH": str(repo)}, check=True, timeout=120,
    )  # fmt: skip
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run", "-c", str(config)],
        cwd=repo,
        env={**env, "PYTHONPATH": str(repo)},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    deadline = started + 120
    while True:
        if proc.poll() is not None:
            raise RuntimeError((root / "agent.log").read_text()[-3000:])
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                if r.status == 200:
                    return proc, time.monotonic() - started
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            stop_daemon(proc)
            raise RuntimeError("daemon not ready within 120 s")
        time.sleep(0.02)


def stop_daemon(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def measure(count: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="scale-bench-") as tmp:
        root = Path(tmp)
        t = time.monotonic()
        config, port = build_store(root, count)
        print(f"  [{count}] store built in {time.monotonic() - t:.1f} s", file=sys.stderr)
        check_faithful(config, count)
        # The first start after the store was filled (every key parsed), then a
        # restart (keys unchanged since: their checks come from the cache).
        proc, startup = start_daemon(root, config, port)
        stop_daemon(proc)
        proc, restart = start_daemon(root, config, port)
        try:
            scrapes = []
            for _ in range(5):
                t = time.monotonic()
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
                    body = r.read().decode()
                scrapes.append(time.monotonic() - t)
            listed = body.count("haproxy_acme_certificate_expiration_timestamp_seconds{")
            if listed != count:
                raise RuntimeError(f"/metrics lists {listed} certificates, expected {count}")
            rss = rss_mb(proc.pid)
        finally:
            stop_daemon(proc)
        cold, warm = reconcile_passes(config, count)
        return {
            "reconcile_cold_s": cold,
            "reconcile_warm_s": warm,
            "startup_s": startup,
            "restart_s": restart,
            "rss_mb": rss,
            "scrape_s": statistics.median(scrapes),
            "scrape_max_s": max(scrapes),
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="1000,10000")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    results = {c: measure(c) for c in counts}
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(
        f"{'certificates':>12} {'startup s':>10} {'restart s':>10} {'RSS MB':>8} {'scrape s':>9} "
        f"{'max s':>7} {'reconcile cold s':>17} {'warm s':>7}"
    )
    for c, r in results.items():
        print(
            f"{c:>12} {r['startup_s']:>10.2f} {r['restart_s']:>10.2f} {r['rss_mb']:>8.1f} "
            f"{r['scrape_s']:>9.3f} {r['scrape_max_s']:>7.3f} "
            f"{r['reconcile_cold_s']:>17.2f} {r['reconcile_warm_s']:>7.2f}"
        )
    for c, r in results.items():
        if c in OLD:
            s0, m0, sc0 = OLD[c]
            print(
                f"{c:>12} vs the flat layout: start-up x{r['startup_s'] / s0:.2f}, "
                f"RSS x{r['rss_mb'] / m0:.2f}, scrape x{r['scrape_s'] / sc0:.2f}"
            )
    big = results[counts[-1]]
    if len(counts) > 1:
        small = results[counts[0]]
        factor = counts[-1] / counts[0]
        print(
            f"x{factor:g} certificates: start-up x{big['startup_s'] / small['startup_s']:.1f}, "
            f"scrape x{big['scrape_s'] / small['scrape_s']:.1f}, "
            f"warm reconcile x{big['reconcile_warm_s'] / small['reconcile_warm_s']:.1f}"
        )
    print(
        f"targets (<=3 s, <=100 MB, <=0.5 s): startup {big['startup_s'] / 3:.2f}, "
        f"rss {big['rss_mb'] / 100:.2f}, scrape {big['scrape_s'] / 0.5:.2f} of budget"
    )
    print(f"restart_s={big['restart_s']:.2f}")
    print(f"startup_s={big['startup_s']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
