"""Agent CPU per NOTIFY, in process: `data_received` over a fake transport.

    python -m bench.spoa_cpu [--rounds 7] [--n 200000] [--batch 1] [--metrics] [--general]
                             [--profile]

Plays HAProxy's side of one connection (HELLO, then NOTIFYs of the shape
haproxy/spoe-acme.conf configures: message `acme-challenge`, one string
argument `token`, stream ids counting up like HAProxy 2.6's stream counter)
and times the agent's `data_received` for every NOTIFY. `--batch K` hands K
pipelined NOTIFYs to one `data_received` call, as HAProxy does under load.
`--metrics` wires the daemon's metrics (agent.metrics.Metrics) the way the
daemon does (its SpoaCounters; the agent counts into its own otherwise, at
the same cost). `--general` switches the fast path off. `--profile` prints
cProfile's top functions for one round instead. Half the NOTIFYs ask for
a pending token, half for an unknown one. Prints the best of `--rounds`
rounds in microseconds per NOTIFY (best of N: the machine is shared, the
minimum is the least disturbed round).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from typing import Any

from agent.challenges import MemoryChallengeRegistry
from agent.spoa import SpoaServer, _SpoaProtocol
from agent.spop import HaproxyHello, Message, Notify, encode_frame

TOKEN = "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0"
KEYAUTH = TOKEN + ".9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI"
UNKNOWN = "UnknownTokenUnknownTokenUnknownTokenUnknown"


class FakeTransport:
    """Collects writes; what uvloop's transport offers to the protocol."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def close(self) -> None:
        raise AssertionError("the agent closed the bench connection")

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def make_server(metrics: bool) -> SpoaServer:
    registry = MemoryChallengeRegistry()
    registry.add(TOKEN, KEYAUTH, time.time() + 3600)
    if not metrics:
        return SpoaServer(registry, port=0)
    from agent.metrics import Metrics

    # The daemon's wiring (agent.daemon.Daemon._make_spoa): the counters the
    # metrics collector reads at scrape time.
    return SpoaServer(registry, port=0, counters=Metrics(list).spoa)


def chunks(n: int, batch: int, first_stream: int = 5000) -> list[bytes]:
    frames = [
        encode_frame(
            Notify(
                first_stream + i,
                1,
                (Message("acme-challenge", (("token", TOKEN if i % 2 else UNKNOWN),)),),
            )
        )
        for i in range(n)
    ]
    return [b"".join(frames[i : i + batch]) for i in range(0, n, batch)]


def one_round(server: SpoaServer, data: list[bytes]) -> float:
    proto = _SpoaProtocol(server)
    proto.connection_made(FakeTransport())  # type: ignore[arg-type]
    hello = HaproxyHello(("2.0",), 16380, ("pipelining",), False, "bench")
    proto.data_received(encode_frame(hello))
    feed = proto.data_received
    started = time.perf_counter()
    for chunk in data:
        feed(chunk)
    elapsed = time.perf_counter() - started
    proto.connection_lost(None)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--metrics", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--general", action="store_true", help="no fast path")
    args = parser.parse_args()
    server = make_server(args.metrics)
    server.fast_path = not args.general
    data = chunks(args.n, args.batch)
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        one_round(server, data)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)
        return
    best = min(one_round(server, data) for _ in range(args.rounds))
    print(
        f"batch={args.batch} metrics={'on' if args.metrics else 'off'} "
        f"us_per_notify={best / args.n * 1e6:.2f}"
    )


if __name__ == "__main__":
    main()
