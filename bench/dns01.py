"""Issue N certificates through dns-01 with a real BIND9, the propagation wait shown apart.

The dns-01 row meant for bench/issuance.py, kept in its own file while that
one is being edited elsewhere. One real BIND (tests/support/bind.py) is
authoritative for `acme.test` and accepts TSIG-signed updates; Pebble
(AUTHZREUSE=0: every order is really validated) resolves through it. The agent
(`haproxy-acme-agent renew -v`, one process) issues N certificates, each for
`siteI.acme.test` + `*.siteI.acme.test`: every order publishes two TXT values
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography import x509

from agent import keys
from tests.support.acme_stack import AcmeStack
from tests.support.bind import BindServer
from tests.support.haproxy import haproxy_binaries

BIN = Path(sys.executable).parent
WAIT_RE = re.compile(r"visible at every authoritative server after ([0-9.]+) s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=20, help="certificates")
    parser.add_argument("--concurrency", type=int, default=4, help="max_concurrent_orders")
    parser.add_argument("--haproxy", default=haproxy_binaries()[0][1], help="HAProxy binary")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-dns01-") as tmp:
        work = Path(tmp)
        sites = work / "sites"
        sites.mkdir()
        names = [f"site{i}.acme.test" for i in range(args.count)]
        with (
            BindServer(work / "bind", "acme.test", ["acme.test", "*.acme.test"]) as bind,
            AcmeStack(work / "stack", args.haproxy, dns_server=bind.address) as stack,
        ):
            certs = [
                {"name": n.split(".")[0], "domains": [n, f"*.{n}"], "challenge": "dns-01",
                 "key": str(sites / f"{n}.key"), "generate_key": True}
                for n in names
            ]  # fmt: skip
            config = stack.write_config(
                work / "config.toml", certs, max_concurrent_orders=args.concurrency,
                poll_interval=0.05, timeout=60,
            )  # fmt: skip
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
            for c in certs:
                pem = (
                    work / "state" / "certificates" / str(c["name"]) / "fullchain.pem"
                ).read_bytes()
                leaf = x509.load_pem_x509_certificates(pem)[0]
                if not keys.same_public_key(
                    leaf.public_key(),  # type: ignore[arg-type]
                    keys.load_private_key(Path(str(c["key"]))),
                ):
                    raise SystemExit(f"{c['name']}: certificate does not carry the site's key")
            left = [n for n in names if bind.txt(f"_acme-challenge.{n}")]
            if left:
                raise SystemExit(f"TXT records left in BIND: {left}")
            waits = [float(w) for w in WAIT_RE.findall(proc.stderr)]
    if len(waits) != args.count:
        raise SystemExit(f"expected {args.count} propagation waits in the log, got {len(waits)}")
    print(
        f"{args.count} certificates (name + wildcard, dns-01 over RFC 2136 + TSIG to BIND 9, "
        f"max_concurrent_orders={args.concurrency}), one Pebble (AUTHZREUSE=0)"
    )
    print(
        f"agent (renew, dns-01): {elapsed:7.2f} s  ({args.count / elapsed:5.2f} certs/s, "
        f"{elapsed / args.count * 1000:6.0f} ms/cert)"
    )
    print(
        f"propagation wait (in the above): sum {sum(waits):.2f} s, mean "
        f"{sum(waits) / len(waits) * 1000:.0f} ms, max {max(waits) * 1000:.0f} ms"
    )
    print(f"dns01_certs_per_second={args.count / elapsed:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
