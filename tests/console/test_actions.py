"""The console's buttons: CSRF-protected POSTs that run the CLI's replay
pipeline, on every store backend."""

from __future__ import annotations

import html
import logging
import re
import time

import pytest
from flask.testing import FlaskClient
from itsdangerous import TimestampSigner, URLSafeTimedSerializer

from flask_orderhooks.console import csrf
from flask_orderhooks.console.views import created_text
from flask_orderhooks.testing import SignedCallback, gateway_collect, igv_order_status
from tests.console.conftest import CONSOLE, SECRET_KEY, Console, ConsoleFactory


def _detail(client: FlaskClient, cb: SignedCallback) -> str:
    response = client.get(
        f"{CONSOLE}/delivery/{cb.provider}/{cb.callback}", query_string={"key": cb.key}
    )
    assert response.status_code == 200
    return response.get_data(as_text=True)


def _token(page: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert match is not None
    return html.unescape(match[1])


def _post(
    client: FlaskClient, cb: SignedCallback, action: str, token: str | None, **form: str
) -> tuple[int, str]:
    data = {"key": cb.key, **form}
    if token is not None:
        data["csrf_token"] = token
    response = client.post(f"{CONSOLE}/delivery/{cb.provider}/{cb.callback}/{action}", data=data)
    return response.status_code, response.get_data(as_text=True)


def _outcome(client: FlaskClient, cb: SignedCallback) -> str | None:
    match = re.search(
        r'<p class="oc-banner [^"]*" id="oc-outcome">([^<]*)</p>', _detail(client, cb)
    )
    return html.unescape(match[1]) if match else None


def _failed(console: Console) -> SignedCallback:
    cb = igv_order_status(app=console.app)
    assert console.send(cb, fail=True) == 500
    assert console.row(cb).status == "failed"
    return cb


def test_replay_a_failed_delivery(console: Console, caplog: pytest.LogCaptureFixture) -> None:
    cb = _failed(console)
    client = console.client()
    token = _token(_detail(client, cb))
    events = len(console.recorder.events)
    with caplog.at_level(logging.INFO, logger="flask_orderhooks"):
        response = client.post(
            f"{CONSOLE}/delivery/igv/order-status/replay",
            data={"key": cb.key, "csrf_token": token},
        )
    assert response.status_code == 303
    assert (
        response.headers["Location"]
        == f"/orderhooks/console/delivery/igv/order-status?key={cb.key}"
    )
    assert len(console.recorder.events) == events + 1
    row = console.row(cb)
    assert (row.status, row.attempts) == ("done", 2)
    assert _outcome(client, cb) == "Replay: replayed, attempt 2: done."
    # Shown once: a reload does not repeat it.
    assert _outcome(client, cb) is None
    assert (
        f"OrderHooks console: replay of igv order-status {cb.key}: replayed, attempt 2: done."
        in caplog.messages
    )


def test_replay_that_fails_again_is_shown(console: Console) -> None:
    cb = _failed(console)
    client = console.client()
    console.recorder.fail_next = 1
    status, _ = _post(client, cb, "replay", _token(_detail(client, cb)))
    assert status == 303
    row = console.row(cb)
    assert _outcome(client, cb) == (
        "Replay: failed: attempt 2 failed (RuntimeError: receiver exploded on purpose); "
        f"the next attempt is at {row.next_attempt_at:%Y-%m-%d %H:%M:%S} UTC."
    )
    assert (row.status, row.attempts) == ("failed", 2)
    assert [f.attempt for f in row.failed_attempts] == [1, 2]


def test_retry_now(console: Console) -> None:
    cb = _failed(console)
    client = console.client()
    page = _detail(client, cb)
    assert 'id="oc-retry"' in page
    status, _ = _post(client, cb, "retry", _token(page))
    assert status == 303
    assert _outcome(client, cb) == "Retry now: replayed, attempt 2: done."
    assert console.row(cb).status == "done"


def test_retry_now_needs_a_scheduled_attempt(console: Console) -> None:
    cb = gateway_collect(app=console.app)
    assert console.send(cb) == 200
    client = console.client()
    events = len(console.recorder.events)
    status, _ = _post(client, cb, "retry", _token(_detail(client, cb)))
    assert status == 303
    assert _outcome(client, cb) == (
        "Retry now: no attempt is scheduled (the delivery is done); nothing done."
    )
    assert len(console.recorder.events) == events
    assert console.row(cb).attempts == 1


def test_a_done_delivery_needs_force(console: Console) -> None:
    cb = gateway_collect(app=console.app)
    assert console.send(cb) == 200
    client = console.client()
    token = _token(_detail(client, cb))
    events = len(console.recorder.events)
    _post(client, cb, "replay", token)
    assert _outcome(client, cb) == "Replay: already done; not replayed."
    _post(client, cb, "replay", token, force="on")
    assert _outcome(client, cb) == "Replay: already done; not replayed."
    assert len(console.recorder.events) == events
    # The force form says what its page showed: attempt 1 of the delivery
    # stored at that time.
    created = created_text(console.row(cb))
    _post(client, cb, "replay", token, force="yes", attempts="1", created=created)
    assert _outcome(client, cb) == "Replay: replayed, attempt 2: done."
    assert len(console.recorder.events) == events + 1


def test_dead_delivery_is_replayed(make_console: ConsoleFactory) -> None:
    console = make_console(ORDERHOOKS_RETRY_DELAYS=[])
    cb = igv_order_status(app=console.app)
    assert console.send(cb, fail=True) == 500
    assert console.row(cb).status == "dead"
    client = console.client()
    page = _detail(client, cb)
    assert 'id="oc-replay"' in page
    assert 'id="oc-retry"' not in page
    _post(client, cb, "replay", _token(page))
    assert console.row(cb).status == "done"


@pytest.mark.parametrize("action", ["replay", "retry"])
def test_post_without_valid_token_changes_nothing(
    console: Console, action: str, caplog: pytest.LogCaptureFixture
) -> None:
    cb = _failed(console)
    client = console.client()
    real = _token(_detail(client, cb))
    other = console.client()
    other_token = _token(_detail(other, cb))
    with client.session_transaction() as s:
        bound = s[csrf.SESSION_KEY]

    class Old(TimestampSigner):
        def get_timestamp(self) -> int:
            return int(time.time()) - 3601

    expired = URLSafeTimedSerializer(SECRET_KEY, salt=csrf.SALT, signer=Old).dumps(bound)
    wrong_salt = URLSafeTimedSerializer(SECRET_KEY, salt="another").dumps(bound)
    wrong_key = URLSafeTimedSerializer("another key", salt=csrf.SALT).dumps(bound)
    bad = [None, "", "garbage", real + "x", other_token, expired, wrong_salt, wrong_key]
    with caplog.at_level(logging.WARNING, logger="flask_orderhooks"):
        for token in bad:
            status, page = _post(client, cb, action, token)
            assert status == 400, token
            assert "This form has expired or did not come from the console" in page
    assert len([m for m in caplog.messages if "CSRF token" in m]) == len(bad)
    row = console.row(cb)
    assert (row.status, row.attempts) == ("failed", 1)
    assert len(console.recorder.events) == 1
    # A session without the bound value (a new browser) has no valid token.
    fresh = console.client()
    status, _ = _post(fresh, cb, action, real)
    assert status == 400
    # The real token still works afterwards.
    status, _ = _post(client, cb, action, real)
    assert status == 303
    assert console.row(cb).status == "done"


def test_token_survives_a_key_rotation(console: Console) -> None:
    cb = _failed(console)
    client = console.client()
    token = _token(_detail(client, cb))
    console.app.secret_key = "the next key"
    console.app.config["SECRET_KEY_FALLBACKS"] = [SECRET_KEY]
    # The session cookie is signed with the old key too; Flask reads it through
    # its own fallbacks.
    status, _ = _post(client, cb, "replay", token)
    assert status == 303
    assert console.row(cb).status == "done"


def test_get_cannot_act(console: Console) -> None:
    cb = _failed(console)
    client = console.client()
    response = client.get(
        f"{CONSOLE}/delivery/igv/order-status/replay", query_string={"key": cb.key}
    )
    assert response.status_code == 405
    assert console.row(cb).attempts == 1


def test_action_on_unknown_delivery_is_404(console: Console) -> None:
    cb = igv_order_status(app=console.app)
    client = console.client()
    # A token from any console page of this session.
    first = _failed(console)
    token = _token(_detail(client, first))
    status, _ = _post(client, cb, "replay", token)
    assert status == 404
