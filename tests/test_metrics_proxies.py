"""The metrics' loopback allow list behind a reverse proxy on the same host.

nginx on the app's machine forwards every outside client from 127.0.0.1,
which the default ``ORDERHOOKS_METRICS_ALLOWED_IPS`` holds: the scrape is let
in by its address only when that address is the client's, not the proxy's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.test import Client

from flask_orderhooks import OrderHooks
from tests.conftest import BASE_CONFIG

MakeApp = Callable[..., Flask]


@pytest.fixture
def make_app(tmp_path: Path) -> Iterator[MakeApp]:
    """``make_app(**config)``: an app on a SQLite store of its own serving
    ``/metrics`` with the default allow list (loopback)."""
    made: list[tuple[Flask, OrderHooks]] = []

    def factory(**config: Any) -> Flask:
        app = Flask("metrics_proxies", instance_path=str(tmp_path / "instance"))
        app.config.update(BASE_CONFIG)
        app.config["ORDERHOOKS_DATABASE_URI"] = f"sqlite:///{tmp_path / f'own{len(made)}.db'}"
        app.config["ORDERHOOKS_METRICS_URL"] = "/metrics"
        app.config.update(config)
        hooks = OrderHooks(app)
        made.append((app, hooks))
        return app

    yield factory
    for app, hooks in made:
        standalone = hooks.state(app).standalone
        assert standalone is not None
        standalone.engine.dispose()


UNRESOLVED_BY_PROXY_FIX = (
    "OrderHooks metrics: the address 127.0.0.1 of /metrics is in "
    "ORDERHOOKS_METRICS_ALLOWED_IPS, but the request came through a proxy ({header} header) "
    "whose client ProxyFix did not put in its place (ProxyFix's x_for is 0, or more than the "
    "X-Forwarded-For entries the proxy sends), so it is the proxy's address, not the "
    "client's. Have the proxy send X-Forwarded-For and give ProxyFix x_for= the number of "
    "proxies, or let the scraper reach the app directly."
)
UNRESOLVED = (
    "OrderHooks metrics: the address 127.0.0.1 of /metrics is in "
    "ORDERHOOKS_METRICS_ALLOWED_IPS, but the request came through a proxy ({header} "
    "header) that the app does not resolve, so it is the proxy's address, not the "
    "client's. Wrap the app in werkzeug's ProxyFix, or let the scraper reach the app "
    "directly."
)


@pytest.mark.parametrize(
    ("proxy_fix", "headers", "named"),
    [
        # x_for=0: ProxyFix only for the scheme, the address left as the proxy's.
        ({"x_for": 0, "x_proto": 1}, {"X-Forwarded-For": "203.0.113.9"}, "X-Forwarded-For"),
        # Two proxies configured, one in front: too few entries, nothing resolved.
        ({"x_for": 2}, {"X-Forwarded-For": "203.0.113.9"}, "X-Forwarded-For"),
        # nginx's "proxy_set_header X-Real-IP $remote_addr" without X-Forwarded-For.
        ({"x_for": 1}, {"X-Real-IP": "203.0.113.9"}, "X-Real-IP"),
        ({"x_for": 1}, {"Forwarded": "for=203.0.113.9"}, "Forwarded"),
        # Only the scheme and host forwarded (for url_for), no address at all.
        ({"x_for": 1, "x_proto": 1}, {"X-Forwarded-Proto": "https"}, "X-Forwarded-Proto"),
    ],
    ids=["x-for-0", "x-for-2-one-entry", "real-ip-only", "forwarded-only", "proto-only"],
)
def test_proxy_fix_that_left_the_proxys_address_is_refused(
    make_app: MakeApp,
    caplog: pytest.LogCaptureFixture,
    proxy_fix: dict[str, int],
    headers: dict[str, str],
    named: str,
) -> None:
    app = make_app()
    app.wsgi_app = ProxyFix(app.wsgi_app, **proxy_fix)  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, "flask_orderhooks"):
        refused = app.test_client().get("/metrics", headers=headers)
    assert refused.status_code == 403
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == UNRESOLVED_BY_PROXY_FIX.format(header=named)
    assert messages[1].startswith("OrderHooks metrics: refused /metrics from 127.0.0.1:")


@pytest.mark.parametrize(
    "header",
    [
        "X-Forwarded-Proto",
        "X-Forwarded-Host",
        "X-Forwarded-Port",
        "X-Forwarded-Prefix",
        "X-Forwarded-Server",
        "Via",
        "X-Client-IP",
        "True-Client-IP",
        "CF-Connecting-IP",
    ],
)
def test_a_proxy_that_forwards_no_client_address_is_seen_by_its_other_headers(
    make_app: MakeApp, caplog: pytest.LogCaptureFixture, header: str
) -> None:
    """nginx with only ``proxy_set_header X-Forwarded-Proto $scheme`` (or
    Apache's X-Forwarded-Server, a CDN's client header) names no client the
    app could resolve, but it does show that a proxy sent the request."""
    app = make_app()
    with caplog.at_level(logging.WARNING, "flask_orderhooks"):
        refused = app.test_client().get("/metrics", headers={header: "x"})
    assert refused.status_code == 403
    assert caplog.records[0].getMessage() == UNRESOLVED.format(header=header)


def test_proxy_fix_that_resolved_the_client_still_decides_by_its_address(
    make_app: MakeApp,
) -> None:
    app = make_app()
    app.wsgi_app = ProxyFix(app.wsgi_app, x_for=2, x_proto=1)  # type: ignore[method-assign]
    client = app.test_client()
    # values[-2] is the client the first proxy saw.
    two_hops = {"X-Forwarded-For": "127.0.0.1, 10.0.0.9", "X-Forwarded-Proto": "https"}
    assert client.get("/metrics", headers=two_hops).status_code == 200
    outside = {"X-Forwarded-For": "203.0.113.9, 10.0.0.9", "X-Real-IP": "10.0.0.9"}
    assert client.get("/metrics", headers=outside).status_code == 403
    # A scraper on the machine itself, straight to the app.
    assert client.get("/metrics").status_code == 200


def test_proxy_fix_outside_the_app_is_trusted_only_when_it_changed_the_address(
    make_app: MakeApp, caplog: pytest.LogCaptureFixture
) -> None:
    """A ProxyFix around the whole WSGI callable (gunicorn's
    ``'shop:ProxyFix(create_app())'``) cannot be asked for its x_for: a
    forwarded request whose address it left alone is refused."""
    app = make_app()
    client = Client(ProxyFix(app, x_for=1))
    local = {"REMOTE_ADDR": "127.0.0.1"}

    def get(**headers: str) -> int:
        return client.get("/metrics", headers=headers, environ_base=local).status_code

    assert get(**{"X-Forwarded-For": "10.0.0.9"}) == 403
    caplog.clear()
    with caplog.at_level(logging.WARNING, "flask_orderhooks"):
        assert get(**{"X-Real-IP": "203.0.113.9"}) == 403
    assert caplog.records[0].getMessage() == UNRESOLVED_BY_PROXY_FIX.format(header="X-Real-IP")
    assert get() == 200
