"""The server benchmark, interleaved: every configuration's gunicorn up at once,
loaded in turn for a few seconds each, round after round.

    .venv/bin/python -m benchmarks.interleaved --backend sqlite
    .venv/bin/python -m benchmarks.interleaved --backend sqlite --variant before=3325e1e
    .venv/bin/python -m benchmarks.interleaved --backend postgresql --cycles 20 --seconds 3

``benchmarks/run`` measures one configuration at a time, each with a fresh
server and database, minutes apart from the next; on a shared 2-core machine
whose slow phases last minutes, one configuration can land in a slow phase
and the next not (naive on SQLite moved from 1,018 to 436 req/s between two
rounds of one run). Here the servers (2 sync workers each, idle while another
is loaded) and their databases stay up for the whole run, and each cycle
sends every configuration ``--seconds`` of fresh, signed first deliveries in
turn, in an order rotated per cycle: a slow phase covers neighbours alike,
and each cycle gives a ratio of rates measured seconds apart.

Configurations: ``naive`` and ``orderhooks`` (inline) on ``--backend``, and
``orderhooks[NAME]`` for each ``--variant NAME=DIR|REV`` (that package's
flask_orderhooks). Printed: req/s per configuration, median (min-max) over
the cycles, and each one's ratio to ``naive`` and to ``orderhooks`` within
the cycles, median (q1-q3, min-max). A pass whose pre-signed ids ran out,
or with non-2xx answers, is reported and left out. The rows each app stored
are checked against its 200 answers at the end. Nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import statistics
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .apps import stored_count
from .harness import (
    DEFAULT_MARIADB_URL,
    DEFAULT_PG_URL,
    WRK_INSTALL_HINT,
    BenchError,
    Config,
    Database,
    Server,
    make_tables,
    run_wrk,
    settle,
    variant_source,
    write_ids,
)

#: Ids written per pass, per second of it: above any rate seen here (2 cores).
_IDS_PER_SECOND = 4000


@dataclass
class Running:
    """One configuration's server and database, up for the whole run."""

    config: Config
    database: Database
    server: Server
    pids: list[int]
    rates: list[float | None] = field(default_factory=list)
    answered: int = 0
    in_flight: int = 0
    problems: list[str] = field(default_factory=list)


@contextmanager
def running(config: Config, args: argparse.Namespace, workdir: Path) -> Iterator[Running]:
    database = Database(config.backend, workdir, args.pg_url, args.mariadb_url)
    server: Server | None = None
    try:
        assert database.uri is not None
        make_tables(config, database.uri)
        server = Server(config, database.uri, args.workers, workdir)
        yield Running(config, database, server, server.wait_ready())
    finally:
        if server is not None:
            server.stop()
        database.drop()


def one_pass(run: Running, seconds: int, args: argparse.Namespace, workdir: Path) -> float | None:
    """``seconds`` of fresh first deliveries to ``run``: its req/s, or None
    when the pass cannot count (ids ran out, non-2xx answers)."""
    ids = workdir / f"{run.config.label}.ids"
    write_ids(ids, _IDS_PER_SECOND * seconds)
    result, _ = run_wrk(
        run.server.url,
        ids,
        "first",
        seconds=seconds,
        threads=args.threads,
        connections=args.connections,
        worker_pids=run.pids,
        db_pids=None,
        workdir=workdir,
    )
    run.answered += result.statuses.get(200, 0)
    run.in_flight += result.in_flight
    if result.exhausted:
        run.problems.append(f"a pass used every pre-signed id ({result.rps:.0f} req/s): left out")
        return None
    if result.non_2xx or result.socket_errors:
        run.problems.append(
            f"a pass had {result.non_2xx} non-2xx answers and {result.socket_errors} "
            "socket errors: left out"
        )
        return None
    return result.rps


def count(run: Running) -> int:
    """The rows ``run``'s app stored."""
    assert run.database.uri is not None
    return stored_count(run.config.kind, run.database.uri)


def spread(values: Sequence[float]) -> str:
    if not values:
        return "—"
    ordered = sorted(values)
    if len(ordered) < 4:
        return f"{statistics.median(ordered):.2f} ({ordered[0]:.2f}-{ordered[-1]:.2f})"
    q1, _, q3 = statistics.quantiles(ordered, n=4)
    return (
        f"{statistics.median(ordered):.2f} (q1-q3 {q1:.2f}-{q3:.2f}, "
        f"min-max {ordered[0]:.2f}-{ordered[-1]:.2f})"
    )


def ratios(top: Running, bottom: Running) -> list[float]:
    return [
        a / b
        for a, b in zip(top.rates, bottom.rates, strict=True)
        if a is not None and b is not None and b > 0
    ]


def report(runs: Sequence[Running], args: argparse.Namespace) -> str:
    lines = [
        f"**Interleaved, {args.backend}**: {args.cycles} cycles of {args.seconds} s passes "
        f"per configuration, {args.workers} sync workers each, wrk -t{args.threads} "
        f"-c{args.connections}; first deliveries ({args.kind}).",
        "",
        "| configuration | req/s, median (min-max) | /naive within cycles | "
        f"/{args.kind} within cycles |",
        "|---|---|---|---|",
    ]
    by_label = {run.config.label: run for run in runs}
    for run in runs:
        rates = [r for r in run.rates if r is not None]
        cells = [
            run.config.name,
            f"{statistics.median(rates):.0f} ({min(rates):.0f}-{max(rates):.0f})" if rates else "—",
        ]
        for reference in ("naive", args.kind):
            other = by_label.get(reference)
            cells.append("1" if other is run else spread(ratios(run, other)) if other else "—")
        lines.append("| " + " | ".join(cells) + " |")
    for run in runs:
        lines.extend(f"- {run.config.name}: {problem}" for problem in run.problems)
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "mariadb"), default="sqlite")
    parser.add_argument(
        "--kind",
        choices=("orderhooks", "orderhooks-deferred"),
        default="orderhooks",
        help="inline dispatch, or deferred (the request path only: stored pending)",
    )
    parser.add_argument("--cycles", type=int, default=12)
    parser.add_argument("--seconds", type=int, default=3, help="seconds per pass [3]")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of warm-up per server")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=DIR|REV")
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL)
    parser.add_argument("--mariadb-url", default=DEFAULT_MARIADB_URL)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print(WRK_INSTALL_HINT, file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="orderhooks-interleaved-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        configs = [Config("naive", args.backend), Config(args.kind, args.backend)]
        for spec in args.variant:
            found = variant_source(spec, workdir)
            if found is None:
                raise BenchError(f"--variant {spec}: give NAME=DIR or NAME=REV")
            name, source, _what = found
            configs.append(Config(args.kind, args.backend, variant=name, source=source))
        runs = [stack.enter_context(running(config, args, workdir)) for config in configs]
        for run in runs:
            one_pass(run, args.warmup, args, workdir)
            run.problems.clear()
        for cycle in range(args.cycles):
            shift = cycle % len(runs)
            order = runs[shift:] + runs[:shift]
            rates: dict[str, float | None] = {}
            for run in order:
                rates[run.config.label] = one_pass(run, args.seconds, args, workdir)
            for run in runs:
                run.rates.append(rates[run.config.label])
            shown = ", ".join(
                f"{label} {rate:.0f}" if rate is not None else f"{label} —"
                for label, rate in rates.items()
            )
            print(f"cycle {cycle + 1}/{args.cycles}: {shown} req/s", flush=True)
        for run in runs:
            stored = settle(functools.partial(count, run))
            # Requests in flight when wrk stopped may be stored, never answered.
            if not run.answered <= stored <= run.answered + run.in_flight:
                run.problems.append(
                    f"{stored} rows stored for {run.answered} answers 200 "
                    f"(+{run.in_flight} in flight): CHECK FAILED"
                )
            else:
                run.problems.append(
                    f"{stored} rows stored for {run.answered} answers 200 "
                    f"(+{stored - run.answered} of {run.in_flight} in flight): OK"
                )
        print()
        print(report(runs, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
