"""``task_always_eager``: the dispatch task runs inside the request that
stored the delivery, and no broker is involved at all."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable

import pytest
from flask import Flask

from flask_orderhooks import OrderHooks, StoreUnavailable
from flask_orderhooks.celery import init_celery
from flask_orderhooks.testing import igv_order_status
from tests.conftest import IGV_SECRET, Recorder

from .test_celery import memory_celery, post_in_process, published, stored

RecorderFactory = Callable[..., tuple[Flask, Recorder]]


def test_an_eager_task_that_raises_is_no_broker_failure(
    recorder: RecorderFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """With ``task_eager_propagates`` an eager task's error comes out of
    ``apply_async``. The enqueuer took it for a failed publish and stopped
    "trying the broker" for ``broker_cooldown`` seconds: every delivery
    stored in those seconds was left pending for the sweep, although there
    is no broker to rest. Only the delivery whose task raised waits."""
    app, rec = recorder(ORDERHOOKS_DISPATCH="deferred")
    hooks: OrderHooks = app.extensions["orderhooks"]
    celery, queue = memory_celery()
    celery.conf.update(task_always_eager=True, task_eager_propagates=True)
    init_celery(celery, hooks, broker_cooldown=3600)
    dispatch_due = hooks.dispatch_due
    busy = [True]

    def once_busy(*args: str) -> bool:
        if busy[0]:
            busy[0] = False
            raise StoreUnavailable("The store is busy.")
        return dispatch_due(*args)

    hooks.dispatch_due = once_busy  # type: ignore[method-assign, assignment]
    first, second = (
        igv_order_status(IGV_SECRET, request_id=f"R{uuid.uuid4().hex[:12]}") for _ in range(2)
    )
    with caplog.at_level(logging.WARNING, logger="flask_orderhooks"):
        assert post_in_process(app, first).status == 200
        assert post_in_process(app, second).status == 200
    assert stored(app, first).status == "pending"
    assert stored(app, second).status == "done"
    assert len(rec.events) == 1
    assert "BrokerCoolingDown" not in caplog.text
    assert published(celery, queue) == []
