"""The deliveries table: its columns, its statuses, and the rows read from it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Dialect

TABLE_NAME = "orderhooks_deliveries"
#: Longest idempotency key stored; fits a unique index on every backend.
MAX_KEY_LENGTH = 191
#: Longest error text kept for a failed attempt.
MAX_ERROR_LENGTH = 2000

#: Stored, waiting for a worker (deferred dispatch).
PENDING = "pending"
#: Claimed by a worker until ``lease_expires_at``.
PROCESSING = "processing"
#: Every receiver returned and their writes committed with the mark.
DONE = "done"
#: An attempt failed; the next one is due at ``next_attempt_at``.
FAILED = "failed"
#: Every local attempt failed; only a platform's resend or a replay revives it.
DEAD = "dead"
STATUSES = (PENDING, PROCESSING, DONE, FAILED, DEAD)

#: The index a worker's due query reads; done and dead rows hold NULL there.
DUE_INDEX = "ix_orderhooks_deliveries_due"
#: Newest first, for the console's list and its time range (keyset pages).
CREATED_INDEX = "ix_orderhooks_deliveries_created"
#: Newest first within one status: the console's and the CLI's status
#: filter, and the chart's counts read from the index alone.
STATUS_CREATED_INDEX = "ix_orderhooks_deliveries_status_created"
#: Oldest first within one status: purge's batches (store/retention.py).
STATUS_UPDATED_INDEX = "ix_orderhooks_deliveries_status_updated"
#: The order id found in the body, for the console's search box.
REFERENCE_INDEX = "ix_orderhooks_deliveries_reference"
#: Longest order id kept for the search (longer ones are not searchable).
MAX_REFERENCE_LENGTH = 191


MYSQL = ("mysql", "mariadb")


class _UTCDateTime(sa.types.TypeDecorator[datetime]):
    """A ``DATETIME`` without a time zone, holding UTC: MySQL's and MariaDB's
    ``DATETIME(6)``, and (:class:`_SQLiteUTCDateTime`) SQLite's text.

    Values go in as naive UTC and come back aware. PyMySQL would write an
    aware value's ``+00:00`` into the literal, which MariaDB refuses; SQLite's
    would keep an aware value's wall clock and drop its zone, so a time in
    another zone (a host's ``purge(older_than=...)`` in local time) would be
    compared hours off the UTC stored.
    """

    impl: sa.types.TypeEngine[datetime] = mysql.DATETIME(fsp=6)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return value.replace(tzinfo=UTC) if value is not None else None


class _AwareDateTime(sa.types.TypeDecorator[datetime]):
    """PostgreSQL's ``timestamptz`` parameter, with a naive value taken as
    UTC, as SQLite and MySQL take it: PostgreSQL would read it in the
    session's time zone (the server's unless set), so a host's
    ``purge(older_than=...)`` or ``list(since=...)`` in naive UTC would be
    compared hours off on a server not set to UTC."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class _SQLiteUTCDateTime(_UTCDateTime):
    """:class:`_UTCDateTime` on SQLite's ``DATETIME`` text."""

    impl = sa.DateTime()
    cache_ok = True


#: The type of the stored times: microseconds on MySQL too (its DATETIME
#: rounds to whole seconds by default). A plain type, so that a host's
#: Flask-Migrate migration renders it without importing this package.
WHEN_COLUMN = sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), *MYSQL)
#: The type of the store's time parameters: any aware time in, compared as
#: UTC, and a naive one taken as UTC (SQLite and MySQL keep them naive; rows
#: are read back aware by :func:`~.delivery_store.utc`).
WHEN = (
    _AwareDateTime()
    .with_variant(_UTCDateTime(), *MYSQL)
    .with_variant(_SQLiteUTCDateTime(), "sqlite")
)
#: The raw body: MySQL's BLOB stops at 65,535 bytes, one short of the default
#: ORDERHOOKS_MAX_BODY.
BODY = sa.LargeBinary().with_variant(mysql.MEDIUMBLOB(), *MYSQL)
#: The failed attempts' history: MySQL's TEXT stops at 65,535 bytes, which a
#: delivery replayed often enough would pass (strict mode then refuses the
#: failure record).
HISTORY = sa.Text().with_variant(mysql.MEDIUMTEXT(), *MYSQL)


def exact_string(length: int) -> sa.types.TypeEngine[str]:
    """A string compared byte for byte: MySQL's default collations are case-
    and trailing-space-insensitive, which would merge request ids that
    differ only in case into one delivery."""
    return sa.String(length).with_variant(
        mysql.VARCHAR(length, charset="utf8mb4", collation="utf8mb4_bin"), *MYSQL
    )


#: The idempotency key, byte for byte. On MySQL and MariaDB even a binary
#: collation (utf8mb4_bin) pads: 'Abc' and 'Abc ' would be one key. A
#: VARBINARY of the key's longest UTF-8 form compares exact bytes on both;
#: strings go in and come back as such (:class:`Utf8Binary`).
class Utf8Binary(sa.types.TypeDecorator[str]):
    """A string kept as its UTF-8 bytes in a ``VARBINARY`` (MySQL, MariaDB):
    compared byte for byte, with no collation and no padding."""

    impl = mysql.VARBINARY
    cache_ok = True

    def __init__(self, length: int) -> None:
        super().__init__(length)
        self.length = length

    def process_bind_param(self, value: str | None, dialect: Dialect) -> bytes | None:
        return value.encode("utf-8") if value is not None else None

    def process_result_value(self, value: bytes | None, dialect: Dialect) -> str | None:
        return text_of(value)


KEY = sa.String(MAX_KEY_LENGTH).with_variant(Utf8Binary(MAX_KEY_LENGTH * 4), *MYSQL)
#: The order id, byte for byte like the key: a search for 'ORDER-1' must not
#: find 'ORDER-1 ' (utf8mb4_bin pads). A plain VARBINARY, so that a host's
#: migration renders it without importing this package: rows are read back
#: through :func:`text_of`.
REFERENCE_COLUMN = sa.String(MAX_REFERENCE_LENGTH).with_variant(
    mysql.VARBINARY(MAX_REFERENCE_LENGTH * 4), *MYSQL
)
#: The type of an order id parameter: its UTF-8 bytes on MySQL and MariaDB.
REFERENCE = sa.String(MAX_REFERENCE_LENGTH).with_variant(
    Utf8Binary(MAX_REFERENCE_LENGTH * 4), *MYSQL
)


def text_of(value: str | bytes | None) -> str | None:
    """A string column's value: MySQL's VARBINARY ones come back as bytes."""
    return bytes(value).decode("utf-8") if isinstance(value, (bytes, bytearray)) else value


def deliveries_table(metadata: sa.MetaData) -> sa.Table:
    """The ``orderhooks_deliveries`` table in ``metadata`` (created once)."""
    existing = metadata.tables.get(TABLE_NAME)
    if existing is not None:
        return existing
    return sa.Table(
        TABLE_NAME,
        metadata,
        sa.Column("provider", exact_string(16), primary_key=True),
        sa.Column("callback", exact_string(32), primary_key=True),
        sa.Column("key", KEY, primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("claim_token", exact_string(32), nullable=False),
        sa.Column("lease_expires_at", WHEN_COLUMN, nullable=False),
        sa.Column("body", BODY, nullable=False),
        sa.Column("body_sha256", sa.String(64), nullable=False),
        sa.Column("headers", sa.Text, nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("created_at", WHEN_COLUMN, nullable=False),
        sa.Column("updated_at", WHEN_COLUMN, nullable=False),
        # When a worker should next look at the row: a pending or failed
        # delivery's next attempt, a processing one's lease end (its worker
        # may have died). NULL once done or dead, and on rows stored by 0.1,
        # which is why it is nullable: adding it keeps every old row.
        sa.Column("next_attempt_at", WHEN_COLUMN, nullable=True),
        # 0.3. The merchant-side order id the provider found in the body
        # (iGV orderId, gateway trans_id, SUD out_order_id: a batch's first
        # order's): support staff search by it. NULL when there is none.
        sa.Column("reference", REFERENCE_COLUMN, nullable=True),
        # 0.3. Every failed attempt, one JSON object per line (see
        # FailedAttempt), appended by the statement that records it.
        sa.Column("failures", HISTORY, nullable=True),
        # 0.3. When purge dropped the body and headers of this done delivery,
        # keeping its key, status, dates and body_sha256: a tombstone that
        # still answers a replayed callback as a duplicate.
        sa.Column("compacted_at", WHEN_COLUMN, nullable=True),
        sa.Index(STATUS_UPDATED_INDEX, "status", "updated_at"),
        due_index(),
        sa.Index(CREATED_INDEX, "created_at"),
        # 0.3. A status filter ordered by created_at: one range in index
        # order, stopped after a page, instead of every row of that status
        # sorted (SQLite picked (status, updated_at) and sorted every done
        # row of 10 million). InnoDB appends the primary key, which is the
        # lists' tie-break. The chart counts from it alone.
        sa.Index(STATUS_CREATED_INDEX, "status", "created_at"),
        sa.Index(REFERENCE_INDEX, "reference"),
        # MySQL and MariaDB: transactions, and keys whatever their characters.
        mysql_engine="InnoDB",
        mysql_charset="utf8mb4",
    )


def due_index(column: str = "next_attempt_at") -> sa.Index:
    """The index the workers' due query reads: partial, so done and dead rows
    (NULL) cost it nothing to store or to maintain, however many a shop keeps.
    The due query's ``next_attempt_at <= :now`` implies the predicate, which
    both PostgreSQL and SQLite recognise."""
    where = sa.column(column).is_not(None)
    return sa.Index(DUE_INDEX, column, postgresql_where=where, sqlite_where=where)


@dataclass(frozen=True)
class Claim:
    """This worker owns a delivery's current attempt."""

    token: str
    attempt: int


@dataclass(frozen=True)
class FailedAttempt:
    """One failed attempt of a delivery, as the store keeps it."""

    attempt: int
    at: datetime
    error: str


def failure_line(attempt: int, at: datetime, error: str) -> str:
    """The history line the store appends for a failed attempt."""
    return json.dumps({"attempt": attempt, "at": at.isoformat(), "error": error}) + "\n"


def parse_failures(text: str | None) -> tuple[FailedAttempt, ...]:
    """The failed attempts of a row's ``failures`` column, oldest first.

    A line that does not parse (cut by hand, say) is skipped rather than
    hiding the others.
    """
    attempts = []
    for line in (text or "").splitlines():
        try:
            item = json.loads(line)
            at = datetime.fromisoformat(item["at"])
            attempts.append(
                FailedAttempt(
                    attempt=int(item["attempt"]),
                    at=at if at.tzinfo else at.replace(tzinfo=UTC),
                    error=str(item["error"]),
                )
            )
        except (ValueError, KeyError, TypeError):
            continue
    return tuple(attempts)


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
    #: When the next attempt is due (a processing row: its lease end), or
    #: ``None`` when no attempt is planned (done, dead, or stored by 0.1).
    next_attempt_at: datetime | None = None
    #: The order id found in the body, if the provider names one.
    reference: str | None = None
    #: Every failed attempt, oldest first (rows stored by 0.2 and older
    #: have only :attr:`error`, the last one's).
    failed_attempts: tuple[FailedAttempt, ...] = ()
    #: When purge dropped the body and signed headers (a tombstone), if it did.
    compacted_at: datetime | None = None


#: What the request path did: ran the receivers, found the delivery done (or,
#: deferred, already stored), or stored it for a worker.
Outcome = Literal["dispatched", "duplicate", "accepted"]
