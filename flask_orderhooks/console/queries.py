"""The console's reads: each one served by an index, at any table size.

========================================  ==========================================
query                                     index
========================================  ==========================================
the list, newest first, one page          ``ix_orderhooks_deliveries_created``
                                          (``created_at``), read backwards from the
                                          page's cursor: no OFFSET, no COUNT
a time range                              the same index, as a range
search by key                             the primary key ``(provider, callback,
                                          key)``, one lookup per known callback
search by order id                        ``ix_orderhooks_deliveries_reference``
a status filter                           ``ix_orderhooks_deliveries_status_created``
                                          (``status, created_at``), one status's
                                          range read backwards (PostgreSQL may read
                                          the created index for done, nearly every
                                          row)
one delivery, a tombstone's body digest    the primary key
the chart's 24 hours                      ``ix_orderhooks_deliveries_status_created``
                                          alone: one created_at range per status
========================================  ==========================================
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from ..store import MAX_KEY_LENGTH, STATUSES, DeliveryStore, StoredDelivery
from ..store.keyset import newest_first, older_than
from ..store.table import MYSQL, REFERENCE, WHEN, text_of


def utc(value: datetime) -> datetime:
    """An aware UTC time (SQLite and MySQL hand stored times back naive).

    :raises OverflowError: in UTC, ``value`` falls before the year 1 or after
        9999 (``0001-01-01T00:00:00+05:00``).
    """
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# What some store backend cannot bind: PostgreSQL refuses NUL in text
# (psycopg's DataError), and no driver can encode a lone surrogate as UTF-8.
# Every other character binds on SQLite, PostgreSQL and MariaDB alike.
_UNBINDABLE = re.compile("[\x00\ud800-\udfff]")


def unbindable(text: str) -> str | None:
    """What in ``text`` some store backend cannot take as a parameter, said
    for a message ("a NUL character (U+0000)"), or ``None`` when every
    backend can.

    No key or order id the console could look up holds one, so it refuses
    them as the client's error, the same on every backend, before any query
    (PostgreSQL's refusal would otherwise read as "store unavailable").
    """
    found = _UNBINDABLE.search(text)
    if found is None:
        return None
    if found[0] == "\x00":
        return "a NUL character (U+0000)"
    return f"a lone surrogate (U+{ord(found[0]):04X})"


#: The cursor's fields, in :meth:`Cursor.encode`'s order, as messages name them.
_CURSOR_TEXT_FIELDS = ("platform", "callback", "key")


@dataclass(frozen=True)
class Filters:
    """What the list shows; ``None`` is "any"."""

    status: str | None = None
    provider: str | None = None
    callback: str | None = None
    #: Stored at or after this time.
    since: datetime | None = None
    #: Stored before this time.
    until: datetime | None = None
    #: A delivery key, or an order id found in a body (``reference``).
    search: str | None = None


@dataclass(frozen=True)
class Cursor:
    """Where a page ends: the sort key of its last row."""

    created_at: datetime
    provider: str
    callback: str
    key: str

    def encode(self) -> str:
        """The cursor as a URL-safe string (not secret, not signed: it only
        says where to start, and every value in it is a bound parameter)."""
        text = json.dumps(
            [utc(self.created_at).isoformat(), self.provider, self.callback, self.key],
            ensure_ascii=False,
            separators=(",", ":"),
        )
        return base64.urlsafe_b64encode(text.encode("utf-8")).decode("ascii").rstrip("=")

    @classmethod
    def decode(cls, text: str) -> Cursor:
        """Parse :meth:`encode`'s output.

        :raises ValueError: it is not a cursor; the message says why, as a
            clause ("its time is out of range").
        """
        when, *names = _cursor_fields(text)
        for field, value in zip(_CURSOR_TEXT_FIELDS, names, strict=True):
            problem = unbindable(value)
            if problem is not None:
                raise ValueError(f"its {field} holds {problem}")
        try:
            created_at = utc(datetime.fromisoformat(when))
        except ValueError as exc:
            raise ValueError("its time is not a time") from exc
        except OverflowError as exc:
            raise ValueError("its time is out of range") from exc
        provider, callback, key = names
        return cls(created_at, provider, callback, key)


def _cursor_fields(text: str) -> list[str]:
    """The four strings a cursor's text holds.

    :raises ValueError: it holds something else.
    """
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        fields = json.loads(raw.decode("utf-8"))
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise ValueError("it is not a page cursor") from exc
    except RecursionError as exc:
        # json.loads recurses once per nested array: "[" * 1500 gets this far.
        raise ValueError("it is nested too deeply to be a page cursor") from exc
    if (
        not isinstance(fields, list)
        or len(fields) != 4
        or not all(isinstance(value, str) for value in fields)
    ):
        raise ValueError("it is not a page cursor")
    return fields


@dataclass(frozen=True)
class ListRow:
    """One line of the list: no body, no headers."""

    provider: str
    callback: str
    key: str
    status: str
    attempts: int
    reference: str | None
    error: str | None
    created_at: datetime
    updated_at: datetime
    next_attempt_at: datetime | None

    @property
    def cursor(self) -> Cursor:
        return Cursor(self.created_at, self.provider, self.callback, self.key)


@dataclass(frozen=True)
class Page:
    """One page of the list, and where the next (older) one starts."""

    rows: list[ListRow]
    next: Cursor | None


def _when(name: str, value: datetime) -> sa.BindParameter[datetime]:
    # The store's time type: MySQL's DATETIME takes naive UTC only.
    return sa.bindparam(name, utc(value), type_=WHEN)


def _older_than(t: sa.Table, cursor: Cursor) -> sa.ColumnElement[bool]:
    """Rows after ``cursor`` in the list's order."""
    return older_than(t, cursor.created_at, cursor.provider, cursor.callback, cursor.key)


def _search(
    t: sa.Table, text: str, pairs: Iterable[tuple[str, str]]
) -> sa.ColumnElement[bool] | None:
    """Rows whose key is ``text`` (one primary-key lookup per known callback:
    the key is the key's last column) or whose reference is ``text``."""
    if len(text) > MAX_KEY_LENGTH:
        return None
    terms: list[sa.ColumnElement[bool]] = [
        sa.and_(t.c.provider == provider, t.c.callback == callback, t.c.key == text)
        for provider, callback in pairs
    ]
    terms.append(t.c.reference == sa.bindparam(None, text, type_=REFERENCE))
    return sa.or_(*terms)


def _where(
    t: sa.Table, filters: Filters, pairs: Sequence[tuple[str, str]]
) -> list[sa.ColumnElement[bool]] | None:
    """The filters as conditions; ``None`` when nothing can match."""
    conditions: list[sa.ColumnElement[bool]] = []
    if filters.status is not None:
        conditions.append(t.c.status == filters.status)
    if filters.provider is not None:
        conditions.append(t.c.provider == filters.provider)
    if filters.callback is not None:
        conditions.append(t.c.callback == filters.callback)
    if filters.since is not None:
        conditions.append(t.c.created_at >= _when("since", filters.since))
    if filters.until is not None:
        conditions.append(t.c.created_at < _when("until", filters.until))
    if filters.search:
        wanted = [
            (p, c)
            for p, c in pairs
            if filters.provider in (None, p) and filters.callback in (None, c)
        ]
        found = _search(t, filters.search, wanted)
        if found is None:
            return None
        conditions.append(found)
    return conditions


def list_query(
    t: sa.Table,
    filters: Filters,
    *,
    pairs: Sequence[tuple[str, str]],
    after: Cursor | None,
    limit: int,
) -> sa.Select[Any] | None:
    """The list's statement (``None`` when nothing can match): one more row
    than ``limit``, which says whether an older page exists without a COUNT."""
    conditions = _where(t, filters, pairs)
    if conditions is None:
        return None
    if after is not None:
        conditions.append(_older_than(t, after))
    return (
        sa.select(
            t.c.provider,
            t.c.callback,
            t.c.key,
            t.c.status,
            t.c.attempts,
            t.c.reference,
            t.c.error,
            t.c.created_at,
            t.c.updated_at,
            t.c.next_attempt_at,
        )
        .where(*conditions)
        .order_by(*newest_first(t))
        .limit(limit + 1)
    )


def list_page(
    store: DeliveryStore,
    filters: Filters,
    *,
    pairs: Sequence[tuple[str, str]],
    after: Cursor | None,
    limit: int,
) -> Page:
    """One page of deliveries, newest first.

    :param pairs: every ``(provider, callback)`` a key search looks in.
    :param after: the previous page's :attr:`Page.next`, or ``None``.
    :param limit: rows per page.
    """
    query = list_query(store.table, filters, pairs=pairs, after=after, limit=limit)
    if query is None:
        return Page([], None)
    with store.engine.connect() as connection:
        result = connection.execute(query).all()
    rows = [
        ListRow(
            provider=r.provider,
            callback=r.callback,
            key=r.key,
            status=r.status,
            attempts=int(r.attempts),
            reference=text_of(r.reference),
            error=r.error,
            created_at=utc(r.created_at),
            updated_at=utc(r.updated_at),
            next_attempt_at=utc(r.next_attempt_at) if r.next_attempt_at is not None else None,
        )
        for r in result
    ]
    if len(rows) > limit:
        rows = rows[:limit]
        return Page(rows, rows[-1].cursor)
    return Page(rows, None)


def one(store: DeliveryStore, provider: str, callback: str, key: str) -> StoredDelivery | None:
    """The delivery stored under ``(provider, callback, key)`` (primary key)."""
    if len(key) > MAX_KEY_LENGTH:
        return None
    rows = store.get(key, provider=provider, callback=callback)
    return rows[0] if rows else None


def body_digest(store: DeliveryStore, provider: str, callback: str, key: str) -> str | None:
    """The SHA-256 digest (hex) kept of the delivery's body (primary key):
    all that is left of the body of a tombstone purge compacted."""
    t = store.table
    query = sa.select(t.c.body_sha256).where(
        t.c.provider == provider, t.c.callback == callback, t.c.key == key
    )
    store.prepare()
    with store.engine.connect() as connection:
        digest = connection.execute(query).scalar()
    return None if digest is None else str(digest)


def _hour(dialect: str, t: sa.Table) -> sa.ColumnElement[Any]:
    """``created_at`` truncated to its UTC hour, as text ``YYYY-MM-DD HH``."""
    if dialect == "postgresql":
        # AT TIME ZONE: to_char of a timestamptz uses the session's zone.
        return sa.func.to_char(sa.func.timezone("UTC", t.c.created_at), "YYYY-MM-DD HH24")
    if dialect in MYSQL:
        # Stored as naive UTC.
        return sa.func.date_format(t.c.created_at, "%Y-%m-%d %H")
    # SQLite keeps ISO text in UTC.
    return sa.func.strftime("%Y-%m-%d %H", t.c.created_at)


def hourly_query(dialect: str, t: sa.Table, *, start: datetime, end: datetime) -> sa.Select[Any]:
    """The chart's statement: one GROUP BY over a range of created_at, read
    from ``ix_orderhooks_deliveries_status_created`` alone."""
    # Every status the store writes, so no row is left out: the condition
    # turns the index's leading column into one created_at range per status,
    # and the planner counts from the index without reading a table row
    # (PostgreSQL: on pages its visibility map marks all-visible). Inlined:
    # the planner sees the same five values whether the plan is custom or
    # generic.
    every_status: sa.BindParameter[list[str]] = sa.bindparam(
        "statuses", list(STATUSES), expanding=True, literal_execute=True
    )
    return (
        sa.select(_hour(dialect, t).label("bucket"), t.c.status, sa.func.count().label("n"))
        .where(
            t.c.status.in_(every_status),
            t.c.created_at >= _when("start", start),
            t.c.created_at < _when("end", end),
        )
        # By the output name: the expression written twice would carry its
        # format string as two parameters, which PostgreSQL does not
        # recognise as the same expression.
        .group_by(sa.literal_column("bucket"), t.c.status)
    )


def hourly_counts(
    store: DeliveryStore, *, start: datetime, end: datetime
) -> dict[datetime, dict[str, int]]:
    """How many deliveries were stored in each UTC hour of ``[start, end)``,
    by their status now.

    :returns: ``{hour start (aware UTC): {status: count}}``; empty hours absent.
    """
    query = hourly_query(store.dialect, store.table, start=start, end=end)
    counts: dict[datetime, dict[str, int]] = {}
    with store.engine.connect() as connection:
        for r in connection.execute(query).all():
            when = datetime.strptime(str(r.bucket), "%Y-%m-%d %H").replace(tzinfo=UTC)
            counts.setdefault(when, {})[str(r.status)] = int(r.n)
    return counts


def last_hours(now: datetime, hours: int = 24) -> tuple[datetime, datetime]:
    """``[start, end)`` of the ``hours`` UTC hours up to and including now's."""
    current = utc(now).replace(minute=0, second=0, microsecond=0)
    return current - timedelta(hours=hours - 1), current + timedelta(hours=1)
