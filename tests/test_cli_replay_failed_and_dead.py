"""``flask orderhooks replay --failed --dead`` replays each delivery once:
one whose replay fails on its last attempt turns dead during the failed
pass, and must not be replayed again by the dead pass of the same run."""

from __future__ import annotations

from collections.abc import Callable

from flask import Flask

from flask_orderhooks import get_extension
from tests.conftest import Recorder
from tests.test_cli import deliver, run

RecorderFactory = Callable[..., tuple[Flask, Recorder]]


def test_a_failed_delivery_that_dies_during_the_run_is_not_replayed_again(
    recorder: RecorderFactory,
) -> None:
    # Two attempts in all: the first (the request) and one retry.
    app, rec = recorder(ORDERHOOKS_RETRY_DELAYS=[60])
    rec.fail_next = 1
    cb = deliver(app, "igv", request_id="req-last-chance")
    rec.fail_next = 10  # every replay fails
    result = run(app, "replay", "--failed", "--dead")
    assert result.exit_code == 1, result.output
    assert result.output.splitlines() == [
        "igv order-status req-last-chance: failed: attempt 2 failed (RuntimeError: receiver "
        "exploded on purpose); the delivery is dead: no further attempt will be made "
        "(replay it once the cause is fixed).",
        "Error: 1 of 1 replays did not succeed.",
    ]
    with app.app_context():
        [row] = get_extension(app).store.get(cb.key, provider="igv", callback="order-status")
    assert (row.status, row.attempts) == ("dead", 2)
    assert rec.fail_next == 10 - 1  # the receivers ran once for this run


def test_a_dead_delivery_is_still_replayed_with_both_flags(recorder: RecorderFactory) -> None:
    app, rec = recorder(ORDERHOOKS_RETRY_DELAYS=[])
    rec.fail_next = 1
    deliver(app, "igv", request_id="req-dead")
    rec.fail_next = 1
    deliver(app, "igv", request_id="req-failed-later")
    result = run(app, "replay", "--failed", "--dead")
    assert result.exit_code == 0, result.output
    assert result.output.count("replayed, attempt 2: done.") == 2, result.output
