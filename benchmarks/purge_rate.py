"""Rows per second of ``purge``: compacting and deleting old done deliveries.

    .venv/bin/python -m benchmarks.purge_rate                                  # MariaDB
    .venv/bin/python -m benchmarks.purge_rate --backend sqlite --rows 50000
    .venv/bin/python -m benchmarks.purge_rate --variant before=3325e1e --rounds 3

Each round gives each package (the working tree, and each ``--variant
NAME=DIR|REV``, in an order rotated per round) a database of its own holding
``--rows`` done iGV deliveries with 600-byte bodies, all older than the
cutoff, then times ``store.compact()`` on them and ``store.purge()`` of the
resulting tombstones, each package in a child process of its own. Printed:
rows per second of each, median (min-max) over the rounds, and each
variant's ratio to the working tree within the rounds. Every run must
compact and delete every row; nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa

from .harness import (
    DEFAULT_MARIADB_URL,
    DEFAULT_PG_URL,
    ROOT,
    BenchError,
    private_database,
    private_schema,
    source_env,
    variant_source,
)


def child(uri: str, rows: int) -> dict[str, float]:
    """In the child: fill, compact, purge; the rates (rows per second)."""
    from flask import Flask  # noqa: PLC0415 - the package under test, from PYTHONPATH

    from flask_orderhooks import OrderHooks  # noqa: PLC0415

    app = Flask("purge_rate")
    app.config.update(ORDERHOOKS_DATABASE_URI=uri, ORDERHOOKS_IGV_SECRET="s" * 32)
    hooks = OrderHooks(app)
    with app.app_context():
        hooks.create_all(app)
        store = hooks.state(app).store
        old = datetime.now(UTC) - timedelta(days=400)
        batch = []
        with store.engine.begin() as connection:
            for i in range(rows):
                batch.append(
                    {
                        "provider": "igv",
                        "callback": "order-status",
                        "key": f"k{i:08d}",
                        "status": "done",
                        "attempts": 1,
                        "claim_token": "t" * 32,
                        "lease_expires_at": old,
                        "body": b"x" * 600,
                        "body_sha256": "0" * 64,
                        "headers": "{}",
                        "created_at": old,
                        "updated_at": old + timedelta(microseconds=i),
                    }
                )
                if len(batch) == 5000 or i == rows - 1:
                    connection.execute(sa.insert(store.table), batch)
                    batch = []
        cutoff = datetime.now(UTC) - timedelta(days=30)
        started = time.perf_counter()
        compacted = store.compact(older_than=cutoff, provider="igv")
        compacting = time.perf_counter() - started
        started = time.perf_counter()
        deleted = store.purge(older_than=cutoff, provider="igv")
        deleting = time.perf_counter() - started
        if (compacted, deleted) != (rows, rows):
            raise SystemExit(f"compacted {compacted} and deleted {deleted} of {rows} rows")
        hooks.state(app).store.engine.dispose()
    return {"compact": rows / compacting, "delete": rows / deleting}


def database(
    backend: str, args: argparse.Namespace, workdir: Path, tag: str
) -> AbstractContextManager[str]:
    """A database of its own for one run: its URL."""
    if backend == "postgresql":
        return private_schema(args.pg_url, "orderhooks_purge_rate")
    if backend == "mariadb":
        return private_database(args.mariadb_url, "orderhooks_purge_rate")
    return _sqlite(workdir / f"purge-{tag}.sqlite3")


class _sqlite(AbstractContextManager[str]):
    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> str:
        return f"sqlite:///{self.path}"

    def __exit__(self, *_: object) -> None:
        self.path.unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "mariadb"), default="mariadb")
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=DIR|REV")
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL)
    parser.add_argument("--mariadb-url", default=DEFAULT_MARIADB_URL)
    parser.add_argument("--child", nargs=2, metavar=("URI", "ROWS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]))))
        return 0
    with tempfile.TemporaryDirectory(prefix="orderhooks-purge-rate-") as tmp:
        workdir = Path(tmp)
        packages: list[tuple[str, Path | None]] = [("working tree", None)]
        for spec in args.variant:
            found = variant_source(spec, workdir)
            if found is None:
                raise BenchError(f"--variant {spec}: give NAME=DIR or NAME=REV")
            packages.append((found[0], found[1]))
        rates: dict[str, list[dict[str, float]]] = {name: [] for name, _ in packages}
        for round_number in range(args.rounds):
            shift = round_number % len(packages)
            for name, source in packages[shift:] + packages[:shift]:
                tag = uuid.uuid4().hex[:8]
                with database(args.backend, args, workdir, tag) as uri:
                    done = subprocess.run(
                        [
                            sys.executable,
                            "-m",
                            "benchmarks.purge_rate",
                            "--child",
                            uri,
                            str(args.rows),
                        ],
                        cwd=source or ROOT,
                        env=source_env(dict(os.environ), source),
                        capture_output=True,
                        text=True,
                        check=False,
                    )
                if done.returncode != 0:
                    raise BenchError(f"{name}: {done.stderr[-2000:]}")
                rates[name].append(json.loads(done.stdout.splitlines()[-1]))
                shown = ", ".join(f"{k} {v:,.0f} rows/s" for k, v in rates[name][-1].items())
                print(f"round {round_number + 1}: {name}: {shown}", flush=True)
        print()
        print(f"**purge rate, {args.backend}**: {args.rows:,} done rows, {args.rounds} rounds")
        print()
        print(
            "| package | compact rows/s | delete rows/s | compact /working tree | delete /w. t. |"
        )
        print("|---|---|---|---|---|")
        base = rates["working tree"]
        for name, _ in packages:
            cells = [name]
            for what in ("compact", "delete"):
                values = [r[what] for r in rates[name]]
                cells.append(
                    f"{statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})"
                )
            for what in ("compact", "delete"):
                ratio = [r[what] / b[what] for r, b in zip(rates[name], base, strict=True)]
                cells.append(f"{statistics.median(ratio):.2f} ({min(ratio):.2f}-{max(ratio):.2f})")
            print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
