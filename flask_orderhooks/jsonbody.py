"""Strict JSON for signed bodies.

The standard parser is lenient in ways that matter when money rides on the
body: it guesses UTF-16/32 from bytes, accepts ``NaN`` and ``Infinity``, lets
the last of two duplicate keys win (a signer and a parser could then read
different values), and turns ``100.00`` into the float ``100.0``. This module
refuses the first three and keeps every number exact, remembering the text a
decimal number was written with because the gateway signs that text.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

from .exc import MalformedPayload
from .logtext import quoted


class JSONDecimal(Decimal):
    """A :class:`~decimal.Decimal` that remembers its JSON text (``"1e5"``
    stays ``"1e5"``, where ``str(Decimal("1e5"))`` is ``"1E+5"``)."""

    json_text: str

    def __new__(cls, text: str) -> JSONDecimal:
        number = super().__new__(cls, text)
        number.json_text = text
        return number


def _refuse_constant(name: str) -> Any:
    raise MalformedPayload(f"The body contains {name}, which is not JSON.")


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                # Cut short: the gateway's body is parsed before it is
                # verified, and the reason goes into the log and the answer.
                raise MalformedPayload(f"The body repeats the key {quoted(key)}.")
            seen.add(key)
    return obj


_decoder = json.JSONDecoder(
    object_pairs_hook=_object_without_duplicates,
    parse_float=JSONDecimal,
    parse_constant=_refuse_constant,
)


def parse_object(body: bytes) -> dict[str, Any]:
    """Parse ``body`` as one UTF-8 JSON object.

    :raises MalformedPayload: for anything else, with a reason that says what.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedPayload("The body is not valid UTF-8.") from None
    try:
        value = _decoder.decode(text)
    except json.JSONDecodeError as exc:
        raise MalformedPayload(
            f"The body is not valid JSON ({exc.msg.removesuffix(' at')} at character {exc.pos})."
        ) from None
    except (ValueError, RecursionError):
        # int() refuses numbers past sys.get_int_max_str_digits(); very deep
        # nesting exhausts the recursion limit. Both are hostile, not data.
        raise MalformedPayload("The body is not JSON this service accepts.") from None
    if not isinstance(value, dict):
        raise MalformedPayload(f"The body must be a JSON object, not {_json_type(value)}.")
    # Strict UTF-8 never decodes to a surrogate; only a "\ud800" escape
    # does, and no receiver or database can then store that string.
    if "\\u" in text and _has_lone_surrogate(value):
        raise MalformedPayload("The body contains a lone surrogate, which is not text.")
    return value


def _has_lone_surrogate(value: object) -> bool:
    # Iterative: the body may nest as deep as the parser allowed.
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _json_type(value: object) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None or isinstance(value, bool):
        return "a literal"
    return "a number"


def render_value(value: object) -> str:
    """Render a parsed JSON value as the text it was written with, for signing.

    Strings are their decoded text, numbers their JSON text, booleans
    ``true``/``false``; nested objects and arrays compact JSON, with every
    number in them bare and exactly as written (``{"fee":1.50}``).
    """
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, JSONDecimal):
        return value.json_text
    if isinstance(value, int):
        return str(value)
    return _compact(value)


class _Text(str):
    """Output text queued between the values :func:`_compact` renders."""


def _compact(value: object) -> str:
    """Compact JSON (``json.dumps(separators=(",", ":"), ensure_ascii=False)``)
    in which a :class:`JSONDecimal` is a bare number with its own text.

    ``json.dumps(default=)`` cannot do that: whatever ``default`` returns is
    encoded again, so a number's text would come out quoted. Iterative, as
    the body may nest as deep as the parser allowed.
    """
    out: list[str] = []
    stack: list[object] = [value]
    while stack:
        item = stack.pop()
        if type(item) is _Text:
            out.append(item)
        elif isinstance(item, JSONDecimal):
            out.append(item.json_text)
        elif isinstance(item, dict):
            parts: list[object] = []
            for key, member in item.items():
                if not isinstance(key, str):
                    raise TypeError(f"keys must be str, not {type(key).__name__}")
                parts += [_Text(("," if parts else "") + _dumps(key) + ":"), member]
            stack += [_Text("}"), *reversed(parts), _Text("{")]
        elif isinstance(item, (list, tuple)):
            parts = []
            for member in item:
                if parts:
                    parts.append(_Text(","))
                parts.append(member)
            stack += [_Text("]"), *reversed(parts), _Text("[")]
        elif item is None or isinstance(item, (str, int, float)):
            # bool is an int: json.dumps writes true/false, as before.
            out.append(_dumps(item))
        else:
            raise TypeError(f"Object of type {type(item).__name__} is not JSON serializable")
    return "".join(out)


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
