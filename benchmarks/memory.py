"""Memory per process after 100,000 deliveries, and a leak check (issue #15, point 5).

    .venv/bin/python -m benchmarks.memory                          # PostgreSQL, 100,000 each
    .venv/bin/python -m benchmarks.memory --deliveries 20000 --every 5000   # a quick check

Per configuration (``bare``, ``orderhooks`` inline, ``orderhooks-deferred``;
``benchmarks/apps.py``), a fresh database and gunicorn with 2 sync workers
receive ``--deliveries`` fresh, signed iGV first deliveries, closed loop (16
clients of ``benchmarks.openloop``'s generator). Every ``--every`` deliveries
the harness reads each worker's ``VmRSS`` and ``VmHWM`` (``/proc/<pid>/status``).

Then, on the deferred configuration's table (``--deliveries`` pending rows,
its gunicorn stopped), one ``flask orderhooks worker`` process drains them all;
its ``VmRSS``/``VmHWM`` are read every 0.2 s and reported at every ``--every``
done deliveries.

Reported: peak RSS (VmHWM) per gunicorn worker and of the worker process,
their difference to the bare Flask app's gunicorn worker (target: <= 15 MB),
and the leak check: RSS growth from the end of the warm-up (the first
``--warmup`` deliveries) to the end, and the least-squares slope over those
samples in MB per 100,000 deliveries (verdict "no growth" when the growth is
under 1 MB). Checked: every answer 200, rows stored = answers, every
delivery done by the worker, which exits 0 on SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa

from . import sections
from .apps import Kind, status_counts, stored_count, undrained_count
from .harness import (
    Config,
    Database,
    Server,
    WorkerProcess,
    add_database_urls,
    checkout_line,
    children,
    make_tables,
    settle,
    write_ids,
)
from .openloop import run_generator

#: The package this process imported, as git saw it when the run began (the
#: working tree may change while a long run goes on).
CHECKOUT = checkout_line() or "(not a git checkout)"

KINDS: tuple[Kind, ...] = ("bare", "orderhooks", "orderhooks-deferred")
TARGET_MB = 15.0
GROWTH_MB = 1.0


def memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


@dataclass
class Series:
    """RSS samples of one process: (deliveries so far, VmRSS, VmHWM)."""

    name: str
    samples: list[tuple[int, float, float]] = field(default_factory=list)

    @property
    def peak(self) -> float:
        return max(h for _, _, h in self.samples)

    def growth(self, warmup: int) -> tuple[float, float]:
        """(RSS at the end - RSS at the warm-up's end, slope MB per 100,000)."""
        after = [(n, rss) for n, rss, _ in self.samples if n >= warmup]
        if len(after) < 2:
            return float("nan"), float("nan")
        xs, ys = [n for n, _ in after], [r for _, r in after]
        slope = statistics.linear_regression(xs, ys).slope if len(set(xs)) > 1 else 0.0
        return ys[-1] - ys[0], slope * 100_000


@dataclass
class Run:
    config: str
    series: list[Series]
    answered: int = 0
    failures: list[str] = field(default_factory=list)


def serve(
    kind: Kind, backend: str, args: argparse.Namespace, workdir: Path
) -> tuple[Run, Database]:
    """Load one configuration; the database is left for the drain (dropped by the caller)."""
    config = Config(kind, "none" if kind == "bare" else backend)  # type: ignore[arg-type]
    database = Database(config.backend, workdir, args.pg_url, args.mariadb_url)
    uri = database.uri
    if uri is not None:
        make_tables(config, uri)
    server = Server(config, uri, 2, workdir)
    try:
        pids = server.wait_ready()
        series = [Series(f"{config.name} worker {i + 1}") for i in range(len(pids))]
        run = Run(config.name, series)
        for s, pid in zip(series, pids, strict=True):
            s.samples.append((0, *memory_mb(pid)))

        def rows() -> int:
            return stored_count(kind, uri) if uri is not None else 0

        done = 0
        while done < args.deliveries:
            n = min(args.every, args.deliveries - done)
            write_ids(workdir / "memory.ids", n)
            before = settle(rows)
            data, _ = run_generator(server.port, workdir / "memory.ids", None, n, concurrency=16)
            ok = int(data["statuses"].get("200", 0))
            if ok != n or data["errors"]:
                run.failures.append(
                    f"{config.name}: {ok} of {n} answered 200 ({data['statuses']}, "
                    f"{data['errors']})"
                )
            added = settle(rows) - before
            if uri is not None and added != ok:
                run.failures.append(f"{config.name}: {ok} answers 200, {added} rows stored")
            done += n
            run.answered += ok
            for s, pid in zip(series, pids, strict=True):
                s.samples.append((done, *memory_mb(pid)))
            print(
                f"  {config.name}: {done:,} deliveries; RSS "
                + ", ".join(f"{s.samples[-1][1]:.1f}" for s in series)
                + " MB",
                flush=True,
            )
        if children(server.process.pid) != pids:
            run.failures.append(f"{config.name}: a gunicorn worker was restarted")
        return run, database
    finally:
        server.stop()


def drain(backend: str, database: Database, args: argparse.Namespace, workdir: Path) -> Run:
    config = Config("orderhooks-deferred", backend)  # type: ignore[arg-type]
    uri = database.uri
    assert uri is not None
    total = status_counts(uri).get("pending", 0)
    series = Series("flask orderhooks worker")
    run = Run("flask orderhooks worker", [series])
    worker = WorkerProcess(config, uri, workdir, 0)
    reader = sa.create_engine(uri)
    try:
        deadline = time.monotonic() + 60
        while worker.started is None:
            if worker.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("flask orderhooks worker did not start:\n" + "\n".join(
                    worker.stderr_lines()[-20:]
                ))  # fmt: skip
            time.sleep(0.01)
        series.samples.append((0, *memory_mb(worker.process.pid)))
        next_mark = args.every
        deadline = time.monotonic() + args.drain_timeout
        with reader.connect() as connection:
            left = total
            while left and time.monotonic() < deadline and worker.process.poll() is None:
                time.sleep(0.2)
                rss = memory_mb(worker.process.pid)
                left = undrained_count(connection)
                done = total - left
                if done >= next_mark or not left:
                    series.samples.append((done, *rss))
                    print(f"  worker: {done:,} done; RSS {rss[0]:.1f} MB", flush=True)
                    next_mark += args.every
    finally:
        status = worker.stop()
        reader.dispose()
    counts = status_counts(uri)
    if counts != {"done": total}:
        run.failures.append(f"worker: statuses after the drain {counts}, expected {total} done")
    if status != 0:
        run.failures.append(f"worker: exited with {status}")
    run.answered = total
    return run


def report(
    backend: str, runs: Sequence[Run], args: argparse.Namespace, load: tuple[float, float]
) -> str:
    command = "python -m benchmarks.memory " + " ".join(a for a in sys.argv[1:] if a != "--results")
    bare = next(r for r in runs if r.config == "bare")
    bare_peak = max(s.peak for s in bare.series)
    lines = [
        f"### {backend}",
        "",
        f"- Command: `{command}`",
        f"- Date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}; load average before "
        f"{load[0]:.2f}, after {load[1]:.2f}",
        f"- Checkout: {CHECKOUT}",
        f"- {args.deliveries:,} deliveries per configuration (gunicorn, 2 sync workers, 16 "
        f"clients), RSS read every {args.every:,}; leak check after the first "
        f"{args.warmup:,}",
        "",
        "| process | deliveries | RSS at start MB | RSS at end MB | peak (VmHWM) MB "
        "| peak - bare MB | target | growth after warm-up MB | slope MB/100k | leak check |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        for s in run.series:
            growth, slope = s.growth(args.warmup)
            delta = s.peak - bare_peak
            verdict = "met" if delta <= TARGET_MB else "**not met**"
            leak = "no growth" if growth < GROWTH_MB else "**grows**"
            lines.append(
                f"| {s.name} | {s.samples[-1][0]:,} | {s.samples[0][1]:.1f} | "
                f"{s.samples[-1][1]:.1f} | {s.peak:.1f} | {delta:+.1f} | "
                f"<= {TARGET_MB:.0f}: {verdict} | {growth:+.2f} | {slope:+.2f} | {leak} |"
            )
    lines += ["", "RSS (MB) at each sample:", ""]
    for run in runs:
        for s in run.series:
            lines.append(
                f"- {s.name}: " + ", ".join(f"{n // 1000}k {rss:.1f}" for n, rss, _ in s.samples)
            )
    failures = [f for r in runs for f in r.failures]
    lines.append("")
    if failures:
        lines += ["**CHECKS FAILED:**", "", *(f"- {f}" for f in failures)]
    else:
        lines.append(
            "Checks: every answer 200, rows stored = answers, every pending delivery done by "
            "the worker, which exited 0 on SIGTERM: OK"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.memory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--backend", default="postgresql", choices=("postgresql", "sqlite", "mariadb")
    )
    parser.add_argument("--deliveries", type=int, default=100_000, help="[100,000]")
    parser.add_argument("--every", type=int, default=10_000, help="sample interval [10,000]")
    parser.add_argument("--warmup", type=int, default=20_000, help="leak check from [20,000]")
    parser.add_argument("--drain-timeout", type=float, default=1800.0)
    add_database_urls(parser)
    parser.add_argument("--results", action="store_true", help="write RESULTS.md's section")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    before = os.getloadavg()[0]
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="orderhooks-memory-") as tmp:
        workdir = Path(tmp)
        for kind in KINDS:
            run, database = serve(kind, args.backend, args, workdir)
            try:
                runs.append(run)
                if kind == "orderhooks-deferred":
                    runs.append(drain(args.backend, database, args, workdir))
            finally:
                database.drop()
    text = report(args.backend, runs, args, (before, os.getloadavg()[0]))
    print("\n" + text)
    if args.results:
        sections.replace_section("memory", text)
    return 1 if any(r.failures for r in runs) else 0


if __name__ == "__main__":
    raise SystemExit(main())
