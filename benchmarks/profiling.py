"""Profile the orderhooks request pipeline with pyinstrument.

    .venv/bin/pip install pyinstrument
    .venv/bin/python -m benchmarks.profiling [--backend sqlite|sqlite-file|postgresql|mariadb]
        [--kind orderhooks|naive|bare] [--duplicates] [--requests 2000]

Sends signed iGV callbacks through the Flask test client in a loop (the same
app the server benchmark runs) and prints pyinstrument's flat list of the
functions where the time went (self time), then the call tree. On PostgreSQL
the time spent waiting for the server shows up under psycopg's ``wait``
functions: that is the cost of round trips, see :mod:`benchmarks.roundtrips`.
The PostgreSQL store lives in a schema of its own, dropped at the end.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import uuid
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flask_orderhooks.testing import SignedCallback, igv_order_status

from .apps import KINDS, PATH, SECRET, Kind, ready_app
from .harness import DEFAULT_MARIADB_URL, DEFAULT_PG_URL, private_database, private_schema


def _profiler_class() -> Any:
    # Imported by name: pyinstrument is an optional tool, and a plain import
    # would fail the type check of a venv that lacks it.
    try:
        return importlib.import_module("pyinstrument").Profiler
    except ImportError:
        return None


@contextmanager
def database(backend: str, pg_url: str, mariadb_url: str) -> Iterator[str]:
    """A database URI for one profile run; a PostgreSQL schema or a MariaDB
    database is dropped after."""
    if backend == "sqlite":
        yield "sqlite://"
    elif backend == "sqlite-file":
        with tempfile.TemporaryDirectory(prefix="orderhooks-profile-") as tmp:
            yield f"sqlite:///{Path(tmp) / 'profile.sqlite3'}"
    elif backend == "mariadb":
        with private_database(mariadb_url, "orderhooks_profile") as url:
            yield url
    else:
        with private_schema(pg_url, "orderhooks_profile") as url:
            yield url


def callbacks(n: int) -> list[SignedCallback]:
    prefix = uuid.uuid4().int % 10**6
    return [igv_order_status(SECRET, request_id=f"{prefix:06d}{i:013d}") for i in range(n)]


# Component of a frame's own time: the package, or the C function for built-ins
# (where SQLite and psycopg do their work).
_COMPONENTS = (
    ("flask_orderhooks/", "flask_orderhooks"),
    ("sqlalchemy/orm/", "sqlalchemy.orm (Session)"),
    ("sqlalchemy/engine/", "sqlalchemy.engine (Connection, execution)"),
    ("sqlalchemy/sql/", "sqlalchemy.sql (statements, compiler, cache keys)"),
    ("sqlalchemy/pool/", "sqlalchemy.pool"),
    ("sqlalchemy/dialects/", "sqlalchemy.dialects"),
    ("sqlalchemy/", "sqlalchemy (other)"),
    ("flask_sqlalchemy/", "flask_sqlalchemy"),
    ("psycopg/", "psycopg"),
    ("werkzeug/", "werkzeug (incl. the test client)"),
    ("flask/", "flask"),
    ("blinker/", "blinker"),
    ("benchmarks/", "benchmark loop and receiver"),
)


def component(frame: Any) -> str:
    path = frame.file_path or ""
    if path == "<built-in>":
        return f"built-in {frame.class_name + '.' if frame.class_name else ''}{frame.function}"
    for fragment, name in _COMPONENTS:
        if fragment in path:
            return name
    return f"stdlib {Path(path).stem}" if path else "?"


def by_component(root: Any) -> dict[str, float]:
    totals: dict[str, float] = defaultdict(float)

    def walk(frame: Any, owner: str) -> None:
        for child in frame.children:
            if child.is_synthetic:
                totals[owner] += child.time
            else:
                walk(child, component(child))

    walk(root, component(root))
    return totals


def inclusive(root: Any, fragment: str) -> dict[str, float]:
    """Inclusive time of each function whose file path contains ``fragment``,
    counted once per call chain (a function nested in itself is not doubled)."""
    totals: dict[str, float] = defaultdict(float)

    def walk(frame: Any, active: frozenset[str]) -> None:
        name = active_name = ""
        if not frame.is_synthetic and fragment in (frame.file_path or ""):
            short = frame.file_path.split(fragment, 1)[1].lstrip("/")
            qual = f"{frame.class_name}.{frame.function}" if frame.class_name else frame.function
            name = f"{qual}  ({short}:{frame.line_no})"
            active_name = f"{qual}@{short}"
            if active_name not in active:
                totals[name] += frame.time
        for child in frame.children:
            walk(child, active | {active_name} if active_name else active)

    walk(root, frozenset())
    return totals


def top(values: dict[str, float], n: int) -> list[tuple[str, float]]:
    return sorted(values.items(), key=lambda item: -item[1])[:n]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.profiling",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--backend",
        choices=("sqlite", "sqlite-file", "postgresql", "mariadb"),
        default="sqlite",
        help="sqlite = in memory [sqlite]",
    )
    parser.add_argument("--kind", choices=KINDS, default="orderhooks")
    parser.add_argument(
        "--duplicates",
        action="store_true",
        help="profile the duplicate path (the ids are sent once first)",
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--top", type=int, default=25, help="lines of the flat list [25]")
    parser.add_argument("--tree", action="store_true", help="print the call tree too")
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL)
    parser.add_argument("--mariadb-url", default=DEFAULT_MARIADB_URL)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    Profiler = _profiler_class()
    if Profiler is None:
        print("pyinstrument is not installed: .venv/bin/pip install pyinstrument", file=sys.stderr)
        return 2
    kind: Kind = args.kind
    with database(args.backend, args.pg_url, args.mariadb_url) as uri:
        app = ready_app(kind, uri)
        client = app.test_client()
        batch = callbacks(args.requests)
        # Warm-up: imports, compiled-statement caches, connections.
        for cb in callbacks(50):
            client.post(PATH, data=cb.body, headers=cb.headers)
        if args.duplicates:
            for cb in batch:
                client.post(PATH, data=cb.body, headers=cb.headers)
        profiler = Profiler(interval=0.0002)
        profiler.start()
        for cb in batch:
            response = client.post(PATH, data=cb.body, headers=cb.headers)
            if response.status_code != 200:
                profiler.stop()
                print(f"answered {response.status_code}: {response.text}", file=sys.stderr)
                return 1
        session = profiler.stop()
    what = "duplicates" if args.duplicates else "first deliveries"
    per_request = session.duration / args.requests * 1e6
    print(
        f"{kind} on {args.backend}, {args.requests} {what}: {per_request:.0f} us per request "
        f"(wall, profiler on)\n"
    )
    root = session.root_frame()
    if root is None:
        print("no samples", file=sys.stderr)
        return 1
    print(f"Where the time went, by component (self time, % of {per_request:.0f} us):")
    for name, seconds in top(by_component(root), args.top):
        print(f"  {seconds / session.duration * 100:5.1f} %  {name}")
    print("\nflask_orderhooks functions, inclusive time (% of the request):")
    for name, seconds in top(inclusive(root, "flask_orderhooks"), args.top):
        print(f"  {seconds / session.duration * 100:5.1f} %  {name}")
    print("\nTop functions by self time:")
    flat = profiler.output_text(unicode=True, color=False, flat=True, time="percent_of_total")
    body = [line for line in flat.splitlines() if "%" in line]
    print("\n".join(body[: args.top]))
    if args.tree:
        print(profiler.output_text(unicode=True, color=False, time="percent_of_total"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
