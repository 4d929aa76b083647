"""The claim / dispatch state machine, and the operators' view of the rows."""

from __future__ import annotations

import builtins
import functools
import hashlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn, Protocol, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError

from ..exc import (
    CallbackError,
    KeyConflict,
    MalformedPayload,
    ReceiverFailed,
    StaleSnapshot,
    StoreUnavailable,
)
from ..logtext import UNSTORABLE, for_log
from ..provider import Delivery
from .errors import (
    forget_server_rollbacks,
    is_busy,
    mysql_lock_wait,
    server_rolled_back,
    watch_for_server_rollbacks,
    whole_seconds,
)
from .keyset import newest_first, older_than
from .mysql import MySQLStatements
from .mysql_autocommit import autocommit_engine
from .retention import compact_old, delete_old
from .retries import NO_RETRIES, RetrySchedule
from .sqlite import relaxed_sqlite_sync, take_write_lock
from .statements import NOT_FORCED, ROW_COLUMNS, SEEN_ANY_TIME, Statements, lost_line_suffix
from .table import (
    DEAD,
    DONE,
    FAILED,
    MAX_ERROR_LENGTH,
    MAX_KEY_LENGTH,
    MAX_REFERENCE_LENGTH,
    MYSQL,
    PROCESSING,
    WHEN,
    Claim,
    Outcome,
    StoredDelivery,
    failure_line,
    parse_failures,
    text_of,
)
from .transactions import Transaction, begun

logger = logging.getLogger("flask_orderhooks")

# How often a duplicate re-reads a delivery that another worker has claimed
# but not yet locked for dispatch (a window of one round trip).
_POLL_INTERVAL = 0.02
# How long a deferred acceptance waits for a row another worker has locked
# before reading it instead (seconds).
_ACCEPT_LOCK_WAIT = 0.1


_T = TypeVar("_T")


def utc(value: datetime) -> datetime:
    # SQLite hands back naive datetimes; everything stored is UTC. psycopg
    # hands back the session's zone, in which a time of the repeated hour
    # never equals the same instant in UTC: every time comes back in UTC.
    return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)


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
    :param retries: when a failed attempt is due again, and when to give up.
    :param clock: Unix time in seconds (injectable for tests).
    :param shared_engine: ``engine`` is the host's too: session settings the
        store changes (MySQL's lock wait) are given back after each use.
    :param on_failure: called with the stored row and the error text after
        each failed attempt is recorded (the extension sends
        ``delivery_failed`` / ``delivery_dead`` from it).
    """

    def __init__(
        self,
        *,
        engine: Engine | Callable[[], Engine],
        dispatch_transaction: Callable[[], AbstractContextManager[Transaction]],
        table: sa.Table,
        duplicate_wait: float,
        claim_timeout: float,
        retries: RetrySchedule = NO_RETRIES,
        clock: Callable[[], float] = time.time,
        prepare: Callable[[], None] | None = None,
        on_failure: Callable[[StoredDelivery, str], None] | None = None,
        shared_engine: bool = True,
    ) -> None:
        self._engine = engine
        self._dispatch_transaction = dispatch_transaction
        self.table = table
        self.duplicate_wait = duplicate_wait
        self.claim_timeout = claim_timeout
        self.retries = retries
        self._clock = clock
        self._prepare = prepare
        self.on_failure = on_failure
        self.shared_engine = shared_engine
        # MySQL: the pool of the store's own for statements that stand alone.
        self._own_autocommit: Engine | None = None
        self._own_autocommit_lock = threading.Lock()

    @property
    def engine(self) -> Engine:
        if not isinstance(self._engine, Engine):
            self._engine = self._engine()
        return self._engine

    @contextmanager
    def _own_transaction(
        self,
        *,
        durable: bool = False,
        lock_wait: float | None = None,
        writes: bool = False,
        each_alone: bool = False,
    ) -> Iterator[Connection]:
        """A connection for the store's statements outside the dispatch (the
        claim, the failure record), committed when the block ends.

        ``durable``: the commit must reach the disk before the block ends (a
        deferred delivery's acceptance: no later commit of the request makes
        it durable). On PostgreSQL the statement itself decides (the claim
        turns ``synchronous_commit`` off for itself, the acceptance does not).

        On PostgreSQL it is in autocommit mode: each of those statements is
        its own transaction, so no BEGIN and no COMMIT travel to the server
        (three round trips become one). On SQLite there is no round trip to
        save, and switching the isolation level costs more than the BEGIN
        and COMMIT, so it is one plain transaction, at ``synchronous=NORMAL``
        in WAL mode (see :func:`relaxed_sqlite_sync`). On MySQL it is one
        plain transaction too; ``lock_wait`` bounds its row-lock waits, set
        around it on MySQL 8 (MariaDB's and PostgreSQL's statements carry
        their own bound: ``SET STATEMENT``, ``lock_timeout``).

        ``writes``: on SQLite the transaction begins with the write lock,
        taken by polling (:func:`take_write_lock`), for at least ``lock_wait``
        (or the duplicate wait) and as long as the driver's busy timeout.

        ``each_alone``: the block's statements may each commit on its own
        (the claim, the acceptance, a plain read). On MySQL they then run in
        autocommit mode too, on a pool of the store's own
        (:mod:`.mysql_autocommit`): one command for a first delivery's claim
        instead of the upsert, its COMMIT and the pool's ROLLBACK.
        """
        if self.dialect == "postgresql":
            with self._autocommit_engine.connect() as connection:
                yield connection
            return
        if self.dialect in MYSQL and each_alone:
            with self._mysql_autocommit_engine.connect() as connection:
                # MariaDB's statements carry the wait themselves; on MySQL 8
                # the session's value is the store's own here: kept.
                session_wait = None if self._sql.statement_lock_wait else lock_wait
                with mysql_lock_wait(connection, session_wait, give_back=False):
                    yield connection
            return
        if self.dialect in MYSQL:
            with self.engine.connect() as connection:
                # MariaDB's statements carry the wait themselves.
                session_wait = None if self._sql.statement_lock_wait else lock_wait
                with mysql_lock_wait(connection, session_wait, give_back=self.shared_engine):
                    yield begun(connection)
                    connection.commit()
            return
        wait = self.duplicate_wait if lock_wait is None else lock_wait
        with (
            self.engine.connect() as connection,
            nullcontext() if durable else relaxed_sqlite_sync(connection),
        ):
            begun(connection)
            if writes:
                take_write_lock(connection, time.monotonic() + wait)
            yield connection
            connection.commit()

    def _standing_alone(self, run: Callable[[Connection], _T], **options: Any) -> _T:
        """``run(connection)`` in :meth:`_own_transaction` with ``each_alone``.

        On MySQL that connection is one of the store's own pool, which does
        not ping before use (the ping would be the round trip the pool
        saves): one the server dropped meanwhile (a restart, a failover, a
        proxy's idle timeout) fails its first statement as a disconnect, and
        ``run`` is tried once more, on a new connection. That is safe for
        every statement standing alone: a read, or an upsert fenced by this
        request's claim token, which the second run finds as its own if the
        first one's commit reached the server after all (its attempt then
        counts twice).
        """
        try:
            with self._own_transaction(each_alone=True, **options) as connection:
                return run(connection)
        except DBAPIError as exc:
            if self.dialect not in MYSQL or not exc.connection_invalidated:
                raise
            logger.info(
                "The store's connection was lost (%s); trying once more.", type(exc.orig).__name__
            )
        with self._own_transaction(each_alone=True, **options) as connection:
            return run(connection)

    def _ensure_table(self, where: Keyed) -> None:
        """The standalone store creates (or upgrades) its table on first use."""
        if self._prepare is not None:
            with self._store_errors(where):
                self._prepare()

    @property
    def _mysql_autocommit_engine(self) -> Engine:
        engine = self._own_autocommit
        if engine is None:
            # Once per store, whatever the threads racing for the first claim:
            # each engine made would keep a pool of connections open.
            with self._own_autocommit_lock:
                if self._own_autocommit is None:
                    self._own_autocommit = autocommit_engine(self.engine)
                engine = self._own_autocommit
        return engine

    @functools.cached_property
    def _autocommit_engine(self) -> Engine:
        # Shares the engine's pool; the isolation level is restored when a
        # connection goes back to it.
        return self.engine.execution_options(isolation_level="AUTOCOMMIT")

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def __repr__(self) -> str:
        # Never resolves the engine: the host's is only known inside an app
        # context, and a repr (a log line, a debugger) must not raise.
        engine = self._engine
        where = engine.dialect.name if isinstance(engine, Engine) else "(the host's engine)"
        return f"<DeliveryStore {where} table={self.table.name!r}>"

    # -- the pipeline ----------------------------------------------------------

    def deliver(self, delivery: Delivery, dispatch: Callable[[], None]) -> Outcome:
        """Claim ``delivery``, run ``dispatch`` once, and record the outcome.

        :returns: ``"dispatched"``, or ``"duplicate"`` when it was already done.
        :raises KeyConflict: the key is stored with a different body.
        :raises ReceiverFailed: ``dispatch`` raised; the delivery is stored failed.
        :raises StoreUnavailable: the store failed or another worker holds it.
        """
        _check_key(delivery)
        claim = self.claim(delivery)
        if claim is None:
            return "duplicate"
        self.dispatch(delivery, claim, dispatch)
        return "dispatched"

    def accept(self, delivery: Delivery) -> Outcome:
        """Store ``delivery`` as pending for a worker (deferred dispatch).

        Committed synchronously before it returns. A resend of a failed or
        dead delivery makes it due now; a resend of any other stored one is a
        duplicate: it is stored, and a worker carries it to done.

        :returns: ``"accepted"`` (stored or revived now) or ``"duplicate"``.
        :raises KeyConflict: the key is stored, not done, with another body.
        :raises StoreUnavailable: the store failed.
        """
        _check_key(delivery)
        self._ensure_table(delivery)
        digest = hashlib.sha256(delivery.body).hexdigest()
        token = secrets.token_hex(16)
        deadline = time.monotonic() + self.duplicate_wait
        while True:
            row = self._try_accept(delivery, token, digest)
            if row is not None and row[0] == token:
                return "accepted"
            current = self._sql.accepted_state(row)
            if current is None:
                current = self._current_state(delivery)
            if current is not None:
                break
            # Not visible yet (another copy's insert, not yet committed, made
            # this one wait past its short lock wait) or purged in between.
            if time.monotonic() >= deadline:
                raise StoreUnavailable("Another worker is handling this delivery; retry later.")
            time.sleep(_POLL_INTERVAL)
        status, stored_digest, lease = current
        if stored_digest != digest:
            if status != DONE:
                raise KeyConflict("This key is stored with a different body.")
            logger.warning(
                "%s %s %s: already done; a resend with a different body was ignored",
                delivery.provider,
                delivery.callback,
                for_log(delivery.key),
            )
            return "duplicate"
        if self._revivable(status, lease):
            revived = self._revive(delivery, token, digest)
            if revived:
                return "accepted"
            if revived is None and self._still_revivable(delivery):
                # Busy, and nobody took it since: answered "done", a dead
                # delivery would stay dead, and the platform stop sending it.
                raise StoreUnavailable("The delivery store is busy; retry later.")
        return "duplicate"

    def _revivable(self, status: str, lease: datetime) -> bool:
        """Failed, dead, or processing with its lease run out (abandoned)."""
        return status in (FAILED, DEAD) or (status == PROCESSING and utc(lease) < self._now())

    def _revive(self, delivery: Delivery, token: str, digest: str) -> bool | None:
        """Make a failed, dead or abandoned delivery due now; ``False`` when
        it changed meanwhile (a worker took it), ``None`` when the write's
        short lock wait ran out: a worker holds its row (PostgreSQL, MySQL)
        or another writer the database (SQLite)."""
        row = self._bounded_write(
            self._sql.revive, delivery, {"p_token": token, "p_digest": digest}
        )
        if row is None:
            return None
        return bool(row[0] == token)

    def _still_revivable(self, delivery: Delivery) -> bool:
        """After a revive that was busy: whether the row still waits for one.
        A plain read, which waits for no lock: a worker that holds the row is
        dispatching it (processing, lease ahead), which is no loss."""
        current = self._current_state(delivery)
        return current is not None and self._revivable(current[0], current[2])

    def _current_state(self, delivery: Delivery) -> tuple[Any, ...] | None:
        """The row's (status, body_sha256, lease_expires_at), by a plain read
        in a transaction of its own, which waits for no lock."""
        with self._store_errors(delivery):
            return self._standing_alone(
                lambda connection: self._sql.state.first(connection, self._key_params(delivery))
            )

    def _try_accept(self, delivery: Delivery, token: str, digest: str) -> tuple[Any, ...] | None:
        """The acceptance's insert; ``None`` when its wait for a row was busy."""
        return self._bounded_write(
            self._sql.accept,
            delivery,
            _row_params(delivery, token, digest),
        )

    def _bounded_write(
        self, statement: Any, delivery: Delivery, params: dict[str, Any]
    ) -> tuple[Any, ...] | None:
        """One durable write of the deferred path, its lock waits kept short
        (``_ACCEPT_LOCK_WAIT``); ``None`` when one ran out.

        A row another worker has locked is a stored row that worker is
        dispatching: a plain read, which waits for nobody, says the rest.
        Waiting for its receivers would keep the platform's request waiting.
        """
        lock_wait = min(self.duplicate_wait, _ACCEPT_LOCK_WAIT)
        try:
            return self._standing_alone(  # type: ignore[no-any-return]
                lambda connection: statement.first(
                    connection,
                    {
                        **self._key_params(delivery),
                        **params,
                        **_now_params(self._now()),
                        **_lock_wait_params(lock_wait),
                    },
                ),
                durable=True,
                lock_wait=lock_wait,
                writes=True,
            )
        except DBAPIError as exc:
            if is_busy(exc):
                return None
            with self._store_errors(delivery):
                raise
        except SQLAlchemyError:
            with self._store_errors(delivery):
                raise

    def claim(
        self,
        delivery: Delivery,
        *,
        force: bool = False,
        seen_attempts: int | None = None,
        seen_created: datetime | None = None,
    ) -> Claim | None:
        """Take the delivery's next attempt, or ``None`` if it is already done.

        :param force: take a ``done`` delivery too (``replay --force``), but
            only while it has ``seen_attempts`` attempts: the done state the
            caller saw. Once a forced claim took it over (it has one attempt
            more), another forced claim of that same state gets ``None``.
        :param seen_attempts: required with ``force``.
        :param seen_created: with ``force``, when the row the caller saw was
            stored (:attr:`StoredDelivery.created_at`): a row purge deleted
            since and stored anew is not taken over, nor is one purge
            compacted since (a tombstone has no body to retry with).

        A processing delivery whose lease ran out (its worker died) is taken
        over, and the lost attempt recorded in the same statement as a
        worker's due claim records it (its history line and error,
        ``LeaseExpired``); this claim's attempt is the next one. It is made
        even when the lost attempt was the last one allowed, which a worker
        would have buried dead: a platform's resend, or a replay, dispatches
        a dead delivery too.

        .. versionchanged:: 0.3
            ``force`` needs ``seen_attempts``; new ``seen_created``.
        """
        if force and seen_attempts is None:
            raise TypeError(
                "claim(force=True) needs seen_attempts: the attempts of the done "
                "delivery the caller saw, so that it is dispatched again once, not "
                "once per caller."
            )
        self._ensure_table(delivery)
        digest = hashlib.sha256(delivery.body).hexdigest()
        token = secrets.token_hex(16)
        deadline = time.monotonic() + self.duplicate_wait
        while True:
            remaining = deadline - time.monotonic()
            try:
                row, current = self._claim_once(
                    delivery,
                    token,
                    digest,
                    remaining,
                    force_over=(seen_attempts, seen_created or SEEN_ANY_TIME) if force else None,
                )
            except StoreUnavailable as exc:
                # Busy (a lock wait ran out, a MySQL deadlock was broken):
                # nothing was claimed, so trying again is safe while time is left.
                if not _busy_cause(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(_POLL_INTERVAL)
                continue
            if row is not None and row[0] == token:
                return Claim(token=token, attempt=int(row[1]))
            # None: purged between the two statements, so claim again.
            if current is not None:
                status, stored_digest, _lease = current
                if status == DONE:
                    if stored_digest != digest:
                        logger.warning(
                            "%s %s %s: already done; a resend with a different body was ignored",
                            delivery.provider,
                            delivery.callback,
                            for_log(delivery.key),
                        )
                    return None
                if stored_digest != digest:
                    raise KeyConflict("This key is stored with a different body.")
            if time.monotonic() >= deadline:
                raise StoreUnavailable("Another worker is handling this delivery; retry later.")
            time.sleep(min(_POLL_INTERVAL, max(0.0, deadline - time.monotonic())))

    def _claim_once(
        self,
        delivery: Delivery,
        token: str,
        digest: str,
        remaining: float,
        *,
        force_over: tuple[int | None, datetime] | None,
    ) -> tuple[tuple[Any, ...] | None, tuple[Any, ...] | None]:
        """One claim statement: (its row, or None) and, when it did not win,
        the delivery's (status, digest) as it is now. ``force_over``: take
        a done row over too while it has that many attempts and was stored
        no later than that (never a tombstone)."""

        def claim_on(
            connection: Connection,
        ) -> tuple[tuple[Any, ...] | None, tuple[Any, ...] | None]:
            now = self._now()
            row = self._sql.claim.first(
                connection,
                {
                    **self._key_params(delivery),
                    **_row_params(delivery, token, digest),
                    "p_lease": now + timedelta(seconds=self.claim_timeout),
                    **_now_params(now),
                    "p_takeover": FAILED if force_over is None else DONE,
                    "p_seen_attempts": NOT_FORCED if force_over is None else force_over[0],
                    "p_seen_created": SEEN_ANY_TIME if force_over is None else force_over[1],
                    # ON CONFLICT waits for another worker's row lock,
                    # unbounded by default.
                    **_lock_wait_params(remaining),
                },
            )
            if row is not None and row[0] == token:
                return row, None
            return row, self._sql.claimed_state(connection, self._key_params(delivery), row)

        with self._store_errors(delivery):
            return self._standing_alone(claim_on, lock_wait=remaining, writes=True)

    def dispatch(self, delivery: Delivery, claim: Claim, dispatch: Callable[[], None]) -> None:
        """Run ``dispatch`` inside the transaction that marks the claim done."""
        with self._store_errors(delivery), self._dispatch_transaction() as session:
            # A transaction the host began before the view holds its work: one
            # whose connection died must fail, not begin again without it.
            begun_before = session.current() is not None
            try:
                self._see_the_claim(session, delivery)
                marked = self._mark_done(session, delivery, claim, reconnect=not begun_before)
            except (SQLAlchemyError, StoreUnavailable) as exc:
                # No receiver ran. Hand the claim back now, or every retry is
                # refused until the lease runs out although nobody holds it.
                session.rollback()
                self._mark_failed(delivery, claim, exc)
                raise
            if not marked:
                session.rollback()
                raise StoreUnavailable("The claim on this delivery expired; retry later.")
            self._run_receivers(session, delivery, claim, dispatch)

    def _run_receivers(
        self,
        session: Transaction,
        delivery: Keyed,
        claim: Claim,
        dispatch: Callable[[], None],
    ) -> None:
        """Run ``dispatch`` in ``session``, which holds the claim's
        uncommitted done mark, and commit both; a failure rolls both back
        and is recorded as a failed attempt."""
        marked_in = session.current()
        if self.dialect in MYSQL:
            watched = session.connection()
            watch_for_server_rollbacks(watched.engine)
            forget_server_rollbacks(watched)
        try:
            dispatch()
        except Exception as exc:
            session.rollback()
            self._mark_failed(delivery, claim, exc)
            if isinstance(exc, CallbackError):
                raise
            raise ReceiverFailed(_RECEIVER_FAILED) from exc
        if session.current() is not marked_in and not self._committed_done(delivery, claim):
            # A receiver rolled back the dispatch's transaction, and the done
            # mark with it: answered "done", the delivery would stay
            # processing and a worker dispatch it again after the lease.
            # What the receiver wrote since goes too. (Its db.session.commit()
            # raises ReceiverCommit, so it cannot have committed them.)
            self._fail_attempt(
                session,
                delivery,
                claim,
                "EndedTransaction: a receiver rolled back the dispatch's transaction, and "
                "the done mark with it.",
            )
        try:
            connection = session.connection()
        except SQLAlchemyError:
            # A receiver caught the error of a failed flush (or of a lost
            # connection) and carried on: the session's transaction, done
            # mark included, is rolled back and refuses every statement
            # (PendingRollbackError). Not the store's failure (503) with the
            # row left processing until its lease ran out: the receiver's.
            self._fail_attempt(
                session,
                delivery,
                claim,
                "AbortedTransaction: a receiver's flush or statement failed and the error "
                "was caught; db.session's transaction, done mark included, was rolled back.",
            )
        if self.dialect in MYSQL and server_rolled_back(connection):
            # InnoDB rolled back the whole transaction, done mark included,
            # and began a new one for the receiver's next statement: the
            # COMMIT would commit only what came after, and answer done.
            self._fail_attempt(
                session,
                delivery,
                claim,
                "AbortedTransaction: a receiver's statement failed with an error that "
                "rolled back the dispatch's transaction (a deadlock, or a lock wait "
                "timeout under innodb_rollback_on_timeout), and the error was caught; "
                "the done mark went with it.",
            )
        if _aborted(connection):
            # A receiver caught a database error and carried on: PostgreSQL
            # would answer the COMMIT with a ROLLBACK that psycopg reports as
            # a success, and the delivery would be answered done undone.
            self._fail_attempt(
                session,
                delivery,
                claim,
                "AbortedTransaction: a receiver's statement failed and the error was "
                "caught; the dispatch's transaction could only roll back.",
            )
        try:
            # On its own, not inside the commit: what fails here is what the
            # receivers wrote (a value too long, a constraint, a host's
            # before_flush hook), a receiver's failure like one they flushed.
            session.flush()
        except Exception as exc:
            session.rollback()
            self._mark_failed(delivery, claim, exc)
            if isinstance(exc, DBAPIError) and (is_busy(exc) or exc.connection_invalidated):
                raise  # the store's: busy or gone (503)
            raise ReceiverFailed(_RECEIVER_FAILED) from exc
        try:
            session.commit()
        except IntegrityError as exc:
            # A deferred constraint, checked at COMMIT: the receivers' writes.
            session.rollback()
            self._mark_failed(delivery, claim, exc)
            raise ReceiverFailed(_RECEIVER_FAILED) from exc
        except SQLAlchemyError as exc:
            session.rollback()
            self._mark_failed(delivery, claim, exc)
            raise
        except Exception as exc:
            # Not the database's: a host's before_commit hook. Left to
            # escape, it would leave the row processing with nothing recorded.
            session.rollback()
            self._mark_failed(delivery, claim, exc)
            raise ReceiverFailed(_RECEIVER_FAILED) from exc

    def _committed_done(self, delivery: Keyed, claim: Claim) -> bool:
        """A receiver ended the dispatch's transaction itself: whether this
        claim's done mark went with a commit that bypassed both commit guards
        (see store/transactions.py); what the receiver wrote since then
        commits at the end, as usual.

        Done is not enough: after a rollback this worker's lease may run out
        and another worker take the delivery over and finish it, and what
        this receiver writes next must not be committed as well."""
        with self._store_errors(delivery):
            current = self._standing_alone(
                lambda connection: self._sql.owner.first(connection, self._key_params(delivery))
            )
        if current is None or current[0] != DONE or current[1] != claim.token:
            return False
        logger.warning(
            "%s %s %s: a receiver committed the dispatch's transaction itself; "
            "the done mark went with it, and what followed is committed after",
            delivery.provider,
            delivery.callback,
            for_log(delivery.key),
        )
        return True

    def _fail_attempt(
        self, session: Transaction, delivery: Keyed, claim: Claim, error: str
    ) -> NoReturn:
        """Roll the dispatch back and record its attempt as failed with ``error``."""
        session.rollback()
        self.record_failure(delivery, claim, error)
        raise ReceiverFailed(_RECEIVER_FAILED)

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
            # MySQL and MariaDB: InnoDB's UPDATE acts on the latest committed
            # row whatever the snapshot, so the done mark finds the claim.
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
        # Unflushed objects count: the rollback would drop them silently.
        if not wrote and not session.has_unflushed_changes():
            session.rollback()
            return
        logger.warning(
            "%s %s %s: db.session began a %s transaction and wrote before the callback "
            "view; its snapshot cannot see the delivery's claim. Commit (or don't write) "
            "before the view runs, or use READ COMMITTED for it.",
            delivery.provider,
            delivery.callback,
            for_log(delivery.key),
            level.upper(),
        )
        raise StaleSnapshot(
            f"The app's database session began a {level} transaction before this "
            "callback; the delivery was kept for retry."
        )

    def _mark_done(
        self, session: Transaction, delivery: Delivery, claim: Claim, *, reconnect: bool
    ) -> bool:
        """Mark the claim done (uncommitted), waiting out a busy store.

        Retrying is safe here because no receiver has run yet; it matters on
        SQLite, where another writer's lock otherwise strands the claim. With
        ``reconnect``, a connection the server dropped (a restart, a
        failover: the host's pool holds one per process until each is used)
        is replaced once: the claim, on a connection of its own, succeeded,
        and failing here would count an attempt per pooled connection.
        """
        deadline = time.monotonic() + self.duplicate_wait
        params = {**self._key_params(delivery), "p_token": claim.token}
        while True:
            try:
                with _driver_errors_wrapped(self.engine.dialect):
                    connection = session.connection()
                    if self.dialect == "sqlite":
                        take_write_lock(connection, deadline)
                    row = self._sql.mark_done.first(connection, {**params, "p_now": self._now()})
                return row is not None
            except DBAPIError as exc:
                if reconnect and exc.connection_invalidated:
                    # SQLAlchemy invalidated the connection (and, on a
                    # disconnect, every older one of its pool): the next is new.
                    reconnect = False
                    session.rollback()
                    continue
                if not is_busy(exc) or time.monotonic() >= deadline:
                    raise
                session.rollback()
                time.sleep(_POLL_INTERVAL)

    def _mark_failed(self, delivery: Keyed, claim: Claim, exc: BaseException) -> None:
        self.record_failure(delivery, claim, f"{type(exc).__name__}: {exc}")

    def record_failure(
        self, delivery: Keyed, claim: Claim, error: str, *, in_history: bool = True
    ) -> None:
        """Record that ``claim``'s attempt failed with ``error``.

        :param in_history: append the attempt to the row's failure history;
            ``False`` when the history has it already (a lost lease, which the
            due claim recorded).

        The retry schedule decides: failed with the next attempt's due time,
        or dead after the last attempt. Then :attr:`on_failure` hears of it.
        Nothing is recorded if the claim is no longer this worker's, or the
        delivery is done (a COMMIT whose answer was lost).
        """
        error = error[:MAX_ERROR_LENGTH]
        now = self._now()
        status, next_attempt = self.retries.after_failure(claim.attempt, now)
        # The row's lock is normally free (the dispatch rolled back), but a
        # backend whose client vanished mid-dispatch keeps it until the
        # server notices, hours with default keepalives: wait no longer than
        # a duplicate would. Unrecorded, the lease still runs out.
        lock_wait = self.duplicate_wait
        try:
            with self._own_transaction(lock_wait=lock_wait, writes=True) as connection:
                row = self._sql.mark_failed.first(
                    connection,
                    {
                        **self._key_params(delivery),
                        "p_token": claim.token,
                        "p_status": status,
                        "p_error": error,
                        "p_attempts": claim.attempt,
                        "p_failure": failure_line(claim.attempt, now, error) if in_history else "",
                        "p_next": next_attempt,
                        "p_now": now,
                        **_lock_wait_params(lock_wait),
                    },
                )
        except SQLAlchemyError:
            # The lease still expires, so the next delivery takes it over.
            logger.exception(
                "%s %s %s: could not record the failed attempt %d",
                delivery.provider,
                delivery.callback,
                for_log(delivery.key),
                claim.attempt,
            )
            return
        if row is None or self.on_failure is None:
            return
        try:
            self.on_failure(_stored(row), error)
        except Exception:
            # Alerting must never change what happened to the delivery.
            logger.exception(
                "%s %s %s: a delivery_failed/delivery_dead receiver raised",
                delivery.provider,
                delivery.callback,
                for_log(delivery.key),
            )

    # -- workers -----------------------------------------------------------------

    def claim_due(self, key: tuple[str, str, str] | None = None) -> DueClaim | None:
        """Claim the delivery due soonest (or ``key``, only if it is due).

        :returns: the claimed row and its claim, or ``None`` if nothing is due.
        :raises StoreUnavailable: the store failed.
        """
        where = _Where(*key) if key is not None else _Where("-", "-", "-")
        self._ensure_table(where)
        token, lost_token = secrets.token_hex(16), secrets.token_hex(16)
        now = self._now()
        params: dict[str, Any] = {
            "p_token": token,
            "p_lost_token": lost_token,
            "p_lease": now + timedelta(seconds=self.claim_timeout),
            **_now_params(now),
        }
        statement = self._sql.claim_due
        if key is not None:
            statement = self._sql.claim_due_key
            params.update(p_provider=key[0], p_callback=key[1], p_key=key[2])
        with self._store_errors(where), self._own_transaction(writes=True) as connection:
            row = statement.first(connection, params)
        if row is None:
            return None
        stored = _stored(row)
        # The row's token, which StoredDelivery does not carry.
        taken = str(row[_TOKEN])
        return DueClaim(
            delivery=stored,
            claim=Claim(token=taken, attempt=stored.attempts),
            lease_lost=taken == lost_token,
        )

    @functools.cached_property
    def _sql(self) -> Statements:
        # Built once: constructing these per request costs more CPU than the
        # round trips they make on a local PostgreSQL.
        if self.dialect in MYSQL:
            if getattr(self.engine.dialect, "server_version_info", None) is None:
                # The dialect tells MariaDB (SET STATEMENT) from MySQL at its
                # first connection. Some callers look the statements up before
                # their own error handling: a server down here is a 503 (and
                # a worker that keeps looking), like any other, and nothing
                # is cached until it answers.
                try:
                    with self.engine.connect():
                        pass
                except SQLAlchemyError as exc:
                    logger.warning(
                        "store unavailable: %s (first connection, to tell MariaDB from MySQL)",
                        type(getattr(exc, "orig", None) or exc).__name__,
                    )
                    raise StoreUnavailable("The store is unavailable.") from exc
            # Same operations and rows, several statements each.
            return MySQLStatements(self.table, self.engine.dialect)  # type: ignore[return-value]
        return Statements(self.table, self.engine.dialect)

    @staticmethod
    def _key_params(delivery: Keyed) -> dict[str, Any]:
        return {
            "p_provider": delivery.provider,
            "p_callback": delivery.callback,
            "p_key": delivery.key,
        }

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), tz=UTC)

    @contextmanager
    def _store_errors(self, delivery: Keyed) -> Iterator[None]:
        """Turn database errors into :class:`StoreUnavailable` (503: retry)."""
        try:
            yield
        except DBAPIError as exc:
            busy = is_busy(exc)
            logger.warning(
                "%s %s %s: store %s: %s",
                delivery.provider,
                delivery.callback,
                for_log(delivery.key),
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
                for_log(delivery.key),
                type(exc).__name__,
            )
            raise StoreUnavailable("The store is unavailable.") from exc

    # -- operators' view ---------------------------------------------------------

    def get(
        self,
        key: str,
        provider: str | None = None,
        callback: str | None = None,
        *,
        routes: Iterable[tuple[str, str]] = (),
        anywhere: bool = True,
    ) -> builtins.list[StoredDelivery]:
        """Every stored delivery with ``key`` (one per provider and callback).

        :param routes: the ``(provider, callback)`` pairs to look under
            first, one primary-key lookup each (the key is the primary key's
            last column: alone it is a scan of the whole table). Only when
            none of them holds the key is the whole table searched.
        :param anywhere: ``False``: only under ``routes``, never the scan
            (at 10 million rows it took 0.5 s on PostgreSQL and SQLite and
            35 s on MariaDB for a key stored nowhere).

        .. versionchanged:: 0.3
            ``routes`` and ``anywhere``.
        """
        t = self.table
        query = sa.select(t).where(t.c.key == key)
        if provider is not None:
            query = query.where(t.c.provider == provider)
        if callback is not None:
            query = query.where(t.c.callback == callback)
        query = query.order_by(t.c.provider, t.c.callback)
        pairs = [(p, c) for p, c in routes if provider in (None, p) and callback in (None, c)]
        if pairs:
            found = self._rows(query.where(sa.tuple_(t.c.provider, t.c.callback).in_(pairs)))
            if found or not anywhere:
                return found
        return self._rows(query) if anywhere else []

    def list(
        self,
        *,
        status: str | None = None,
        provider: str | None = None,
        since: datetime | None = None,
        limit: int | None = None,
        after: StoredDelivery | None = None,
    ) -> builtins.list[StoredDelivery]:
        """Stored deliveries, newest received first (``since``: received
        since; a naive time is UTC), read along the ``created_at`` index.

        :param after: the last row of the previous page: this page holds the
            rows after it in this order (a keyset page, which costs the same
            however deep it is), for reading a long list a page at a time.

        .. versionchanged:: 0.3
           ``after``.
        """
        t = self.table
        query = sa.select(t)
        if status is not None:
            query = query.where(t.c.status == status)
        if provider is not None:
            query = query.where(t.c.provider == provider)
        if since is not None:
            query = query.where(t.c.created_at >= sa.bindparam("since", since, type_=WHEN))
        if after is not None:
            query = query.where(
                older_than(t, after.created_at, after.provider, after.callback, after.key)
            )
        query = query.order_by(*newest_first(t))
        if limit is not None:
            query = query.limit(limit)
        return self._rows(query)

    def providers(self) -> builtins.list[str]:
        """The names of the providers with stored deliveries, in order.

        One lookup along the primary key per provider, each the next name
        after the last (a loose index scan): ``SELECT DISTINCT provider``
        reads every row on PostgreSQL, seconds at 10 million.

        .. versionadded:: 0.3
        """
        t = self.table
        first = sa.select(t.c.provider).order_by(t.c.provider).limit(1)
        names: builtins.list[str] = []
        self.prepare()
        with self.engine.connect() as connection:
            name = connection.execute(first).scalar()
            while name is not None:
                names.append(name)
                name = connection.execute(first.where(t.c.provider > name)).scalar()
        return names

    def purge(
        self,
        *,
        older_than: datetime,
        statuses: tuple[str, ...] = (DONE,),
        provider: str | None = None,
    ) -> int:
        """Delete deliveries in ``statuses`` last updated before ``older_than``
        (a naive time is UTC), in short batches that skip rows a live callback
        holds (:mod:`.retention`); how many were deleted. A processing
        delivery is deleted only if its lease ran out before ``older_than``,
        a failed one only if its next attempt was due before it: otherwise
        the workers would still carry it."""
        return delete_old(self, older_than=older_than, statuses=statuses, provider=provider)

    def compact(self, *, older_than: datetime, provider: str | None = None) -> int:
        """Drop the body and signed headers of done deliveries last updated
        before ``older_than`` (a naive time is UTC), keeping tombstones (key, body digest, status,
        dates) that still answer a replay as a duplicate; how many.

        .. versionadded:: 0.3
        """
        return compact_old(self, older_than=older_than, provider=provider, now=self._now())

    def prepare(self) -> None:
        """Make sure the table exists (the extension's own store creates or
        upgrades it on first use)."""
        if self._prepare is not None:
            self._prepare()

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
                created_at=utc(r.created_at),
                updated_at=utc(r.updated_at),
                lease_expires_at=utc(r.lease_expires_at),
                next_attempt_at=utc(r.next_attempt_at) if r.next_attempt_at else None,
                reference=text_of(r.reference),
                failed_attempts=parse_failures(r.failures),
                compacted_at=utc(r.compacted_at) if r.compacted_at else None,
            )
            for r in rows
        ]


class Keyed(Protocol):
    """Anything that names a delivery: a :class:`Delivery` or a stored row."""

    @property
    def provider(self) -> str: ...
    @property
    def callback(self) -> str: ...
    @property
    def key(self) -> str: ...


@dataclass(frozen=True)
class _Where:
    """A delivery's name, for log lines about it."""

    provider: str
    callback: str
    key: str


@dataclass(frozen=True)
class DueClaim:
    """A due delivery a worker claimed, with its claim.

    :param lease_lost: the row was still processing: the worker of the
        previous attempt died and its lease ran out (that attempt failed).
    """

    delivery: StoredDelivery
    claim: Claim
    lease_lost: bool


_TOKEN = ROW_COLUMNS.index("claim_token")


@contextmanager
def _driver_errors_wrapped(dialect: Dialect) -> Iterator[None]:
    """The driver's own errors as SQLAlchemy's :class:`DBAPIError`.

    A connection the pool hands out is set up outside SQLAlchemy's error
    handling: on an engine in autocommit mode, the dispatch's isolation
    level is set on it at checkout, and a dead connection then fails with
    PyMySQL's bare ``OperationalError``. Unwrapped, that escaped the store
    as "unexpected" (500) with the claim left processing until its lease
    ran out; wrapped, it is handed back and answered 503 like any other
    lost connection (and, as one, run once more on a new connection)."""
    base = dialect.loaded_dbapi.Error
    try:
        yield
    except base as exc:
        raise DBAPIError.instance(
            None,
            None,
            exc,
            base,
            connection_invalidated=dialect.is_disconnect(exc, None, None),
            dialect=dialect,
        ) from exc


def _lock_wait_params(seconds: float) -> dict[str, Any]:
    """A statement's bound on its row-lock wait: PostgreSQL's ``lock_timeout``
    (``p_ms``), MariaDB's ``innodb_lock_wait_timeout`` (``p_lock_wait``,
    whole seconds)."""
    return {"p_ms": f"{max(1, int(seconds * 1000))}ms", "p_lock_wait": whole_seconds(seconds)}


def _now_params(now: datetime) -> dict[str, Any]:
    """The time a statement that may take a row over runs at: ``p_now``, and
    ``p_lost_line``, the history line of the attempt it finds lost (a
    processing row whose lease ran out before ``now``)."""
    return {"p_now": now, "p_lost_line": lost_line_suffix(now)}


def _row_params(delivery: Delivery, token: str, digest: str) -> dict[str, Any]:
    """What a new row stores of the delivery (the claim's and the acceptance's)."""
    reference = delivery.reference
    return {
        "p_token": token,
        "p_body": delivery.body,
        "p_digest": digest,
        "p_headers": json.dumps(dict(delivery.headers), sort_keys=True),
        # Too long to index, or holding a character no key may hold (NUL,
        # which PostgreSQL refuses in text, failed every attempt as "store
        # unavailable"): kept out of the search rather than cut or cleaned,
        # since such an id would find other orders.
        "p_reference": reference if _searchable(reference) else None,
    }


def _searchable(reference: str | None) -> bool:
    """Whether a delivery's ``reference`` can be stored and searched."""
    return (
        reference is not None
        and 0 < len(reference) <= MAX_REFERENCE_LENGTH
        and not UNSTORABLE.search(reference)
    )


def _check_key(delivery: Delivery) -> None:
    if len(delivery.key) > MAX_KEY_LENGTH:
        raise MalformedPayload(f"The idempotency key is longer than {MAX_KEY_LENGTH}.")
    # No platform's id holds one; PostgreSQL would refuse NUL at every retry.
    if UNSTORABLE.search(delivery.key):
        raise MalformedPayload("The idempotency key holds a control character.")


def _aborted(connection: Connection) -> bool:
    """Whether the dispatch's transaction on ``connection`` is in error
    (PostgreSQL: a statement in it failed; libpq's PQTRANS_INERROR, which
    psycopg and psycopg2 report)."""
    raw = connection.connection.dbapi_connection
    info = getattr(raw, "info", None)
    return getattr(info, "transaction_status", None) == _PQTRANS_INERROR


_PQTRANS_INERROR = 3

_RECEIVER_FAILED = "A receiver failed; the delivery will be retried."


def _busy_cause(exc: StoreUnavailable) -> bool:
    cause = exc.__cause__
    return isinstance(cause, DBAPIError) and is_busy(cause)


def _stored(row: tuple[Any, ...]) -> StoredDelivery:
    """A :class:`StoredDelivery` from a whole row (``ROW_COLUMNS``)."""
    r = dict(zip(ROW_COLUMNS, row, strict=True))
    return StoredDelivery(
        provider=r["provider"],
        callback=r["callback"],
        key=r["key"],
        status=r["status"],
        attempts=r["attempts"],
        body=bytes(r["body"]),
        headers=json.loads(r["headers"]),
        error=r["error"],
        created_at=utc(r["created_at"]),
        updated_at=utc(r["updated_at"]),
        lease_expires_at=utc(r["lease_expires_at"]),
        next_attempt_at=utc(r["next_attempt_at"]) if r["next_attempt_at"] else None,
        reference=text_of(r["reference"]),
        failed_attempts=parse_failures(r["failures"]),
        compacted_at=utc(r["compacted_at"]) if r["compacted_at"] else None,
    )
