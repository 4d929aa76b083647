"""``flask orderhooks replay --failed`` and ``--dead`` read the store a page
at a time: a year's store may hold thousands of failed deliveries, each read
whole, body included."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import event

from flask_orderhooks import get_extension
from flask_orderhooks.store import TABLE_NAME
from tests.conftest import Recorder
from tests.test_cli import deliver, run

RecorderFactory = Callable[..., tuple[Flask, Recorder]]
PAGE = 3


@pytest.fixture
def small_pages(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr("flask_orderhooks.cli._REPLAY_PAGE", PAGE)
    return PAGE


def _list_statements(app: Flask, args: tuple[str, ...]) -> tuple[Any, list[str]]:
    """Runs ``flask orderhooks *args``; its result and every listing it read
    (a SELECT newest first, not the lookups of one row by its key)."""
    engine = get_extension(app).state(app).store.engine
    seen: list[str] = []

    def record(
        conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool
    ) -> None:
        if statement.lstrip().startswith("SELECT") and f"{TABLE_NAME}.created_at DESC" in statement:
            seen.append(statement)

    with app.app_context():
        event.listen(engine, "before_cursor_execute", record)
    try:
        result = run(app, *args)
    finally:
        with app.app_context():
            event.remove(engine, "before_cursor_execute", record)
    return result, seen


def test_replay_failed_reads_pages_and_replays_each_delivery_once(
    recorder: RecorderFactory, small_pages: int
) -> None:
    """Seven failed deliveries in pages of three: three bounded reads, each
    delivery replayed once, newest first; one that fails again is not read
    again by a later page (its place in the order does not move)."""
    app, rec = recorder()
    keys = [f"req-{n}" for n in range(7)]
    rec.fail_next = len(keys)
    for key in keys:
        deliver(app, "igv", request_id=key)
    assert len(rec.events) == 7
    rec.fail_next = 1  # the first replayed (the newest) fails again
    result, selects = _list_statements(app, ("replay", "--failed"))
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    replayed = [line.split()[2].rstrip(":") for line in lines[:-1]]
    assert sorted(replayed) == sorted(keys), result.output
    assert "attempt 2 failed" in lines[0], result.output
    assert all("replayed, attempt 2: done." in line for line in lines[1:-1]), result.output
    assert lines[-1] == "Error: 1 of 7 replays did not succeed."
    assert len(selects) == 3, selects
    assert all("LIMIT" in statement.upper() for statement in selects), selects
    assert len(rec.events) == 14  # seven first attempts, seven replays: none twice
    # The one that failed again is replayed by the next run, alone.
    again, selects = _list_statements(app, ("replay", "--failed"))
    assert again.exit_code == 0, again.output
    assert again.output.count("replayed, attempt 3: done.") == 1, again.output
    assert len(selects) == 1


def test_replay_failed_and_dead_reads_each_status_in_pages(
    recorder: RecorderFactory, small_pages: int
) -> None:
    """A page boundary that falls exactly at the end (three rows, pages of
    three) costs one empty read, and both statuses are read."""
    app, rec = recorder(ORDERHOOKS_RETRY_DELAYS=[])
    rec.fail_next = 3
    for n in range(3):
        deliver(app, "igv", request_id=f"dead-{n}")
    listed = run(app, "deliveries", "--status", "dead")
    assert listed.output.count("dead-") == 3, listed.output
    result, selects = _list_statements(app, ("replay", "--failed", "--dead"))
    assert result.exit_code == 0, result.output
    assert result.output.count("replayed, attempt 2: done.") == 3, result.output
    # failed: one read (none); dead: a full page, then an empty one.
    assert len(selects) == 3, selects
