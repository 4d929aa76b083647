"""Hypothesis: signed callbacks from every platform, mutated, answered as specified.

Each example builds a correctly signed request with
:mod:`flask_orderhooks.testing` (explicit secrets; a fresh idempotency key;
varied ids, big integers, amounts as strings and as JSON numbers, order
fields, unknown fields), applies one mutation, posts it once, and checks the
exact answer, the events sent, and that a refused request left no row. Each
route runs ``SECURITY_PROFILE.max_examples`` (at least 2,000) examples with a
derandomised seed, on one SQLite-backed app per module.

What the specification says each mutation must do. "oracle": computed per
example by :mod:`tests.security.support` from ``PROTOCOLS.md``, because the
outcome depends on which byte changed. "re-signed": the mutated request is
signed again with the right secret, as the platform itself could send it::

  mutation                iGV (body unsigned)   gateway (sign in body)  SUD (raw body signed)
  ----------------------  --------------------  ----------------------  ---------------------
  none (control)          200                   200                     200
  replace one body byte   oracle: 200 if still  oracle: 401 if a        401 does not match
                          a valid body, else    signed value changed,
                          400                   400 if not strict JSON,
                                                200 if only unsigned
                                                text changed (the name
                                                of a null field)
  replace a char of a     401 does not match    -                       401 does not match
  signed header                                                         (Sud-AppId: not
                                                                        configured)
  bad signature: other    401                   401                     401
  digit, short, long,
  spaces, non-hex
  upper-case signature    200 (compared         401                     401
                          case-insensitively)
  drop or empty a         401 missing or empty  401 (no sign; sign      401 missing or empty
  signature header                              null, "", 0, true,
                                                list, object)
  repeat a signature      401 does not match    -                       401 (Sud-AppId: not
  header (joined ", ")                                                  configured)
  another secret, key,    401                   401                     401
  merchant or app
  drop a top-level field  400 if required,      401 if it was signed    401
                          else 200              (non-empty), else 200
  duplicate a field       400 repeats the key   400 repeats the key     401; re-signed: 400
  reorder top-level keys  200                   200 (signing sorts)     401 unless unchanged;
                                                                        re-signed: 200
  whitespace between      200                   200 (values are         401; re-signed: 200
  tokens                                        signed, not text)
  reformat a number       400 if an integer     401 (numbers are        401
  (60 -> 60.0, 6e1)       field, else 200       signed as written)
  same text, other type   400 if a typed        200 for amounts (400    401
  ("100.00" <-> 100.00)   field, else 200       for "1E+2" as a string),
                                                400 for integer fields
  change a value          200, new value (the   401                     401
                          body is unsigned)
  add an unknown field    200                   401; 200 if null or ""  401; re-signed: 200
                                                (empty is unsigned);
                                                re-signed: 200
  move the timestamp,     200 inside [-3600 s,  -                       as iGV
  re-signed               +300 s], else 401
  body app_id is not      -                     -                       401 not the header's
  Sud-AppId, re-signed
  mch_id of another or    -                     401 (also re-signed     -
  unknown merchant                              with this key)

"401" without a reason means: the platform's form of 401 with the reason the
verifier gives for it (for the gateway every failure body is ``fail``).
"""

from __future__ import annotations

import itertools
import random
import re
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, TypeVar

import pytest
from hypothesis import event, given, note
from hypothesis import strategies as st

from flask_orderhooks.testing import (
    SignedCallback,
    gateway_collect,
    gateway_payout,
    igv_order_status,
    sud_order,
    sud_order_batch_changed,
    sud_order_changed,
)

from .conftest import SECURITY_PROFILE, Target, TargetFactory
from .support import (
    GATEWAY_KEYS,
    IGV_OLD_SECRET,
    IGV_SECRET,
    MERCHANT_A,
    MERCHANT_B,
    NOW_MS,
    PLATFORM_OF_PATH,
    SUD_APPS,
    Accepted,
    Refusal,
    answer_of,
    check_event,
    dumps,
    gateway_outcome,
    gateway_sign,
    igv_outcome,
    igv_sign,
    join_object,
    ok,
    refused,
    signed_text,
    split_object,
    strict_parse,
    sud_sign,
)

T = TypeVar("T")
_serial = itertools.count()


def _unique(prefix: str) -> str:
    # Hypothesis may draw the same id twice; the store would then see a
    # retry, not a first delivery. A serial keeps every key new.
    return f"{prefix}{next(_serial):07d}"


MAX_AGE_MS = 3_600_000
MAX_SKEW_MS = 300_000
HEX = "0123456789abcdef"
HEADER_CHARS = string.ascii_letters + string.digits + "-_.~"

# -- strategies ------------------------------------------------------------------
#
# Each draw costs Hypothesis a fraction of a millisecond, and a free-form
# string is one draw per character: the pools below carry the hostile values
# (escapes, non-ASCII, separators of the gateway's sign string, numbers as
# text), and one free-form string per request keeps the search open.

TEXTS = [
    "a",
    "SO1689644928115784",
    "ORDER-10001",
    "订单编号",
    "émoji 🎉",
    'quote " inside',
    "back\\slash \\u0041",
    "tab\tand\nnewline",
    "\u2028\u2029",
    "nul\x00byte",
    " padded ",
    "%s%d{}{0}",
    "<script>alert(1)</script>",
    "100.00",
    "1e3",
    "-0",
    "null",
    "key=value",
    "\ufeffbom",
    "x" * 120,
]
TOKENS = ["n", "id", "2002986662652579841", "A-b_c.d~e", "Z" * 40]
big_ints = st.one_of(
    st.sampled_from([0, 1, 1689644928115784, 2**53 + 1, 2**63, 2**64 + 1, 2**70, 10**30]),
    st.integers(min_value=0, max_value=2**80),
)
cents = st.integers(min_value=0, max_value=10**12).map(lambda c: Decimal(c).scaleb(-2))
#: JSON numbers as the testing kit writes a Decimal: its own text.
json_numbers = st.one_of(
    cents, st.sampled_from([Decimal("0"), Decimal("100"), Decimal("1E+2"), Decimal("-0.50")])
)
#: Amount strings are plain decimals ("1E+2" as a string is refused, by design).
amounts = st.one_of(
    json_numbers, json_numbers.map(lambda d: format(d, "f")), st.sampled_from(["100", "0.1"])
)
SCALARS: list[Any] = [
    None,
    "",
    0,
    -1,
    2**70,
    True,
    False,
    Decimal("100.00"),
    Decimal("-0.5"),
    "text",
    "订单",
    "a&b=c",
    "10001",
]
NESTED: list[Any] = [
    [],
    {},
    [1, "a", None, Decimal("2.50")],
    {"deep": {"deeper": [True, {"k": "v"}]}},
    {"dup_in_name": 1, "dup_in_name_": 2},
]
EXTRA_KEYS = ["x_a", "x_note", "x_z9", "x_", "x_sign", "x_mch_id"]
window_offsets = st.one_of(
    st.integers(min_value=-MAX_AGE_MS, max_value=MAX_SKEW_MS),
    st.sampled_from([-MAX_AGE_MS, MAX_SKEW_MS, 0]),
)


@dataclass(frozen=True)
class Base:
    """A correctly signed request and what it took to sign it."""

    cb: SignedCallback
    secret: str
    timestamp: str = ""
    nonce: str = ""
    app_id: str = ""


@dataclass(frozen=True)
class Case:
    """A request to post once, and the specification's answer to it."""

    path: str
    body: bytes
    headers: list[tuple[str, str]]
    expect: Refusal | list[Accepted]
    key: str


def _headers(cb: SignedCallback) -> list[tuple[str, str]]:
    return list(cb.headers.items())


def _set_header(headers: list[tuple[str, str]], name: str, value: str) -> list[tuple[str, str]]:
    return [(n, value if n == name else v) for n, v in headers]


def _header(headers: list[tuple[str, str]], name: str) -> str:
    return next(v for n, v in headers if n == name)


# Pooled picks come from one drawn seed: a draw per field would cost more
# than posting the request. Hypothesis still draws (and shrinks) what decides
# the outcome: timestamps, big integers, amounts, statuses, free-form text.
seeds = st.integers(min_value=0, max_value=2**32 - 1)
igv_statuses = st.sampled_from([1, 1, 1, 1, 0, 2, 3, -1, 2**40])
collect_statuses = st.sampled_from([60, 20, 60, 70])
payout_statuses = st.sampled_from([60, 50, 60, 40])
optional_amounts = st.one_of(st.none(), amounts)
optional_big_ints = st.one_of(st.none(), big_ints)


# Where a free-form character comes from: ASCII (with controls), Latin-1,
# CJK, astral (emoji), and anywhere in the planes but the surrogates.
_CHAR_RANGES = [
    (0x00, 0x7F),
    (0x80, 0xFF),
    (0x4E00, 0x9FFF),
    (0x1F300, 0x1FAFF),
    (0xE000, 0x10FFFF),
]


def _text(rng: random.Random) -> str:
    """A pooled hostile string, or a free-form one of 1-8 characters."""
    if rng.random() < 0.5:
        return rng.choice(TEXTS)
    chars = []
    for _ in range(rng.randint(1, 8)):
        low, high = rng.choice(_CHAR_RANGES)
        chars.append(chr(rng.randint(low, high)))
    return "".join(chars)


def _extra_fields(rng: random.Random, values: list[Any]) -> dict[str, Any]:
    return {rng.choice(EXTRA_KEYS): rng.choice(values) for _ in range(rng.randrange(4))}


@st.composite
def igv_bases(draw: st.DrawFn) -> Base:
    rng = random.Random(draw(seeds))
    timestamp = str(NOW_MS + draw(window_offsets))
    extra = _extra_fields(rng, SCALARS + NESTED)
    created_at = rng.choice([*TEXTS[:4], None])
    if created_at is None:
        extra["createdAt"] = None
    cb = igv_order_status(
        IGV_SECRET,
        request_id=_unique(rng.choice(TOKENS)),
        timestamp_ms=timestamp,
        order_id=draw(big_ints),
        order_num=_text(rng),
        created_at=created_at or "",
        seller_order_status=draw(igv_statuses),
        buyer_id=rng.choice(["1907369850568257537", "b", "0"]),
        extra=extra,
    )
    return Base(cb, IGV_SECRET, timestamp=timestamp)


@st.composite
def gateway_bases(draw: st.DrawFn, callback: str) -> Base:
    rng = random.Random(draw(seeds))
    mch_id = rng.choice([MERCHANT_A, MERCHANT_B])
    key = GATEWAY_KEYS[str(mch_id)]
    common: dict[str, Any] = {
        "id": _unique(rng.choice(TOKENS)),
        "trans_id": _text(rng),
        "mch_id": mch_id,
        "order_amount": draw(amounts),
        "created_at": _text(rng),
        "extra": _extra_fields(rng, SCALARS),
    }
    maybe_text = [None, "2026-05-04 10:06:10", *TEXTS[:3]]
    if callback == "collect":
        cb = gateway_collect(
            key,
            payed_amount=draw(optional_amounts),
            channel=_text(rng),
            status=draw(collect_statuses),
            payed_at=rng.choice(maybe_text),
            **common,
        )
    else:
        cb = gateway_payout(
            key,
            status=draw(payout_statuses),
            payed_at=rng.choice(maybe_text),
            canceled_at=rng.choice(maybe_text),
            **common,
        )
    return Base(cb, key)


def _sud_order(rng: random.Random, order_id: str, value: int | None) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "order_id": order_id,
        "value": value,
        "seq": rng.choice([None, 0, 7, 2**40]),
        "payload": rng.choice([None, {}, {"score": 1}, NESTED[3], {"v": Decimal("1.5")}]),
        "status": rng.choice(["EXECUTE_SUCCESS", "EXECUTE_FAIL", "CREATED"]),
    }
    for name in ("out_order_id", "mg_id", "room_id", "cmd", "from_uid", "to_uid"):
        fields[name] = _text(rng)
    if rng.random() < 0.5:
        fields["out_group_id"] = rng.choice(TEXTS)
        fields["game_round_id"] = rng.choice(TEXTS)
    return sud_order(**fields)


@st.composite
def sud_bases(draw: st.DrawFn) -> Base:
    rng = random.Random(draw(seeds))
    app_id = rng.choice(sorted(SUD_APPS))
    secret = SUD_APPS[app_id]
    timestamp = str(NOW_MS + draw(window_offsets))
    nonce = rng.choice(TOKENS)
    options: dict[str, Any] = {
        "app_id": app_id,
        "notify_id": _unique(rng.choice(TOKENS)),
        "timestamp_ms": timestamp,
        "nonce": nonce,
        "extra": _extra_fields(rng, SCALARS + NESTED),
    }
    first = _sud_order(rng, _text(rng), draw(optional_big_ints))
    if draw(st.booleans()):
        cb = sud_order_changed(secret, **options, **first)
    else:
        orders = [first] + [_sud_order(rng, rng.choice(TEXTS), 1) for _ in range(rng.randrange(2))]
        cb = sud_order_batch_changed(secret, orders=orders, **options)
    return Base(cb, secret, timestamp=timestamp, nonce=nonce, app_id=app_id)


# -- choices inside a mutation --------------------------------------------------------


class Chooser:
    """The small choices of one mutation (which byte, which field, which
    digit), from one drawn seed: reproducible, and far cheaper than one
    Hypothesis draw each. Hypothesis draws the request and the mutation."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)

    def index(self, size: int) -> int:
        return self._rng.randrange(size)

    def pick(self, items: Sequence[T]) -> T:
        return items[self._rng.randrange(len(items))]

    def flag(self) -> bool:
        return self._rng.random() < 0.5

    def shuffled(self, items: Sequence[T]) -> list[T]:
        copy = list(items)
        self._rng.shuffle(copy)
        return copy

    def offset(self) -> int:
        """A timestamp offset around the window's edges, in milliseconds."""
        if self.flag():
            return self.pick(
                [-MAX_AGE_MS, -MAX_AGE_MS - 1, MAX_SKEW_MS, MAX_SKEW_MS + 1, -86_400_000, 0]
            )
        return self._rng.randint(-2 * MAX_AGE_MS, 4 * MAX_SKEW_MS)


_JSON_BYTES = list(b' \t"{}[],:0123456789-+.eEtfnul\\/x')

# -- JSON text edits ----------------------------------------------------------------

_TOKEN = re.compile(
    r'[ \t\n\r]*(?:"(?:[^"\\]|\\.)*"'
    r"|(?P<number>-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)"
    r"|true|false|null|[{}\[\]:,])"
)


def _token_spans(body: str) -> Iterator[re.Match[str]]:
    position = 0
    while position < len(body):
        match = _TOKEN.match(body, position)
        assert match is not None, body[position:]
        yield match
        position = match.end()


def _reformat(number: str, how: int) -> str:
    """The same number written another valid way (never the same text)."""
    match = re.fullmatch(r"(-?[0-9]+)(\.[0-9]+)?(?:([eE])([+-]?)([0-9]+))?", number)
    assert match is not None, number
    whole, fraction, e, sign, digits = match.groups(default="")
    if how % 3 == 0:
        return f"{whole}{fraction or '.'}0{e}{sign}{digits}"
    if not e:
        return f"{whole}{fraction}{'e0' if how % 3 == 1 else 'E+0'}"
    if how % 3 == 1:
        return f"{whole}{fraction}{e.swapcase()}{sign}{digits}"
    other_sign = {"+": "", "": "+", "-": "-0"}[sign]
    return f"{whole}{fraction}{e}{other_sign}{digits}"


def _retyped(raw: str) -> str | None:
    """The same text as the other JSON type (string <-> number), or None."""
    value = strict_parse(b'{"v":' + raw.encode() + b"}")["v"]
    if isinstance(value, str) and re.fullmatch(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?", value):
        return value
    if isinstance(value, int | Decimal) and not isinstance(value, bool):
        return dumps(raw)
    return None


def _other_value(raw: str, how: int) -> str:
    """A different JSON value whose signed text differs from ``raw``'s."""
    value = strict_parse(b'{"v":' + raw.encode() + b"}")["v"]
    if isinstance(value, str):
        return dumps(value + "X")
    if isinstance(value, bool) or value is None:
        return '"changed"'
    if isinstance(value, int):
        return str(value + 1 + how)
    if isinstance(value, Decimal):
        return str(value + Decimal("0.01"))
    return '"changed"'


BodyEdit = tuple[bytes, str]


def _body_edit(c: Chooser, body: bytes, edit: str) -> BodyEdit:
    """Apply one JSON-level edit to ``body``; returns the new body and a note."""
    text_body = body.decode("utf-8")
    pairs = split_object(text_body)
    if edit == "drop_field":
        index = c.index(len(pairs))
        return join_object(pairs[:index] + pairs[index + 1 :]), pairs[index][0]
    if edit == "duplicate_field":
        index = c.index(len(pairs))
        copy = (pairs[index][0], c.pick([pairs[index][1], '"other"', "1"]))
        at = c.index(len(pairs) + 1)
        return join_object([*pairs[:at], copy, *pairs[at:]]), pairs[index][0]
    if edit == "reorder":
        return join_object(c.shuffled(pairs)), ""
    if edit == "whitespace":
        spans = list(_token_spans(text_body))
        at = c.pick(spans).end()
        blank = "".join(c.pick(" \t\n\r") for _ in range(1 + c.index(3)))
        return (text_body[:at] + blank + text_body[at:]).encode("utf-8"), ""
    if edit == "reformat_number":
        numbers = [m for m in _token_spans(text_body) if m.group("number")]
        if not numbers:
            return body, ""
        match = c.pick(numbers)
        new = _reformat(match.group("number"), c.index(3))
        start, end = match.span("number")
        return (text_body[:start] + new + text_body[end:]).encode("utf-8"), ""
    if edit == "retype":
        # The same text as a string or as a number.
        options = [(i, text) for i, (_, raw) in enumerate(pairs) if (text := _retyped(raw))]
        if not options:
            return body, ""
        index, retyped = c.pick(options)
        name = pairs[index][0]
        return join_object([*pairs[:index], (name, retyped), *pairs[index + 1 :]]), name
    if edit == "change_value":
        index = c.index(len(pairs))
        name, raw = pairs[index]
        new = _other_value(raw, c.index(6))
        return join_object([*pairs[:index], (name, new), *pairs[index + 1 :]]), name
    if edit == "add_field":
        value = c.pick(SCALARS)
        name = c.pick(EXTRA_KEYS)
        while name in dict(pairs):
            name += "_"
        at = c.index(len(pairs) + 1)
        raw = str(value) if isinstance(value, Decimal) else dumps(value)
        return join_object([*pairs[:at], (name, raw), *pairs[at:]]), name
    raise AssertionError(edit)


BODY_EDITS = [
    "drop_field",
    "duplicate_field",
    "reorder",
    "whitespace",
    "reformat_number",
    "retype",
    "change_value",
    "add_field",
]


def _replace_byte(c: Chooser, body: bytes) -> bytes:
    index = c.index(len(body))
    new = c.pick(_JSON_BYTES) if c.flag() else c.index(256)
    if new == body[index]:
        new ^= 0x01
    return body[:index] + bytes([new]) + body[index + 1 :]


def _replace_char(c: Chooser, value: str, alphabet: str) -> str:
    index = c.index(len(value))
    new = c.pick([char for char in alphabet if char != value[index]])
    return value[:index] + new + value[index + 1 :]


def _bad_signature(c: Chooser, signature: str) -> str:
    """A signature that must not verify: other digit, length or whitespace."""
    how = c.pick(["digit", "short", "long", "space", "nonhex"])
    if how == "digit":
        index = c.index(len(signature))
        other = [char for char in HEX if char != signature[index].lower()]
        return signature[:index] + c.pick(other) + signature[index + 1 :]
    if how == "short":
        return signature[: 1 + c.index(len(signature) - 1)]
    if how == "long":
        return signature + "".join(c.pick(HEX) for _ in range(1 + c.index(4)))
    if how == "space":
        index = 1 + c.index(len(signature) - 1)
        return signature[:index] + " " + signature[index:]
    return _replace_char(c, signature, "ghijklmnopqrstuvwxyzGHIJKLMNOPQRSTUVWXYZ-_.")


def _claimed_timestamp(c: Chooser) -> int:
    """A millisecond timestamp around now, sometimes in seconds instead."""
    stamp = NOW_MS + c.offset()
    if c.flag():
        stamp //= 1000  # seconds where milliseconds are expected
    return stamp


def _missing_header(
    c: Chooser, headers: list[tuple[str, str]], mutation: str, names: Sequence[str]
) -> tuple[list[tuple[str, str]], Refusal]:
    """``drop_header`` / ``empty_header``: one of the signed ``names`` gone or blank."""
    name = c.pick(names)
    if mutation == "drop_header":
        headers = [(n, v) for n, v in headers if n != name]
    else:
        headers = _set_header(headers, name, "")
    return headers, Refusal(401, f"The {name} header is missing or empty.")


def _window(timestamp: int, what: str) -> Refusal | None:
    age = NOW_MS - timestamp
    if age > MAX_AGE_MS:
        return Refusal(401, f"The {what} is older than 3600 seconds.")
    if -age > MAX_SKEW_MS:
        return Refusal(401, f"The {what} is more than 300 seconds in the future.")
    return None


# -- iGV -------------------------------------------------------------------------------


def _igv_expect(body: bytes, request_id: str, timestamp: str) -> Refusal | list[Accepted]:
    try:
        outcome = igv_outcome(body)
    except Refusal as refusal:
        return refusal
    if outcome.signal == "callback-unhandled":
        fields = {**outcome.fields, "provider": "igv", "callback": "order-status"}
        return [Accepted(outcome.signal, {**fields, "key": request_id})]
    moment = datetime.fromtimestamp(int(timestamp) / 1000, tz=UTC)
    fields = {**outcome.fields, "request_id": request_id, "timestamp": moment}
    return [Accepted(outcome.signal, fields)]


# The mutations of a protocol that signs headers (iGV and SUD).
HEADER_SIGNED_MUTATIONS = [
    "none",
    "replace_body_byte",
    "replace_header_char",
    "bad_signature",
    "upper_signature",
    "drop_header",
    "empty_header",
    "repeat_header",
    "wrong_secret",
    "timestamp",
]

IGV_MUTATIONS = [*HEADER_SIGNED_MUTATIONS, *BODY_EDITS]
IGV_HEADERS = ("X-Timestamp", "X-Request-Id", "X-Signature")


def igv_case(c: Chooser, base: Base, mutation: str) -> Case:
    cb = base.cb
    headers = _headers(cb)
    request_id = cb.headers["X-Request-Id"]
    timestamp = base.timestamp
    body = cb.body
    mismatch = Refusal(401, "The X-Signature does not match.")
    expect: Refusal | list[Accepted]
    if mutation == "none":
        expect = _igv_expect(body, request_id, timestamp)
    elif mutation == "replace_body_byte":
        body = _replace_byte(c, body)
        expect = _igv_expect(body, request_id, timestamp)
    elif mutation == "replace_header_char":
        name = c.pick(IGV_HEADERS[:2])
        headers = _set_header(headers, name, _replace_char(c, cb.headers[name], HEADER_CHARS))
        expect = mismatch
    elif mutation == "bad_signature":
        headers = _set_header(headers, "X-Signature", _bad_signature(c, cb.headers["X-Signature"]))
        expect = mismatch
    elif mutation == "upper_signature":
        headers = _set_header(headers, "X-Signature", cb.headers["X-Signature"].upper())
        expect = _igv_expect(body, request_id, timestamp)
    elif mutation in ("drop_header", "empty_header"):
        headers, expect = _missing_header(c, headers, mutation, IGV_HEADERS)
    elif mutation == "repeat_header":
        name = c.pick(IGV_HEADERS)
        again = c.pick([cb.headers[name], *TOKENS])
        headers = [*headers, (name, again)]
        expect = mismatch
    elif mutation == "wrong_secret":
        secret = c.pick(
            [IGV_OLD_SECRET, IGV_SECRET.lower(), IGV_SECRET[:-1], IGV_SECRET + " ", "x"]
        )
        headers = _set_header(headers, "X-Signature", igv_sign(timestamp, request_id, secret))
        expect = mismatch
    elif mutation == "timestamp":
        stamp = _claimed_timestamp(c)
        timestamp = str(stamp)
        headers = _set_header(headers, "X-Timestamp", timestamp)
        headers = _set_header(headers, "X-Signature", igv_sign(timestamp, request_id, IGV_SECRET))
        expect = _window(stamp, "X-Timestamp") or _igv_expect(body, request_id, timestamp)
    else:
        body, _ = _body_edit(c, body, mutation)
        expect = _igv_expect(body, request_id, timestamp)
        # The table's promises for an unsigned body, checked against the oracle.
        if mutation in ("reorder", "whitespace", "add_field"):
            assert isinstance(expect, list)
        if mutation == "duplicate_field":
            assert isinstance(expect, Refusal)
            assert expect.reason.startswith("The body repeats the key")
    return Case(cb.url(), body, headers, expect, request_id)


# -- gateway ---------------------------------------------------------------------------


def _gateway_expect(callback: str, body: bytes) -> Refusal | list[Accepted]:
    try:
        return [gateway_outcome(callback, body, GATEWAY_KEYS)]
    except Refusal as refusal:
        return refusal


def _resign(body: bytes, key: str) -> bytes:
    pairs = split_object(body.decode("utf-8"))
    data = strict_parse(body)
    texts = {name: signed_text(value) for name, value in data.items()}
    sign = dumps(gateway_sign(texts, key))
    return join_object([(n, sign if n == "sign" else v) for n, v in pairs])


def _with_field(body: bytes, name: str, raw: str) -> bytes:
    pairs = split_object(body.decode("utf-8"))
    return join_object([(n, raw if n == name else v) for n, v in pairs])


GATEWAY_MUTATIONS = [
    "none",
    "replace_body_byte",
    "bad_signature",
    "upper_signature",
    "drop_sign",
    "odd_sign",
    "wrong_key",
    "other_merchant",
    "unknown_merchant",
    "add_field_resigned",
    *BODY_EDITS,
]


def gateway_case(c: Chooser, base: Base, mutation: str) -> Case:
    cb = base.cb
    callback = cb.callback
    body = cb.body
    fields = dict(split_object(body.decode("utf-8")))
    sign = strict_parse(body)["sign"]
    signed_reject = Refusal(401, "fail")
    expect: Refusal | list[Accepted]
    if mutation == "none":
        expect = _gateway_expect(callback, body)
        assert isinstance(expect, list)
    elif mutation == "replace_body_byte":
        body = _replace_byte(c, body)
        expect = _gateway_expect(callback, body)
    elif mutation == "bad_signature":
        body = _with_field(body, "sign", dumps(_bad_signature(c, sign)))
        expect = signed_reject
    elif mutation == "upper_signature":
        body = _with_field(body, "sign", dumps(sign.upper()))
        expect = signed_reject if sign.upper() != sign else _gateway_expect(callback, body)
    elif mutation == "drop_sign":
        pairs = split_object(body.decode("utf-8"))
        body = join_object([(n, v) for n, v in pairs if n != "sign"])
        expect = signed_reject
    elif mutation == "odd_sign":
        odd = c.pick(["null", '""', "0", "true", "[]", "{}", dumps([sign])])
        body = _with_field(body, "sign", odd)
        expect = signed_reject
    elif mutation == "wrong_key":
        key = c.pick([k for k in [*GATEWAY_KEYS.values(), *TOKENS] if k != base.secret])
        body = _resign(body, key)
        expect = signed_reject
    elif mutation in ("other_merchant", "unknown_merchant"):
        mch_id = int(fields["mch_id"])
        other = {MERCHANT_A: MERCHANT_B, MERCHANT_B: MERCHANT_A}[mch_id]
        if mutation == "unknown_merchant":
            other = c.pick([10003, 0, -1, 2**70])
        body = _with_field(body, "mch_id", str(other))
        if c.flag():
            # The right signature, for a merchant the key does not belong to.
            body = _resign(body, base.secret)
        expect = signed_reject
    elif mutation == "add_field_resigned":
        body, _ = _body_edit(c, body, "add_field")
        body = _resign(body, base.secret)
        expect = _gateway_expect(callback, body)
        assert isinstance(expect, list)
    else:
        original = strict_parse(body)
        body, name = _body_edit(c, body, mutation)
        expect = _gateway_expect(callback, body)
        # The table's promises, checked against the oracle.
        if mutation in ("reorder", "whitespace"):
            assert isinstance(expect, list)
        if mutation == "duplicate_field":
            assert isinstance(expect, Refusal)
            assert expect.status == 400
        if mutation in ("drop_field", "change_value") and signed_text(original[name]) is not None:
            assert isinstance(expect, Refusal)
            assert expect.status == 401
        if mutation == "reformat_number":
            assert isinstance(expect, Refusal)
            assert expect.status == 401
    return Case(cb.url(), body, _headers(cb), expect, cb.key)


# -- SUD -------------------------------------------------------------------------------


def _sud_events(body: bytes) -> list[Accepted]:
    data = strict_parse(body)
    common = {
        "notify_id": data["notify_id"],
        "notify_time": datetime.fromtimestamp(int(data["notify_time"]) / 1000, tz=UTC),
        "app_id": data["app_id"],
        "notify_event": data["notify_event"],
    }
    if data["notify_event"] == "sud.mg.merchant.order.changed":
        orders = [(data["data"], data["data"])]
    else:
        shared = {k: data["data"][k] for k in ("mg_id", "room_id")}
        orders = [({**shared, **entry}, entry) for entry in data["data"]["orders"]]
    events = []
    for order, raw in orders:
        fields = {
            name: order.get(name)
            for name in (
                "order_id",
                "out_order_id",
                "out_group_id",
                "mg_id",
                "room_id",
                "game_round_id",
                "cmd",
                "from_uid",
                "to_uid",
                "value",
                "seq",
                "payload",
                "status",
            )
        }
        events.append(Accepted("game-order-changed", {**common, **fields, "raw": raw}))
    return events


SUD_HEADERS = ("Sud-AppId", "Sud-Timestamp", "Sud-Nonce", "Sud-Signature")

SUD_MUTATIONS = [*HEADER_SIGNED_MUTATIONS, "app_mismatch", "resigned_edit", *BODY_EDITS]


def sud_case(c: Chooser, base: Base, mutation: str) -> Case:
    cb = base.cb
    headers = _headers(cb)
    body = cb.body
    app_id, timestamp, nonce = base.app_id, base.timestamp, base.nonce
    mismatch = Refusal(401, "The Sud-Signature does not match.")

    def signed(new_body: bytes, secret: str = base.secret) -> list[tuple[str, str]]:
        signature = sud_sign(app_id, timestamp, nonce, new_body, secret)
        return _set_header(
            _set_header(headers, "Sud-Timestamp", timestamp), "Sud-Signature", signature
        )

    expect: Refusal | list[Accepted]
    if mutation == "none":
        expect = _sud_events(body)
    elif mutation == "replace_body_byte":
        body = _replace_byte(c, body)
        expect = mismatch
    elif mutation == "replace_header_char":
        name = c.pick(SUD_HEADERS[:3])
        value = _replace_char(c, _header(headers, name), HEADER_CHARS)
        headers = _set_header(headers, name, value)
        expect = mismatch
        if name == "Sud-AppId" and value not in SUD_APPS:
            expect = Refusal(401, "The Sud-AppId is not configured.")
    elif mutation == "bad_signature":
        value = _bad_signature(c, _header(headers, "Sud-Signature"))
        headers = _set_header(headers, "Sud-Signature", value)
        expect = mismatch
    elif mutation == "upper_signature":
        value = _header(headers, "Sud-Signature")
        headers = _set_header(headers, "Sud-Signature", value.upper())
        expect = mismatch if value.upper() != value else _sud_events(body)
    elif mutation in ("drop_header", "empty_header"):
        headers, expect = _missing_header(c, headers, mutation, SUD_HEADERS)
    elif mutation == "repeat_header":
        name = c.pick(SUD_HEADERS)
        again = c.pick([_header(headers, name), *TOKENS])
        headers = [*headers, (name, again)]
        expect = mismatch
        if name == "Sud-AppId":
            expect = Refusal(401, "The Sud-AppId is not configured.")
    elif mutation == "wrong_secret":
        secret = c.pick([k for k in [*SUD_APPS.values(), *TOKENS] if k != base.secret])
        headers = signed(body, secret)
        expect = mismatch
    elif mutation == "timestamp":
        stamp = _claimed_timestamp(c)
        timestamp = str(stamp)
        headers = signed(body)
        expect = _window(stamp, "Sud-Timestamp") or _sud_events(body)
    elif mutation == "app_mismatch":
        other = next(a for a in sorted(SUD_APPS) if a != app_id)
        body = _with_field(body, "app_id", dumps(other))
        headers = signed(body)
        expect = Refusal(401, "The body's app_id is not the Sud-AppId header's.")
    elif mutation == "resigned_edit":
        edit = c.pick(["reorder", "whitespace", "add_field", "duplicate_field"])
        body, name = _body_edit(c, body, edit)
        headers = signed(body)
        if edit == "duplicate_field":
            expect = Refusal(400, f"The body repeats the key {name!r}.")
        else:
            expect = _sud_events(body)
    else:
        new_body, _ = _body_edit(c, body, mutation)
        expect = mismatch if new_body != body else _sud_events(body)
        body = new_body
    return Case(cb.url(), body, headers, expect, cb.key)


# -- running a case ------------------------------------------------------------------


def run_case(target: Target, case: Case) -> None:
    platform = PLATFORM_OF_PATH[case.path]
    response = target.post(case.path, case.body, case.headers)
    if isinstance(case.expect, Refusal):
        assert answer_of(platform, response) == refused(
            platform, case.expect.status, case.expect.reason
        )
        assert target.recorder.events == []
    else:
        assert answer_of(platform, response) == ok(platform)
        events = target.recorder.events
        assert [e.signal for e in events] == [a.signal for a in case.expect]
        for captured, accepted in zip(events, case.expect, strict=True):
            check_event(captured.event, accepted.fields)
        target.verified.add((platform, case.path.rsplit("/", 1)[1], case.key))
    # One row per verified delivery, none for anything refused: the fixture's
    # final check then proves they are the right rows, all done.
    assert target.count() == len(target.verified)


@pytest.fixture(scope="module")
def hypo_target(make_sqlite_target: TargetFactory) -> Target:
    # The extension's own store on a SQLite file (in shared memory when the
    # machine has it): what most hosts start with, without the disk's fsyncs.
    return make_sqlite_target(host_db=False, memory=True)


def _run(target: Target, case: Case, mutation: str) -> None:
    status = case.expect.status if isinstance(case.expect, Refusal) else 200
    # Shown by --hypothesis-show-statistics: how often each attack got each answer.
    event(f"{mutation} -> {status}")
    note(f"POST {case.path} {case.headers!r} {case.body!r}")
    run_case(target, case)


@SECURITY_PROFILE
@given(base=igv_bases(), mutation=st.sampled_from(IGV_MUTATIONS), seed=seeds)
def test_igv_order_status_mutations(
    hypo_target: Target, base: Base, mutation: str, seed: int
) -> None:
    _run(hypo_target, igv_case(Chooser(seed), base, mutation), mutation)


@SECURITY_PROFILE
@given(base=gateway_bases("collect"), mutation=st.sampled_from(GATEWAY_MUTATIONS), seed=seeds)
def test_gateway_collect_mutations(
    hypo_target: Target, base: Base, mutation: str, seed: int
) -> None:
    _run(hypo_target, gateway_case(Chooser(seed), base, mutation), mutation)


@SECURITY_PROFILE
@given(base=gateway_bases("payout"), mutation=st.sampled_from(GATEWAY_MUTATIONS), seed=seeds)
def test_gateway_payout_mutations(
    hypo_target: Target, base: Base, mutation: str, seed: int
) -> None:
    _run(hypo_target, gateway_case(Chooser(seed), base, mutation), mutation)


@SECURITY_PROFILE
@given(base=sud_bases(), mutation=st.sampled_from(SUD_MUTATIONS), seed=seeds)
def test_sud_order_changed_mutations(
    hypo_target: Target, base: Base, mutation: str, seed: int
) -> None:
    _run(hypo_target, sud_case(Chooser(seed), base, mutation), mutation)
