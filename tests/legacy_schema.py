"""flask-orderhooks 0.1.0's deliveries table, as test data for the upgrade tests.

Written out here, never imported from the package: the package only knows
the current table. This is ``deliveries_table`` of 0.1.0's
``flask_orderhooks/store.py`` (``git show de8c87b~1:flask_orderhooks/store.py``),
column for column, with its one index. :func:`fill_legacy_table` stores
deliveries the way 0.1.0's claim and failure record left them, in every 0.1.0
status, with bodies signed by :mod:`flask_orderhooks.testing` so that the
upgraded app verifies (and dispatches) them again.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from flask import Flask

from flask_orderhooks.testing import SignedCallback, build

TABLE_NAME = "orderhooks_deliveries"
#: 0.1.0's only index; 0.2 keeps it.
LEGACY_INDEX = "ix_orderhooks_deliveries_status_updated"
#: 0.1.0's columns, in its order.
LEGACY_COLUMNS = (
    "provider",
    "callback",
    "key",
    "status",
    "attempts",
    "claim_token",
    "lease_expires_at",
    "body",
    "body_sha256",
    "headers",
    "error",
    "created_at",
    "updated_at",
)
#: The headers each 0.1.0 provider stored with a delivery: the signed ones
#: present in the request (the gateway signs its body only).
SIGNED_HEADERS: Mapping[str, tuple[str, ...]] = {
    "igv": ("X-Timestamp", "X-Request-Id", "X-Signature"),
    "gateway": (),
    "sud": ("Sud-AppId", "Sud-Timestamp", "Sud-Nonce", "Sud-Signature"),
}
#: 0.1.0's lease (``ORDERHOOKS_CLAIM_TIMEOUT`` default).
LEASE = timedelta(seconds=30)


def legacy_deliveries_table(metadata: sa.MetaData) -> sa.Table:
    """0.1.0's ``orderhooks_deliveries`` table, in ``metadata``."""
    return sa.Table(
        TABLE_NAME,
        metadata,
        sa.Column("provider", sa.String(16), primary_key=True),
        sa.Column("callback", sa.String(32), primary_key=True),
        sa.Column("key", sa.String(191), primary_key=True),
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
        sa.Index(LEGACY_INDEX, "status", "updated_at"),
    )


@dataclass(frozen=True)
class LegacyRow:
    """One delivery as 0.1.0 stored it, and the signed callback it came from.

    :param role: what the row stands for (a key of :data:`ROLES`).
    :param callback: the signed request; posting it again is the platform's
        resend of this very delivery.
    """

    role: str
    callback: SignedCallback
    status: str
    attempts: int
    error: str | None
    claim_token: str
    created_at: datetime
    updated_at: datetime
    lease_expires_at: datetime

    @property
    def key(self) -> str:
        return self.callback.key

    @property
    def headers(self) -> dict[str, str]:
        """What the 0.1.0 view passed on: the provider's signed headers."""
        names = SIGNED_HEADERS[self.callback.provider]
        return {
            name: self.callback.headers[name] for name in names if name in self.callback.headers
        }

    def values(self) -> dict[str, Any]:
        """The row's columns, exactly as 0.1.0's statements wrote them."""
        return {
            "provider": self.callback.provider,
            "callback": self.callback.callback,
            "key": self.callback.key,
            "status": self.status,
            "attempts": self.attempts,
            "claim_token": self.claim_token,
            "lease_expires_at": self.lease_expires_at,
            "body": self.callback.body,
            "body_sha256": hashlib.sha256(self.callback.body).hexdigest(),
            "headers": json.dumps(dict(self.headers), sort_keys=True),
            "error": self.error,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


#: role -> (callback kind, status, attempts, error, age of the row, lease left).
#: ``lease left`` counts from the last update for a processing row; 0.1.0 left
#: a done or failed row's last lease in place.
ROLES: Mapping[str, tuple[str, str, int, str | None, timedelta, timedelta]] = {
    # Failed once, then done: 0.1.0 kept the first error on a done row.
    "done": (
        "collect",
        "done",
        2,
        "RuntimeError: receiver exploded on purpose",
        timedelta(minutes=20),
        LEASE,
    ),
    # Failed; the platform's resend dispatches it again.
    "failed": (
        "igv",
        "failed",
        1,
        "RuntimeError: receiver exploded on purpose",
        timedelta(minutes=10),
        LEASE,
    ),
    # Failed twice; an operator's ``flask orderhooks replay KEY`` finishes it.
    "failed_replay": (
        "payout",
        "failed",
        2,
        "OperationalError: (psycopg.OperationalError) the ledger database is down",
        timedelta(minutes=15),
        LEASE,
    ),
    # Claimed by a 0.1.0 worker that died: its lease ran out long ago.
    "expired": ("sud", "processing", 1, None, timedelta(minutes=5), LEASE),
    # Claimed by a 0.1.0 worker that is still at it: its lease runs for an hour.
    "live": ("sud-batch", "processing", 1, None, timedelta(seconds=1), timedelta(hours=1)),
}


def legacy_rows(app: Flask, now: datetime) -> dict[str, LegacyRow]:
    """One delivery per :data:`ROLES` entry, signed with ``app``'s secrets.

    Each callback's own timestamp is its row's ``created_at``, well inside
    the iGV and SUD windows, so a resend of it is accepted. Keys are random:
    every call makes new deliveries.
    """
    rows = {}
    with app.app_context():
        for role, (kind, status, attempts, error, age, lease) in ROLES.items():
            created = now - age
            fields: dict[str, Any] = {}
            if kind in ("igv", "sud", "sud-batch"):
                fields["timestamp_ms"] = int(created.timestamp() * 1000)
            updated = created + (age / 2 if status != "processing" else timedelta(0))
            rows[role] = LegacyRow(
                role=role,
                callback=build(kind, app=app, **fields),
                status=status,
                attempts=attempts,
                error=error,
                claim_token=secrets.token_hex(16),
                created_at=created,
                updated_at=updated,
                lease_expires_at=updated + lease,
            )
    return rows


def create_legacy_table(connection: sa.Connection) -> sa.Table:
    """Create 0.1.0's table (and only it) on ``connection``."""
    table = legacy_deliveries_table(sa.MetaData())
    table.create(connection)
    return table


def fill_legacy_table(
    engine: sa.Engine, app: Flask, now: datetime | None = None
) -> dict[str, LegacyRow]:
    """Create 0.1.0's table on ``engine`` and store :func:`legacy_rows` in it."""
    rows = legacy_rows(app, now or datetime.now(UTC))
    with engine.begin() as connection:
        table = create_legacy_table(connection)
        connection.execute(table.insert(), [row.values() for row in rows.values()])
    return rows


def read_rows(engine: sa.Engine) -> dict[str, dict[str, Any]]:
    """Every row of the deliveries table as it is now, by key, all columns.

    Times come back aware in UTC on every backend (SQLite returns them naive).
    """
    table = sa.Table(TABLE_NAME, sa.MetaData(), autoload_with=engine)
    with engine.connect() as connection:
        result = connection.execute(sa.select(table)).mappings().all()
    return {str(row["key"]): {name: _plain(value) for name, value in row.items()} for row in result}


def _plain(value: Any) -> Any:
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    if isinstance(value, memoryview):
        return bytes(value)
    return value
