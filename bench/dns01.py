"""Issue N certificates through dns-01 with a real BIND9, the propagation wait shown apart.

The dns-01 row of bench/issuance.py (`--dns01`), also runnable alone. One
real BIND (tests/support/bind.py) is authoritative for `acme.test` and accepts
TSIG-signed updates; Pebble (AUTHZREUSE=0: every order is really validated)
resolves through it. The agent (`haproxy-acme-agent renew -v`, one process)
issues N certificates, each for `siteI.acme.test` + `*.siteI.acme.test`: every
order publishes two TXT values
over RFC 2136, waits until BIND answers them, lets Pebble validate, and
deletes them. Reported: wall clock for all N (account registration included),
certificates per second, and the propagation waits the agent logged (sum,
mean, max), which are part of the wall clock. Each certificate is checked to
carry its site's key, and BIND must answer no `_acme-challenge` record
afterwards.

    .venv/bin/python bench/dns01.py [--count 20] [--concurrency 4] [--haproxy PATH]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography import x509

from agent import keys
from agent.certstate import load_current
from agent.storage import FileStorage
from tests.support.acme_stack import AcmeStack
from tests.support.bind import BindServer
from tests.support.haproxy import haproxy_binaries

BIN = Path(sys.executable).parent
WAIT_RE = re.compile(r"visible at every authoritative server after ([0-9.]+) s")


def run_dns01(count: int, concurrency: int | None, haproxy: str) -> tuple[float, list[float]]:
    """Issue `count` certificates through dns-01 (`concurrency` None: the shipped
    default). Returns (wall clock s, the propagation waits the agent logged)."""
    with tempfile.TemporaryDirectory(prefix="bench-dns01-") as tmp:
        work = Path(tmp)
        sites = work / "sites"
        sites.mkdir()
        names = [f"site{i}.acme.test" for i in range(count)]
        with (
            BindServer(work / "bind", "acme.test", ["acme.test", "*.acme.test"]) as bind,
            AcmeStack(work / "stack", haproxy, dns_server=bind.address) as stack,
        ):
            certs = [
                {"name": n.split(".")[0], "domains": [n, f"*.{n}"], "challenge": "dns-01",
                 "key": str(sites / f"{n}.key"), "generate_key": True}
                for n in names
            ]  # fmt: skip
            tuning: dict[str, Any] = {"timeout": 60}
            if concurrency is not None:
                tuning["max_concurrent_orders"] = concurrency
            config = stack.write_config(work / "config.toml", certs, **tuning)
            with config.open("a") as f:
                f.write(
                    f'[[dns]]\nzone = "acme.test"\nserver = "{bind.address}"\n'
                    f'tsig_key_name = "{bind.key_name}"\n'
                    f'tsig_secret_file = "{bind.secret_file}"\n'
                    f'check_servers = ["{bind.address}"]\npropagation_timeout = 30\n'
                )
            t0 = time.monotonic()
            proc = subprocess.run(
                [str(BIN / "haproxy-acme-agent"), "renew", "-c", str(config), "-v"],
                capture_output=True, text=True, timeout=900,
            )  # fmt: skip
            elapsed = time.monotonic() - t0
            if proc.returncode != 0:
                raise SystemExit(f"agent renew failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
            storage = FileStorage(work / "state")
            for c in certs:
                gen = load_current(storage, str(c["name"]))
                if gen is None:
                    raise SystemExit(f"{c['name']}: no certificate stored")
                leaf = x509.load_pem_x509_certificates(gen.fullchain_pem)[0]
                if not keys.same_public_key(
                    leaf.public_key(),  # type: ignore[arg-type]
                    keys.load_private_key(Path(str(c["key"]))),
                ):
                    raise SystemExit(f"{c['name']}: certificate does not carry the site's key")
            left = [n for n in names if bind.txt(f"_acme-challenge.{n}")]
            if left:
                raise SystemExit(f"TXT records left in BIND: {left}")
            waits = [float(w) for w in WAIT_RE.findall(proc.stderr)]
    if len(waits) != count:
        raise SystemExit(f"expected {count} propagation waits in the log, got {len(waits)}")
    return elapsed, waits


def row(count: int, elapsed: float, waits: list[float]) -> str:
    """The dns-01 row: certificates per second, the propagation wait apart."""
    return (
        f"agent (renew, dns-01): {elapsed:7.2f} s  ({count / elapsed:5.2f} certs/s, "
        f"{elapsed / count * 1000:6.0f} ms/cert); propagation wait (in the above): sum "
        f"{sum(waits):.2f} s, mean {sum(waits) / len(waits) * 1000:.0f} ms, "
        f"max {max(waits) * 1000:.0f} ms"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=20, help="certificates")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="max_concurrent_orders (default: the shipped default)")  # fmt: skip
    parser.add_argument("--haproxy", default=haproxy_binaries()[0][1], help="HAProxy binary")
    args = parser.parse_args()
    elapsed, waits = run_dns01(args.count, args.concurrency, args.haproxy)
    print(
        f"{args.count} certificates (name + wildcard, dns-01 over RFC 2136 + TSIG to BIND 9, "
        f"max_concurrent_orders={args.concurrency or 'default'}), one Pebble (AUTHZREUSE=0)"
    )
    print(row(args.count, elapsed, waits))
    print(f"dns01_certs_per_second={args.count / elapsed:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
