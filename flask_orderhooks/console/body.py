"""A stored body as an operator reads it: JSON indented, anything else as
text (its hidden characters as escapes) or, when it is not UTF-8, as a hex
dump.

The result is plain text; the template escapes it. Nothing here trusts the
body: the iGV body is not even covered by its signature.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass
from typing import Literal

#: JSON: indented; text: UTF-8 but not JSON; hex: not UTF-8.
BodyKind = Literal["json", "text", "hex", "empty"]

# Unicode categories shown as \\u escapes, in a body's JSON strings and in
# the keys, order ids, headers and errors on the pages: controls and
# invisible formatting characters (a right-to-left override would make the
# page say something other than what the row holds), and every space but
# U+0020 (a no-break or ideographic space reads as a plain one, so two
# order ids that differ only there would look equal).
_HIDDEN = {"Cc", "Cf", "Zl", "Zp", "Zs", "Cs", "Co", "Cn"}


def _hidden(ch: str) -> bool:
    return ch != " " and unicodedata.category(ch) in _HIDDEN


@dataclass(frozen=True)
class ShownBody:
    """The body's text, and how it was read."""

    kind: BodyKind
    text: str
    size: int
    #: Text only: how many hidden characters :attr:`text` writes as escapes
    #: (when any, its backslashes are doubled too).
    escaped: int = 0
    #: Text only: :attr:`text` as runs, each ``(text, is_escape)``, so that
    #: the page can mark the escapes apart from the body's own characters.
    parts: tuple[tuple[str, bool], ...] = ()


class _Number(str):
    """A JSON number kept as its own text: ``100.00`` must not become ``100.0``
    on a page an operator compares with the platform's records."""

    __slots__ = ()


class _Object(list[tuple[str, object]]):
    """A JSON object as its pairs, in order, duplicates included: the page
    shows what the bytes say, not what a parser would keep."""

    __slots__ = ()


def _escape_hidden(text: str) -> str:
    """``text`` with each hidden character written as its ``\\u`` (or, past
    U+FFFF, ``\\U``) escape: the one rule for everything the console shows."""
    if not any(_hidden(ch) for ch in text):
        return text
    return "".join(_escaped(ch) if _hidden(ch) else ch for ch in text)


def _escaped(ch: str) -> str:
    code = ord(ch)
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def visible(text: str) -> str:
    """A key, order id, header or error as a page shows it: hidden characters
    as escapes, and a backslash doubled, so that the shown text maps back to
    one stored value only (a key holding the six characters ``\\u202e`` is
    shown as ``\\\\u202e``, one holding U+202E as ``\\u202e``)."""
    return _escape_hidden(text.replace("\\", "\\\\"))


def _string(value: str) -> str:
    # json.dumps has escaped quotes, backslashes and C0 controls already.
    return _escape_hidden(json.dumps(value, ensure_ascii=False))


def _write(value: object, depth: int, out: list[str]) -> None:
    pad = "  " * (depth + 1)
    if isinstance(value, _Object):
        if not value:
            out.append("{}")
            return
        out.append("{\n")
        for n, (name, item) in enumerate(value):
            out.append(pad + _string(name) + ": ")
            _write(item, depth + 1, out)
            out.append(",\n" if n < len(value) - 1 else "\n")
        out.append("  " * depth + "}")
    elif isinstance(value, list):
        if not value:
            out.append("[]")
            return
        out.append("[\n")
        for n, item in enumerate(value):
            out.append(pad)
            _write(item, depth + 1, out)
            out.append(",\n" if n < len(value) - 1 else "\n")
        out.append("  " * depth + "]")
    elif isinstance(value, _Number):
        out.append(str(value))
    elif isinstance(value, str):
        out.append(_string(value))
    else:
        out.append(json.dumps(value))


def pretty_json(text: str) -> str | None:
    """``text`` indented by two spaces per level, numbers and key order kept;
    ``None`` when it is not JSON."""
    try:
        parsed = json.loads(
            text,
            object_pairs_hook=_Object,
            parse_int=_Number,
            parse_float=_Number,
            parse_constant=_Number,
        )
        out: list[str] = []
        _write(parsed, 0, out)
    except (ValueError, RecursionError):
        return None
    return "".join(out)


def hex_dump(data: bytes, width: int = 16) -> str:
    """Offset, hex bytes and printable ASCII, ``width`` bytes a line."""
    lines = []
    for offset in range(0, len(data), width):
        chunk = data[offset : offset + width]
        shown = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in chunk)
        lines.append(f"{offset:08x}  {chunk.hex(' '):<{width * 3 - 1}}  {shown}")
    return "\n".join(lines)


def _text(text: str, size: int) -> ShownBody:
    """A body that is UTF-8 but not JSON: as received, unless it holds hidden
    characters. Then each one (but the line feed, the text's own layout) is
    written as its escape, :func:`visible`'s rule, so that an order id
    holding a right-to-left override or a NUL does not read as another one.
    A text with nothing to escape keeps its backslashes as they are: the
    page says when escapes were written, and only then are they doubled."""
    if not any(ch != "\n" and _hidden(ch) for ch in text):
        return ShownBody("text", text, size, 0, ((text, False),))
    parts: list[tuple[str, bool]] = []
    plain: list[str] = []
    escaped = 0
    for ch in text:
        if ch == "\n" or not _hidden(ch):
            plain.append("\\\\" if ch == "\\" else ch)
            continue
        if plain:
            parts.append(("".join(plain), False))
            plain = []
        escaped += 1
        if parts and parts[-1][1]:
            parts[-1] = (parts[-1][0] + _escaped(ch), True)
        else:
            parts.append((_escaped(ch), True))
    if plain:
        parts.append(("".join(plain), False))
    return ShownBody("text", "".join(run for run, _ in parts), size, escaped, tuple(parts))


def show(body: bytes) -> ShownBody:
    """How the detail page shows ``body``."""
    if not body:
        return ShownBody("empty", "", 0)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return ShownBody("hex", hex_dump(body), len(body))
    pretty = pretty_json(text)
    if pretty is not None:
        return ShownBody("json", pretty, len(body))
    return _text(text, len(body))
