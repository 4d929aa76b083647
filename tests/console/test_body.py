"""How the detail page turns a stored body into text (the template escapes it)."""

from __future__ import annotations

import pytest

from flask_orderhooks.console.body import hex_dump, pretty_json, show, visible


def test_json_is_indented_with_its_numbers_and_keys_kept() -> None:
    body = b'{"b":1,"amount":100.00,"big":12345678901234567890,"n":null,"t":true,"l":[],"o":{}}'
    assert pretty_json(body.decode()) == (
        "{\n"
        '  "b": 1,\n'
        '  "amount": 100.00,\n'
        '  "big": 12345678901234567890,\n'
        '  "n": null,\n'
        '  "t": true,\n'
        '  "l": [],\n'
        '  "o": {}\n'
        "}"
    )


def test_nested_values() -> None:
    assert pretty_json('{"data":{"orders":[{"id":"A"},2]}}') == (
        '{\n  "data": {\n    "orders": [\n      {\n        "id": "A"\n      },\n      2\n'
        "    ]\n  }\n}"
    )


def test_duplicate_keys_and_constants_are_shown_as_sent() -> None:
    # The pipeline refuses them; a row holding one must still show the truth.
    assert pretty_json('{"a":1,"a":2,"x":NaN}') == '{\n  "a": 1,\n  "a": 2,\n  "x": NaN\n}'


def test_strings_keep_their_text_and_hide_nothing() -> None:
    text = '{"name":"王小明","trick":"abc\u202edcba","ctl":"a\\u0007b","html":"<b>"}'
    assert pretty_json(text) == (
        '{\n  "name": "王小明",\n  "trick": "abc\\u202edcba",\n  "ctl": "a\\u0007b",\n'
        '  "html": "<b>"\n}'
    )


@pytest.mark.parametrize("text", ["", "not json", "{", "[1,]", "1 2"])
def test_not_json(text: str) -> None:
    assert pretty_json(text) is None


def test_deep_nesting_is_text_not_an_error() -> None:
    deep = "[" * 50000 + "]" * 50000
    shown = show(deep.encode())
    assert (shown.kind, shown.text) == ("text", deep)


def test_show_picks_the_form() -> None:
    assert show(b"").kind == "empty"
    assert show(b'{"a":1}').kind == "json"
    assert show(b"plain <text>").text == "plain <text>"
    binary = show(b"\xff\x00abc")
    assert (binary.kind, binary.size) == ("hex", 5)


def test_hex_dump() -> None:
    data = bytes(range(0x41, 0x41 + 20))
    assert hex_dump(data) == (
        "00000000  41 42 43 44 45 46 47 48 49 4a 4b 4c 4d 4e 4f 50  ABCDEFGHIJKLMNOP\n"
        "00000010  51 52 53 54" + " " * 36 + "  QRST"
    )


@pytest.mark.parametrize(
    ("stored", "shown"),
    [
        ("C-1:60", "C-1:60"),
        ("王小明", "王小明"),
        ("C1\u202e99", "C1\\u202e99"),  # right-to-left override
        ("a\u200bb", "a\\u200bb"),  # zero-width space
        ("a\x00b\x7f\x9b", "a\\u0000b\\u007f\\u009b"),  # C0, DEL, C1
        ("a\nb\u2028c", "a\\u000ab\\u2028c"),  # a line break cannot split the text
        ("tag\U000e0041", "tag\\U000e0041"),  # beyond U+FFFF
        ("C1\\u202e99", "C1\\\\u202e99"),  # a literal backslash never reads as an escape
    ],
)
def test_visible_shows_hidden_characters_as_escapes(stored: str, shown: str) -> None:
    assert visible(stored) == shown


def test_visible_and_json_strings_share_the_rule() -> None:
    for ch in ("\u202e", "\u200b", "\x7f", "\U000e0041"):
        assert pretty_json(f'["{ch}"]') == f'[\n  "{visible(ch)}"\n]'


# A text body an operator could misread: a right-to-left override, a
# zero-width space, a NUL, a CR before the line feed, a tab, an escape
# sequence and a BOM; the line feed stays the text's own line break.
HIDDEN_TEXT = ("\ufefforder=C1\u202e99&note=a\u200bb\x00\r\n\tnext \x1b[2J").encode()


def test_text_shows_hidden_characters_as_escapes() -> None:
    shown = show(HIDDEN_TEXT)
    assert (shown.kind, shown.size, shown.escaped) == ("text", len(HIDDEN_TEXT), 7)
    assert shown.text == (
        "\\ufefforder=C1\\u202e99&note=a\\u200bb\\u0000\\u000d\n\\u0009next \\u001b[2J"
    )
    assert shown.parts == (
        ("\\ufeff", True),
        ("order=C1", False),
        ("\\u202e", True),
        ("99&note=a", False),
        ("\\u200b", True),
        ("b", False),
        ("\\u0000\\u000d", True),
        ("\n", False),
        ("\\u0009", True),
        ("next ", False),
        ("\\u001b", True),
        ("[2J", False),
    )
    assert "".join(text for text, _ in shown.parts) == shown.text


def test_text_with_escapes_doubles_its_backslashes() -> None:
    # Else the six characters \u202e and U+202E itself would read alike.
    shown = show("C1\\u202e99 C1\u202e99".encode())
    assert shown.text == "C1\\\\u202e99 C1\\u202e99"
    assert shown.escaped == 1


def test_text_without_hidden_characters_is_as_received() -> None:
    text = 'path=C:\\dir\\u202e\n  "quoted" <b>王小明</b>'
    shown = show(text.encode())
    assert (shown.kind, shown.text, shown.escaped) == ("text", text, 0)
    assert shown.parts == ((text, False),)


def test_text_and_keys_share_the_rule() -> None:
    for ch in ("\u202e", "\u200b", "\x7f", "\x9b", "\u2028", "\U000e0041", "\ufffe"):
        assert show(f"x{ch}\\".encode()).text == visible(f"x{ch}\\")


# Every space but U+0020 (category Zs): each reads as a plain space, so
# "C-1 99" with a no-break space looks like the order id with a space.
OTHER_SPACES = "\u00a0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u202f\u205f\u3000"


@pytest.mark.parametrize("space", OTHER_SPACES)
def test_spaces_other_than_the_space_are_shown_as_escapes(space: str) -> None:
    escape = f"\\u{ord(space):04x}"
    assert visible(f"C-1{space}99 x") == f"C-1{escape}99 x"
    assert pretty_json(f'["C-1{space}99 x"]') == f'[\n  "C-1{escape}99 x"\n]'
    assert show(f"id=C-1{space}99 x".encode()).text == f"id=C-1{escape}99 x"
