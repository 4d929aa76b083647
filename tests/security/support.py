"""What the security suite knows independently of the library.

The signers and the body oracle here are written from ``PROTOCOLS.md``, not
imported from :mod:`flask_orderhooks`: a mistake shared by the verifier and
the test's own signer would otherwise make a forged request look valid to
both. The oracle decides, for a body the platform never sent (a mutated one),
what the specification says the answer must be.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from werkzeug.test import TestResponse

# -- secrets: explicit, distinctive, and never expected in any output ---------------

NOW = 1_767_225_600  # 2026-01-01T00:00:00Z
NOW_MS = NOW * 1000

IGV_SECRET = "Qm7vT2xK9pLr4WnB8cYd3FsH6jGa1ZeU"
IGV_OLD_SECRET = "Ol5dS3crEt7KeyRotatedAway0000xyz"
MERCHANT_A = 10001
MERCHANT_B = 10002
GATEWAY_KEYS = {str(MERCHANT_A): "gw-key-A-7f3c9d21", str(MERCHANT_B): "gw-key-B-0e8b4a56"}
GATEWAY_OLD_KEY = "gw-key-A-retired-5521"
SUD_APP_A = "1461564080052506636"
SUD_APP_B = "1461564080052506999"
SUD_APPS = {SUD_APP_A: "sud-secret-A-93kd8s", SUD_APP_B: "sud-secret-B-x71mq0"}
SUD_OLD_SECRET = "sud-secret-A-retired-4k2"
#: A password in the database URL: trust authentication ignores it, the
#: secrets test proves it never shows.
DB_PASSWORD = "Db-Pa55word-9d7e1c"

ALL_SECRETS: tuple[str, ...] = (
    IGV_SECRET,
    IGV_OLD_SECRET,
    *GATEWAY_KEYS.values(),
    GATEWAY_OLD_KEY,
    *SUD_APPS.values(),
    SUD_OLD_SECRET,
    DB_PASSWORD,
)

# -- answers ---------------------------------------------------------------------

#: An answer as the platform reads it: status, and the text body (iGV, gateway)
#: or the parsed JSON body (SUD).
Answer = tuple[int, Any]

PLATFORM_OF_PATH = {
    "/orderhooks/igv/order-status": "igv",
    "/orderhooks/gateway/collect": "gateway",
    "/orderhooks/gateway/payout": "gateway",
    "/orderhooks/sud/order-changed": "sud",
}

IGV_PATH = "/orderhooks/igv/order-status"
COLLECT_PATH = "/orderhooks/gateway/collect"
PAYOUT_PATH = "/orderhooks/gateway/payout"
SUD_PATH = "/orderhooks/sud/order-changed"


def ok(platform: str) -> Answer:
    """The documented success answer of ``platform``."""
    if platform == "igv":
        return 200, "OK"
    if platform == "gateway":
        return 200, "success"
    return 200, {"ret_code": 0, "ret_msg": "SUCCESS"}


def refused(platform: str, status: int, reason: str) -> Answer:
    """The documented failure answer of ``platform`` for ``status``."""
    if platform == "igv":
        return status, reason
    if platform == "gateway":
        return status, "fail"
    return status, {"ret_code": status, "ret_msg": reason}


def answer_of(platform: str, response: TestResponse) -> Answer:
    """The response as the platform reads it; the content type must be its own."""
    if platform == "sud":
        assert response.mimetype == "application/json", response.data
        return response.status_code, response.get_json()
    assert response.mimetype == "text/plain", response.data
    return response.status_code, response.get_data(as_text=True)


# -- signers, from the protocol text ---------------------------------------------


def igv_sign(timestamp: str, request_id: str, secret: str) -> str:
    """``hex(HMAC-SHA256(secret, X-Timestamp + X-Request-Id + secret))``."""
    message = (timestamp + request_id + secret).encode("utf-8")
    return hmac.new(secret.encode("utf-8"), message, hashlib.sha256).hexdigest()


def sud_sign(app_id: str, timestamp: str, nonce: str, body: bytes, secret: str) -> str:
    """Lower-case hex HMAC-SHA1 of ``app_id\\ntimestamp\\nnonce\\nbody\\n``."""
    message = f"{app_id}\n{timestamp}\n{nonce}\n".encode() + body + b"\n"
    return hmac.new(secret.encode("utf-8"), message, hashlib.sha1).hexdigest()


def gateway_sign_text(fields: Mapping[str, str | None], key: str) -> str:
    """``k1=v1&k2=v2…&key=KEY`` over the non-empty fields but ``sign``, sorted."""
    params = "&".join(
        f"{name}={fields[name]}"
        for name in sorted(fields)
        if name != "sign" and fields[name] is not None
    )
    return f"{params}&key={key}"


def gateway_sign(fields: Mapping[str, str | None], key: str) -> str:
    """The gateway's ``sign``: lower-case hex MD5 of :func:`gateway_sign_text`."""
    text = gateway_sign_text(fields, key)
    return hashlib.md5(text.encode("utf-8"), usedforsecurity=False).hexdigest()


# -- requests with arbitrary bodies, signed the way each platform signs ----------


def igv_headers(
    request_id: str, *, timestamp: str | None = None, secret: str = IGV_SECRET
) -> dict[str, str]:
    """Valid iGV headers: the body is not signed, so any body goes with them."""
    stamp = str(NOW_MS) if timestamp is None else timestamp
    return {
        "Content-Type": "application/json",
        "X-Request-Id": request_id,
        "X-Timestamp": stamp,
        "X-Signature": igv_sign(stamp, request_id, secret),
    }


def sud_headers(
    body: bytes,
    *,
    app_id: str = SUD_APP_A,
    timestamp: str | None = None,
    nonce: str = "nonce-1",
    secret: str | None = None,
) -> dict[str, str]:
    """SUD headers signing exactly ``body`` (with the app's secret by default)."""
    stamp = str(NOW_MS) if timestamp is None else timestamp
    key = SUD_APPS[app_id] if secret is None else secret
    return {
        "Content-Type": "application/json",
        "Sud-AppId": app_id,
        "Sud-Timestamp": stamp,
        "Sud-Nonce": nonce,
        "Sud-Signature": sud_sign(app_id, stamp, nonce, body, key),
    }


def gateway_body(fields: Mapping[str, Any], key: str | None = None) -> bytes:
    """A gateway body with ``sign`` computed over ``fields`` (values as JSON
    text: a :class:`Decimal` is written as a number with its own text)."""
    pairs = [(name, str(v) if isinstance(v, Decimal) else dumps(v)) for name, v in fields.items()]
    if key is None:
        key = GATEWAY_KEYS[str(fields["mch_id"])]
    texts = {
        name: signed_text(strict_parse(b'{"v":' + raw.encode() + b"}")["v"]) for name, raw in pairs
    }
    return join_object([*pairs, ("sign", dumps(gateway_sign(texts, key)))])


# -- JSON as text: bodies as (key, raw value text) pairs --------------------------

_WS = re.compile(r"[ \t\n\r]*")
_INTEGER = re.compile(r"-?[0-9]+")
_decoder = json.JSONDecoder()


def split_object(text: str) -> list[tuple[str, str]]:
    """The top-level ``(key, raw JSON text of the value)`` pairs of an object.

    Mutations edit these pairs, so a number keeps the exact text it was
    written with (the gateway signs that text). ``text`` must be valid JSON.
    """
    pairs: list[tuple[str, str]] = []
    index = _WS.match(text, 0).end()  # type: ignore[union-attr]
    if text[index] != "{":
        raise ValueError("not an object")
    index = _WS.match(text, index + 1).end()  # type: ignore[union-attr]
    if text[index] == "}":
        return pairs
    while True:
        key, index = _decoder.raw_decode(text, index)
        index = _WS.match(text, index).end()  # type: ignore[union-attr]
        if text[index] != ":":
            raise ValueError("expected a colon")
        start = _WS.match(text, index + 1).end()  # type: ignore[union-attr]
        _, end = _decoder.raw_decode(text, start)
        pairs.append((key, text[start:end]))
        index = _WS.match(text, end).end()  # type: ignore[union-attr]
        if text[index] == "}":
            return pairs
        if text[index] != ",":
            raise ValueError("expected a comma")
        index = _WS.match(text, index + 1).end()  # type: ignore[union-attr]


def join_object(pairs: Sequence[tuple[str, str]], *, comma: str = ",", colon: str = ":") -> bytes:
    """Write pairs back as a JSON object (compact unless told otherwise)."""
    inner = comma.join(f"{json.dumps(k, ensure_ascii=False)}{colon}{v}" for k, v in pairs)
    return ("{" + inner + "}").encode("utf-8")


def dumps(value: object) -> str:
    """Compact JSON text of a value, the way the testing kit writes bodies."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


# -- the oracle -------------------------------------------------------------------


class Refusal(Exception):
    """The specification's answer for a request that must be refused."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


class _Number(Decimal):
    """A JSON non-integer number that keeps its text."""

    text: str

    def __new__(cls, text: str) -> _Number:
        number = super().__new__(cls, text)
        number.text = text
        return number


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise Refusal(400, f"The body repeats the key {key[:80]!r}.")
        seen[key] = value
    return seen


def _no_constant(name: str) -> Any:
    raise Refusal(400, f"The body contains {name}, which is not JSON.")


_strict = json.JSONDecoder(
    object_pairs_hook=_no_duplicates, parse_float=_Number, parse_constant=_no_constant
)


def strict_parse(body: bytes) -> dict[str, Any]:
    """The body as one strict UTF-8 JSON object, or the 400 the spec demands."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise Refusal(400, "The body is not valid UTF-8.") from None
    try:
        value = _strict.decode(text)
    except json.JSONDecodeError as exc:
        raise Refusal(
            400,
            f"The body is not valid JSON ({exc.msg.removesuffix(' at')} at character {exc.pos}).",
        ) from None
    except (ValueError, RecursionError):
        raise Refusal(400, "The body is not JSON this service accepts.") from None
    if not isinstance(value, dict):
        kind = (
            "array"
            if isinstance(value, list)
            else "string"
            if isinstance(value, str)
            else "literal"
            if value is None or isinstance(value, bool)
            else "number"
        )
        raise Refusal(400, f"The body must be a JSON object, not a {kind}.")
    return value


def signed_text(value: Any) -> str | None:
    """How the gateway writes a parsed value into its sign string (None: left out)."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, _Number):
        return value.text
    if isinstance(value, int):
        return str(value)
    return _compact(value)


def _compact(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ",".join(f"{dumps(k)}:{_compact(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_compact(v) for v in value) + "]"
    if isinstance(value, _Number):
        return value.text
    return dumps(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _need_int(data: Mapping[str, Any], name: str) -> int:
    value = data.get(name)
    if not _is_int(value):
        raise Refusal(400, f"The field {name!r} must be an integer.")
    assert isinstance(value, int)
    return value


def _need_str(data: Mapping[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value:
        raise Refusal(400, f"The field {name!r} must be a non-empty string.")
    return value


def _maybe_str(data: Mapping[str, Any], name: str) -> str | None:
    value = data.get(name)
    if value is not None and not isinstance(value, str):
        raise Refusal(400, f"The field {name!r} must be a string or null.")
    return value


def _amount(data: Mapping[str, Any], name: str, *, required: bool) -> Decimal | None:
    value = data.get(name)
    if value is None and not required:
        return None
    if isinstance(value, _Number) or (isinstance(value, int) and not isinstance(value, bool)):
        return Decimal(value)
    # As a string, an amount is plain ASCII digits with an optional fraction:
    # no exponent, sign "+", spaces, underscores or non-ASCII digits.
    if isinstance(value, str) and re.fullmatch(r"-?[0-9]{1,30}(\.[0-9]{1,30})?", value):
        return Decimal(value)
    raise Refusal(400, f"The field {name!r} must be a decimal amount.")


@dataclass(frozen=True)
class Accepted:
    """The specification accepts the request: these events must be sent."""

    signal: str
    fields: dict[str, Any] = field(default_factory=dict)


def igv_outcome(body: bytes) -> Accepted:
    """What a correctly signed iGV request with ``body`` must produce.

    :raises Refusal: the body is not one the specification accepts.
    """
    data = strict_parse(body)
    status = _need_int(data, "sellerOrderStatus")
    if status != 1:
        return Accepted("callback-unhandled", {"kind": f"sellerOrderStatus={status}", "raw": data})
    return Accepted(
        "order-pending-delivery",
        {
            "order_id": _need_int(data, "orderId"),
            "order_num": _need_str(data, "orderNum"),
            "seller_order_status": status,
            "buyer_id": _need_str(data, "buyerId"),
            "created_at": _maybe_str(data, "createdAt"),
            "raw": data,
        },
    )


def gateway_outcome(callback: str, body: bytes, keys: Mapping[str, str]) -> Accepted:
    """What the gateway route must answer to ``body`` (``keys``: mch_id → key).

    :raises Refusal: 400 for a body that is not strict JSON or lacks a field,
        401 for a ``sign`` that does not cover exactly these values.
    """
    data = strict_parse(body)
    given = data.get("sign")
    if not isinstance(given, str) or not given:
        raise Refusal(401, "sign")
    mch_id = data.get("mch_id")
    merchant = str(mch_id) if _is_int(mch_id) or isinstance(mch_id, str) else ""
    key = keys.get(merchant)
    if key is None:
        raise Refusal(401, "merchant")
    texts = {name: signed_text(value) for name, value in data.items()}
    if not hmac.compare_digest(gateway_sign(texts, key), given):
        raise Refusal(401, "sign")
    fields: dict[str, Any] = {
        "status": _need_int(data, "status"),
        "id": _need_str(data, "id"),
        "trans_id": _need_str(data, "trans_id"),
        "mch_id": _need_int(data, "mch_id"),
        "order_amount": _amount(data, "order_amount", required=True),
        "created_at": _maybe_str(data, "created_at"),
        "payed_at": _maybe_str(data, "payed_at"),
    }
    if callback == "collect":
        fields["payed_amount"] = _amount(data, "payed_amount", required=False)
        fields["channel"] = _maybe_str(data, "channel")
        return Accepted("payment-collected", {**fields, "raw": data})
    fields["canceled_at"] = _maybe_str(data, "canceled_at")
    return Accepted("payout-finished", {**fields, "raw": data})


def check_event(event: object, expected: Mapping[str, Any]) -> None:
    """Every expected attribute of ``event`` is exactly (type and value) as given."""
    for name, value in expected.items():
        actual = getattr(event, name)
        assert actual == value, (name, actual, value)
        if isinstance(value, int):
            # An exact integer must not arrive as a float or a Decimal.
            assert type(actual) is type(value), (name, type(actual), type(value))


def contains_any(haystack: str, needles: Sequence[str]) -> list[str]:
    """The needles found in ``haystack`` (to name the leaked secret)."""
    return [needle for needle in needles if needle and needle in haystack]
