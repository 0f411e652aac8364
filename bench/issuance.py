"""Issue N certificates from stable keys: our agent vs certbot, against the same Pebble.

Both variants get the same N stable keys (ECDSA P-256) and issue one
certificate per key through the same real Pebble (PEBBLE_AUTHZREUSE=0, so every
order is really validated over http-01 through HAProxy on the same port):

  (a) agent:   `haproxy-acme-agent renew -c config.toml` (one process; HAProxy runs
               the shipped haproxy/ configs and asks our SPOE agent for the
               challenge answers; orders run in parallel, at most
               max_concurrent_orders at a time);
  (b) certbot: the classic setup: HAProxy routes /.well-known/acme-challenge/ to a
               backend where `certbot certonly --standalone --csr <site>.csr
               --http-01-port <backend port>` listens, one certbot run per site
               (what a cron loop over per-site CSRs does; certbot cannot renew
               --csr certificates itself).

The agent also runs once with max_concurrent_orders=1 (orders one after the
other, like certbot), to show what fast polling alone buys. Times are wall
clock from process start to the last certificate written,
account registration included for both. Each variant is checked: every
certificate must exist and carry its site's key. Last line:
speedup_vs_certbot=<certbot time / agent time>.

    .venv/bin/python bench/issuance.py [--count 20] [--concurrency 4] [--haproxy PATH]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from agent import keys
from agent.certstate import load_current
from agent.storage import FileStorage
from tests.support.acme_stack import AcmeStack
from tests.support.haproxy import HAProxyProcess, free_port, haproxy_binaries

CLASSIC_HAPROXY = """\
global
    noreuseport

defaults
    mode http
    timeout connect 5s
    timeout client  30s
    timeout server  30s

frontend http
    bind "127.0.0.1:${HTTP_PORT}"
    acl acme_challenge path_beg /.well-known/acme-challenge/
    use_backend certbot if acme_challenge
    default_backend site

backend certbot
    server certbot1 "127.0.0.1:${CERTBOT_PORT}"

backend site
    http-request return status 404
"""

BIN = Path(sys.executable).parent


def make_sites(directory: Path, count: int) -> list[tuple[str, list[str], Path, Path]]:
    """(name, domains, key path, csr path) for `count` sites with fresh stable keys."""
    sites = []
    directory.mkdir(parents=True)
    for i in range(count):
        name = f"site{i:02d}"
        domains = [f"{name}.example.com", f"www.{name}.example.com"]
        key = ec.generate_private_key(ec.SECP256R1())
        key_path = directory / f"{name}.key"
        key_path.write_bytes(keys.private_key_pem(key))
        key_path.chmod(0o600)
        csr_path = directory / f"{name}.csr"
        csr_path.write_bytes(keys.csr_pem(keys.build_csr(key, domains)))
        sites.append((name, domains, key_path, csr_path))
    return sites


def check(cert_pem: bytes, key_path: Path, what: str) -> None:
    leaf = x509.load_pem_x509_certificates(cert_pem)[0]
    if not keys.same_public_key(leaf.public_key(), keys.load_private_key(key_path)):  # type: ignore[arg-type]
        raise SystemExit(f"{what}: certificate does not carry the site's key")


def run_agent(
    stack: AcmeStack, work: Path, sites: list[tuple[str, list[str], Path, Path]], concurrency: int
) -> float:
    work.mkdir(parents=True)
    config = stack.write_config(
        work / "config.toml",
        [{"name": n, "domains": d, "key": str(k)} for n, d, k, _ in sites],
        max_concurrent_orders=concurrency,
        poll_interval=0.05,
        timeout=60,
    )
    t0 = time.monotonic()
    proc = subprocess.run(
        [str(BIN / "haproxy-acme-agent"), "renew", "-c", str(config), "--quiet"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    elapsed = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"agent renew failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    store = FileStorage(work / "state")
    for name, _, key_path, _ in sites:
        gen = load_current(store, name)
        if gen is None:
            raise SystemExit(f"agent {name}: nothing stored")
        check(gen.fullchain_pem, key_path, f"agent {name}")
    return elapsed


def run_certbot(
    stack: AcmeStack, haproxy_bin: str, work: Path, sites: list[tuple[str, list[str], Path, Path]]
) -> float:
    certbot_port = free_port()
    classic = HAProxyProcess(
        haproxy_bin,
        CLASSIC_HAPROXY,
        {"HTTP_PORT": str(stack.http_port), "CERTBOT_PORT": str(certbot_port)},
        work / "haproxy",
    )
    cb = work / "certbot"
    env = {**os.environ, "REQUESTS_CA_BUNDLE": str(stack.pebble.ca_bundle)}
    out = work / "certs"
    out.mkdir(parents=True)
    with classic:
        t0 = time.monotonic()
        for name, _, _, csr_path in sites:
            argv = [
                str(BIN / "certbot"), "certonly", "--standalone", "--non-interactive",
                "--agree-tos", "-m", "ops@example.com",
                "--server", stack.pebble.directory_url,
                "--csr", str(csr_path),
                "--http-01-port", str(certbot_port), "--http-01-address", "127.0.0.1",
                "--config-dir", str(cb / "config"), "--work-dir", str(cb / "work"),
                "--logs-dir", str(cb / "logs"),
                "--cert-path", str(out / f"{name}.cert.pem"),
                "--fullchain-path", str(out / f"{name}.fullchain.pem"),
                "--chain-path", str(out / f"{name}.chain.pem"),
            ]  # fmt: skip
            proc = subprocess.run(
                argv, capture_output=True, text=True, timeout=300, env=env, cwd=work
            )
            if proc.returncode != 0:
                raise SystemExit(f"certbot failed for {name}:\n{proc.stderr[-3000:]}")
        elapsed = time.monotonic() - t0
    for name, _, key_path, _ in sites:
        check((out / f"{name}.fullchain.pem").read_bytes(), key_path, f"certbot {name}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=20, help="certificates per variant")
    parser.add_argument("--concurrency", type=int, default=4, help="agent max_concurrent_orders")
    parser.add_argument("--haproxy", default=haproxy_binaries()[0][1], help="HAProxy binary")
    args = parser.parse_args()
    for tool in ("haproxy-acme-agent", "certbot"):
        if not (BIN / tool).exists():
            raise SystemExit(f"{BIN / tool} is missing: pip install -e '.[test]'")

    with tempfile.TemporaryDirectory(prefix="bench-issuance-") as tmp:
        work = Path(tmp)
        sites = make_sites(work / "sites", args.count)
        with AcmeStack(work / "stack", args.haproxy) as stack:
            print(
                f"{args.count} certificates (ECDSA P-256 stable keys, 2 names each), one Pebble "
                f"(AUTHZREUSE=0), HAProxy {args.haproxy}",
                flush=True,
            )
            # One order at a time first: what our polling alone buys, like for like.
            seq_s = run_agent(stack, work / "agent-seq", sites, 1)
            print(
                f"agent   (renew, SPOE, max_concurrent_orders=1):        "
                f"{seq_s:7.2f} s  ({seq_s / args.count * 1000:6.0f} ms/cert)",
                flush=True,
            )
            agent_s = run_agent(stack, work / "agent", sites, args.concurrency)
            print(
                f"agent   (renew, SPOE, max_concurrent_orders={args.concurrency}):        "
                f"{agent_s:7.2f} s  ({agent_s / args.count * 1000:6.0f} ms/cert)",
                flush=True,
            )
            # The classic setup owns HAProxy's HTTP port now: Pebble validates there.
            stack.haproxy.stop()
            certbot_s = run_certbot(stack, args.haproxy, work / "certbot", sites)
            print(
                f"certbot (certonly --standalone --csr, behind HAProxy): "
                f"{certbot_s:7.2f} s  ({certbot_s / args.count * 1000:6.0f} ms/cert)",
                flush=True,
            )
    print(f"sequential agent vs certbot: {certbot_s / seq_s:.1f}x")
    print(f"speedup_vs_certbot={certbot_s / agent_s:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
