"""Session 13 fixes in ``flask orderhooks``: what a request or a receiver wrote
reaches the terminal quoted, an argument no backend can bind is a usage
error, and a replay says what became of the delivery. On every backend."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask

from flask_orderhooks.replay import replay
from tests.conftest import Recorder
from tests.test_cli import deliver, run
from tests.test_durability import make, post, read, rows

RecorderFactory = Callable[..., tuple[Flask, Recorder]]

#: A receiver's error quoting a body's JSON "\u001b...": an OSC that sets the
#: terminal's title, then a CSI that clears the screen.
ESCAPES = "unknown sku \x1b]0;owned\x07\x1b[2J"


def test_a_keys_hidden_characters_are_quoted(recorder: RecorderFactory) -> None:
    """A key may hold a right-to-left override (only controls are refused at
    ingest): the console shows it as ``\\u202e`` and the log lines quote it;
    so do ``deliveries``, ``show`` and ``replay``, or the rest of the
    operator's line (the status column) reads backwards."""
    app, _rec = recorder()
    deliver(app, "sud", notify_id="n-\u202e1")
    quoted = repr("n-\u202e1")
    assert quoted == "'n-\\u202e1'"
    listing = run(app, "deliveries")
    assert listing.exit_code == 0, listing.output
    assert "\u202e" not in listing.output, listing.output
    assert f"  {quoted}  done" in listing.output, listing.output
    shown = run(app, "show", "n-\u202e1")
    assert shown.exit_code == 0, shown.output
    assert "\u202e" not in shown.output
    assert shown.output.splitlines()[0] == f"sud order-changed {quoted}"
    replayed = run(app, "replay", "n-\u202e1")
    assert "\u202e" not in replayed.output
    assert replayed.output == (
        f"sud order-changed {quoted}: already done; not replayed "
        "(use --force to dispatch it again).\n"
    )


def test_a_plain_key_and_error_are_printed_as_they_are(recorder: RecorderFactory) -> None:
    app, rec = recorder()
    rec.fail_next = 1
    deliver(app, "igv", request_id="req-plain")
    shown = run(app, "show", "req-plain")
    assert shown.output.splitlines()[0] == "igv order-status req-plain"
    assert "  error:    RuntimeError: receiver exploded on purpose\n" in shown.output


def test_a_receivers_terminal_escapes_are_made_visible(recorder: RecorderFactory) -> None:
    """A receiver's error often quotes what the body held (a JSON ``\\u001b``
    is a real ESC once parsed). ``show`` (its error and each failed attempt),
    ``deliveries`` (the ERROR column) and ``replay`` write it to the
    operator's terminal as its escapes, which run nothing; the console shows
    the same error as ``\\u001b``."""
    app, rec = recorder()

    def explode(event: Any) -> None:
        raise ValueError(ESCAPES)

    rec.hook = explode
    deliver(app, "collect", id="C-esc")
    listing = run(app, "deliveries", "--status", "failed")
    assert listing.exit_code == 0, listing.output
    assert "C-esc:60" in listing.output
    assert "\x1b" not in listing.output and "\x07" not in listing.output, repr(listing.output)
    assert "'ValueError: unknown sku \\x1b]0;owned\\x07\\x1b[2J'" in listing.output
    shown = run(app, "show", "C-esc:60")
    assert shown.exit_code == 0, shown.output
    assert "\x1b" not in shown.output and "\x07" not in shown.output, repr(shown.output)
    lines = shown.output.splitlines()
    assert "  error:    'ValueError: unknown sku \\x1b]0;owned\\x07\\x1b[2J'" in lines
    (failed,) = [line for line in lines if line.startswith("  failed:")]
    assert failed.endswith(": 'ValueError: unknown sku \\x1b]0;owned\\x07\\x1b[2J'"), failed
    replayed = run(app, "replay", "C-esc:60")
    rec.hook = None
    assert replayed.exit_code == 1
    assert "\x1b" not in replayed.output and "\x07" not in replayed.output
    assert "\\x1b]0;owned\\x07\\x1b[2J" in replayed.output


def test_a_multi_line_error_is_one_cell_of_the_listing(recorder: RecorderFactory) -> None:
    app, rec = recorder()

    def explode(event: Any) -> None:
        raise ValueError("first line\nsecond line")

    rec.hook = explode
    deliver(app, "collect", id="C-lines")
    rec.hook = None
    listing = run(app, "deliveries", "--status", "failed")
    assert listing.output.splitlines()[1].endswith("ValueError: first line second line")


@pytest.mark.parametrize(
    ("args", "name", "problem"),
    [
        (("show", "k-\udcff"), "'KEY'", "a lone surrogate (U+DCFF)"),
        (("replay", "k-\udcff"), "'[KEY]'", "a lone surrogate (U+DCFF)"),
        (("replay", "k-\udcff", "--force"), "'[KEY]'", "a lone surrogate (U+DCFF)"),
        (("deliveries", "--provider", "p-\udcff"), "'--provider'", "a lone surrogate (U+DCFF)"),
        (("show", "k-\x00"), "'KEY'", "a NUL character (U+0000)"),
    ],
)
def test_an_argument_no_backend_can_bind_is_a_usage_error(
    recorder: RecorderFactory, args: tuple[str, ...], name: str, problem: str
) -> None:
    """Argument bytes that are not UTF-8 (``flask orderhooks show $'\\xff'``
    in a UTF-8 locale) reach Python as a lone surrogate. The console refuses
    the same value with a 400 that names it; the CLI died with a
    UnicodeEncodeError traceback (SQLite, PostgreSQL) or blamed the database
    ("The delivery store is unavailable (StatementError); is the database
    up?", MariaDB), which sends the operator to check a healthy database."""
    app, _rec = recorder()
    result = run(app, *args)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 2, result.output
    assert "store is unavailable" not in result.output, result.output
    assert f"Invalid value for {name}:" in result.output, result.output
    assert problem in result.output, result.output
    assert "which no stored delivery holds, so nothing was looked up." in result.output


def test_a_replay_that_leaves_the_delivery_dead_says_so(recorder: RecorderFactory) -> None:
    """The receiver fails again: the replay says the delivery is dead, not
    the platform's "the delivery will be retried"."""
    app, rec = recorder(ORDERHOOKS_RETRY_DELAYS=[])
    rec.fail_next = 2
    deliver(app, "payout", id="P-dead")
    result = run(app, "replay", "P-dead:60")
    assert result.exit_code == 1
    assert result.output == (
        "gateway payout P-dead:60: failed: attempt 2 failed (RuntimeError: receiver "
        "exploded on purpose); the delivery is dead: no further attempt will be made "
        "(replay it once the cause is fixed).\n"
        "Error: 1 of 1 replays did not succeed.\n"
    )
    with app.app_context():
        (row,) = app.extensions["orderhooks"].store.get("P-dead:60")
    assert (row.status, row.attempts) == ("dead", 2)


def test_a_replay_that_fails_again_says_when_the_next_attempt_is(
    recorder: RecorderFactory,
) -> None:
    now = 1_767_225_600.0  # 2026-01-01 00:00 UTC
    app, rec = recorder(hooks_options={"clock": lambda: now}, ORDERHOOKS_RETRY_DELAYS=[60, 300])
    rec.fail_next = 2
    deliver(app, "payout", id="P-1")
    result = run(app, "replay", "P-1:60")
    assert result.exit_code == 1
    assert (
        "gateway payout P-1:60: failed: attempt 2 failed (RuntimeError: receiver exploded "
        "on purpose); the next attempt is at 2026-01-01 00:05:00 UTC.\n" in result.output
    )


def test_replay_force_applies_only_to_the_done_state_it_read(
    recorder: RecorderFactory,
) -> None:
    """``replay KEY --force`` (and ``--failed --dead --force``) read the rows,
    then replay each: forced only over the done state it read (its attempts).
    A forced replay of that state that ran meanwhile (another operator's
    command, the console) is not run again."""
    app, rec = recorder()
    assert post(app, make("collect", app)).status_code == 200
    (seen,) = rows(app)
    assert (seen.status, seen.attempts) == ("done", 1)
    with app.app_context():
        state = app.extensions["orderhooks"].state(app)
        first = replay(app, state, seen, force=True)
        second = replay(app, state, seen, force=True)
    assert (first.status, first.message) == ("done", "replayed, attempt 2: done.")
    assert (second.status, second.message) == (
        "already_done",
        "already done, and replayed since it was read at attempt 1; not replayed again.",
    )
    assert rec.credits() == 2
    # A new command reads the new state, and may force that.
    forced = run(app, "replay", seen.key, "--force")
    assert forced.output.endswith(": replayed, attempt 3: done.\n"), forced.output
    assert rec.credits() == 3


def test_a_forced_claim_needs_the_attempts_it_saw(recorder: RecorderFactory) -> None:
    """The store's forced claim takes a done row over only while it has the
    attempts the caller saw; without them, it refuses to guess."""
    app, _rec = recorder()
    cb = make("collect", app)
    assert post(app, cb).status_code == 200
    with app.app_context():
        store = app.extensions["orderhooks"].state(app).store
        received = read(app, cb)
        with pytest.raises(TypeError, match="needs seen_attempts"):
            store.claim(received, force=True)
        assert store.claim(received, force=True, seen_attempts=2) is None
        claim = store.claim(received, force=True, seen_attempts=1)
        assert claim is not None and claim.attempt == 2


def test_text_laid_out_in_lines_keeps_its_lines_and_quotes_each_odd_one() -> None:
    """``show`` prints a pretty-printed body (and a multi-line error) line by
    line, as it was before the quoting; only a line holding a hidden
    character is quoted."""
    from flask_orderhooks.logtext import for_terminal

    body = '{\n  "id": "C-1",\n  "note": "\x1b[2J"\n}'
    assert for_terminal(body, lines=True).split("\n") == [
        "{",
        '  "id": "C-1",',
        repr('  "note": "\x1b[2J"'),
        "}",
    ]
    assert for_terminal("plain\ntext", lines=True) == "plain\ntext"
    assert for_terminal("plain\ntext") == "'plain\\ntext'"


def test_a_forced_replay_of_a_key_on_two_routes_must_choose_one(
    recorder: RecorderFactory,
) -> None:
    """A gateway collect and a payout can share a key ("123:60"): forcing
    both would run the unrelated one's receivers (a second payout) again.
    --force with such a key needs --route; --route replays that one only."""
    app, rec = recorder()
    deliver(app, "collect", id="123")
    deliver(app, "payout", id="123")
    before = len(rec.events)

    both = run(app, "replay", "123:60", "--force")
    assert both.exit_code == 2, both.output
    assert (
        "The key 123:60 is stored on gateway/collect, gateway/payout: with --force, choose "
        "one with --route PROVIDER/CALLBACK." in " ".join(both.output.split())
    )
    assert len(rec.events) == before

    one = run(app, "replay", "123:60", "--force", "--route", "gateway/payout")
    assert one.exit_code == 0, one.output
    assert [name for name, _event in rec.events[before:]] == ["PayoutFinished"]
    assert "gateway payout 123:60: replayed, attempt 2: done." in one.output


def test_a_route_that_is_not_configured_or_without_a_key_is_a_usage_error(
    recorder: RecorderFactory,
) -> None:
    app, _rec = recorder()
    deliver(app, "collect", id="124")
    unknown = run(app, "replay", "124:60", "--route", "gateway/refund")
    assert unknown.exit_code == 2
    assert "gateway/refund is not a configured route" in " ".join(unknown.output.split())
    no_key = run(app, "replay", "--failed", "--route", "gateway/collect")
    assert no_key.exit_code == 2
    assert "--route chooses among KEY's deliveries: give a KEY." in no_key.output
    # Without --force a key on one route needs no --route.
    assert run(app, "replay", "124:60").exit_code == 0
