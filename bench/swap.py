"""Runtime-API certificate swap vs HAProxy reload, under a steady TLS load.

One HAProxy (master-worker, so it can be reloaded with SIGUSR2) serves N
certificates from a crt-list on 127.0.0.1. Python threads make real TLS
handshakes + HTTP GETs against it for the whole run (bounded in time and
count), each with the SNI of a random certificate. Measured, one after the
other in this one run:

  (a) runtime API (agent.deploy.Deployer): replace 1 certificate, then all N;
      each deploy writes the file, swaps, and verifies by TLS handshake;
  (b) the same changes written to disk and applied by a reload (the
      Deployer's reload fallback sending SIGUSR2 to the master).

For each: time until every changed certificate is served, and failed
requests in that window (the one-certificate change is repeated, interleaved,
and the medians are shown). Last line: swap_speedup_vs_reload=<median time
until served by reload / by runtime API, for one changed certificate among N:
the renewal case>.

    .venv/bin/python bench/swap.py [--haproxy PATH] [--certs 200] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography import x509

from agent.deploy import Deployer, DeployTarget, tls_leaf
from tests.support.certs import CA, make_bundle, make_ca
from tests.support.haproxy import HAProxyProcess, free_port

CONFIG = """\
global
    noreuseport
    master-worker
    stats socket "${STATE}/admin.sock" mode 600 level admin expose-fd listeners

defaults
    mode http
    timeout connect 2s
    timeout client 5s
    timeout server 5s

frontend tls
    bind "127.0.0.1:${PORT}" ssl crt-list "${STATE}/crt-list.txt"
    http-request return status 200 content-type text/plain string ok
"""

MAX_RUN_SECONDS = 300.0  # hard bound on the load, whatever happens
MAX_REQUESTS_PER_THREAD = 1_000_000


@dataclass
class Load:
    """Background TLS clients; records the time of every success and failure."""

    port: int
    names: list[str]
    threads: int
    stop: threading.Event = field(default_factory=threading.Event)
    ok: list[float] = field(default_factory=list)
    failed: list[tuple[float, str]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _workers: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for i in range(self.threads):
            t = threading.Thread(target=self._run, args=(i,), daemon=True)
            t.start()
            self._workers.append(t)

    def _run(self, seed: int) -> None:
        rnd = random.Random(seed)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        deadline = time.monotonic() + MAX_RUN_SECONDS
        for _ in range(MAX_REQUESTS_PER_THREAD):
            if self.stop.is_set() or time.monotonic() > deadline:
                return
            sni = rnd.choice(self.names)
            try:
                with (
                    socket.create_connection(("127.0.0.1", self.port), timeout=5) as raw,
                    context.wrap_socket(raw, server_hostname=sni) as tls,
                ):
                    tls.sendall(
                        f"GET / HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n".encode()
                    )
                    reply = b""
                    while chunk := tls.recv(4096):
                        reply += chunk
                if not reply.startswith(b"HTTP/1.1 200"):
                    raise ValueError(f"unexpected reply {reply[:40]!r}")
                with self._lock:
                    self.ok.append(time.monotonic())
            except (OSError, ValueError) as exc:
                with self._lock:
                    self.failed.append((time.monotonic(), f"{type(exc).__name__}: {exc}"))

    def failures_between(self, start: float, end: float) -> list[str]:
        with self._lock:
            return [msg for t, msg in self.failed if start <= t <= end]

    def finish(self) -> None:
        self.stop.set()
        for t in self._workers:
            t.join(10)


def serial_of(port: int, sni: str) -> int:
    der = tls_leaf(f"127.0.0.1:{port}", sni, 5.0)
    return x509.load_der_x509_certificate(der).serial_number


def wait_served(port: int, expected: dict[str, int], timeout: float = 60.0) -> float:
    """Poll until every SNI in `expected` gets its serial; return the monotonic time."""
    deadline = time.monotonic() + timeout
    pending = dict(expected)
    while pending:
        for sni, serial in list(pending.items()):
            try:
                if serial_of(port, sni) == serial:
                    del pending[sni]
                else:
                    break  # still old: poll this one again before the rest
            except OSError:
                break
        if pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(pending)} certificates not served after {timeout} s")
            time.sleep(0.005)
    return time.monotonic()


def new_targets(ca: CA, names: list[str]) -> list[DeployTarget]:
    targets = []
    for i, name in enumerate(names):
        bundle, cert, _ = make_bundle(ca, [name])
        targets.append(DeployTarget(f"c{i:03d}", bundle, cert.serial_number, [name]))
    return targets


@dataclass
class Outcome:
    label: str
    seconds: float
    failed: int

    def show(self) -> None:
        print(
            f"{self.label:<38} time_until_served={self.seconds * 1000:9.1f} ms  "
            f"failed_requests={self.failed}"
        )


def run(haproxy: str, count: int, threads: int, repeat: int) -> float:
    with tempfile.TemporaryDirectory(prefix="swap-bench-") as tmp:
        state = Path(tmp)
        cert_dir = state / "certs"
        cert_dir.mkdir()
        names = [f"c{i:03d}.bench.test" for i in range(count)]
        ca = make_ca()
        t0 = time.monotonic()
        initial = new_targets(ca, names)
        for t in initial:
            (cert_dir / f"{t.name}.pem").write_bytes(t.bundle)
        (state / "crt-list.txt").write_text("".join(f"{cert_dir / t.name}.pem\n" for t in initial))
        print(f"generated {count} certificates in {time.monotonic() - t0:.1f} s")
        port = free_port()
        proc = HAProxyProcess(
            haproxy, CONFIG, {"STATE": str(state), "PORT": str(port)}, state / "haproxy"
        )
        proc.start()
        load = Load(port, names, threads)
        try:
            wait_served(port, {t.names[0]: t.serial for t in initial})
            swap = Deployer(
                [f"unix:{state}/admin.sock"],
                cert_dir,
                state / "crt-list.txt",
                verify=[f"127.0.0.1:{port}"],
            )
            reload = Deployer(
                [],
                cert_dir,
                reload_command=["kill", "-USR2", str(proc.pid)],
            )
            load.start()
            time.sleep(1.0)  # let the load settle

            def apply(deployer: Deployer, targets: list[DeployTarget]) -> tuple[float, float]:
                """Deploy `targets` (and reload if that is the deployer's way); return
                (start, time when all are served)."""
                start = time.monotonic()
                for result in deployer.deploy_many(targets):
                    result.raise_for_errors()
                if not deployer.apis:
                    assert deployer.finish()
                end = wait_served(port, {t.names[0]: t.serial for t in targets})
                return start, end

            # The one-certificate change (a renewal) is short and the machine is
            # noisy: repeat it, swap and reload interleaved, and take medians.
            swap_one: list[float] = []
            reload_one: list[float] = []
            failed_swap_one = failed_reload_one = 0
            for _ in range(repeat):
                start, end = apply(swap, new_targets(ca, names[:1]))
                swap_one.append(end - start)
                failed_swap_one += len(load.failures_between(start, end + 0.05))
                time.sleep(0.3)
                start, end = apply(reload, new_targets(ca, names[:1]))
                reload_one.append(end - start)
                failed_reload_one += len(load.failures_between(start, end + 0.05))
                time.sleep(1.0)  # the old worker finishes its connections
            results = [
                Outcome("runtime API swap, 1 cert", statistics.median(swap_one), failed_swap_one),
                Outcome(
                    "reload (SIGUSR2), 1 cert changed",
                    statistics.median(reload_one),
                    failed_reload_one,
                ),
            ]
            start, end = apply(swap, new_targets(ca, names))
            failed = len(load.failures_between(start, end + 0.05))
            results.append(Outcome(f"runtime API swap, {count} certs", end - start, failed))
            time.sleep(0.5)
            start, end = apply(reload, new_targets(ca, names))
            failed = len(load.failures_between(start, end + 0.05))
            results.append(Outcome(f"reload (SIGUSR2), {count} certs changed", end - start, failed))
            time.sleep(0.5)
        finally:
            load.finish()
            proc.stop()

        total_ok = len(load.ok)
        print(
            f"load: {total_ok} successful requests, {len(load.failed)} failed, "
            f"{threads} client threads"
        )
        for outcome in results:
            outcome.show()
        for _, msg in load.failed[:3]:
            print(f"    failure: {msg}")
        swap1, reload1, swap_all, reload_all = results
        if swap1.failed or swap_all.failed:
            print("ERROR: requests failed during a runtime API swap", file=sys.stderr)
        ratio_one = reload1.seconds / swap1.seconds
        ratio_all = reload_all.seconds / swap_all.seconds
        per_cert = swap_all.seconds / count * 1000
        print(f"runtime API per certificate in the bulk run (write+swap+verify): {per_cert:.2f} ms")
        print(
            f"1-cert runs (ms): swap {[round(x * 1000, 1) for x in swap_one]}, "
            f"reload {[round(x * 1000, 1) for x in reload_one]}"
        )
        print(f"speedup for {count} certs changed: {ratio_all:.2f}x")
        print(f"speedup for 1 cert changed (reload loads all {count}): {ratio_one:.2f}x")
        return ratio_one


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--haproxy", default=os.environ.get("HAPROXY_BIN", "/usr/sbin/haproxy"))
    parser.add_argument("--certs", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3, help="runs of the 1-cert change")
    args = parser.parse_args()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    ratio = run(args.haproxy, args.certs, args.threads, args.repeat)
    print(f"swap_speedup_vs_reload={ratio:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
