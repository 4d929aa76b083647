"""What each part of the MariaDB (MySQL) claim statement costs the server.

    .venv/bin/python -m benchmarks.claim_shapes [--rounds 8] [--batch 150]

The claim of an inline first delivery is one ``INSERT … ON DUPLICATE KEY
UPDATE`` of about 2,500 characters (its update clause decides a takeover in
six ``CASE`` expressions), run under ``SET STATEMENT
innodb_lock_wait_timeout = N FOR``. This takes the text the store really
sends (one first delivery through the benchmark app, read off PyMySQL), then
times, on one PyMySQL connection in a loop, that statement and its
``COMMIT`` against the same row written in simpler shapes:

- the claim without ``SET STATEMENT``;
- ``ON DUPLICATE KEY UPDATE status = status`` (the upsert path, no clause);
- a plain ``INSERT`` of the row;
- a plain ``INSERT`` into a copy of the table without its five secondary
  indexes.

Every shape inserts a new key (no conflict: a first delivery). Rounds
alternate the shapes; each shape's figure is the median over rounds of its
per-round median. The loop keeps the server's thread busy, so the times are
lower than a request's, where the statement waits for a thread to wake;
compare the shapes with each other. Nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from flask_orderhooks.store.table import (
    CREATED_INDEX,
    DUE_INDEX,
    REFERENCE_INDEX,
    STATUS_CREATED_INDEX,
    STATUS_UPDATED_INDEX,
    TABLE_NAME,
)
from flask_orderhooks.testing import igv_order_status

from .apps import PATH, SECRET, ready_app
from .harness import DEFAULT_MARIADB_URL, private_database, pymysql_connect

#: The key of the captured claim; each timed statement gets its own instead.
_KEY = "claimshape000"
_SECONDARY = (CREATED_INDEX, STATUS_CREATED_INDEX, STATUS_UPDATED_INDEX, REFERENCE_INDEX, DUE_INDEX)


def captured_claim(url: str) -> str:
    """The SQL of one inline first delivery's claim, as PyMySQL sent it."""
    import pymysql.connections  # noqa: PLC0415

    app = ready_app("orderhooks", url)
    sent: list[str] = []
    connection = pymysql.connections.Connection
    query = connection.query

    def recording(self: Any, sql: str | bytes, unbuffered: bool = False) -> Any:
        sent.append(sql.decode() if isinstance(sql, bytes) else sql)
        return query(self, sql, unbuffered)

    cb = igv_order_status(SECRET, request_id=_KEY)
    connection.query = recording
    try:
        response = app.test_client().post(PATH, data=cb.body, headers=cb.headers)
    finally:
        connection.query = query
    assert response.status_code == 200, response.data
    (claim,) = [sql for sql in sent if " INSERT INTO " in f" {sql}"]
    return claim


def shapes(claim: str) -> dict[str, str]:
    prefix, _, insert = claim.partition(" FOR ")
    assert prefix.startswith("SET STATEMENT"), claim[:60]
    plain, _, _clause = insert.partition(" ON DUPLICATE KEY UPDATE ")
    trivial = "ON DUPLICATE KEY UPDATE status = status"
    return {
        "the claim (shipped)": claim,
        "without SET STATEMENT": insert,
        trivial: f"{plain} {trivial}",
        "plain INSERT": plain,
        "plain INSERT, no secondary indexes": plain.replace(
            f"INSERT INTO {TABLE_NAME} ", "INSERT INTO claim_shapes_bare ", 1
        ),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.claim_shapes",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--batch", type=int, default=150, help="statements per shape and round")
    parser.add_argument("--mariadb-url", default=DEFAULT_MARIADB_URL)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    with private_database(args.mariadb_url, "orderhooks_claims") as url:
        named = shapes(captured_claim(url))
        connection = pymysql_connect(url)
        with connection.cursor() as cursor:
            cursor.execute(f"CREATE TABLE claim_shapes_bare LIKE {TABLE_NAME}")
            for index in _SECONDARY:
                cursor.execute(f"ALTER TABLE claim_shapes_bare DROP INDEX {index}")
        quoted_key = "X'" + _KEY.encode().hex() + "'"
        assert all(quoted_key in sql for sql in named.values()), "the key is not hex-quoted"
        statement_us: dict[str, list[float]] = {name: [] for name in named}
        commit_us: dict[str, list[float]] = {name: [] for name in named}
        n = 0
        with connection.cursor() as cursor:
            for _round in range(args.rounds):
                for name, sql in named.items():
                    ran: list[float] = []
                    committed: list[float] = []
                    for _ in range(args.batch):
                        n += 1
                        key = "X'" + f"s{n:011d}".encode().hex() + "'"
                        text = sql.replace(quoted_key, key, 1)
                        began = time.perf_counter()
                        cursor.execute(text)
                        middle = time.perf_counter()
                        connection.commit()
                        ran.append(middle - began)
                        committed.append(time.perf_counter() - middle)
                    statement_us[name].append(1e6 * statistics.median(ran))
                    commit_us[name].append(1e6 * statistics.median(committed))
        connection.close()
    print(f"MariaDB claim shapes: {args.rounds} rounds x {args.batch} new keys per shape")
    print()
    print("| shape | statement, us | its COMMIT, us |")
    print("|---|---|---|")
    for name in named:
        print(
            f"| {name} | {statistics.median(statement_us[name]):.0f} "
            f"| {statistics.median(commit_us[name]):.0f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
