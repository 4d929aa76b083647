"""In-process micro-benchmark: the pipeline's CPU cost without a server.

    .venv/bin/python -m benchmarks.micro [--quick]

Measures, per operation, in microseconds:

- verify + parse (``provider.read()``) of each callback kind;
- the store alone (``DeliveryStore.deliver``) for a first delivery and a
  duplicate, inside an app context;
- one full request through the Flask test client (first delivery and
  duplicate) for ``orderhooks`` and, for scale, ``naive`` and ``bare``.

The store is in-memory SQLite (Flask-SQLAlchemy gives ``sqlite://`` a
StaticPool), so no disk or network wait hides in the numbers: what moves them
is CPU. Each figure is the best of several rounds (the least disturbed by the
rest of the machine), next to the median of the rounds; ``cpu`` is process
time per operation, which a busy machine inflates less than wall time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from flask.testing import FlaskClient

from flask_orderhooks.config import DEFAULTS
from flask_orderhooks.extension import get_extension
from flask_orderhooks.gateway import GatewayProvider
from flask_orderhooks.igv import IGVProvider
from flask_orderhooks.provider import Provider
from flask_orderhooks.sud import SUDProvider
from flask_orderhooks.testing import (
    SignedCallback,
    gateway_collect,
    gateway_payout,
    igv_order_status,
    sud_order_batch_changed,
    sud_order_changed,
)

from .apps import PATH, SECRET, fresh_id, ready_app, signed

GATEWAY_KEY = "merchant-key"
SUD_APP_ID = "1461564080052506636"
SUD_SECRET = "app-secret"


@dataclass(frozen=True)
class Timing:
    label: str
    best_us: float
    median_us: float
    cpu_us: float


def time_op(
    label: str,
    make_inputs: Callable[[int], Sequence[object]],
    op: Callable[[object], object],
    *,
    number: int,
    rounds: int,
) -> Timing:
    """Run ``op`` over ``number`` fresh inputs per round; µs per operation."""
    walls: list[float] = []
    cpus: list[float] = []
    for _ in range(rounds):
        inputs = make_inputs(number)
        cpu_start = time.process_time()
        start = time.perf_counter()
        for item in inputs:
            op(item)
        walls.append((time.perf_counter() - start) / number * 1e6)
        cpus.append((time.process_time() - cpu_start) / number * 1e6)
    return Timing(label, min(walls), statistics.median(walls), min(cpus))


def _settings_config() -> dict[str, object]:
    config: dict[str, object] = dict(DEFAULTS)
    config.update(
        ORDERHOOKS_IGV_SECRET=SECRET,
        ORDERHOOKS_GATEWAY_KEY={"10001": GATEWAY_KEY},
        ORDERHOOKS_SUD_APPS={SUD_APP_ID: SUD_SECRET},
    )
    return config


BUILDERS: dict[str, tuple[str, Callable[[], SignedCallback]]] = {
    "igv order-status": ("order-status", lambda: igv_order_status(SECRET, request_id=fresh_id())),
    "gateway collect": ("collect", lambda: gateway_collect(GATEWAY_KEY)),
    "gateway payout": ("payout", lambda: gateway_payout(GATEWAY_KEY)),
    "sud order-changed": (
        "order-changed",
        lambda: sud_order_changed(SUD_SECRET, app_id=SUD_APP_ID),
    ),
    "sud batch (2 orders)": (
        "order-changed",
        lambda: sud_order_batch_changed(SUD_SECRET, app_id=SUD_APP_ID),
    ),
}


def bench_providers(number: int, rounds: int) -> Iterator[Timing]:
    config = _settings_config()
    providers: dict[str, Provider] = {}
    for cls in (IGVProvider, GatewayProvider, SUDProvider):
        configured = cls.from_config({**cls.config_defaults, **config})
        assert configured is not None, f"{cls.name} is configured above"
        providers[cls.name] = configured
    for label, (callback, build) in BUILDERS.items():
        # One callback read many times: read() keeps no state.
        cb = build()
        provider = providers[cb.provider]
        now = time.time()

        def read(
            _: object,
            provider: Provider = provider,
            cb: SignedCallback = cb,
            callback: str = callback,
            now: float = now,
        ) -> object:
            return provider.read(callback, cb.body, cb.headers, now=now)

        yield time_op(f"read() {label}", range, read, number=number * 5, rounds=rounds)


def bench_store(number: int, rounds: int) -> Iterator[Timing]:
    app = ready_app("orderhooks", "sqlite://")
    state = get_extension(app).state(app)
    provider = state.providers["igv"]
    now = time.time()

    def deliveries(n: int) -> list[object]:
        return [provider.read("order-status", cb.body, cb.headers, now=now) for cb in signed(n)]

    done: list[object] = []

    def deliver(delivery: object) -> object:
        done.append(delivery)
        return state.store.deliver(delivery, _noop)  # type: ignore[arg-type]

    with app.app_context():
        yield time_op(
            "store.deliver() first delivery", deliveries, deliver, number=number, rounds=rounds
        )
        seen = list(done)

        def replays(n: int) -> list[object]:
            return [seen[i % len(seen)] for i in range(n)]

        yield time_op("store.deliver() duplicate", replays, deliver, number=number, rounds=rounds)


def _noop() -> None:
    pass


def bench_requests(number: int, rounds: int) -> Iterator[Timing]:
    for kind in ("bare", "naive", "orderhooks"):
        app = ready_app(kind, "sqlite://")
        client: FlaskClient = app.test_client()
        sent: list[SignedCallback] = []

        def post(
            cb: object,
            client: FlaskClient = client,
            sent: list[SignedCallback] = sent,
            kind: str = kind,
        ) -> object:
            assert isinstance(cb, SignedCallback)
            response = client.post(PATH, data=cb.body, headers=cb.headers)
            if response.status_code != 200:
                raise SystemExit(f"{kind}: answered {response.status_code}: {response.text}")
            sent.append(cb)
            return response

        yield time_op(f"POST {kind}: first delivery", signed, post, number=number, rounds=rounds)
        if kind == "bare":
            continue
        seen = list(sent)

        def replays(n: int, seen: list[SignedCallback] = seen) -> list[SignedCallback]:
            return [seen[i % len(seen)] for i in range(n)]

        yield time_op(f"POST {kind}: duplicate", replays, post, number=number, rounds=rounds)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.micro",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--number", type=int, default=500, help="operations per round [500]")
    parser.add_argument("--rounds", type=int, default=5, help="rounds [5]")
    parser.add_argument("--quick", action="store_true", help="100 operations, 3 rounds")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    number, rounds = (100, 3) if args.quick else (args.number, args.rounds)
    print(f"{'operation':<40} {'best us':>9} {'median us':>10} {'cpu us':>8}")
    for group in (bench_providers, bench_store, bench_requests):
        for t in group(number, rounds):
            print(
                f"{t.label:<40} {t.best_us:>9.1f} {t.median_us:>10.1f} {t.cpu_us:>8.1f}", flush=True
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
