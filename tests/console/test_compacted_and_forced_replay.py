"""Session 13 fixes in the console: a compacted delivery shown as one, a force
replay applied only to the state the page showed, and a replay's banner that
says what became of the delivery. On every store backend."""

from __future__ import annotations

import hashlib
import html
import re
import threading
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from flask.testing import FlaskClient

from flask_orderhooks.console.views import created_text
from flask_orderhooks.replay import ReplayOutcome, replay
from flask_orderhooks.testing import SignedCallback, gateway_collect, igv_order_status
from tests.console.conftest import CONSOLE, Console, ConsoleFactory

DEAD_AGAIN = (
    "Replay: failed: attempt 2 failed (RuntimeError: receiver exploded on purpose); the "
    "delivery is dead: no further attempt will be made (replay it once the cause is fixed)."
)


def _detail(client: FlaskClient, cb: SignedCallback) -> str:
    response = client.get(
        f"{CONSOLE}/delivery/{cb.provider}/{cb.callback}", query_string={"key": cb.key}
    )
    assert response.status_code == 200
    return response.get_data(as_text=True)


def _form(page: str, form_id: str) -> dict[str, str]:
    """The hidden fields of the page's form ``form_id``: what a browser sends."""
    match = re.search(rf'<form [^>]*id="{form_id}">(.*?)</form>', page, re.DOTALL)
    assert match is not None, f"no form {form_id} on the page"
    fields = re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', match[1])
    return {name: html.unescape(value) for name, value in fields}


def _force(client: FlaskClient, cb: SignedCallback, fields: dict[str, str]) -> int:
    """Submit a force form, its box ticked."""
    response = client.post(
        f"{CONSOLE}/delivery/{cb.provider}/{cb.callback}/replay",
        data={**fields, "force": "yes"},
    )
    return response.status_code


def _outcome(client: FlaskClient, cb: SignedCallback) -> str | None:
    match = re.search(
        r'<p class="oc-banner [^"]*" id="oc-outcome">([^<]*)</p>', _detail(client, cb)
    )
    return html.unescape(match[1]) if match else None


def _compacted(console: Console, cb: SignedCallback) -> None:
    assert console.send(cb) == 200
    with console.app.app_context():
        assert console.hooks.store.compact(older_than=datetime(2100, 1, 1, tzinfo=UTC)) == 1
    assert console.row(cb).compacted_at is not None


def test_a_compacted_delivery_is_shown_as_compacted(console: Console) -> None:
    """A tombstone (purge dropped its body and signed headers) is neither a
    delivery that arrived empty ("0 bytes") nor one whose platform signs no
    header (false for iGV): the page says it was compacted, when, and shows
    the digest it kept."""
    cb = igv_order_status(app=console.app)
    _compacted(console, cb)
    page = _detail(console.client(), cb)
    assert "None: this platform signs the body itself." not in page
    assert "0 bytes" not in page
    assert 'id="oc-body"' not in page
    when = f"{console.row(cb).compacted_at.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}"
    assert (
        f'<dd id="oc-compacted">{when}: purge dropped the body and the signed headers</dd>' in page
    )
    digest = hashlib.sha256(cb.body).hexdigest()
    assert f'<code class="oc-key" id="oc-digest">{digest}</code>' in page
    assert f'<p class="oc-note" id="oc-headers-compacted">Dropped by purge at {when}' in page


def test_a_compacted_delivery_offers_no_replay(console: Console) -> None:
    """Its body is gone: a replay can only fail, so none is offered, and a
    forced one posted anyway runs nothing."""
    cb = gateway_collect(app=console.app)
    _compacted(console, cb)
    client = console.client()
    page = _detail(client, cb)
    for form in ('id="oc-force"', 'id="oc-replay"', 'id="oc-retry"'):
        assert form not in page
    assert 'id="oc-no-replay"' in page
    assert "its body is gone" in page
    assert 'name="csrf_token"' not in page, "no form at all on a tombstone's page"
    fields = {
        "key": cb.key,
        "csrf_token": _any_token(client, console),
        "attempts": "1",
        "created": created_text(console.row(cb)),
    }
    events = len(console.recorder.events)
    assert _force(client, cb, fields) == 303
    assert len(console.recorder.events) == events
    outcome = _outcome(client, cb)
    assert outcome is not None and outcome.startswith("Replay: compacted by purge at "), outcome
    assert outcome.endswith(": its body is gone; not replayed."), outcome


def _any_token(client: FlaskClient, console: Console) -> str:
    """A valid CSRF token of ``client``'s session, from a page that has a form."""
    other = igv_order_status(app=console.app)
    assert console.send(other) == 200
    return _form(_detail(client, other), "oc-force")["csrf_token"]


def test_two_submits_of_one_force_form_run_the_receivers_once(console: Console) -> None:
    """Two operators (or one double submit) confirm "run its receivers again"
    on the same page, a done delivery at attempt 1: one more run is what was
    confirmed, not two (a second credit was asked for, a third was not)."""
    cb = igv_order_status(app=console.app)
    assert console.send(cb) == 200
    alice, bob = console.client(), console.client()
    alice_form = _form(_detail(alice, cb), "oc-force")
    bob_form = _form(_detail(bob, cb), "oc-force")
    assert alice_form["attempts"] == bob_form["attempts"] == "1"
    events = len(console.recorder.events)
    assert _force(alice, cb, alice_form) == 303
    assert _force(bob, cb, bob_form) == 303
    assert len(console.recorder.events) == events + 1, "the receivers ran twice more"
    assert (console.row(cb).status, console.row(cb).attempts) == ("done", 2)
    assert _outcome(alice, cb) == "Replay: replayed, attempt 2: done."
    assert _outcome(bob, cb) == (
        "Replay: not replayed: the page showed attempt 1, and the delivery has changed "
        "since (it is done, attempt 2). Nothing was done; look at it again before replaying."
    )
    # Bob looks again: the page now shows attempt 2, and he may confirm that.
    again = _form(_detail(bob, cb), "oc-force")
    assert again["attempts"] == "2"
    assert _force(bob, cb, again) == 303
    assert len(console.recorder.events) == events + 2
    assert _outcome(bob, cb) == "Replay: replayed, attempt 3: done."


def _assert_force_refused(console: Console, name: str, value: str | None, problem: str) -> None:
    """The force form of a done delivery's page, its field ``name`` left out
    (``None``) or set to ``value``, is refused with 400 and runs nothing."""
    cb = gateway_collect(app=console.app)
    assert console.send(cb) == 200
    client = console.client()
    fields = _form(_detail(client, cb), "oc-force")
    if value is None:
        del fields[name]
    else:
        fields[name] = value
    events = len(console.recorder.events)
    response = client.post(
        f"{CONSOLE}/delivery/gateway/collect/replay", data={**fields, "force": "yes"}
    )
    assert response.status_code == 400
    assert problem in html.unescape(response.get_data(as_text=True))
    assert len(console.recorder.events) == events
    assert console.row(cb).attempts == 1


@pytest.mark.parametrize(
    ("attempts", "problem"),
    [
        (None, "does not say which attempt of the delivery the page showed"),
        ("", "does not say which attempt of the delivery the page showed"),
        ("one", "The attempts in this force replay, 'one', are not a number of attempts"),
        ("-1", "The attempts in this force replay, '-1', are not a number of attempts"),
        ("\u0661", "The attempts in this force replay, '\u0661', are not a number"),
        ("9" * 40, "are not a number of attempts"),
    ],
)
def test_a_force_form_that_does_not_say_what_it_saw_is_refused(
    console: Console, attempts: str | None, problem: str
) -> None:
    """A force replay that cannot be tied to one observed state (a page
    rendered before the field existed, a hand-made request) runs nothing."""
    _assert_force_refused(console, "attempts", attempts, problem)


def test_the_force_form_still_replays_a_done_delivery(console: Console) -> None:
    """What the existing button did, through the form the page renders: an
    unticked box replays nothing, a ticked one runs the receivers once more."""
    cb = gateway_collect(app=console.app)
    assert console.send(cb) == 200
    client = console.client()
    page = _detail(client, cb)
    assert '<input type="hidden" name="attempts" value="1">' in page
    fields = _form(page, "oc-force")
    events = len(console.recorder.events)
    client.post(f"{CONSOLE}/delivery/gateway/collect/replay", data=fields)
    assert _outcome(client, cb) == "Replay: already done; not replayed."
    assert len(console.recorder.events) == events
    assert _force(client, cb, fields) == 303
    assert _outcome(client, cb) == "Replay: replayed, attempt 2: done."
    assert len(console.recorder.events) == events + 1


def test_concurrent_forced_replays_of_one_state_run_the_receivers_once(
    console: Console,
) -> None:
    """The second replay claims while the first one's receivers run: the
    store's claim polls a processing row, then finds it done, one attempt
    further than the state both replays were given; it must not take that
    over (the attempts fence is in the claim statement itself)."""
    cb = igv_order_status(app=console.app)
    assert console.send(cb) == 200
    seen = console.row(cb)
    assert (seen.status, seen.attempts) == ("done", 1)
    state = console.hooks.state(console.app)
    outcomes: dict[str, ReplayOutcome] = {}
    second = threading.Thread(target=lambda: outcomes.update(second=_replay(console, seen)))

    def while_the_first_runs(event: Any) -> None:
        if second.ident is None:
            second.start()
            # Long enough for the second replay's claim to find the row
            # processing and poll it; far less than its duplicate wait.
            time.sleep(0.5)

    events = len(console.recorder.events)
    console.recorder.hook = while_the_first_runs
    try:
        with console.app.app_context():
            outcomes["first"] = replay(console.app, state, seen, force=True)
        second.join(timeout=30)
    finally:
        console.recorder.hook = None
    assert not second.is_alive()
    assert (outcomes["first"].status, outcomes["first"].message) == (
        "done",
        "replayed, attempt 2: done.",
    )
    assert (outcomes["second"].status, outcomes["second"].message) == (
        "already_done",
        "already done, and replayed since it was read at attempt 1; not replayed again.",
    )
    assert len(console.recorder.events) == events + 1, "the receivers ran twice more"
    assert console.row(cb).attempts == 2


def _replay(console: Console, row: Any) -> ReplayOutcome:
    with console.app.app_context():
        return replay(console.app, console.hooks.state(console.app), row, force=True)


def test_a_replay_that_leaves_the_delivery_dead_says_so(make_console: ConsoleFactory) -> None:
    """A dead delivery whose replay fails again is dead again at once: the
    banner must say so, not promise a retry (the platform's answer text)."""
    console = make_console(ORDERHOOKS_RETRY_DELAYS=[])
    cb = igv_order_status(app=console.app)
    assert console.send(cb, fail=True) == 500
    assert console.row(cb).status == "dead"
    client = console.client()
    fields = _form(_detail(client, cb), "oc-replay")
    console.recorder.fail_next = 1
    response = client.post(f"{CONSOLE}/delivery/igv/order-status/replay", data=fields)
    assert response.status_code == 303
    assert console.row(cb).status == "dead"
    banner = _outcome(client, cb)
    assert banner is not None
    assert "will be retried" not in banner, banner
    assert banner == DEAD_AGAIN


def test_a_replay_that_fails_again_says_when_the_next_attempt_is(console: Console) -> None:
    cb = igv_order_status(app=console.app)
    assert console.send(cb, fail=True) == 500
    client = console.client()
    fields = _form(_detail(client, cb), "oc-replay")
    console.recorder.fail_next = 1
    client.post(f"{CONSOLE}/delivery/igv/order-status/replay", data=fields)
    row = console.row(cb)
    assert (row.status, row.attempts) == ("failed", 2)
    # Attempt 2 failed at 12:30:00; the second retry delay is 300 s.
    assert _outcome(client, cb) == (
        "Replay: failed: attempt 2 failed (RuntimeError: receiver exploded on purpose); "
        "the next attempt is at 2026-05-04 12:35:00 UTC."
    )


def test_a_force_form_does_not_run_over_a_delivery_stored_anew_since_its_page(
    console: Console,
) -> None:
    """The page showed a done delivery at attempt 1; purge deleted it, and a
    resend stored it anew and ran it (done, attempt 1 again). The form's
    attempts match the new row, but it is not the delivery the operator
    confirmed: a run of it now would be one more than anyone asked for."""
    cb = igv_order_status(app=console.app)
    assert console.send(cb) == 200
    client = console.client()
    fields = _form(_detail(client, cb), "oc-force")
    first_created = console.row(cb).created_at
    assert datetime.fromisoformat(fields["created"]) == first_created
    with console.app.app_context():
        assert console.hooks.store.purge(older_than=datetime(2100, 1, 1, tzinfo=UTC)) == 1
    console.clock.now += 1  # the resend comes a second later
    assert console.send(cb) == 200
    row = console.row(cb)
    assert (row.status, row.attempts) == ("done", 1) and row.created_at != first_created
    events = len(console.recorder.events)
    assert _force(client, cb, fields) == 303
    assert len(console.recorder.events) == events
    assert _outcome(client, cb) == (
        "Replay: not replayed: the delivery the page showed is gone (purged), and this one "
        "was stored anew since (it is done, attempt 1). Nothing was done; look at it again "
        "before replaying."
    )
    # Its own page may be confirmed.
    assert _force(client, cb, _form(_detail(client, cb), "oc-force")) == 303
    assert len(console.recorder.events) == events + 1


@pytest.mark.parametrize(
    ("created", "problem"),
    [
        (None, "does not say when the delivery the page showed was stored"),
        ("", "does not say when the delivery the page showed was stored"),
        ("yesterday", "The creation time in this force replay, 'yesterday', is not a time"),
        ("2026-12-03T10:00:00", "'2026-12-03T10:00:00', is not a time"),
        ("9" * 80, "is not a time"),
    ],
)
def test_a_force_form_that_does_not_say_when_its_delivery_was_stored_is_refused(
    console: Console, created: str | None, problem: str
) -> None:
    _assert_force_refused(console, "created", created, problem)
