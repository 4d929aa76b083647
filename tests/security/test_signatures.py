"""Forged, damaged and misdirected signatures: each refused in the platform's form.

Every refusal is posted through :meth:`Target.refuse`, which also proves that
no receiver ran and that no row of the store changed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest

from flask_orderhooks.testing import (
    SignedCallback,
    gateway_collect,
    gateway_payout,
    igv_order_status,
    sud_order_changed,
)

from .conftest import Target, TargetFactory
from .support import (
    COLLECT_PATH,
    GATEWAY_KEYS,
    GATEWAY_OLD_KEY,
    IGV_OLD_SECRET,
    IGV_PATH,
    IGV_SECRET,
    MERCHANT_A,
    MERCHANT_B,
    NOW_MS,
    PAYOUT_PATH,
    SUD_APP_A,
    SUD_APP_B,
    SUD_APPS,
    SUD_OLD_SECRET,
    SUD_PATH,
    dumps,
    gateway_body,
    gateway_sign,
    igv_sign,
    join_object,
    refused,
    split_object,
    sud_headers,
    sud_sign,
)

_ids = itertools.count()


def _fresh(prefix: str) -> str:
    return f"{prefix}-{next(_ids)}"


# -- the suite's own signers agree with the protocol and the testing kit -----------


def test_independent_signers_match_the_protocol_vector_and_the_kit() -> None:
    vector = igv_sign("1734850099000", "2002986662652579841", "aBcDeFgHiJkLmNoPqRsTuVwXyZ012345")
    assert vector == "fd3b0ee18d6a018a553de2b3a2e4f380daa87917401e4981f302d2abee7abd8e"
    igv = igv_order_status(IGV_SECRET, request_id="r-1", timestamp_ms=NOW_MS)
    assert igv.headers["X-Signature"] == igv_sign(str(NOW_MS), "r-1", IGV_SECRET)
    sud = sud_order_changed(SUD_APPS[SUD_APP_A], app_id=SUD_APP_A, timestamp_ms=NOW_MS, nonce="n-1")
    assert sud.headers == sud_headers(sud.body, nonce="n-1")
    collect = gateway_collect(GATEWAY_KEYS[str(MERCHANT_A)], order_amount=Decimal("100.00"))
    fields = json.loads(collect.body, parse_float=lambda text: text)
    given = fields.pop("sign")
    texts = {k: None if v in (None, "") else str(v) for k, v in fields.items()}
    assert given == gateway_sign(texts, GATEWAY_KEYS[str(MERCHANT_A)])


# -- iGV ---------------------------------------------------------------------------

HeaderEdit = Callable[[dict[str, str]], list[tuple[str, str]]]


def _set(name: str, value: str | Callable[[str], str]) -> HeaderEdit:
    def edit(headers: dict[str, str]) -> list[tuple[str, str]]:
        new = value(headers[name]) if callable(value) else value
        return [(n, new if n == name else v) for n, v in headers.items()]

    return edit


def _drop(name: str) -> HeaderEdit:
    return lambda headers: [(n, v) for n, v in headers.items() if n != name]


def _repeat(name: str, value: str | None = None) -> HeaderEdit:
    return lambda headers: [*headers.items(), (name, headers[name] if value is None else value)]


def _igv_hmac(message: str, secret: str, digest: Any = hashlib.sha256) -> str:
    return hmac.new(secret.encode(), message.encode(), digest).hexdigest()


MISMATCH = "The X-Signature does not match."
IGV_REFUSALS: list[Any] = [
    (
        "missing X-Timestamp",
        _drop("X-Timestamp"),
        401,
        "The X-Timestamp header is missing or empty.",
    ),
    (
        "missing X-Request-Id",
        _drop("X-Request-Id"),
        401,
        "The X-Request-Id header is missing or empty.",
    ),
    (
        "missing X-Signature",
        _drop("X-Signature"),
        401,
        "The X-Signature header is missing or empty.",
    ),
    (
        "empty X-Timestamp",
        _set("X-Timestamp", ""),
        401,
        "The X-Timestamp header is missing or empty.",
    ),
    (
        "empty X-Request-Id",
        _set("X-Request-Id", ""),
        401,
        "The X-Request-Id header is missing or empty.",
    ),
    (
        "empty X-Signature",
        _set("X-Signature", ""),
        401,
        "The X-Signature header is missing or empty.",
    ),
    ("one hex digit short", _set("X-Signature", lambda s: s[:-1]), 401, MISMATCH),
    ("one hex digit long", _set("X-Signature", lambda s: s + "0"), 401, MISMATCH),
    ("twice as long", _set("X-Signature", lambda s: s * 2), 401, MISMATCH),
    ("all zeros", _set("X-Signature", "0" * 64), 401, MISMATCH),
    ("non-hex digit", _set("X-Signature", lambda s: "g" + s[1:]), 401, MISMATCH),
    ("leading space", _set("X-Signature", lambda s: " " + s), 401, MISMATCH),
    ("trailing space", _set("X-Signature", lambda s: s + " "), 401, MISMATCH),
    ("inner space", _set("X-Signature", lambda s: s[:32] + " " + s[32:]), 401, MISMATCH),
    ("trailing tab", _set("X-Signature", lambda s: s + "\t"), 401, MISMATCH),
    ("sha256= prefix", _set("X-Signature", lambda s: "sha256=" + s), 401, MISMATCH),
    (
        "base64 digest",
        _set("X-Signature", lambda s: base64.b64encode(bytes.fromhex(s)).decode()),
        401,
        MISMATCH,
    ),
    ("Latin-1 letters", _set("X-Signature", "é" * 64), 401, MISMATCH),
    ("non-Latin-1 letters", _set("X-Signature", "€" * 64), 401, MISMATCH),
    ("UTF-8 read as Latin-1", _set("X-Signature", "â\x82¬" * 21), 401, MISMATCH),
    (
        "X-Request-Id not Latin-1",
        _set("X-Request-Id", "订单"),
        401,
        "The X-Request-Id header is not readable.",
    ),
    (
        "X-Timestamp not Latin-1",
        _set("X-Timestamp", "١٧٦٧"),
        401,
        "The X-Timestamp header is not readable.",
    ),
    ("X-Request-Id mojibake", _set("X-Request-Id", "è®¢å\x8d\x95"), 401, MISMATCH),
    ("two X-Signature headers", _repeat("X-Signature"), 401, MISMATCH),
    ("X-Signature then garbage", _repeat("X-Signature", "0" * 64), 401, MISMATCH),
    ("two X-Request-Id headers", _repeat("X-Request-Id", "other-id"), 401, MISMATCH),
    ("two X-Timestamp headers", _repeat("X-Timestamp"), 401, MISMATCH),
]


@pytest.mark.parametrize(
    ("edit", "status", "reason"),
    [pytest.param(e, s, r, id=i) for i, e, s, r in IGV_REFUSALS],
)
def test_igv_header_damage_is_refused(
    target: Target, edit: HeaderEdit, status: int, reason: str
) -> None:
    cb = igv_order_status(IGV_SECRET, request_id=_fresh("igv-hdr"), timestamp_ms=NOW_MS)
    target.refuse(IGV_PATH, cb.body, edit(cb.headers), refused("igv", status, reason))


WRONG_IGV_SIGNERS: list[Any] = [
    ("another secret", lambda ts, rid: igv_sign(ts, rid, "x" * 32)),
    ("the retired secret", lambda ts, rid: igv_sign(ts, rid, IGV_OLD_SECRET)),
    ("secret not appended", lambda ts, rid: _igv_hmac(ts + rid, IGV_SECRET)),
    ("separator added", lambda ts, rid: _igv_hmac(f"{ts}\n{rid}\n{IGV_SECRET}", IGV_SECRET)),
    ("id before timestamp", lambda ts, rid: _igv_hmac(rid + ts + IGV_SECRET, IGV_SECRET)),
    ("HMAC-SHA1", lambda ts, rid: _igv_hmac(ts + rid + IGV_SECRET, IGV_SECRET, hashlib.sha1)),
    (
        "plain SHA-256, no HMAC",
        lambda ts, rid: hashlib.sha256((ts + rid + IGV_SECRET).encode()).hexdigest(),
    ),
    ("another request id", lambda ts, rid: igv_sign(ts, rid + "0", IGV_SECRET)),
    ("another timestamp", lambda ts, rid: igv_sign(str(int(ts) + 1), rid, IGV_SECRET)),
]


@pytest.mark.parametrize("signer", [pytest.param(s, id=i) for i, s in WRONG_IGV_SIGNERS])
def test_igv_signature_by_the_wrong_recipe_is_refused(
    target: Target, signer: Callable[[str, str], str]
) -> None:
    cb = igv_order_status(IGV_SECRET, request_id=_fresh("igv-alg"), timestamp_ms=NOW_MS)
    forged = signer(cb.headers["X-Timestamp"], cb.headers["X-Request-Id"])
    headers = {**cb.headers, "X-Signature": forged}
    target.refuse(IGV_PATH, cb.body, headers, refused("igv", 401, MISMATCH))


@pytest.mark.parametrize(
    "case", [str.upper, lambda s: s[:32].upper() + s[32:]], ids=["upper", "mixed"]
)
def test_igv_signature_case_is_ignored(target: Target, case: Callable[[str], str]) -> None:
    # The platform compares case-insensitively; so does the verifier.
    cb = igv_order_status(IGV_SECRET, request_id=_fresh("igv-case"), timestamp_ms=NOW_MS)
    headers = {**cb.headers, "X-Signature": case(cb.headers["X-Signature"])}
    assert headers["X-Signature"] != cb.headers["X-Signature"]
    [captured] = target.accept(IGV_PATH, cb.body, headers, cb.key)
    assert captured.event.request_id == cb.key


@pytest.mark.parametrize(
    ("timestamp", "reason"),
    [
        ("soon", "The X-Timestamp header is not a Unix timestamp."),
        ("1.767225600e12", "The X-Timestamp header is not a Unix timestamp."),
        (f"+{NOW_MS}", "The X-Timestamp header is not a Unix timestamp."),
        ("-1", "The X-Timestamp header is not a Unix timestamp."),
        (f"{NOW_MS}.0", "The X-Timestamp header is not a Unix timestamp."),
        (f"0x{NOW_MS:x}", "The X-Timestamp header is not a Unix timestamp."),
        ("9" * 20, "The X-Timestamp header is not a Unix timestamp."),
    ],
)
def test_igv_signed_timestamp_that_is_not_a_number_is_refused(
    target: Target, timestamp: str, reason: str
) -> None:
    cb = igv_order_status(IGV_SECRET, request_id=_fresh("igv-ts"), timestamp_ms=timestamp)
    assert cb.headers["X-Signature"] == igv_sign(timestamp, cb.key, IGV_SECRET)
    target.refuse_cb(cb, refused("igv", 400, reason))


# -- gateway -----------------------------------------------------------------------


def _collect_fields(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "id": _fresh("GW"),
        "trans_id": "T-1",
        "mch_id": MERCHANT_A,
        "order_amount": "100.00",
        "payed_amount": "100.00",
        "channel": "bank",
        "status": 60,
        "created_at": "2026-01-01 00:00:00",
        "payed_at": "2026-01-01 00:00:10",
    }
    fields.update(overrides)
    return {k: v for k, v in fields.items() if v is not _ABSENT}


_ABSENT: Any = object()


def _with_sign(fields: dict[str, Any], raw: str | None) -> bytes:
    """The body with its ``sign`` replaced by the JSON text ``raw`` (None: no
    sign at all); numbers keep the text they were written with."""
    pairs = [(k, v) for k, v in split_object(gateway_body(fields).decode()) if k != "sign"]
    return join_object(pairs if raw is None else [*pairs, ("sign", raw)])


def _resigned(fields: dict[str, Any], change: Callable[[str], str]) -> bytes:
    """The body with its correct sign changed by ``change`` (to JSON text)."""
    good = json.loads(gateway_body(fields))["sign"]
    return _with_sign(fields, change(good))


def _md5(text: str) -> str:
    """A sign over ``text``, as JSON text."""
    return dumps(hashlib.md5(text.encode(), usedforsecurity=False).hexdigest())


def _sha256(text: str) -> str:
    return dumps(hashlib.sha256(text.encode()).hexdigest())


def _params(fields: dict[str, Any], *, ordered: bool = True, empty: bool = False) -> str:
    names = sorted(fields) if ordered else list(fields)
    return "&".join(
        f"{k}={'' if fields[k] is None else fields[k]}"
        for k in names
        if empty or fields[k] not in (None, "")
    )


KEY_A = GATEWAY_KEYS[str(MERCHANT_A)]
KEY_B = GATEWAY_KEYS[str(MERCHANT_B)]

GATEWAY_REFUSALS: list[Any] = [
    ("no sign", lambda f: _with_sign(f, None)),
    ("sign null", lambda f: _with_sign(f, "null")),
    ("sign empty", lambda f: _with_sign(f, '""')),
    ("sign a number", lambda f: _with_sign(f, "0")),
    ("sign true", lambda f: _with_sign(f, "true")),
    ("sign in a list", lambda f: _resigned(f, lambda s: dumps([s]))),
    ("sign in an object", lambda f: _resigned(f, lambda s: dumps({"v": s}))),
    ("sign upper-case", lambda f: _resigned(f, lambda s: dumps(s.upper()))),
    ("sign one letter upper-case", lambda f: _resigned(f, lambda s: dumps(_upper_one(s)))),
    ("sign one digit short", lambda f: _resigned(f, lambda s: dumps(s[:-1]))),
    ("sign one digit long", lambda f: _resigned(f, lambda s: dumps(s + "0"))),
    ("sign non-hex", lambda f: _resigned(f, lambda s: dumps("z" + s[1:]))),
    ("sign padded", lambda f: _resigned(f, lambda s: dumps(f" {s} "))),
    ("sign Latin-1 letters", lambda f: _with_sign(f, dumps("é" * 32))),
    ("sign non-Latin-1 letters", lambda f: _with_sign(f, dumps("€" * 32))),
    ("unknown mch_id", lambda f: gateway_body({**f, "mch_id": 10003}, KEY_A)),
    ("unknown mch_id as string", lambda f: gateway_body({**f, "mch_id": "10003"}, KEY_A)),
    ("mch_id null", lambda f: gateway_body({**f, "mch_id": None}, KEY_A)),
    ("mch_id true", lambda f: gateway_body({**f, "mch_id": True}, KEY_A)),
    ("mch_id 10001.0", lambda f: gateway_body({**f, "mch_id": Decimal("10001.0")}, KEY_A)),
    (
        "mch_id missing",
        lambda f: gateway_body({k: v for k, v in f.items() if k != "mch_id"}, KEY_A),
    ),
    ("merchant B's body, A's key", lambda f: gateway_body({**f, "mch_id": MERCHANT_B}, KEY_A)),
    ("merchant A's body, B's key", lambda f: gateway_body(f, KEY_B)),
    ("A's retired key", lambda f: gateway_body(f, GATEWAY_OLD_KEY)),
    ("key first (other template)", lambda f: _with_sign(f, _md5(f"{KEY_A}&{_params(f)}"))),
    ("no key at all", lambda f: _with_sign(f, _md5(_params(f)))),
    ("key without key=", lambda f: _with_sign(f, _md5(f"{_params(f)}&{KEY_A}"))),
    ("SHA-256 instead of MD5", lambda f: _with_sign(f, _sha256(f"{_params(f)}&key={KEY_A}"))),
    ("unsorted keys", lambda f: _with_sign(f, _md5(_params(f, ordered=False) + f"&key={KEY_A}"))),
    (
        "empty values signed",
        lambda f: _with_sign(f, _md5(_params(f, empty=True) + f"&key={KEY_A}")),
    ),
]


def _upper_one(sign: str) -> str:
    index = next(i for i, c in enumerate(sign) if c in "abcdef")
    return sign[:index] + sign[index].upper() + sign[index + 1 :]


@pytest.mark.parametrize("path", [COLLECT_PATH, PAYOUT_PATH])
@pytest.mark.parametrize("forge", [pytest.param(f, id=i) for i, f in GATEWAY_REFUSALS])
def test_gateway_bad_or_misdirected_sign_is_refused(
    target: Target, path: str, forge: Callable[[dict[str, Any]], bytes]
) -> None:
    fields = _collect_fields(payed_at=None)
    target.refuse(path, forge(fields), {"Content-Type": "application/json"}, (401, "fail"))


def test_gateway_numbers_are_signed_as_written_not_as_floats(target: Target) -> None:
    # 100.00 parsed as a float is 100.0: a sign over that text must not match.
    fields = _collect_fields(
        order_amount=Decimal("100.00"), payed_amount=Decimal("100.00"), payed_at=None
    )
    as_float = {**fields, "order_amount": "100.0", "payed_amount": "100.0"}
    forged = _with_sign(fields, _md5(f"{_params(as_float)}&key={KEY_A}"))
    assert b'"order_amount":100.00,' in forged
    target.refuse(COLLECT_PATH, forged, {}, (401, "fail"))
    target.accept(COLLECT_PATH, gateway_body(fields), {}, f"{fields['id']}:60")


def test_gateway_nested_numbers_are_signed_as_written(target: Target) -> None:
    """A number inside a nested value is signed as its JSON text, bare
    ({"fee":1.50}); the verifier used to quote it ({"fee":"1.50"}) and so
    refused every genuine body that carried one. Signed by hand here, by
    PROTOCOLS.md's rule: the fields but sign, sorted, ``k=v&…&key=KEY``, MD5."""
    signed = (
        'channel=bank&created_at=2026-01-01 00:00:00&extra={"fee":1.50,"n":[1,2.0,1e5]}'
        f"&id=GW-NESTED&mch_id={MERCHANT_A}&order_amount=100.00&payed_amount=100.00&status=60"
        f"&trans_id=T-1&key={KEY_A}"
    )
    sign = hashlib.md5(signed.encode(), usedforsecurity=False).hexdigest()
    body = (
        f'{{"id":"GW-NESTED","trans_id":"T-1","mch_id":{MERCHANT_A},"order_amount":"100.00",'
        '"payed_amount":"100.00","channel":"bank","status":60,'
        '"created_at":"2026-01-01 00:00:00","extra":{"fee":1.50,"n":[1,2.0,1e5]},'
        f'"sign":"{sign}"}}'
    )
    [delivered] = target.accept(COLLECT_PATH, body.encode(), {}, "GW-NESTED:60")
    assert delivered.event.raw["extra"]["fee"] == Decimal("1.50")
    # The quoted rendering is what nobody signs.
    quoted = signed.replace('{"fee":1.50,"n":[1,2.0,1e5]}', '{"fee":"1.50","n":[1,"2.0","1e5"]}')
    forged = body.replace(sign, hashlib.md5(quoted.encode(), usedforsecurity=False).hexdigest())
    target.refuse(
        COLLECT_PATH, forged.replace("GW-NESTED", "GW-QUOTED").encode(), {}, (401, "fail")
    )


@pytest.mark.parametrize(
    ("body", "status"),
    [
        pytest.param(
            lambda: gateway_body(_collect_fields(mch_id=str(MERCHANT_A))), 400, id="mch_id-string"
        ),
        pytest.param(lambda: gateway_body(_collect_fields(status="60")), 400, id="status-string"),
        pytest.param(
            lambda: gateway_body(_collect_fields()).replace(b',"sign"', b',"sign":"0","sign"'),
            400,
            id="two-sign-fields",
        ),
    ],
)
def test_gateway_signed_but_typed_wrong_is_malformed(
    target: Target, body: Callable[[], bytes], status: int
) -> None:
    target.refuse(COLLECT_PATH, body(), {}, (status, "fail"))


def test_gateway_callback_on_the_other_kinds_route_is_refused(target: Target) -> None:
    """Collect and payout share the key, and the sign does not say which kind
    a body is: a captured collect success posted to the payout route would be
    a signed payout success of the same trans_id. Fields only one kind has
    give it away; the right route still takes each body."""
    collect = gateway_collect(KEY_A, id="C-CROSS", trans_id="ORDER-CROSS")
    canceled = gateway_payout(KEY_A, id="P-CROSS", trans_id="ORDER-CROSS", status=50)
    assert b'"canceled_at"' in canceled.body
    target.refuse(PAYOUT_PATH, collect.body, collect.headers, (400, "fail"))
    target.refuse(COLLECT_PATH, canceled.body, canceled.headers, (400, "fail"))
    assert [c.event.trans_id for c in target.accept_cb(collect)] == ["ORDER-CROSS"]
    assert [c.event.canceled for c in target.accept_cb(canceled)] == [True]


# -- SUD ---------------------------------------------------------------------------

SUD_MISMATCH = "The Sud-Signature does not match."
SUD_NOT_CONFIGURED = "The Sud-AppId is not configured."

SUD_REFUSALS: list[Any] = [
    *[
        (f"missing {h}", _drop(h), f"The {h} header is missing or empty.")
        for h in ("Sud-AppId", "Sud-Timestamp", "Sud-Nonce", "Sud-Signature")
    ],
    *[
        (f"empty {h}", _set(h, ""), f"The {h} header is missing or empty.")
        for h in ("Sud-AppId", "Sud-Timestamp", "Sud-Nonce", "Sud-Signature")
    ],
    ("unknown Sud-AppId", _set("Sud-AppId", "9999"), SUD_NOT_CONFIGURED),
    ("Sud-AppId padded", _set("Sud-AppId", lambda a: f" {a}"), SUD_NOT_CONFIGURED),
    ("Sud-AppId Latin-1", _set("Sud-AppId", "é"), SUD_NOT_CONFIGURED),
    ("Sud-AppId not Latin-1", _set("Sud-AppId", "应用"), "The Sud-AppId header is not readable."),
    ("Sud-Nonce not Latin-1", _set("Sud-Nonce", "€"), "The Sud-Nonce header is not readable."),
    (
        "Sud-Timestamp not Latin-1",
        _set("Sud-Timestamp", "€"),
        "The Sud-Timestamp header is not readable.",
    ),
    ("another app's id", _set("Sud-AppId", SUD_APP_B), SUD_MISMATCH),
    ("signature upper-case", _set("Sud-Signature", str.upper), SUD_MISMATCH),
    ("signature short", _set("Sud-Signature", lambda s: s[:-1]), SUD_MISMATCH),
    ("signature long", _set("Sud-Signature", lambda s: s + "0"), SUD_MISMATCH),
    ("signature non-hex", _set("Sud-Signature", lambda s: "x" + s[1:]), SUD_MISMATCH),
    ("signature padded", _set("Sud-Signature", lambda s: f"{s} "), SUD_MISMATCH),
    ("signature Latin-1", _set("Sud-Signature", "é" * 40), SUD_MISMATCH),
    ("signature not Latin-1", _set("Sud-Signature", "€" * 40), SUD_MISMATCH),
    ("other nonce", _set("Sud-Nonce", lambda n: n + "x"), SUD_MISMATCH),
    ("other timestamp", _set("Sud-Timestamp", lambda t: str(int(t) + 1)), SUD_MISMATCH),
    ("two Sud-Signature headers", _repeat("Sud-Signature"), SUD_MISMATCH),
    ("two Sud-AppId headers", _repeat("Sud-AppId"), SUD_NOT_CONFIGURED),
    ("two Sud-Nonce headers", _repeat("Sud-Nonce", "other"), SUD_MISMATCH),
    ("two Sud-Timestamp headers", _repeat("Sud-Timestamp"), SUD_MISMATCH),
]


@pytest.mark.parametrize(("edit", "reason"), [pytest.param(e, r, id=i) for i, e, r in SUD_REFUSALS])
def test_sud_header_damage_is_refused(target: Target, edit: HeaderEdit, reason: str) -> None:
    cb = sud_order_changed(
        SUD_APPS[SUD_APP_A], app_id=SUD_APP_A, notify_id=_fresh("sud-hdr"), timestamp_ms=NOW_MS
    )
    target.refuse(SUD_PATH, cb.body, edit(cb.headers), refused("sud", 401, reason))


def _sud_sha1(message: bytes, secret: str) -> str:
    return hmac.new(secret.encode(), message, hashlib.sha1).hexdigest()


WRONG_SUD_SIGNERS: list[Any] = [
    ("another app's secret", lambda a, t, n, b: sud_sign(a, t, n, b, SUD_APPS[SUD_APP_B])),
    ("the retired secret", lambda a, t, n, b: sud_sign(a, t, n, b, SUD_OLD_SECRET)),
    (
        "no final newline",
        lambda a, t, n, b: _sud_sha1(f"{a}\n{t}\n{n}\n".encode() + b, SUD_APPS[a]),
    ),
    (
        "re-serialised body",
        lambda a, t, n, b: sud_sign(a, t, n, json.dumps(json.loads(b)).encode(), SUD_APPS[a]),
    ),
    (
        "sorted keys",
        lambda a, t, n, b: sud_sign(
            a,
            t,
            n,
            json.dumps(json.loads(b), sort_keys=True, separators=(",", ":")).encode(),
            SUD_APPS[a],
        ),
    ),
    (
        "HMAC-SHA256",
        lambda a, t, n, b: hmac.new(
            SUD_APPS[a].encode(), f"{a}\n{t}\n{n}\n".encode() + b + b"\n", hashlib.sha256
        ).hexdigest(),
    ),
]


@pytest.mark.parametrize("signer", [pytest.param(s, id=i) for i, s in WRONG_SUD_SIGNERS])
def test_sud_signature_by_the_wrong_recipe_is_refused(
    target: Target, signer: Callable[[str, str, str, bytes], str]
) -> None:
    cb = sud_order_changed(
        SUD_APPS[SUD_APP_A], app_id=SUD_APP_A, notify_id=_fresh("sud-alg"), timestamp_ms=NOW_MS
    )
    headers = {
        **cb.headers,
        "Sud-Signature": signer(
            SUD_APP_A, cb.headers["Sud-Timestamp"], cb.headers["Sud-Nonce"], cb.body
        ),
    }
    target.refuse(SUD_PATH, cb.body, headers, refused("sud", 401, SUD_MISMATCH))


@pytest.mark.parametrize(
    ("header_app", "body_app"), [(SUD_APP_A, SUD_APP_B), (SUD_APP_B, SUD_APP_A)]
)
def test_sud_body_app_id_must_be_the_header_app_id(
    target: Target, header_app: str, body_app: str
) -> None:
    # Signed correctly by the header's app: its key may not speak for another app.
    cb = sud_order_changed(
        SUD_APPS[header_app], app_id=body_app, notify_id=_fresh("sud-app"), timestamp_ms=NOW_MS
    )
    headers = sud_headers(cb.body, app_id=header_app)
    reason = "The body's app_id is not the Sud-AppId header's."
    target.refuse(SUD_PATH, cb.body, headers, refused("sud", 401, reason))


def test_sud_unknown_app_signed_with_its_own_secret_is_refused(target: Target) -> None:
    cb = sud_order_changed("its-own-secret", app_id="4242", timestamp_ms=NOW_MS)
    target.refuse_cb(cb, refused("sud", 401, SUD_NOT_CONFIGURED))


@pytest.mark.parametrize(
    ("timestamp", "reason"),
    [
        ("soon", "The Sud-Timestamp header is not a Unix timestamp."),
        (f"{NOW_MS}.0", "The Sud-Timestamp header is not a Unix timestamp."),
        ("-5", "The Sud-Timestamp header is not a Unix timestamp."),
    ],
)
def test_sud_signed_timestamp_that_is_not_a_number_is_refused(
    target: Target, timestamp: str, reason: str
) -> None:
    cb = sud_order_changed(
        SUD_APPS[SUD_APP_A], app_id=SUD_APP_A, notify_id=_fresh("sud-ts"), timestamp_ms=timestamp
    )
    target.refuse_cb(cb, refused("sud", 400, reason))


def test_sud_signed_notify_time_that_is_not_a_number_is_refused(target: Target) -> None:
    cb = sud_order_changed(
        SUD_APPS[SUD_APP_A], app_id=SUD_APP_A, notify_id=_fresh("sud-nt"), timestamp_ms=NOW_MS
    )
    body = cb.body.replace(f'"notify_time":"{NOW_MS}"'.encode(), b'"notify_time":"soon"')
    # The reason calls the body field a header (reported as cosmetic).
    reason = "The field 'notify_time' is not a Unix timestamp."
    target.refuse(SUD_PATH, body, sud_headers(body), refused("sud", 400, reason))


# -- rotation ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rotating(make_target: TargetFactory) -> Target:
    """An app in the middle of a rotation: old and new secrets, oldest first."""
    return make_target(
        ORDERHOOKS_IGV_SECRET=[IGV_OLD_SECRET, IGV_SECRET],
        ORDERHOOKS_GATEWAY_KEY={
            str(MERCHANT_A): [GATEWAY_OLD_KEY, KEY_A],
            str(MERCHANT_B): KEY_B,
        },
        ORDERHOOKS_SUD_APPS={SUD_APP_A: [SUD_OLD_SECRET, SUD_APPS[SUD_APP_A]]},
    )


def _signed_by(platform: str, secret: str) -> SignedCallback:
    if platform == "igv":
        return igv_order_status(secret, request_id=_fresh("rot"), timestamp_ms=NOW_MS)
    if platform == "collect":
        return gateway_collect(secret, id=_fresh("ROT"))
    if platform == "payout":
        return gateway_payout(secret, id=_fresh("ROT"))
    return sud_order_changed(secret, app_id=SUD_APP_A, notify_id=_fresh("rot"), timestamp_ms=NOW_MS)


OLD = {
    "igv": IGV_OLD_SECRET,
    "collect": GATEWAY_OLD_KEY,
    "payout": GATEWAY_OLD_KEY,
    "sud": SUD_OLD_SECRET,
}
NEW = {"igv": IGV_SECRET, "collect": KEY_A, "payout": KEY_A, "sud": SUD_APPS[SUD_APP_A]}
REFUSED_OLD = {
    "igv": refused("igv", 401, MISMATCH),
    "collect": (401, "fail"),
    "payout": (401, "fail"),
    "sud": refused("sud", 401, SUD_MISMATCH),
}


@pytest.mark.parametrize("platform", ["igv", "collect", "payout", "sud"])
def test_rotation_accepts_both_secrets_then_only_the_new_one(
    target: Target, rotating: Target, platform: str
) -> None:
    rotating.accept_cb(_signed_by(platform, OLD[platform]))
    rotating.accept_cb(_signed_by(platform, NEW[platform]))
    # Rotation finished: the old secret removed from the config.
    target.refuse_cb(_signed_by(platform, OLD[platform]), REFUSED_OLD[platform])
    target.accept_cb(_signed_by(platform, NEW[platform]))


def test_gateway_sign_string_cannot_tell_values_from_separators(target: Target) -> None:
    """A protocol limit, not a verifier bug: ``k=v&k=v`` has no escaping, so a
    signed value holding ``&name=value`` can be split into two fields and the
    sign still matches. Receivers must match ``trans_id`` and the amounts
    against their own order records (see the README's security model)."""
    fields = _collect_fields(trans_id="T-9&x_note=1", payed_at=None)
    pairs = split_object(gateway_body(fields).decode())
    split = [(k, '"T-9"' if k == "trans_id" else v) for k, v in pairs]
    split.insert(-1, ("x_note", '"1"'))
    [captured] = target.accept(COLLECT_PATH, join_object(split), {}, f"{fields['id']}:60")
    assert captured.event.trans_id == "T-9"
    assert captured.event.raw["x_note"] == "1"
