"""Text from a request, as a log line (or the CLI's output) may hold it.

An idempotency key comes from the platform (or from whoever posts, before the
signature is checked). Written raw, a newline in it forges a log line, and a
control or invisible formatting character (a right-to-left override, a soft
hyphen) hides or changes what the line says. On an operator's terminal an
escape sequence (ESC, CSI, OSC) does worse: it sets the window's title,
clears the screen or hides the lines around it.
"""

from __future__ import annotations

import re

#: The characters no stored key holds: C0 and C1 controls, DEL, lone
#: surrogates. PostgreSQL refuses NUL in text, a newline would forge log
#: lines, and neither survives an HTML form. Every one of them also makes
#: :func:`loggable` false.
UNSTORABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")

#: How much of a quoted value a log line holds.
QUOTED_LENGTH = 80


def loggable(text: str) -> bool:
    """Whether ``text`` may be written into a log line as it is: it holds no
    control, format, separator (but the space), surrogate, private-use or
    unassigned character, which is what :meth:`str.isprintable` checks, and
    what :func:`repr` then escapes."""
    return text.isprintable()


def quoted(text: str) -> str:
    """``text`` cut to :data:`QUOTED_LENGTH` characters, as its ``repr()``:
    every character :func:`loggable` refuses is written as an escape."""
    return repr(text[:QUOTED_LENGTH])


def for_log(text: str) -> str:
    """``text`` itself when it is :func:`loggable`, else :func:`quoted`."""
    return text if loggable(text) else quoted(text)


def for_terminal(text: str, *, lines: bool = False) -> str:
    """``text`` itself when it is :func:`loggable`, else its whole ``repr()``
    (uncut, unlike :func:`quoted`): what the CLI prints of a key, an error,
    a header or a body, so that a hidden character shows as its escape and an
    escape sequence from a request reaches the terminal as text, running
    nothing.

    ``lines``: text whose line breaks are its layout (a pretty-printed body,
    a multi-line error) keeps them; each line is judged on its own."""
    if lines:
        return "\n".join(for_terminal(line) for line in text.split("\n"))
    return text if loggable(text) else repr(text)
