"""Prometheus metrics: exact counts after known traffic, the deliveries gauge,
a store that is down at scrape time, access, config, registries, plans.

Every scrape is parsed with prometheus_client's own parser and compared whole:
a series that should be zero is asserted zero, and a series that should not
exist is asserted absent.
"""

from __future__ import annotations

import importlib
import logging
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask, redirect
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.test import Client

from flask_orderhooks import ConfigurationError, OrderHooks, get_extension
from flask_orderhooks.metrics import (
    ANSWER_STATUSES,
    COUNTED_STATUSES,
    DEFAULT_BUCKETS,
    Metrics,
    get_metrics,
    init_metrics,
)
from flask_orderhooks.testing import SignedCallback, build
from tests.conftest import BASE_CONFIG, Recorder, private_schema

ROOT = Path(__file__).resolve().parents[1]
ALERTS = ROOT / "docs" / "prometheus-alerts.yml"
DOCS = ROOT / "docs" / "metrics.rst"

RecorderFactory = Callable[..., tuple[Flask, Recorder]]
#: ``(name, sorted label items)`` → value, ``_created`` samples left out.
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

ROUTES = (
    ("gateway", "collect"),
    ("gateway", "payout"),
    ("igv", "order-status"),
    ("sud", "order-changed"),
)
FAMILIES = (
    "orderhooks_requests",
    "orderhooks_dispatch_seconds",
    "orderhooks_attempts",
    "orderhooks_deliveries",
    "orderhooks_store_up",
)


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in samples, f"the series {key} is exposed twice"
            samples[key] = sample.value
    return samples


def scrape(app: Flask, path: str = "/metrics", **environ: str) -> Samples:
    response = app.test_client().get(path, environ_base=environ)
    assert response.status_code == 200, response.text
    assert response.content_type == "text/plain; version=0.0.4; charset=utf-8"
    return parse(response.text)


def by_route(samples: Samples, name: str, label: str) -> dict[tuple[str, str, str], float]:
    """``(provider, callback, <label>)`` → value of every ``name`` sample."""
    found = {}
    for (sample, labels), value in samples.items():
        if sample == name:
            d = dict(labels)
            found[(d["provider"], d["callback"], d[label])] = value
    return found


def requests(samples: Samples) -> dict[tuple[str, str, str], float]:
    return by_route(samples, "orderhooks_requests_total", "code")


def dispatches(samples: Samples) -> dict[tuple[str, str, str], float]:
    return by_route(samples, "orderhooks_dispatch_seconds_count", "outcome")


def attempts(samples: Samples) -> dict[tuple[str, str, str], float]:
    return by_route(samples, "orderhooks_attempts_total", "outcome")


def deliveries(samples: Samples) -> dict[str, float]:
    return {
        dict(labels)["status"]: value
        for (name, labels), value in samples.items()
        if name == "orderhooks_deliveries"
    }


def zeros(label_values: tuple[str, ...]) -> dict[tuple[str, str, str], float]:
    return {(p, c, v): 0.0 for p, c in ROUTES for v in label_values}


CODES = tuple(str(s) for s in ANSWER_STATUSES)
OUTCOMES = ("done", "failed")


def make(kind: str, app: Flask, **fields: Any) -> SignedCallback:
    with app.app_context():
        return build(kind, app=app, **fields)


def post(
    app: Flask,
    cb: SignedCallback,
    *,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> int:
    response = app.test_client().post(
        cb.url(), data=cb.body if body is None else body, headers={**cb.headers, **(headers or {})}
    )
    return response.status_code


# -- exact counts after known traffic, on every backend -------------------------------


def test_counts_every_answer_and_dispatch_exactly(recorder: RecorderFactory) -> None:
    app, rec = recorder(ORDERHOOKS_METRICS_URL="/metrics")
    before = scrape(app)
    assert requests(before) == zeros(CODES)
    assert dispatches(before) == zeros(OUTCOMES)
    assert attempts(before) == zeros(OUTCOMES)
    assert deliveries(before) == dict.fromkeys(COUNTED_STATUSES, 0.0)
    assert before[("orderhooks_store_up", ())] == 1.0

    igv = [make("igv", app) for _ in range(3)]
    for cb in igv:
        assert post(app, cb) == 200
    for cb in igv[:2]:
        assert post(app, cb) == 200  # duplicates: answered, not dispatched
    assert post(app, igv[0], headers={"X-Signature": "0" * 64}) == 401
    # iGV signs the headers, not the body: a signed request with a broken body.
    assert post(app, make("igv", app), body=b"{") == 400
    rec.fail_next = 1
    retried = make("igv", app)
    assert post(app, retried) == 500
    assert post(app, retried) == 200  # the platform's resend
    collects = [make("collect", app) for _ in range(2)]
    assert post(app, collects[0]) == 200
    rec.fail_next = 1
    assert post(app, collects[1]) == 500  # stays failed: no resend
    assert post(app, make("sud", app)) == 200

    after = scrape(app)
    assert requests(after) == {
        **zeros(CODES),
        ("igv", "order-status", "200"): 6.0,
        ("igv", "order-status", "400"): 1.0,
        ("igv", "order-status", "401"): 1.0,
        ("igv", "order-status", "500"): 1.0,
        ("gateway", "collect", "200"): 1.0,
        ("gateway", "collect", "500"): 1.0,
        ("sud", "order-changed", "200"): 1.0,
    }
    assert dispatches(after) == {
        **zeros(OUTCOMES),
        ("igv", "order-status", "done"): 4.0,
        ("igv", "order-status", "failed"): 1.0,
        ("gateway", "collect", "done"): 1.0,
        ("gateway", "collect", "failed"): 1.0,
        ("sud", "order-changed", "done"): 1.0,
    }
    # The histogram's last bucket holds every observation.
    counts = dispatches(after)
    infinite = {
        (d["provider"], d["callback"], d["outcome"]): value
        for (name, labels), value in after.items()
        if name == "orderhooks_dispatch_seconds_bucket" and (d := dict(labels))["le"] == "+Inf"
    }
    assert infinite == counts
    assert attempts(after) == zeros(OUTCOMES)  # no worker ran
    assert deliveries(after) == {"pending": 0.0, "processing": 0.0, "failed": 1.0, "dead": 0.0}
    assert after[("orderhooks_store_up", ())] == 1.0
    assert len(rec.events) == 8  # 5 igv dispatches, 2 collect, 1 sud


def test_counts_worker_attempts_and_every_counted_status(recorder: RecorderFactory) -> None:
    app, rec = recorder(
        ORDERHOOKS_METRICS_URL="/metrics",
        ORDERHOOKS_DISPATCH="deferred",
        ORDERHOOKS_RETRY_DELAYS=[],  # one attempt, then dead
    )
    hooks = get_extension(app)
    for _ in range(3):
        assert post(app, make("igv", app)) == 200
    stored = scrape(app)
    assert deliveries(stored) == {"pending": 3.0, "processing": 0.0, "failed": 0.0, "dead": 0.0}
    assert requests(stored) == {**zeros(CODES), ("igv", "order-status", "200"): 3.0}
    assert dispatches(stored) == zeros(OUTCOMES)  # deferred: nothing ran in the request

    seen_during: list[dict[str, int]] = []
    metrics = get_metrics(app)
    # Read while the first receiver runs: its claim is committed, the row is
    # processing.
    rec.hook = lambda event: seen_during.append(metrics.store_collector.count())
    rec.fail_next = 1
    with app.app_context():
        assert hooks.process_due() == 3
    rec.hook = None
    assert seen_during[0] == {"processing": 1, "pending": 2}

    drained = scrape(app)
    assert attempts(drained) == {
        **zeros(OUTCOMES),
        ("igv", "order-status", "done"): 2.0,
        ("igv", "order-status", "failed"): 1.0,
    }
    assert dispatches(drained) == {
        **zeros(OUTCOMES),
        ("igv", "order-status", "done"): 2.0,
        ("igv", "order-status", "failed"): 1.0,
    }
    assert deliveries(drained) == {"pending": 0.0, "processing": 0.0, "failed": 0.0, "dead": 1.0}
    assert requests(drained) == requests(stored)  # workers answer no request


# -- a small app of the extension's own store (SQLite), for the rest ---------------


@pytest.fixture
def make_own(tmp_path: Path) -> Iterator[Callable[..., tuple[Flask, OrderHooks]]]:
    """``make_own(**config)`` → an app on a SQLite store of the extension's own,
    with ``ORDERHOOKS_METRICS_URL="/metrics"`` unless the config says otherwise."""
    made: list[tuple[Flask, OrderHooks]] = []

    def factory(**config: Any) -> tuple[Flask, OrderHooks]:
        app = Flask("metrics_test", instance_path=str(tmp_path / "instance"))
        app.config.update(BASE_CONFIG)
        app.config["ORDERHOOKS_DATABASE_URI"] = f"sqlite:///{tmp_path / f'own{len(made)}.db'}"
        app.config["ORDERHOOKS_METRICS_URL"] = "/metrics"
        app.config.update(config)
        hooks = OrderHooks(app)
        made.append((app, hooks))
        return app, hooks

    yield factory
    for app, hooks in made:
        standalone = hooks.state(app).standalone
        assert standalone is not None
        standalone.engine.dispose()


@pytest.fixture
def receiver() -> Iterator[Callable[[Flask], None]]:
    from flask_orderhooks import order_pending_delivery

    connected: list[tuple[Any, Flask]] = []

    def connect(app: Flask) -> None:
        def receive(sender: Flask, **kwargs: Any) -> None:
            pass

        order_pending_delivery.connect(receive, app, weak=False)
        connected.append((receive, app))

    yield connect
    for fn, app in connected:
        order_pending_delivery.disconnect(fn, app)


def test_a_store_down_at_scrape_time_leaves_the_gauge_out(
    make_own: Callable[..., tuple[Flask, OrderHooks]],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    missing = tmp_path / "not-yet"
    app, _ = make_own(ORDERHOOKS_DATABASE_URI=f"sqlite:///{missing / 'store.db'}")
    with caplog.at_level(logging.WARNING, "flask_orderhooks"):
        down = scrape(app)
    assert down[("orderhooks_store_up", ())] == 0.0
    assert deliveries(down) == {}
    assert requests(down) == {
        (p, c, code): 0.0 for p, c in ROUTES for code in CODES
    }  # the rest of the scrape is whole
    assert [r.getMessage() for r in caplog.records] == [
        "OrderHooks metrics: could not count the deliveries (OperationalError: unable to "
        "open database file); orderhooks_deliveries is left out of this scrape and "
        "orderhooks_store_up is 0."
    ]
    missing.mkdir()
    back = scrape(app)
    assert back[("orderhooks_store_up", ())] == 1.0
    assert deliveries(back) == dict.fromkeys(COUNTED_STATUSES, 0.0)


@pytest.mark.postgres
def test_a_postgresql_store_that_refuses_connections_fails_no_scrape(
    make_own: Callable[..., tuple[Flask, OrderHooks]], caplog: pytest.LogCaptureFixture
) -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Nothing listens there now: every connection is refused at once.
    app, _ = make_own(ORDERHOOKS_DATABASE_URI=f"postgresql+psycopg://postgres@127.0.0.1:{port}/x")
    with caplog.at_level(logging.WARNING, "flask_orderhooks"):
        samples = scrape(app)
    assert samples[("orderhooks_store_up", ())] == 0.0
    assert deliveries(samples) == {}
    (message,) = [r.getMessage() for r in caplog.records]
    assert message.startswith("OrderHooks metrics: could not count the deliveries (")
    assert "Connection refused" in message


# -- access ------------------------------------------------------------------------------


def test_loopback_only_by_default_and_a_refusal_names_the_fix(
    make_own: Callable[..., tuple[Flask, OrderHooks]], caplog: pytest.LogCaptureFixture
) -> None:
    app, _ = make_own()
    client = app.test_client()
    assert client.get("/metrics").status_code == 200
    assert client.get("/metrics", environ_base={"REMOTE_ADDR": "::1"}).status_code == 200
    with caplog.at_level(logging.WARNING, "flask_orderhooks"):
        refused = client.get("/metrics", environ_base={"REMOTE_ADDR": "203.0.113.9"})
    assert refused.status_code == 403
    assert refused.text == "Not allowed to read the metrics; see the server log.\n"
    assert [r.getMessage() for r in caplog.records] == [
        "OrderHooks metrics: refused /metrics from 203.0.113.9: the address is not in "
        "ORDERHOOKS_METRICS_ALLOWED_IPS and the @hooks.console_access function did not "
        "return True. Add the scraper's address or network to ORDERHOOKS_METRICS_ALLOWED_IPS "
        "(behind a proxy, see ProxyFix)."
    ]
    assert client.post("/metrics").status_code == 405


@pytest.mark.parametrize(
    "header", ["X-Forwarded-For", "Forwarded", "X-Real-IP"], ids=["xff", "forwarded", "real-ip"]
)
def test_loopback_behind_a_proxy_the_app_does_not_resolve_is_refused(
    make_own: Callable[..., tuple[Flask, OrderHooks]],
    caplog: pytest.LogCaptureFixture,
    header: str,
) -> None:
    """nginx on the same machine forwards every outside client from
    127.0.0.1: without ProxyFix the default loopback list would open the
    scrape to all of them. With ProxyFix the client's own address decides."""
    app, _ = make_own()
    client = app.test_client()
    value = "for=203.0.113.9" if header == "Forwarded" else "203.0.113.9"
    with caplog.at_level(logging.WARNING, "flask_orderhooks"):
        refused = client.get("/metrics", headers={header: value})
    assert refused.status_code == 403
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == (
        "OrderHooks metrics: the address 127.0.0.1 of /metrics is in "
        f"ORDERHOOKS_METRICS_ALLOWED_IPS, but the request came through a proxy ({header} "
        "header) that the app does not resolve, so it is the proxy's address, not the "
        "client's. Wrap the app in werkzeug's ProxyFix, or let the scraper reach the app "
        "directly."
    )
    assert messages[1].startswith("OrderHooks metrics: refused /metrics from 127.0.0.1:")

    app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1)  # type: ignore[method-assign]
    assert client.get("/metrics", headers={"X-Forwarded-For": "203.0.113.9"}).status_code == 403
    assert client.get("/metrics", headers={"X-Forwarded-For": "127.0.0.1"}).status_code == 200
    # The scraper on the machine itself, straight to the app: no header.
    assert client.get("/metrics").status_code == 200


def statuses_from(app: Flask, *addresses: str) -> dict[str, int]:
    """The status ``/metrics`` answers a client at each of ``addresses``."""
    client = app.test_client()
    return {
        address: client.get("/metrics", environ_base={"REMOTE_ADDR": address}).status_code
        for address in addresses
    }


def test_an_allow_list_of_networks(make_own: Callable[..., tuple[Flask, OrderHooks]]) -> None:
    app, _ = make_own(ORDERHOOKS_METRICS_ALLOWED_IPS=["10.0.0.0/8", "2001:db8::1"])
    statuses = statuses_from(
        app, "10.1.2.3", "::ffff:10.1.2.3", "2001:db8::1", "127.0.0.1", "11.0.0.1"
    )
    assert statuses == {
        "10.1.2.3": 200,
        "::ffff:10.1.2.3": 200,  # a dual-stack listener's IPv4 client
        "2001:db8::1": 200,
        "127.0.0.1": 403,  # the default is replaced, not extended
        "11.0.0.1": 403,
    }


def test_an_ipv4_mapped_network_in_the_allow_list_admits_its_ipv4_clients(
    make_own: Callable[..., tuple[Flask, OrderHooks]],
) -> None:
    """The refusal's log line shows a dual-stack listener's IPv4 client as
    ::ffff:a.b.c.d; the network an operator writes that way is its IPv4
    network (clients are matched as IPv4, so as IPv6 it matched none)."""
    app, _ = make_own(ORDERHOOKS_METRICS_ALLOWED_IPS=["::ffff:10.0.0.0/104", "::ffff:127.0.0.1"])
    statuses = statuses_from(
        app, "10.1.2.3", "::ffff:10.1.2.3", "127.0.0.1", "11.0.0.1", "::ffff:11.0.0.1"
    )
    assert statuses == {
        "10.1.2.3": 200,
        "::ffff:10.1.2.3": 200,
        "127.0.0.1": 200,
        "11.0.0.1": 403,
        "::ffff:11.0.0.1": 403,
    }


@pytest.mark.parametrize(
    ("answer", "status"),
    [("true", 200), ("false", 403), ("redirect", 403), ("truthy", 403), ("raise", 403)],
)
def test_the_console_access_function_opens_it_only_with_true(
    make_own: Callable[..., tuple[Flask, OrderHooks]],
    answer: str,
    status: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app, hooks = make_own(ORDERHOOKS_METRICS_ALLOWED_IPS=[])

    @hooks.console_access
    def check() -> Any:
        if answer == "raise":
            raise RuntimeError("the login system is down")
        return {"true": True, "false": False, "truthy": 1, "redirect": redirect("/login")}[answer]

    with caplog.at_level(logging.WARNING, "flask_orderhooks"):
        response = app.test_client().get("/metrics", environ_base={"REMOTE_ADDR": "127.0.0.1"})
    assert response.status_code == status
    messages = [r.getMessage() for r in caplog.records]
    if answer == "raise":
        assert messages[0] == "OrderHooks metrics: the console_access function raised"
    assert len(messages) == (0 if status == 200 else 2 if answer == "raise" else 1)


def test_openmetrics_when_the_scraper_asks(
    make_own: Callable[..., tuple[Flask, OrderHooks]],
) -> None:
    app, _ = make_own()
    response = app.test_client().get(
        "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert response.status_code == 200
    assert response.content_type.startswith("application/openmetrics-text; version=1.0.0")
    assert response.text.endswith("# EOF\n")
    assert "orderhooks_store_up 1.0\n" in response.text


# -- labels ------------------------------------------------------------------------------


def test_labels_come_from_the_fixed_sets_only(
    make_own: Callable[..., tuple[Flask, OrderHooks]],
) -> None:
    app, _ = make_own()
    metrics = get_metrics(app)
    metrics.answered("igv", "order-status", 418)
    metrics.answered("evil'provider", "x" * 500, 200)
    metrics.dispatched("igv", "order-status", "exploded", 0.5)
    metrics.attempted("nobody", "nothing", "done")
    # A platform turned off since: its rows keep their names.
    metrics.attempted("igv", "order-status", "failed")
    samples = scrape(app)
    assert requests(samples)[("igv", "order-status", "other")] == 1.0
    assert requests(samples)[("other", "other", "200")] == 1.0
    assert dispatches(samples)[("igv", "order-status", "other")] == 1.0
    assert attempts(samples)[("other", "other", "done")] == 1.0
    assert attempts(samples)[("igv", "order-status", "failed")] == 1.0
    providers = {dict(labels).get("provider") for _, labels in samples}
    assert providers == {"gateway", "igv", "sud", "other", None}


def test_only_configured_routes_start_at_zero(
    make_own: Callable[..., tuple[Flask, OrderHooks]],
) -> None:
    app, _ = make_own(ORDERHOOKS_GATEWAY_KEY=None, ORDERHOOKS_SUD_APPS=None)
    samples = scrape(app)
    assert requests(samples) == {("igv", "order-status", code): 0.0 for code in CODES}
    buckets = by_route(samples, "orderhooks_dispatch_seconds_bucket", "le")
    assert sorted({le for (_, _, le) in buckets}, key=float) == [
        *(str(b) for b in DEFAULT_BUCKETS),
        "+Inf",
    ]


# -- registries, and a host that mounts the scrape ----------------------------------


def test_two_apps_in_one_process_keep_their_own_counts(
    make_own: Callable[..., tuple[Flask, OrderHooks]], receiver: Callable[[Flask], None]
) -> None:
    first, _ = make_own()
    second, _ = make_own()
    receiver(first)
    assert post(first, make("igv", first)) == 200
    assert requests(scrape(first))[("igv", "order-status", "200")] == 1.0
    assert requests(scrape(second))[("igv", "order-status", "200")] == 0.0
    assert get_metrics(first).registry is not get_metrics(second).registry


def test_a_shared_registry_refuses_a_second_app_and_keeps_the_first(
    make_own: Callable[..., tuple[Flask, OrderHooks]], caplog: pytest.LogCaptureFixture
) -> None:
    # auto_describe, like prometheus_client.REGISTRY: registering must not
    # run the store's query (the store is down here, and nothing is logged).
    shared = CollectorRegistry(auto_describe=True)
    with caplog.at_level(logging.WARNING, "flask_orderhooks"):
        app, _ = make_own(
            ORDERHOOKS_METRICS_REGISTRY=shared,
            ORDERHOOKS_DATABASE_URI="sqlite:////nonexistent/orderhooks.db",
        )
    assert caplog.records == []
    names = set(shared._names_to_collectors)
    with pytest.raises(ConfigurationError) as info:
        make_own(ORDERHOOKS_METRICS_REGISTRY=shared)
    assert info.value.key == "ORDERHOOKS_METRICS_REGISTRY"
    assert str(info.value).endswith(
        "another app of this process registered them there. Leave the registry unset (each "
        "app gets its own), or share one registry between apps through one app only."
    )
    assert set(shared._names_to_collectors) == names
    assert get_metrics(app).registry is shared


def test_a_host_mounts_the_view_and_the_wsgi_app(
    make_app: Callable[..., Any], receiver: Callable[[Flask], None]
) -> None:
    app, hooks, _db = make_app()  # with the host's db: its engine needs the app context
    assert "orderhooks_metrics.scrape" not in app.view_functions
    metrics = init_metrics(hooks, app, buckets=[0.1, 1])
    assert get_metrics(app) is metrics
    assert isinstance(metrics, Metrics)
    app.add_url_rule("/internal/metrics", view_func=metrics.view)
    receiver(app)
    assert post(app, make("igv", app)) == 200
    samples = scrape(app, "/internal/metrics")
    assert requests(samples)[("igv", "order-status", "200")] == 1.0
    buckets = by_route(samples, "orderhooks_dispatch_seconds_bucket", "le")
    assert sorted({le for (_, _, le) in buckets}) == ["+Inf", "0.1", "1.0"]
    # Outside any app context, as a separate port or a dispatcher would call it.
    response = Client(metrics.wsgi_app).get("/")
    assert response.status_code == 200
    plain = parse(response.get_data(as_text=True))
    assert plain == samples
    with pytest.raises(RuntimeError) as again:
        init_metrics(hooks, app)
    assert str(again.value) == (
        "OrderHooks metrics are already set up on this app (by ORDERHOOKS_METRICS_URL or an "
        "earlier init_metrics()); reach them with flask_orderhooks.metrics.get_metrics(app)."
    )


def test_get_metrics_without_metrics_says_how_to_set_them_up() -> None:
    with pytest.raises(RuntimeError) as info:
        get_metrics(Flask("bare"))
    assert str(info.value) == (
        "OrderHooks metrics are not set up on this app: set ORDERHOOKS_METRICS_URL, or call "
        "flask_orderhooks.metrics.init_metrics(hooks, app) after hooks.init_app(app)."
    )


# -- config ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (
            "ORDERHOOKS_METRICS_URL",
            "metrics",
            'must be a path starting with "/" and without URL variables, such as "/metrics", '
            "or None (no metrics route).",
        ),
        (
            "ORDERHOOKS_METRICS_URL",
            "/metrics/<name>",
            'must be a path starting with "/" and without URL variables, such as "/metrics", '
            "or None (no metrics route).",
        ),
        (
            "ORDERHOOKS_METRICS_ALLOWED_IPS",
            "127.0.0.1",
            'must be a list of addresses or CIDR networks, such as ["127.0.0.1", "10.0.0.0/8"] '
            "(an empty list: only the console_access function decides).",
        ),
        (
            "ORDERHOOKS_METRICS_ALLOWED_IPS",
            ["10.0.0.0/8", "office"],
            "'office' is not an address or CIDR network.",
        ),
        (
            "ORDERHOOKS_METRICS_REGISTRY",
            "global",
            "must be a prometheus_client CollectorRegistry (such as prometheus_client.REGISTRY), "
            "or None for a registry of the app's own; not str.",
        ),
        (
            "ORDERHOOKS_METRICS_BUCKETS",
            [1, 0.5],
            "must be a non-empty, increasing list of positive finite seconds, or None.",
        ),
        (
            "ORDERHOOKS_METRICS_BUCKETS",
            [],
            "must be a non-empty, increasing list of positive finite seconds, or None.",
        ),
        (
            "ORDERHOOKS_METRICS_BUCKETS",
            [0.1, float("inf")],
            "must be a non-empty, increasing list of positive finite seconds, or None.",
        ),
    ],
)
def test_config_is_checked_at_init_app(
    make_own: Callable[..., tuple[Flask, OrderHooks]], key: str, value: object, message: str
) -> None:
    with pytest.raises(ConfigurationError) as info:
        make_own(**{key: value})
    assert info.value.key == key
    assert str(info.value) == f"{key}: {message}"


def test_a_multiprocess_dir_set_too_late_is_refused(
    make_own: Callable[..., tuple[Flask, OrderHooks]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # prometheus_client was imported by this process without the variable.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    with pytest.raises(ConfigurationError) as info:
        make_own()
    assert str(info.value) == (
        "PROMETHEUS_MULTIPROC_DIR: was set after prometheus_client was imported, so its values "
        "are kept in memory and a scrape of the directory would miss them. Set it in the "
        "environment the process starts with (gunicorn's, the worker's), not from Python."
    )


def test_without_prometheus_client_the_import_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    monkeypatch.delitem(sys.modules, "flask_orderhooks.metrics")
    with pytest.raises(ImportError) as info:
        importlib.import_module("flask_orderhooks.metrics")
    assert str(info.value) == (
        "flask_orderhooks.metrics needs prometheus_client, which is optional: install it with "
        'pip install "flask-orderhooks[metrics]" (or leave ORDERHOOKS_METRICS_URL unset).'
    )


# -- the count's plan: the status index, never the done rows ------------------------

#: The indexes that lead with status: the count reads the same entries from
#: either, and the planner picks one.
STATUS_INDEXES = (
    "ix_orderhooks_deliveries_status_updated",
    "ix_orderhooks_deliveries_status_created",
)


def test_sqlite_counts_through_the_status_index(
    make_own: Callable[..., tuple[Flask, OrderHooks]],
) -> None:
    app, hooks = make_own()
    state = hooks.state(app)
    assert state.standalone is not None
    state.standalone.ensure_table()
    query = get_metrics(app).store_collector.query
    sql = str(query.compile(state.store.engine, compile_kwargs={"literal_binds": True}))
    with state.store.engine.connect() as connection:
        plan = [row[3] for row in connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}")]
    assert plan in (
        [f"SEARCH orderhooks_deliveries USING COVERING INDEX {name} (status=?)"]
        for name in STATUS_INDEXES
    )


@pytest.mark.postgres
def test_postgresql_counts_through_the_status_index(
    postgres_url: str, tmp_path: Path, make_own: Callable[..., tuple[Flask, OrderHooks]]
) -> None:
    with private_schema(postgres_url, "orderhooks_metrics_plan") as url:
        app, hooks = make_own(ORDERHOOKS_DATABASE_URI=url)
        state = hooks.state(app)
        assert state.standalone is not None
        state.standalone.ensure_table()
        engine = state.store.engine
        table = state.store.table
        # A shop's table: almost every row done, a few operators must see.
        with engine.begin() as connection:
            connection.execute(
                sa.text(
                    "INSERT INTO orderhooks_deliveries (provider, callback, key, status, "
                    "attempts, claim_token, lease_expires_at, body, body_sha256, headers, "
                    "created_at, updated_at) SELECT 'igv', 'order-status', n::text, "
                    "CASE WHEN n % 5000 = 1 THEN 'failed' WHEN n % 5000 = 2 THEN 'dead' "
                    "WHEN n % 5000 = 3 THEN 'pending' ELSE 'done' END, 1, 't', now(), '', '', "
                    "'{}', now(), now() FROM generate_series(1, 50000) AS n"
                )
            )
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.exec_driver_sql(f"VACUUM ANALYZE {table.name}")
        query = get_metrics(app).store_collector.query
        sql = str(query.compile(engine, compile_kwargs={"literal_binds": True}))
        with engine.connect() as connection:
            plan = "\n".join(row[0] for row in connection.exec_driver_sql(f"EXPLAIN {sql}"))
        assert any(name in plan for name in STATUS_INDEXES), plan
        assert "Seq Scan" not in plan, plan
        assert get_metrics(app).store_collector.count() == {
            "failed": 10,
            "dead": 10,
            "pending": 10,
        }
        engine.dispose()


# -- the count's time bound ------------------------------------------------------------


@pytest.mark.postgres
def test_the_count_is_bounded_on_an_engine_in_autocommit_mode(
    postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SET LOCAL lasts for its transaction; in autocommit mode that is the
    SET alone, so the count ran unbounded. It runs in a transaction of its
    own now, and a count slower than the bound is cancelled by the server."""
    from flask_orderhooks import metrics as metrics_module

    with private_schema(postgres_url, "orderhooks_metrics_bound") as url:
        app = Flask("metrics_test", instance_path=str(tmp_path / "instance"))
        app.config.update(BASE_CONFIG)
        app.config.update(ORDERHOOKS_DATABASE_URI=url, ORDERHOOKS_METRICS_URL="/metrics")
        hooks = OrderHooks(app, engine_options={"isolation_level": "AUTOCOMMIT"})
        collector = get_metrics(app).store_collector
        monkeypatch.setattr(metrics_module, "_COUNT_TIMEOUT_MS", 100)
        # Five seconds of work, twenty times the bound (no timing is asserted:
        # the server's own cancellation is).
        monkeypatch.setattr(
            collector, "query", sa.text("SELECT 'failed', count(*) FROM pg_sleep(5)")
        )
        try:
            with pytest.raises(sa.exc.OperationalError) as info:
                collector.count()
            assert "statement timeout" in str(info.value.orig)
        finally:
            standalone = hooks.state(app).standalone
            assert standalone is not None
            standalone.engine.dispose()


@pytest.mark.mariadb
@pytest.mark.parametrize("mariadb", [True, False], ids=["mariadb", "as-mysql-8"])
def test_the_count_carries_its_bound_in_the_statement_on_mysql(
    mariadb_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mariadb: bool
) -> None:
    """MariaDB: SET STATEMENT max_statement_time … FOR; MySQL 8: the
    MAX_EXECUTION_TIME hint (which MariaDB reads as a comment, so both forms
    run here). In the statement, so the host's session keeps its settings;
    the counts are right either way."""
    import pymysql

    from tests.conftest import private_database

    with private_database(mariadb_url, "orderhooks_metrics_bound") as url:
        app = Flask("metrics_test", instance_path=str(tmp_path / "instance"))
        app.config.update(BASE_CONFIG)
        app.config.update(ORDERHOOKS_DATABASE_URI=url, ORDERHOOKS_METRICS_URL="/metrics")
        hooks = OrderHooks(app)
        state = hooks.state(app)
        assert state.standalone is not None
        state.standalone.ensure_table()
        engine = state.store.engine
        monkeypatch.setattr(engine.dialect, "is_mariadb", mariadb)
        with engine.begin() as connection:
            connection.execute(
                sa.text(
                    "INSERT INTO orderhooks_deliveries (provider, callback, `key`, status, "
                    "attempts, claim_token, lease_expires_at, body, body_sha256, headers, "
                    "created_at, updated_at) VALUES ('igv', 'order-status', 'k1', 'failed', 1, "
                    "'t', now(), '', '', '{}', now(), now()), ('igv', 'order-status', 'k2', "
                    "'dead', 1, 't', now(), '', '', '{}', now(), now())"
                )
            )
        sent: list[str] = []
        original = pymysql.connections.Connection._execute_command

        def spy(self: Any, command: int, sql: Any) -> Any:
            sent.append(sql.decode() if isinstance(sql, bytes) else str(sql))
            return original(self, command, sql)

        monkeypatch.setattr(pymysql.connections.Connection, "_execute_command", spy)
        try:
            assert get_metrics(app).store_collector.count() == {"failed": 1, "dead": 1}
            (count,) = [sql for sql in sent if "count(" in sql]
            bound = (
                "SET STATEMENT max_statement_time = 2.0 FOR SELECT "
                if mariadb
                else "SELECT /*+ MAX_EXECUTION_TIME(2000) */ "
            )
            assert count.startswith(bound), count
        finally:
            engine.dispose()


# -- the docs: every metric documented, alert rules on real names -------------------


def test_every_metric_is_documented(make_own: Callable[..., tuple[Flask, OrderHooks]]) -> None:
    app, _ = make_own()
    text = DOCS.read_text("utf-8")
    exposed = {name for name, _ in scrape(app)}
    for family in FAMILIES:
        assert any(name.startswith(family) for name in exposed), family
    for name in (
        "orderhooks_requests_total",
        "orderhooks_dispatch_seconds",
        "orderhooks_attempts_total",
        "orderhooks_deliveries",
        "orderhooks_store_up",
        "ORDERHOOKS_METRICS_URL",
        "ORDERHOOKS_METRICS_ALLOWED_IPS",
        "ORDERHOOKS_METRICS_REGISTRY",
        "ORDERHOOKS_METRICS_BUCKETS",
        "PROMETHEUS_MULTIPROC_DIR",
        "mark_process_dead",
    ):
        assert f"``{name}" in text, name


def test_the_alert_rules_use_metrics_that_exist(
    make_own: Callable[..., tuple[Flask, OrderHooks]],
) -> None:
    app, _ = make_own()
    exposed = {name for name, _ in scrape(app)}
    rules = ALERTS.read_text("utf-8")
    alerts = re.findall(r"^\s+- alert: (\S+)$", rules, re.MULTILINE)
    assert alerts == [
        "OrderHooksDeadDeliveries",
        "OrderHooksFailureRateRising",
        "OrderHooksAttemptsFailing",
        "OrderHooksStoreDown",
    ]
    expressions = re.findall(r"^\s+expr: (.+)$", rules, re.MULTILINE)
    assert len(expressions) == len(alerts)
    used = set()
    for expr in expressions:
        assert expr.count("(") == expr.count(")"), expr
        used |= set(re.findall(r"\borderhooks_[a-z_]+", expr))
    assert used == {
        "orderhooks_deliveries",
        "orderhooks_requests_total",
        "orderhooks_attempts_total",
        "orderhooks_store_up",
    }
    assert used <= exposed
    for status in re.findall(r'status="([a-z]+)"', rules):
        assert status in COUNTED_STATUSES
    # The page shows the same rules, indented in its code block.
    block = "\n".join(("    " + line) if line else "" for line in rules.splitlines())
    assert block in DOCS.read_text("utf-8")
