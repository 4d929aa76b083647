"""The durable, idempotent delivery store: exactly-once dispatch.

One row per ``(provider, callback, key)``. A delivery moves through two short
transactions:

1. **Claim** (committed at once): one upsert (on PostgreSQL, MySQL and
   MariaDB run alone in autocommit mode, one round trip) that inserts the delivery as
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

from .delivery_store import DeliveryStore, DueClaim
from .retries import NO_RETRIES, RetrySchedule
from .standalone import StandaloneDatabase
from .table import (
    DEAD,
    DONE,
    DUE_INDEX,
    FAILED,
    MAX_ERROR_LENGTH,
    MAX_KEY_LENGTH,
    PENDING,
    PROCESSING,
    STATUSES,
    TABLE_NAME,
    Claim,
    FailedAttempt,
    Outcome,
    StoredDelivery,
    deliveries_table,
)
from .transactions import ConnectionTransaction, SessionTransaction, Transaction

__all__ = [
    "DEAD",
    "DONE",
    "DUE_INDEX",
    "FAILED",
    "MAX_ERROR_LENGTH",
    "MAX_KEY_LENGTH",
    "NO_RETRIES",
    "PENDING",
    "PROCESSING",
    "STATUSES",
    "TABLE_NAME",
    "Claim",
    "ConnectionTransaction",
    "DeliveryStore",
    "DueClaim",
    "FailedAttempt",
    "Outcome",
    "RetrySchedule",
    "SessionTransaction",
    "StandaloneDatabase",
    "StoredDelivery",
    "Transaction",
    "deliveries_table",
]
