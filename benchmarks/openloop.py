"""Latency at a steady rate, open loop (issue #15, point 3).

    .venv/bin/python -m benchmarks.openloop                       # PostgreSQL, 20 s per point
    .venv/bin/python -m benchmarks.openloop --backends sqlite,postgresql --rounds 2
    .venv/bin/python -m benchmarks.openloop --duration 5 --rounds 1   # a quick check

A closed-loop load generator (wrk, ``benchmarks/run``) waits for each answer
before sending the next request, so a slow answer delays the requests behind
it and they are never measured as late (coordinated omission). This one sends
on a fixed schedule, request *i* at ``t0 + i / rate``, whether or not earlier
ones were answered, and measures each latency from its **scheduled** send
time to the end of its answer. Debian packages neither wrk2 nor vegeta, so the
generator is this module's own: one asyncio process, a new HTTP/1.1
connection per request (gunicorn's sync workers close the connection after
every answer anyway), pre-signed iGV callbacks with fresh request ids.

Steps, per backend:

1. **naive's maximum rate**, at the start of every round: the naive endpoint
   on a fresh database, loaded closed loop by wrk exactly as
   ``benchmarks/run`` does (16 connections, ``--max-duration`` s after a 2 s
   warm-up). Other load on the machine moves it, hence once per round.
2. **the round**: for each of naive, orderhooks (inline) and orderhooks-deferred
   (the order rotates between rounds), a fresh database and gunicorn (2 sync
   workers), a 2 s warm-up, then ``--duration`` s at each of 25 %, 50 % and
   75 % of naive's maximum. Every request is a first delivery. No ``flask
   orderhooks worker`` runs during the deferred passes: it is the request
   path's latency (its pending rows stay pending).

The generator runs at nice -10 when started as root, so that gunicorn's
workers do not keep it from sending on time (its lateness is reported).

Reported per point: the rate achieved, p50, p99, p99.9 and max latency (ms),
non-200 answers and socket errors, the generator's CPU (its share of one
core, from ``wait4``) and how late it sent (p99 of actual minus scheduled
send time: if that grows, the generator, not the server, was the limit).
A request unanswered after 10 s counts at 10 s in the latencies (a lower
bound) and in the "timeouts" column: the server was overloaded at that
rate. Checked: every answer 200, no socket error, rows stored between the
200 answers and the 200 answers plus the unanswered. Target: orderhooks p99
<= 1.5 x naive's at 50 %.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import sections
from .apps import PATH, Kind, stored_count
from .harness import (
    SERVER_BACKENDS,
    BenchError,
    Config,
    Database,
    Server,
    add_database_urls,
    checkout_line,
    make_tables,
    run_wrk,
    settle,
    write_ids,
)

#: The package this process imported, as git saw it when the run began (the
#: working tree may change while a long run goes on).
CHECKOUT = checkout_line() or "(not a git checkout)"

FRACTIONS = (0.25, 0.50, 0.75)
KINDS: tuple[Kind, ...] = ("naive", "orderhooks", "orderhooks-deferred")
TARGET = 1.5
TIMEOUT = 10.0


# -- the generator (runs in a child process of its own) -------------------------------


def _requests(ids_file: Path, host: str, port: int) -> list[bytes]:
    lines = ids_file.read_text().splitlines()
    body = lines[0].encode()
    out = []
    for line in lines[1:]:
        request_id, stamp, signature = line.split()
        out.append(
            (
                f"POST {PATH} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                "Content-Type: application/json\r\n"
                f"X-Request-Id: {request_id}\r\nX-Timestamp: {stamp}\r\n"
                f"X-Signature: {signature}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            ).encode()
            + body
        )
    return out


async def _one(host: str, port: int, payload: bytes, scheduled: float, out: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(TIMEOUT):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(payload)
            data = await reader.read()
            writer.close()
    except TimeoutError:
        # No answer within TIMEOUT: counted at TIMEOUT, a lower bound.
        out["timeouts"] = out.get("timeouts", 0) + 1
        out["latency_ms"].append((loop.time() - scheduled) * 1000)
        return
    except OSError as exc:
        out["errors"][type(exc).__name__] = out["errors"].get(type(exc).__name__, 0) + 1
        return
    finished = loop.time()
    status = data[9:12].decode("ascii", "replace") if data.startswith(b"HTTP/1.") else "bad"
    out["statuses"][status] = out["statuses"].get(status, 0) + 1
    out["latency_ms"].append((finished - scheduled) * 1000)


async def _generate(host: str, port: int, payloads: list[bytes], rate: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    out: dict[str, Any] = {"latency_ms": [], "statuses": {}, "errors": {}, "lag_ms": []}
    tasks = set()
    start = loop.time() + 0.05
    for i, payload in enumerate(payloads):
        scheduled = start + i / rate
        delay = scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        out["lag_ms"].append((loop.time() - scheduled) * 1000)
        task = asyncio.create_task(_one(host, port, payload, scheduled, out))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    sent_until = loop.time()
    if tasks:
        await asyncio.wait(tasks)
    out["send_seconds"] = sent_until - start
    out["seconds"] = loop.time() - start
    out["sent"] = len(payloads)
    return out


async def _closed(host: str, port: int, payloads: list[bytes], concurrency: int) -> dict[str, Any]:
    """Closed loop (for benchmarks.memory): ``concurrency`` clients, each
    sending its next request when its last one was answered."""
    loop = asyncio.get_running_loop()
    out: dict[str, Any] = {"latency_ms": [], "statuses": {}, "errors": {}, "lag_ms": []}
    queue = iter(payloads)
    start = loop.time()

    async def client() -> None:
        for payload in queue:
            await _one(host, port, payload, loop.time(), out)

    await asyncio.gather(*(client() for _ in range(concurrency)))
    out["send_seconds"] = out["seconds"] = loop.time() - start
    out["sent"] = len(payloads)
    return out


def generate_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.openloop generate")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ids", type=Path, required=True)
    parser.add_argument("--rate", type=float, help="open loop: requests per second")
    parser.add_argument("--concurrency", type=int, help="closed loop: clients")
    parser.add_argument("--count", type=int, required=True)
    args = parser.parse_args(argv)
    payloads = _requests(args.ids, args.host, args.port)[: args.count]
    if len(payloads) < args.count:
        raise SystemExit(f"{args.ids} holds {len(payloads)} ids, {args.count} needed.")
    if args.rate is not None:
        out = asyncio.run(_generate(args.host, args.port, payloads, args.rate))
    else:
        out = asyncio.run(_closed(args.host, args.port, payloads, args.concurrency or 16))
    json.dump(out, sys.stdout)
    return 0


# -- one point --------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[index]


@dataclass
class Point:
    config: str
    fraction: float
    rate: float
    round: int
    sent: int
    ok: int
    non_200: int
    errors: int
    #: Requests unanswered after TIMEOUT s (counted in the latencies at TIMEOUT).
    timeouts: int
    achieved: float
    p50: float
    p99: float
    p999: float
    max: float
    lag_p99: float
    generator_cpu: float
    checks: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def _priority() -> None:
    if os.geteuid() == 0:
        os.nice(-10)


def run_generator(
    port: int, ids: Path, rate: float | None, count: int, concurrency: int | None = None
) -> tuple[dict[str, Any], float]:
    """The generator's result and its CPU share of one core (``rate``: open
    loop; ``concurrency``: closed loop)."""
    command = [
        sys.executable, "-m", "benchmarks.openloop", "generate",
        "--port", str(port), "--ids", str(ids), "--count", str(count),
    ]  # fmt: skip
    command += ["--rate", str(rate)] if rate is not None else ["--concurrency", str(concurrency)]
    started = time.monotonic()
    with tempfile.TemporaryFile() as out:
        process = subprocess.Popen(
            command,
            stdout=out,
            cwd=Path(__file__).resolve().parent.parent,
            # Ahead of gunicorn for a core: a late send is counted as latency.
            preexec_fn=_priority,  # noqa: PLW1509 - only os.nice, no locks
        )
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.monotonic() - started
        if os.waitstatus_to_exitcode(status) != 0:
            raise BenchError(f"the open-loop generator failed ({status})")
        out.seek(0)
        data: dict[str, Any] = json.loads(out.read())
    return data, (usage.ru_utime + usage.ru_stime) / wall


def point(
    config: Config,
    server: Server,
    uri: str | None,
    fraction: float,
    rate: float,
    seconds: float,
    round_number: int,
    workdir: Path,
) -> Point:
    count = max(1, int(rate * seconds))
    ids = workdir / "openloop.ids"
    write_ids(ids, count)

    def rows() -> int:
        return stored_count(config.kind, uri) if uri is not None else 0

    before = settle(rows)
    data, cpu = run_generator(server.port, ids, rate, count)
    latency = data["latency_ms"]
    statuses: dict[str, int] = data["statuses"]
    ok = statuses.get("200", 0)
    errors = sum(data["errors"].values())
    result = Point(
        config=config.name,
        fraction=fraction,
        rate=rate,
        round=round_number,
        sent=int(data["sent"]),
        ok=ok,
        non_200=sum(n for s, n in statuses.items() if s != "200"),
        errors=errors,
        timeouts=int(data.get("timeouts", 0)),
        achieved=int(data["sent"]) / data["send_seconds"] if data["send_seconds"] else 0.0,
        p50=percentile(latency, 50),
        p99=percentile(latency, 99),
        p999=percentile(latency, 99.9),
        max=max(latency) if latency else float("nan"),
        lag_p99=percentile(data["lag_ms"], 99),
        generator_cpu=cpu,
    )
    added = settle(rows) - before
    label = f"{config.name} at {rate:.0f}/s"
    if result.non_200 or errors:
        result.failures.append(
            f"{label}: {result.non_200} non-200 answers {statuses}, {errors} socket errors "
            f"{data['errors']}"
        )
    # A request the generator gave up on may still have been stored.
    if uri is not None and not ok <= added <= ok + result.timeouts:
        result.failures.append(
            f"{label}: {ok} answers 200, {result.timeouts} timed out, but {added} rows stored"
        )
    if not result.failures:
        result.checks.append(
            f"{label}: {ok} of {count} answered 200 ({result.timeouts} unanswered after "
            f"{TIMEOUT:g} s: overloaded), {added} rows stored: OK"
        )
    return result


# -- the run ----------------------------------------------------------------------------


def naive_max(backend: str, args: argparse.Namespace, workdir: Path) -> float:
    config = Config("naive", backend)  # type: ignore[arg-type]
    database = Database(config.backend, workdir, args.pg_url, args.mariadb_url)
    server: Server | None = None
    try:
        assert database.uri is not None
        make_tables(config, database.uri)
        server = Server(config, database.uri, 2, workdir)
        pids = server.wait_ready()
        db_pids = database.backend_pids if backend in SERVER_BACKENDS else None
        best = 0.0
        for seconds, name in ((2, "warm"), (args.max_duration, "max")):
            write_ids(workdir / f"{name}.ids", 20000 * seconds)
            result, _ = run_wrk(
                server.url, workdir / f"{name}.ids", "first", seconds=seconds, threads=2,
                connections=16, worker_pids=pids, db_pids=db_pids, workdir=workdir,
            )  # fmt: skip
            if result.exhausted:
                raise BenchError("naive's maximum: the pre-signed ids ran out")
            if result.non_2xx or result.socket_errors:
                raise BenchError(f"naive's maximum: {result.statuses}, {result.socket_errors}")
            best = result.rps
        return best
    finally:
        if server is not None:
            server.stop()
        database.drop()


def run_round(
    backend: str,
    args: argparse.Namespace,
    rates: Sequence[tuple[float, float]],
    round_number: int,
    workdir: Path,
) -> list[Point]:
    kinds = list(KINDS[round_number % 3 :] + KINDS[: round_number % 3])
    points = []
    for kind in kinds:
        config = Config(kind, backend)  # type: ignore[arg-type]
        database = Database(config.backend, workdir, args.pg_url, args.mariadb_url)
        server: Server | None = None
        try:
            uri = database.uri
            assert uri is not None
            make_tables(config, uri)
            server = Server(config, uri, 2, workdir)
            server.wait_ready()
            point(config, server, uri, 0.0, rates[0][1], 2, round_number, workdir)  # warm-up
            for fraction, rate in rates:
                p = point(config, server, uri, fraction, rate, args.duration, round_number, workdir)
                print(
                    f"  {config.name:<32} {fraction:>4.0%} {rate:>6.0f}/s: p50 {p.p50:.1f} "
                    f"p99 {p.p99:.1f} p99.9 {p.p999:.1f} ms; generator CPU "
                    f"{p.generator_cpu:.0%}, lag p99 {p.lag_p99:.1f} ms"
                    + "".join(f"\n    FAILED: {f}" for f in p.failures),
                    flush=True,
                )
                points.append(p)
        finally:
            if server is not None:
                server.stop()
            database.drop()
    return points


def med(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report(
    backend: str,
    maxima: Sequence[float],
    points: Sequence[Point],
    args: argparse.Namespace,
    load: tuple[tuple[float, ...], tuple[float, ...]],
) -> str:
    command = "python -m benchmarks.openloop " + " ".join(
        a for a in sys.argv[1:] if a != "--results"
    )
    lines = [
        f"### {backend}",
        "",
        f"- Command: `{command}`",
        f"- Date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}; load average before "
        f"{load[0][0]:.2f}, after {load[1][0]:.2f} (2 cores, shared with other sessions)",
        f"- Checkout: {CHECKOUT}",
        f"- naive's maximum (closed loop, wrk 2 threads x 16 connections, {args.max_duration} s): "
        + ", ".join(f"**{m:.0f}**" for m in maxima)
        + f" req/s (measured at the start of each of the {args.rounds} round(s)); points "
        f"at 25/50/75 % of the round's maximum, {args.duration:g} s each; values are medians "
        "over the rounds (rates: the first round's)",
        "",
        "| rate | configuration | achieved req/s | p50 ms | p99 ms | p99.9 ms | max ms "
        "| non-200 / errors / timeouts | generator CPU | send lag p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    fractions = sorted({p.fraction for p in points})
    names = [f"{k}/{backend}" for k in KINDS]
    for fraction in fractions:
        for name in names:
            ps = [p for p in points if p.fraction == fraction and p.config == name]
            if not ps:
                continue
            achieved = med([p.achieved for p in ps])
            lines.append(
                f"| {fraction:.0%} ({ps[0].rate:.0f}/s) | {name} | {achieved:.0f} "
                f"| {med([p.p50 for p in ps]):.1f} | {med([p.p99 for p in ps]):.1f} "
                f"| {med([p.p999 for p in ps]):.1f} | {med([p.max for p in ps]):.1f} "
                f"| {sum(p.non_200 for p in ps)} / {sum(p.errors for p in ps)} / "
                f"{sum(p.timeouts for p in ps)} "
                f"| {med([p.generator_cpu for p in ps]):.0%} | {med([p.lag_p99 for p in ps]):.1f} |"
            )
    lines += [
        "",
        "| measure | value (per-round min-max) | target | verdict |",
        "|---|---|---|---|",
    ]
    for fraction in fractions:
        for kind in ("orderhooks", "orderhooks-deferred"):
            ratios = []
            for r in range(args.rounds):
                a = [p for p in points if p.round == r and p.fraction == fraction]
                naive = [p.p99 for p in a if p.config == f"naive/{backend}"]
                other = [p.p99 for p in a if p.config == f"{kind}/{backend}"]
                if naive and other and naive[0] > 0:
                    ratios.append(other[0] / naive[0])
            if not ratios:
                continue
            target = fraction == 0.5 and kind == "orderhooks"
            verdict = ("met" if med(ratios) <= TARGET else "**not met**") if target else "—"
            lines.append(
                f"| {kind}/naive p99, {fraction:.0%} | {med(ratios):.2f} "
                f"({min(ratios):.2f}-{max(ratios):.2f}) | "
                f"{f'<= {TARGET}' if target else '(context)'} | {verdict} |"
            )
    failures = [f for p in points for f in p.failures]
    lines.append("")
    if failures:
        lines += ["**CHECKS FAILED:**", "", *(f"- {f}" for f in failures)]
    else:
        lines.append(
            f"Checks: all {sum(p.sent for p in points):,} requests answered 200, rows stored = "
            "answers at every point: OK"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.openloop",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--backends", default="postgresql", help="[postgresql]")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per point [20]")
    parser.add_argument("--max-duration", type=int, default=8, help="naive's maximum pass [8]")
    parser.add_argument("--rounds", type=int, default=1, help="[1]")
    parser.add_argument("--max-rate", type=float, help="skip step 1: naive's maximum is this")
    add_database_urls(parser)
    parser.add_argument("--results", action="store_true", help="write RESULTS.md's section")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["generate"]:
        return generate_main(argv[1:])
    args = parse_args(argv)
    ok = True
    texts = []
    for backend in args.backends.split(","):
        before = os.getloadavg()
        with tempfile.TemporaryDirectory(prefix="orderhooks-openloop-") as tmp:
            workdir = Path(tmp)
            points: list[Point] = []
            maxima = []
            for r in range(args.rounds):
                # Measured again each round: the machine's other load changes,
                # and a rate is only "50 %" of the maximum of its own moment.
                max_rps = args.max_rate or naive_max(backend, args, workdir)
                maxima.append(max_rps)
                print(f"{backend}: round {r + 1}: naive's maximum {max_rps:.0f} req/s", flush=True)
                rates = [(f, f * max_rps) for f in FRACTIONS]
                points += run_round(backend, args, rates, r, workdir)
        text = report(backend, maxima, points, args, (before, os.getloadavg()))
        ok = ok and not any(p.failures for p in points)
        print("\n" + text)
        texts.append(text)
    if args.results:
        sections.replace_section("openloop", "\n".join(texts))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
