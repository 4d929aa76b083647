"""A worker during a store outage says so once, then every few minutes,
and once more when the store is back: not a WARNING per poll (7,200 lines
an hour at 0.5 s)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
from flask import Flask

from flask_orderhooks import worker as worker_module
from flask_orderhooks.exc import StoreUnavailable
from flask_orderhooks.store import DeliveryStore, DueClaim
from flask_orderhooks.worker import Worker
from tests.conftest import Recorder
from tests.test_delivery_queue import Clock, clock, deferred
from tests.test_durability import make, post

__all__ = ["clock"]  # the fixture, used by name

RecorderFactory = Callable[..., tuple[Flask, Recorder]]

FAILING_PASSES = 5


class _Kept(logging.Handler):
    """Keeps every record, DEBUG included (caplog's level would not reach it)."""

    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _run_through_an_outage(
    recorder: RecorderFactory, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> tuple[Recorder, list[tuple[int, str]]]:
    """A worker whose first passes find the store unavailable, then one
    that dispatches the waiting delivery; the log lines it wrote."""
    app, rec = deferred(recorder, clock)
    assert post(app, make("igv", app)).status_code == 200
    state = app.extensions["orderhooks"].state(app)
    store: DeliveryStore = state.store
    worker = Worker(app, state, poll_interval=0.001)
    real = store.claim_due
    calls = [0]

    def claim_due(key: tuple[str, str, str] | None = None) -> DueClaim | None:
        calls[0] += 1
        if calls[0] <= FAILING_PASSES:
            raise StoreUnavailable("The store is unavailable.")
        claimed = real(key)
        if claimed is None:
            worker.stop()
        return claimed

    monkeypatch.setattr(store, "claim_due", claim_due)
    logger = logging.getLogger("flask_orderhooks")
    handler = _Kept(logging.DEBUG)
    records = handler.records
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        with app.app_context():
            worker.run()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    lines = [(r.levelno, r.getMessage()) for r in records if "store" in r.getMessage()]
    return rec, lines


def test_an_outage_is_said_once_and_its_end_once(
    recorder: RecorderFactory, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec, lines = _run_through_an_outage(recorder, clock, monkeypatch)
    warnings = [text for level, text in lines if level == logging.WARNING]
    assert len(warnings) == 2, lines
    assert warnings[0].startswith(
        "worker: the store is unavailable (The store is unavailable.); looking again every "
    )
    assert warnings[1].startswith("worker: the store is back after ")
    # Every other failed pass is still in the log, at DEBUG.
    debug = [text for level, text in lines if level == logging.DEBUG and "unavailable" in text]
    assert len(debug) == FAILING_PASSES - 1
    assert len(rec.events) == 1  # the waiting delivery, once the store was back


def test_a_long_outage_is_said_again_every_reminder(
    recorder: RecorderFactory, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every failed pass after the first is past the reminder interval.
    monkeypatch.setattr(worker_module, "OUTAGE_REMINDER", 0.0)
    rec, lines = _run_through_an_outage(recorder, clock, monkeypatch)
    warnings = [text for level, text in lines if level == logging.WARNING]
    still = [text for text in warnings if text.startswith("worker: the store is still unavailable")]
    assert len(still) == FAILING_PASSES - 1, lines
    assert warnings[0].startswith("worker: the store is unavailable")
    assert warnings[-1].startswith("worker: the store is back after ")
    assert len(warnings) == FAILING_PASSES + 1
    assert len(rec.events) == 1
