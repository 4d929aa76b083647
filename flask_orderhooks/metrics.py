"""Prometheus metrics: answers, dispatch times, worker attempts, and the store.

An extra (``pip install "flask-orderhooks[metrics]"``), built on
``prometheus_client``, which only this module imports. Turned on by
``ORDERHOOKS_METRICS_URL`` (the extension serves the scrape there), or by
:func:`init_metrics` for a host that mounts the scrape itself.

The counters and the histogram are fed by the pipeline's
:class:`~flask_orderhooks.instruments.Instruments`; the deliveries gauge is
read from the store when Prometheus scrapes, with one grouped count over the
four statuses an operator acts on. Labels only ever take values from the
fixed set of routes, statuses and outcomes the code defines, never from a
request, so the number of series is bounded whatever the platforms send.

.. versionadded:: 0.3
"""

from __future__ import annotations

import copy
import logging
import math
import os
import sys
import weakref
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa
from flask import Blueprint, Flask, Response, current_app, has_app_context, request
from sqlalchemy.exc import DBAPIError

from .exc import ConfigurationError
from .gateway import GatewayProvider
from .igv import IGVProvider
from .networks import IPNetwork, address_allowed, forwarded_past_the_app, parse_networks
from .store.table import DEAD, FAILED, PENDING, PROCESSING
from .sud import SUDProvider

try:
    from prometheus_client import CollectorRegistry, Counter, Histogram, values
    from prometheus_client.exposition import choose_encoder
    from prometheus_client.metrics_core import GaugeMetricFamily, Metric
    from prometheus_client.multiprocess import MultiProcessCollector
    from prometheus_client.registry import Collector
except ImportError as exc:
    raise ImportError(
        "flask_orderhooks.metrics needs prometheus_client, which is optional: install "
        'it with pip install "flask-orderhooks[metrics]" (or leave ORDERHOOKS_METRICS_URL '
        "unset)."
    ) from exc

if TYPE_CHECKING:
    from .extension import AppState, OrderHooks

logger = logging.getLogger("flask_orderhooks")

__all__ = [
    "COUNTED_STATUSES",
    "DEFAULT_BUCKETS",
    "METRICS_DEFAULTS",
    "Metrics",
    "get_metrics",
    "init_metrics",
    "prepare_metrics",
    "register_metrics",
    "serve_metrics",
]

#: The config keys of the metrics and their defaults (``ORDERHOOKS_METRICS_URL``
#: is in :data:`flask_orderhooks.config.DEFAULTS`).
METRICS_DEFAULTS: dict[str, Any] = {
    # Loopback only: a scraper elsewhere must be named, never guessed.
    "ORDERHOOKS_METRICS_ALLOWED_IPS": ["127.0.0.1", "::1"],
    # None: a registry of the extension's own per app.
    "ORDERHOOKS_METRICS_REGISTRY": None,
    # None: DEFAULT_BUCKETS.
    "ORDERHOOKS_METRICS_BUCKETS": None,
}

#: Upper bounds (seconds) of ``orderhooks_dispatch_seconds``: receivers that
#: write a few rows take milliseconds; the gateway gives up at 5 s, so the
#: buckets above it are where an inline receiver is already too slow.
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip

#: The statuses ``orderhooks_deliveries`` counts. ``done`` is left out on
#: purpose: it is nearly every row of a busy shop's table, counting it reads
#: the whole index at every scrape, and ``orderhooks_requests_total`` and the
#: dispatch histogram count done deliveries already.
COUNTED_STATUSES: tuple[str, ...] = (PENDING, PROCESSING, FAILED, DEAD)

#: Every status the pipeline answers with (docs/platforms/index.rst, "Answers"): the
#: request counter starts each at 0, so that an alert on ``increase()`` sees
#: the first failure too (a series born at 1 shows no increase).
ANSWER_STATUSES: tuple[int, ...] = (200, 400, 401, 403, 409, 413, 500, 503)
#: How a dispatch or a worker's attempt ended.
OUTCOMES: tuple[str, ...] = ("done", "failed")
#: The label value of anything outside the fixed sets (a provider of a row
#: whose platform is gone, say): one series, never one per value.
OTHER = "other"
_Metric = TypeVar("_Metric", Counter, Histogram)
_Value = TypeVar("_Value", int, str)

#: The longest the scrape's count may run (milliseconds; PostgreSQL, MySQL
#: and MariaDB): a scrape that waits longer than Prometheus does (10 s) only
#: holds a worker.
_COUNT_TIMEOUT_MS = 2000
_EXTENSION_KEY = "orderhooks_metrics"
_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_BUILTIN_ROUTES = frozenset(
    (provider.name, callback)
    for provider in (IGVProvider, GatewayProvider, SUDProvider)
    for callback in provider.routes
)


class Metrics:
    """The Prometheus metrics of one app: an
    :class:`~flask_orderhooks.instruments.Observer` of its pipeline, and the
    scrape.

    Made by :func:`init_metrics` (or by ``ORDERHOOKS_METRICS_URL``); reach it
    with :func:`get_metrics`.

    :ivar registry: where the counters, the histogram and
        :attr:`store_collector` are registered (a registry of the app's own,
        unless ``registry=`` or ``ORDERHOOKS_METRICS_REGISTRY`` gave one).
    :ivar multiprocess_dir: ``PROMETHEUS_MULTIPROC_DIR`` when the values live
        in its files (gunicorn with several workers); then every scrape reads
        them, for every process, instead of this process's registry.
    :ivar store_collector: the collector of ``orderhooks_deliveries`` and
        ``orderhooks_store_up``: register it in a scrape registry of your own
        in multiprocess mode if you serve the scrape yourself.

    .. versionadded:: 0.3
    """

    def __init__(
        self,
        app: Flask,
        hooks: OrderHooks,
        state: AppState,
        *,
        registry: CollectorRegistry,
        buckets: Sequence[float],
        allowed: Sequence[IPNetwork],
        multiprocess_dir: str | None,
    ) -> None:
        self.registry = registry
        self.multiprocess_dir = multiprocess_dir
        self.allowed_networks = tuple(allowed)
        self._hooks = hooks
        self._app = weakref.ref(app)
        configured = set(state.routes)
        # Rows of a platform turned off since keep their names when a worker
        # attempts them; only the configured routes start at zero.
        self._routes = _BUILTIN_ROUTES | configured
        # Created unregistered, then registered one by one: a clash (the
        # global registry shared by two apps) must leave nothing behind.
        self._requests = Counter(
            "orderhooks_requests",
            "Callback requests answered, by route and HTTP status.",
            ("provider", "callback", "code"),
            registry=None,
        )
        self._dispatch = Histogram(
            "orderhooks_dispatch_seconds",
            "Time the receivers of one delivery ran (request, worker or replay), by outcome.",
            ("provider", "callback", "outcome"),
            buckets=tuple(buckets),
            registry=None,
        )
        self._attempts = Counter(
            "orderhooks_attempts",
            "Attempts by workers and the Celery task, by outcome (failed: a failure).",
            ("provider", "callback", "outcome"),
            registry=None,
        )
        self.store_collector = _StoreCollector(self._app, state)
        _register_all(registry, self._collectors())
        # Children by their label values, so that the request path does a
        # dict lookup instead of labels()' validation and lock.
        self._answer_children: dict[tuple[str, str, int], Counter] = {}
        self._dispatch_children: dict[tuple[str, str, str], Histogram] = {}
        self._attempt_children: dict[tuple[str, str, str], Counter] = {}
        for route in sorted(configured):
            for status in ANSWER_STATUSES:
                self._child(self._requests, self._answer_children, *route, status, ANSWER_STATUSES)
            for outcome in OUTCOMES:
                self._child(self._dispatch, self._dispatch_children, *route, outcome, OUTCOMES)
                self._child(self._attempts, self._attempt_children, *route, outcome, OUTCOMES)

    def _collectors(self) -> tuple[Collector, ...]:
        """What the constructor registers in :attr:`registry`."""
        return (self._requests, self._dispatch, self._attempts, self.store_collector)

    def unregister(self) -> None:
        """Take this app's collectors out of :attr:`registry` again (an
        ``init_app`` that failed after preparing them), so that the next
        ``init_app`` on a shared registry is not refused as a duplicate."""
        for collector in self._collectors():
            self.registry.unregister(collector)

    def __repr__(self) -> str:
        mode = "multiprocess" if self.multiprocess_dir else "process-local"
        return f"<Metrics {mode} routes={len(self._routes)}>"

    # -- the Observer protocol: called by the pipeline ---------------------------

    def answered(self, provider: str, callback: str, status: int) -> None:
        """Count one answer (``orderhooks_requests_total``)."""
        child = self._answer_children.get((provider, callback, status))
        if child is None:
            child = self._child(
                self._requests, self._answer_children, provider, callback, status, ANSWER_STATUSES
            )
        child.inc()

    def dispatched(self, provider: str, callback: str, outcome: str, seconds: float) -> None:
        """Observe one dispatch's duration (``orderhooks_dispatch_seconds``)."""
        child = self._dispatch_children.get((provider, callback, outcome))
        if child is None:
            child = self._child(
                self._dispatch, self._dispatch_children, provider, callback, outcome, OUTCOMES
            )
        child.observe(seconds)

    def attempted(self, provider: str, callback: str, outcome: str) -> None:
        """Count one worker attempt (``orderhooks_attempts_total``)."""
        child = self._attempt_children.get((provider, callback, outcome))
        if child is None:
            child = self._child(
                self._attempts, self._attempt_children, provider, callback, outcome, OUTCOMES
            )
        child.inc()

    def _child(
        self,
        metric: _Metric,
        cache: dict[tuple[str, str, _Value], _Metric],
        provider: str,
        callback: str,
        value: _Value,
        allowed: Container[_Value],
    ) -> _Metric:
        """``metric``'s series for a route and a value, with ``other`` for
        anything outside the fixed label sets; only the route's own series
        are cached, so the cache stays bounded too."""
        if (provider, callback) in self._routes:
            p, c, known = provider, callback, True
        else:
            p, c, known = OTHER, OTHER, False
        label = str(value) if value in allowed else OTHER
        child = metric.labels(p, c, label)
        if known and label != OTHER:
            cache[(provider, callback, value)] = child
        return child

    # -- the scrape ------------------------------------------------------------------

    def scrape_registry(self) -> CollectorRegistry:
        """What a scrape reads: :attr:`registry`, or in multiprocess mode a
        fresh registry over every process's files plus the store's gauges."""
        if self.multiprocess_dir is None:
            return self.registry
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        registry.register(self.store_collector)
        return registry

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The scrape's body and its content type, in the format ``accept``
        (an ``Accept`` header) asks for: Prometheus text, or OpenMetrics."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.scrape_registry()), content_type

    def view(self) -> Response:
        """The scrape as a Flask view, protected like ``ORDERHOOKS_METRICS_URL``
        (``ORDERHOOKS_METRICS_ALLOWED_IPS``, or the ``@hooks.console_access``
        function returning ``True``; otherwise 403). Mount it on a route of
        your own::

            metrics = init_metrics(hooks, app)
            app.add_url_rule("/internal/metrics", "orderhooks_metrics", view_func=metrics.view)
        """
        if not self.allowed():
            return Response(
                "Not allowed to read the metrics; see the server log.\n",
                status=403,
                content_type="text/plain; charset=utf-8",
            )
        body, content_type = self.render(request.headers.get("Accept"))
        return Response(body, content_type=content_type, headers={"Cache-Control": "no-store"})

    def allowed(self) -> bool:
        """Whether the current request may read the metrics; logs a refusal."""
        if address_allowed(request.remote_addr, self.allowed_networks):
            wsgi_app = current_app.wsgi_app
            unresolved = forwarded_past_the_app(request.environ, wsgi_app)
            if unresolved is None:
                return True
            if unresolved.proxy_fix:
                why = (
                    "whose client ProxyFix did not put in its place (ProxyFix's x_for is 0, or "
                    "more than the X-Forwarded-For entries the proxy sends), so it is the "
                    "proxy's address, not the client's. Have the proxy send X-Forwarded-For and "
                    "give ProxyFix x_for= the number of proxies, or let the scraper reach the "
                    "app directly."
                )
            else:
                why = (
                    "that the app does not resolve, so it is the proxy's address, not the "
                    "client's. Wrap the app in werkzeug's ProxyFix, or let the scraper reach "
                    "the app directly."
                )
            logger.warning(
                "OrderHooks metrics: the address %s of %s is in ORDERHOOKS_METRICS_ALLOWED_IPS, "
                "but the request came through a proxy (%s header) %s",
                request.remote_addr,
                request.path,
                unresolved.header,
                why,
            )
        check = self._hooks.console_access_check
        if check is not None:
            try:
                # Only True opens the scrape: a redirect to a login page
                # (what the console may get) means nothing to Prometheus.
                if check() is True:
                    return True
            except Exception:
                logger.exception("OrderHooks metrics: the console_access function raised")
        logger.warning(
            "OrderHooks metrics: refused %s from %s: the address is not in "
            "ORDERHOOKS_METRICS_ALLOWED_IPS and the @hooks.console_access function did not "
            "return True. Add the scraper's address or network to "
            "ORDERHOOKS_METRICS_ALLOWED_IPS (behind a proxy, see ProxyFix).",
            request.path,
            request.remote_addr,
        )
        return False

    def wsgi_app(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        """The scrape as a plain WSGI app, **without** access control: for a
        port only the scraper reaches, or under a prefix the host protects::

            from werkzeug.middleware.dispatcher import DispatcherMiddleware

            app.wsgi_app = DispatcherMiddleware(app.wsgi_app, {"/metrics": metrics.wsgi_app})
        """
        body, content_type = self.render(environ.get("HTTP_ACCEPT"))
        start_response(
            "200 OK",
            [
                ("Content-Type", content_type),
                ("Content-Length", str(len(body))),
                ("Cache-Control", "no-store"),
            ],
        )
        return [body]


class _StoreCollector:
    """``orderhooks_deliveries{status}`` and ``orderhooks_store_up``, read at
    each scrape with one grouped count."""

    def __init__(self, app: weakref.ref[Flask], state: AppState) -> None:
        self._app = app
        self._state = state
        table = state.store.table
        # Served by an index that leads with status (the planner picks
        # (status, updated_at) or (status, created_at)): it reads the entries
        # of these four statuses only, never the done rows, however many
        # there are.
        self.query = (
            sa.select(table.c.status, sa.func.count())
            .where(table.c.status.in_(COUNTED_STATUSES))
            .group_by(table.c.status)
        )

    def describe(self) -> Iterator[Metric]:
        # Lets a registry check the names without running the query (the
        # global REGISTRY would otherwise collect at registration).
        yield _deliveries_family()
        yield _store_up_family()

    def collect(self) -> Iterator[Metric]:
        up = _store_up_family()
        try:
            counts = self.count()
        except Exception as exc:
            logger.warning(
                "OrderHooks metrics: could not count the deliveries (%s); orderhooks_deliveries "
                "is left out of this scrape and orderhooks_store_up is 0.",
                _error_text(exc),
            )
            up.add_metric([], 0)
            yield up
            return
        family = _deliveries_family()
        for status in COUNTED_STATUSES:
            family.add_metric([status], counts.get(status, 0))
        yield family
        up.add_metric([], 1)
        yield up

    def count(self) -> dict[str, int]:
        """Deliveries per counted status (statuses with none are missing)."""
        with self._context():
            state = self._state
            if state.standalone is not None:
                # The own store creates its table on first use: a scrape
                # before the first callback would otherwise find none.
                state.standalone.ensure_table()
            with state.store.engine.connect() as connection:
                rows = self._bounded_count(connection)
        return {str(status): int(number) for status, number in rows}

    def _bounded_count(self, connection: sa.Connection) -> Sequence[Any]:
        """The count, stopped by the server after ``_COUNT_TIMEOUT_MS``."""
        dialect = connection.dialect
        if dialect.name == "postgresql":
            # A transaction even on an engine in autocommit mode, where SET
            # LOCAL would last only as long as its own statement. (The
            # isolation level is reset when the connection goes back.)
            connection.execution_options(isolation_level="READ COMMITTED")
            with connection.begin():
                connection.exec_driver_sql(f"SET LOCAL statement_timeout = {_COUNT_TIMEOUT_MS}")
                return connection.execute(self.query).all()
        if dialect.name in ("mysql", "mariadb"):
            # In the statement itself: the session may be the host's.
            sql = str(self.query.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))
            if getattr(dialect, "is_mariadb", False):
                sql = f"SET STATEMENT max_statement_time = {_COUNT_TIMEOUT_MS / 1000} FOR {sql}"
            else:
                sql = sql.replace(
                    "SELECT ", f"SELECT /*+ MAX_EXECUTION_TIME({_COUNT_TIMEOUT_MS}) */ ", 1
                )
            return connection.exec_driver_sql(sql).all()
        return connection.execute(self.query).all()

    def _context(self) -> AbstractContextManager[object]:
        # A host serving the global registry (prometheus_client's own WSGI
        # app, say) scrapes outside any app context; the host's engine is
        # only known inside this app's.
        app = self._app()
        if app is None:
            raise RuntimeError("the app of these metrics was garbage-collected")
        if has_app_context() and current_app._get_current_object() is app:  # type: ignore[attr-defined]
            return nullcontext()
        return app.app_context()


def _deliveries_family() -> GaugeMetricFamily:
    return GaugeMetricFamily(
        "orderhooks_deliveries",
        "Deliveries in the store by status, read at scrape time (done is not counted: "
        "see orderhooks_requests_total).",
        labels=("status",),
    )


def _store_up_family() -> GaugeMetricFamily:
    return GaugeMetricFamily(
        "orderhooks_store_up",
        "1 when this scrape could count the deliveries, 0 when the store failed.",
    )


def _error_text(exc: Exception) -> str:
    # The driver's own message, not SQLAlchemy's wrapper with the SQL text
    # and a documentation link.
    inner = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    lines = str(inner).strip().splitlines()
    return f"{type(inner).__name__}: {lines[0] if lines else ''}"


def _register_all(registry: CollectorRegistry, metrics: Sequence[Collector]) -> None:
    done: list[Collector] = []
    try:
        for metric in metrics:
            registry.register(metric)
            done.append(metric)
    except ValueError:
        for metric in done:
            registry.unregister(metric)
        raise


# -- setting up -------------------------------------------------------------------------


def init_metrics(
    hooks: OrderHooks,
    app: Flask | None = None,
    *,
    registry: CollectorRegistry | None = None,
    buckets: Sequence[float] | None = None,
) -> Metrics:
    """Collect the metrics of ``app`` (default: the current app) without
    serving them at a URL: mount :meth:`Metrics.view` or
    :meth:`Metrics.wsgi_app` yourself.

    Call it after ``hooks.init_app(app)``. Options not given come from the
    config (``ORDERHOOKS_METRICS_REGISTRY``, ``ORDERHOOKS_METRICS_BUCKETS``,
    ``ORDERHOOKS_METRICS_ALLOWED_IPS``).

    :param registry: where to register the metrics, e.g.
        ``prometheus_client.REGISTRY`` to serve them with the host's others.
        Default: a registry of the app's own (two apps in one process never
        collide).
    :param buckets: upper bounds in seconds of ``orderhooks_dispatch_seconds``.
    :raises ConfigurationError: a config key is wrong, or the registry already
        holds these metric names.
    :raises RuntimeError: the app has no ``OrderHooks``, or already has metrics.

    .. versionadded:: 0.3
    """
    target: Flask = app if app is not None else current_app._get_current_object()  # type: ignore[attr-defined]
    state = hooks.state(target)
    if _EXTENSION_KEY in target.extensions:
        raise RuntimeError(
            "OrderHooks metrics are already set up on this app (by ORDERHOOKS_METRICS_URL or an "
            "earlier init_metrics()); reach them with flask_orderhooks.metrics.get_metrics(app)."
        )
    metrics = _collect(target, hooks, state, registry=registry, buckets=buckets)
    _attach(target, state, metrics)
    return metrics


def _collect(
    app: Flask,
    hooks: OrderHooks,
    state: AppState,
    *,
    registry: CollectorRegistry | None = None,
    buckets: Sequence[float] | None = None,
) -> Metrics:
    """The app's metrics, registered in their registry and nowhere else yet."""
    for key, value in METRICS_DEFAULTS.items():
        # A copy of a list default: editing one app's list must not edit
        # the defaults of the apps made after it.
        app.config.setdefault(key, copy.deepcopy(value))
    config = app.config
    allowed = _allowed_ips(config["ORDERHOOKS_METRICS_ALLOWED_IPS"])
    if registry is None:
        registry = _registry(config["ORDERHOOKS_METRICS_REGISTRY"]) or CollectorRegistry()
    chosen = _buckets(
        "buckets=" if buckets is not None else "ORDERHOOKS_METRICS_BUCKETS",
        buckets if buckets is not None else config["ORDERHOOKS_METRICS_BUCKETS"],
    )
    multiprocess_dir = _multiprocess_dir()
    try:
        return Metrics(
            app,
            hooks,
            state,
            registry=registry,
            buckets=chosen,
            allowed=allowed,
            multiprocess_dir=multiprocess_dir,
        )
    except ValueError as exc:  # DuplicateTimeseries since prometheus_client 0.22
        raise ConfigurationError(
            "ORDERHOOKS_METRICS_REGISTRY",
            f"the registry already holds the orderhooks metrics ({exc}); another app of this "
            "process registered them there. Leave the registry unset (each app gets its own), "
            "or share one registry between apps through one app only.",
        ) from None


def _attach(app: Flask, state: AppState, metrics: Metrics) -> None:
    state.instruments.add(metrics)
    app.extensions[_EXTENSION_KEY] = metrics


def prepare_metrics(app: Flask, hooks: OrderHooks, state: AppState) -> tuple[str, Metrics]:
    """Check the metrics' config and collect them, for
    :meth:`~flask_orderhooks.OrderHooks.init_app` when
    ``ORDERHOOKS_METRICS_URL`` is set; :func:`serve_metrics` then serves them.
    Nothing is registered on the app yet, so an error leaves it as it was.

    :raises ConfigurationError: a metrics config key is wrong.
    """
    url = _url(app.config["ORDERHOOKS_METRICS_URL"])
    return url, _collect(app, hooks, state)


def register_metrics(app: Flask, hooks: OrderHooks, state: AppState) -> None:
    """Serve the metrics at ``ORDERHOOKS_METRICS_URL``: :func:`prepare_metrics`
    then :func:`serve_metrics`.

    :raises ConfigurationError: a metrics config key is wrong.
    """
    serve_metrics(app, state, *prepare_metrics(app, hooks, state))


def serve_metrics(app: Flask, state: AppState, url: str, metrics: Metrics) -> None:
    """Serve ``metrics`` at ``url`` (after :func:`prepare_metrics`)."""
    _attach(app, state, metrics)
    blueprint = Blueprint("orderhooks_metrics", __name__)
    blueprint.add_url_rule(url, endpoint="scrape", view_func=metrics.view, methods=["GET"])
    app.register_blueprint(blueprint)


def get_metrics(app: Flask | None = None) -> Metrics:
    """The :class:`Metrics` of ``app`` (default: the current app).

    :raises RuntimeError: metrics are not set up on the app.
    """
    target: Flask = app if app is not None else current_app._get_current_object()  # type: ignore[attr-defined]
    metrics = target.extensions.get(_EXTENSION_KEY)
    if not isinstance(metrics, Metrics):
        raise RuntimeError(
            "OrderHooks metrics are not set up on this app: set ORDERHOOKS_METRICS_URL, or call "
            "flask_orderhooks.metrics.init_metrics(hooks, app) after hooks.init_app(app)."
        )
    return metrics


# -- config -----------------------------------------------------------------------------


def _url(value: object) -> str:
    if not isinstance(value, str) or not value.startswith("/") or "<" in value:
        raise ConfigurationError(
            "ORDERHOOKS_METRICS_URL",
            'must be a path starting with "/" and without URL variables, such as "/metrics", '
            "or None (no metrics route).",
        )
    return value


def _allowed_ips(value: object) -> tuple[IPNetwork, ...]:
    key = "ORDERHOOKS_METRICS_ALLOWED_IPS"
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ConfigurationError(
            key,
            'must be a list of addresses or CIDR networks, such as ["127.0.0.1", "10.0.0.0/8"] '
            "(an empty list: only the console_access function decides).",
        )
    return parse_networks(key, value)


def _registry(value: object) -> CollectorRegistry | None:
    if value is not None and not isinstance(value, CollectorRegistry):
        raise ConfigurationError(
            "ORDERHOOKS_METRICS_REGISTRY",
            "must be a prometheus_client CollectorRegistry (such as prometheus_client.REGISTRY), "
            f"or None for a registry of the app's own; not {type(value).__name__}.",
        )
    return value


def _buckets(key: str, value: object) -> tuple[float, ...]:
    if value is None:
        return DEFAULT_BUCKETS
    message = "must be a non-empty, increasing list of positive finite seconds, or None."
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or not value:
        raise ConfigurationError(key, message)
    bounds: list[float] = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            raise ConfigurationError(key, message)
        # An int too large for a float (a 400-digit number) is out of range
        # too, not an OverflowError.
        if isinstance(item, int) and item > sys.float_info.max:
            raise ConfigurationError(key, message)
        if not math.isfinite(item) or item <= 0 or (bounds and item <= bounds[-1]):
            raise ConfigurationError(key, message)
        bounds.append(float(item))
    return tuple(bounds)


def _multiprocess_dir() -> str | None:
    """``PROMETHEUS_MULTIPROC_DIR`` when prometheus_client runs in its
    multiprocess mode, checked: the mode is fixed when prometheus_client is
    first imported, so a variable set later would count into memory while
    the scrape read the (empty) files."""
    # Empty is unset, as prometheus_client reads it when it picks its mode
    # (a systemd "Environment=PROMETHEUS_MULTIPROC_DIR=").
    path = os.environ.get(_MULTIPROC_ENV) or None
    multiprocess = values.ValueClass is not values.MutexValue
    if multiprocess and not path:
        raise ConfigurationError(
            _MULTIPROC_ENV,
            "prometheus_client runs in multiprocess mode (its lowercase, deprecated variable "
            "is set?) but PROMETHEUS_MULTIPROC_DIR is not; set it to the metrics directory.",
        )
    if path is None:
        return None
    if not multiprocess:
        raise ConfigurationError(
            _MULTIPROC_ENV,
            "was set after prometheus_client was imported, so its values are kept in memory "
            "and a scrape of the directory would miss them. Set it in the environment the "
            "process starts with (gunicorn's, the worker's), not from Python.",
        )
    if not os.path.isdir(path):
        raise ConfigurationError(
            _MULTIPROC_ENV, f"{path!r} is not a directory; create it (empty) before the start."
        )
    return path
