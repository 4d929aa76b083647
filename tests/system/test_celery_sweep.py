"""The sweep task ``orderhooks.process_due``: bounded, so that a Celery
worker's warm shutdown and time limits never meet a task that runs as long
as deliveries keep arriving."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask

from flask_orderhooks import OrderHooks
from flask_orderhooks.celery import DISPATCH_TASK, PROCESS_DUE_TASK, init_celery
from flask_orderhooks.testing import igv_order_status
from tests.conftest import IGV_SECRET, Recorder

from .test_celery import Message, memory_celery, post_in_process, published, run_task, stored

RecorderFactory = Callable[..., tuple[Flask, Recorder]]


def test_a_sweep_under_a_steady_inflow_ends_and_hands_on_the_rest(
    recorder: RecorderFactory,
) -> None:
    """The sweep claimed due deliveries until none was left. Under a steady
    inflow (a storm whose messages were lost, a broker outage's backlog
    while callbacks keep arriving) one sweep task never ended: a warm
    shutdown of its Celery worker waited for it until the worker was killed
    mid-dispatch (the attempt lost, the delivery held for a lease), a
    ``task_time_limit`` killed it the same way, and every beat tick added
    another such task. A sweep now attempts at most ``sweep_batch``
    deliveries; when it did, it enqueues the next sweep, which goes on.
    (Here a backlog of 21 whose messages were lost: one sweep took all 21.)"""
    app, rec = recorder(ORDERHOOKS_DISPATCH="deferred")
    hooks: OrderHooks = app.extensions["orderhooks"]
    celery, queue = memory_celery()
    init_celery(celery, hooks, sweep_batch=5)
    backlog = [
        igv_order_status(IGV_SECRET, request_id=f"R{uuid.uuid4().hex[:12]}") for _ in range(21)
    ]
    for cb in backlog:
        assert post_in_process(app, cb).status == 200
    published(celery, queue)  # the dispatch messages are lost: only the sweep runs

    assert run_task(celery, PROCESS_DUE_TASK) == 5
    assert [m for m in published(celery, queue) if m.task != DISPATCH_TASK] == [
        Message(PROCESS_DUE_TASK, [], None)
    ]
    sweeps = 1
    while True:
        attempted = run_task(celery, PROCESS_DUE_TASK)
        sweeps += 1
        following = [m for m in published(celery, queue) if m.task != DISPATCH_TASK]
        if attempted < 5:
            assert following == []
            break
        assert following == [Message(PROCESS_DUE_TASK, [], None)]
    assert len(rec.events) == 21
    assert sweeps == 5
    assert {stored(app, cb).status for cb in backlog} == {"done"}


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "10"])
def test_sweep_batch_must_be_a_positive_whole_number(
    recorder: RecorderFactory, bad: object
) -> None:
    app, _rec = recorder(ORDERHOOKS_DISPATCH="deferred")
    celery, _queue = memory_celery()
    with pytest.raises(ValueError) as caught:
        init_celery(celery, app.extensions["orderhooks"], sweep_batch=bad)  # type: ignore[arg-type]
    assert str(caught.value) == (
        f"init_celery(sweep_batch={bad!r}): the most deliveries one sweep task attempts "
        "must be a whole number of at least 1."
    )
    assert app.extensions["orderhooks"].enqueuer is None


def test_a_next_sweep_that_cannot_be_enqueued_costs_a_warning(
    recorder: RecorderFactory, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, _rec = recorder(ORDERHOOKS_DISPATCH="deferred")
    celery, queue = memory_celery()
    init_celery(celery, app.extensions["orderhooks"], sweep_batch=1)
    for _ in range(2):
        cb = igv_order_status(IGV_SECRET, request_id=f"R{uuid.uuid4().hex[:12]}")
        assert post_in_process(app, cb).status == 200
    published(celery, queue)

    def refused(*_args: Any, **_kwargs: Any) -> None:
        raise ConnectionRefusedError("broker down")

    monkeypatch.setattr(celery.tasks[PROCESS_DUE_TASK], "apply_async", refused)
    with caplog.at_level(logging.WARNING, logger="flask_orderhooks"):
        assert run_task(celery, PROCESS_DUE_TASK) == 1
    assert (
        "could not enqueue the next sweep (ConnectionRefusedError: broker down); "
        "the next beat sweep goes on" in caplog.text
    )
