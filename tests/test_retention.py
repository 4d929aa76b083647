"""Purge's batches are bounded in time as well as in rows: a live callback
that resends a row of a batch waits for the batch's commit, and on a slow or
saturated machine 500 rows took most of ORDERHOOKS_DUPLICATE_WAIT."""

from __future__ import annotations

import itertools
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from flask_orderhooks.store import retention
from flask_orderhooks.store.retention import FIRST_BATCH, MIN_BATCH, BatchSize, delete_old
from tests.conftest import AppFactory


def test_a_batch_halves_after_a_slow_one_and_doubles_after_a_quick_one() -> None:
    size = BatchSize(500, target=0.75)
    seen = []
    for seconds in (0.1, 0.1, 0.1, 0.1, 1.0, 1.0, 0.5, 0.2, 5, 5, 5, 5, 5, 5):
        seen.append(size.rows)
        size.took(seconds)
    # Up from FIRST_BATCH to the limit, down by halves to MIN_BATCH; between
    # half the target and the target it stays.
    assert seen == [100, 200, 400, 500, 500, 250, 125, 125, 250, 125, 62, 31, 15, 10]
    assert (FIRST_BATCH, MIN_BATCH) == (100, 10)


def test_a_smaller_limit_bounds_every_batch() -> None:
    size = BatchSize(50, target=0.75)
    assert size.rows == 50
    size.took(0.0)
    assert size.rows == 50
    tiny = BatchSize(3, target=0.75)
    tiny.took(9.0)
    assert tiny.rows == 3


@pytest.mark.parametrize("backend", ["sqlite"])
def test_a_run_whose_batches_are_slow_takes_smaller_ones(
    make_app: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every batch seems to take 1 s against a 3 s duplicate wait (target
    0.75 s): 100 rows, then 50, 25, 12, then 10 at a time, every row deleted."""
    app, hooks, _db = make_app()
    store = hooks.state(app).store
    old = datetime.now(UTC) - timedelta(days=400)
    with app.app_context():
        store.prepare()
        with store.engine.begin() as connection:
            connection.execute(
                sa.insert(store.table),
                [
                    {
                        "provider": "igv",
                        "callback": "order-status",
                        "key": f"k{i:04d}",
                        "status": "done",
                        "attempts": 1,
                        "claim_token": "t",
                        "lease_expires_at": old,
                        "body": b"{}",
                        "body_sha256": "0" * 64,
                        "headers": "{}",
                        "created_at": old,
                        "updated_at": old + timedelta(seconds=i),
                    }
                    for i in range(300)
                ],
            )
        ticks = itertools.count()
        monkeypatch.setattr(retention, "_monotonic", lambda: float(next(ticks)))
        sizes: Counter[int] = Counter()
        taken = BatchSize.took

        def record(self: BatchSize, seconds: float) -> None:
            sizes[self.rows] += 1
            taken(self, seconds)

        monkeypatch.setattr(BatchSize, "took", record)
        deleted = delete_old(
            store,
            older_than=datetime.now(UTC) - timedelta(days=30),
            statuses=("done",),
            provider="igv",
        )
        assert list(store.list()) == []
    assert deleted == 300
    # 100 + 50 + 25 + 12 = 187, then 12 batches of 10 (the last finds 3).
    assert sizes == {100: 1, 50: 1, 25: 1, 12: 1, 10: 12}
