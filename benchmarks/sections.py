"""Named sections of ``benchmarks/RESULTS.md`` that tools other than
``benchmarks/run`` write (the large table, the open loop, memory).

Each lives between ``<!-- section: NAME -->`` and ``<!-- /section: NAME -->``.
A tool replaces its own section (``--results``) and leaves the rest alone;
``benchmarks/run`` regenerates the file and carries these sections over.
"""

from __future__ import annotations

import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def _pattern(name: str) -> re.Pattern[str]:
    return re.compile(
        rf"<!-- section: {re.escape(name)} -->\n.*?<!-- /section: {re.escape(name)} -->\n",
        re.DOTALL,
    )


def wrap(name: str, text: str) -> str:
    return f"<!-- section: {name} -->\n{text.rstrip()}\n<!-- /section: {name} -->\n"


def replace_section(name: str, text: str, path: Path = RESULTS) -> None:
    """Put ``text`` into section ``name`` of ``path`` (appended when new)."""
    current = path.read_text() if path.exists() else ""
    block = wrap(name, text)
    pattern = _pattern(name)
    if pattern.search(current):
        updated = pattern.sub(lambda _: block, current, count=1)
    else:
        updated = current.rstrip() + "\n\n" + block
    path.write_text(updated)


def sections(text: str) -> list[str]:
    """Every named section of ``text``, whole, in order."""
    found = re.finditer(r"<!-- section: ([\w-]+) -->\n.*?<!-- /section: \1 -->\n", text, re.DOTALL)
    return [m.group(0) for m in found]
