"""Fleet mode, measured on three real nodes (tests/support/fleet.py), in one run:

  (a) challenge answers through node B's HAProxy for a token added on another
      node (through the fleet's Redis registry, answered from B's mirror), side
      by side with a single node: the same shipped HAProxy config in front of
      `python -m agent.spoa` holding the token in memory. wrk, bounded duration;
      reported as a ratio (target >= 0.8), per round, median of the rounds.
  (b) issuance until all 3 nodes serve it: `renew --force` on node A (handed to
      its daemon) with Pebble validating on B and C, until a real TLS handshake
      to every node's address shows the new serial. For 1 certificate and for N
      (default 200) renewed at once. `stored->served` is from the `installed_at`
      the ordering node recorded in Redis to the first handshake on the last
      node that showed the serial (polled every 5 ms for 1 certificate).

The last line is `fleet_sync_s=<seconds from stored to served on every node, 1
certificate>` (target <= 2, aim 0.2); a certificate some node does not serve
within --sync-timeout is reported, and fleet_sync_s is then that timeout.

The `burst` variant measures only the fan-out of a mass renewal: N (default
200) certificates force-renewed at once on node A (its daemon orders them
from Pebble, which validates on B and C). For every certificate, from A's
store (`installed_at` in Redis) to the first handshake showing the new
serial on A (A's own coalesced batch deploy), and to the last of B and C
(the fan-out). Handshakes are only made for certificates already stored (one
pipelined read of the pointers per poll round), so the polling does not eat
the CPU the nodes need. Also the Redis commands of the whole run (INFO
commandstats, all nodes) and each node's round trips (requests through its
relay) per certificate. Last line:
`burst_fanout_ratio=<max stored->served on B and C / max stored->served on A>`
(target: a small number, i.e. the fleet is as fast as A's own deploy).

    .venv/bin/python -m bench.fleet [--duration 5] [--rounds 1] [--certs 200]
    .venv/bin/python -m bench.fleet burst [--certs 200]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.challenge_throughput import Result, child, format_result, parse_wrk  # noqa: E402
from tests.support.fleet import Fleet, FleetNode, haproxy_config_text  # noqa: E402
from tests.support.haproxy import HAProxyProcess, free_port  # noqa: E402

TOKEN = "fleetBenchTokenxGJ-PCt92wr-oAevaGxfADs6pSRb2"
KEYAUTH = TOKEN + ".9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI"
PATH = "/.well-known/acme-challenge/" + TOKEN


def wrk(name: str, host: str, port: int, duration: int, threads: int, conns: int) -> Result:
    out = subprocess.run(
        [
            *("wrk", f"-t{threads}", f"-c{conns}", f"-d{duration}s", "--latency"),
            *("--timeout", "5s", f"http://{host}:{port}{PATH}"),
        ],
        capture_output=True, text=True, timeout=duration + 30, check=True,
    ).stdout  # fmt: skip
    return parse_wrk(name, out)


def check_answer(host: str, port: int) -> None:
    import http.client

    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request("GET", PATH)
        resp = conn.getresponse()
        body = resp.read().decode()
    finally:
        conn.close()
    if resp.status != 200 or body != KEYAUTH:
        raise SystemExit(f"{host}:{port} answered {resp.status} {body!r}, not the keyauth")


# --- (a) --------------------------------------------------------------------------------


def single_node(tmp: Path, haproxy: str) -> tuple[HAProxyProcess, list[str]]:
    """The shipped config on 127.0.0.1 in front of an in-memory `agent.spoa`."""
    http_port, https_port, spoa_port, site_port = (free_port() for _ in range(4))
    from tests.support.certs import write_crt_list

    hdir = tmp / "single"
    hdir.mkdir()
    env = {
        "FLEET_NODE": "single",
        "HAPROXY_ADMIN_SOCKET": str(hdir / "admin.sock"),
        "HTTP_BIND": f"127.0.0.1:{http_port}",
        "HTTPS_BIND": f"127.0.0.1:{https_port}",
        "SPOE_ACME_CONF": str(REPO / "haproxy" / "spoe-acme.conf"),
        "CRT_LIST": str(write_crt_list(hdir, "single.test")),
        "SITE_ADDR": f"127.0.0.1:{site_port}",
        "SITE_BIND": f"127.0.0.1:{site_port}",
        "SPOA_ADDR": f"127.0.0.1:{spoa_port}",
    }
    proc = HAProxyProcess(haproxy, haproxy_config_text(), env, hdir)
    agent = ["-m", "agent.spoa", "--listen", f"127.0.0.1:{spoa_port}",
             "--token", f"{TOKEN}={KEYAUTH}"]  # fmt: skip
    return proc, agent


def bench_challenges(fleet: Fleet, tmp: Path, args: argparse.Namespace) -> float:
    from agent.fleet import RedisChallengeRegistry

    # "Node A" adds the token as its order would: HSET + PUBLISH, acknowledged.
    registry = RedisChallengeRegistry(fleet.redis_client(), fleet.namespace, start=False)
    registry.add(TOKEN, KEYAUTH, time.time() + 3600)
    b = fleet["b"]
    deadline = time.monotonic() + 10
    while True:
        try:
            check_answer(b.address, b.http_port)
            break
        except SystemExit:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    haproxy, agent = single_node(tmp, args.haproxy)
    with child(agent), haproxy:
        single_port = int(haproxy.env["HTTP_BIND"].rsplit(":", 1)[1])
        variants = {"fleet-b": (b.address, b.http_port), "single": ("127.0.0.1", single_port)}
        runs: dict[str, list[Result]] = {n: [] for n in variants}
        for name, (host, port) in variants.items():
            check_answer(host, port)
            if args.warmup:
                wrk(name, host, port, args.warmup, args.threads, args.connections)
        for _ in range(args.rounds):
            for name, (host, port) in variants.items():
                r = wrk(name, host, port, args.duration, args.threads, args.connections)
                runs[name].append(r)
                if args.rounds > 1:
                    print(f"#   {format_result(r)}", flush=True)
                time.sleep(0.5)
                check_answer(host, port)
    for rs in runs.values():
        print(format_result(sorted(rs, key=lambda r: r.rps)[len(rs) // 2]))
    return statistics.median(
        runs["fleet-b"][i].rps / runs["single"][i].rps for i in range(args.rounds)
    )


# --- (b) --------------------------------------------------------------------------------


def stored(fleet: Fleet, names: Sequence[str]) -> dict[str, tuple[int, float]]:
    """name -> (serial, installed_at UNIX s) as stored in Redis now."""
    from agent.certstate import load_meta
    from agent.store_redis import RedisStorage

    store = RedisStorage(fleet.redis_client(), fleet.namespace)
    out = {}
    for n in names:
        meta = load_meta(store, n)
        if meta is not None and meta.serial and meta.installed_at is not None:
            out[n] = (int(meta.serial, 16), meta.installed_at)
    return out


def served_at(
    nodes: Sequence[FleetNode], domains: dict[str, str], old: dict[str, int],
    timeout: float, poll: float,
) -> dict[tuple[str, str], tuple[int, float]]:  # fmt: skip
    """(node, cert) -> (new serial, UNIX time first seen served), polling handshakes until
    every node serves a serial other than `old[cert]`, at most `timeout` s."""
    seen: dict[tuple[str, str], tuple[int, float]] = {}
    todo = [(node, name) for node in nodes for name in domains]
    lock = threading.Lock()
    deadline = time.monotonic() + timeout

    def probe(item: tuple[FleetNode, str]) -> None:
        node, name = item
        try:
            serial = node.served_serial(domains[name])
        except OSError:
            return
        if serial is not None and serial != old.get(name):
            with lock:
                seen.setdefault((node.name, name), (serial, time.time()))

    with ThreadPoolExecutor(max_workers=min(16, len(todo))) as pool:
        while todo and time.monotonic() < deadline:
            list(pool.map(probe, todo))
            todo = [(n, c) for n, c in todo if (n.name, c) not in seen]
            if todo:
                time.sleep(poll)
    return seen


def bench_issuance(
    fleet: Fleet, names: list[str], domains: dict[str, str], args: argparse.Namespace,
    poll: float,
) -> tuple[float, list[float], int]:  # fmt: skip
    """Force-renew `names` on node A; (seconds until every node serves every one,
    stored->served per certificate, certificates not served everywhere in time)."""
    old = {n: s for n, (s, _) in stored(fleet, names).items()}
    a = fleet["a"]
    started = time.time()
    renew = subprocess.Popen(
        a.agent_argv("renew", "--force", "-q", *names, "-c", str(a.config_path)),
        env=a.agent_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        seen = served_at(list(fleet), domains, old, args.sync_timeout + 120, poll)
    finally:
        renew.wait(60)
    now = stored(fleet, names)
    syncs: list[float] = []
    missing = 0
    last = started
    for name in names:
        times = [seen.get((node.name, name)) for node in fleet]
        if name not in now or any(t is None or t[0] != now[name][0] for t in times):
            missing += 1
            syncs.append(args.sync_timeout)
            continue
        served = max(t[1] for t in times if t is not None)
        last = max(last, served)
        syncs.append(max(served - now[name][1], 0.0))
    return last - started, syncs, missing


def setup_certificates(fleet: Fleet, names: list[str], domains: dict[str, str]) -> None:
    """First issuance on A alone (names pointed at A), then B and C start and push it;
    then every name is pointed at B and C for the measured renewals."""
    for d in domains.values():
        fleet.point(d, "a")
    fleet["a"].start_agent()
    deadline = time.monotonic() + 60 + len(names)
    while len(stored(fleet, names)) < len(names):
        if time.monotonic() > deadline:
            raise SystemExit(f"only {len(stored(fleet, names))} of {len(names)} issued")
        time.sleep(0.5)
    fleet.start_agents(["b", "c"])
    want = {n: s for n, (s, _) in stored(fleet, names).items()}
    others = [fleet["b"], fleet["c"]]
    deadline = time.monotonic() + 60 + len(names)
    for node in others:
        for n in names:
            while node.served_serial(domains[n]) != want[n]:
                if time.monotonic() > deadline:
                    raise SystemExit(f"node {node.name} does not serve {n} after start")
                time.sleep(0.1)
    for i, d in enumerate(domains.values()):
        fleet.point(d, "b" if i % 2 == 0 else "c")


def run_fleet(tmp: Path, args: argparse.Namespace, count: int) -> Fleet:
    names = [f"c{i:03d}" for i in range(count)]
    certs = [{"name": n, "domains": [f"{n}.fleet.test"]} for n in names]
    fleet = Fleet(
        tmp / f"fleet-{count}", args.haproxy, certs,
        daemon={"reconcile_interval": args.reconcile_interval},
        acme_extra={"max_concurrent_orders": args.max_orders}, acme_timeout=60,
        relays=not getattr(args, "direct", False),
    )  # fmt: skip
    fleet.start(start_agents=False)
    return fleet


# --- burst ------------------------------------------------------------------------------


def stored_serials(client: Any, namespace: str, names: Sequence[str]) -> dict[str, int]:
    """name -> serial of its `current` pointer in Redis now, in ONE pipelined round trip
    (the generation id ends with the serial in hex, agent.layout)."""
    from agent import layout

    pipe = client.pipeline(transaction=False)
    for n in names:
        pipe.hget(f"{namespace}:v:{layout.current_key(n)}", "d")
    out = {}
    for n, raw in zip(names, pipe.execute(), strict=True):
        if raw is not None and layout.is_generation_id(raw.decode()):
            out[n] = int(raw.decode().rsplit("-", 1)[1], 16)
    return out


def command_count(client: Any) -> int:
    """Commands Redis processed so far (INFO commandstats, every client)."""
    return sum(int(v["calls"]) for v in client.info("commandstats").values())


def bench_burst(tmp: Path, args: argparse.Namespace) -> float:
    """N certificates force-renewed at once on A; returns the fan-out ratio (see the doc)."""
    names = [f"c{i:03d}" for i in range(args.certs)]
    domains = {n: f"{n}.fleet.test" for n in names}
    fleet = run_fleet(tmp, args, args.certs)
    try:
        setup_certificates(fleet, names, domains)
        client = fleet.redis_client()
        old = stored_serials(client, fleet.namespace, names)
        nodes = list(fleet)
        a = fleet["a"]
        commands_before = command_count(client)
        trips_before = {n.name: n.relay.requests if n.relay else 0 for n in nodes}
        started = time.time()
        renew = subprocess.Popen(
            a.agent_argv("renew", "--force", "-q", *names, "-c", str(a.config_path)),
            env=a.agent_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        seen: dict[tuple[str, str], tuple[int, float]] = {}
        new: dict[str, int] = {}
        lock = threading.Lock()

        def probe(item: tuple[FleetNode, str]) -> None:
            node, name = item
            try:
                serial = node.served_serial(domains[name])
            except OSError:
                return
            if serial == new[name]:
                with lock:
                    seen.setdefault((node.name, name), (serial, time.time()))

        deadline = time.monotonic() + args.sync_timeout + 60 + 2 * len(names)
        try:
            with ThreadPoolExecutor(max_workers=8) as pool:
                while len(seen) < len(nodes) * len(names) and time.monotonic() < deadline:
                    waiting = [n for n in names if n not in new]
                    if waiting:
                        now = stored_serials(client, fleet.namespace, waiting)
                        new.update({n: s for n, s in now.items() if s != old.get(n)})
                    todo = [(node, n) for n in new for node in nodes if (node.name, n) not in seen]
                    list(pool.map(probe, todo))
                    time.sleep(0.05)
        finally:
            renew.wait(60)
        commands = command_count(client) - commands_before
        trips = {n.name: (n.relay.requests if n.relay else 0) - trips_before[n.name] for n in nodes}
        installed = {n: at for n, (_, at) in stored(fleet, names).items()}
        client.close()
    finally:
        fleet.stop()
    lag_a: list[float] = []
    lag_bc: list[float] = []
    missing = 0
    for n in names:
        t_a = seen.get(("a", n))
        t_bc = [seen.get((node, n)) for node in ("b", "c")]
        if n not in installed or t_a is None or any(t is None for t in t_bc):
            missing += 1
            continue
        lag_a.append(max(t_a[1] - installed[n], 0.0))
        lag_bc.append(max(max(t[1] for t in t_bc if t is not None) - installed[n], 0.0))
    if not lag_a:
        raise SystemExit(f"burst: no certificate served on every node ({missing} missing)")
    last = max(t for _, t in seen.values())
    print(f"burst_{args.certs}: renew --force on A until all served on 3 nodes "
          f"{last - started:.2f} s; not served everywhere in time: {missing}")  # fmt: skip
    for label, lags in (("A (own batch deploy)", lag_a), ("B and C (fan-out)", lag_bc)):
        print(f"  stored->served on {label}: p50 {statistics.median(lags):.3f} s, "
              f"max {max(lags):.3f} s")  # fmt: skip
    print(f"  Redis commands during the burst (all nodes, renewals included): {commands} "
          f"({commands / len(names):.1f} per certificate)")  # fmt: skip
    if any(trips.values()):  # not with --direct: no relay counts them
        per = ", ".join(f"{n} {t / len(names):.1f}" for n, t in sorted(trips.items()))
        print("  Redis round trips per certificate (requests through each node's relay, "
              f"heartbeats and challenge lookups included): {per}")  # fmt: skip
    ratio = max(lag_bc) / max(max(lag_a), 0.001)
    print(f"burst_fanout_s={max(lag_bc):.3f}")
    return ratio if not missing else float("inf")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("variant", nargs="?", choices=["all", "burst"], default="all",
                        help="all: (a) and (b); burst: only the N-certificate fan-out")
    parser.add_argument("--duration", type=int, default=5, help="wrk seconds per variant")
    parser.add_argument("--warmup", type=int, default=1, help="wrk seconds, 0 = none")
    parser.add_argument("--rounds", type=int, default=1, help="(a): interleaved rounds")
    parser.add_argument("--threads", type=int, default=2, help="wrk -t")
    parser.add_argument("--connections", type=int, default=50, help="wrk -c")
    parser.add_argument("--haproxy", default="/usr/sbin/haproxy")
    parser.add_argument("--certs", type=int, default=200, help="(b): certificates renewed at once")
    parser.add_argument("--max-orders", type=int, default=16, help="[acme] max_concurrent_orders")
    parser.add_argument("--sync-timeout", type=float, default=30.0,
                        help="s a node may take to serve a stored certificate")  # fmt: skip
    parser.add_argument("--reconcile-interval", default="30s",
                        help="[daemon] reconcile_interval of every node (production default)")
    parser.add_argument("--direct", action="store_true",
                        help="burst: nodes talk to Redis directly, not through the relays "
                        "this process runs (no per-node round-trip counts then)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="burst: run in (and keep) this directory, with every node's log")
    args = parser.parse_args(argv)
    version = subprocess.run(
        [args.haproxy, "-v"], capture_output=True, text=True, check=False
    ).stdout.split("\n")[0]
    print(f"# {version}; 3 nodes 127.0.0.2-4; {os.cpu_count()} CPUs; "
          f"wrk -t{args.threads} -c{args.connections} -d{args.duration}s x{args.rounds}; "
          f"reconcile_interval {args.reconcile_interval}", flush=True)  # fmt: skip
    if args.variant == "burst":
        if args.workdir is not None:  # kept: the nodes' logs
            args.workdir.mkdir(parents=True, exist_ok=True)
            ratio = bench_burst(args.workdir, args)
        else:
            with tempfile.TemporaryDirectory(prefix="bench-fleet-") as t:
                ratio = bench_burst(Path(t), args)
        print(f"burst_fanout_ratio={ratio:.2f}")
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as t:
        tmp = Path(t)
        # (a) and (b) with one certificate share a fleet.
        fleet = run_fleet(tmp, args, 1)
        try:
            setup_certificates(fleet, ["c000"], {"c000": "c000.fleet.test"})
            ratio = bench_challenges(fleet, tmp, args)
            one_total, one_sync, one_missing = bench_issuance(
                fleet, ["c000"], {"c000": "c000.fleet.test"}, args, poll=0.005
            )
        finally:
            fleet.stop()
        print(f"issuance_1: until served on 3 nodes {one_total:.2f} s, "
              f"stored->served {one_sync[0]:.3f} s"
              + (" (NOT served on every node in time)" if one_missing else ""))  # fmt: skip
        if args.certs > 0:
            names = [f"c{i:03d}" for i in range(args.certs)]
            domains = {n: f"{n}.fleet.test" for n in names}
            fleet = run_fleet(tmp, args, args.certs)
            try:
                setup_certificates(fleet, names, domains)
                total, syncs, missing = bench_issuance(fleet, names, domains, args, poll=0.05)
            finally:
                fleet.stop()
            q = statistics.quantiles(syncs, n=20) if len(syncs) > 1 else syncs * 19
            print(f"issuance_{args.certs}: until all served on 3 nodes {total:.2f} s; "
                  f"stored->served p50 {statistics.median(syncs):.3f} s, p95 {q[18]:.3f} s, "
                  f"max {max(syncs):.3f} s; not served everywhere in time: {missing}")  # fmt: skip
    print(f"challenge_ratio_vs_single_node={ratio:.2f}")
    print(f"fleet_sync_s={one_sync[0]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
