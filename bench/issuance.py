"""Issue N certificates: our agent (shipped defaults) vs HAProxy 3.2's own ACME client.

Every variant orders one certificate for each of the same N sites (ECDSA P-256
stable keys, 2 names each) from ONE real Pebble (`--pebble`, 2.10 by default:
HAProxy's client needs it; PEBBLE_AUTHZREUSE=0 and PEBBLE_VA_NOSLEEP=1, so
every order is really validated over http-01 on the same HTTP port), through
the same HAProxy build (`--haproxy`, HAProxy 3.2 by default). Each run gets a
fresh HAProxy, fresh ACME account, fresh state and a freshly restarted Pebble
(same binary, ports and config; Pebble 2.10 deadlocked after about 300 orders
in one process: every request hung on its MemoryStore lock, so no run shares a
Pebble with an earlier one); neither start-up is ever timed. Variants:

  ours            `haproxy-acme-agent renew -c config.toml` with the SHIPPED
                  [acme] defaults (poll_interval, timeout, max_concurrent_orders
                  not set): HAProxy runs the shipped haproxy/ configs and asks our
                  SPOE agent for the challenge answers; every certificate is
                  stored, pushed through the runtime API and verified by the
                  agent's own TLS handshakes before `renew` exits.
                  START: just before the `renew` process is spawned (so Python
                  start-up and account registration count against us).
                  STOP: `renew` has exited 0, i.e. every certificate is stored
                  AND served by HAProxy.
  haproxy-native  HAProxy 3.2's `acme` section (see bench/haproxy_native.py).
                  START: just before `acme renew FILE` for all N is sent on the
                  stats socket (account registration counts here too).
                  STOP: the `show ssl cert` sweep (every 50 ms) in which HAProxy
                  holds the new serial for every certificate, i.e. every
                  certificate served by HAProxy (it stores nothing on disk).
  ours-cC[-pP]    informational (`--tuned`): our agent with max_concurrent_orders
                  = C (and poll_interval = P s), same events as `ours`.
  certbot         optional (`--certbot`: one `certbot certonly --standalone --csr`
                  run per site behind HAProxy, ~2 s per certificate, so minutes
                  at N=50). START: first certbot spawned. STOP: last one exited
                  (files written; certbot serves nothing itself).

Variants run interleaved: every round runs each variant once, in an order
rotated per round, so machine noise spreads over all of them. Each result is
checked before it counts: every certificate exists and carries its site's
key (for ours: the leaf HAProxy serves over TLS for every name, and
`haproxy-acme-agent status --json` says every certificate is in sync; for
native: TLS too; for certbot: the files it wrote).

Output: one table per N (median, min-max over rounds, ms per certificate,
median over rounds of native time / variant time). A run that fails its checks
(or, for native, does not finish within 120 s) is printed as FAILED, its full
reason kept in a file under /tmp, and left out of medians and ratios; the
table says how many rounds failed. With `--dns01`, a dns-01 row follows: the
largest N certificates (name + wildcard) through a real BIND 9 over RFC 2136,
certificates per second with the DNS propagation wait shown apart
(bench/dns01.py, with the shipped defaults). LAST line:
speedup_vs_haproxy_native=<median over rounds of native/ours at the largest N>
(above 1 means our shipped defaults are faster). Exit status 1 if our agent
with its shipped defaults failed any run at the largest N.

    .venv/bin/python -m bench.issuance [--counts 10,20,50] [--rounds 3]
        [--tuned 16,32,32:0.05] [--certbot] [--haproxy-native PATH] [--pebble PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from agent import keys
from bench.haproxy_native import NativeFailed, Site, run_native
from tests.support.acme_stack import SHIPPED_CFG, SHIPPED_SPOE, SITE_STUB, toml_value
from tests.support.certs import write_crt_list
from tests.support.haproxy import HAProxyProcess, free_port
from tests.support.pebble import PebbleProcess
from tests.support.tls import served_leaf

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# scripts/setup.sh puts HAProxy 3.2 here; bench-built copies are the fallback.
DEFAULT_NATIVE = REPO / ".cache" / "haproxy-3.2" / "haproxy"
FALLBACK_NATIVE = REPO / ".cache" / "haproxy-3.2-bench" / "haproxy"
PEBBLE_CANDIDATES = [
    REPO / ".cache" / "pebble-2.10" / "pebble",
    REPO / ".cache" / "pebble-2.10" / "usr" / "bin" / "pebble",
    REPO / ".cache" / "haproxy-3.2-bench" / "pebble" / "usr" / "bin" / "pebble",
]

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


class BenchFailed(RuntimeError):
    """A variant did not deliver every certificate correctly; the message says which."""


def make_sites(directory: Path, count: int) -> list[tuple[Site, Path]]:
    """(site, csr path) for `count` sites with fresh stable keys (0600)."""
    out = []
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
        out.append((Site(name, domains, key_path), csr_path))
    return out


def check_leaf(leaf: x509.Certificate, site: Site, what: str) -> None:
    if not keys.same_public_key(leaf.public_key(), keys.load_private_key(site.key_path)):  # type: ignore[arg-type]
        raise BenchFailed(f"{what}: certificate does not carry the site's key")


def run_agent(
    pebble: PebbleProcess,
    haproxy_bin: str,
    http_port: int,
    work: Path,
    sites: list[Site],
    acme_overrides: dict[str, Any],
) -> float:
    """One `renew` run against a fresh shipped-config HAProxy; seconds, START/STOP as documented."""
    hdir = work / "haproxy"
    hdir.mkdir(parents=True)
    https_port, spoa_port, site_port = free_port(), free_port(), free_port()
    cert_dir = hdir / "certs"
    cert_dir.mkdir(mode=0o700)
    crt_list = write_crt_list(hdir, "fallback.test")
    admin = hdir / "admin.sock"
    env = {
        "HAPROXY_ADMIN_SOCKET": str(admin),
        "HTTP_BIND": f"127.0.0.1:{http_port}",
        "HTTPS_BIND": f"127.0.0.1:{https_port}",
        "SPOE_ACME_CONF": str(SHIPPED_SPOE),
        "CRT_LIST": str(crt_list),
        "SITE_ADDR": f"127.0.0.1:{site_port}",
        "SITE_PORT": str(site_port),
        "SPOA_ADDR": f"127.0.0.1:{spoa_port}",
    }
    haproxy_cfg = "global\n    noreuseport\n\n" + SHIPPED_CFG.read_text() + SITE_STUB
    # Only what the operator must say; everything else in [acme] stays at the shipped default.
    acme = {
        "directory": pebble.directory_url,
        "ca_bundle": pebble.ca_bundle,
        # Issued chains must lead to a trusted root (agent.chain): Pebble's is
        # private and new at every restart, so read it for this run.
        "trusted_roots": pebble.roots_file(),
        "email": "ops@example.com",
        **acme_overrides,
    }
    lines = [f"state_dir = {toml_value(work / 'state')}", "[acme]"]
    lines += [f"{k} = {toml_value(v)}" for k, v in acme.items()]
    lines += ["[spoa]", f'listen = "127.0.0.1:{spoa_port}"']
    lines += [
        "[haproxy]",
        f"runtime_api = [{toml_value('unix:' + str(admin))}]",
        f"crt_list = {toml_value(crt_list)}",
        f"cert_dir = {toml_value(cert_dir)}",
        f'verify = ["127.0.0.1:{https_port}"]',
    ]
    for site in sites:
        lines += ["[[certificates]]", f"name = {toml_value(site.name)}"]
        lines += [f"domains = {toml_value(site.domains)}", f"key = {toml_value(site.key_path)}"]
    config = work / "config.toml"
    config.write_text("\n".join(lines) + "\n")
    agent = str(BIN / "haproxy-acme-agent")
    with HAProxyProcess(haproxy_bin, haproxy_cfg, env, hdir) as haproxy:
        t0 = time.monotonic()
        proc = subprocess.run(
            [agent, "renew", "-c", str(config), "--quiet"],
            capture_output=True,
            text=True,
            timeout=900,
        )
        elapsed = time.monotonic() - t0
        if proc.returncode != 0:
            raise BenchFailed(
                f"agent renew failed ({proc.returncode}):\n{proc.stderr[-3000:]}\n"
                f"HAProxy log:\n{haproxy.log_text()[-1500:]}"
            )
        status = subprocess.run(
            [agent, "status", "-c", str(config), "--json"],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        rows = {row["name"]: row for row in json.loads(status.stdout)}
        for site in sites:
            row = rows.get(site.name)
            if row is None or not row["serial"] or not row["haproxy"]:
                raise BenchFailed(f"agent {site.name}: `status --json` shows no served certificate")
            if not all(h["in_sync"] for h in row["haproxy"]):
                raise BenchFailed(f"agent {site.name}: `status --json` says {row['haproxy']}")
            for domain in site.domains:
                leaf = served_leaf(https_port, domain)
                check_leaf(leaf, site, f"agent {site.name} ({domain})")
                if f"{leaf.serial_number:x}" != row["haproxy"][0]["served_serial"]:
                    raise BenchFailed(
                        f"agent {site.name} ({domain}): TLS serves {leaf.serial_number:x}, "
                        f"status says {row['haproxy'][0]['served_serial']}"
                    )
    return elapsed


def run_certbot(
    pebble: PebbleProcess,
    haproxy_bin: str,
    http_port: int,
    work: Path,
    sites: list[tuple[Site, Path]],
) -> float:
    """One certbot --standalone --csr run per site behind a classic HAProxy; seconds."""
    certbot_port = free_port()
    hdir = work / "haproxy"
    hdir.mkdir(parents=True)
    classic = HAProxyProcess(
        haproxy_bin,
        CLASSIC_HAPROXY,
        {"HTTP_PORT": str(http_port), "CERTBOT_PORT": str(certbot_port)},
        hdir,
    )
    cb = work / "certbot"
    env = {**os.environ, "REQUESTS_CA_BUNDLE": str(pebble.ca_bundle)}
    out = work / "certs"
    out.mkdir(parents=True)
    with classic:
        t0 = time.monotonic()
        for site, csr_path in sites:
            argv = [
                str(BIN / "certbot"), "certonly", "--standalone", "--non-interactive",
                "--agree-tos", "-m", "ops@example.com",
                "--server", pebble.directory_url,
                "--csr", str(csr_path),
                "--http-01-port", str(certbot_port), "--http-01-address", "127.0.0.1",
                "--config-dir", str(cb / "config"), "--work-dir", str(cb / "work"),
                "--logs-dir", str(cb / "logs"),
                "--cert-path", str(out / f"{site.name}.cert.pem"),
                "--fullchain-path", str(out / f"{site.name}.fullchain.pem"),
                "--chain-path", str(out / f"{site.name}.chain.pem"),
            ]  # fmt: skip
            proc = subprocess.run(
                argv, capture_output=True, text=True, timeout=300, env=env, cwd=work
            )
            if proc.returncode != 0:
                raise BenchFailed(f"certbot failed for {site.name}:\n{proc.stderr[-3000:]}")
        elapsed = time.monotonic() - t0
    for site, _ in sites:
        pem = (out / f"{site.name}.fullchain.pem").read_bytes()
        check_leaf(x509.load_pem_x509_certificates(pem)[0], site, f"certbot {site.name}")
    return elapsed


def parse_tuned(spec: str) -> list[tuple[str, dict[str, Any]]]:
    """Parse `--tuned` ("C[:P],..."): "16,32:0.05" -> ours-c16 (max_concurrent_orders 16)
    and ours-c32-p0.05 (max_concurrent_orders 32, poll_interval 0.05 s)."""
    out: list[tuple[str, dict[str, Any]]] = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        conc, _, poll = item.partition(":")
        overrides: dict[str, Any] = {"max_concurrent_orders": int(conc)}
        label = f"ours-c{int(conc)}"
        if poll:
            overrides["poll_interval"] = float(poll)
            label += f"-p{float(poll):g}"
        out.append((label, overrides))
    return out


def pick_pebble(explicit: str | None) -> str:
    if explicit:
        return explicit
    if os.environ.get("PEBBLE_BIN"):
        return os.environ["PEBBLE_BIN"]
    for candidate in PEBBLE_CANDIDATES:
        if candidate.exists():
            return str(candidate)
    raise SystemExit(
        "no Pebble 2.10 found (HAProxy 3.2's client needs it: Pebble 2.4 refuses its POSTs "
        f"with 'missing Content-Length header'); tried {', '.join(map(str, PEBBLE_CANDIDATES))}; "
        "pass --pebble PATH"
    )


def pick_native(explicit: str | None) -> str:
    if explicit:
        return explicit
    for candidate in (DEFAULT_NATIVE, FALLBACK_NATIVE):
        if candidate.exists():
            return str(candidate)
    raise SystemExit(
        f"no HAProxy 3.2 at {DEFAULT_NATIVE}: run scripts/setup.sh or pass --haproxy-native"
    )


Variant = tuple[str, Callable[[Path], float]]


def make_variants(
    pebble: PebbleProcess,
    native_bin: str,
    haproxy_bin: str,
    http_port: int,
    sites_csr: list[tuple[Site, Path]],
    tuned: list[tuple[str, dict[str, Any]]],
    certbot: bool,
) -> list[Variant]:
    """(label, run(workdir) -> seconds) for every variant, in their first-round order."""
    sites = [s for s, _ in sites_csr]

    def agent(overrides: dict[str, Any]) -> Callable[[Path], float]:
        return lambda w: run_agent(pebble, haproxy_bin, http_port, w, sites, overrides)

    def native(w: Path) -> float:
        return run_native(native_bin, pebble.directory_url, pebble.ca_bundle, http_port, w, sites)

    variants: list[Variant] = [("ours", agent({})), ("haproxy-native", native)]
    variants += [(label, agent(overrides)) for label, overrides in tuned]
    if certbot:
        variants.append(
            ("certbot", lambda w: run_certbot(pebble, haproxy_bin, http_port, w, sites_csr))
        )
    return variants


def summary(times: list[float]) -> str:
    return f"{statistics.median(times):7.2f} s  ({min(times):6.2f}-{max(times):6.2f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", default="10,20,50", help="comma-separated N values")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per N (variants interleaved)")
    parser.add_argument(
        "--tuned",
        default="16,32",
        help="informational agent variants: max_concurrent_orders[:poll_interval], comma-separated"
        " ('' for none)",
    )
    parser.add_argument("--certbot", action="store_true", help="also run certbot (slow: ~2 s/cert)")
    parser.add_argument(
        "--dns01", action="store_true", help="add the dns-01 row (a real BIND 9, bench/dns01.py)"
    )
    parser.add_argument(
        "--haproxy-native", default=None, help=f"HAProxy 3.2 binary (default {DEFAULT_NATIVE})"
    )
    parser.add_argument(
        "--haproxy", default=None, help="HAProxy for our agent and certbot (default: the 3.2 one)"
    )
    parser.add_argument("--pebble", default=None, help="Pebble 2.10 binary")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",") if c.strip()]
    if not counts or min(counts) < 1 or args.rounds < 1:
        raise SystemExit("--counts needs positive integers and --rounds at least 1")
    native_bin = pick_native(args.haproxy_native)
    haproxy_bin = args.haproxy or native_bin
    pebble_bin = pick_pebble(args.pebble)
    for tool in ("haproxy-acme-agent", *(["certbot"] if args.certbot else [])):
        if not (BIN / tool).exists():
            raise SystemExit(f"{BIN / tool} is missing: pip install -e '.[test]'")
    tuned = parse_tuned(args.tuned)

    with tempfile.TemporaryDirectory(prefix="bench-issuance-") as tmp:
        work = Path(tmp)
        http_port = free_port()
        with PebbleProcess(work / "pebble", http_port, binary=pebble_bin) as pebble:
            print(
                f"Pebble {pebble_bin} (AUTHZREUSE=0, VA_NOSLEEP); HAProxy "
                f"{haproxy_bin} for ours/certbot, {native_bin} for native; "
                f"{args.rounds} rounds, ECDSA P-256 stable keys, 2 names per certificate",
                flush=True,
            )
            results: dict[int, dict[str, list[float | None]]] = {}
            for n in counts:
                sites_csr = make_sites(work / f"sites-{n}", n)
                variants = make_variants(
                    pebble, native_bin, haproxy_bin, http_port, sites_csr, tuned, args.certbot
                )
                # times[label][round]: seconds, or None when that run failed its checks.
                times: dict[str, list[float | None]] = {label: [] for label, _ in variants}
                for r in range(args.rounds):
                    shift = r % len(variants)
                    for label, run in variants[shift:] + variants[:shift]:
                        # A fresh CA per run (same binary, ports, config): Pebble 2.10's
                        # in-memory store deadlocked twice after ~300 orders in one process.
                        pebble.stop()
                        pebble.start()
                        elapsed = attempt(label, n, r, run, work / f"n{n}-r{r}-{label}")
                        times[label].append(elapsed)
                        shown = "FAILED" if elapsed is None else f"{elapsed:7.2f} s"
                        print(f"  N={n} round {r + 1}: {label:<16} {shown}", flush=True)
                results[n] = times
                print_table(n, args.rounds, [label for label, _ in variants], times)
    t = results[max(counts)]
    if any(x is None for x in t["ours"]):
        print("our agent failed a run: see above", file=sys.stderr)
        return 1
    speedup = median_ratio(t["haproxy-native"], t["ours"])
    if speedup is None:
        raise SystemExit("haproxy-native failed every round at the largest N: no ratio")
    if args.dns01:
        from bench.dns01 import row, run_dns01

        n = max(counts)
        elapsed, waits = run_dns01(n, None, haproxy_bin)
        print(f"N={n} dns-01 through BIND 9 (name + wildcard each, shipped defaults):")
        print("  " + row(n, elapsed, waits), flush=True)
    print(f"speedup_vs_haproxy_native={speedup:.2f}")
    return 0


def attempt(
    label: str, n: int, r: int, run: Callable[[Path], float], workdir: Path
) -> float | None:
    """run(workdir); on a failed run, None, with the whole reason kept in a file under /tmp."""
    try:
        return run(workdir)
    except (BenchFailed, NativeFailed) as e:
        fd, path = tempfile.mkstemp(prefix=f"bench-issuance-{label}-n{n}-r{r + 1}-", suffix=".log")
        with os.fdopen(fd, "w") as f:
            f.write(str(e))
        print(f"  {label} N={n} round {r + 1} failed: {str(e).splitlines()[0]} (all: {path})")
        return None


def median_ratio(native: list[float | None], other: list[float | None]) -> float | None:
    """Median over rounds of native/other, over the rounds where both succeeded."""
    ratios = [a / b for a, b in zip(native, other, strict=True) if a is not None and b is not None]
    return statistics.median(ratios) if ratios else None


def print_table(
    n: int, rounds: int, labels: list[str], times: dict[str, list[float | None]]
) -> None:
    print(f"\nN={n}: median (min-max) over {rounds} rounds")
    print(f"  {'variant':<16} {'time':>26}  {'ms/cert':>8}  native/variant")
    for label in labels:
        ok = [t for t in times[label] if t is not None]
        failed = len(times[label]) - len(ok)
        note = f"  ({failed} of {rounds} rounds FAILED)" if failed else ""
        if not ok:
            print(f"  {label:<16} {'every round failed':>26}{note}")
            continue
        ratio = median_ratio(times["haproxy-native"], times[label])
        shown = "     -" if ratio is None else f"{ratio:6.2f}x"
        print(
            f"  {label:<16} {summary(ok)}  {statistics.median(ok) / n * 1000:8.0f}  {shown}{note}"
        )
    print(flush=True)


if __name__ == "__main__":
    sys.exit(main())
