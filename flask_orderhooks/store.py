"""The durable, idempotent delivery store: exactly-once dispatch.

One row per ``(provider, callback, key)``. A delivery moves through two short
transactions:

1. **Claim** (committed at once): one upsert (on PostgreSQL run alone in
   autocommit mode, one round trip) that inserts the delivery as
   ``processing`` with a lease, or takes over a ``failed`` row or one whose
   lease ran out (its worker died). The raw body and signed headers are
   stored here, before any receiver runs, so nothing verified is ever lost.
2. **Dispatch**: its *first* statement marks the row ``done`` (fenced by the
   claim's token); then the receivers run in the same transaction; then one
   commit makes their writes and the ``done`` mark durable together. That
   first statement takes the row lock (PostgreSQL) or the write lock (SQLite),
   so a concurrent duplicate's claim waits for the outcome instead of polling.

A receiver that raises rolls everything back and a third statement, committed
on its own like the claim, records the failure, so the platform's retry (or
``flask orderhooks replay``) dispatches again. Claims use the dialect's
``INSERT … ON CONFLICT`` with ``RETURNING``: never check-then-insert, never
``rowcount`` (psycopg 3 reports -1 for it under SQLAlchemy 2.1).
"""

from __future__ import annotations

import builtins
import functools
import hashlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from .driver_statement import DriverStatement
from .exc import (
    CallbackError,
    KeyConflict,
    MalformedPayload,
    ReceiverFailed,
    StaleSnapshot,
    StoreUnavailable,
)
from .provider import Delivery

logger = logging.getLogger("flask_orderhooks")

TABLE_NAME = "orderhooks_deliveries"
#: Longest idempotency key stored; fits a unique index on every backend.
MAX_KEY_LENGTH = 191
#: Longest error text kept for a failed attempt.
MAX_ERROR_LENGTH = 2000

PROCESSING = "processing"
DONE = "done"
FAILED = "failed"
STATUSES = (PROCESSING, DONE, FAILED)

# SQLSTATE of PostgreSQL's lock_timeout expiring.
_PG_LOCK_NOT_AVAILABLE = "55P03"
# How often a duplicate re-reads a delivery that another worker has claimed
# but not yet locked for dispatch (a window of one round trip).
_POLL_INTERVAL = 0.02


def deliveries_table(metadata: sa.MetaData) -> sa.Table:
    """The ``orderhooks_deliveries`` table in ``metadata`` (created once)."""
    existing = metadata.tables.get(TABLE_NAME)
    if existing is not None:
        return existing
    return sa.Table(
        TABLE_NAME,
        metadata,
        sa.Column("provider", sa.String(16), primary_key=True),
        sa.Column("callback", sa.String(32), primary_key=True),
        sa.Column("key", sa.String(MAX_KEY_LENGTH), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("claim_token", sa.String(32), nullable=False),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
        sa.Column("body_sha256", sa.String(64), nullable=False),
        sa.Column("headers", sa.Text, nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Index("ix_orderhooks_deliveries_status_updated", "status", "updated_at"),
    )


@dataclass(frozen=True)
class Claim:
    """This worker owns a delivery's current attempt."""

    token: str
    attempt: int


@dataclass(frozen=True)
class StoredDelivery:
    """A row of the store, as the CLI and tests read it."""

    provider: str
    callback: str
    key: str
    status: str
    attempts: int
    body: bytes
    headers: dict[str, str]
    error: str | None
    created_at: datetime
    updated_at: datetime
    lease_expires_at: datetime


Outcome = Literal["dispatched", "duplicate"]


class Transaction(Protocol):
    """What the dispatch needs of the transaction receivers write in."""

    def connection(self) -> Connection:
        """The transaction's connection, its transaction begun."""
        ...

    def commit(self) -> None: ...

    def rollback(self) -> None: ...


class SessionTransaction:
    """The host's ``db.session`` as the dispatch's :class:`Transaction`: the
    store's statements run on its connection, receivers use the session, and
    one ``commit()`` flushes and commits both."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def connection(self) -> Connection:
        return self.session.connection()

    def commit(self) -> None:
        self.session.commit()

    def rollback(self) -> None:
        self.session.rollback()


class ConnectionTransaction:
    """A plain :class:`~sqlalchemy.engine.Connection` as the dispatch's
    :class:`Transaction` (the store's own database)."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection

    def connection(self) -> Connection:
        return _begun(self._connection)

    def commit(self) -> None:
        self._connection.commit()

    def rollback(self) -> None:
        self._connection.rollback()


def _begun(connection: Connection) -> Connection:
    """``connection`` with its SQLAlchemy transaction begun.

    The store's statements run on the driver cursor, which does not autobegin
    one; without it ``commit()`` would commit nothing. (It may be begun
    already: by the host's session, or by a PRAGMA run through SQLAlchemy.)
    """
    if not connection.in_transaction():
        connection.begin()
    return connection


def _utc(value: datetime) -> datetime:
    # SQLite hands back naive datetimes; everything stored is UTC.
    return value if value.tzinfo else value.replace(tzinfo=UTC)


class DeliveryStore:
    """Claims, dispatches and records deliveries in one SQL table.

    The store's own statements run on plain connections of ``engine`` (no ORM
    session: it costs more CPU than the statements). Only the dispatch runs in
    ``dispatch_transaction``, the transaction receivers write in.

    :param engine: the engine, or a callable returning it (the host's engine
        is only known inside an app context).
    :param dispatch_transaction: a context manager factory yielding the
        dispatch's :class:`Transaction`: the host's ``db.session``, or a
        connection of ``engine``.
    :param table: the deliveries table.
    :param clock: Unix time in seconds (injectable for tests).
    """

    def __init__(
        self,
        *,
        engine: Engine | Callable[[], Engine],
        dispatch_transaction: Callable[[], AbstractContextManager[Transaction]],
        table: sa.Table,
        duplicate_wait: float,
        claim_timeout: float,
        clock: Callable[[], float] = time.time,
        prepare: Callable[[], None] | None = None,
    ) -> None:
        self._engine = engine
        self._dispatch_transaction = dispatch_transaction
        self.table = table
        self.duplicate_wait = duplicate_wait
        self.claim_timeout = claim_timeout
        self._clock = clock
        self._prepare = prepare

    @property
    def engine(self) -> Engine:
        if not isinstance(self._engine, Engine):
            self._engine = self._engine()
        return self._engine

    @contextmanager
    def _own_transaction(self) -> Iterator[Connection]:
        """A connection for the store's statements outside the dispatch (the
        claim, the failure record), committed when the block ends.

        On PostgreSQL it is in autocommit mode: each of those statements is
        its own transaction, so no BEGIN and no COMMIT travel to the server
        (three round trips become one). On SQLite there is no round trip to
        save, and switching the isolation level costs more than the BEGIN
        and COMMIT, so it is one plain transaction, at ``synchronous=NORMAL``
        in WAL mode (see :func:`_relaxed_sqlite_sync`).
        """
        if self.dialect == "postgresql":
            with self._autocommit_engine.connect() as connection:
                yield connection
            return
        with self.engine.connect() as connection, _relaxed_sqlite_sync(connection):
            yield _begun(connection)
            connection.commit()

    @functools.cached_property
    def _autocommit_engine(self) -> Engine:
        # Shares the engine's pool; the isolation level is restored when a
        # connection goes back to it.
        return self.engine.execution_options(isolation_level="AUTOCOMMIT")

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def __repr__(self) -> str:
        return f"<DeliveryStore {self.dialect} table={self.table.name!r}>"

    # -- the pipeline ----------------------------------------------------------

    def deliver(self, delivery: Delivery, dispatch: Callable[[], None]) -> Outcome:
        """Claim ``delivery``, run ``dispatch`` once, and record the outcome.

        :returns: ``"dispatched"``, or ``"duplicate"`` when it was already done.
        :raises KeyConflict: the key is stored with a different body.
        :raises ReceiverFailed: ``dispatch`` raised; the delivery is stored failed.
        :raises StoreUnavailable: the store failed or another worker holds it.
        """
        if len(delivery.key) > MAX_KEY_LENGTH:
            raise MalformedPayload(f"The idempotency key is longer than {MAX_KEY_LENGTH}.")
        claim = self.claim(delivery)
        if claim is None:
            return "duplicate"
        self.dispatch(delivery, claim, dispatch)
        return "dispatched"

    def claim(self, delivery: Delivery, *, force: bool = False) -> Claim | None:
        """Take the delivery's next attempt, or ``None`` if it is already done.

        :param force: take a ``done`` delivery too (``replay --force``).
        """
        if self._prepare is not None:
            with self._store_errors(delivery):
                self._prepare()
        digest = hashlib.sha256(delivery.body).hexdigest()
        token = secrets.token_hex(16)
        deadline = time.monotonic() + self.duplicate_wait
        while True:
            remaining = deadline - time.monotonic()
            with self._store_errors(delivery), self._own_transaction() as connection:
                now = self._now()
                row = self._sql.claim.first(
                    connection,
                    {
                        **self._key_params(delivery),
                        "p_token": token,
                        "p_lease": now + timedelta(seconds=self.claim_timeout),
                        "p_body": delivery.body,
                        "p_digest": digest,
                        "p_headers": json.dumps(dict(delivery.headers), sort_keys=True),
                        "p_now": now,
                        "p_takeover": DONE if force else FAILED,
                        # PostgreSQL's lock_timeout: ON CONFLICT waits for
                        # another worker's row lock, unbounded by default.
                        "p_ms": f"{max(1, int(remaining * 1000))}ms",
                    },
                )
                if row is not None:
                    stored_token, attempts = row
                    if stored_token == token:
                        return Claim(token=token, attempt=attempts)
                current = self._sql.state.first(connection, self._key_params(delivery))
            # None: purged between the two statements, so claim again.
            if current is not None:
                status, stored_digest = current
                if status == DONE:
                    if stored_digest != digest:
                        logger.warning(
                            "%s %s %s: already done; a resend with a different body was ignored",
                            delivery.provider,
                            delivery.callback,
                            delivery.key,
                        )
                    return None
                if stored_digest != digest:
                    raise KeyConflict("This key is stored with a different body.")
            if time.monotonic() >= deadline:
                raise StoreUnavailable("Another worker is handling this delivery; retry later.")
            time.sleep(min(_POLL_INTERVAL, max(0.0, deadline - time.monotonic())))

    def dispatch(self, delivery: Delivery, claim: Claim, dispatch: Callable[[], None]) -> None:
        """Run ``dispatch`` inside the transaction that marks the claim done."""
        with self._store_errors(delivery), self._dispatch_transaction() as session:
            try:
                self._see_the_claim(session, delivery)
                marked = self._mark_done(session, delivery, claim)
            except (SQLAlchemyError, StaleSnapshot) as exc:
                # No receiver ran. Hand the claim back now, or every retry is
                # refused until the lease runs out although nobody holds it.
                session.rollback()
                self._mark_failed(delivery, claim, exc)
                raise
            if not marked:
                session.rollback()
                raise StoreUnavailable("The claim on this delivery expired; retry later.")
            try:
                dispatch()
            except Exception as exc:
                session.rollback()
                self._mark_failed(delivery, claim, exc)
                if isinstance(exc, CallbackError):
                    raise
                raise ReceiverFailed("A receiver failed; the delivery will be retried.") from exc
            try:
                session.commit()
            except IntegrityError as exc:
                # Flushed at commit: the receivers' writes broke a constraint.
                session.rollback()
                self._mark_failed(delivery, claim, exc)
                raise ReceiverFailed("A receiver failed; the delivery will be retried.") from exc
            except SQLAlchemyError as exc:
                session.rollback()
                self._mark_failed(delivery, claim, exc)
                raise

    def _see_the_claim(self, session: Transaction, delivery: Delivery) -> None:
        """Make sure the dispatch transaction can see the committed claim.

        The host's session may have begun its transaction before the callback
        view (a ``before_request`` hook that reads). At READ COMMITTED every
        statement sees what was committed before it; at REPEATABLE READ and
        SERIALIZABLE the whole transaction keeps the snapshot of its first
        statement, which predates the claim, so the done mark would find no
        row, on every retry. A transaction that has only read is rolled back
        (nothing is lost: the session's objects are expired and reload); one
        that has written is refused, because committing or rolling it back
        here would change what the host wrote. This costs a round trip only
        when the session's transaction had already begun. (On SQLite the
        stale snapshot makes the done mark fail as busy, and its retry rolls
        the session back.)
        """
        if self.dialect != "postgresql":
            return
        connection = session.connection()
        info = getattr(connection.connection.dbapi_connection, "info", None)
        # psycopg and psycopg2 both report libpq's status; 0 is IDLE.
        if getattr(info, "transaction_status", 0) == 0:
            return
        level, wrote = connection.exec_driver_sql(
            "SELECT current_setting('transaction_isolation'),"
            " pg_current_xact_id_if_assigned() IS NOT NULL"
        ).one()
        if level in ("read committed", "read uncommitted"):
            return
        if not wrote:
            session.rollback()
            return
        logger.warning(
            "%s %s %s: db.session began a %s transaction and wrote before the callback "
            "view; its snapshot cannot see the delivery's claim. Commit (or don't write) "
            "before the view runs, or use READ COMMITTED for it.",
            delivery.provider,
            delivery.callback,
            delivery.key,
            level.upper(),
        )
        raise StaleSnapshot(
            f"The app's database session began a {level} transaction before this "
            "callback; the delivery was kept for retry."
        )

    def _mark_done(self, session: Transaction, delivery: Delivery, claim: Claim) -> bool:
        """Mark the claim done (uncommitted), waiting out a busy store.

        Retrying is safe here because no receiver has run yet; it matters on
        SQLite, where another writer's lock otherwise strands the claim.
        """
        deadline = time.monotonic() + self.duplicate_wait
        params = {**self._key_params(delivery), "p_token": claim.token}
        while True:
            try:
                row = self._sql.mark_done.first(
                    session.connection(), {**params, "p_now": self._now()}
                )
                return row is not None
            except DBAPIError as exc:
                if not _is_busy(exc) or time.monotonic() >= deadline:
                    raise
                session.rollback()
                time.sleep(_POLL_INTERVAL)

    def _mark_failed(self, delivery: Delivery, claim: Claim, exc: BaseException) -> None:
        error = f"{type(exc).__name__}: {exc}"[:MAX_ERROR_LENGTH]
        try:
            with self._own_transaction() as connection:
                self._sql.mark_failed.first(
                    connection,
                    {
                        **self._key_params(delivery),
                        "p_token": claim.token,
                        "p_error": error,
                        "p_now": self._now(),
                    },
                )
        except SQLAlchemyError:
            # The lease still expires, so the next delivery takes it over.
            logger.exception(
                "%s %s %s: could not record the failed attempt %d",
                delivery.provider,
                delivery.callback,
                delivery.key,
                claim.attempt,
            )

    @functools.cached_property
    def _sql(self) -> _Statements:
        # Built once: constructing these per request costs more CPU than the
        # round trips they make on a local PostgreSQL.
        return _Statements(self.table, self.engine.dialect)

    @staticmethod
    def _key_params(delivery: Delivery) -> dict[str, Any]:
        return {
            "p_provider": delivery.provider,
            "p_callback": delivery.callback,
            "p_key": delivery.key,
        }

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), tz=UTC)

    @contextmanager
    def _store_errors(self, delivery: Delivery) -> Iterator[None]:
        """Turn database errors into :class:`StoreUnavailable` (503: retry)."""
        try:
            yield
        except DBAPIError as exc:
            busy = _is_busy(exc)
            logger.warning(
                "%s %s %s: store %s: %s",
                delivery.provider,
                delivery.callback,
                delivery.key,
                "busy" if busy else "unavailable",
                type(exc.orig).__name__,
            )
            reason = "The store is busy; retry later." if busy else "The store is unavailable."
            raise StoreUnavailable(reason) from exc
        except SQLAlchemyError as exc:
            logger.warning(
                "%s %s %s: store error: %s",
                delivery.provider,
                delivery.callback,
                delivery.key,
                type(exc).__name__,
            )
            raise StoreUnavailable("The store is unavailable.") from exc

    # -- operators' view ---------------------------------------------------------

    def get(
        self, key: str, provider: str | None = None, callback: str | None = None
    ) -> builtins.list[StoredDelivery]:
        """Every stored delivery with ``key`` (one per provider and callback)."""
        t = self.table
        query = sa.select(t).where(t.c.key == key)
        if provider is not None:
            query = query.where(t.c.provider == provider)
        if callback is not None:
            query = query.where(t.c.callback == callback)
        return self._rows(query.order_by(t.c.provider, t.c.callback))

    def list(
        self,
        *,
        status: str | None = None,
        provider: str | None = None,
        since: datetime | None = None,
        limit: int | None = None,
    ) -> builtins.list[StoredDelivery]:
        """Stored deliveries, newest first."""
        t = self.table
        query = sa.select(t)
        if status is not None:
            query = query.where(t.c.status == status)
        if provider is not None:
            query = query.where(t.c.provider == provider)
        if since is not None:
            query = query.where(t.c.updated_at >= since)
        query = query.order_by(t.c.updated_at.desc(), t.c.key)
        if limit is not None:
            query = query.limit(limit)
        return self._rows(query)

    def purge(
        self,
        *,
        older_than: datetime,
        statuses: tuple[str, ...] = (DONE,),
        provider: str | None = None,
    ) -> int:
        """Delete deliveries in ``statuses`` last updated before ``older_than``."""
        t = self.table
        query = sa.delete(t).where(t.c.status.in_(statuses), t.c.updated_at < older_than)
        if provider is not None:
            query = query.where(t.c.provider == provider)
        if self._prepare is not None:
            self._prepare()
        with self.engine.connect() as connection:
            deleted = connection.execute(query.returning(t.c.key)).all()
            connection.commit()
        return len(deleted)

    def _rows(self, query: Any) -> builtins.list[StoredDelivery]:
        if self._prepare is not None:
            self._prepare()
        with self.engine.connect() as connection:
            rows = connection.execute(query).all()
        return [
            StoredDelivery(
                provider=r.provider,
                callback=r.callback,
                key=r.key,
                status=r.status,
                attempts=r.attempts,
                body=bytes(r.body),
                headers=json.loads(r.headers),
                error=r.error,
                created_at=_utc(r.created_at),
                updated_at=_utc(r.updated_at),
                lease_expires_at=_utc(r.lease_expires_at),
            )
            for r in rows
        ]


class _Statements:
    """The store's statements, with bound parameters named ``p_*``."""

    def __init__(self, t: sa.Table, engine_dialect: Dialect) -> None:
        dialect = engine_dialect.name
        when = sa.DateTime(timezone=True)
        key = (
            t.c.provider == sa.bindparam("p_provider"),
            t.c.callback == sa.bindparam("p_callback"),
            t.c.key == sa.bindparam("p_key"),
        )
        row = {
            "provider": sa.bindparam("p_provider", type_=t.c.provider.type),
            "callback": sa.bindparam("p_callback", type_=t.c.callback.type),
            "key": sa.bindparam("p_key", type_=t.c.key.type),
            "status": sa.literal(PROCESSING, t.c.status.type),
            "attempts": sa.literal(1, sa.Integer),
            "claim_token": sa.bindparam("p_token", type_=t.c.claim_token.type),
            "lease_expires_at": sa.bindparam("p_lease", type_=when),
            "body": sa.bindparam("p_body", type_=sa.LargeBinary),
            "body_sha256": sa.bindparam("p_digest", type_=t.c.body_sha256.type),
            "headers": sa.bindparam("p_headers", type_=t.c.headers.type),
            "created_at": sa.bindparam("p_now", type_=when),
            "updated_at": sa.bindparam("p_now", type_=when),
        }
        insert = _dialect_insert(dialect)(t)
        if dialect == "postgresql":
            # The claim's settings ride in the INSERT itself, which saves a
            # round trip: its row comes from a sub-select that sets them
            # (is_local: for the statement's own transaction only) before the
            # conflict check can wait. lock_timeout bounds that wait; with
            # synchronous_commit off the claim's commit skips the WAL flush,
            # which is safe because the dispatch's COMMIT is synchronous and
            # PostgreSQL flushes WAL in order: when a delivery is answered
            # "done" its claim is on disk too, and a server crash before then
            # loses only an unanswered claim, which the platform sends again.
            settings = sa.select(
                sa.func.set_config("lock_timeout", sa.bindparam("p_ms"), True).label("lt"),
                sa.func.set_config("synchronous_commit", "off", True).label("sc"),
            ).subquery("claim_settings")
            source = (
                sa.select(*row.values())
                .select_from(settings)
                # Referenced, so the planner cannot drop the sub-select.
                .where(settings.c.lt.is_not(None), settings.c.sc.is_not(None))
            )
            insert = insert.from_select(list(row), source)
        else:
            insert = insert.values(row)
        # Taken over: a failed attempt, a claim whose worker died (lease
        # over), or a done one when replay is forced; never another body.
        takeover = sa.and_(
            sa.or_(
                t.c.status == FAILED,
                t.c.status == sa.bindparam("p_takeover"),
                sa.and_(
                    t.c.status == PROCESSING,
                    t.c.lease_expires_at < sa.bindparam("p_now", type_=when),
                ),
            ),
            t.c.body_sha256 == insert.excluded.body_sha256,
        )
        claim = insert.on_conflict_do_update(
            index_elements=[t.c.provider, t.c.callback, t.c.key],
            set_={
                "status": PROCESSING,
                "attempts": t.c.attempts + 1,
                "claim_token": insert.excluded.claim_token,
                "lease_expires_at": insert.excluded.lease_expires_at,
                "updated_at": insert.excluded.updated_at,
            },
            where=takeover,
        ).returning(t.c.claim_token, t.c.attempts)
        state = sa.select(t.c.status, t.c.body_sha256).where(*key)
        # The two fences below hold no "status = <value>" condition, on
        # purpose: once autoanalyze has seen that almost no row is
        # 'processing', PostgreSQL's custom plans prefer the (status,
        # updated_at) index for such a condition over the primary key, and
        # that index keeps a dead 'processing' entry per recent delivery
        # (tests/test_store_plans.py). The claim token alone fences the
        # dispatch: only a takeover changes it, and a worker marks its own
        # claim done at most once.
        mark_done = (
            sa.update(t)
            .where(*key, t.c.claim_token == sa.bindparam("p_token"))
            .values(status=DONE, updated_at=sa.bindparam("p_now", type_=when))
            .returning(t.c.attempts)
        )
        # Fenced by status too: after a COMMIT whose answer was lost, the row
        # may be done with the receivers' writes committed; it must stay so.
        # ("<> done" rather than "= processing": the same thing for a row
        # that still holds this token, and no index can serve it.)
        mark_failed = (
            sa.update(t)
            .where(*key, t.c.claim_token == sa.bindparam("p_token"), t.c.status != DONE)
            .values(
                status=FAILED,
                error=sa.bindparam("p_error"),
                updated_at=sa.bindparam("p_now", type_=when),
            )
        )
        #: Rows: (claim_token, attempts) when this claim won, else none.
        self.claim = DriverStatement(claim, engine_dialect)
        #: Rows: (status, body_sha256).
        self.state = DriverStatement(state, engine_dialect)
        #: Rows: (attempts,) when the claim was still this worker's.
        self.mark_done = DriverStatement(mark_done, engine_dialect)
        self.mark_failed = DriverStatement(mark_failed, engine_dialect)


@contextmanager
def _relaxed_sqlite_sync(connection: Connection) -> Iterator[None]:
    """On SQLite in WAL mode, let the claim's COMMIT skip its fsync.

    ``synchronous=NORMAL`` still survives a crash of the process; only power
    loss can lose the claim, and only until the next FULL commit on the
    database (the dispatch's) syncs the WAL, which holds the claim's frames
    before its own. A delivery is answered "done" only after that commit, so
    nothing answered is ever lost. The connection's own level is restored
    before it goes back to the pool (it may be the host's engine). Outside WAL
    mode NORMAL can corrupt on power loss, so nothing changes there.
    """
    wal = connection.info.get(_WAL_KEY)
    if wal is None:
        mode = connection.exec_driver_sql("PRAGMA journal_mode").scalar()
        wal = connection.info[_WAL_KEY] = str(mode).lower() == "wal"
    level = int(connection.exec_driver_sql("PRAGMA synchronous").scalar() or 0) if wal else 0
    if level <= _SQLITE_NORMAL:
        yield
        return
    connection.exec_driver_sql(f"PRAGMA synchronous = {_SQLITE_NORMAL}")
    try:
        yield
    finally:
        try:
            # SQLite refuses to change the level inside a transaction; one is
            # still open only when the claim failed.
            if connection.in_transaction():
                connection.rollback()
            connection.exec_driver_sql(f"PRAGMA synchronous = {level}")
        except SQLAlchemyError:
            # Never hand a connection back to the pool at the relaxed level.
            connection.invalidate()
            raise


_WAL_KEY = "orderhooks_wal"
_SQLITE_NORMAL = 1


def _dialect_insert(dialect: str) -> Callable[[sa.Table], Any]:
    if dialect == "postgresql":
        return postgresql.insert
    if dialect == "sqlite":
        return sqlite.insert
    raise ValueError(
        f"The {dialect!r} database is not supported by the delivery store; "
        "use PostgreSQL or SQLite."
    )


def _is_busy(exc: DBAPIError) -> bool:
    if getattr(exc.orig, "sqlstate", None) == _PG_LOCK_NOT_AVAILABLE:
        return True
    return "database is locked" in str(exc.orig)


class StandaloneDatabase:
    """The store's own engine, for ``OrderHooks(app)`` without ``db=``.

    The table is created on first use, not at start-up: an app must boot (and
    answer 503, so platforms retry) while its database is down, and several
    workers creating it at once must not crash each other.
    """

    def __init__(self, uri: str, *, busy_timeout: float, engine_options: Mapping[str, Any]) -> None:
        options = dict(engine_options)
        url = sa.make_url(uri)
        if url.get_backend_name() == "sqlite":
            connect_args = dict(options.pop("connect_args", {}))
            connect_args.setdefault("timeout", busy_timeout)
            options["connect_args"] = connect_args
        self.engine: Engine = sa.create_engine(url, **options)
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        self.metadata = sa.MetaData()
        self.table = deliveries_table(self.metadata)
        self._ready = False
        self._lock = threading.Lock()

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """A connection for the dispatch: receivers' writes are their own."""
        with self.engine.connect() as connection:
            yield ConnectionTransaction(connection)

    def ensure_table(self) -> None:
        if self._ready:
            return
        with self._lock:
            if self._ready:
                return
            try:
                with self.engine.begin() as connection:
                    if self.engine.dialect.name == "postgresql":
                        # Serialises concurrent create_all() across processes.
                        connection.execute(sa.select(sa.func.pg_advisory_xact_lock(0x0DE7_1FE5)))
                    self.metadata.create_all(connection, checkfirst=True)
            except SQLAlchemyError:
                # Another process may have won a race SQLite cannot serialise;
                # if the table is there now, that is all we needed.
                if not sa.inspect(self.engine).has_table(TABLE_NAME):
                    raise
            self._ready = True

    def __repr__(self) -> str:
        return f"<StandaloneDatabase {self.engine.url!r}>"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        # WAL lets readers run beside the one writer; the busy timeout comes
        # from the driver's ``timeout`` connect argument.
        cursor.execute("PRAGMA journal_mode=WAL")
    finally:
        cursor.close()
