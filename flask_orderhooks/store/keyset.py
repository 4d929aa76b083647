"""Keyset pages of the deliveries list: newest received first, ties broken in
the primary key's order (descending), which is the order an index on
``created_at`` keeps (InnoDB appends the primary key to it)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from .table import WHEN


def newest_first(t: sa.Table) -> tuple[sa.UnaryExpression[Any], ...]:
    """The list's ``ORDER BY``."""
    return (t.c.created_at.desc(), t.c.provider.desc(), t.c.callback.desc(), t.c.key.desc())


def older_than(
    t: sa.Table, created_at: datetime, provider: str, callback: str, key: str
) -> sa.ColumnElement[bool]:
    """Rows after the row ``(created_at, provider, callback, key)`` in
    :func:`newest_first`'s order. Written out rather than as a row-value
    comparison: the first condition is a plain range on the created_at index
    for every planner; the rest only breaks ties between rows stored in the
    same microsecond."""
    # The store's time type: MySQL's DATETIME takes naive UTC only.
    when = created_at.replace(tzinfo=UTC) if created_at.tzinfo is None else created_at
    at = sa.bindparam("c_created", when.astimezone(UTC), type_=WHEN)
    return sa.and_(
        t.c.created_at <= at,
        sa.or_(
            t.c.created_at < at,
            t.c.provider < provider,
            sa.and_(t.c.provider == provider, t.c.callback < callback),
            sa.and_(t.c.provider == provider, t.c.callback == callback, t.c.key < key),
        ),
    )
