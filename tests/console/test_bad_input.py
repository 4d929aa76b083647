"""Bad input is the client's error: every value the console cannot use is
answered with 400, a message naming the value and why, and a WARNING line,
before the store binds it; the same on every backend (PostgreSQL refuses NUL
in text, no driver encodes a lone surrogate)."""

from __future__ import annotations

import base64
import html
import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa

from flask_orderhooks.console.queries import Cursor, unbindable
from flask_orderhooks.testing import SignedCallback, gateway_collect
from tests.console.conftest import CONSOLE, Console

# The 400 answers of the list page, in its error banners.
_ERROR = re.compile(r'<p class="oc-banner oc-banner-failed oc-error">([^<]*)</p>')
_REFUSED = re.compile(r'<p class="oc-banner oc-banner-failed" id="oc-refused">([^<]*)</p>')


def _cursor(fields: object) -> str:
    """What :meth:`Cursor.encode` would make of ``fields`` (any JSON)."""
    return _base64(json.dumps(fields).encode())


def _base64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def _refusals(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [
        (r.levelno, r.getMessage())
        for r in caplog.records
        if r.name == "flask_orderhooks" and "(400)" in r.getMessage()
    ]


@contextmanager
def _statements(console: Console) -> Iterator[list[str]]:
    """The SQL statements the store runs inside the block."""
    seen: list[str] = []

    def record(*args: Any) -> None:
        seen.append(str(args[2]))

    with console.app.app_context():
        engine = console.hooks.store.engine
    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)


DAMAGED = "The page link is damaged ({}); start again from the newest."

BAD_LIST_QUERIES = [
    pytest.param(
        {"from": "0001-01-01T00:00:00+05:00"},
        "The from time '0001-01-01T00:00:00+05:00' is out of range: in UTC it falls "
        "before the year 1 or after 9999.",
        id="from-before-year-1-in-utc",
    ),
    pytest.param(
        {"until": "9999-12-31T23:59:59-05:00"},
        "The until time '9999-12-31T23:59:59-05:00' is out of range: in UTC it falls "
        "before the year 1 or after 9999.",
        id="until-after-9999-in-utc",
    ),
    pytest.param(
        {"after": _cursor(["0001-01-01T00:00:00+05:00", "igv", "order-status", "k"])},
        DAMAGED.format("its time is out of range"),
        id="cursor-time-out-of-range",
    ),
    pytest.param(
        {"after": _cursor(["yesterday", "igv", "order-status", "k"])},
        DAMAGED.format("its time is not a time"),
        id="cursor-time-not-a-time",
    ),
    pytest.param(
        {"after": _cursor(["2026-05-04T12:00:00+00:00", "\ud800", "order-status", "k"])},
        DAMAGED.format("its platform holds a lone surrogate (U+D800)"),
        id="cursor-lone-surrogate",
    ),
    pytest.param(
        {"after": _cursor(["2026-05-04T12:00:00+00:00", "igv", "order-status", "a\x00b"])},
        DAMAGED.format("its key holds a NUL character (U+0000)"),
        id="cursor-nul",
    ),
    pytest.param(
        {"after": _base64(b"[" * 1500)},
        DAMAGED.format("it is nested too deeply to be a page cursor"),
        id="cursor-nested-1500-deep",
    ),
    pytest.param(
        {"after": _cursor({"2026-05-04T12:00:00": 1, "igv": 2, "order-status": 3, "k": 4})},
        DAMAGED.format("it is not a page cursor"),
        id="cursor-an-object",
    ),
    pytest.param(
        {"after": _cursor(["2026-05-04T12:00:00+00:00", "igv", "order-status"])},
        DAMAGED.format("it is not a page cursor"),
        id="cursor-three-fields",
    ),
    pytest.param(
        {"q": "SHOP\x00-42"},
        "The search 'SHOP\\x00-42' holds a NUL character (U+0000), which no delivery key "
        "or order id holds.",
        id="search-nul",
    ),
    # A long value is quoted cut short, in the page and in the log line, like
    # every unverified value the extension quotes (logtext.quoted).
    pytest.param(
        {"status": "x" * 10_000},
        f"Unknown status {'x' * 80!r}.",
        id="status-10k-cut-to-80",
    ),
    pytest.param(
        {"from": "9" * 10_000},
        f"The from time {'9' * 80!r} is not a time such as 2026-05-04T10:00.",
        id="from-10k-cut-to-80",
    ),
    pytest.param(
        {"q": "\u202e" + "y" * 5_000 + "\x00"},
        f"The search {chr(0x202E) + 'y' * 79!r} holds a NUL character (U+0000), which no "
        "delivery key or order id holds.",
        id="search-5k-cut-to-80",
    ),
]


@pytest.mark.parametrize(("query", "message"), BAD_LIST_QUERIES)
def test_bad_list_inputs_are_400_with_a_reason_and_a_log_line(
    console: Console, caplog: pytest.LogCaptureFixture, query: dict[str, str], message: str
) -> None:
    assert console.send(gateway_collect(app=console.app, trans_id="SHOP-42")) == 200
    with caplog.at_level(logging.WARNING, logger="flask_orderhooks"):
        response = console.client().get(CONSOLE + "/", query_string=query)
    page = response.get_data(as_text=True)
    assert response.status_code == 400
    assert [html.unescape(e) for e in _ERROR.findall(page)] == [message]
    assert 'class="oc-row"' not in page
    assert "The delivery store is unavailable" not in page
    assert _refusals(caplog) == [
        (logging.WARNING, f"OrderHooks console: refused {CONSOLE}/ (400): {message}")
    ]


def test_times_at_the_ends_of_the_calendar_are_fine(console: Console) -> None:
    """The widest range in UTC still binds on every backend."""
    cb = gateway_collect(app=console.app)
    assert console.send(cb) == 200
    response = console.client().get(
        CONSOLE + "/",
        query_string={"from": "0001-01-01T00:00:00Z", "until": "9999-12-31T23:59:59.999999Z"},
    )
    assert response.status_code == 200
    assert f'data-key="{cb.key}"' in response.get_data(as_text=True)


@pytest.fixture
def stored(console: Console) -> SignedCallback:
    cb = gateway_collect(app=console.app, id="C-1")
    assert console.send(cb, fail=True) == 500
    return cb


def _refused_before_any_query(
    console: Console,
    caplog: pytest.LogCaptureFixture,
    method: str,
    path: str,
    name: str,
    problem: str,
    **kwargs: Any,
) -> None:
    client = console.client()
    token = None
    if method == "POST":
        # A good token: the refusal is the value's, not the CSRF check's.
        page = client.get(
            CONSOLE + "/delivery/gateway/collect", query_string={"key": "C-1:60"}
        ).get_data(as_text=True)
        match = re.search(r'name="csrf_token" value="([^"]+)"', page)
        assert match is not None
        token = html.unescape(match[1])
        kwargs["data"] = {**kwargs["data"], "csrf_token": token}
    message = (
        f"The {name} in this request holds {problem}, which no delivery's {name} may "
        "hold; nothing was looked up or changed. Check the link."
    )
    with caplog.at_level(logging.WARNING, logger="flask_orderhooks"), _statements(console) as sql:
        response = client.open(CONSOLE + path, method=method, **kwargs)
    page = response.get_data(as_text=True)
    assert response.status_code == 400
    assert [html.unescape(m) for m in _REFUSED.findall(page)] == [message]
    assert sql == []
    # The path as logged: its NUL written out, never sent raw into the log.
    logged_path = CONSOLE + path.replace("%00", "\\u0000")
    assert _refusals(caplog) == [
        (logging.WARNING, f"OrderHooks console: refused {logged_path} (400): {message}")
    ]


@pytest.mark.parametrize(
    ("path", "query", "name"),
    [
        ("/delivery/gateway/collect", {"key": "C-1:60\x00"}, "key"),
        ("/delivery/gate%00way/collect", {"key": "C-1:60"}, "platform"),
        ("/delivery/gateway/col%00lect", {"key": "C-1:60"}, "callback"),
    ],
)
def test_detail_page_refuses_nul_before_any_query(
    console: Console,
    stored: SignedCallback,
    caplog: pytest.LogCaptureFixture,
    path: str,
    query: dict[str, str],
    name: str,
) -> None:
    _refused_before_any_query(
        console, caplog, "GET", path, name, "a NUL character (U+0000)", query_string=query
    )


@pytest.mark.parametrize("action", ["replay", "retry"])
def test_buttons_refuse_nul_before_any_query(
    console: Console, stored: SignedCallback, caplog: pytest.LogCaptureFixture, action: str
) -> None:
    _refused_before_any_query(
        console,
        caplog,
        "POST",
        f"/delivery/gateway/collect/{action}",
        "key",
        "a NUL character (U+0000)",
        data={"key": "C-1:60\x00"},
    )
    assert console.row(stored).attempts == 1


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("plain", None),
        ("王小明 \u202e \ufffe \U0010ffff \x7f", None),
        ("a\x00b", "a NUL character (U+0000)"),
        ("a\udfffb", "a lone surrogate (U+DFFF)"),
    ],
)
def test_unbindable(text: str, problem: str | None) -> None:
    assert unbindable(text) == problem


def test_a_cursor_keeps_every_bindable_character() -> None:
    cursor = Cursor(
        datetime(2026, 5, 4, 10, tzinfo=UTC), "gateway", "collect", "C1\u202e99:60 \U0010ffff"
    )
    assert Cursor.decode(cursor.encode()) == cursor


def test_a_cursor_time_is_read_as_utc() -> None:
    cursor = Cursor.decode(_cursor(["2026-05-04T12:00:00+02:00", "igv", "order-status", "k"]))
    assert cursor.created_at.isoformat() == "2026-05-04T10:00:00+00:00"
