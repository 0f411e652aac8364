"""N brand-new certificates deployed concurrently, then HAProxy restarted: how many sites lost
their own certificate?

For each N (default 8, 50, 200), in one run and one after the other: a fresh
HAProxy (crt-list on 127.0.0.1, see tests/support/crt_site.py) gets N
brand-new certificates through the agent's own deploy path
(agent.deploy.Deployer.deploy_many, as `renew` and the daemon use it, with
`--workers` threads), each deploy written to disk, pushed over the runtime
API and verified by a TLS handshake. Then HAProxy is restarted from its
config and files, and every name is asked for over TLS: a name that no
longer gets its own certificate (serial) is "lost". Also counted: deploys
that failed, and whether `haproxy -c` still accepts the config.

Prints one line per N, and on the LAST line `lost_after_restart=<n>`: the
TOTAL of lost certificates over all N (0 means no site lost its certificate).

    .venv/bin/python bench/chaos.py [--haproxy PATH] [--counts 8,50,200] [--workers 8]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.crt_site import CrtSite


def one_run(binary: str, count: int, workers: int, workdir: Path) -> dict[str, object]:
    site = CrtSite.start(binary, workdir)
    try:
        deployer = site.deployer()
        targets = site.new_targets("n", count)
        started = time.monotonic()
        results = deployer.deploy_many(targets, workers=workers)
        took = time.monotonic() - started
        failed = sum(not r.ok for r in results)
        site.haproxy.restart()
        check = subprocess.run(
            [site.haproxy.binary, "-c", "-f", str(site.haproxy.config_path)],
            env=site.haproxy.env,
            capture_output=True,
            timeout=60,
            check=False,
        )
        lost = sum(site.served(f"{t.name}.test").serial_number != t.serial for t in targets)
        return {
            "n": count,
            "deploy_s": round(took, 2),
            "failed_deploys": failed,
            "haproxy_c_ok": check.returncode == 0,
            "lost": lost,
        }
    finally:
        site.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--haproxy", default="/usr/sbin/haproxy")
    parser.add_argument("--counts", default="8,50,200", help="comma-separated N values")
    parser.add_argument("--workers", type=int, default=8, help="deploy_many threads")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",") if c.strip()]
    total = 0
    with tempfile.TemporaryDirectory(prefix="bench-chaos-") as tmp:
        for count in counts:
            row = one_run(args.haproxy, count, args.workers, Path(tmp) / f"n{count}")
            total += int(row["lost"])  # type: ignore[call-overload]
            print(
                f"N={row['n']}: lost_after_restart={row['lost']} "
                f"failed_deploys={row['failed_deploys']} haproxy_c_ok={row['haproxy_c_ok']} "
                f"deploy_time={row['deploy_s']}s",
                flush=True,
            )
    print(f"lost_after_restart={total}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
