"""The list, its filters, search and pages, the chart and the detail page,
on every store backend, with deliveries stored through the real routes."""

from __future__ import annotations

import html
import logging
import re
import unicodedata
from datetime import UTC, datetime

import pytest

from flask_orderhooks.provider import Delivery
from flask_orderhooks.testing import (
    SignedCallback,
    gateway_collect,
    gateway_payout,
    igv_order_status,
    sud_order,
    sud_order_batch_changed,
    sud_order_changed,
)
from tests.console.conftest import CONSOLE, NOW, Console, ConsoleFactory

HOUR = 3600.0


def _keys(page: str) -> list[str]:
    """The delivery keys of a list page, top to bottom."""
    return [html.unescape(k) for k in re.findall(r'<tr class="oc-row" data-key="([^"]*)"', page)]


def _list(console: Console, **query: str) -> tuple[int, str]:
    response = console.client().get(CONSOLE + "/", query_string=query)
    return response.status_code, response.get_data(as_text=True)


def _at(console: Console, when: float, callback: SignedCallback, *, fail: bool = False) -> None:
    console.clock.now = when
    expected = 500 if fail else 200
    assert console.send(callback, fail=fail) == expected


@pytest.fixture
def mixed(console: Console) -> tuple[Console, dict[str, SignedCallback]]:
    """Deliveries of every platform over the last hours, one failed."""
    app = console.app
    sent = {
        "igv": igv_order_status(app=app, order_id=1111, timestamp_ms=int((NOW - 5 * HOUR) * 1000)),
        "collect": gateway_collect(app=app, id="C-1", trans_id="SHOP-42"),
        "payout": gateway_payout(app=app, id="P-1", trans_id="WDL-7"),
        "sud": sud_order_changed(
            app=app,
            order_id="SUD-9",
            out_order_id="OUT-9",
            timestamp_ms=int((NOW - 2 * HOUR) * 1000),
        ),
    }
    _at(console, NOW - 5 * HOUR, sent["igv"])
    _at(console, NOW - 3 * HOUR, sent["collect"], fail=True)
    _at(console, NOW - 2 * HOUR, sent["sud"])
    _at(console, NOW - 60, sent["payout"])
    console.clock.now = NOW
    return console, sent


def test_list_is_newest_first(mixed: tuple[Console, dict[str, SignedCallback]]) -> None:
    console, sent = mixed
    status, page = _list(console)
    assert status == 200
    assert _keys(page) == [sent[k].key for k in ("payout", "sud", "collect", "igv")]
    assert "2026-05-04T12:29:00Z" in page
    assert "RuntimeError: receiver exploded on purpose" in page


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"status": "failed"}, ["collect"]),
        ({"status": "done"}, ["payout", "sud", "igv"]),
        ({"status": "dead"}, []),
        ({"provider": "gateway"}, ["payout", "collect"]),
        ({"callback": "payout"}, ["payout"]),
        ({"provider": "igv", "callback": "collect"}, []),
        ({"from": "2026-05-04T09:00"}, ["payout", "sud", "collect"]),
        ({"until": "2026-05-04T09:30:01"}, ["collect", "igv"]),
        ({"until": "2026-05-04T09:30:00"}, ["igv"]),  # until is exclusive
        ({"from": "2026-05-04T09:00", "until": "2026-05-04T11:00"}, ["sud", "collect"]),
        ({"from": "2026-05-04T10:30:00Z"}, ["payout", "sud"]),
    ],
)
def test_filters(
    mixed: tuple[Console, dict[str, SignedCallback]],
    query: dict[str, str],
    expected: list[str],
) -> None:
    console, sent = mixed
    status, page = _list(console, **query)
    assert status == 200
    assert _keys(page) == [sent[k].key for k in expected]
    if not expected:
        assert "No deliveries match these filters." in page


@pytest.mark.parametrize(
    ("query", "error"),
    [
        ({"status": "lost"}, "Unknown status &#39;lost&#39;."),
        ({"from": "yesterday"}, "The from time &#39;yesterday&#39; is not a time"),
        ({"after": "!!"}, "The page link is damaged"),
    ],
)
def test_bad_filters_are_400(
    mixed: tuple[Console, dict[str, SignedCallback]], query: dict[str, str], error: str
) -> None:
    console, _sent = mixed
    status, page = _list(console, **query)
    assert status == 400
    assert error in page
    assert _keys(page) == []


@pytest.mark.parametrize(
    ("search", "expected"),
    [
        ("SHOP-42", ["collect"]),  # the gateway's trans_id
        ("WDL-7", ["payout"]),
        ("1111", ["igv"]),  # iGV's orderId, a number in the body
        ("OUT-9", ["sud"]),  # SUD's out_order_id
        (" SHOP-42 ", ["collect"]),
        ("shop-42", []),  # exact, whatever the collation
        ("SHOP", []),  # no prefix or substring scans
    ],
)
def test_search_by_order_id(
    mixed: tuple[Console, dict[str, SignedCallback]], search: str, expected: list[str]
) -> None:
    console, sent = mixed
    status, page = _list(console, q=search)
    assert status == 200
    assert _keys(page) == [sent[k].key for k in expected]


def test_search_by_key(mixed: tuple[Console, dict[str, SignedCallback]]) -> None:
    console, sent = mixed
    for name, cb in sent.items():
        status, page = _list(console, q=cb.key)
        assert (status, _keys(page)) == (200, [cb.key]), name
    # With the other filters: a key of another platform is not found.
    _status, page = _list(console, q=sent["igv"].key, provider="gateway")
    assert _keys(page) == []
    _status, page = _list(console, q="x" * 500)
    assert _keys(page) == []


def test_search_finds_a_batch_by_its_first_order(console: Console) -> None:
    batch = sud_order_batch_changed(
        app=console.app,
        orders=[sud_order(order_id="A1", out_order_id="FIRST"), sud_order(order_id="A2")],
    )
    assert console.send(batch) == 200
    _status, page = _list(console, q="FIRST")
    assert _keys(page) == [batch.key]


def _pages(console: Console, url: str) -> list[list[str]]:
    """Every page's keys, following the "older" links from ``url``."""
    client = console.client()
    pages: list[list[str]] = []
    next_url: str | None = url
    while next_url is not None:
        page = client.get(next_url).get_data(as_text=True)
        pages.append(_keys(page))
        if len(pages) > 1:
            assert 'id="oc-newest"' in page
        match = re.search(r'<a href="([^"]*)" id="oc-older"', page)
        next_url = html.unescape(match[1]) if match else None
    return pages


def test_pages(make_console: ConsoleFactory) -> None:
    console = make_console(ORDERHOOKS_CONSOLE_PAGE_SIZE=2)
    callbacks = [igv_order_status(app=console.app, order_id=n) for n in range(5)]
    for n, cb in enumerate(callbacks):
        console.clock.now = NOW - 10 + n
        assert console.send(cb) == 200
    keys = [cb.key for cb in reversed(callbacks)]
    assert _pages(console, CONSOLE + "/") == [keys[0:2], keys[2:4], keys[4:5]]


def test_pages_break_ties_in_one_microsecond(make_console: ConsoleFactory) -> None:
    """Seven deliveries, three a page, stored at the same instant by threes
    (the clock is frozen): the cursor's (provider, callback, key) tie-break
    decides, and no row is lost or shown twice. The filters ride along."""
    console = make_console(ORDERHOOKS_CONSOLE_PAGE_SIZE=3)
    callbacks = [igv_order_status(app=console.app, order_id=n) for n in range(7)]
    for n, cb in enumerate(callbacks):
        console.clock.now = NOW - (n // 3)
        assert console.send(cb) == 200
    assert console.send(gateway_collect(app=console.app)) == 200
    pages = _pages(console, CONSOLE + "/?provider=igv")
    assert [len(p) for p in pages] == [3, 3, 1]
    everything = [k for keys in pages for k in keys]
    assert sorted(everything) == sorted(cb.key for cb in callbacks)
    # Newest first; within one instant, keys descending.
    by_second = [sorted((cb.key for cb in callbacks[i : i + 3]), reverse=True) for i in (0, 3, 6)]
    assert everything == [k for group in by_second for k in group]


def test_chart_counts_the_last_24_hours(console: Console) -> None:
    app = console.app
    # Two at 12:xx (now's hour), one failed at 10:xx, one 30 hours ago (out).
    plan = [
        (NOW - 30 * HOUR, False),
        (NOW - 2 * HOUR, True),
        (NOW - 60, False),
        (NOW, False),
    ]
    for when, fail in plan:
        console.clock.now = when
        cb = gateway_collect(app=app, trans_id=f"T{when}")
        assert console.send(cb, fail=fail) == (500 if fail else 200)
    console.clock.now = NOW
    _status, page = _list(console)
    chart = page[page.index('<figure class="oc-chart"') : page.index("</figure>")]
    bars = re.findall(r"<title>([^<]*)</title>", chart)
    assert len(bars) == 24
    assert bars[0] == "2026-05-03 13:00Z: 0 deliveries"
    assert bars[21] == "2026-05-04 10:00Z: 1 deliveries (1 failed)"
    assert bars[23] == "2026-05-04 12:00Z: 2 deliveries (2 done)"
    segments = re.findall(r'data-status="(\w+)" data-count="(\d+)"', chart)
    assert segments == [("failed", "1"), ("done", "2")]
    assert "<b>2</b>" in chart
    assert "(3 in all)" in chart


def test_chart_hours_are_utc_hours(console: Console) -> None:
    # 10:59:59.999 and 11:00:00.000 fall in two bars, on every backend.
    edge = datetime(2026, 5, 4, 11, 0, tzinfo=UTC).timestamp()
    for when in (edge - 0.001, edge):
        console.clock.now = when
        assert console.send(gateway_collect(app=console.app, trans_id=f"E{when}")) == 200
    console.clock.now = NOW
    _status, page = _list(console)
    chart = page[page.index('<figure class="oc-chart"') : page.index("</figure>")]
    bars = re.findall(r"<title>([^<]*)</title>", chart)
    assert bars[21] == "2026-05-04 10:00Z: 1 deliveries (1 done)"
    assert bars[22] == "2026-05-04 11:00Z: 1 deliveries (1 done)"


def test_detail_page(console: Console) -> None:
    cb = igv_order_status(app=console.app, order_id=4242)
    console.clock.now = NOW - 120
    assert console.send(cb, fail=True) == 500
    console.clock.now = NOW - 30
    assert console.send(cb, fail=True) == 500
    console.clock.now = NOW
    response = console.client().get(
        CONSOLE + "/delivery/igv/order-status", query_string={"key": cb.key}
    )
    assert response.status_code == 200
    page = response.get_data(as_text=True)
    assert '<span class="oc-status oc-status-failed" id="oc-status-value">failed</span>' in page
    assert '<dd id="oc-attempts">2</dd>' in page
    # Attempt 2 failed at 12:29:30; the schedule's second delay is 300 s.
    assert '<dd id="oc-next">2026-05-04T12:34:30Z</dd>' in page
    failures = re.findall(
        r'<tr><td class="oc-num">(\d+)</td><td>([^<]*)</td><td class="oc-error-text">([^<]*)</td>',
        page,
    )
    assert failures == [
        ("1", "2026-05-04T12:28:00Z", "RuntimeError: receiver exploded on purpose"),
        ("2", "2026-05-04T12:29:30Z", "RuntimeError: receiver exploded on purpose"),
    ]
    body = html.unescape(re.search(r'<pre class="oc-body" id="oc-body">(.*?)</pre>', page, re.S)[1])  # type: ignore[index]
    assert body.splitlines()[:3] == [
        "{",
        '  "createdAt": "2025-12-17T13:44:16",',
        '  "orderId": 4242,',
    ]
    assert '<th>X-Request-Id</th><td class="oc-key">' + cb.key + "</td>" in page
    assert "<th>X-Signature</th>" in page
    assert '<dd class="oc-key">4242</dd>' in page
    assert 'id="oc-replay"' in page
    assert 'id="oc-retry"' in page
    assert 'id="oc-force"' not in page


def test_detail_of_done_offers_only_force(console: Console) -> None:
    cb = gateway_collect(app=console.app)
    assert console.send(cb) == 200
    page = (
        console.client()
        .get(CONSOLE + "/delivery/gateway/collect", query_string={"key": cb.key})
        .get_data(as_text=True)
    )
    assert 'id="oc-force"' in page
    assert 'name="force" value="yes" id="oc-force-confirm" required' in page
    assert 'id="oc-replay"' not in page
    assert 'id="oc-retry"' not in page
    assert "None: this platform signs the body itself." in page


@pytest.mark.parametrize(
    "query",
    [{}, {"key": ""}, {"key": "no-such-key"}, {"key": "k" * 300}],
)
def test_unknown_delivery_is_404(console: Console, query: dict[str, str]) -> None:
    response = console.client().get(CONSOLE + "/delivery/igv/order-status", query_string=query)
    assert response.status_code == 404


def test_hostile_values_stay_text(console: Console) -> None:
    payload = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'
    cb = igv_order_status(app=console.app, extra={"note": payload})
    collect = gateway_collect(app=console.app, trans_id=payload, id="C<u>1</u>")
    assert console.send(cb) == 200
    assert console.send(collect, fail=True) == 500
    client = console.client()
    pages = [
        client.get(CONSOLE + "/").get_data(as_text=True),
        client.get(CONSOLE + "/", query_string={"q": payload}).get_data(as_text=True),
        client.get(CONSOLE + "/delivery/igv/order-status", query_string={"key": cb.key}).get_data(
            as_text=True
        ),
        client.get(
            CONSOLE + "/delivery/gateway/collect", query_string={"key": collect.key}
        ).get_data(as_text=True),
    ]
    for page in pages:
        assert "<script" not in page
        assert "<img" not in page
        assert "<u>" not in page
    assert "&lt;script&gt;window.__pwned=2&lt;/script&gt;" in pages[2]
    assert "C&lt;u&gt;1&lt;/u&gt;" in pages[0]
    # The search found the payload as an order id, escaped in the search box too.
    assert _keys(pages[1]) == [collect.key]
    assert 'value="&lt;img src=x onerror=&#34;window.__pwned=1&#34;&gt;' in pages[1]


@pytest.mark.parametrize(
    ("body", "kind", "shown"),
    [
        (b"not json <i>at all</i>", "not JSON: as received", "not json &lt;i&gt;at all&lt;/i&gt;"),
        (
            b"\xff\xfe<bin>\x00",
            "not UTF-8: hex",
            "00000000  ff fe 3c 62 69 6e 3e 00" + " " * 26 + "..&lt;bin&gt;.",
        ),
    ],
)
def test_a_body_that_is_not_json(console: Console, body: bytes, kind: str, shown: str) -> None:
    """The routes store JSON only, but a row is whatever the table holds."""
    with console.app.app_context():
        console.hooks.store.claim(Delivery("igv", "order-status", "odd", body, {}, ()))
    page = (
        console.client()
        .get(CONSOLE + "/delivery/igv/order-status", query_string={"key": "odd"})
        .get_data(as_text=True)
    )
    assert f"({len(body)} bytes, {kind})" in page
    assert f'<pre class="oc-body" id="oc-body">{shown}</pre>' in page
    assert "<i>" not in page


def _shown(page: str, pattern: str) -> list[str]:
    return [html.unescape(m) for m in re.findall(pattern, page)]


def test_hidden_characters_in_keys_and_order_ids_are_shown_as_escapes(
    console: Console,
) -> None:
    """A right-to-left override in a key or an order id is shown as
    ``\\u202e`` on every page it appears on (a literal backslash as ``\\\\``,
    so the two never read alike), while links and forms carry the stored
    value and act on the right row."""
    tricky = gateway_collect(app=console.app, id="C1\u202e99", trans_id="ORDER\u202e-1")
    literal = gateway_collect(app=console.app, id="C1\\u202e99", trans_id="O\\1")
    assert console.send(tricky, fail=True) == 500
    console.clock.now = NOW + 1  # the literal one is listed first
    assert console.send(literal) == 200
    client = console.client()
    listed = client.get(CONSOLE + "/").get_data(as_text=True)
    links = re.findall(r'<td class="oc-key"><a href="([^"]*)">([^<]*)</a></td>', listed)
    assert [(html.unescape(href), html.unescape(text)) for href, text in links] == [
        ("/orderhooks/console/delivery/gateway/collect?key=C1%5Cu202e99:60", "C1\\\\u202e99:60"),
        ("/orderhooks/console/delivery/gateway/collect?key=C1%E2%80%AE99:60", "C1\\u202e99:60"),
    ]
    assert _shown(listed, r'<td class="oc-key">([^<]*)</td>') == ["O\\\\1", "ORDER\\u202e-1"]
    # The stored values themselves stay only where nothing is displayed.
    assert _keys(listed) == [literal.key, tricky.key]
    assert listed.count("\u202e") == 1

    detail = client.get(html.unescape(links[1][0])).get_data(as_text=True)
    assert "<title>gateway collect C1\\u202e99:60 · orderhooks console</title>" in detail
    assert '<span class="oc-key" id="oc-key">C1\\u202e99:60</span>' in detail
    assert '<dt>order id</dt><dd class="oc-key">ORDER\\u202e-1</dd>' in detail
    assert '"trans_id": "ORDER\\u202e-1"' in html.unescape(detail)  # the body's rule
    forms = _shown(detail, r'<input type="hidden" name="key" value="([^"]*)">')
    assert forms == [tricky.key, tricky.key]  # replay and retry
    assert detail.count("\u202e") == 2

    # The replay form's key reaches the stored row.
    token = html.unescape(re.findall(r'name="csrf_token" value="([^"]+)"', detail)[0])
    response = client.post(
        CONSOLE + "/delivery/gateway/collect/replay", data={"key": forms[0], "csrf_token": token}
    )
    assert response.status_code == 303
    assert console.row(tricky).status == "done"


def test_hidden_characters_in_headers_and_errors_are_shown_as_escapes(console: Console) -> None:
    # Header values arrive as latin-1: a soft hyphen (format, invisible) is
    # what one can smuggle; a control character in a key is refused (400).
    cb = igv_order_status(app=console.app, request_id="R-\xadx")

    def refuse(event: object) -> None:
        raise RuntimeError("order \u202e1-REDRO not found")

    console.recorder.hook = refuse
    try:
        assert console.send(cb) == 500
    finally:
        console.recorder.hook = None
    client = console.client()
    listed = client.get(CONSOLE + "/").get_data(as_text=True)
    assert _shown(listed, r'<td class="oc-error-text">([^<]*)</td>') == [
        "RuntimeError: order \\u202e1-REDRO not found"
    ]
    detail = client.get(
        CONSOLE + "/delivery/igv/order-status", query_string={"key": cb.key}
    ).get_data(as_text=True)
    assert '<th>X-Request-Id</th><td class="oc-key">R-\\u00adx</td>' in detail
    assert '<dd class="oc-error-text">RuntimeError: order \\u202e1-REDRO not found</dd>' in detail
    assert "\u202e" not in detail
    assert detail.count("\xad") == 2  # the replay and retry forms' keys


def test_a_text_body_shows_its_hidden_characters_as_marked_escapes(console: Console) -> None:
    """An order id in a body that is not JSON may hold a right-to-left
    override, a zero-width space or a NUL: the page writes each one as a
    marked escape, and no such character reaches the HTML raw."""
    body = "order=C1\u202e99&ref=A\u200b1&x=\x00<b>\r\n\x1b]0;owned\x07".encode()
    with console.app.app_context():
        console.hooks.store.claim(Delivery("igv", "order-status", "odd", body, {}, ()))
    page = (
        console.client()
        .get(CONSOLE + "/delivery/igv/order-status", query_string={"key": "odd"})
        .get_data(as_text=True)
    )
    assert (
        f"({len(body)} bytes, not JSON: as received, but with "
        '<span id="oc-body-escaped">6</span> hidden characters written as marked '
        "escapes such as \\u202e, and each backslash doubled)"
    ) in page
    assert (
        '<pre class="oc-body" id="oc-body">order=C1<span class="oc-escape">\\u202e</span>'
        '99&amp;ref=A<span class="oc-escape">\\u200b</span>1&amp;x='
        '<span class="oc-escape">\\u0000</span>&lt;b&gt;<span class="oc-escape">\\u000d</span>\n'
        '<span class="oc-escape">\\u001b</span>]0;owned<span class="oc-escape">\\u0007</span>'
        "</pre>"
    ) in page
    assert "<b>" not in page
    hidden = [ch for ch in page if ch != "\n" and unicodedata.category(ch).startswith(("C", "Z"))]
    assert [ch for ch in hidden if ch != " "] == []


def test_one_hidden_character_in_a_text_body(console: Console) -> None:
    with console.app.app_context():
        console.hooks.store.claim(Delivery("igv", "order-status", "one", b"C-1\x00", {}, ()))
    page = (
        console.client()
        .get(CONSOLE + "/delivery/igv/order-status", query_string={"key": "one"})
        .get_data(as_text=True)
    )
    assert '<span id="oc-body-escaped">1</span> hidden character written as' in page
    assert '>C-1<span class="oc-escape">\\u0000</span></pre>' in page


@pytest.mark.parametrize(
    ("provider", "callback"),
    [("gateway%20", "collect"), ("gateway", "collect%20"), ("gateway%20%20", "collect%20")],
)
def test_a_platform_or_callback_with_trailing_spaces_is_404_on_every_backend(
    console: Console, provider: str, callback: str
) -> None:
    """MariaDB's utf8mb4_bin pads: 'gateway ' equals 'gateway' there, and the
    page found the gateway row under a platform that is not configured (its
    banner said a replay could not verify it) while the same link was 404 on
    SQLite and PostgreSQL. A delivery is found under its own names only."""
    cb = gateway_collect(app=console.app)
    assert console.send(cb, fail=True) == 500
    client = console.client()
    detail = client.get(CONSOLE + "/delivery/gateway/collect", query_string={"key": cb.key})
    token = html.unescape(
        re.findall(r'name="csrf_token" value="([^"]+)"', detail.get_data(as_text=True))[0]
    )
    url = f"{CONSOLE}/delivery/{provider}/{callback}"
    assert client.get(url, query_string={"key": cb.key}).status_code == 404
    for action in ("replay", "retry"):
        response = client.post(f"{url}/{action}", data={"key": cb.key, "csrf_token": token})
        assert response.status_code == 404
    assert console.row(cb).attempts == 1


def test_hidden_characters_in_a_stored_platform_or_callback_are_shown_as_escapes(
    console: Console, caplog: pytest.LogCaptureFixture
) -> None:
    """The routes store configured names only, but a row is whatever the
    table holds: its platform and callback follow the keys' rule on every
    page, and a newline in one does not forge a log line."""
    with console.app.app_context():
        console.hooks.store.claim(
            Delivery("ig\nv\u202e", "order\u200b-status", "odd", b"{}", {}, ())
        )
    client = console.client()
    listed = client.get(CONSOLE + "/").get_data(as_text=True)
    assert _shown(listed, r"<td>([^<]*)</td>")[:2] == ["ig\\u000av\\u202e", "order\\u200b-status"]
    url = CONSOLE + "/delivery/ig%0Av%E2%80%AE/order%E2%80%8B-status"
    detail = client.get(url, query_string={"key": "odd"}).get_data(as_text=True)
    assert "<title>ig\\u000av\\u202e order\\u200b-status odd · orderhooks console</title>" in detail
    assert "<h1>ig\\u000av\\u202e · order\\u200b-status · " in detail
    assert "The ig\\u000av\\u202e platform is not configured on this app" in detail
    for page in (listed, detail):
        assert "\u202e" not in page
        assert "\u200b" not in page
    # A token from any console page of this session (this row, claimed and
    # never finished, offers no button).
    failed = gateway_collect(app=console.app)
    assert console.send(failed, fail=True) == 500
    other = client.get(CONSOLE + "/delivery/gateway/collect", query_string={"key": failed.key})
    token = html.unescape(
        re.findall(r'name="csrf_token" value="([^"]+)"', other.get_data(as_text=True))[0]
    )
    with caplog.at_level(logging.INFO, logger="flask_orderhooks"):
        response = client.post(url + "/replay", data={"key": "odd", "csrf_token": token})
    assert response.status_code == 303
    lines = [m for m in caplog.messages if m.startswith("OrderHooks console: replay of")]
    assert len(lines) == 1
    assert lines[0].startswith(
        "OrderHooks console: replay of ig\\u000av\\u202e order\\u200b-status odd: "
    )
    assert "\n" not in lines[0]
