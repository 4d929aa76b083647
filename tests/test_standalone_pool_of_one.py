"""The store's own engine with a pool of one connection (``engine_options``
``pool_size=1, max_overflow=0``, a plausible choice for a process with one
thread): a failing dispatch must give its connection back before the failure
record takes one, or the record waits for the dispatch's own connection
(``pool_timeout``), fails, and the attempt goes unrecorded until its lease
runs out (resends refused with 503 meanwhile)."""

from __future__ import annotations

from collections.abc import Callable

from flask import Flask

from tests.conftest import Recorder
from tests.test_durability import make, post, rows

RecorderFactory = Callable[..., tuple[Flask, Recorder]]

ONE_CONNECTION = {"pool_size": 1, "max_overflow": 0, "pool_timeout": 1}


def test_a_failed_attempt_is_recorded_with_a_pool_of_one(recorder: RecorderFactory) -> None:
    app, rec = recorder(host_db=False, hooks_options={"engine_options": ONE_CONNECTION})
    assert post(app, make("igv", app)).status_code == 200
    rec.fail_next = 1
    cb = make("igv", app)
    assert post(app, cb).status_code == 500
    failed = [row for row in rows(app) if row.key == cb.key]
    assert [(row.status, row.attempts) for row in failed] == [("failed", 1)]
    assert failed[0].error is not None and "receiver exploded on purpose" in failed[0].error
    # The platform's resend takes it over at once.
    assert post(app, cb).status_code == 200
    assert sorted(row.status for row in rows(app)) == ["done", "done"]
    assert len(rec.events) == 3
