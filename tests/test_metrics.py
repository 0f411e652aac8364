"""Metric names and values, and the /metrics + /healthz HTTP endpoint."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from agent.metrics import PREFIX, CertificateView, KeyView, Metrics, MetricsServer, _CertificateText


def _views() -> list[CertificateView]:
    return [
        CertificateView("www", 1000.0, 2000.0, 1700.0, 900.0, {"unix:/a.sock": True}),
        CertificateView("api", None, None, 50.0, None, {"unix:/a.sock": False}),
    ]


def _sample(text: str, prefix: str) -> float:
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {prefix!r} in\n{text}")


def test_certificate_gauges_report_each_certificate_from_the_current_view() -> None:
    text = Metrics(_views).render().decode()
    p = "haproxy_acme_"
    assert _sample(text, p + 'certificate_expiration_timestamp_seconds{certificate="www"}') == 2000
    assert _sample(text, p + 'certificate_not_before_timestamp_seconds{certificate="www"}') == 1000
    assert _sample(text, p + 'certificate_renewal_timestamp_seconds{certificate="api"}') == 50
    assert _sample(text, p + 'last_success_timestamp_seconds{certificate="www"}') == 900
    assert _sample(text, p + 'haproxy_in_sync{certificate="www",instance="unix:/a.sock"}') == 1
    assert _sample(text, p + 'haproxy_in_sync{certificate="api",instance="unix:/a.sock"}') == 0
    # a certificate with no installed cert has no expiration sample at all
    assert 'expiration_timestamp_seconds{certificate="api"}' not in text


def test_a_certificate_dropped_from_the_view_disappears_from_the_next_scrape() -> None:
    views = _views()
    metrics = Metrics(lambda: views)
    assert 'certificate="api"' in metrics.render().decode()
    views.pop()
    assert 'certificate="api"' not in metrics.render().decode()


def test_event_counters_and_spoe_histogram_are_exported_under_fixed_names() -> None:
    metrics = Metrics(list)
    metrics.observe_challenge("answered", 0.0002)
    metrics.observe_challenge("unknown", 0.0001)
    metrics.observe_challenge("unknown", 0.0001)
    metrics.renewals.labels("www", "failure").inc()
    metrics.acme_errors.labels("rateLimited").inc()
    text = metrics.render().decode()
    assert _sample(text, 'haproxy_acme_challenges_total{result="answered",type="http-01"}') == 1
    assert _sample(text, 'haproxy_acme_challenges_total{result="unknown",type="http-01"}') == 2
    assert _sample(text, 'haproxy_acme_renewals_total{certificate="www",result="failure"}') == 1
    assert _sample(text, 'haproxy_acme_acme_errors_total{type="rateLimited"}') == 1
    assert _sample(text, "haproxy_acme_spoe_request_duration_seconds_count") == 3


def test_challenge_outcomes_are_counted_per_challenge_type() -> None:
    from agent.solvers import count_challenge

    metrics = Metrics(list)
    count_challenge("dns-01", "valid")
    count_challenge("dns-01", "valid")
    count_challenge("dns-persist-01", "invalid")
    count_challenge("dns-01", "error")
    text = metrics.render().decode()
    assert _sample(text, 'haproxy_acme_challenges_total{result="valid",type="dns-01"}') == 2
    assert (
        _sample(text, 'haproxy_acme_challenges_total{result="invalid",type="dns-persist-01"}') == 1
    )
    assert _sample(text, 'haproxy_acme_challenges_total{result="error",type="dns-01"}') == 1


def test_a_failing_state_source_does_not_break_the_scrape() -> None:
    def broken() -> list[CertificateView]:
        raise RuntimeError("boom")

    text = Metrics(broken).render().decode()
    assert "haproxy_acme_challenges_total" in text


def test_http_endpoint_serves_metrics_and_health_on_loopback() -> None:
    healthy = [True]

    async def scenario() -> tuple[int, str, int, int]:
        server = MetricsServer(Metrics(_views), "127.0.0.1", 0, lambda: healthy[0])
        await server.start()
        base = f"http://127.0.0.1:{server.port}"

        def get(path: str) -> tuple[int, str]:
            try:
                with urllib.request.urlopen(base + path, timeout=5) as r:
                    return r.status, r.read().decode()
            except urllib.error.HTTPError as e:
                return e.code, ""

        status, body = await asyncio.to_thread(get, "/metrics")
        ok, _ = await asyncio.to_thread(get, "/healthz")
        healthy[0] = False
        bad, _ = await asyncio.to_thread(get, "/healthz")
        await server.stop()
        return status, body, ok, bad

    status, body, ok, bad = asyncio.run(scenario())
    assert status == 200
    assert 'haproxy_acme_certificate_expiration_timestamp_seconds{certificate="www"} 2000.0' in body
    assert (ok, bad) == (200, 503)


def test_stored_but_not_deployed_is_its_own_gauge() -> None:
    views = [
        CertificateView("www", 1000.0, 2000.0, 1700.0, 900.0, {"unix:/a.sock": True},
                        deployed={"unix:/a.sock": True, "unix:/b.sock": False}),
        CertificateView("api", 1000.0, 2000.0, 1700.0, 900.0, {}, deployed={"disk": False}),
    ]  # fmt: skip
    text = Metrics(lambda: views).render().decode()
    p = "haproxy_acme_certificate_deployed"
    assert _sample(text, p + '{certificate="www",instance="unix:/a.sock"}') == 1
    assert _sample(text, p + '{certificate="www",instance="unix:/b.sock"}') == 0
    assert _sample(text, p + '{certificate="api",instance="disk"}') == 0


# -- the per-certificate text against prometheus_client's own rendering -------------

_label_text = st.text(alphabet=st.sampled_from('ab.-_*"\\\nßé:/'), min_size=1, max_size=8)
_stamp = st.one_of(
    st.none(),
    st.floats(min_value=0, max_value=4e9),
    st.integers(0, 10**10).map(float),
    st.sampled_from([1e-7, 1e21, float("inf")]),
)
_key_view = st.builds(
    KeyView,
    key=st.one_of(st.sampled_from(["ec256", "rsa4096"]), _label_text),
    state=st.integers(0, 3),
    announced_at=_stamp,
    scheduled_at=_stamp,
    announce_for=st.floats(min_value=0, max_value=1e8),
    pinned=st.one_of(st.none(), st.booleans()),
    waiting=st.one_of(st.none(), st.booleans()),
)
_view = st.builds(
    CertificateView,
    name=_label_text,
    not_before=_stamp,
    not_after=_stamp,
    next_renewal=_stamp,
    last_success=_stamp,
    in_sync=st.dictionaries(_label_text, st.booleans(), max_size=3),
    deployed=st.dictionaries(_label_text, st.booleans(), max_size=3),
    key_type=st.one_of(st.none(), st.just("ec256"), _label_text),
    keys=st.one_of(st.none(), _key_view),
)


def _reference_text(views: list[CertificateView]) -> bytes:
    """The per-certificate families built as prometheus_client families and rendered
    by its generate_latest: what _CertificateText must produce byte for byte."""
    t = _CertificateText
    families: list[GaugeMetricFamily] = []

    def family(short: str, help_text: str) -> GaugeMetricFamily:
        families.append(GaugeMetricFamily(PREFIX + short, help_text))
        return families[-1]

    for short, help_text, attr in t.TIMESTAMPS:
        f = family(short, help_text + " (UNIX seconds)")
        for v in views:
            if getattr(v, attr) is not None:
                f.samples.append(Sample(f.name, v.labels(), getattr(v, attr)))
    for (short, help_text), attr in ((t.IN_SYNC, "in_sync"), (t.DEPLOYED, "deployed")):
        f = family(short, help_text)
        for v in views:
            for instance, ok in getattr(v, attr).items():
                f.samples.append(Sample(f.name, v.labels(instance=instance), float(ok)))
    keyed = [(v, v.keys) for v in views if v.keys is not None]
    for (short, help_text), value_of in (
        (t.KEY_STATE, lambda k: float(k.state)),
        (t.KEY_ANNOUNCED, lambda k: k.announced_at),
        (t.KEY_SCHEDULED, lambda k: k.scheduled_at),
        (t.KEY_ANNOUNCE_FOR, lambda k: k.announce_for),
        (t.KEY_PINNED, lambda k: None if k.pinned is None else float(k.pinned)),
        (t.KEY_WAITING, lambda k: None if k.waiting is None else float(k.waiting)),
    ):
        f = family(short, help_text)
        for v, k in keyed:
            value = value_of(k)
            if value is not None:
                f.samples.append(Sample(f.name, v.labels(key=k.key), value))

    class Families:
        def collect(self) -> list[GaugeMetricFamily]:
            return families

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Families())  # type: ignore[arg-type]
    return generate_latest(registry)


@settings(max_examples=200, deadline=None)
@given(st.lists(_view, max_size=6))
def test_certificate_gauges_render_exactly_as_prometheus_client_would(
    views: list[CertificateView],
) -> None:
    assert _CertificateText(lambda: views).render().encode() == _reference_text(views)


def test_certificate_gauges_parse_back_with_escaped_labels() -> None:
    odd = 'we"ird\\na\nme'
    views = [CertificateView(odd, 1.0, 2e9, None, None, {'unix:/"x"': True}, key_type="ec256")]
    text = Metrics(lambda: views).render().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    (sample,) = families[PREFIX + "haproxy_in_sync"].samples
    assert sample.labels == {"certificate": odd, "instance": 'unix:/"x"', "key_type": "ec256"}
    (expiry,) = families[PREFIX + "certificate_expiration_timestamp_seconds"].samples
    assert expiry.value == 2e9
