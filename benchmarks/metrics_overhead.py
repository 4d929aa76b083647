"""What Prometheus metrics add to a first delivery, side by side, in one process.

    .venv/bin/python -m benchmarks.metrics_overhead [--backend sqlite] [--rounds 40]

Two copies of the ``orderhooks`` benchmark app (``benchmarks/apps.py``: inline
dispatch, a no-op receiver, the host's db), one of them with
:func:`flask_orderhooks.metrics.init_metrics` (what ``ORDERHOOKS_METRICS_URL``
sets up, without the route), each on a database of its own on the same server.
Every round sends one batch of fresh, signed first deliveries through each
app's test client, the order alternating between rounds, as
``benchmarks.paired`` does; the median of the per-round ratios
``metrics/plain`` and their quartiles are printed for wall time and CPU (this
process, plus every PostgreSQL server process on PostgreSQL), with the
verdict against the target: less than 5 % of a first delivery.

The observer calls themselves are timed apart too (``answered`` and a timed
dispatch, a million-fold loop): a number the machine's noise does not move,
set against the first delivery's own CPU time.

A third copy without metrics runs in the same rounds as a control: its ratio
to the first (``control/plain``) is what the machine's noise alone gives, the
yardstick for the ``metrics/plain`` ratio.

At the end the metrics app is scraped: its ``orderhooks_requests_total`` and
dispatch count must equal the requests it answered.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack

from prometheus_client.parser import text_string_to_metric_families

from flask_orderhooks import get_extension
from flask_orderhooks.instruments import Instruments
from flask_orderhooks.metrics import get_metrics, init_metrics

from .apps import ready_app, signed, stored_count
from .harness import DEFAULT_PG_URL, postgres_problem
from .paired import Side, database, postgres_cpu_seconds, quartiles

#: Less than this share of a first delivery's cost.
TARGET = 0.05
MEASURES = (
    ("wall per request", "wall"),
    ("CPU per request: this process", "own_cpu"),
    ("CPU per request: PostgreSQL", "server_cpu"),
    ("CPU per request: both", "cpu"),
)


def observer_cost(number: int) -> float:
    """Microseconds the metrics add to one inline first delivery's Python
    work: one answer counted, one dispatch timed and observed (against an
    :class:`Instruments` without observers, which hands ``run`` back as is)."""
    app = ready_app("orderhooks", "sqlite://")
    init_metrics(get_extension(app), app)
    with_metrics = get_extension(app).state(app).instruments
    without = Instruments()

    def noop() -> None:
        pass

    def loop(instruments: Instruments) -> float:
        started = time.process_time()
        for _ in range(number):
            instruments.timed("igv", "order-status", noop)()
            instruments.answered("igv", "order-status", 200)
        return time.process_time() - started

    loop(with_metrics)  # warm-up
    costs = []
    for _ in range(5):
        costs.append(loop(with_metrics) - loop(without))
    return min(costs) / number * 1e6


def scraped(app_text: str) -> tuple[float, float]:
    requests = dispatched = 0.0
    for family in text_string_to_metric_families(app_text):
        for sample in family.samples:
            route = sample.labels.get("provider") == "igv"
            if route and sample.name == "orderhooks_requests_total":
                requests += sample.value if sample.labels["code"] == "200" else 0.0
            if route and sample.name == "orderhooks_dispatch_seconds_count":
                dispatched += sample.value if sample.labels["outcome"] == "done" else 0.0
    return requests, dispatched


def compare(backend: str, pg_url: str, rounds: int, batch: int, warmup: int) -> list[float]:
    """Print the side-by-side table; return the median ratios (wall, CPU)."""
    server_cpu = postgres_cpu_seconds if backend == "postgresql" else (lambda: 0.0)
    with ExitStack() as stack:
        sides = []
        for _ in range(3):
            uri = stack.enter_context(database(backend, {"postgresql": pg_url}, "orderhooks"))
            app = ready_app("orderhooks", uri)
            sides.append(Side("orderhooks", uri, app, app.test_client()))
        plain, metrics, control = sides
        metrics_app = metrics.app
        init_metrics(get_extension(metrics_app), metrics_app)
        for side in sides:
            side.run(signed(warmup), server_cpu)
            for values in (side.wall, side.own_cpu, side.server_cpu, side.cpu):
                values.clear()
        for r in range(rounds):
            # Rotate who goes first, and reverse every other round: a machine
            # slowing down mid-round would otherwise always charge one side.
            order = sides[r % 3 :] + sides[: r % 3]
            for side in order if (r // 3) % 2 == 0 else reversed(order):
                side.run(signed(batch), server_cpu)
        for side in sides:
            stored = stored_count("orderhooks", side.uri)
            if stored != side.sent:
                raise SystemExit(f"{side.uri}: {side.sent} answered 200, {stored} rows stored")
        with metrics_app.app_context():
            body, _ = get_metrics(metrics_app).render()
        requests, dispatched = scraped(body.decode())
        if requests != metrics.sent or dispatched != metrics.sent:
            raise SystemExit(
                f"metrics: {metrics.sent} requests answered 200, but the scrape counts "
                f"{requests:g} answers and {dispatched:g} dispatches"
            )
    print(f"\n{backend}: {rounds} rounds x {batch} first deliveries per app (after {warmup})")
    print(f"scrape checked: {requests:g} answers and {dispatched:g} dispatches counted")
    print(
        f"{'measure':<32} {'plain us':>9} {'metrics us':>11} {'metrics/plain (q1-q3)':>24} "
        f"{'verdict':>8} {'control/plain (q1-q3)':>24}"
    )
    medians = []
    for name, attr in MEASURES:
        if backend != "postgresql" and attr in ("server_cpu", "cpu"):
            continue
        a, b, c = getattr(plain, attr), getattr(metrics, attr), getattr(control, attr)
        q1, med, q3 = quartiles([y / x for x, y in zip(a, b, strict=True) if x > 0])
        c1, cmed, c3 = quartiles([y / x for x, y in zip(a, c, strict=True) if x > 0])
        verdict = "met" if med < 1 + TARGET else "NOT MET"
        print(
            f"{name:<32} {statistics.median(a):>9.0f} {statistics.median(b):>11.0f} "
            f"{med:>9.3f} ({q1:.3f}-{q3:.3f}) {verdict:>8} {cmed:>9.3f} ({c1:.3f}-{c3:.3f})"
        )
        medians.append(med)
    own = statistics.median(plain.own_cpu)
    return [*medians, own]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.metrics_overhead",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--backend", choices=("postgresql", "sqlite"), action="append", help="[both]"
    )
    parser.add_argument("--rounds", type=int, default=40, help="paired rounds [40]")
    parser.add_argument("--batch", type=int, default=60, help="requests per app per round [60]")
    parser.add_argument("--warmup", type=int, default=200, help="requests per app first [200]")
    parser.add_argument(
        "--number", type=int, default=200_000, help="observer calls per timing loop [200000]"
    )
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    backends = args.backend or ["sqlite", "postgresql"]
    per_request = observer_cost(args.number)
    print(
        f"observer calls per inline first delivery (answered + timed dispatch): "
        f"{per_request:.2f} us CPU"
    )
    for backend in backends:
        if backend == "postgresql":
            problem = postgres_problem(args.pg_url)
            if problem:
                print(f"postgresql: skipped: {problem}")
                continue
        *_, own_cpu = compare(backend, args.pg_url, args.rounds, args.batch, args.warmup)
        share = per_request / own_cpu
        verdict = "met" if share < TARGET else "NOT MET"
        print(
            f"observer calls / this process's CPU per plain first delivery: "
            f"{per_request:.2f} / {own_cpu:.0f} us = {share:.2%} (target < {TARGET:.0%}: {verdict})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
