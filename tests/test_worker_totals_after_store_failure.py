"""A worker's totals keep the attempts of a pass that the store's failure cut
short: ``flask orderhooks worker`` prints them when it stops."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from flask import Flask

from flask_orderhooks.cli import orderhooks
from flask_orderhooks.exc import StoreUnavailable
from flask_orderhooks.store import DeliveryStore, DueClaim
from flask_orderhooks.worker import Worker
from tests.conftest import Recorder
from tests.test_delivery_queue import Clock, clock, deferred
from tests.test_durability import make, post, rows

__all__ = ["clock"]  # the fixture, used by name

RecorderFactory = Callable[..., tuple[Flask, Recorder]]


def test_a_pass_cut_short_by_the_store_still_counts_its_attempts(
    recorder: RecorderFactory, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, rec = deferred(recorder, clock)
    for _ in range(2):
        assert post(app, make("igv", app)).status_code == 200
    state = app.extensions["orderhooks"].state(app)
    store: DeliveryStore = state.store
    worker = Worker(app, state, poll_interval=0.05)
    real = store.claim_due
    calls = [0]

    def claim_due(key: tuple[str, str, str] | None = None) -> DueClaim | None:
        calls[0] += 1
        if calls[0] == 2:
            # The store goes away after the first delivery of the pass.
            worker.stop()
            raise StoreUnavailable("The store is unavailable.")
        return real(key)

    monkeypatch.setattr(store, "claim_due", claim_due)
    with app.app_context():
        result = worker.run()
    assert (result.attempted, result.done, result.failed) == (1, 1, 0)
    assert len(rec.events) == 1
    assert sorted(r.status for r in rows(app)) == ["done", "pending"]


def test_worker_once_says_what_it_did_when_the_store_fails(
    recorder: RecorderFactory, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``worker --once`` with the store failing after one delivery: one line
    with the count so far and the store's reason, exit 1; no traceback."""
    app, rec = deferred(recorder, clock)
    for _ in range(2):
        assert post(app, make("igv", app)).status_code == 200
    store: DeliveryStore = app.extensions["orderhooks"].state(app).store
    real = store.claim_due
    calls = [0]

    def claim_due(key: tuple[str, str, str] | None = None) -> DueClaim | None:
        calls[0] += 1
        if calls[0] == 2:
            raise StoreUnavailable("The store is unavailable.")
        return real(key)

    monkeypatch.setattr(store, "claim_due", claim_due)
    result = app.test_cli_runner().invoke(orderhooks, ["worker", "--once"])
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert result.output == (
        "Error: The delivery store failed after 1 delivery (0 failed): The store is unavailable.\n"
    )
    assert len(rec.events) == 1
