"""Throughput of http-01 challenge answers through HAProxy, four ways, in one run.

Same HAProxy process, same load generator (wrk on 127.0.0.1, bounded
duration), same challenge URL, one frontend per variant:

  (a) static     HAProxy answers with `http-request return` (the upper bound)
  (b) spoe-agent HAProxy asks our SPOE agent (`python -m agent.spoa`, its own
                 process), exactly as haproxy/spoe-acme.conf ships
  (c) standalone HAProxy routes the path to a backend-port responder shaped
                 like certbot's standalone plugin (bench/standalone_responder.py)
  (d) map        HAProxy answers from a map, configured like haproxy/haproxy-map.cfg
                 and filled by the agent's HAProxyMapRegistry over the runtime API
                 (virt@acme on 3.0+, an empty map file on 2.6/2.8)

Any answer that is not the key authorization counts as wrong (the
frontends' fallback backend answers 404, which wrk reports as non-2xx).
Prints req/s and p99 per variant (the median round with --rounds N, the
variants interleaved) and the CPU each process spent per request during that
variant's load (utime + stime from /proc: HAProxy, our agent, the responder;
these depend less on how busy the rest of the machine is than req/s does).
The last line is `ratio_vs_static=<b/a>`, the line before it
`map_ratio_vs_static=<d/a>`, each the median of the per-round ratios; before
them `cpu_ratio_vs_static=` and `map_cpu_ratio_vs_static=`: static's CPU per
request (HAProxy + agent) over the variant's, the same comparison by CPU.

    .venv/bin/python -m bench.challenge_throughput [--duration 5] [--haproxy PATH]
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.haproxy import HAProxyProcess, free_port  # noqa: E402

TOKEN = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA"
KEYAUTH = TOKEN + ".9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI"
PATH = "/.well-known/acme-challenge/" + TOKEN

CONFIG = """
global
    noreuseport
    nbthread "${NBTHREAD}"
    maxconn 4000
    stats socket "${ADMIN_SOCKET}" mode 600 level admin

defaults
    mode http
    timeout connect 2s
    timeout client  30s
    timeout server  30s

# (a) static upper bound
frontend static
    bind "127.0.0.1:${STATIC_PORT}"
    http-request return status 200 content-type text/plain string "${KEYAUTH}" if { path_reg ^/\\.well-known/acme-challenge/[A-Za-z0-9_-]+$ }
    default_backend notfound

# (b) our agent over SPOE, configured like haproxy/haproxy.cfg
frontend spoe
    bind "127.0.0.1:${SPOE_PORT}"
    filter spoe engine acme config "${SPOE_CONF}"
    http-request return status 200 content-type text/plain lf-string "%[var(txn.acme.keyauth)]" if { var(txn.acme.keyauth) -m found }
    default_backend notfound

# (d) map mode, configured like haproxy/haproxy-map.cfg
frontend map
    bind "127.0.0.1:${MAP_PORT}"
    http-request set-var(txn.acme.keyauth) path,field(4,/),map("${ACME_MAP}") if { path_beg /.well-known/acme-challenge/ }
    http-request return status 200 content-type text/plain lf-string "%[var(txn.acme.keyauth)]" if { var(txn.acme.keyauth) -m found }
    default_backend notfound

# (c) certbot-standalone style: the challenge path goes to a backend port
frontend standalone
    bind "127.0.0.1:${STANDALONE_PORT}"
    use_backend standalone if { path_beg /.well-known/acme-challenge/ }
    default_backend notfound

backend standalone
    server certbot "127.0.0.1:${RESPONDER_PORT}"

backend notfound
    http-request return status 404 content-type text/plain string "not answered"

backend acme-spoa
    mode tcp
    timeout connect 1s
    timeout server 1m
    server agent1 "127.0.0.1:${SPOA_PORT}"
"""  # noqa: E501


@dataclass
class Result:
    name: str
    rps: float
    p99_ms: float
    requests: int
    wrong: int  # non-2xx: the request was not answered with the key authorization
    socket_errors: int  # wrk counts every server-side close as a read error
    cpu_us: dict[str, float] = field(default_factory=dict)  # process -> CPU µs per request


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of process `pid` so far, in seconds (/proc/PID/stat fields 14, 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not m:
        raise ValueError(f"cannot parse wrk latency {text!r}")
    return float(m.group(1)) * _UNITS_MS[m.group(2)]


def parse_wrk(name: str, out: str) -> Result:
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    wrong = socket_errors = 0
    if m := re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out):
        wrong = int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        socket_errors = sum(int(g) for g in m.groups())
    return Result(name, rps, p99, total, wrong, socket_errors)


def wrk(name: str, port: int, duration: int, threads: int, connections: int) -> Result:
    out = subprocess.run(
        [
            *("wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency"),
            *("--timeout", "5s", f"http://127.0.0.1:{port}{PATH}"),
        ],
        capture_output=True,
        text=True,
        timeout=duration + 30,
        check=True,
    ).stdout
    return parse_wrk(name, out)


def check_answer(port: int) -> None:
    """One request per variant before loading it: the body must be the key authorization."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", PATH)
        resp = conn.getresponse()
        body = resp.read().decode()
    finally:
        conn.close()
    if resp.status != 200 or body != KEYAUTH:
        raise SystemExit(f"port {port} answered {resp.status} {body!r}, not the key authorization")


def format_result(r: Result) -> str:
    cpu = "  ".join(f"cpu_us/req[{p}]={us:.1f}" for p, us in r.cpu_us.items() if us > 0.05)
    return (
        f"{r.name:<11} req/s={r.rps:>10.0f}  p99={r.p99_ms:>8.2f}ms  "
        f"requests={r.requests}  wrong={r.wrong}  socket_errors={r.socket_errors}  {cpu}"
    ).rstrip()


def measured(name: str, port: int, args: argparse.Namespace, pids: dict[str, int]) -> Result:
    """One wrk run against `port`, with the CPU each of `pids` spent meanwhile."""
    before = {p: cpu_seconds(pid) for p, pid in pids.items()}
    r = wrk(name, port, args.duration, args.threads, args.connections)
    after = {p: cpu_seconds(pid) for p, pid in pids.items()}
    r.cpu_us = {p: (after[p] - before[p]) * 1e6 / max(r.requests, 1) for p in pids}
    return r


def median_result(results: list[Result]) -> Result:
    """The run with the median req/s (its own p99 and counts, not a mix)."""
    ordered = sorted(results, key=lambda r: r.rps)
    return ordered[len(ordered) // 2]


def map_name_for(version_line: str, map_file: Path) -> str:
    """virt@acme on HAProxy 3.0+, else the (empty) map file, created here."""
    match = re.search(r"version (\d+)\.(\d+)", version_line)
    if match and (int(match.group(1)), int(match.group(2))) >= (3, 0):
        return "virt@acme"
    map_file.write_text("")
    return str(map_file)


def fill_map(admin_socket: Path, map_file: Path) -> None:
    """Put the token into HAProxy's map the way the agent does (map name found by itself)."""
    from agent.challenge_map import HAProxyMapRegistry
    from agent.challenges import MemoryChallengeRegistry
    from agent.haproxy_api import RuntimeAPI

    registry = HAProxyMapRegistry(
        MemoryChallengeRegistry(),
        [RuntimeAPI(f"unix:{admin_socket}")],
        default_file=str(map_file),
    )
    registry.add(TOKEN, KEYAUTH, time.time() + 24 * 3600)


@contextmanager
def child(args: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    """A helper process that prints 'listening on ...' when ready; stopped by its handle."""
    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        if not line.startswith("listening on"):
            raise SystemExit(f"{' '.join(args)} did not start: {line!r}")
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--duration", type=int, default=5, help="seconds per variant")
    parser.add_argument("--warmup", type=int, default=1, help="seconds per variant, 0 = none")
    parser.add_argument("--haproxy", default="/usr/sbin/haproxy")
    parser.add_argument("--nbthread", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="wrk -t")
    parser.add_argument("--connections", type=int, default=50, help="wrk -c")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run a-d this many times, interleaved, and report medians (noisy machines)",
    )
    args = parser.parse_args(argv)

    spoa_port, responder_port = free_port(), free_port()
    ports = {
        "static": free_port(),
        "spoe-agent": free_port(),
        "map": free_port(),
        "standalone": free_port(),
    }
    token_arg = f"{TOKEN}={KEYAUTH}"
    with (
        tempfile.TemporaryDirectory(prefix="bench-") as tmp,
        child(
            ["-m", "agent.spoa", "--listen", f"127.0.0.1:{spoa_port}", "--token", token_arg]
        ) as agent_proc,
        child(
            [
                *("-m", "bench.standalone_responder"),
                *("--listen", f"127.0.0.1:{responder_port}", "--token", token_arg),
            ]
        ) as responder_proc,
    ):
        env = {
            "NBTHREAD": str(args.nbthread),
            "KEYAUTH": KEYAUTH,
            "STATIC_PORT": str(ports["static"]),
            "SPOE_PORT": str(ports["spoe-agent"]),
            "STANDALONE_PORT": str(ports["standalone"]),
            "RESPONDER_PORT": str(responder_port),
            "SPOA_PORT": str(spoa_port),
            "SPOE_CONF": str(REPO / "haproxy" / "spoe-acme.conf"),
            "MAP_PORT": str(ports["map"]),
            "ADMIN_SOCKET": str(Path(tmp) / "admin.sock"),
        }
        version = subprocess.run(
            [args.haproxy, "-v"], capture_output=True, text=True, check=False
        ).stdout.split("\n")[0]
        map_file = Path(tmp) / "acme-challenge.map"
        env["ACME_MAP"] = map_name_for(version, map_file)
        with HAProxyProcess(args.haproxy, CONFIG, env, Path(tmp)) as haproxy:
            pids = {
                "haproxy": haproxy.pid,
                "agent": agent_proc.pid,
                "responder": responder_proc.pid,
            }
            fill_map(Path(tmp) / "admin.sock", map_file)
            print(
                f"# {version}; nbthread {args.nbthread}; "
                f"wrk -t{args.threads} -c{args.connections} -d{args.duration}s; "
                f"{args.rounds} round(s); "
                f"{os.cpu_count()} CPUs",
                flush=True,
            )
            runs: dict[str, list[Result]] = {name: [] for name in ports}
            for name, port in ports.items():
                check_answer(port)
                if args.warmup > 0:
                    wrk(name, port, args.warmup, args.threads, args.connections)
            for _ in range(args.rounds):
                for name, port in ports.items():
                    r = measured(name, port, args, pids)
                    runs[name].append(r)
                    if args.rounds > 1:
                        print(f"#   {format_result(r)}", flush=True)
                    time.sleep(0.5)  # let TIME_WAIT and the agent settle between variants
                    check_answer(port)  # still answering correctly after the load
    results = {name: median_result(rs) for name, rs in runs.items()}
    for r in results.values():
        print(format_result(r))
    if any(r.wrong for r in results.values()):
        print("# WARNING: some answers were not the key authorization (see wrong=)")
    if results["standalone"].socket_errors:
        print("# standalone socket_errors: HTTP/1.0 responder closes after every answer")
    # Ratios are taken per round (variants run back to back, so they share the
    # machine's load at that moment) and the median round is reported.
    rounds = range(args.rounds)
    vs_static = statistics.median(runs["spoe-agent"][i].rps / runs["static"][i].rps for i in rounds)
    vs_standalone = statistics.median(
        runs["spoe-agent"][i].rps / runs["standalone"][i].rps for i in rounds
    )
    map_vs_static = statistics.median(runs["map"][i].rps / runs["static"][i].rps for i in rounds)

    def cpu_total(r: Result) -> float:
        return sum(r.cpu_us.values())

    cpu_vs_static = statistics.median(
        cpu_total(runs["static"][i]) / max(cpu_total(runs["spoe-agent"][i]), 1e-9) for i in rounds
    )
    map_cpu_vs_static = statistics.median(
        cpu_total(runs["static"][i]) / max(cpu_total(runs["map"][i]), 1e-9) for i in rounds
    )
    print(f"cpu_ratio_vs_static={cpu_vs_static:.2f}")
    print(f"map_cpu_ratio_vs_static={map_cpu_vs_static:.2f}")
    print(f"agent_vs_standalone={vs_standalone:.2f}")
    print(f"map_ratio_vs_static={map_vs_static:.2f}")
    print(f"ratio_vs_static={vs_static:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
