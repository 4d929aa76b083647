"""The :class:`OrderHooks` extension object."""

from __future__ import annotations

import copy
import inspect
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

from blinker import NamedSignal
from flask import Flask, current_app
from sqlalchemy.engine import Engine

from .builtin import BUILTIN_PROVIDERS
from .config import DEFAULTS, Settings, known_keys, load_settings, unknown_keys
from .exc import ConfigurationError
from .instruments import Instruments
from .logtext import for_log
from .provider import Provider
from .signals import delivery_dead, delivery_failed
from .store import (
    DEAD,
    FAILED,
    DeliveryStore,
    RetrySchedule,
    SessionTransaction,
    StandaloneDatabase,
    StoredDelivery,
    Transaction,
    deliveries_table,
)
from .views import discard_awaitable, endpoint_name, make_blueprint
from .worker import process_due

if TYPE_CHECKING:
    from flask.typing import ResponseReturnValue
    from flask_sqlalchemy import SQLAlchemy

    from .console import ConsoleSettings
    from .metrics import Metrics

logger = logging.getLogger("flask_orderhooks")

#: Decides whether the current request may use the operator console: returns
#: True, False or None, or a response object (such as a redirect to the host's
#: login page). The console refuses anything else with 403 (docs/console.rst);
#: the wide return type keeps hosts' ``-> bool | ResponseReturnValue`` valid.
ConsoleAccess = Callable[[], "bool | ResponseReturnValue | None"]

#: ``(provider, callback, key, countdown seconds)``: hands a delivery to a
#: queue such as Celery; see :attr:`OrderHooks.enqueuer`.
Enqueuer = Callable[[str, str, str, float], None]

#: The store's columns' widths for a provider's and a callback's name.
_MAX_NAME = {"provider": 16, "callback": 32}


@dataclass(frozen=True)
class AppState:
    """What :class:`OrderHooks` keeps for one application."""

    settings: Settings
    store: DeliveryStore
    providers: Mapping[str, Provider]
    clock: Callable[[], float]
    standalone: StandaloneDatabase | None
    #: Hands a stored delivery to the enqueuer, if any (never raises).
    enqueue: Callable[[str, str, str, float], None]
    #: Observers of answers, dispatches and attempts (metrics).
    instruments: Instruments = field(default_factory=Instruments)
    #: Platforms whose allow list was found read through a proxy the app does
    #: not resolve (warned once per process, see views._check_source).
    unresolved_proxy_warned: set[str] = field(default_factory=set)

    @property
    def routes(self) -> list[tuple[str, str]]:
        """Every configured ``(provider, callback)``: under these a key is
        found by primary key, and metrics label series."""
        return [(name, cb) for name, provider in self.providers.items() for cb in provider.routes]


class OrderHooks:
    """Receive verified, de-duplicated order and payment callbacks.

    :param app: the application to register on now, or ``None`` to call
        :meth:`init_app` later.
    :param db: the host's Flask-SQLAlchemy object. The deliveries table then
        joins its metadata (``db.create_all()`` and Flask-Migrate see it) and
        receivers' ``db.session`` writes commit together with the delivery.
        Without it the extension keeps its own store at
        ``ORDERHOOKS_DATABASE_URI`` (default: SQLite in the instance folder).
    :param engine_options: extra :func:`sqlalchemy.create_engine` options for
        the extension's own store (ignored with ``db=``).
    :param providers: the platforms, as :class:`Provider` subclasses (default
        :data:`BUILTIN_PROVIDERS`); each is on when :meth:`Provider.from_config`
        finds its keys in the app's config.
    :param clock: Unix time in seconds; replace it in tests to freeze time.
        Every stored time, due times included, comes from it.

    .. versionadded:: 0.1
    .. versionchanged:: 0.2
        Deferred dispatch, local retries and workers: :meth:`process_due`,
        :meth:`dispatch_due`, :attr:`enqueuer`.
    .. versionchanged:: 0.3
        ``providers``: platforms of the host's own, through the same pipeline.
    """

    #: Set by :func:`flask_orderhooks.celery.init_celery` (or by a host for
    #: another queue): called with ``(provider, callback, key, countdown)``
    #: right after a deferred delivery is stored (countdown 0) and after a
    #: failed attempt that has a next one (countdown: seconds until it is
    #: due). The store stays the source of truth: an enqueuer that raises is
    #: logged at WARNING, and workers or a sweep find the delivery anyway.
    enqueuer: Enqueuer | None = None

    def __init__(
        self,
        app: Flask | None = None,
        *,
        db: SQLAlchemy | None = None,
        engine_options: Mapping[str, Any] | None = None,
        providers: Sequence[type[Provider]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.provider_classes = _checked_providers(
            BUILTIN_PROVIDERS if providers is None else providers
        )
        self.engine_options = dict(engine_options or {})
        self.clock = clock
        self.enqueuer = None
        self.console_access_check: ConsoleAccess | None = None
        self._states: WeakKeyDictionary[Flask, AppState] = WeakKeyDictionary()
        if app is not None:
            self.init_app(app)

    def __repr__(self) -> str:
        return (
            f"<OrderHooks db={'host' if self.db is not None else 'own'} apps={len(self._states)}>"
        )

    def init_app(self, app: Flask) -> None:
        """Validate the config, register the routes and prepare the store.

        When it raises, the app is left without the extension (its routes,
        its metrics), and ``init_app`` can be called again once the cause is
        fixed; the one exception, a blueprint that fails for none of the
        reasons below after another was registered (Flask cannot unregister
        one), is said in a note on the error.

        :raises ConfigurationError: a ``ORDERHOOKS_*`` value is wrong.
        :raises RuntimeError: the app already has an ``OrderHooks``, or a
            blueprint of its own under a name the extension registers.
        :raises AssertionError: Flask's: the app has handled a request, after
            which it registers no more routes.
        """
        if "orderhooks" in app.extensions:
            raise RuntimeError(
                "An OrderHooks instance is already registered on this app. Create one "
                "OrderHooks per app and call init_app(app) once."
            )
        for key, value in DEFAULTS.items():
            # A copy of a list default: editing one app's list must not edit
            # the defaults of the apps made after it.
            app.config.setdefault(key, copy.deepcopy(value))
        for provider_class in self.provider_classes:
            for key, value in provider_class.config_defaults.items():
                app.config.setdefault(key, copy.deepcopy(value))
        _warn_of_unknown_keys(app, self.provider_classes)
        settings = load_settings(app.config, [p.name for p in self.provider_classes])
        configured = {p.name: p.from_config(app.config) for p in self.provider_classes}
        providers = {name: p for name, p in configured.items() if p is not None}
        _check_routes(providers.values())
        # Every check that can fail runs before anything is registered: a
        # config error leaves the app as it was, and init_app can be called
        # again once the config is fixed.
        console = self._console_settings(app)
        standalone: StandaloneDatabase | None = None
        if self.db is not None:
            store = self._host_store(settings)
        else:
            standalone = self._standalone(app, settings)
            store = DeliveryStore(
                engine=standalone.engine,
                dispatch_transaction=standalone.transaction,
                table=standalone.table,
                duplicate_wait=settings.duplicate_wait,
                claim_timeout=settings.claim_timeout,
                retries=RetrySchedule.of(settings.retry_delays),
                clock=self.clock,
                prepare=standalone.ensure_table,
                on_failure=self._failed,
                shared_engine=False,
            )
        state = AppState(
            settings=settings,
            store=store,
            providers=providers,
            clock=self.clock,
            standalone=standalone,
            enqueue=self._enqueue,
        )
        try:
            self._register(app, state, console)
        except BaseException:
            if standalone is not None:
                # Nothing has connected through it yet; it goes with the app's
                # failed set-up instead of lingering until collected.
                standalone.engine.dispose()
            raise
        # Only once every registration succeeded: an app that carries these
        # is one whose routes are all served.
        self._states[app] = state
        app.extensions["orderhooks"] = self
        off = [name for name, provider in configured.items() if provider is None]
        if off:
            logger.info(
                "OrderHooks: %s off (no credentials configured); their routes answer 404.",
                ", ".join(off),
            )

    def _register(self, app: Flask, state: AppState, console: ConsoleSettings | None) -> None:
        """Register the metrics, the callback routes and the console on
        ``app``, or, when any of it fails, nothing at all.

        Flask cannot unregister a blueprint. The refusals it makes are
        therefore checked before the first one (a blueprint name the app
        has already), or made by the first one before it changes anything
        (an app that has handled a request refuses every setup method);
        what is undone is ours: the metrics' collectors in their registry
        (which a shared registry would refuse at the next init_app) and
        their entry in ``app.extensions``.
        """
        ours = [_CALLBACKS_BLUEPRINT]
        if console is not None:
            ours.append(_CONSOLE_BLUEPRINT)
        if app.config.get("ORDERHOOKS_METRICS_URL"):
            ours.append(_METRICS_BLUEPRINT)
        _check_blueprint_names(app, ours)
        # Last of the config checks: it registers the metrics in their
        # registry, and leaves nothing there when it fails.
        metrics = self._metrics(app, state)
        registered = set(app.blueprints)
        try:
            app.register_blueprint(
                make_blueprint(state), url_prefix=state.settings.url_prefix or None
            )
            if console is not None:
                from .console import register_console  # noqa: PLC0415

                register_console(app, self, state, console)
            if metrics is not None:
                from .metrics import serve_metrics  # noqa: PLC0415

                serve_metrics(app, state, *metrics)
        except BaseException as exc:
            if metrics is not None:
                _forget_metrics(app, metrics[1])
            left = sorted(set(app.blueprints) - registered)
            if left:
                # None of the refusals above: nothing to promise.
                exc.add_note(
                    f"OrderHooks.init_app had registered the blueprints {left} on the app "
                    "already, which Flask cannot unregister: set up a new app."
                )
            else:
                exc.add_note(
                    "OrderHooks.init_app left the app as it was: fix the cause and call "
                    "init_app(app) again."
                )
            raise

    @staticmethod
    def _console_settings(app: Flask) -> ConsoleSettings | None:
        # Imported only when asked for: the console's templates cost nothing
        # to an app without it.
        if not app.config.get("ORDERHOOKS_CONSOLE_URL"):
            return None
        from .console import load_settings as load_console_settings  # noqa: PLC0415

        return load_console_settings(app)

    def _metrics(self, app: Flask, state: AppState) -> tuple[str, Metrics] | None:
        # Imported only when asked for: prometheus_client is optional.
        if not app.config.get("ORDERHOOKS_METRICS_URL"):
            return None
        from .metrics import prepare_metrics  # noqa: PLC0415

        return prepare_metrics(app, self, state)

    def console_access(self, check: ConsoleAccess) -> ConsoleAccess:
        """Register the function that decides who may use the operator console.

        Called for every console request (inside the request context); it
        returns ``True`` to let the request through, ``False`` or ``None`` to
        refuse it with 403, or a response object (a redirect to the host's
        login page) to send instead. Anything else (``1``, a string such as
        ``session.get("staff")``) is refused with 403 and logged at ERROR.
        Without one, every console request is refused::

            @hooks.console_access
            def staff_only():
                return current_user.is_authenticated and current_user.is_staff

        .. versionadded:: 0.3
        """
        self.console_access_check = check
        return check

    def _host_store(self, settings: Settings) -> DeliveryStore:
        db = self.db
        assert db is not None
        table = deliveries_table(db.metadata)

        @contextmanager
        def host_transaction() -> Iterator[Transaction]:
            session = db.session()
            transaction = SessionTransaction(session)
            try:
                yield transaction
            except BaseException:
                session.rollback()
                raise
            finally:
                transaction.close()

        def engine() -> Engine:
            return db.engine

        return DeliveryStore(
            engine=engine,
            dispatch_transaction=host_transaction,
            table=table,
            duplicate_wait=settings.duplicate_wait,
            claim_timeout=settings.claim_timeout,
            retries=RetrySchedule.of(settings.retry_delays),
            clock=self.clock,
            on_failure=self._failed,
        )

    def _standalone(self, app: Flask, settings: Settings) -> StandaloneDatabase:
        uri = settings.database_uri
        if uri is None:
            os.makedirs(app.instance_path, exist_ok=True)
            uri = "sqlite:///" + os.path.join(app.instance_path, "orderhooks.sqlite3")
        try:
            return StandaloneDatabase(
                uri, busy_timeout=settings.duplicate_wait, engine_options=self.engine_options
            )
        except ImportError as exc:
            # The URL is checked (config.py); what is left is its driver.
            raise ConfigurationError(
                "ORDERHOOKS_DATABASE_URI",
                f"needs the database driver {exc.name!r}, which is not installed "
                "(pip install 'flask-orderhooks[postgres]' or 'flask-orderhooks[mysql]').",
            ) from None

    def state(self, app: Flask | None = None) -> AppState:
        """The per-app state: settings, store and providers.

        :raises RuntimeError: ``init_app`` was not called for the app.
        """
        target: Flask = app if app is not None else current_app._get_current_object()  # type: ignore[attr-defined]
        try:
            return self._states[target]
        except KeyError:
            raise RuntimeError(
                "OrderHooks is not registered on this app. Call hooks.init_app(app) "
                "(or pass the app to OrderHooks(app))."
            ) from None

    def process_due(self, limit: int | None = None) -> int:
        """Dispatch every delivery due now, inside an app context: one pass
        of a worker, for cron, Celery beat and tests.

        Due: stored by deferred dispatch, failed with its retry delay over, or
        claimed by a worker that died (its lease ran out).

        :param limit: attempt at most this many deliveries.
        :returns: how many deliveries it attempted (done or failed).
        :raises StoreUnavailable: the store failed while looking for work.

        .. versionadded:: 0.2
        """
        app: Flask = current_app._get_current_object()  # type: ignore[attr-defined]
        return process_due(app, self.state(app), limit=limit).attempted

    def dispatch_due(self, provider: str, callback: str, key: str) -> bool:
        """Dispatch one delivery if it is due now (else do nothing), inside
        an app context. What the Celery task ``orderhooks.dispatch`` runs.

        :returns: whether it was attempted.

        .. versionadded:: 0.2
        """
        app: Flask = current_app._get_current_object()  # type: ignore[attr-defined]
        return process_due(app, self.state(app), key=(provider, callback, key)).attempted > 0

    def _enqueue(self, provider: str, callback: str, key: str, countdown: float) -> None:
        enqueuer = self.enqueuer
        if enqueuer is None:
            return
        try:
            enqueuer(provider, callback, key, countdown)
        except Exception as exc:
            # Never fails the request or the worker: the row is stored, and
            # a worker or the sweep finds it.
            logger.warning(
                "%s %s %s: could not enqueue (%s: %s); a worker or the sweep will find it",
                provider,
                callback,
                for_log(key),
                type(exc).__name__,
                exc,
            )

    def _failed(self, delivery: StoredDelivery, error: str) -> None:
        """The store recorded a failed attempt: tell operators, plan the retry."""
        app: Flask = current_app._get_current_object()  # type: ignore[attr-defined]
        next_attempt = delivery.next_attempt_at if delivery.status == FAILED else None
        _tell_operators(app, delivery_failed, delivery, error=error, next_attempt_at=next_attempt)
        if delivery.status == DEAD:
            logger.error(
                "%s %s %s: dead after %d attempts: %s",
                delivery.provider,
                delivery.callback,
                for_log(delivery.key),
                delivery.attempts,
                error,
            )
            _tell_operators(app, delivery_dead, delivery, error=error)
        elif next_attempt is not None:
            countdown = max(0.0, next_attempt.timestamp() - self.clock())
            self._enqueue(delivery.provider, delivery.callback, delivery.key, countdown)

    @property
    def store(self) -> DeliveryStore:
        """The delivery store of the current app."""
        return self.state().store

    def create_all(self, app: Flask | None = None) -> None:
        """Create the deliveries table of the extension's own store now.

        With ``db=`` use ``db.create_all()`` or a migration instead.
        """
        standalone = self.state(app).standalone
        if standalone is None:
            raise RuntimeError(
                "The deliveries table belongs to the host's database: run db.create_all() "
                "or a Flask-Migrate migration."
            )
        standalone.ensure_table()


def _tell_operators(
    app: Flask, signal: NamedSignal, delivery: StoredDelivery, **kwargs: Any
) -> None:
    """Send an operator signal to each of its receivers in turn.

    A receiver that raises (a chat webhook that is down) is logged and
    changes nothing: the others still hear of it, the dead delivery is still
    logged and paged, and the retry is still enqueued. (``send()`` would
    stop at the first receiver that raised.)"""
    if signal.is_muted:
        # blinker's muted() (a host's test or script), which send() honours.
        return
    for receiver in signal.receivers_for(app):
        if inspect.iscoroutinefunction(receiver):
            # Called, it would only make a coroutine nobody awaits (blinker's
            # send() refuses it too).
            logger.error(
                "%s %s %s: a receiver of %s is a coroutine function (%r); operator "
                "signals call their receivers synchronously, so it was not called",
                delivery.provider,
                delivery.callback,
                for_log(delivery.key),
                signal.name,
                receiver,
            )
            continue
        try:
            result = receiver(app, delivery=delivery, **kwargs)
        except Exception:
            logger.exception(
                "%s %s %s: a receiver of %s raised; the delivery is unchanged",
                delivery.provider,
                delivery.callback,
                for_log(delivery.key),
                signal.name,
            )
            continue
        if discard_awaitable(result):
            # An object whose __call__ is async def (or a function that
            # returns a coroutine) passes the check above: what it meant to
            # do never ran, which operators must hear of like the above.
            logger.error(
                "%s %s %s: a receiver of %s returned an awaitable (%r, a %s) that nothing "
                "awaits; operator signals call their receivers synchronously, so its work "
                "did not run",
                delivery.provider,
                delivery.callback,
                for_log(delivery.key),
                signal.name,
                receiver,
                type(result).__name__,
            )


#: The name of each blueprint :meth:`OrderHooks.init_app` registers, and
#: what it serves. (The console's is :data:`flask_orderhooks.console.BLUEPRINT`,
#: the metrics' the one :func:`flask_orderhooks.metrics.serve_metrics` gives:
#: tests/test_request_path_defects.py holds these to them.)
_CALLBACKS_BLUEPRINT = ("orderhooks", "callback routes")
_CONSOLE_BLUEPRINT = ("orderhooks_console", "operator console")
_METRICS_BLUEPRINT = ("orderhooks_metrics", "metrics route")


def _check_blueprint_names(app: Flask, blueprints: Iterable[tuple[str, str]]) -> None:
    """Refuse an app that already has a blueprint under a name of ours:
    Flask would refuse it only at its registration, maybe after another of
    ours was registered, and a blueprint cannot be unregistered."""
    for name, what in blueprints:
        if name in app.blueprints:
            raise RuntimeError(
                f"The app already has a blueprint named {name!r}, the name of OrderHooks' "
                f"{what}. Register the app's own under another name "
                "(app.register_blueprint(blueprint, name=...)) before calling init_app."
            )


def _forget_metrics(app: Flask, metrics: Metrics) -> None:
    """Undo what preparing and attaching ``metrics`` did: register its
    collectors in its registry, and set it in ``app.extensions``."""
    for key in [key for key, value in app.extensions.items() if value is metrics]:
        del app.extensions[key]
    metrics.unregister()


def _checked_providers(classes: Sequence[type[Provider]]) -> tuple[type[Provider], ...]:
    """``classes``, refused at once when one cannot serve: a wrong type, a
    name missing, too long for the store, spelt with characters that are not
    allowed, or used twice."""
    seen: set[str] = set()
    for cls in classes:
        if not (isinstance(cls, type) and issubclass(cls, Provider)):
            raise TypeError(f"providers must be Provider subclasses, not {cls!r}.")
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not _valid_name(name, "provider"):
            raise ValueError(
                f"{cls.__name__}.name must be 1 to {_MAX_NAME['provider']} {_NAME_CHARACTERS}, "
                f"not {name!r}."
            )
        if name in seen:
            raise ValueError(f"Two providers are named {name!r}; names must be unique.")
        seen.add(name)
    return tuple(classes)


#: A provider's or a callback's name is a segment of the console's URLs, part
#: of a Flask endpoint and a metrics label: no "/", no space, nothing a URL
#: or a terminal would read otherwise.
_NAME = re.compile(r"[A-Za-z0-9._-]+")
_NAME_CHARACTERS = "characters: ASCII letters, digits, '.', '-' or '_'"


def _valid_name(name: str, kind: str) -> bool:
    return 0 < len(name) <= _MAX_NAME[kind] and _NAME.fullmatch(name) is not None


def _check_routes(providers: Iterable[Provider]) -> None:
    """Every callback name fits the store and the console's URLs, and no two
    routes of any providers share a URL rule or a Flask endpoint (``-`` and
    ``.`` are spelt ``_`` there)."""
    endpoints: dict[str, tuple[Provider, str]] = {}
    rules: dict[str, tuple[Provider, str]] = {}
    for provider in providers:
        for callback, rule in provider.routes.items():
            if rule in rules:
                # Flask would send every request to the first one registered.
                raise ValueError(
                    f"{_both(provider, callback, rules[rule])} have the same URL rule "
                    f"{rule!r}; give each its own."
                )
            rules[rule] = (provider, callback)
            if not _valid_name(callback, "callback"):
                raise ValueError(
                    f"{type(provider).__name__}: the callback name {callback!r} must be 1 to "
                    f"{_MAX_NAME['callback']} {_NAME_CHARACTERS}."
                )
            endpoint = endpoint_name(provider.name, callback)
            if endpoint in endpoints:
                raise ValueError(
                    f"{_both(provider, callback, endpoints[endpoint])} would share the "
                    f"endpoint {endpoint!r}; rename one."
                )
            endpoints[endpoint] = (provider, callback)


def _both(provider: Provider, callback: str, other: tuple[Provider, str]) -> str:
    """The two routes of a clash, as its message names them."""
    them, its_callback = other
    return (
        f"{type(provider).__name__}: the callback {provider.name}/{callback} and "
        f"{type(them).__name__}'s {them.name}/{its_callback}"
    )


def get_extension(app: Flask | None = None) -> OrderHooks:
    """The :class:`OrderHooks` registered on ``app`` (default: the current app)."""
    target: Flask = app if app is not None else current_app._get_current_object()  # type: ignore[attr-defined]
    ext = target.extensions.get("orderhooks")
    if not isinstance(ext, OrderHooks):
        raise RuntimeError(
            "OrderHooks is not registered on this app. Call hooks.init_app(app) "
            "(or pass the app to OrderHooks(app))."
        )
    return ext


def _warn_of_unknown_keys(app: Flask, provider_classes: Sequence[type[Provider]]) -> None:
    """Log each ``ORDERHOOKS_*`` key nothing reads, and the key it may have
    meant: a misspelt secret leaves its platform off (404) with no error."""
    # The built-in platforms' keys are known even when the app leaves those
    # providers out: set, they are only unused, not misspelt.
    classes = {*BUILTIN_PROVIDERS, *provider_classes}
    known = known_keys(provider_class.config_defaults for provider_class in classes)
    for key, close in unknown_keys(app.config, known):
        hint = f" Did you mean {close}?" if close else ""
        logger.warning(
            "OrderHooks: %s is not a setting of flask-orderhooks or of its providers; "
            "it is ignored.%s",
            key,
            hint,
        )
