"""Runtime-API certificate swap vs HAProxy reload, under a steady keep-alive TLS load.

For each N (default 200 and 1000): one HAProxy (master-worker, so it can be
reloaded with SIGUSR2) serves N certificates from a crt-list on 127.0.0.1. A
separate load process (so its Python threads never compete with the deployer
for the GIL) keeps TLS connections open and sends keep-alive GETs on them, each
connection with the SNI of a random certificate, reconnecting (a new
handshake) every few requests. Every request that gets no 200 reply is a
failed request; its time is recorded. A sampler reads VmRSS of every HAProxy
worker (/proc/PID/status of the master's children) every 10 ms.

Measured, one after the other in the same run:

  (a) one certificate changed (a renewal), repeated and interleaved:
      runtime API `Deployer.deploy` (stored -> written, swapped, and verified
      by `show ssl cert` plus TLS handshakes: the time until it returns) vs
      the same change written to disk and applied by a reload (time until a
      TLS handshake gets the new certificate);
  (b) all N changed at once: `Deployer.deploy_batch` (one batch) vs one
      reload (time until the last changed certificate is served; a new
      worker serves all its certificates from the moment it serves one, and
      every one is then checked, untimed).

For each: time, failed requests in the window, and the HAProxy workers' RSS
(steady before, peak during). Lines `swap_speedup_vs_reload=` (one
certificate, first N) and, last, `bulk_vs_reload=<reload time / our time, all
certificates changed, at the largest N>`.

    .venv/bin/python bench/swap.py [--haproxy PATH] [--certs 200 1000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography import x509

from agent.deploy import DEFAULT_HANDSHAKE_SAMPLE, Deployer, DeployTarget, tls_leaf
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
    timeout http-keep-alive 5s

frontend tls
    bind "127.0.0.1:${PORT}" ssl crt-list "${STATE}/crt-list.txt"
    http-request return status 200 content-type text/plain string ok
"""

MAX_RUN_SECONDS = 900.0  # hard bound on the load, whatever happens
MAX_REQUESTS_PER_THREAD = 5_000_000
REQUESTS_PER_CONNECTION = 50  # then a new connection (a new handshake, another SNI)
PAUSE_BETWEEN_REQUESTS = 0.001  # s: a steady load that leaves the machine room to work
RSS_INTERVAL = 0.01  # s


# ---------------------------------------------------------------------------
# Load (in its own process)


def _load_worker(
    port: int, names: list[str], seed: int, stop: Any, out: Any, deadline: float
) -> None:
    rnd = random.Random(seed)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    ok = 0
    failed: list[tuple[float, str]] = []
    tls: ssl.SSLSocket | None = None
    used = 0
    for _ in range(MAX_REQUESTS_PER_THREAD):
        if stop.is_set() or time.monotonic() > deadline:
            break
        try:
            if tls is None or used >= REQUESTS_PER_CONNECTION:
                if tls is not None:
                    tls.close()
                sni = rnd.choice(names)
                raw = socket.create_connection(("127.0.0.1", port), timeout=5)
                tls = context.wrap_socket(raw, server_hostname=sni)
                used = 0
            tls.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
            reply = b""
            while b"\r\n\r\nok" not in reply:
                chunk = tls.recv(4096)
                if not chunk:
                    raise ConnectionError("connection closed before the reply")
                reply += chunk
            if not reply.startswith(b"HTTP/1.1 200"):
                raise ValueError(f"unexpected reply {reply[:40]!r}")
            used += 1
            ok += 1
        except (OSError, ValueError) as exc:
            failed.append((time.monotonic(), f"{type(exc).__name__}: {exc}"))
            if tls is not None:
                tls.close()
            tls = None
        time.sleep(PAUSE_BETWEEN_REQUESTS)
    if tls is not None:
        tls.close()
    out.put((ok, failed))


def _load_process(port: int, names: list[str], threads: int, stop: Any, out: Any) -> None:
    deadline = time.monotonic() + MAX_RUN_SECONDS
    inner: Any = __import__("queue").Queue()
    workers = [
        threading.Thread(target=_load_worker, args=(port, names, i, stop, inner, deadline))
        for i in range(threads)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join(MAX_RUN_SECONDS + 30)
    ok = 0
    failed: list[tuple[float, str]] = []
    for _ in workers:
        n, f = inner.get(timeout=10)
        ok += n
        failed += f
    out.put((ok, failed))


@dataclass
class Load:
    port: int
    names: list[str]
    threads: int
    ok: int = 0
    failed: list[tuple[float, str]] = field(default_factory=list)

    def start(self) -> None:
        ctx = mp.get_context("fork")
        self._stop = ctx.Event()
        self._out: Any = ctx.Queue()
        self._proc = ctx.Process(
            target=_load_process,
            args=(self.port, self.names, self.threads, self._stop, self._out),
            daemon=True,
        )
        self._proc.start()

    def finish(self) -> None:
        self._stop.set()
        self.ok, self.failed = self._out.get(timeout=60)
        self._proc.join(30)

    def failures_between(self, start: float, end: float) -> list[str]:
        return [msg for t, msg in self.failed if start <= t <= end]


# ---------------------------------------------------------------------------
# RSS of the HAProxy workers


def _worker_pids(master: int) -> list[int]:
    try:
        text = Path(f"/proc/{master}/task/{master}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass
class RssSampler:
    """Samples (monotonic time, sum of the workers' VmRSS in kB, worker count)."""

    master: int
    samples: list[tuple[float, int, int]] = field(default_factory=list)

    def start(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + MAX_RUN_SECONDS
        while not self._stop.is_set() and time.monotonic() < deadline:
            pids = _worker_pids(self.master)
            self.samples.append((time.monotonic(), sum(_rss_kb(p) for p in pids), len(pids)))
            time.sleep(RSS_INTERVAL)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def peak(self, start: float, end: float) -> tuple[int, int]:
        """(peak RSS kB, most workers) between start and end."""
        window = [(rss, n) for t, rss, n in self.samples if start <= t <= end]
        if not window:
            return 0, 0
        return max(r for r, _ in window), max(n for _, n in window)

    def steady(self, before: float) -> int:
        """Median RSS kB over the second before `before`."""
        window = [rss for t, rss, _ in self.samples if before - 1.0 <= t <= before]
        return int(statistics.median(window)) if window else 0


# ---------------------------------------------------------------------------


def wait_one_worker(master: int, timeout: float = 15.0) -> None:
    """Wait (bounded) until the worker a reload replaced has exited, so the next
    window's RSS and failures are its own."""
    deadline = time.monotonic() + timeout
    while len(_worker_pids(master)) > 1 and time.monotonic() < deadline:
        time.sleep(0.05)


def serial_of(port: int, sni: str) -> int:
    der = tls_leaf(f"127.0.0.1:{port}", sni, 5.0)
    return x509.load_der_x509_certificate(der).serial_number


def wait_served(port: int, sni: str, serial: int, timeout: float = 120.0) -> float:
    """Poll until `sni` gets `serial`; return the monotonic time it did."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if serial_of(port, sni) == serial:
                return time.monotonic()
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{sni}: serial {serial:X} not served after {timeout} s")
        time.sleep(0.002)


def check_all_served(port: int, targets: list[DeployTarget]) -> None:
    wrong = [t.name for t in targets if serial_of(port, t.names[0]) != t.serial]
    if wrong:
        raise AssertionError(f"{len(wrong)} certificates not served, e.g. {wrong[:3]}")


def new_targets(ca: CA, names: list[str], indices: range | list[int]) -> list[DeployTarget]:
    targets = []
    for i in indices:
        bundle, cert, _ = make_bundle(ca, [names[i]])
        targets.append(DeployTarget(f"c{i:04d}", bundle, cert.serial_number, [names[i]]))
    return targets


@dataclass
class Outcome:
    label: str
    seconds: float
    failed: int
    rss_steady_kb: int
    rss_peak_kb: int
    workers: int

    def show(self) -> None:
        print(
            f"  {self.label:<36} {self.seconds * 1000:9.1f} ms  failed_requests={self.failed}  "
            f"rss_mb steady={self.rss_steady_kb / 1024:.1f} peak={self.rss_peak_kb / 1024:.1f} "
            f"(workers {self.workers})"
        )


def haproxy_version(binary: str) -> str:
    out = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10).stdout
    return out.split("\n", 1)[0].replace("HAProxy version ", "")


def run(
    haproxy: str, count: int, threads: int, repeat: int, sample: int | None
) -> tuple[float, float]:
    """One N. Returns (single-certificate speedup, bulk speedup) over a reload."""
    with tempfile.TemporaryDirectory(prefix="swap-bench-") as tmp:
        state = Path(tmp)
        cert_dir = state / "certs"
        cert_dir.mkdir()
        names = [f"c{i:04d}.bench.test" for i in range(count)]
        ca = make_ca()
        t0 = time.monotonic()
        initial = new_targets(ca, names, range(count))
        for t in initial:
            (cert_dir / f"{t.name}.pem").write_bytes(t.bundle)
        (state / "crt-list.txt").write_text("".join(f"{cert_dir / t.name}.pem\n" for t in initial))
        print(f"N={count}: generated {count} certificates in {time.monotonic() - t0:.1f} s")
        port = free_port()
        proc = HAProxyProcess(
            haproxy, CONFIG, {"STATE": str(state), "PORT": str(port)}, state / "haproxy"
        )
        proc.start()
        load = Load(port, names, threads)
        rss = RssSampler(proc.pid)
        results: list[Outcome] = []
        swap_one: list[float] = []
        reload_one: list[float] = []
        windows: list[tuple[str, float, float]] = []
        try:
            wait_served(port, initial[-1].names[0], initial[-1].serial)
            swap = Deployer(
                [f"unix:{state}/admin.sock"],
                cert_dir,
                state / "crt-list.txt",
                verify=[f"127.0.0.1:{port}"],
                handshake_sample=sample,
            )
            reload = Deployer([], cert_dir, reload_command=["kill", "-USR2", str(proc.pid)])
            # Stored -> served and verified on a quiet machine (no load yet).
            quiet: list[float] = []
            for r in range(repeat):
                [target] = new_targets(ca, names, [r % count])
                start = time.monotonic()
                swap.deploy(target).raise_for_errors()
                quiet.append(time.monotonic() - start)
            rss.start()
            load.start()
            time.sleep(1.5)  # let the load settle

            def by_swap(targets: list[DeployTarget]) -> tuple[float, float]:
                start = time.monotonic()
                for result in swap.deploy_batch(targets):
                    result.raise_for_errors()  # served and verified when it returns
                end = time.monotonic()
                check_all_served(port, targets)
                return start, end

            def by_reload(targets: list[DeployTarget]) -> tuple[float, float]:
                start = time.monotonic()
                for result in reload.deploy_batch(targets):
                    result.raise_for_errors()
                assert reload.finish()
                end = wait_served(port, targets[-1].names[0], targets[-1].serial)
                check_all_served(port, targets)
                return start, end

            # The one-certificate change is short and the machine is noisy:
            # repeat it, swap and reload interleaved, and take medians.
            for r in range(repeat):
                i = r % count
                start, end = by_swap(new_targets(ca, names, [i]))
                swap_one.append(end - start)
                windows.append(("swap1", start, end))
                time.sleep(1.0)  # past the 0.5 s tail of this window before the reload
                start, end = by_reload(new_targets(ca, names, [i]))
                reload_one.append(end - start)
                windows.append(("reload1", start, end))
                wait_one_worker(proc.pid)  # the old worker finishes its connections
                time.sleep(0.3)
            bulk = new_targets(ca, names, range(count))
            start, end = by_swap(bulk)
            windows.append(("swapN", start, end))
            time.sleep(1.0)
            bulk = new_targets(ca, names, range(count))
            start, end = by_reload(bulk)
            windows.append(("reloadN", start, end))
            wait_one_worker(proc.pid)
        finally:
            if load is not None and hasattr(load, "_proc"):
                load.finish()
            rss.stop()
            proc.stop()

        def outcome(label: str, kind: str, seconds: float) -> Outcome:
            spans = [(s, e) for k, s, e in windows if k == kind]
            failed = sum(len(load.failures_between(s, e + 0.5)) for s, e in spans)
            peak, workers = max(rss.peak(s, e + 0.5) for s, e in spans)
            steady = rss.steady(spans[0][0])
            return Outcome(label, seconds, failed, steady, peak, workers)

        results = [
            outcome("runtime API, 1 cert (median)", "swap1", statistics.median(swap_one)),
            outcome("reload, 1 cert changed (median)", "reload1", statistics.median(reload_one)),
            outcome(f"runtime API, all {count} certs", "swapN", windows[-2][2] - windows[-2][1]),
            outcome(f"reload, all {count} certs", "reloadN", windows[-1][2] - windows[-1][1]),
        ]
        print(
            f"  load: {load.ok} successful requests, {len(load.failed)} failed, "
            f"{threads} client threads (keep-alive, {REQUESTS_PER_CONNECTION} per connection)"
        )
        for o in results:
            o.show()
        for _, msg in load.failed[:3]:
            print(f"    failure: {msg}")
        swap1, reload1, swap_all, reload_all = results
        if swap1.failed or swap_all.failed:
            print("ERROR: requests failed during a runtime API swap", file=sys.stderr)
        print(
            f"  1-cert runs (ms): swap {[round(x * 1000, 1) for x in swap_one]}, "
            f"reload {[round(x * 1000, 1) for x in reload_one]}"
        )
        print(
            f"  runtime API per certificate in the batch: {swap_all.seconds / count * 1000:.2f} ms"
        )
        one = reload1.seconds / swap1.seconds
        bulk_ratio = reload_all.seconds / swap_all.seconds
        print(
            f"  N={count} single_swap_ms={swap1.seconds * 1000:.1f} (under load), "
            f"{statistics.median(quiet) * 1000:.1f} (no load: "
            f"{[round(x * 1000, 1) for x in quiet]}) speedup_1={one:.1f}"
        )
        print(f"  N={count} bulk_vs_reload={bulk_ratio:.2f}")
        return one, bulk_ratio


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--haproxy", default=os.environ.get("HAPROXY_BIN", "/usr/sbin/haproxy"))
    parser.add_argument("--certs", type=int, nargs="+", default=[200, 1000])
    parser.add_argument("--threads", type=int, default=2, help="load client threads")
    parser.add_argument("--repeat", type=int, default=5, help="runs of the 1-cert change")
    parser.add_argument(
        "--handshake-sample",
        default=str(DEFAULT_HANDSHAKE_SAMPLE),
        help="Deployer handshake_sample: a number, or 'all' for a handshake for every "
        f"name of every certificate (default {DEFAULT_HANDSHAKE_SAMPLE}, as the agent)",
    )
    args = parser.parse_args()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sample = None if args.handshake_sample == "all" else int(args.handshake_sample)
    print(
        f"HAProxy {haproxy_version(args.haproxy)} ({args.haproxy}); handshakes: "
        + ("every name" if sample is None else f"sample of {sample} + every new certificate")
    )
    outcomes = [run(args.haproxy, n, args.threads, args.repeat, sample) for n in args.certs]
    print(f"swap_speedup_vs_reload={outcomes[0][0]:.1f}")
    print(f"bulk_vs_reload={outcomes[-1][1]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
