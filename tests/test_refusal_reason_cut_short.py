"""A refusal's reason quotes what the body holds, cut short.

The gateway parses its body before it can verify it (the ``sign`` is inside),
so anyone can post a repeated key of 60 KiB: the whole key went into the
WARNING line and the answer, every time (unverified text is otherwise cut to
80 characters in a log line).
"""

from __future__ import annotations

import pytest

from flask_orderhooks.exc import MalformedPayload
from flask_orderhooks.jsonbody import parse_object
from flask_orderhooks.logtext import QUOTED_LENGTH


def test_a_long_repeated_key_is_quoted_cut_short() -> None:
    key = "k" * 60_000
    body = b'{"' + key.encode() + b'":1,"' + key.encode() + b'":2}'
    with pytest.raises(MalformedPayload) as info:
        parse_object(body)
    assert info.value.reason == f"The body repeats the key {'k' * QUOTED_LENGTH!r}."


def test_a_short_repeated_key_is_quoted_whole() -> None:
    with pytest.raises(MalformedPayload) as info:
        parse_object(b'{"a\\nb":1,"a\\nb":2}')
    assert info.value.reason == "The body repeats the key 'a\\nb'."
