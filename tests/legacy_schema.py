"""The deliveries tables of flask-orderhooks 0.1.0 and 0.2, as test data for
the upgrade tests.

Written out here, never imported from the package: the package only knows
the current table.

- 0.1.0: ``deliveries_table`` of 0.1.0's ``flask_orderhooks/store.py``
  (``git show de8c87b~1:flask_orderhooks/store.py``), column for column, with
  its one index. 0.1.0 ran on SQLite and PostgreSQL only.
- 0.2: ``deliveries_table`` of 0.2's ``flask_orderhooks/store/table.py``
  (``git show ad0416c:flask_orderhooks/store/table.py``): 0.1.0's columns and
  index, ``next_attempt_at`` and the partial due index, and the MySQL/MariaDB
  types 0.2 introduced (byte-exact ``VARBINARY`` keys, ``utf8mb4_bin``
  strings, ``DATETIME(6)``, ``MEDIUMBLOB`` bodies, InnoDB and utf8mb4).

:func:`fill_legacy_table` stores deliveries the way that version's claim,
acceptance and failure record left them, in every status it had, with bodies
signed by :mod:`flask_orderhooks.testing` so that the upgraded app verifies
(and dispatches) them again.
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
from sqlalchemy.dialects import mysql

from flask_orderhooks.testing import SignedCallback, build

TABLE_NAME = "orderhooks_deliveries"
#: The versions whose tables these tests upgrade.
VERSIONS = ("0.1", "0.2")
#: 0.1.0's only index; 0.2 keeps it.
LEGACY_INDEX = "ix_orderhooks_deliveries_status_updated"
#: 0.2's partial index on ``next_attempt_at``.
DUE_INDEX_0_2 = "ix_orderhooks_deliveries_due"
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
#: 0.2's columns, in its order: 0.1.0's and the due time.
COLUMNS_0_2 = (*LEGACY_COLUMNS, "next_attempt_at")
#: Each version's columns and indexes.
COLUMNS: Mapping[str, tuple[str, ...]] = {"0.1": LEGACY_COLUMNS, "0.2": COLUMNS_0_2}
INDEXES: Mapping[str, tuple[str, ...]] = {
    "0.1": (LEGACY_INDEX,),
    "0.2": (LEGACY_INDEX, DUE_INDEX_0_2),
}
#: 0.2's default ORDERHOOKS_RETRY_DELAYS: the delay after attempt n is [n - 1].
RETRY_DELAYS_0_2 = (10, 60, 300, 1800, 7200, 43200)
_MYSQL = ("mysql", "mariadb")
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


def _exact_0_2(length: int) -> sa.types.TypeEngine[str]:
    # 0.2's exact_string(): binary-collated on MySQL and MariaDB.
    return sa.String(length).with_variant(
        mysql.VARCHAR(length, charset="utf8mb4", collation="utf8mb4_bin"), *_MYSQL
    )


#: 0.2's WHEN_COLUMN, KEY (a VARBINARY of the key's longest UTF-8 form) and BODY.
_WHEN_0_2 = sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), *_MYSQL)
_KEY_0_2 = sa.String(191).with_variant(mysql.VARBINARY(191 * 4), *_MYSQL)
_BODY_0_2 = sa.LargeBinary().with_variant(mysql.MEDIUMBLOB(), *_MYSQL)


def deliveries_table_0_2(metadata: sa.MetaData) -> sa.Table:
    """0.2's ``orderhooks_deliveries`` table, in ``metadata``."""
    where = sa.column("next_attempt_at").is_not(None)
    return sa.Table(
        TABLE_NAME,
        metadata,
        sa.Column("provider", _exact_0_2(16), primary_key=True),
        sa.Column("callback", _exact_0_2(32), primary_key=True),
        sa.Column("key", _KEY_0_2, primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("claim_token", _exact_0_2(32), nullable=False),
        sa.Column("lease_expires_at", _WHEN_0_2, nullable=False),
        sa.Column("body", _BODY_0_2, nullable=False),
        sa.Column("body_sha256", sa.String(64), nullable=False),
        sa.Column("headers", sa.Text, nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("created_at", _WHEN_0_2, nullable=False),
        sa.Column("updated_at", _WHEN_0_2, nullable=False),
        sa.Column("next_attempt_at", _WHEN_0_2, nullable=True),
        sa.Index(LEGACY_INDEX, "status", "updated_at"),
        sa.Index(DUE_INDEX_0_2, "next_attempt_at", postgresql_where=where, sqlite_where=where),
        mysql_engine="InnoDB",
        mysql_charset="utf8mb4",
    )


def versioned_table(version: str, metadata: sa.MetaData) -> sa.Table:
    """The deliveries table of ``version`` (one of :data:`VERSIONS`)."""
    if version == "0.1":
        return legacy_deliveries_table(metadata)
    if version == "0.2":
        return deliveries_table_0_2(metadata)
    raise ValueError(f"No table for version {version!r}; use one of {', '.join(VERSIONS)}.")


@dataclass(frozen=True)
class LegacyRow:
    """One delivery as 0.1.0 (or 0.2) stored it, and the signed callback it
    came from.

    :param role: what the row stands for (a key of :data:`ROLES` or
        :data:`ROLES_0_2`).
    :param callback: the signed request; posting it again is the platform's
        resend of this very delivery.
    :param version: the version that stored it; 0.2 also stored the due time.
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
    version: str = "0.1"
    next_attempt_at: datetime | None = None

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
        """The row's columns, exactly as its version's statements wrote them."""
        values: dict[str, Any] = {
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
        if self.version != "0.1":
            values["next_attempt_at"] = self.next_attempt_at
        return values


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


#: 0.2's rows: 0.1.0's roles, and the two statuses 0.2 added.
ROLES_0_2: Mapping[str, tuple[str, str, int, str | None, timedelta, timedelta]] = {
    **ROLES,
    # Accepted by a deferred request; no worker has taken it yet.
    "pending": ("collect", "pending", 0, None, timedelta(minutes=2), timedelta(0)),
    # Every local attempt failed; only a resend or a replay revives it.
    "dead": (
        "payout",
        "dead",
        7,
        "RuntimeError: receiver exploded on purpose",
        timedelta(hours=30),
        LEASE,
    ),
}


def _next_attempt_0_2(
    status: str, attempts: int, updated: datetime, lease_expires: datetime
) -> datetime | None:
    """The due time 0.2's statements left on a row in ``status``."""
    if status == "failed":
        return updated + timedelta(seconds=RETRY_DELAYS_0_2[attempts - 1])
    if status == "processing":
        return lease_expires
    if status == "pending":
        return updated
    return None  # done, dead


def legacy_rows(app: Flask, now: datetime, version: str = "0.1") -> dict[str, LegacyRow]:
    """One delivery per role of ``version`` (:data:`ROLES`, :data:`ROLES_0_2`),
    signed with ``app``'s secrets.

    Each callback's own timestamp is its row's ``created_at``, well inside
    the iGV and SUD windows, so a resend of it is accepted. Keys are random:
    every call makes new deliveries.
    """
    roles = ROLES if version == "0.1" else ROLES_0_2
    rows = {}
    with app.app_context():
        for role, (kind, status, attempts, error, age, lease) in roles.items():
            created = now - age
            fields: dict[str, Any] = {}
            if kind in ("igv", "sud", "sud-batch"):
                fields["timestamp_ms"] = int(created.timestamp() * 1000)
            untouched = status in ("processing", "pending")
            updated = created + (timedelta(0) if untouched else age / 2)
            lease_expires = updated + lease
            rows[role] = LegacyRow(
                role=role,
                callback=build(kind, app=app, **fields),
                status=status,
                attempts=attempts,
                error=error,
                claim_token=secrets.token_hex(16),
                created_at=created,
                updated_at=updated,
                lease_expires_at=lease_expires,
                version=version,
                next_attempt_at=(
                    None
                    if version == "0.1"
                    else _next_attempt_0_2(status, attempts, updated, lease_expires)
                ),
            )
    return rows


def create_legacy_table(connection: sa.Connection, version: str = "0.1") -> sa.Table:
    """Create ``version``'s table (and only it) on ``connection``."""
    table = versioned_table(version, sa.MetaData())
    table.create(connection)
    return table


def fill_legacy_table(
    engine: sa.Engine, app: Flask, now: datetime | None = None, version: str = "0.1"
) -> dict[str, LegacyRow]:
    """Create ``version``'s table on ``engine`` and store :func:`legacy_rows` in it."""
    rows = legacy_rows(app, now or datetime.now(UTC), version)
    with engine.begin() as connection:
        table = create_legacy_table(connection, version)
        values = [row.values() for row in rows.values()]
        if engine.dialect.name in _MYSQL:
            # 0.2 wrote naive UTC there (DATETIME has no time zone, and
            # PyMySQL would put an aware value's offset in the literal).
            # Keys are a VARBINARY there: their UTF-8 bytes, as 0.2 bound them.
            values = [
                {k: v.encode("utf-8") if k == "key" else _naive(v) for k, v in row.items()}
                for row in values
            ]
        connection.execute(table.insert(), values)
    return rows


def _naive(value: Any) -> Any:
    if isinstance(value, datetime) and value.tzinfo is not None:
        return value.astimezone(UTC).replace(tzinfo=None)
    return value


def read_rows(engine: sa.Engine) -> dict[str, dict[str, Any]]:
    """Every row of the deliveries table as it is now, by key, all columns.

    Times come back aware in UTC on every backend (SQLite and MySQL return
    them naive); a MySQL key (a ``VARBINARY``) comes back as its string.
    """
    table = sa.Table(TABLE_NAME, sa.MetaData(), autoload_with=engine)
    with engine.connect() as connection:
        result = connection.execute(sa.select(table)).mappings().all()
    rows = {}
    for row in result:
        values = {name: _plain(value) for name, value in row.items()}
        if isinstance(values["key"], bytes):
            values["key"] = values["key"].decode("utf-8")
        rows[values["key"]] = values
    return rows


def _plain(value: Any) -> Any:
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    if isinstance(value, memoryview):
        return bytes(value)
    return value
