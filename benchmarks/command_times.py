"""Where a MariaDB (or MySQL) first delivery's time goes, command by command.

    .venv/bin/python -m benchmarks.command_times [--requests 1200] [--kinds naive,orderhooks]

:mod:`benchmarks.roundtrips` counts the commands PyMySQL sends; this times
each one, from the moment PyMySQL sends it to the moment it has read the
answer (``Connection.query``, ``commit`` and ``rollback``, wrapped for the
run): the server's work on it, the round trip, and PyMySQL's reading of the
answer. Each kind serves ``--warmup`` first deliveries through its Flask test
client, then ``--requests`` more, timed, one after another in one thread, on
a MariaDB database of its own. A command is named by its first words, so
every claim is one line whatever its key.

Per command it prints how many a request sends, the median of one, and the
mean time per request (which counts the slow ones: a commit that waited for a
log flush). The kinds run in turn, not side by side, so compare their shares,
not their totals, on a busy machine. Nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from flask_orderhooks.testing import igv_order_status

from .apps import PATH, SECRET, Kind, ready_app
from .harness import DEFAULT_MARIADB_URL, private_database

#: Words of a statement that name it in the table.
_NAME_WORDS = 8
#: Literals PyMySQL wrote into the text (strings, binary strings, numbers).
_LITERAL = re.compile(r"(?:_binary)?'(?:[^'\\]|\\.)*'|\b\d+(?:\.\d+)?\b")


def command_name(sql: str | bytes) -> str:
    """A command's first words, its literals as ``?``: a claim is the same
    line whatever its key and time."""
    text = sql.decode("utf-8", "replace") if isinstance(sql, bytes) else sql
    words = _LITERAL.sub("?", text).split()
    return " ".join(words[:_NAME_WORDS]) + (" …" if len(words) > _NAME_WORDS else "")


@contextmanager
def timed_commands() -> Iterator[dict[str, list[float]]]:
    """Seconds of every PyMySQL command sent meanwhile, by name."""
    import pymysql.connections  # noqa: PLC0415

    times: dict[str, list[float]] = defaultdict(list)
    connection = pymysql.connections.Connection
    query, commit, rollback = connection.query, connection.commit, connection.rollback

    def timing(name: Callable[..., str], call: Callable[..., Any]) -> Callable[..., Any]:
        def run(self: Any, *args: Any) -> Any:
            began = time.perf_counter()
            try:
                return call(self, *args)
            finally:
                times[name(*args)].append(time.perf_counter() - began)

        return run

    connection.query = timing(command_name, query)
    connection.commit = timing(lambda: "COMMIT", commit)
    connection.rollback = timing(lambda: "ROLLBACK", rollback)
    try:
        yield times
    finally:
        connection.query = query
        connection.commit = commit
        connection.rollback = rollback


def measure(kind: Kind, url: str, warmup: int, requests: int) -> str:
    app = ready_app(kind, url)
    client = app.test_client()
    prefix = uuid.uuid4().int % 10**6
    batch = [
        igv_order_status(SECRET, request_id=f"{prefix:06d}{i:013d}")
        for i in range(warmup + requests)
    ]
    for cb in batch[:warmup]:
        assert client.post(PATH, data=cb.body, headers=cb.headers).status_code == 200
    with timed_commands() as times:
        began = time.perf_counter()
        for cb in batch[warmup:]:
            assert client.post(PATH, data=cb.body, headers=cb.headers).status_code == 200
        elapsed = time.perf_counter() - began
    in_commands = sum(sum(v) for v in times.values())
    lines = [
        f"**{kind}**: {1e6 * elapsed / requests:.0f} us per request, "
        f"{1e6 * in_commands / requests:.0f} of them in commands",
        "",
        "| command | per request | median us | mean us per request |",
        "|---|---|---|---|",
    ]
    for name, values in sorted(times.items(), key=lambda item: -sum(item[1])):
        lines.append(
            f"| `{name}` | {len(values) / requests:.1f} | "
            f"{1e6 * statistics.median(values):.0f} | {1e6 * sum(values) / requests:.0f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.command_times",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--kinds", default="naive,orderhooks", help="[naive,orderhooks]")
    parser.add_argument("--requests", type=int, default=1200, help="timed, per kind [1200]")
    parser.add_argument("--warmup", type=int, default=300, help="per kind, first [300]")
    parser.add_argument("--mariadb-url", default=DEFAULT_MARIADB_URL)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    kinds: list[Kind] = args.kinds.split(",")
    for kind in kinds:
        with private_database(args.mariadb_url, "orderhooks_commands") as url:
            print(measure(kind, url, args.warmup, args.requests))
            print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
