"""The :class:`OrderHooks` extension object."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

from flask import Flask, current_app
from sqlalchemy.engine import Engine

from .config import DEFAULTS, PLATFORMS, Settings, load_settings
from .gateway import GatewayProvider
from .igv import IGVProvider
from .provider import Provider
from .store import (
    DeliveryStore,
    SessionTransaction,
    StandaloneDatabase,
    Transaction,
    deliveries_table,
)
from .sud import SUDProvider
from .views import make_blueprint

if TYPE_CHECKING:
    from flask_sqlalchemy import SQLAlchemy

logger = logging.getLogger("flask_orderhooks")

_PROVIDERS: dict[str, type[Provider]] = {
    "igv": IGVProvider,
    "gateway": GatewayProvider,
    "sud": SUDProvider,
}


@dataclass(frozen=True)
class AppState:
    """What :class:`OrderHooks` keeps for one application."""

    settings: Settings
    store: DeliveryStore
    providers: Mapping[str, Provider]
    clock: Callable[[], float]
    standalone: StandaloneDatabase | None


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
    :param clock: Unix time in seconds; replace it in tests to freeze time.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        app: Flask | None = None,
        *,
        db: SQLAlchemy | None = None,
        engine_options: Mapping[str, Any] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.engine_options = dict(engine_options or {})
        self.clock = clock
        self._states: WeakKeyDictionary[Flask, AppState] = WeakKeyDictionary()
        if app is not None:
            self.init_app(app)

    def __repr__(self) -> str:
        return (
            f"<OrderHooks db={'host' if self.db is not None else 'own'} apps={len(self._states)}>"
        )

    def init_app(self, app: Flask) -> None:
        """Validate the config, register the routes and prepare the store.

        :raises ConfigurationError: a ``ORDERHOOKS_*`` value is wrong.
        :raises RuntimeError: the app already has an ``OrderHooks``.
        """
        if "orderhooks" in app.extensions:
            raise RuntimeError(
                "An OrderHooks instance is already registered on this app. Create one "
                "OrderHooks per app and call init_app(app) once."
            )
        for key, value in DEFAULTS.items():
            app.config.setdefault(key, value)
        settings = load_settings(app.config)
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
                clock=self.clock,
                prepare=standalone.ensure_table,
            )
        providers = {name: _PROVIDERS[name](settings) for name in settings.enabled_platforms}
        state = AppState(
            settings=settings,
            store=store,
            providers=providers,
            clock=self.clock,
            standalone=standalone,
        )
        self._states[app] = state
        app.extensions["orderhooks"] = self
        app.register_blueprint(make_blueprint(state), url_prefix=settings.url_prefix or None)
        off = [p for p in PLATFORMS if p not in providers]
        if off:
            logger.info(
                "OrderHooks: %s off (no credentials configured); their routes answer 404.",
                ", ".join(off),
            )
        if "sud" in providers and not settings.sud_verify:
            logger.warning(
                "OrderHooks: ORDERHOOKS_SUD_VERIFY is False: SUD callbacks are accepted "
                "WITHOUT checking their signature. Anyone can post game orders."
            )

    def _host_store(self, settings: Settings) -> DeliveryStore:
        db = self.db
        assert db is not None
        table = deliveries_table(db.metadata)

        @contextmanager
        def host_transaction() -> Iterator[Transaction]:
            session = db.session()
            try:
                yield SessionTransaction(session)
            except BaseException:
                session.rollback()
                raise

        def engine() -> Engine:
            return db.engine

        return DeliveryStore(
            engine=engine,
            dispatch_transaction=host_transaction,
            table=table,
            duplicate_wait=settings.duplicate_wait,
            claim_timeout=settings.claim_timeout,
            clock=self.clock,
        )

    def _standalone(self, app: Flask, settings: Settings) -> StandaloneDatabase:
        uri = settings.database_uri
        if uri is None:
            os.makedirs(app.instance_path, exist_ok=True)
            uri = "sqlite:///" + os.path.join(app.instance_path, "orderhooks.sqlite3")
        return StandaloneDatabase(
            uri, busy_timeout=settings.duplicate_wait, engine_options=self.engine_options
        )

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
