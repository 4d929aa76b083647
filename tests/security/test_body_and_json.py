"""Body size limits and strict JSON, on every route and both store backends.

The size limit is enforced before the body is read whole: a Content-Length
over the limit is refused without one read, and a body without one (chunked,
the server terminating the stream) stops being read just past the limit.
Only then is the body parsed, strictly: one UTF-8 JSON object, no NaN or
Infinity, no repeated key, every integer exact.
"""

from __future__ import annotations

import io
from decimal import Decimal
from typing import Any

import pytest

from flask_orderhooks.testing import gateway_collect, igv_order_status, sud_order_changed

from .conftest import Target, TargetFactory
from .support import (
    COLLECT_PATH,
    GATEWAY_KEYS,
    IGV_PATH,
    IGV_SECRET,
    MERCHANT_A,
    NOW_MS,
    PAYOUT_PATH,
    SUD_APP_A,
    SUD_APPS,
    SUD_PATH,
    answer_of,
    gateway_body,
    igv_headers,
    refused,
    sud_headers,
)

LIMIT = 64 * 1024
TOO_LARGE = f"The body is larger than {LIMIT} bytes."
ROUTES = [IGV_PATH, COLLECT_PATH, PAYOUT_PATH, SUD_PATH]
PLATFORM = {IGV_PATH: "igv", COLLECT_PATH: "gateway", PAYOUT_PATH: "gateway", SUD_PATH: "sud"}


class ExplodingStream(io.RawIOBase):
    """A request body that fails the test if anything reads it."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        raise AssertionError("the body was read although its Content-Length is over the limit")


class EndlessStream(io.RawIOBase):
    """A body with no announced end (chunked): ``total`` bytes of JSON-ish text."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.served = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        size = min(len(buffer), self.total - self.served)
        buffer[:size] = b" " * size
        self.served += size
        return size


@pytest.fixture(scope="module")
def sqlite_target(make_sqlite_target: TargetFactory) -> Target:
    """For tests whose outcome does not depend on the store."""
    return make_sqlite_target()


def _signed_headers(path: str, body: bytes, key: str) -> dict[str, str]:
    """Headers that verify for ``body`` on ``path`` (gateway: none needed)."""
    if path == IGV_PATH:
        return igv_headers(key)
    if path == SUD_PATH:
        return sud_headers(body)
    return {"Content-Type": "application/json"}


# -- size ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", ROUTES)
@pytest.mark.parametrize("signature", ["valid", "forged"])
def test_content_length_over_the_limit_is_refused_unread(
    target: Target, path: str, signature: str
) -> None:
    headers = _signed_headers(path, b"", f"big-{signature}-{path}")
    if signature == "forged":
        headers = {**headers, "X-Signature": "0" * 64, "Sud-Signature": "0" * 40}
    target.refuse(
        path,
        b"",
        headers,
        refused(PLATFORM[path], 413, TOO_LARGE),
        environ_overrides={"wsgi.input": ExplodingStream(), "CONTENT_LENGTH": str(LIMIT + 1)},
    )


# Without a Content-Length, Werkzeug's LimitedStream(is_max=True).readall()
# stops at the limit without raising; a body cut there could still parse. The
# pipeline reads one byte past the limit to tell the two apart.


@pytest.mark.parametrize("path", ROUTES)
def test_body_without_length_is_never_read_far_past_the_limit(target: Target, path: str) -> None:
    # Memory stays bounded and nothing gets in; the exact answer (413) is
    # pinned by the next test.
    endless = EndlessStream(total=64 * LIMIT)
    before = target.snapshot()
    target.post(
        path,
        b"",
        _signed_headers(path, b"", f"chunked-read-{path}"),
        environ_overrides={"wsgi.input": endless, "wsgi.input_terminated": True},
    )
    assert endless.served <= LIMIT + 1
    assert target.recorder.events == []
    assert target.snapshot() == before


@pytest.mark.parametrize("path", ROUTES)
def test_body_without_length_over_the_limit_is_refused(sqlite_target: Target, path: str) -> None:
    sqlite_target.refuse(
        path,
        b"",
        _signed_headers(path, b"", f"chunked-{path}"),
        refused(PLATFORM[path], 413, TOO_LARGE),
        environ_overrides={"wsgi.input": EndlessStream(64 * LIMIT), "wsgi.input_terminated": True},
    )


def test_body_without_length_is_not_cut_to_a_valid_prefix(sqlite_target: Target) -> None:
    target = sqlite_target
    body, headers = _padded_igv(LIMIT, "chunked-prefix")
    stream = io.BytesIO(body + b"<- the limit; the platform never sent a body this long")
    response = target.post(
        IGV_PATH,
        b"",
        headers,
        environ_overrides={"wsgi.input": stream, "wsgi.input_terminated": True},
    )
    if response.status_code == 200:
        # Today the first LIMIT bytes were taken as the whole body and stored.
        target.verified.add(("igv", "order-status", "chunked-prefix"))
    assert answer_of("igv", response) == refused("igv", 413, TOO_LARGE)


def test_body_without_length_or_terminated_stream_is_read_as_empty(target: Target) -> None:
    # A server that does not terminate chunked bodies itself: Werkzeug reads
    # nothing rather than an unbounded stream, and the empty body is refused.
    target.refuse(
        IGV_PATH,
        b"",
        igv_headers("chunked-unterminated"),
        refused("igv", 400, "The body is not valid JSON (Expecting value at character 0)."),
        environ_overrides={"wsgi.input": EndlessStream(total=64 * LIMIT)},
    )


def _padded_igv(size: int, request_id: str) -> tuple[bytes, dict[str, str]]:
    cb = igv_order_status(IGV_SECRET, request_id=request_id, timestamp_ms=NOW_MS, extra={"x": ""})
    body = cb.body.replace(b'"x":""', b'"x":"' + b"p" * (size - len(cb.body)) + b'"')
    assert len(body) == size
    return body, cb.headers


def _padded_sud(size: int, notify_id: str) -> tuple[bytes, dict[str, str]]:
    cb = sud_order_changed(
        SUD_APPS[SUD_APP_A],
        app_id=SUD_APP_A,
        notify_id=notify_id,
        timestamp_ms=NOW_MS,
        extra={"x": ""},
    )
    body = cb.body.replace(b'"x":""', b'"x":"' + b"p" * (size - len(cb.body)) + b'"')
    assert len(body) == size
    return body, sud_headers(body)


def _padded_gateway(size: int, id_: str) -> bytes:
    fields: dict[str, Any] = {
        "id": id_,
        "trans_id": "T-1",
        "mch_id": MERCHANT_A,
        "order_amount": "1.00",
        "payed_amount": "1.00",
        "status": 60,
        "x": "",
    }
    fields["x"] = "p" * (size - len(gateway_body(fields)))
    body = gateway_body(fields)
    assert len(body) == size
    return body


def test_bodies_at_the_limit_pass_and_one_byte_more_is_refused(target: Target) -> None:
    for size, request_id in ((LIMIT, "limit-igv"), (LIMIT + 1, "limit-igv-over")):
        body, headers = _padded_igv(size, request_id)
        if size == LIMIT:
            target.accept(IGV_PATH, body, headers, request_id)
        else:
            target.refuse(IGV_PATH, body, headers, refused("igv", 413, TOO_LARGE))
    for size, notify_id in ((LIMIT, "limit-sud"), (LIMIT + 1, "limit-sud-over")):
        body, headers = _padded_sud(size, notify_id)
        if size == LIMIT:
            target.accept(SUD_PATH, body, headers, notify_id)
        else:
            target.refuse(SUD_PATH, body, headers, refused("sud", 413, TOO_LARGE))
    gateway_headers = {"Content-Type": "application/json"}
    target.accept(COLLECT_PATH, _padded_gateway(LIMIT, "LIM-1"), gateway_headers, "LIM-1:60")
    target.refuse(
        COLLECT_PATH,
        _padded_gateway(LIMIT + 1, "LIM-2"),
        gateway_headers,
        refused("gateway", 413, TOO_LARGE),
    )


def test_a_smaller_configured_limit_applies(make_target: TargetFactory) -> None:
    small = make_target(ORDERHOOKS_MAX_BODY=512)
    body, headers = _padded_igv(513, "small-limit")
    small.refuse(IGV_PATH, body, headers, refused("igv", 413, "The body is larger than 512 bytes."))
    body, headers = _padded_igv(512, "small-limit-ok")
    small.accept(IGV_PATH, body, headers, "small-limit-ok")


# -- strict JSON --------------------------------------------------------------------

DEEP = b'{"x":' + b"[" * 10_000 + b"]" * 10_000 + b"}"
HUGE_INT = b'{"x":' + b"9" * 5_000 + b"}"

MALFORMED = [
    pytest.param(b"", "The body is not valid JSON (Expecting value at character 0).", id="empty"),
    pytest.param(
        b"   ", "The body is not valid JSON (Expecting value at character 3).", id="blank"
    ),
    pytest.param(b"\xff\xfe{}", "The body is not valid UTF-8.", id="not-utf8"),
    pytest.param('{"a":"é"}'.encode("latin-1"), "The body is not valid UTF-8.", id="latin-1"),
    pytest.param('{"a":1}'.encode("utf-16"), "The body is not valid UTF-8.", id="utf-16-bom"),
    pytest.param(
        '{"a":1}'.encode("utf-16-le"),
        "The body is not valid JSON "
        "(Expecting property name enclosed in double quotes at character 1).",
        id="utf-16-no-bom",
    ),
    pytest.param('{"a":1}'.encode("utf-32"), "The body is not valid UTF-8.", id="utf-32-bom"),
    pytest.param(
        b'\xef\xbb\xbf{"a":1}',
        "The body is not valid JSON (Expecting value at character 0).",
        id="utf-8-bom",
    ),
    pytest.param(
        b"orderId=1&status=60",
        "The body is not valid JSON (Expecting value at character 0).",
        id="form-encoded",
    ),
    pytest.param(
        b"{'a':1}",
        "The body is not valid JSON "
        "(Expecting property name enclosed in double quotes at character 1).",
        id="single-quotes",
    ),
    pytest.param(
        b'{"a":1,}',
        "The body is not valid JSON "
        "(Expecting property name enclosed in double quotes at character 7).",
        id="trailing-comma",
    ),
    pytest.param(
        b'{"a":1} {"a":2}',
        "The body is not valid JSON (Extra data at character 8).",
        id="two-objects",
    ),
    pytest.param(b"[1,2]", "The body must be a JSON object, not an array.", id="array"),
    pytest.param(b'"{}"', "The body must be a JSON object, not a string.", id="string"),
    pytest.param(b"42", "The body must be a JSON object, not a number.", id="number"),
    pytest.param(b"true", "The body must be a JSON object, not a literal.", id="true"),
    pytest.param(b"null", "The body must be a JSON object, not a literal.", id="null"),
    pytest.param(b'{"x":NaN}', "The body contains NaN, which is not JSON.", id="nan"),
    pytest.param(b'{"x":Infinity}', "The body contains Infinity, which is not JSON.", id="inf"),
    pytest.param(b'{"x":-Infinity}', "The body contains -Infinity, which is not JSON.", id="-inf"),
    pytest.param(b'{"a":1,"a":2}', "The body repeats the key 'a'.", id="duplicate-key"),
    pytest.param(b'{"a":1,"a":1}', "The body repeats the key 'a'.", id="duplicate-same"),
    pytest.param(b'{"d":{"k":1,"k":2}}', "The body repeats the key 'k'.", id="duplicate-nested"),
    pytest.param(b'{"\\u0061":1,"a":2}', "The body repeats the key 'a'.", id="duplicate-escaped"),
    pytest.param(HUGE_INT, "The body is not JSON this service accepts.", id="5000-digits"),
    pytest.param(DEEP, "The body is not JSON this service accepts.", id="deep-nesting"),
]


@pytest.mark.parametrize("path", ROUTES)
@pytest.mark.parametrize(("body", "reason"), MALFORMED)
def test_malformed_bodies_are_refused(target: Target, path: str, body: bytes, reason: str) -> None:
    # iGV and SUD requests carry a valid signature, so the parser is reached.
    headers = _signed_headers(path, body, f"malformed-{len(body)}-{hash(body)}")
    target.refuse(path, body, headers, refused(PLATFORM[path], 400, reason))


@pytest.mark.parametrize("path", ROUTES)
@pytest.mark.parametrize("escape", [b'"\\ud800"', b'"a\\ud83dz"'], ids=["high", "half-pair"])
def test_lone_surrogate_escapes_are_malformed(
    sqlite_target: Target, path: str, escape: bytes
) -> None:
    # A str no UTF-8 encoder accepts: the gateway raises UnicodeEncodeError
    # while signing; iGV and SUD hand it to receivers, whose database refuses it.
    target = sqlite_target
    platform = PLATFORM[path]
    if path == IGV_PATH:
        cb = igv_order_status(IGV_SECRET, timestamp_ms=NOW_MS, order_num="SO-1")
        body, headers, key = cb.body.replace(b'"SO-1"', escape), cb.headers, cb.key
    elif path == SUD_PATH:
        cb = sud_order_changed(SUD_APPS[SUD_APP_A], app_id=SUD_APP_A, timestamp_ms=NOW_MS, cmd="C")
        body, key = cb.body.replace(b'"C"', escape), cb.key
        headers = sud_headers(body)
    else:
        # No key holder can sign it (MD5 over UTF-8 has no lone surrogates),
        # so the sign is stale; the answer must still be 400, never 500.
        cb = gateway_collect(GATEWAY_KEYS[str(MERCHANT_A)], channel="CH")
        body, headers, key = cb.body.replace(b'"CH"', escape), cb.headers, cb.key
    response = target.post(path, body, headers)
    if response.status_code == 200:
        # Verified and stored today; the ledger must say so for the final check.
        target.verified.add((platform, path.rsplit("/", 1)[1], key))
    assert answer_of(platform, response) == refused(
        platform, 400, "The body contains a lone surrogate, which is not text."
    )


# -- exact numbers ------------------------------------------------------------------

BIG = [1689644928115784, 2**53 + 1, 2**63, 2**64 + 1, 2**70, 10**40]


@pytest.mark.parametrize("number", BIG)
def test_igv_order_ids_reach_the_event_exactly(target: Target, number: int) -> None:
    cb = igv_order_status(
        IGV_SECRET, request_id=f"big-{number}", timestamp_ms=NOW_MS, order_id=number
    )
    assert f'"orderId":{number},'.encode() in cb.body
    [captured] = target.accept_cb(cb)
    assert type(captured.event.order_id) is int
    assert captured.event.order_id == number
    assert captured.event.raw["orderId"] == number


@pytest.mark.parametrize("number", BIG)
def test_sud_integers_reach_the_event_exactly(target: Target, number: int) -> None:
    cb = sud_order_changed(
        SUD_APPS[SUD_APP_A],
        app_id=SUD_APP_A,
        notify_id=f"big-{number}",
        timestamp_ms=NOW_MS,
        value=number,
        seq=number,
    )
    [captured] = target.accept_cb(cb)
    assert (type(captured.event.value), captured.event.value) == (int, number)
    assert (type(captured.event.seq), captured.event.seq) == (int, number)


AMOUNTS = ["12345678901234567890.12", "0.10", "100.00", "0.000000000000000001", "-5.00"]


@pytest.mark.parametrize(
    ("form", "text"),
    # An exponent is valid JSON number text, but not an amount string (see below).
    [(form, text) for form in ("string", "number") for text in AMOUNTS] + [("number", "1e2")],
)
def test_gateway_amounts_reach_the_event_exactly(target: Target, text: str, form: str) -> None:
    amount: str | Decimal = text if form == "string" else Decimal(text)
    cb = gateway_collect(
        GATEWAY_KEYS[str(MERCHANT_A)],
        id=f"AMT-{form}-{text}",
        order_amount=amount,
        payed_amount=amount,
    )
    [captured] = target.accept_cb(cb)
    assert captured.event.order_amount == Decimal(text)
    assert captured.event.payed_amount == Decimal(text)
    assert str(captured.event.order_amount) == str(Decimal(text))


@pytest.mark.parametrize(
    "text",
    ["1e2", " 100.00", "100.00 ", "1_000.00", "+5", "\u0661\u0660\u0660", "1,00", "", "NaN", ".5"],
)
def test_gateway_amount_strings_are_plain_decimals(target: Target, text: str) -> None:
    """Decimal() would take each of these; a signed amount string is plain ASCII digits."""
    cb = gateway_collect(
        GATEWAY_KEYS[str(MERCHANT_A)],
        id=f"AMT-bad-{text!r}",
        order_amount=text,
        payed_amount="1.00",
    )
    target.refuse_cb(
        cb, refused("gateway", 400, "The field 'order_amount' must be a decimal amount.")
    )


@pytest.mark.parametrize(
    ("order_id", "reason"),
    [
        (b"1.689644928115784e15", "The field 'orderId' must be an integer."),
        (b"1689644928115784.0", "The field 'orderId' must be an integer."),
        (b'"1689644928115784"', "The field 'orderId' must be an integer."),
        (b"true", "The field 'orderId' must be an integer."),
        (b"null", "The field 'orderId' must be an integer."),
    ],
)
def test_igv_order_id_must_be_a_json_integer(target: Target, order_id: bytes, reason: str) -> None:
    cb = igv_order_status(
        IGV_SECRET, request_id=f"oid-{order_id!r}", timestamp_ms=NOW_MS, order_id=777
    )
    body = cb.body.replace(b'"orderId":777', b'"orderId":' + order_id)
    target.refuse(IGV_PATH, body, cb.headers, refused("igv", 400, reason))


def test_gateway_merchant_id_out_of_range_has_no_key(target: Target) -> None:
    body = gateway_body(
        {"id": "BIG-MCH", "trans_id": "T", "mch_id": 2**70, "order_amount": "1.00", "status": 60},
        key=GATEWAY_KEYS[str(MERCHANT_A)],
    )
    target.refuse(COLLECT_PATH, body, {"Content-Type": "application/json"}, (401, "fail"))


@pytest.mark.parametrize("char", ["\x00", "\n", "\r", "\x1b", "\x7f", "\x85"], ids=repr)
def test_a_signed_key_with_a_control_character_is_refused(target: Target, char: str) -> None:
    """No platform's id holds one: NUL cannot be stored on PostgreSQL (each
    retry failed as "store unavailable"), a newline forges log lines, and
    neither survives the console's forms. Refused before anything is stored,
    on every backend; the same id without it is accepted."""
    key = GATEWAY_KEYS[str(MERCHANT_A)]
    bad = gateway_collect(key, id=f"CTRL{char}1")
    sud = sud_order_changed(
        SUD_APPS[SUD_APP_A], app_id=SUD_APP_A, notify_id=f"ctrl{char}1", timestamp_ms=NOW_MS
    )
    reason = "The idempotency key holds a control character."
    target.refuse(COLLECT_PATH, bad.body, bad.headers, (400, "fail"))
    target.refuse(SUD_PATH, sud.body, sud.headers, refused("sud", 400, reason))
    target.accept_cb(gateway_collect(key, id=f"CTRL-{ord(char):x}"))


def test_a_valid_request_is_answered_success_on_every_route(target: Target) -> None:
    # The control for this module: the same app accepts what it should.
    igv = igv_order_status(IGV_SECRET, request_id="control", timestamp_ms=NOW_MS)
    assert [c.signal for c in target.accept_cb(igv)] == ["order-pending-delivery"]
    sud = sud_order_changed(
        SUD_APPS[SUD_APP_A], app_id=SUD_APP_A, notify_id="control", timestamp_ms=NOW_MS
    )
    assert [c.signal for c in target.accept_cb(sud)] == ["game-order-changed"]
    collect = gateway_collect(GATEWAY_KEYS[str(MERCHANT_A)], id="control")
    assert [c.signal for c in target.accept_cb(collect)] == ["payment-collected"]
