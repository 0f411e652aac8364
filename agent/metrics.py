"""Prometheus metrics and the small HTTP server that exposes them.

Certificate gauges are not kept as prometheus-client children: at scrape time
the daemon's current view of every certificate is rendered straight to the text
format (_CertificateText, byte for byte what prometheus-client would write, in
a fraction of its time), so 10,000 certificates cost nothing between scrapes
and can never go stale after a config reload drops a certificate. The SPOE
agent's hot-path metrics (challenges answered/unknown, the lookup-time
histogram, dropped peers) are plain integers on `agent.spoa.SpoaCounters`,
incremented by the agent and turned into metric families only at scrape time:
no Prometheus call per request. Event counters (renewals, ACME errors, deploy
errors) are ordinary prometheus-client objects on a registry of our own (not
the global one, so several agents can live in one test process).

Nothing here ever touches key material: labels are certificate names,
instance addresses, results and error types.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from agent.solvers import listen_to_challenge_results
from agent.spoa import LOOKUP_BUCKETS, SpoaCounters

log = logging.getLogger(__name__)

PREFIX = "haproxy_acme_"

# Registry lookups are in-process dictionary reads (or a shared store): the
# interesting range is tens of microseconds to a few milliseconds.
SPOE_BUCKETS = LOOKUP_BUCKETS


@dataclass(frozen=True)
class CertificateView:
    """What the metrics say about one certificate. Timestamps: UNIX seconds, UTC."""

    name: str
    not_before: float | None
    not_after: float | None
    next_renewal: float | None
    last_success: float | None
    # instance address -> served serial equals the stored one (what HAProxy serves now)
    in_sync: Mapping[str, bool]
    # instance ("disk" in reload mode) -> the serial last confirmed served by a
    # deploy there (the recorded fact, agent.certstate.Deployed) is the stored one
    deployed: Mapping[str, bool] = field(default_factory=dict)
    # One key of a dual certificate (config `keys`): its key_type ("rsa4096", "ec256"),
    # added as a `key_type` label; `name` is then the certificate's name in the config.
    # None (single-key certificates): no such label, the series stay as they were.
    key_type: str | None = None
    # Key rollover (agent/rollover.py), labelled by the current key's type
    # ("ec256", "rsa4096", ...); None: the certificate does not roll keys.
    keys: KeyView | None = None

    def labels(self, **more: str) -> dict[str, str]:
        """The sample labels: certificate (and key_type for a dual certificate's key)."""
        out = {"certificate": self.name}
        if self.key_type is not None:
            out["key_type"] = self.key_type
        return {**out, **more}


@dataclass(frozen=True)
class KeyView:
    """A certificate's key lifecycle for metrics: no key material, times in UNIX s.
    `state`: agent.rollover.STATE_CODES; `pinned`: the served key was announced
    (None: the certificate does not pin)."""

    key: str
    state: int
    announced_at: float | None
    scheduled_at: float | None
    announce_for: float
    pinned: bool | None
    # [fleet] a due scheduled switch waits for nodes lacking the next key
    # (agent.rollover.switch_hold); None: not in a fleet.
    waiting: bool | None = None


def _label_value(value: str) -> str:
    """A label value escaped as the text exposition format requires."""
    if "\\" in value or '"' in value or "\n" in value:
        value = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return value


def _gauge_head(name: str, help_text: str) -> str:
    help_text = help_text.replace("\\", "\\\\").replace("\n", "\\n")
    return f"# HELP {name} {help_text}\n# TYPE {name} gauge\n"


class _CertificateText:
    """The per-certificate gauges, rendered straight to the text exposition format.

    At 10,000 certificates these are about 60,000 samples; prometheus_client's
    generic rendering (a Sample, a label dict and their validation per sample)
    took 0.5-0.9 s of a scrape. Here each certificate's label string is built
    once per scrape and every line is one f-string: the same families, labels,
    values and value formatting (floatToGoString), in the same order.
    """

    # (metric name, help, CertificateView attribute): one sample per certificate
    # that has a value; all UNIX seconds.
    TIMESTAMPS = (
        ("certificate_expiration_timestamp_seconds", "notAfter of the installed certificate.",
         "not_after"),
        ("certificate_not_before_timestamp_seconds", "notBefore of the installed certificate.",
         "not_before"),
        ("certificate_renewal_timestamp_seconds", "Next planned renewal attempt.",
         "next_renewal"),
        ("last_success_timestamp_seconds", "Time of the last successful renewal.",
         "last_success"),
    )  # fmt: skip
    IN_SYNC = (
        "haproxy_in_sync",
        "1 when the HAProxy instance serves the stored certificate's serial, else 0.",
    )
    DEPLOYED = (
        "certificate_deployed",
        "1 when the last deploy confirmed that the instance serves the stored "
        "certificate's serial, else 0 (stored but not deployed there).",
    )
    KEY_STATE = (
        "key_rollover_state",
        "Key rollover state of the next key: 0 none (no next key, or not announced yet), "
        "1 announced (announce_for not over), 2 allowed (a switch may happen), "
        "3 switched (a previous key is still in its previous_pin_for grace period).",
    )
    KEY_ANNOUNCED = (
        "key_announced_timestamp_seconds",
        "When the next key was first shown by `pins` (its announcement; UNIX seconds).",
    )
    KEY_SCHEDULED = (
        "key_rollover_scheduled_timestamp_seconds",
        "When a switch to the next key was asked for (rollover_at or `keys rollover`; UNIX s).",
    )
    KEY_ANNOUNCE_FOR = (
        "key_announce_for_seconds",
        "The configured announce_for: how long a next key must be announced before a switch.",
    )
    KEY_PINNED = (
        "key_served_pinned",
        "1 when the stored (served) certificate's key was announced (the configured key "
        "before any switch, a backup pin, or an announced next key), else 0.",
    )

    KEY_WAITING = (
        "key_rollover_waiting",
        "[fleet] 1 while a due scheduled key switch waits for live nodes that do not "
        "hold the next key (the log and `status` name them), else 0.",
    )

    def __init__(self, source: Callable[[], Iterable[CertificateView]]) -> None:
        self._source = source

    def render(self) -> str:
        try:
            views = list(self._source())
        except Exception:  # a scrape must never take the agent down
            log.exception("metrics: reading certificate state failed")
            views = []
        go: Callable[[float], str] = floatToGoString  # untyped in prometheus_client
        # Each certificate's labels, escaped once: `certificate` in front and
        # `key_type` (a dual certificate's key) behind any other label, as
        # prometheus_client sorts label names.
        rows = []
        for v in views:
            head = f'certificate="{_label_value(v.name)}"'
            tail = "" if v.key_type is None else f',key_type="{_label_value(v.key_type)}"'
            rows.append((v, head, tail))
        out: list[str] = []
        for short, help_text, attr in self.TIMESTAMPS:
            name = PREFIX + short
            out.append(_gauge_head(name, help_text + " (UNIX seconds)"))
            for v, head, tail in rows:
                value = getattr(v, attr)
                if value is not None:
                    out.append(f"{name}{{{head}{tail}}} {go(value)}\n")
        for (short, help_text), attr in ((self.IN_SYNC, "in_sync"), (self.DEPLOYED, "deployed")):
            name = PREFIX + short
            out.append(_gauge_head(name, help_text))
            for v, head, tail in rows:
                for instance, ok in getattr(v, attr).items():
                    out.append(
                        f'{name}{{{head},instance="{_label_value(instance)}"{tail}}} '
                        f"{'1.0' if ok else '0.0'}\n"
                    )
        keyed = [
            (v.keys, f'{head},key="{_label_value(v.keys.key)}"{tail}')
            for v, head, tail in rows
            if v.keys is not None
        ]
        families: tuple[tuple[tuple[str, str], Callable[[KeyView], float | bool | None]], ...] = (
            (self.KEY_STATE, lambda k: float(k.state)),
            (self.KEY_ANNOUNCED, lambda k: k.announced_at),
            (self.KEY_SCHEDULED, lambda k: k.scheduled_at),
            (self.KEY_ANNOUNCE_FOR, lambda k: k.announce_for),
            (self.KEY_PINNED, lambda k: k.pinned),
            (self.KEY_WAITING, lambda k: k.waiting),
        )
        for (short, help_text), value_of in families:
            name = PREFIX + short
            out.append(_gauge_head(name, help_text))
            for k, lk in keyed:
                value = value_of(k)
                if value is not None:
                    out.append(f"{name}{{{lk}}} {go(float(value))}\n")
        return "".join(out)


class _SpoaCollector(Collector):
    """Reads SpoaCounters at scrape time (from the scrape thread; see SpoaCounters)."""

    def __init__(
        self,
        counters: SpoaCounters,
        validations: dict[tuple[str, str], int],
        validations_lock: threading.Lock,
    ) -> None:
        self._counters = counters
        self._validations = validations
        self._validations_lock = validations_lock

    def collect(self) -> Iterator[Metric]:
        c = self._counters
        challenges = CounterMetricFamily(
            PREFIX + "challenges",
            "Challenges by type (http-01, dns-01, dns-persist-01) and result: answered or "
            "unknown (http-01 requests asked of the SPOE agent); valid, invalid or error "
            "(authorizations the agent had validated, per challenge type).",
            labels=["type", "result"],
        )
        challenges.add_metric(["http-01", "answered"], c.answered)
        challenges.add_metric(["http-01", "unknown"], c.unknown)
        with self._validations_lock:
            outcomes = sorted(self._validations.items())
        for (challenge_type, result), count in outcomes:
            challenges.add_metric([challenge_type, result], count)
        yield challenges
        counts = list(c.lookup_buckets)  # one snapshot: buckets and count agree
        cumulative: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip(LOOKUP_BUCKETS, counts, strict=False):
            running += count
            cumulative.append((floatToGoString(bound), running))  # type: ignore[no-untyped-call]
        cumulative.append(("+Inf", running + counts[-1]))
        yield HistogramMetricFamily(
            PREFIX + "spoe_request_duration_seconds",
            "Time the SPOE agent's challenge-registry lookup took for one NOTIFY, in seconds "
            "(NOTIFYs of one read: their mean).",
            buckets=cumulative,
            sum_value=c.lookup_seconds,
        )
        drops = CounterMetricFamily(
            PREFIX + "spoe_dropped_peers",
            "Connections the SPOE agent closed on a peer, by reason (malformed, hello_deadline, "
            "peer_limit, evicted, refused, idle_timeout).",
            labels=["reason"],
        )
        for reason, count in list(c.drops.items()):
            drops.add_metric([reason], count)
        yield drops


class _RateLimitCollector(Collector):
    """One sample per CA directory with a recorded rate-limit hold: when it ends."""

    def __init__(self, source: Callable[[], Mapping[str, float]]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            PREFIX + "rate_limited_until_timestamp_seconds",
            "End of the CA's hold on new orders after a rateLimited answer (UNIX s); "
            "the hold is on while this is above time().",
            labels=["directory"],
        )
        for directory, until in sorted(self._source().items()):
            family.add_metric([directory], until)
        yield family


class _FleetCollector(Collector):
    """[fleet]: the fleet as this node last read it (agent.fleet_sync.FleetView, or
    None without [fleet]: then no fleet metric at all). No Redis I/O at scrape time.

    Every node exports the fleet-wide families (nodes, node_up, node_in_sync)
    from the same heartbeats: aggregate with max by (certificate, node)."""

    def __init__(self, source: Callable[[], Any]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        try:
            view = self._source()
        except Exception:
            log.exception("metrics: reading the fleet view failed")
            return
        if view is None:
            return
        up = GaugeMetricFamily(
            PREFIX + "fleet_redis_up",
            "1 when this node's last read of the fleet's Redis worked (and its "
            "certificate-changed subscription is up), else 0.",
            labels=["node"],
        )
        up.add_metric([view.node], 1.0 if view.redis_up else 0.0)
        yield up
        alive = [n for n in view.nodes if n.get("alive")]
        nodes = GaugeMetricFamily(
            PREFIX + "fleet_nodes", "Nodes of the fleet whose heartbeat is current."
        )
        nodes.add_metric([], float(len(alive)))
        yield nodes
        node_up = GaugeMetricFamily(
            PREFIX + "fleet_node_up",
            "1 while the node's heartbeat is current, 0 for a node that beat once and stopped.",
            labels=["node"],
        )
        for n in view.nodes:
            node_up.add_metric([str(n["node"])], 1.0 if n.get("alive") else 0.0)
        yield node_up
        in_sync = GaugeMetricFamily(
            PREFIX + "fleet_node_in_sync",
            "1 when the alive node's HAProxy serves the stored serial of the certificate "
            "(from its heartbeat), else 0.",
            labels=["certificate", "node"],
        )
        for (cert, node), ok in sorted(view.in_sync().items()):
            in_sync.add_metric([cert, node], 1.0 if ok else 0.0)
        yield in_sync
        mismatch = GaugeMetricFamily(
            PREFIX + "fleet_key_mismatch",
            "1 when this node refuses to deploy the stored certificate because its key "
            "file does not match the certificate's public key, else 0.",
            labels=["certificate", "node"],
        )
        for cert, bad in sorted(view.key_mismatch.items()):
            mismatch.add_metric([cert, view.node], 1.0 if bad else 0.0)
        yield mismatch


class Metrics:
    """All metrics of one agent process, on a registry of its own."""

    def __init__(
        self,
        certificates: Callable[[], Iterable[CertificateView]],
        rate_limits: Callable[[], Mapping[str, float]] | None = None,
        fleet: Callable[[], Any] | None = None,
    ) -> None:
        # Every family but the per-certificate gauges, which render themselves
        # (_CertificateText) in front of this registry's text.
        self.registry = CollectorRegistry(auto_describe=False)
        self._certificates = _CertificateText(certificates)
        if rate_limits is not None:
            self.registry.register(_RateLimitCollector(rate_limits))
        if fleet is not None:
            self.registry.register(_FleetCollector(fleet))
        self.renewals = Counter(
            PREFIX + "renewals",
            "Renewal attempts by result (success or failure).",
            ["certificate", "result"],
            registry=self.registry,
        )
        # The SPOE agent's counts: pass to SpoaServer(counters=...) (the daemon does).
        self.spoa = SpoaCounters()
        # Authorization outcomes per challenge type (issuer hook, worker threads).
        self.validations: dict[tuple[str, str], int] = {}
        self._validations_lock = threading.Lock()
        self.registry.register(_SpoaCollector(self.spoa, self.validations, self._validations_lock))
        self.acme_errors = Counter(
            PREFIX + "acme_errors",
            "ACME failures by error type (e.g. rateLimited, connection, badNonce).",
            ["type"],
            registry=self.registry,
        )
        self.deploy_errors = Counter(
            PREFIX + "deploy_errors",
            "Failed pushes of a certificate to an HAProxy instance.",
            ["certificate", "instance"],
            registry=self.registry,
        )
        self.fenced_installs = Counter(
            PREFIX + "fleet_fenced_installs",
            "Installs this node refused because its lock lease was lost or a newer "
            "holder (higher fencing number) installed since.",
            ["certificate", "node"],
            registry=self.registry,
        )
        self.renewals_skipped = Counter(
            PREFIX + "fleet_renewals_skipped",
            "Renewal runs skipped because the fleet store (Redis) could not be reached.",
            ["certificate"],
            registry=self.registry,
        )
        listen_to_challenge_results(self.observe_validation)

    def observe_challenge(self, result: str, seconds: float) -> None:
        """One challenge lookup with its result and duration, for callers outside the
        SPOA (the SPOA itself increments `self.spoa` directly)."""
        self.spoa.count_result(result, seconds)

    def observe_validation(self, challenge_type: str, result: str) -> None:
        """Issuer hook (via agent.solvers): one authorization's outcome."""
        with self._validations_lock:
            key = (challenge_type, result)
            self.validations[key] = self.validations.get(key, 0) + 1

    def render(self) -> bytes:
        """The Prometheus text exposition (format 0.0.4) of every metric."""
        return self._certificates.render().encode() + generate_latest(self.registry)


class MetricsServer:
    """HTTP on loopback by default: GET /metrics (Prometheus text) and /healthz.

    `healthy` decides /healthz: 200 "ok" when it returns True, 503 otherwise;
    `degraded()` (if given) returning a reason turns a healthy "ok" into 200
    "degraded: <reason>" (the node serves, something it depends on is away).
    One short request per connection; requests larger than 8 KiB or slower
    than 5 s are dropped.
    """

    def __init__(
        self,
        metrics: Metrics,
        host: str,
        port: int,
        healthy: Callable[[], bool],
        degraded: Callable[[], str | None] | None = None,
    ) -> None:
        self._metrics = metrics
        self._host = host
        self._port = port
        self._healthy = healthy
        self._degraded = degraded
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self._host, self._port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5.0)
            if len(head) > 8192:
                return
            parts = head.split(b"\r\n", 1)[0].split(b" ")
            method = parts[0] if parts else b""
            path = parts[1].split(b"?", 1)[0] if len(parts) > 1 else b""
            if method not in (b"GET", b"HEAD"):
                status, ctype, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
            elif path == b"/metrics":
                body = await asyncio.to_thread(self._metrics.render)
                status, ctype = "200 OK", CONTENT_TYPE_LATEST
            elif path == b"/healthz":
                ok = self._healthy()
                status = "200 OK" if ok else "503 Service Unavailable"
                ctype, body = "text/plain", b"ok\n" if ok else b"unhealthy\n"
                reason = self._degraded() if ok and self._degraded is not None else None
                if reason:
                    body = f"degraded: {reason}\n".encode()
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"not found\n"
            header = (
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode()
            writer.write(header if method == b"HEAD" else header + body)
            await writer.drain()
        except (
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            TimeoutError,
            ConnectionError,
        ):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()
