"""init_app checks everything before it registers anything, and what it
accepts works: URL prefix, database URL, numbers, names and endpoints,
operator signals whose receivers raise, and list defaults that are each
app's own. (Found by the session-13 review of the docs against the code.)"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, Response
from prometheus_client import CollectorRegistry
from werkzeug.test import TestResponse

from flask_orderhooks import (
    BadSignature,
    ConfigurationError,
    Delivery,
    OrderHooks,
    Provider,
    delivery_dead,
    delivery_failed,
    payment_collected,
)
from flask_orderhooks.testing import gateway_collect
from tests.conftest import BASE_CONFIG, chat_is_down, connected, ledger_is_down


def make(tmp_path: Path, **config: Any) -> Flask:
    app = Flask("init_app_checks", instance_path=str(tmp_path))
    app.config.update(BASE_CONFIG)
    app.config.update(config)
    return app


def post_collect(app: Flask, order_id: str) -> TestResponse:
    """A signed gateway collect callback for ``order_id``, through the test client."""
    callback = gateway_collect(app=app, id=order_id)
    return app.test_client().post(callback.url(), data=callback.body, headers=callback.headers)


# -- 1. init_app that raises leaves the app half-registered ---------------------------
#
# docs/config.rst:4-7: every key is checked in init_app and a wrong value raises
# ConfigurationError at start-up; tests/test_config.py holds that the app is then
# left without the extension. The console's and the metrics' keys are checked only
# after app.extensions["orderhooks"], the per-app state and the callback blueprint
# were registered (extension.py:185-197), so the failed app keeps live callback
# routes, and fixing the config and calling init_app again is refused.

_LATE_ERRORS = [
    pytest.param({"ORDERHOOKS_CONSOLE_URL": "/ops"}, "SECRET_KEY", id="console-no-secret-key"),
    pytest.param(
        {"ORDERHOOKS_CONSOLE_URL": "/ops", "SECRET_KEY": "k", "ORDERHOOKS_CONSOLE_PAGE_SIZE": 0},
        "ORDERHOOKS_CONSOLE_PAGE_SIZE",
        id="console-page-size",
    ),
    pytest.param({"ORDERHOOKS_CONSOLE_URL": 5}, "ORDERHOOKS_CONSOLE_URL", id="console-url"),
    pytest.param({"ORDERHOOKS_METRICS_URL": "metrics"}, "ORDERHOOKS_METRICS_URL", id="metrics-url"),
    pytest.param(
        {"ORDERHOOKS_METRICS_URL": "/metrics", "ORDERHOOKS_METRICS_BUCKETS": [1, 0.5]},
        "ORDERHOOKS_METRICS_BUCKETS",
        id="metrics-buckets",
    ),
]


@pytest.mark.parametrize(("config", "key"), _LATE_ERRORS)
def test_a_console_or_metrics_config_error_leaves_no_registration(
    tmp_path: Path, config: dict[str, Any], key: str
) -> None:
    app = make(tmp_path, **config)
    hooks = OrderHooks()
    with pytest.raises(ConfigurationError) as info:
        hooks.init_app(app)
    assert info.value.key == key
    assert "orderhooks" not in app.extensions
    assert not [r.rule for r in app.url_map.iter_rules() if r.rule.startswith("/orderhooks/")]
    assert repr(hooks) == "<OrderHooks db=own apps=0>"


def test_init_app_works_once_the_console_config_is_fixed(tmp_path: Path) -> None:
    app = make(tmp_path, ORDERHOOKS_CONSOLE_URL="/ops")
    hooks = OrderHooks()
    with pytest.raises(ConfigurationError):
        hooks.init_app(app)  # no SECRET_KEY
    app.config["SECRET_KEY"] = "now-set"
    hooks.init_app(app)  # RuntimeError: "already registered on this app"
    assert hooks.state(app).settings.url_prefix == "/orderhooks"


def test_a_shared_metrics_registry_refuses_the_second_app_without_registering_it(
    tmp_path: Path,
) -> None:
    # docs/metrics.rst:77-80: "the second app's init_app raises ConfigurationError".
    shared = CollectorRegistry()
    hooks = OrderHooks()
    first = make(
        tmp_path / "a", ORDERHOOKS_METRICS_URL="/metrics", ORDERHOOKS_METRICS_REGISTRY=shared
    )
    second = make(
        tmp_path / "b", ORDERHOOKS_METRICS_URL="/metrics", ORDERHOOKS_METRICS_REGISTRY=shared
    )
    hooks.init_app(first)
    with pytest.raises(ConfigurationError):
        hooks.init_app(second)
    assert "orderhooks" not in second.extensions
    # The failed app still counts: init_celery(celery_app, hooks) without app=
    # then refuses "registered on 2 apps" (celery.py _only_app).
    assert repr(hooks) == "<OrderHooks db=own apps=1>"


# -- 2. ORDERHOOKS_URL_PREFIX with URL variables ---------------------------------------
#
# config.py:145-149 checks only that the prefix starts with "/". A prefix such as
# "/<tenant>" is accepted, and every callback route then calls a view that takes
# no arguments: Flask answers each callback with its HTML 500 page (TypeError:
# view() got an unexpected keyword argument 'tenant'), not the platform's answer.
# The console's and metrics' URLs refuse "<" at init; the prefix should too.


@pytest.mark.parametrize("prefix", ["/<tenant>", "/hooks/<int:shop>"])
def test_a_url_prefix_with_url_variables_is_refused_at_init(tmp_path: Path, prefix: str) -> None:
    app = make(tmp_path, ORDERHOOKS_URL_PREFIX=prefix)
    with pytest.raises(ConfigurationError) as info:
        OrderHooks(app)
    assert info.value.key == "ORDERHOOKS_URL_PREFIX"


def test_what_a_url_prefix_with_a_variable_does_to_callbacks(tmp_path: Path) -> None:
    # Not TESTING: the test client then gets the answer a platform would.
    app = make(tmp_path, ORDERHOOKS_URL_PREFIX="/<tenant>", TESTING=False)
    try:
        OrderHooks(app)
    except ConfigurationError:
        return  # refused at start-up: what the docs promise
    payment_collected.connect(_accept, app)
    try:
        callback = gateway_collect(app=app)
        response = app.test_client().post(
            "/acme" + callback.path, data=callback.body, headers=callback.headers
        )
    finally:
        payment_collected.disconnect(_accept, app)
    # The gateway's own answer (text/plain "success"/"fail"), never Flask's HTML page.
    assert response.mimetype == "text/plain", response.data[:80]


def _accept(sender: Flask, **extra: Any) -> None:
    return None


# -- 3. ORDERHOOKS_DATABASE_URI that is not a database URL ----------------------------
#
# docs/config.rst:4-7: a wrong value raises ConfigurationError naming the key.
# config.py:150-154 checks only "non-empty str"; the URL is parsed by
# sa.make_url / create_engine in StandaloneDatabase (store/standalone.py:36-41),
# whose sqlalchemy.exc.ArgumentError / NoSuchModuleError name no key.


@pytest.mark.parametrize("uri", ["not a database url", "nosuchdialect://host/db"])
def test_a_database_uri_that_does_not_parse_names_the_key(tmp_path: Path, uri: str) -> None:
    app = make(tmp_path, ORDERHOOKS_DATABASE_URI=uri)
    with pytest.raises(ConfigurationError) as info:
        OrderHooks(app)
    assert info.value.key == "ORDERHOOKS_DATABASE_URI"


# -- 4. An integer too large for a float -----------------------------------------------
#
# config.py:282 and :194 call math.isfinite() on the value, which raises
# OverflowError for an int beyond float range (a JSON number of 400 digits from
# app.config.from_prefixed_env()); the docs promise ConfigurationError.


@pytest.mark.parametrize(
    ("key", "value"),
    [
        pytest.param("ORDERHOOKS_DUPLICATE_WAIT", 10**400, id="duplicate-wait"),
        pytest.param("ORDERHOOKS_MAX_CLOCK_SKEW", 10**400, id="max-clock-skew"),
        pytest.param("ORDERHOOKS_RETRY_DELAYS", [10**400], id="retry-delays"),
    ],
)
def test_a_huge_integer_is_a_configuration_error(tmp_path: Path, key: str, value: Any) -> None:
    app = make(tmp_path, **{key: value})
    with pytest.raises(ConfigurationError) as info:
        OrderHooks(app)
    assert info.value.key == key


# -- 5. A delivery_failed receiver that raises swallows delivery_dead -----------------
#
# docs/signals.rst:132-135 and docs/dispatch.rst:139-143: the operator signals'
# receivers that raise are "logged and change nothing"; delivery_dead is sent
# "once, when the last local attempt failed" and the dead delivery "is also
# logged at ERROR". OrderHooks._failed (extension.py:323-340) sends
# delivery_failed first, unguarded: when one of its receivers raises, the
# store's guard (delivery_store.py:667-676) catches it, but delivery_dead is
# never sent, the "dead after N attempts" line is never logged, and the
# retry's enqueue (Celery) never happens.


def test_a_raising_delivery_failed_receiver_still_lets_delivery_dead_through(
    tmp_path: Path,
) -> None:
    app = make(tmp_path, ORDERHOOKS_RETRY_DELAYS=[])
    hooks = OrderHooks(app)
    dead: list[str] = []

    def page_someone(sender: Flask, delivery: Any, error: str, **extra: Any) -> None:
        dead.append(delivery.key)

    try:
        with connected(
            app,
            (delivery_failed, chat_is_down),
            (delivery_dead, page_someone),
            (payment_collected, ledger_is_down),
        ):
            assert post_collect(app, "C1").status_code == 500
        [row] = hooks.state(app).store.get("C1:60")
        assert row.status == "dead"
        assert dead == ["C1:60"]
    finally:
        hooks.state(app).store.engine.dispose()


def test_a_raising_delivery_failed_receiver_still_lets_the_retry_be_enqueued(
    tmp_path: Path,
) -> None:
    app = make(tmp_path, ORDERHOOKS_RETRY_DELAYS=[60])
    hooks = OrderHooks(app)
    enqueued: list[tuple[str, str, str, float]] = []
    hooks.enqueuer = lambda *args: enqueued.append(args)
    try:
        with connected(app, (delivery_failed, chat_is_down), (payment_collected, ledger_is_down)):
            post_collect(app, "C2")
        assert [(p, c, k) for p, c, k, _ in enqueued] == [("gateway", "collect", "C2:60")]
    finally:
        hooks.state(app).store.engine.dispose()


# -- 6. Provider and callback names the docs allow, that Flask refuses ----------------
#
# docs/writing-a-provider.rst:25-34 and :330-333: a provider's name is 1 to 16
# characters, a callback's 1 to 32, and OrderHooks checks "at once" that they
# fit the store and "must not collide on one Flask endpoint". The endpoint is
# f"{provider}_{callback}" with "-" as "_" (views.py:57-60), and only the
# callbacks of one provider are compared (extension.py:380-394). So a "." in
# either name (Flask: "'endpoint' may not contain a dot"), or two providers
# whose endpoints coincide ("a_b" + "c" and "a" + "b-c": Flask's AssertionError
# "View function mapping is overwriting an existing endpoint function"), fail
# inside app.register_blueprint, with Flask's message, after the app was
# registered (app.extensions["orderhooks"] set, state kept).


def _provider_class(provider_name: str, callback: str, rule: str) -> type[Provider]:
    class _Sample(Provider):
        name = provider_name
        routes: Mapping[str, str] = {callback: rule}

        @classmethod
        def from_config(cls, config: Mapping[str, Any]) -> _Sample:
            return cls()

        def read(
            self, callback: str, body: bytes, headers: Mapping[str, str], *, now: float | None
        ) -> Delivery:
            raise BadSignature("Never verified.")

        def answer(self, status: int, reason: str) -> Response:
            return Response(reason, status=status, mimetype="text/plain")

    return _Sample


@pytest.mark.parametrize(
    ("provider_name", "callback"),
    [("acme.pay", "paid"), ("courier", "parcel.delivered")],
    ids=["dot-in-provider-name", "dot-in-callback-name"],
)
def test_documented_names_with_a_dot_get_their_route(
    tmp_path: Path, provider_name: str, callback: str
) -> None:
    app = make(tmp_path)
    OrderHooks(app, providers=[_provider_class(provider_name, callback, "/acme/hook")])
    response = app.test_client().post("/orderhooks/acme/hook", data=b"{}")
    assert (response.status_code, response.data) == (401, b"Never verified.")


def test_two_providers_on_one_endpoint_are_refused_before_registering(tmp_path: Path) -> None:
    app = make(tmp_path)
    providers = [_provider_class("a_b", "c", "/one"), _provider_class("a", "b-c", "/two")]
    with pytest.raises(ValueError, match="endpoint") as info:
        OrderHooks(app, providers=providers)
    assert not isinstance(info.value, AssertionError)
    assert "orderhooks" not in app.extensions


# -- 7. Mutable defaults shared by every app -----------------------------------------
#
# init_app fills app.config with app.config.setdefault(key, value) from the
# module-level DEFAULTS (config.py:23-43, extension.py:149-153) and
# METRICS_DEFAULTS (metrics.py:69-76): every app's ORDERHOOKS_RETRY_DELAYS and
# ORDERHOOKS_METRICS_ALLOWED_IPS is the same list object as the module's. A
# host or a test that edits one app's list in place (after init_app, when the
# key is there to read) edits the default of every app created afterwards in
# the process: here the next app silently gets no retries (docs/config.rst:
# default [10, 60, 300, 1800, 7200, 43200]) and a metrics route open to any
# address (default ["127.0.0.1", "::1"]).


def test_one_apps_config_lists_are_not_the_next_apps_defaults(tmp_path: Path) -> None:
    from flask_orderhooks.metrics import get_metrics

    first = make(tmp_path / "a", ORDERHOOKS_METRICS_URL="/metrics")
    OrderHooks(first)
    try:
        first.config["ORDERHOOKS_RETRY_DELAYS"].append(86400)
        first.config["ORDERHOOKS_METRICS_ALLOWED_IPS"].append("0.0.0.0/0")
        second = make(tmp_path / "b", ORDERHOOKS_METRICS_URL="/metrics")
        hooks = OrderHooks(second)
        assert hooks.state(second).settings.retry_delays == (10, 60, 300, 1800, 7200, 43200)
        assert [str(n) for n in get_metrics(second).allowed_networks] == [
            "127.0.0.1/32",
            "::1/128",
        ]
    finally:
        # Put the module's defaults back for the rest of the session.
        from flask_orderhooks.config import DEFAULTS
        from flask_orderhooks.metrics import METRICS_DEFAULTS

        DEFAULTS["ORDERHOOKS_RETRY_DELAYS"][:] = [10, 60, 300, 1800, 7200, 43200]
        METRICS_DEFAULTS["ORDERHOOKS_METRICS_ALLOWED_IPS"][:] = ["127.0.0.1", "::1"]


def test_a_database_driver_that_is_not_installed_names_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The URL parses and names a known database, but its driver is missing
    (psycopg without the [postgres] extra): a ConfigurationError naming the
    key and the extra, never the URL (it may hold a password)."""
    from flask_orderhooks import extension

    def no_driver(*args: Any, **kwargs: Any) -> None:
        raise ModuleNotFoundError("No module named 'psycopg'", name="psycopg")

    monkeypatch.setattr(extension, "StandaloneDatabase", no_driver)
    app = make(tmp_path, ORDERHOOKS_DATABASE_URI="postgresql+psycopg://shop:s3cret@db/shop")
    with pytest.raises(ConfigurationError) as info:
        OrderHooks(app)
    assert info.value.key == "ORDERHOOKS_DATABASE_URI"
    assert "'psycopg'" in str(info.value) and "flask-orderhooks[postgres]" in str(info.value)
    assert "s3cret" not in str(info.value)
    assert "orderhooks" not in app.extensions


def test_every_operator_receiver_hears_of_a_dead_delivery_when_one_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """blinker's send() stops at the first receiver that raises: the pager
    connected after a broken chat hook would never hear of the dead
    delivery. Each receiver is called in turn, and each failure logged."""
    app = make(tmp_path, ORDERHOOKS_RETRY_DELAYS=[])
    hooks = OrderHooks(app)
    paged: list[str] = []

    def page_someone(sender: Flask, delivery: Any, error: str, **extra: Any) -> None:
        paged.append(delivery.key)

    try:
        with connected(
            app,
            (delivery_dead, chat_is_down),
            (delivery_dead, page_someone),
            (payment_collected, ledger_is_down),
        ):
            assert post_collect(app, "C3").status_code == 500
        assert paged == ["C3:60"]
        assert "gateway collect C3:60: a receiver of orderhooks.delivery-dead raised" in caplog.text
    finally:
        hooks.state(app).store.engine.dispose()


def test_a_second_app_refused_for_its_metrics_registry_can_be_set_up_again(
    tmp_path: Path,
) -> None:
    """The shared registry's clash leaves nothing behind: with a registry of
    its own, the same OrderHooks sets the second app up."""
    shared = CollectorRegistry()
    hooks = OrderHooks()
    first = make(
        tmp_path / "a", ORDERHOOKS_METRICS_URL="/metrics", ORDERHOOKS_METRICS_REGISTRY=shared
    )
    second = make(
        tmp_path / "b", ORDERHOOKS_METRICS_URL="/metrics", ORDERHOOKS_METRICS_REGISTRY=shared
    )
    hooks.init_app(first)
    with pytest.raises(ConfigurationError):
        hooks.init_app(second)
    second.config["ORDERHOOKS_METRICS_REGISTRY"] = None
    hooks.init_app(second)
    assert second.test_client().get("/metrics").status_code == 200
    assert repr(hooks) == "<OrderHooks db=own apps=2>"


def test_two_providers_on_one_url_rule_are_refused(tmp_path: Path) -> None:
    """Flask would route every request of that rule to the route registered
    first, and the other provider would never be asked."""
    app = make(tmp_path)
    providers = [
        _provider_class("acme", "paid", "/hook"),
        _provider_class("other", "done", "/hook"),
    ]
    with pytest.raises(ValueError) as info:
        OrderHooks(app, providers=providers)
    assert str(info.value) == (
        "_Sample: the callback other/done and _Sample's acme/paid have the same URL rule "
        "'/hook'; give each its own."
    )
    assert "orderhooks" not in app.extensions


@pytest.mark.parametrize("interval", [0, 1e-9, 0.009])
def test_a_worker_poll_interval_under_a_hundredth_of_a_second_is_refused(
    tmp_path: Path, interval: float
) -> None:
    """The same floor as ``worker --poll-interval``: an idle worker would
    query the database without pause."""
    app = make(tmp_path, ORDERHOOKS_WORKER_POLL_INTERVAL=interval)
    with pytest.raises(ConfigurationError) as info:
        OrderHooks(app)
    assert info.value.key == "ORDERHOOKS_WORKER_POLL_INTERVAL"
    OrderHooks(make(tmp_path / "ok", ORDERHOOKS_WORKER_POLL_INTERVAL=0.01))


def test_a_merchant_given_twice_is_refused(tmp_path: Path) -> None:
    """10001 and "10001" are one merchant id: which key verifies its callbacks
    must not depend on the mapping's order."""
    app = make(tmp_path, ORDERHOOKS_GATEWAY_KEY={"10001": "old-key", 10001: "new-key"})
    with pytest.raises(ConfigurationError) as info:
        OrderHooks(app)
    assert info.value.key == "ORDERHOOKS_GATEWAY_KEY"
    assert "'10001' is given twice" in str(info.value)
    assert "old-key" not in str(info.value) and "new-key" not in str(info.value)


@pytest.mark.parametrize("url", ["/", "//"])
def test_a_console_at_the_root_is_refused(tmp_path: Path, url: str) -> None:
    """Its stylesheet route would be the app's own /static, and the console
    would show unstyled."""
    app = make(tmp_path, ORDERHOOKS_CONSOLE_URL=url, SECRET_KEY="k")
    with pytest.raises(ConfigurationError) as info:
        OrderHooks(app)
    assert info.value.key == "ORDERHOOKS_CONSOLE_URL"


def test_an_async_operator_receiver_is_logged_not_left_unawaited(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """blinker's send() refuses a coroutine function; called one by one, it
    would only make a coroutine nobody awaits. It is logged at ERROR, and
    the other receivers still run."""
    app = make(tmp_path, ORDERHOOKS_RETRY_DELAYS=[])
    hooks = OrderHooks(app)
    paged: list[str] = []

    async def async_pager(sender: Flask, **extra: Any) -> None:
        raise AssertionError("never called")

    def page_someone(sender: Flask, delivery: Any, **extra: Any) -> None:
        paged.append(delivery.key)

    try:
        with connected(
            app,
            (delivery_dead, async_pager),
            (delivery_dead, page_someone),
            (payment_collected, ledger_is_down),
        ):
            post_collect(app, "C4")
        assert paged == ["C4:60"]
        assert "a receiver of orderhooks.delivery-dead is a coroutine function" in caplog.text
    finally:
        hooks.state(app).store.engine.dispose()
