"""How database errors become :class:`~flask_orderhooks.StoreUnavailable` answers."""

from __future__ import annotations

from sqlalchemy.exc import DBAPIError

# SQLSTATE of PostgreSQL's lock_timeout expiring.
PG_LOCK_NOT_AVAILABLE = "55P03"


def is_busy(exc: DBAPIError) -> bool:
    if getattr(exc.orig, "sqlstate", None) == PG_LOCK_NOT_AVAILABLE:
        return True
    return "database is locked" in str(exc.orig)
