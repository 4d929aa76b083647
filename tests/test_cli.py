"""``flask orderhooks deliveries|show|replay|purge|send``."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from flask import Flask
from werkzeug.serving import make_server

from flask_orderhooks import OrderHooks
from flask_orderhooks.cli import Seconds, orderhooks
from flask_orderhooks.provider import Delivery
from flask_orderhooks.replay import replay
from flask_orderhooks.testing import SignedCallback, build
from tests.conftest import BASE_CONFIG, IGV_SECRET, Recorder
from tests.test_delivery_queue import Clock, process_due
from tests.test_durability import make, post, rows
from tests.test_standard_webhooks import SECRET as STANDARD_SECRET

RecorderFactory = Callable[..., tuple[Flask, Recorder]]


def run(app: Flask, *args: str) -> Result:
    return app.test_cli_runner().invoke(orderhooks, list(args))


def deliver(app: Flask, kind: str, **fields: Any) -> SignedCallback:
    with app.app_context():
        cb = build(kind, app=app, **fields)
    app.test_client().post(cb.url(), data=cb.body, headers=cb.headers)
    return cb


def test_commands_are_registered_for_flask_and_pytest() -> None:
    assert "orderhooks" in {e.name for e in entry_points(group="flask.commands")}
    assert "orderhooks" in {e.name for e in entry_points(group="pytest11")}


def test_deliveries_lists_and_filters(recorder: RecorderFactory) -> None:
    app, rec = recorder()
    deliver(app, "igv", request_id="req-ok")
    rec.fail_next = 1
    deliver(app, "collect", id="C-bad")
    result = run(app, "deliveries")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == [
        "RECEIVED",
        "(UTC)",
        "PROVIDER",
        "CALLBACK",
        "KEY",
        "STATUS",
        "ATTEMPTS",
        "ERROR",
    ]
    assert len(lines) == 3
    failed = run(app, "deliveries", "--status", "failed")
    assert "C-bad:60" in failed.output and "req-ok" not in failed.output
    assert "RuntimeError: receiver exploded on purpose" in failed.output
    assert "req-ok" in run(app, "deliveries", "--provider", "igv", "--since", "1h").output
    assert run(app, "deliveries", "--status", "processing").output == "No deliveries.\n"
    bad = run(app, "deliveries", "--since", "yesterday")
    assert bad.exit_code == 2
    assert "'yesterday' is not a duration such as 30d, 12h, 90m or 45s." in bad.output


def test_show_prints_attempts_error_and_body_but_no_secret(recorder: RecorderFactory) -> None:
    app, rec = recorder()
    rec.fail_next = 1
    cb = deliver(app, "igv", request_id="req-1")
    result = run(app, "show", "req-1")
    assert result.exit_code == 0, result.output
    assert "igv order-status req-1" in result.output
    assert "status:   failed" in result.output
    assert "attempts: 1" in result.output
    assert "error:    RuntimeError: receiver exploded on purpose" in result.output
    assert cb.body.decode() in result.output
    assert IGV_SECRET not in result.output
    missing = run(app, "show", "nope")
    assert missing.exit_code == 1
    assert (
        "No delivery is stored under the key 'nope' under a configured route "
        "(--anywhere looks everywhere)." in missing.output
    )
    assert (
        "No delivery is stored under the key 'nope'."
        in run(app, "show", "--anywhere", "nope").output
    )


def test_show_looks_under_retired_routes_only_when_asked(recorder: RecorderFactory) -> None:
    """A key is a primary-key lookup under each configured route; a row of a
    provider or callback no longer configured is found by --anywhere, a scan
    of the whole table, and never replayed (no receiver is left for it)."""
    app, _rec = recorder()
    hooks: OrderHooks = app.extensions["orderhooks"]
    retired = Delivery(
        provider="retired", callback="old", key="old-1", body=b"{}", headers={}, dispatches=()
    )
    with app.app_context():
        assert hooks.state(app).store.deliver(retired, lambda: None) == "dispatched"
    assert run(app, "show", "old-1").exit_code == 1
    found = run(app, "show", "--anywhere", "old-1")
    assert found.exit_code == 0, found.output
    assert "retired old old-1" in found.output
    assert "status:   done" in found.output
    refused = run(app, "replay", "--force", "old-1")
    assert "No delivery is stored under the key 'old-1'." in refused.output


def test_replay_failed_then_refuses_done_unless_forced(recorder: RecorderFactory) -> None:
    app, rec = recorder()
    rec.fail_next = 1
    deliver(app, "sud-batch", notify_id="n-1")
    assert rec.credits() == 0
    result = run(app, "replay", "--failed")
    assert result.exit_code == 0, result.output
    assert result.output == "sud order-changed n-1: replayed, attempt 2: done.\n"
    assert rec.credits() == 2
    again = run(app, "replay", "n-1")
    assert again.exit_code == 0
    assert "already done; not replayed (use --force to dispatch it again)." in again.output
    assert rec.credits() == 2
    forced = run(app, "replay", "n-1", "--force")
    assert forced.exit_code == 0, forced.output
    assert "replayed, attempt 3: done." in forced.output
    assert rec.credits() == 4


def test_a_forced_replay_of_a_row_read_as_failed_never_dispatches_it_again_once_done(
    recorder: RecorderFactory,
) -> None:
    """``replay --failed --force`` (and ``replay KEY --force``) read the rows
    first, then replay them one by one. A row read as failed that a worker
    finished meanwhile must not be taken over as done: ``force`` applies only
    to a row the caller read as done (as the console's does), or the
    delivery is dispatched a second time, a double credit."""
    clock = Clock()
    app, rec = recorder(hooks_options={"clock": clock})
    rec.fail_next = 1
    assert post(app, make("collect", app)).status_code == 500
    (listed,) = rows(app)  # what `replay --failed --force` lists
    assert listed.status == "failed"
    clock.now += 10
    assert process_due(app) == 1  # a worker retries it meanwhile: done
    assert rows(app)[0].status == "done"
    credited = rec.credits()
    with app.app_context():
        state = app.extensions["orderhooks"].state(app)
        outcome = replay(app, state, listed, force=True)
    assert (outcome.status, outcome.message) == ("already_done", "already done; not replayed.")
    assert rec.credits() == credited == 1


def test_replay_failure_is_recorded_and_reported(recorder: RecorderFactory) -> None:
    app, rec = recorder()
    rec.fail_next = 2
    deliver(app, "payout", id="P-1")
    result = run(app, "replay", "P-1:60")
    assert result.exit_code == 1
    with app.app_context():
        (row,) = app.extensions["orderhooks"].store.get("P-1:60")
    assert (row.status, row.attempts) == ("failed", 2)
    assert row.next_attempt_at is not None
    assert (
        "gateway payout P-1:60: failed: attempt 2 failed (RuntimeError: receiver exploded on "
        f"purpose); the next attempt is at {row.next_attempt_at:%Y-%m-%d %H:%M:%S} UTC."
        in result.output
    )
    assert "1 of 1 replays did not succeed." in result.output


def test_replay_arguments_are_checked(recorder: RecorderFactory) -> None:
    app, _rec = recorder()
    assert run(app, "replay").exit_code == 2
    assert run(app, "replay", "k", "--failed").exit_code == 2
    assert "No failed deliveries." in run(app, "replay", "--failed").output
    assert "No delivery is stored under the key 'zzz'." in run(app, "replay", "zzz").output


def _rows(app: Flask) -> dict[str, tuple[str, bytes, bool]]:
    with app.app_context():
        rows = app.extensions["orderhooks"].store.list()
    return {r.key: (r.status, r.body, r.compacted_at is not None) for r in rows}


def test_purge_deletes_what_cannot_be_replayed_and_compacts_the_rest(
    recorder: RecorderFactory,
) -> None:
    now = [1_795_000_000.0]
    app, rec = recorder(hooks_options={"clock": lambda: now[0]})
    deliver(app, "igv", request_id="old-done")
    gateway = deliver(app, "collect", id="old-gateway")
    rec.fail_next = 1
    deliver(app, "igv", request_id="old-failed")
    assert run(app, "purge", "--older-than", "thirty").exit_code == 2
    # Ages are measured with the extension's clock, which stamped the rows.
    nothing = run(app, "purge", "--older-than", "30d")
    assert nothing.output.splitlines()[0] == (
        "Deleted 0 and compacted 0 deliveries older than 30d (done)."
    )

    now[0] += 40 * 86400
    result = run(app, "purge", "--older-than", "30d")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "Deleted 1 and compacted 1 deliveries older than 30d (done).",
        "Done deliveries of gateway were compacted, not deleted: their signatures can "
        "still be replayed.",
    ]
    rows = _rows(app)
    assert rows == {
        "old-failed": ("failed", rows["old-failed"][1], False),
        "old-gateway:60": ("done", b"", True),
    }
    assert rows["old-failed"][1] != b"", "a failed delivery keeps its body for the retry"
    # The tombstone still answers the gateway's replay as a duplicate.
    before = len(rec.events)
    replayed = app.test_client().post(gateway.url(), data=gateway.body, headers=gateway.headers)
    assert (replayed.status_code, replayed.data) == (200, b"success")
    assert len(rec.events) == before
    # A replay by hand has nothing to dispatch.
    refused = run(app, "replay", "old-gateway:60", "--force")
    assert refused.exit_code == 1
    assert "its body is gone; not replayed." in refused.output

    everything = run(app, "purge", "--older-than", "4w", "--failed")
    assert everything.output.splitlines()[0] == (
        "Deleted 1 and compacted 0 deliveries older than 4w (done, failed, dead)."
    )
    assert _rows(app) == {"old-gateway:60": ("done", b"", True)}


def test_purge_compacts_inside_a_timestamp_window_and_without_one(
    recorder: RecorderFactory,
) -> None:
    now = [1_795_000_000.0]
    app, _ = recorder(hooks_options={"clock": lambda: now[0]}, ORDERHOOKS_IGV_MAX_AGE=None)
    deliver(app, "igv", request_id="no-window")
    now[0] += 40 * 86400
    result = run(app, "purge", "--older-than", "30d")
    assert result.output.splitlines()[0] == (
        "Deleted 0 and compacted 1 deliveries older than 30d (done)."
    )
    assert _rows(app) == {"no-window": ("done", b"", True)}

    app, _ = recorder(hooks_options={"clock": lambda: now[0]})
    deliver(app, "igv", request_id="in-window", order_id=2)
    now[0] += 45 * 60
    # 30 minutes is shorter than iGV's 3600 s window: a replay could still
    # verify, so the row is only compacted.
    short = run(app, "purge", "--older-than", "30m")
    assert short.output.splitlines()[0] == (
        "Deleted 0 and compacted 1 deliveries older than 30m (done)."
    )
    # (Both apps share the test's database: the first one's tombstone is there.)
    assert _rows(app) == {"no-window": ("done", b"", True), "in-window": ("done", b"", True)}
    # Compacting twice changes nothing; --compact-only never deletes.
    now[0] += 2 * 3600
    again = run(app, "purge", "--older-than", "1h", "--compact-only")
    assert again.output.splitlines()[0] == (
        "Deleted 0 and compacted 0 deliveries older than 1h (done)."
    )
    assert _rows(app) == {"no-window": ("done", b"", True), "in-window": ("done", b"", True)}


def test_commands_report_a_store_that_is_down(tmp_path: Path) -> None:
    app = Flask("down", instance_path=str(tmp_path))
    app.config.update(
        ORDERHOOKS_IGV_SECRET="s" * 32,
        ORDERHOOKS_DATABASE_URI="postgresql+psycopg://postgres:pw@127.0.0.1:9/test",
    )
    OrderHooks(app)
    for args in (
        ["deliveries"],
        ["show", "k"],
        ["replay", "--failed"],
        ["purge", "--older-than", "30d"],
    ):
        result = run(app, *args)
        assert result.exit_code == 1
        assert result.output == (
            "Error: The delivery store is unavailable (OperationalError); is the database up?\n"
        )


@pytest.fixture
def live_server(recorder: RecorderFactory) -> Iterator[tuple[Flask, Recorder, str]]:
    app, rec = recorder()
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield app, rec, f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(10)


@pytest.mark.parametrize(
    ("kind", "answer"),
    [
        ("igv", "200 OK"),
        ("collect", "200 success"),
        ("payout", "200 success"),
        ("sud", '200 {"ret_code": 0, "ret_msg": "SUCCESS"}'),
    ],
)
def test_send_posts_a_signed_sample(
    kind: str, answer: str, live_server: tuple[Flask, Recorder, str]
) -> None:
    app, rec, url = live_server
    result = run(
        app,
        "send",
        kind,
        "--url",
        url,
        "--field",
        "trans_id=T-77" if kind in ("collect", "payout") else "order_id=77",
    )
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == answer
    assert len(rec.events) == 1


def test_send_exits_1_when_the_server_refuses_the_callback(
    live_server: tuple[Flask, Recorder, str],
) -> None:
    """A deploy's smoke test runs `flask orderhooks send`: an answer that is
    not 2xx (here a receiver failing, 500) must fail the script."""
    app, rec, url = live_server
    rec.fail_next = 1
    result = run(app, "send", "collect", "--url", url, "--field", "trans_id=T-78")
    assert result.exit_code == 1, result.output
    assert "500 fail" in result.output.splitlines()
    assert "The server answered 500: the callback was not accepted." in result.output


def test_send_reports_errors_clearly(
    live_server: tuple[Flask, Recorder, str], make_app: Any
) -> None:
    app, _rec, url = live_server
    bad_field = run(app, "send", "igv", "--url", url, "--field", "novalue")
    assert bad_field.exit_code == 2 and "'novalue' is not KEY=VALUE." in bad_field.output
    unknown_field = run(app, "send", "igv", "--url", url, "--field", "colour=red")
    assert (
        unknown_field.exit_code == 1
        and "unexpected keyword argument 'colour'" in unknown_field.output
    )
    refused = run(app, "send", "igv", "--url", "http://127.0.0.1:9")
    assert (
        refused.exit_code == 1
        and "Could not reach http://127.0.0.1:9/orderhooks/igv/order-status" in refused.output
    )
    scheme = run(app, "send", "igv", "--url", "file:///etc/passwd")
    assert scheme.exit_code == 2 and "is not an http:// or https:// URL." in scheme.output
    only_sud, _hooks, _db = make_app(ORDERHOOKS_IGV_SECRET=None)
    off = run(only_sud, "send", "igv", "--url", url)
    assert off.exit_code == 1
    assert "igv: ORDERHOOKS_IGV_SECRET is not configured; pass secret=." in off.output


def test_commands_need_the_extension() -> None:
    result = Flask("bare").test_cli_runner().invoke(orderhooks, ["deliveries"])
    assert result.exit_code == 1
    assert "OrderHooks is not registered on this app." in result.output


def test_duration_units() -> None:
    from flask_orderhooks.cli import Duration, _human

    d = Duration()
    assert [d.convert(v, None, None) for v in ("45s", "90m", "12h", "30d", "2w")] == [
        timedelta(seconds=45),
        timedelta(minutes=90),
        timedelta(hours=12),
        timedelta(days=30),
        timedelta(weeks=2),
    ]
    assert [_human(timedelta(seconds=s)) for s in (45, 5400, 86400, 1209600)] == [
        "45s",
        "90m",
        "1d",
        "2w",
    ]


@pytest.fixture
def sqlite_app(tmp_path: Path) -> Flask:
    """An app on an SQLite store of its own, with every built-in configured:
    for the options' checks, which run before any store is touched."""
    app = Flask("options", instance_path=str(tmp_path))
    app.config.update(
        BASE_CONFIG,
        ORDERHOOKS_DATABASE_URI=f"sqlite:///{tmp_path / 'orderhooks.sqlite3'}",
        ORDERHOOKS_STANDARD_WEBHOOKS={"shop": STANDARD_SECRET},
    )
    OrderHooks(app)
    return app


_TOO_LONG = "is longer than 36500d (100 years), the longest duration accepted."
_NOT_SECONDS = (
    "--field: standard: timestamp must be whole Unix seconds of a year from 1 to "
    "9999, such as 1767225600, not "
)


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["deliveries", "--since", "1000000d"], f"'--since': '1000000d' {_TOO_LONG}"),
        (["deliveries", "--since", "99999999999d"], f"'--since': '99999999999d' {_TOO_LONG}"),
        (["deliveries", "--since", "3153600001s"], f"'--since': '3153600001s' {_TOO_LONG}"),
        (["deliveries", "--since", "5215w"], f"'--since': '5215w' {_TOO_LONG}"),
        (["deliveries", "--since", "9" * 5000 + "s"], _TOO_LONG),
        (["purge", "--older-than", "1000000d"], f"'--older-than': '1000000d' {_TOO_LONG}"),
        (
            ["deliveries", "--limit", "99999999999999999999999"],
            "'--limit': 99999999999999999999999 is not in the range 1<=x<=100000.",
        ),
        (
            ["worker", "--poll-interval", "nan"],
            "'--poll-interval': 'nan' is not a finite number of seconds (0.01<=x<=3600).",
        ),
        (
            ["worker", "--poll-interval", "inf"],
            "'--poll-interval': 'inf' is not a finite number of seconds (0.01<=x<=3600).",
        ),
        (
            ["worker", "--poll-interval", "1e10"],
            "'--poll-interval': 10000000000.0 is not in the range 0.01<=x<=3600.",
        ),
        (
            ["send", "collect", "--url", "http://[::1"],
            "'--url': 'http://[::1' is not a valid URL: Invalid IPv6 URL.",
        ),
        (
            ["send", "collect", "--url", "http://127.0.0.1:http"],
            "'--url': 'http://127.0.0.1:http' is not a valid URL: "
            "Port could not be cast to integer value as 'http'.",
        ),
        (
            ["send", "collect", "--url", "http://"],
            "'--url': 'http://' names no host, e.g. http://127.0.0.1:5000.",
        ),
        (
            ["send", "collect", "--url", "http://127.0.0.1:5000/?debug=1"],
            "'--url': 'http://127.0.0.1:5000/?debug=1' has a query or a fragment; "
            "give the server's base URL only.",
        ),
        (
            ["send", "collect", "--url", "http://127.0.0.1:5000/a b"],
            "'--url': 'http://127.0.0.1:5000/a b' has a space, a control character or a "
            "non-ASCII character; percent-encode it (or write the host in its xn-- form).",
        ),
        (
            ["send", "collect", "--url", "http://127.0.0.1:9", "--timeout", "-1"],
            "'--timeout': -1.0 is not in the range 0<x<=3600.",
        ),
        (
            ["send", "collect", "--url", "http://127.0.0.1:9", "--timeout", "0"],
            "'--timeout': 0.0 is not in the range 0<x<=3600.",
        ),
        (
            ["send", "collect", "--url", "http://127.0.0.1:9", "--timeout", "nan"],
            "'--timeout': 'nan' is not a finite number of seconds (0<x<=3600).",
        ),
        (
            ["send", "standard", "--url", "http://127.0.0.1:9", "--field", "timestamp=abc"],
            _NOT_SECONDS + "'abc'.",
        ),
        (
            ["send", "standard", "--url", "http://127.0.0.1:9", "--field", "timestamp=" + "9" * 14],
            _NOT_SECONDS + "'99999999999999'.",
        ),
        (
            ["send", "igv", "--url", "http://127.0.0.1:9", "--field", "order_id=" + "9" * 5000],
            "--field: order_id: an integer of 5000 digits is too long to send.",
        ),
    ],
)
def test_bad_option_values_are_usage_errors_that_name_the_option(
    sqlite_app: Flask, args: list[str], error: str
) -> None:
    result = run(sqlite_app, *args)
    assert result.exit_code == 2, result.output
    last = result.output.splitlines()[-1]
    assert last.startswith("Error: Invalid value for ") and error in last, last
    assert "Traceback" not in result.output and "started" not in result.output


def test_the_longest_duration_and_limit_are_accepted(sqlite_app: Flask) -> None:
    since = run(sqlite_app, "deliveries", "--since", "36500d", "--limit", "100000")
    assert (since.exit_code, since.output) == (0, "No deliveries.\n")
    purged = run(sqlite_app, "purge", "--older-than", "3153600000s")
    assert (purged.exit_code, purged.output) == (
        0,
        "Deleted 0 and compacted 0 deliveries older than 36500d (done).\n",
    )


def test_help_says_the_bounds(sqlite_app: Flask) -> None:
    listing = " ".join(run(sqlite_app, "deliveries", "--help").output.split())
    assert "e.g. 24h; at most 36500d (100 years)." in listing
    assert "1<=x<=100000" in listing
    assert "at most 36500d (100 years)." in " ".join(
        run(sqlite_app, "purge", "--help").output.split()
    )
    assert "0.01<=x<=3600" in run(sqlite_app, "worker", "--help").output
    assert "0<x<=3600" in run(sqlite_app, "send", "--help").output


def test_seconds_refuses_a_maximum_no_thread_can_wait() -> None:
    with pytest.raises(ValueError, match="longer than a thread can wait"):
        Seconds(min=0, max=1e12)
    assert Seconds(min=0, max=3600).convert("2.5", None, None) == 2.5


def test_purge_prints_only_what_it_did(recorder: RecorderFactory) -> None:
    now = [1_795_000_000.0]
    app, _rec = recorder(hooks_options={"clock": lambda: now[0]})
    empty = run(app, "purge", "--older-than", "30d")
    assert (empty.exit_code, empty.output) == (
        0,
        "Deleted 0 and compacted 0 deliveries older than 30d (done).\n",
    )
    deliver(app, "igv", request_id="igv-done")
    deliver(app, "collect", id="gateway-done")
    now[0] += 40 * 86400
    kept = run(app, "purge", "--older-than", "30d", "--compact-only")
    assert kept.exit_code == 0, kept.output
    assert kept.output.splitlines() == [
        "Deleted 0 and compacted 2 deliveries older than 30d (done).",
        "Done deliveries of gateway were compacted, not deleted: their signatures can "
        "still be replayed.",
        "Done deliveries of igv were compacted, not deleted: --compact-only was given.",
    ]
    again = run(app, "purge", "--older-than", "30d", "--compact-only")
    assert again.output == "Deleted 0 and compacted 0 deliveries older than 30d (done).\n"


def test_purge_compacts_but_never_deletes_done_deliveries_of_unconfigured_providers(
    recorder: RecorderFactory,
) -> None:
    """A provider whose config was removed has no known replay window: its
    done deliveries become tombstones (which keep its replay protection,
    should it be configured again), its others go only when asked."""
    now = [1_795_000_000.0]
    clock = {"clock": lambda: now[0]}
    configured, rec = recorder(hooks_options=clock)
    deliver(configured, "igv", request_id="igv-done")
    gateway = deliver(configured, "collect", id="gateway-done")
    rec.fail_next = 1
    deliver(configured, "igv", request_id="igv-failed")
    # The same database, read by an app (a cron job's, say) without their config.
    retired, _ = recorder(
        hooks_options=clock, ORDERHOOKS_IGV_SECRET=None, ORDERHOOKS_GATEWAY_KEY=None
    )
    now[0] += 40 * 86400

    result = run(retired, "purge", "--older-than", "30d")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "Deleted 0 and compacted 2 deliveries older than 30d (done).",
        "Done deliveries of gateway, igv were compacted, not deleted: they are not "
        "configured in this app, so their replay window is unknown.",
    ]
    rows = _rows(retired)
    assert rows == {
        "igv-done": ("done", b"", True),
        "gateway-done:60": ("done", b"", True),
        "igv-failed": ("failed", rows["igv-failed"][1], False),
    }
    assert rows["igv-failed"][1] != b""

    with_failed = run(retired, "purge", "--older-than", "30d", "--failed")
    assert with_failed.output == (
        "Deleted 1 and compacted 0 deliveries older than 30d (done, failed, dead).\n"
    )
    assert _rows(retired) == {
        "igv-done": ("done", b"", True),
        "gateway-done:60": ("done", b"", True),
    }

    # Configured again: the gateway's captured callback is still a duplicate,
    # and iGV's tombstone, older than its window, is deleted.
    before = len(rec.events)
    resent = configured.test_client().post(
        gateway.url(), data=gateway.body, headers=gateway.headers
    )
    assert (resent.status_code, resent.data, len(rec.events)) == (200, b"success", before)
    assert run(configured, "purge", "--older-than", "30d").output == (
        "Deleted 1 and compacted 0 deliveries older than 30d (done).\n"
    )
    assert _rows(configured) == {"gateway-done:60": ("done", b"", True)}


def test_the_store_names_the_providers_it_holds(recorder: RecorderFactory) -> None:
    app, _rec = recorder()
    hooks: OrderHooks = app.extensions["orderhooks"]
    with app.app_context():
        assert hooks.store.providers() == []
    for kind in ("sud", "igv", "collect", "igv", "payout"):
        deliver(app, kind)
    with app.app_context():
        assert hooks.store.providers() == ["gateway", "igv", "sud"]
