"""How long a purge run holds off other writers on SQLite, behind old tombstones.

    .venv/bin/python -m benchmarks.purge_lock                     # 1,000,000 tombstones
    .venv/bin/python -m benchmarks.purge_lock --tombstones 200000 --runs 3

SQLite has one writer. A compaction run reads the done rows older than its
cutoff along ``(status, updated_at)``, the tombstones it made before
included, to find the ones still whole. This fills a WAL-mode database (as
``docs/deployment.rst`` asks of a shop on SQLite) with ``--tombstones``
compacted gateway rows and one whole row newer than all of them, then runs
the compaction while a second connection tries to write every half
millisecond with no busy timeout, and prints how long the run took and the
longest stretch during which that writer was refused: how long a live
callback would have waited for purge.

Before session 8 the batch picked its rows inside its write statement and
held the write lock for the whole read: behind a million tombstones, on a
2-core machine, the other writer was refused for 665-943 ms (this script on
c16ff40's package). It now reads first, without the lock: 0 ms.
Nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_orderhooks import OrderHooks
from flask_orderhooks.store import DeliveryStore

#: Rows per INSERT while filling.
CHUNK = 20_000


@dataclass
class Probe:
    """A second writer, trying every half millisecond, timing its refusals."""

    path: Path
    longest: float = 0.0
    written: int = 0
    refused: int = 0

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._connection = sqlite3.connect(
            self.path, timeout=0, isolation_level=None, check_same_thread=False
        )
        self._connection.execute("CREATE TABLE IF NOT EXISTS probe (n INTEGER)")

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self._connection.close()

    def _run(self) -> None:
        refused_since: float | None = None
        while not self._stop.is_set():
            try:
                self._connection.execute("INSERT INTO probe VALUES (1)")
            except sqlite3.OperationalError:
                self.refused += 1
                refused_since = refused_since or time.monotonic()
            else:
                self.written += 1
                if refused_since is not None:
                    self.longest = max(self.longest, time.monotonic() - refused_since)
                    refused_since = None
            time.sleep(0.0005)
        if refused_since is not None:
            self.longest = max(self.longest, time.monotonic() - refused_since)


def fill(store: DeliveryStore, tombstones: int, old: datetime) -> None:
    t = store.table

    def row(key: str, at: datetime, compacted: bool) -> dict[str, object]:
        return {
            "provider": "gateway",
            "callback": "collect",
            "key": key,
            "status": "done",
            "attempts": 1,
            "claim_token": "t",
            "lease_expires_at": old,
            "body": b"" if compacted else b"{}",
            "body_sha256": "0" * 64,
            "headers": "{}",
            "created_at": old,
            "updated_at": at,
            "compacted_at": old if compacted else None,
        }

    with store.engine.begin() as connection:
        connection.execute(sa.delete(t))
        for start in range(0, tombstones, CHUNK):
            stop = min(tombstones, start + CHUNK)
            connection.execute(
                sa.insert(t),
                [row(f"T{i:08d}", old + timedelta(seconds=i), True) for i in range(start, stop)],
            )
        connection.execute(
            sa.insert(t), [row("whole", old + timedelta(seconds=tombstones + 1), False)]
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.purge_lock",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--tombstones", type=int, default=1_000_000, help="[1000000]")
    parser.add_argument("--runs", type=int, default=2, help="compaction runs, each refilled [2]")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="orderhooks-purge-lock-") as tmp:
        path = Path(tmp) / "shop.db"
        app = Flask("purge_lock")
        app.config["SQLALCHEMY_DATABASE_URI"] = f"sqlite:///{path}"
        app.config["ORDERHOOKS_GATEWAY_KEY"] = {"10001": "k" * 32}
        db = SQLAlchemy(app)
        hooks = OrderHooks(app, db=db)
        old = datetime.now(UTC) - timedelta(days=400)
        with app.app_context():
            db.create_all()
            with db.engine.connect() as connection:
                connection.exec_driver_sql("PRAGMA journal_mode=WAL")
            store = hooks.state(app).store
            for run in range(1, args.runs + 1):
                fill(store, args.tombstones, old)
                with Probe(path) as probe:
                    began = time.monotonic()
                    compacted = store.compact(
                        older_than=datetime.now(UTC) - timedelta(days=30), provider="gateway"
                    )
                    took = time.monotonic() - began
                print(
                    f"run {run}: {args.tombstones} tombstones, compacted {compacted} in "
                    f"{took * 1000:.0f} ms; the other writer was refused for at most "
                    f"{probe.longest * 1000:.0f} ms ({probe.refused} of "
                    f"{probe.refused + probe.written} tries)"
                )
            db.engine.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
