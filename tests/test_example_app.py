"""The example shop: each receiver's effect, through the ``orderhooks`` fixture,
on SQLite and PostgreSQL; its public page, the staff login and page; its
config; and the demo."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.sessions import SecureCookieSessionInterface
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from example_app import DEMO_SECRETS, create_app, demo
from example_app.models import Base, GameOrder, Order, Payment, Payout, db
from flask_orderhooks import GameOrderChanged, game_order_changed, get_extension, payout_finished
from flask_orderhooks.pytest_plugin import OrderHooksClient
from flask_orderhooks.store import StoredDelivery
from flask_orderhooks.testing import SignedCallback, build, sud_order

_Model = TypeVar("_Model", bound=Base)

#: The staff password and session key of the ``app`` fixture's shop.
STAFF_PASSWORD = "correct horse battery staple"
STAFF_CONFIG = {"SHOP_STAFF_PASSWORD": STAFF_PASSWORD, "SECRET_KEY": "a-test-session-key"}
#: The public demo callback secrets, which the tests sign with.
DEMO_ON = {"SHOP_DEMO_SECRETS": True}


@pytest.fixture
def app(database_uri: str, tmp_path: Path) -> Iterator[Flask]:
    """The shop on each backend, its staff side on; overrides conftest's
    ``app`` for ``orderhooks``."""
    app = create_app(
        {"TESTING": True, "SQLALCHEMY_DATABASE_URI": database_uri, **DEMO_ON, **STAFF_CONFIG},
        instance_path=tmp_path / "instance",
    )
    yield app
    with app.app_context():
        db.drop_all()
        db.engine.dispose()


def rows(app: Flask, model: type[_Model]) -> list[_Model]:
    with app.app_context():
        return list(db.session.scalars(sa.select(model).order_by(sa.text("id"))))


def deliveries(app: Flask) -> list[StoredDelivery]:
    with app.app_context():
        return get_extension(app).state(app).store.list()


# -- iGV ------------------------------------------------------------------------


def test_igv_creates_an_unknown_order_ready_for_delivery(
    app: Flask, orderhooks: OrderHooksClient
) -> None:
    response = orderhooks.deliver("igv", order_id=1689644928115784, buyer_id="B-1")

    assert (response.status_code, response.data) == (200, b"OK")
    [order] = rows(app, Order)
    assert (order.igv_order_id, order.order_num, order.buyer_id, order.delivery_state) == (
        1689644928115784,
        "SO1689644928115784",
        "B-1",
        "ready_for_delivery",
    )


def test_igv_marks_a_known_order_ready_for_delivery(
    app: Flask, orderhooks: OrderHooksClient
) -> None:
    with app.app_context():
        db.session.add(Order(igv_order_id=7, order_num="SO7", buyer_id="B-7"))
        db.session.commit()

    response = orderhooks.deliver("igv", order_id=7, order_num="SO7", buyer_id="B-7")

    assert response.status_code == 200
    assert [(o.igv_order_id, o.delivery_state) for o in rows(app, Order)] == [
        (7, "ready_for_delivery")
    ]


def test_unhandled_callback_is_acknowledged_and_logged(
    app: Flask, orderhooks: OrderHooksClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="example_app.receivers"):
        response = orderhooks.deliver("igv", request_id="9001", seller_order_status=2)

    assert (response.status_code, response.data) == (200, b"OK")
    assert [r.getMessage() for r in caplog.records if r.name == "example_app.receivers"] == [
        "unhandled igv order-status callback 9001 (sellerOrderStatus=2); "
        "acknowledged without action"
    ]
    assert rows(app, Order) == []


# -- gateway collect --------------------------------------------------------------


def payment_state(app: Flask) -> list[tuple[Any, ...]]:
    return [
        (p.gateway_id, p.trans_id, p.order_amount, p.payed_amount, p.status, p.credited, p.note)
        for p in rows(app, Payment)
    ]


def test_collect_paid_in_full_is_credited(app: Flask, orderhooks: OrderHooksClient) -> None:
    response = orderhooks.deliver("collect", id="C1", trans_id="SHOP-1", order_amount="100.00")

    assert (response.status_code, response.data) == (200, b"success")
    assert payment_state(app) == [("C1", "SHOP-1", "100.00", "100.00", 60, True, "credited")]


def test_collect_amount_mismatch_is_not_credited(app: Flask, orderhooks: OrderHooksClient) -> None:
    response = orderhooks.deliver(
        "collect", id="C1", trans_id="SHOP-1", order_amount="100.00", payed_amount="90.00"
    )

    # The callback itself is valid, so it is acknowledged; the shop does not credit.
    assert (response.status_code, response.data) == (200, b"success")
    assert payment_state(app) == [
        (
            "C1",
            "SHOP-1",
            "100.00",
            "90.00",
            60,
            False,
            "amount mismatch: paid 90.00 of 100.00; not credited",
        )
    ]


def test_collect_with_number_amounts_keeps_their_text(
    app: Flask, orderhooks: OrderHooksClient
) -> None:
    response = orderhooks.deliver("collect", id="C1", order_amount=Decimal("100.00"))

    assert response.status_code == 200
    assert payment_state(app) == [("C1", "ORDER-10001", "100.00", "100.00", 60, True, "credited")]


def test_collect_processing_then_success_credits_the_same_payment(
    app: Flask, orderhooks: OrderHooksClient
) -> None:
    assert orderhooks.deliver("collect", id="C1", status=20, payed_at=None).status_code == 200
    assert payment_state(app) == [
        ("C1", "ORDER-10001", "100.00", "100.00", 20, False, "not paid yet (gateway status 20)")
    ]

    assert orderhooks.deliver("collect", id="C1", status=60).status_code == 200
    assert payment_state(app) == [("C1", "ORDER-10001", "100.00", "100.00", 60, True, "credited")]


def test_a_credited_payment_is_final(app: Flask, orderhooks: OrderHooksClient) -> None:
    assert orderhooks.deliver("collect", id="C1", status=60).status_code == 200
    # A late status of the same order is a new delivery (another key)...
    assert orderhooks.deliver("collect", id="C1", status=20, payed_at=None).status_code == 200

    # ...that must not undo the credit.
    assert payment_state(app) == [("C1", "ORDER-10001", "100.00", "100.00", 60, True, "credited")]
    assert sorted(d.key for d in deliveries(app)) == ["C1:20", "C1:60"]


def test_duplicate_collect_is_not_credited_twice(app: Flask, orderhooks: OrderHooksClient) -> None:
    with orderhooks.captured() as events:
        first, retry = orderhooks.deliver_twice("collect", id="C1", trans_id="SHOP-1")

    assert (first.status_code, first.data) == (200, b"success")
    assert (retry.status_code, retry.data) == (200, b"success")
    assert [e.signal for e in events] == ["orderhooks.payment-collected"]
    assert payment_state(app) == [("C1", "SHOP-1", "100.00", "100.00", 60, True, "credited")]
    [stored] = deliveries(app)
    assert (stored.key, stored.status, stored.attempts) == ("C1:60", "done", 1)


# -- gateway payout ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "state", "finished_at"),
    [
        (60, "paid", "2026-05-04 10:15:00"),
        (50, "canceled", "2026-05-04 10:23:00"),
        (20, "status 20", None),
    ],
)
def test_payout_records_its_result(
    app: Flask, orderhooks: OrderHooksClient, status: int, state: str, finished_at: str | None
) -> None:
    response = orderhooks.deliver(
        "payout", id="P1", trans_id="WDL-1", order_amount="30.00", status=status
    )

    assert (response.status_code, response.data) == (200, b"success")
    assert [
        (p.gateway_id, p.trans_id, p.amount, p.state, p.finished_at) for p in rows(app, Payout)
    ] == [("P1", "WDL-1", "30.00", state, finished_at)]


def test_payout_canceled_after_a_retry_updates_the_same_row(
    app: Flask, orderhooks: OrderHooksClient
) -> None:
    assert orderhooks.deliver("payout", id="P1", status=20).status_code == 200
    assert orderhooks.deliver("payout", id="P1", status=50).status_code == 200

    assert [(p.gateway_id, p.state) for p in rows(app, Payout)] == [("P1", "canceled")]


# -- SUD --------------------------------------------------------------------------


def game_state(app: Flask) -> list[tuple[Any, ...]]:
    return [
        (g.out_order_id, g.order_id, g.cmd, g.from_uid, g.to_uid, g.value, g.status, g.notify_id)
        for g in rows(app, GameOrder)
    ]


_OK = {"ret_code": 0, "ret_msg": "SUCCESS"}


def test_sud_order_changed_records_the_game_order(app: Flask, orderhooks: OrderHooksClient) -> None:
    response = orderhooks.deliver(
        "sud", notify_id="N-1", order_id="G-1", out_order_id="OUT-1", cmd="gift", value=5
    )

    assert (response.status_code, response.json) == (200, _OK)
    assert game_state(app) == [
        ("OUT-1", "G-1", "gift", "u001", "u002", 5, "EXECUTE_SUCCESS", "N-1")
    ]


def test_sud_batch_records_each_order(app: Flask, orderhooks: OrderHooksClient) -> None:
    response = orderhooks.deliver(
        "sud-batch",
        notify_id="N-1",
        orders=[
            sud_order(order_id="G-1", out_order_id="OUT-1", cmd="bet", value=10),
            sud_order(order_id="G-2", out_order_id="OUT-2", status="EXECUTE_FAIL", value=None),
        ],
    )

    assert (response.status_code, response.json) == (200, _OK)
    assert game_state(app) == [
        ("OUT-1", "G-1", "bet", "u001", "u002", 10, "EXECUTE_SUCCESS", "N-1"),
        ("OUT-2", "G-2", "gift", "u001", "u002", None, "EXECUTE_FAIL", "N-1"),
    ]


def test_game_orders_are_idempotent_by_out_order_id(
    app: Flask, orderhooks: OrderHooksClient
) -> None:
    # Older SUD docs also send the in-between statuses.
    first = orderhooks.deliver("sud", notify_id="N-1", out_order_id="OUT-1", status="EXECUTING")
    assert first.status_code == 200
    # A batch that repeats OUT-1 twice and adds OUT-2.
    response = orderhooks.deliver(
        "sud-batch",
        notify_id="N-2",
        orders=[
            sud_order(order_id="G-1", out_order_id="OUT-1", status="EXECUTING"),
            sud_order(order_id="G-1", out_order_id="OUT-1", status="EXECUTE_SUCCESS"),
            sud_order(order_id="G-2", out_order_id="OUT-2"),
        ],
    )
    assert response.status_code == 200
    # A late notice must not undo a final status.
    late = orderhooks.deliver("sud", notify_id="N-3", out_order_id="OUT-1", status="EXECUTING")
    assert late.status_code == 200

    assert [(out, status, notify) for out, *_, status, notify in game_state(app)] == [
        ("OUT-1", "EXECUTE_SUCCESS", "N-2"),
        ("OUT-2", "EXECUTE_SUCCESS", "N-2"),
    ]
    assert sorted((d.key, d.status) for d in deliveries(app)) == [
        ("N-1", "done"),
        ("N-2", "done"),
        ("N-3", "done"),
    ]


def test_a_batch_is_one_transaction(app: Flask, orderhooks: OrderHooksClient) -> None:
    def fail_on_second(sender: Flask, *, event: GameOrderChanged) -> None:
        if event.out_order_id == "OUT-2":
            raise RuntimeError("wallet service down")

    batch = orderhooks.build(
        "sud-batch",
        notify_id="N-1",
        orders=[sud_order(out_order_id="OUT-1"), sud_order(out_order_id="OUT-2")],
    )
    game_order_changed.connect(fail_on_second, app)
    try:
        failed = orderhooks.post(batch)
    finally:
        game_order_changed.disconnect(fail_on_second, app)

    assert (failed.status_code, failed.json) == (
        500,
        {"ret_code": 500, "ret_msg": "A receiver failed; the delivery will be retried."},
    )
    # OUT-1 was written before OUT-2 failed: rolled back with it.
    assert rows(app, GameOrder) == []
    [stored] = deliveries(app)
    assert (stored.status, stored.attempts, stored.error) == (
        "failed",
        1,
        "RuntimeError: wallet service down",
    )

    # The platform's retry of the same notification records both orders.
    retried = orderhooks.post(batch)

    assert (retried.status_code, retried.json) == (200, _OK)
    assert [g.out_order_id for g in rows(app, GameOrder)] == ["OUT-1", "OUT-2"]
    [stored] = deliveries(app)
    assert (stored.status, stored.attempts) == ("done", 2)


# -- the pages --------------------------------------------------------------------


def csrf_token_of(page: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert match, "the page has no CSRF token"
    return match.group(1)


def log_in(client: FlaskClient, query: str = "", password: str = STAFF_PASSWORD) -> TestResponse:
    """Log in through the login form, as a browser does: GET it, then POST it."""
    token = csrf_token_of(client.get("/login" + query).get_data(as_text=True))
    return client.post("/login" + query, data={"csrf_token": token, "password": password})


def staff_client(app: Flask) -> FlaskClient:
    client = app.test_client()
    assert log_in(client).status_code == 302
    return client


def deliver_one_of_each(app: Flask, orderhooks: OrderHooksClient) -> None:
    """An order, an underpaid payment, a game order and a payout that failed."""

    def payout_down(sender: Flask, **_: Any) -> None:
        raise RuntimeError("payout ledger <locked>")

    orderhooks.deliver("igv", order_id=42, order_num="SO42", buyer_id="BUYER-42")
    orderhooks.deliver("collect", id="C1", trans_id="SHOP-1", payed_amount="90.00")
    orderhooks.deliver("sud", out_order_id="OUT-1")
    payout_finished.connect(payout_down, app)
    try:
        assert orderhooks.deliver("payout", id="P1").status_code == 500
    finally:
        payout_finished.disconnect(payout_down, app)


def test_public_page_shows_nothing_of_the_orders(app: Flask, orderhooks: OrderHooksClient) -> None:
    deliver_one_of_each(app, orderhooks)

    response = app.test_client().get("/")

    assert response.status_code == 200
    page = response.get_data(as_text=True)
    assert "<h1>Example shop</h1>" in page
    assert '<a href="/staff/">' in page
    for private in ("C1:60", "SO42", "BUYER-42", "SHOP-1", "90.00", "OUT-1", "P1", "ledger"):
        assert private not in page
    assert "<table" not in page


def test_staff_page_without_deliveries(app: Flask) -> None:
    response = staff_client(app).get("/staff/")

    assert response.status_code == 200
    page = response.get_data(as_text=True)
    assert "No deliveries yet." in page
    assert "No payments yet." in page
    assert '<a href="/orderhooks/console/">operator console</a>' in page
    assert response.headers["Cache-Control"] == "no-store"


def test_staff_page_shows_deliveries_and_records(app: Flask, orderhooks: OrderHooksClient) -> None:
    deliver_one_of_each(app, orderhooks)

    response = staff_client(app).get("/staff/")

    assert response.status_code == 200
    page = response.get_data(as_text=True)
    for fragment in (
        "<td>gateway</td><td>collect</td><td><code>C1:60</code></td>\n"
        '    <td class="done">done</td><td>1</td><td></td>',
        "<td>gateway</td><td>payout</td><td><code>P1:60</code></td>\n"
        '    <td class="failed">failed</td><td>1</td>'
        "<td>RuntimeError: payout ledger &lt;locked&gt;</td>",
        "<td>SO42</td><td>42</td><td>BUYER-42</td>",
        "<td>ready_for_delivery</td>",
        "<td>amount mismatch: paid 90.00 of 100.00; not credited</td>",
        "<td>OUT-1</td>",
        "No payouts yet.",
    ):
        assert fragment in page


def test_staff_page_and_console_send_strangers_to_the_login(
    app: Flask, orderhooks: OrderHooksClient
) -> None:
    deliver_one_of_each(app, orderhooks)
    client = app.test_client()

    page = client.get("/staff/")
    console = client.get("/orderhooks/console/?status=failed")

    assert (page.status_code, page.headers["Location"]) == (302, "/login?next=/staff/?")
    assert (console.status_code, console.headers["Location"]) == (
        302,
        "/login?next=/orderhooks/console/?status%3Dfailed",
    )
    assert "C1:60" not in page.get_data(as_text=True) + console.get_data(as_text=True)


def test_login_goes_to_the_page_asked_for(app: Flask) -> None:
    client = app.test_client()

    response = log_in(client, "?next=/orderhooks/console/?status%3Dfailed")

    assert (response.status_code, response.headers["Location"]) == (
        302,
        "/orderhooks/console/?status=failed",
    )
    # Another site's form posts here without the staff session's cookie.
    assert "SameSite=Lax" in response.headers["Set-Cookie"]
    assert "HttpOnly" in response.headers["Set-Cookie"]
    assert client.get("/orderhooks/console/?status=failed").status_code == 200
    assert client.get("/staff/").status_code == 200


@pytest.mark.parametrize(
    "next_page",
    [
        "/",
        "/staff/",
        "/orderhooks/console/",
        "/orderhooks/console/delivery/gateway/collect?key=C1%3A60",
    ],
)
def test_login_follows_a_page_of_the_shop(app: Flask, next_page: str) -> None:
    response = log_in(app.test_client(), "?" + urlencode({"next": next_page}))

    assert (response.status_code, response.headers["Location"]) == (302, next_page)


#: ``next`` values, as they arrive in the query string, that must never be
#: followed: another host once a browser has read them, a header a server
#: refuses, or no page of the shop.
UNSAFE_NEXT = [
    "%2F%09%2Fevil.example",  # "/\t/evil.example": browsers drop the tab
    "/%0A/evil.example",  # a newline: dropped too, and a 500 in a header
    "/%0D%0A/evil.example",
    "/%0D%0ASet-Cookie:%20staff=1",
    "%2F%2Fevil.example",
    "//evil.example",
    "///evil.example",
    "%2F%5Cevil.example",  # "/\evil.example": browsers read "\" as "/"
    "%5C%5Cevil.example",
    "/%5C/evil.example",
    "/staff/%5C..%5C..%5Cevil",
    "https://evil.example/",
    "https:evil.example",
    "HTTPS://evil.example",
    "javascript:alert(1)",
    "data:text/html,hi",
    "evil.example",
    "%20/%2Fevil.example",
    "/staff/%20",
    "/%2F%2Fevil.example",  # decoded once by the query string: "//evil.example"
    "/%252F%252Fevil.example",  # "/%2F%2F...": "//evil.example" decoded once more
    "/%255Cevil.example",
    "/%2509/evil.example",
    "/%E3%80%82evil.example",  # "/。evil.example": non-ASCII
    "/%C3%A9",
    "/%FF",
    "/%7F",
    "/%00",
    "/nowhere",  # no page of the shop
    "/orderhooks/console",  # only a redirect to the console's page
    "/logout",  # not a page: a POST-only form's target
    "",
]


@pytest.mark.parametrize("next_query", UNSAFE_NEXT)
def test_login_never_follows_another_site(app: Flask, next_query: str) -> None:
    response = log_in(app.test_client(), "?next=" + next_query)

    assert (response.status_code, response.headers["Location"]) == (302, "/staff/")


def test_login_without_next_goes_to_the_staff_page(app: Flask) -> None:
    response = log_in(app.test_client())

    assert (response.status_code, response.headers["Location"]) == (302, "/staff/")


def test_a_wrong_password_is_refused(app: Flask) -> None:
    client = app.test_client()

    response = log_in(client, "?next=/staff/", password="guess")

    assert response.status_code == 401
    assert "Wrong password." in response.get_data(as_text=True)
    assert client.get("/staff/").status_code == 302


def client_from(app: Flask, address: str) -> FlaskClient:
    client = app.test_client()
    client.environ_base["REMOTE_ADDR"] = address
    return client


def test_a_wrong_password_is_logged_without_the_password(
    app: Flask, caplog: pytest.LogCaptureFixture
) -> None:
    client = client_from(app, "203.0.113.7")

    with caplog.at_level(logging.WARNING, logger="example_app.staff"):
        log_in(client, password="hunter2-guess")

    assert [record.getMessage() for record in caplog.records] == [
        "Staff login refused: wrong password (from 203.0.113.7)."
    ]


def test_failed_logins_are_limited_per_address(
    app: Flask, caplog: pytest.LogCaptureFixture
) -> None:
    """Five failures a minute from one address (the default limit): the
    sixth try is refused with 429 whatever the password, so the password
    cannot be guessed at the server's speed. Another address is not held
    back by it."""
    guesser = client_from(app, "203.0.113.7")
    for _ in range(5):
        assert log_in(guesser, password="guess").status_code == 401
    caplog.clear()

    with caplog.at_level(logging.WARNING, logger="example_app.staff"):
        refused = log_in(guesser)

    assert refused.status_code == 429
    assert "Too many failed logins; try again later." in refused.get_data(as_text=True)
    assert 0 < int(refused.headers["Retry-After"]) <= 60
    assert refused.headers["Cache-Control"] == "no-store"
    assert guesser.get("/staff/").status_code == 302
    assert [record.getMessage() for record in caplog.records] == [
        "Staff login refused: too many failed logins from 203.0.113.7 (at most 5 per 1 minute)."
    ]
    # The form itself still shows (GET is not limited), and staff elsewhere log in.
    assert guesser.get("/login").status_code == 200
    staff = client_from(app, "198.51.100.1")
    assert log_in(staff).status_code == 302


def test_logins_that_succeed_are_not_limited(app: Flask) -> None:
    client = client_from(app, "203.0.113.7")

    for _ in range(8):
        assert log_in(client).status_code == 302


@pytest.mark.parametrize("limit", ["often", "", 5])
def test_a_login_limit_that_cannot_be_read_is_refused_at_start(
    tmp_path: Path, limit: object
) -> None:
    with pytest.raises(ValueError, match="SHOP_LOGIN_LIMIT must be a limit such as"):
        create_app(
            {"TESTING": True, **STAFF_CONFIG, "SHOP_LOGIN_LIMIT": limit},
            instance_path=tmp_path / "instance",
        )


@pytest.mark.parametrize("token", [None, "", "forged", "\u00e9"])
def test_a_login_from_another_site_is_refused(app: Flask, token: str | None) -> None:
    client = app.test_client()
    client.get("/login")  # the session has a token; the other site cannot read it
    form = {"password": STAFF_PASSWORD} | ({} if token is None else {"csrf_token": token})

    response = client.post("/login?next=/staff/", data=form)

    assert response.status_code == 400
    assert "The form expired; please log in again." in response.get_data(as_text=True)
    assert client.get("/staff/").status_code == 302


def test_logout_ends_the_staff_session(app: Flask) -> None:
    client = staff_client(app)
    token = csrf_token_of(client.get("/staff/").get_data(as_text=True))

    response = client.post("/logout", data={"csrf_token": token})

    assert (response.status_code, response.headers["Location"]) == (302, "/")
    assert client.get("/staff/").status_code == 302
    assert client.get("/orderhooks/console/").status_code == 302


def test_a_logout_from_another_site_is_refused(app: Flask) -> None:
    client = staff_client(app)

    response = client.post("/logout", data={"csrf_token": "forged"})

    assert response.status_code == 400
    assert client.get("/staff/").status_code == 200


# -- configuration ----------------------------------------------------------------


#: Real values for the demo secrets the tests below do not look at, and the
#: staff side's, so that no other warning is logged.
REAL_REST = {
    "ORDERHOOKS_STANDARD_WEBHOOKS": {"billing": "whsec_cmVhbC1iaWxsaW5nLXNlY3JldA=="},
    "SECRET_KEY": "a-real-session-key",
    "SHOP_STAFF_PASSWORD": "a-real-password",
}


NO_SECRETS = (
    "No callback secret is set, so every platform is off and its routes answer 404. Set "
    "the real ones (e.g. FLASK_ORDERHOOKS_GATEWAY_KEY in the environment), or "
    "SHOP_DEMO_SECRETS=true for the public demo ones."
)
ALL_DEMO = (
    "DEMO-ONLY secrets in use (ORDERHOOKS_IGV_SECRET, ORDERHOOKS_GATEWAY_KEY, "
    "ORDERHOOKS_SUD_APPS, ORDERHOOKS_STANDARD_WEBHOOKS): anyone can sign these "
    "callbacks. Set real ones before going live."
)


def post(client: FlaskClient, callback: SignedCallback) -> TestResponse:
    return client.post(callback.url(), data=callback.body, headers=callback.headers)


def shop_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "example_app"]


def test_defaults_sqlite_in_the_instance_folder_and_no_secrets(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    instance = tmp_path / "instance"
    with caplog.at_level(logging.WARNING, logger="example_app"):
        app = create_app(instance_path=instance)
    try:
        assert app.config["SQLALCHEMY_DATABASE_URI"] == f"sqlite:///{instance / 'shop.sqlite3'}"
        assert (instance / "shop.sqlite3").is_file()
        # A copy of the shop holds no secret anyone else knows: the public
        # demo ones are not there unless asked for, and every platform is off.
        for key in DEMO_SECRETS:
            assert app.config[key] is None
        assert shop_messages(caplog) == [NO_SECRETS]
        client = app.test_client()
        with app.app_context():
            demo_signed = build("collect", secret="merchant-key", mch_id=10001)
        assert post(client, demo_signed).status_code == 404
        # No session key or staff password in the source: the staff side is off.
        assert not app.secret_key
        assert app.config["ORDERHOOKS_CONSOLE_URL"] is None
        assert [r.getMessage() for r in caplog.records if r.name == "example_app.staff"] == [
            STAFF_OFF
        ]
    finally:
        with app.app_context():
            db.engine.dispose()


@pytest.mark.parametrize("through", ["config", "environment"])
def test_the_demo_secrets_are_used_when_asked_for(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    through: str,
) -> None:
    config: dict[str, Any] = {}
    if through == "config":
        config = dict(DEMO_ON)
    else:
        monkeypatch.setenv("FLASK_SHOP_DEMO_SECRETS", "true")
    with caplog.at_level(logging.WARNING, logger="example_app"):
        app = create_app(config, instance_path=tmp_path / "instance")
    try:
        for key, value in DEMO_SECRETS.items():
            assert app.config[key] == value
            # A copy: the module's mappings are not the app's.
            assert app.config[key] is not value or isinstance(value, str)
        assert shop_messages(caplog) == [ALL_DEMO]
        client = app.test_client()
        with app.app_context():
            demo_signed = build("collect", secret="merchant-key", mch_id=10001)
        accepted = post(client, demo_signed)
        assert (accepted.status_code, accepted.data) == (200, b"success")
    finally:
        with app.app_context():
            db.engine.dispose()


@pytest.mark.parametrize("value", ["False", "yes", 1, None])
def test_a_demo_switch_that_is_not_true_or_false_is_refused(tmp_path: Path, value: object) -> None:
    with pytest.raises(ValueError, match="SHOP_DEMO_SECRETS must be true or false"):
        create_app({"SHOP_DEMO_SECRETS": value}, instance_path=tmp_path / "instance")


def test_a_false_demo_switch_from_the_environment_keeps_the_demo_secrets_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLASK_SHOP_DEMO_SECRETS", "false")
    app = create_app({"TESTING": True}, instance_path=tmp_path / "instance")
    with app.app_context():
        db.engine.dispose()

    assert app.config["SHOP_DEMO_SECRETS"] is False
    assert app.config["ORDERHOOKS_GATEWAY_KEY"] is None


def test_environment_and_config_secrets_win_whole_over_the_demo_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("FLASK_ORDERHOOKS_IGV_SECRET", '"from-the-environment-000000000000"')
    monkeypatch.setenv("FLASK_ORDERHOOKS_GATEWAY_KEY", '{"20002": "real-merchant-key"}')
    monkeypatch.setenv("FLASK_ORDERHOOKS_SUD_APPS__42", "real-app-secret")
    config = {"ORDERHOOKS_IGV_SECRET": "from-the-config-0000000000000000", **DEMO_ON, **REAL_REST}
    with caplog.at_level(logging.WARNING, logger="example_app"):
        app = create_app(config, instance_path=tmp_path / "instance")
    try:
        assert app.config["ORDERHOOKS_IGV_SECRET"] == "from-the-config-0000000000000000"
        assert app.config["ORDERHOOKS_GATEWAY_KEY"] == {"20002": "real-merchant-key"}
        # A nested key makes the mapping on its own: the demo app is not
        # merged into it, so its public secret signs nothing.
        assert app.config["ORDERHOOKS_SUD_APPS"] == {"42": "real-app-secret"}
        assert DEMO_SECRETS["ORDERHOOKS_SUD_APPS"] == {"1461564080052506636": "app-secret"}
        assert shop_messages(caplog) == []
        client = app.test_client()
        with app.app_context():
            good = build("collect", app=app, mch_id=20002)
            demo_gateway = build("collect", secret="merchant-key", mch_id=10001)
            demo_sud = build("sud", app_id="1461564080052506636", secret="app-secret")
            real_sud = build("sud", app=app, app_id="42")
        assert post(client, good).data == b"success"
        refused = post(client, demo_gateway)
        assert (refused.status_code, refused.data) == (401, b"fail")
        assert post(client, demo_sud).status_code == 401
        assert post(client, real_sud).status_code == 200
    finally:
        with app.app_context():
            db.engine.dispose()


@pytest.mark.parametrize(
    ("igv_secret", "warnings"),
    [
        (["aBcDeFgHiJkLmNoPqRsTuVwXyZ012345", "a-real-secret-rotated-in-00000000"], 1),
        ("a-real-secret-00000000000000000000", 0),
    ],
)
def test_the_demo_secret_warning_sees_a_rotation_list(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, igv_secret: object, warnings: int
) -> None:
    config = {
        "ORDERHOOKS_IGV_SECRET": igv_secret,
        "ORDERHOOKS_GATEWAY_KEY": {"10001": "a-real-merchant-key"},
        "ORDERHOOKS_SUD_APPS": {"1461564080052506636": ["app-secret-2"]},
        **REAL_REST,
    }
    with caplog.at_level(logging.WARNING, logger="example_app"):
        app = create_app(config, instance_path=tmp_path / "instance")
    with app.app_context():
        db.engine.dispose()

    assert [r.getMessage() for r in caplog.records if r.name == "example_app"] == [
        "DEMO-ONLY secrets in use (ORDERHOOKS_IGV_SECRET): anyone can sign these callbacks. "
        "Set real ones before going live."
    ][:warnings]


# -- the staff side's configuration ------------------------------------------------

STAFF_OFF = (
    "SHOP_STAFF_PASSWORD is not set: the staff login, the staff page and the operator "
    "console are off. Set it (e.g. FLASK_SHOP_STAFF_PASSWORD in the environment) to "
    "turn them on."
)
RANDOM_SESSION_KEY = (
    "SECRET_KEY is not set: using a random key for this process, so staff sessions end "
    "when the shop restarts (and are not shared between worker processes). Set it "
    "(e.g. FLASK_SECRET_KEY) to keep them."
)


@pytest.fixture
def make_shop(tmp_path: Path) -> Iterator[Callable[..., Flask]]:
    """``create_app`` on SQLite with ``config``, each in a folder of its own."""
    made: list[Flask] = []

    def factory(**config: Any) -> Flask:
        made.append(
            create_app({"TESTING": True, **config}, instance_path=tmp_path / f"instance{len(made)}")
        )
        return made[-1]

    yield factory
    for app in made:
        with app.app_context():
            db.engine.dispose()


def staff_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "example_app.staff"]


@pytest.mark.parametrize("password", [None, ""])
def test_without_a_staff_password_the_staff_side_is_off(
    make_shop: Callable[..., Flask],
    caplog: pytest.LogCaptureFixture,
    password: str | None,
) -> None:
    with caplog.at_level(logging.WARNING, logger="example_app"):
        # Even asked for: the console's only way in is the staff login.
        app = make_shop(SHOP_STAFF_PASSWORD=password, ORDERHOOKS_CONSOLE_URL="/console")
    client = app.test_client()

    assert staff_messages(caplog) == [STAFF_OFF]
    for url in ("/login", "/staff/", "/console/", "/orderhooks/console/"):
        assert client.get(url).status_code == 404
    assert client.post("/login", data={"password": ""}).status_code == 404
    home = client.get("/")
    assert home.status_code == 200
    assert "staff" not in home.get_data(as_text=True).lower()


def test_a_staff_password_from_the_environment_turns_the_staff_side_on(
    make_shop: Callable[..., Flask],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("FLASK_SHOP_STAFF_PASSWORD", "from-the-environment")
    monkeypatch.setenv("FLASK_SECRET_KEY", "a-session-key-from-the-environment")
    with caplog.at_level(logging.WARNING, logger="example_app"):
        app = make_shop()
    client = app.test_client()

    assert staff_messages(caplog) == []
    assert app.secret_key == "a-session-key-from-the-environment"
    assert log_in(client, password="from-the-environment").status_code == 302
    assert client.get("/orderhooks/console/").status_code == 200


def test_without_a_secret_key_each_process_makes_its_own(
    make_shop: Callable[..., Flask], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="example_app"):
        first = make_shop(SHOP_STAFF_PASSWORD=STAFF_PASSWORD)
        restarted = make_shop(SHOP_STAFF_PASSWORD=STAFF_PASSWORD)
    client = first.test_client()
    assert log_in(client).status_code == 302

    assert staff_messages(caplog) == [RANDOM_SESSION_KEY, RANDOM_SESSION_KEY]
    assert isinstance(first.secret_key, str) and len(first.secret_key) >= 32
    assert first.secret_key != restarted.secret_key
    assert client.get("/staff/").status_code == 200
    # The session cookie of the first process is worth nothing to the next one.
    cookie = client.get_cookie("session")
    assert cookie is not None
    after_restart = restarted.test_client()
    after_restart.set_cookie("session", cookie.value)
    assert after_restart.get("/staff/").status_code == 302


@pytest.mark.parametrize("key", ["DEMO-ONLY-console-session-key", "a-test-session-key"])
def test_a_session_signed_with_another_key_is_refused(app: Flask, key: str) -> None:
    """The old example's public key (and any other but the shop's) signs no
    staff session: no console, no forced replay."""
    other = Flask("attacker")
    other.secret_key = key + "-not-the-shops" if key == app.secret_key else key
    serializer = SecureCookieSessionInterface().get_signing_serializer(other)
    assert serializer is not None
    client = app.test_client()
    client.set_cookie("session", serializer.dumps({"staff": True}))

    assert client.get("/orderhooks/console/").status_code == 302
    assert client.get("/staff/").status_code == 302


def test_a_staff_password_made_of_digits_must_be_quoted(
    make_shop: Callable[..., Flask], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLASK_SHOP_STAFF_PASSWORD", "20260504")

    with pytest.raises(ValueError, match="must be a string") as raised:
        make_shop()
    assert "20260504" not in str(raised.value)


# -- the demo ---------------------------------------------------------------------


def test_demo_runs_every_callback_with_the_expected_outcome(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert demo.main() == 0

    out = capsys.readouterr().out
    assert out.count("(as expected)") == 8
    assert "UNEXPECTED" not in out
    for line in (
        "    answer  200 OK",
        "    shop    payment C1001 for SHOP-1001: credited",
        "    shop    payment C1002 for SHOP-1002: amount mismatch: paid 45.00 of 50.00; "
        "not credited",
        "    result  dispatched: game_order_changed x2  (as expected)",
        "    result  duplicate: answered as done, the receivers did not run again  (as expected)",
        "    answer  401 fail",
        "    result  refused: nothing stored, no receiver ran  (as expected)",
        "All 8 callbacks had the expected outcome.",
        # The demo needs no staff login: without a password it stays off.
        "    warning " + STAFF_OFF,
        "  gateway   collect        C1001:60             done    1",
        "  C1002  SHOP-1002   50.00    45.00   no        amount mismatch: paid 45.00 of 50.00; "
        "not credited",
    ):
        assert line + "\n" in out
    # The extension's own warning about the forgery (its wording is the extension's).
    assert re.search(r"^    warning gateway collect .*refused 401 .*does not match\.$", out, re.M)
    assert out.endswith("\nServer stopped. OK.\n")
    assert "C1003" not in out.split("All 8 callbacks")[1]


def test_demo_exits_non_zero_on_an_unexpected_outcome(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_steps = demo.steps

    def forged_expected_to_pass(app: Flask) -> list[demo.Step]:
        *others, forged = real_steps(app)
        return [*others, dataclasses.replace(forged, status=200, outcome=demo.DISPATCHED)]

    monkeypatch.setattr(demo, "steps", forged_expected_to_pass)

    assert demo.main() == 1

    out = capsys.readouterr().out
    assert (
        "    result  refused: nothing stored, no receiver ran  "
        "UNEXPECTED: expected 200 dispatched\n"
    ) in out
    assert "1 of 8 callbacks did NOT have the expected outcome.\n" in out
    assert out.endswith("\nServer stopped. FAILED.\n")


def test_demo_ignores_a_database_url_in_the_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "production.sqlite3"
    monkeypatch.setenv("FLASK_SQLALCHEMY_DATABASE_URI", f"sqlite:///{elsewhere}")

    assert demo.main() == 0
    assert not os.path.exists(elsewhere)
    capsys.readouterr()


def test_a_dead_delivery_raises_the_shops_alert(
    database_uri: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(
        {
            "TESTING": True,
            "SQLALCHEMY_DATABASE_URI": database_uri,
            "ORDERHOOKS_RETRY_DELAYS": [],
            **DEMO_ON,
        },
        instance_path=tmp_path / "instance",
    )

    def outage(_sender: Flask, **_kw: Any) -> None:
        raise ConnectionError("the ledger service is down")

    payout_finished.connect(outage, app, weak=False)
    try:
        with app.app_context():
            callback = build("payout", app=app, id="W9")
        with caplog.at_level(logging.ERROR, "example_app"):
            response = app.test_client().post(
                callback.url(), data=callback.body, headers=callback.headers
            )
    finally:
        payout_finished.disconnect(outage, app)
        with app.app_context():
            stored = get_extension(app).state(app).store.list()
            db.drop_all()
            db.engine.dispose()
    assert response.status_code == 500
    assert [(d.key, d.status) for d in stored] == [("W9:60", "dead")]
    assert (
        "ALERT: gateway payout W9:60 is dead after 1 attempts "
        "(ConnectionError: the ledger service is down); fix the cause, then "
        "`flask orderhooks replay W9:60`" in caplog.text
    )
