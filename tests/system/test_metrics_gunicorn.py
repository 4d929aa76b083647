"""Metrics under gunicorn with two workers, in prometheus_client's multiprocess
mode: every scrape, whichever worker answers it, counts the whole server.

This module is also the servers' gunicorn config (``GUNICORN_CMD_ARGS=--config
python:tests.system.test_metrics_gunicorn``): :func:`post_worker_init` turns
the metrics on in each worker of ``tests.system.server_app`` (which reads no
metrics key from the environment) exactly as ``init_app`` would with
``ORDERHOOKS_METRICS_URL``, and :func:`child_exit` is the hook the docs ask
for. gunicorn reads only the names of its own settings from a config module:
nothing else here may be named like one (``workers``, ``timeout``, ``bind``...).
"""

from __future__ import annotations

import dataclasses
import http.client
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import multiprocess
from prometheus_client.parser import text_string_to_metric_families

from flask_orderhooks import get_extension
from flask_orderhooks.metrics import COUNTED_STATUSES, register_metrics

from . import server_app
from .callbacks import signed
from .conftest import POSTGRESQL, SQLITE, URL_FIXTURES, ReportFn, ServerFactory
from .support import ROOT, Server, post, wait_for

#: Every sample of a scrape but the ``_created`` ones: (name, labels) → value.
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

#: How many scrapes each check makes: with two workers, every one of them
#: answers some (the kernel hands connections to whichever waits).
SCRAPES = 8


# -- gunicorn's hooks (this module is the servers' config) ------------------------


def post_worker_init(worker: Any) -> None:
    """In each worker, once it loaded the app: the metrics at ``/metrics``,
    through the same function ``init_app`` calls for ``ORDERHOOKS_METRICS_URL``."""
    enable(worker.wsgi)


def child_exit(server: Any, worker: Any) -> None:
    """What docs/metrics.rst asks gunicorn's config to do."""
    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]


def enable(app: Any) -> None:
    app.config["ORDERHOOKS_METRICS_URL"] = "/metrics"
    hooks = get_extension(app)
    register_metrics(app, hooks, hooks.state(app))


def drain() -> None:
    """A delivery worker of the server's own (``python -c``): its attempts
    must reach the server's scrape through the shared directory."""
    app, _db, hooks = server_app.build_app(os.environ)
    enable(app)
    with app.app_context():
        attempted = hooks.process_due()
    print(f"drained {attempted}")


# -- the tests ----------------------------------------------------------------------


@pytest.fixture
def multiproc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty ``PROMETHEUS_MULTIPROC_DIR``, and this module as gunicorn's
    config, in the environment every server and worker of the test starts with."""
    path = tmp_path / "prometheus"
    path.mkdir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(path))
    monkeypatch.setenv("GUNICORN_CMD_ARGS", f"--config python:{__name__}")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    return path


def scrape(server: Server) -> Samples:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        text = response.read().decode()
        assert response.status == 200, text
    finally:
        connection.close()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.endswith("_created"):
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def nonzero(samples: Samples, name: str, label: str) -> dict[tuple[str, str, str], float]:
    found = {}
    for (sample, labels), value in samples.items():
        if sample == name and value:
            d = dict(labels)
            found[(d["provider"], d["callback"], d[label])] = value
    return found


def deliveries(samples: Samples) -> dict[str, float]:
    return {
        dict(labels)["status"]: value
        for (name, labels), value in samples.items()
        if name == "orderhooks_deliveries"
    }


def summary(samples: Samples) -> dict[str, Any]:
    """What a check compares: every non-zero count, and the gauges."""
    return {
        "requests": nonzero(samples, "orderhooks_requests_total", "code"),
        "dispatches": nonzero(samples, "orderhooks_dispatch_seconds_count", "outcome"),
        "attempts": nonzero(samples, "orderhooks_attempts_total", "outcome"),
        "deliveries": deliveries(samples),
        "store_up": samples[("orderhooks_store_up", ())],
    }


def scrapes(server: Server) -> list[dict[str, Any]]:
    return [summary(scrape(server)) for _ in range(SCRAPES)]


@pytest.mark.system
@pytest.mark.parametrize("backend", [SQLITE, POSTGRESQL])
def test_every_scrape_counts_both_workers_exactly(
    backend: str,
    request: pytest.FixtureRequest,
    multiproc: Path,
    start_server: ServerFactory,
    report: ReportFn,
) -> None:
    url = str(request.getfixturevalue(URL_FIXTURES[backend]))
    # Slow receivers, sent eight at a time: both sync workers must take some.
    server = start_server(url, workers=2, receiver_delay=0.1)

    # "Booting worker" is logged before the worker loads the app; its metrics
    # files appear once post_worker_init has registered them: only then can
    # it take a request, and the burst below reach both workers.
    # Named by the workers' own pids: a file of the master's (or of a worker
    # that died at boot) says nothing about who can take a request.
    def registered() -> bool:
        workers = set(server.booted_pids())
        files = {int(p.stem.split("_")[-1]) for p in multiproc.glob("counter_*.db")}
        return len(workers) >= 2 and workers <= files

    wait_for(registered, "both gunicorn workers to register their metrics")
    first = [signed("igv", f"m{i:03d}") for i in range(12)] + [
        signed("collect", f"m{i:03d}") for i in range(4)
    ]
    genuine = signed("igv", "forged")
    forged = dataclasses.replace(genuine, headers={**genuine.headers, "X-Signature": "0" * 64})
    jobs = [*first, *first[:3], forged, forged]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda cb: post(server.port, cb), jobs))
    assert [a.status for a in answers] == [200] * 19 + [401, 401]
    pids = {effect.pid for effect in server.effects()}
    # On SQLite one worker can hold the only write lock through a whole burst
    # (the other sleeps in its busy handler and loses each race for it): more
    # fresh deliveries, counted, until both have dispatched some.
    extra = 0
    while len(pids) < 2 and extra < 64:
        more = [signed("igv", f"x{extra + i:03d}") for i in range(8)]
        with ThreadPoolExecutor(8) as pool:
            assert [a.status for a in pool.map(lambda cb: post(server.port, cb), more)] == [200] * 8
        extra += len(more)
        pids = {effect.pid for effect in server.effects()}
    assert len(pids) == 2, "one worker took every request: the test proves nothing"

    expected = {
        "requests": {
            ("igv", "order-status", "200"): 15.0 + extra,
            ("igv", "order-status", "401"): 2.0,
            ("gateway", "collect", "200"): 4.0,
        },
        "dispatches": {
            ("igv", "order-status", "done"): 12.0 + extra,
            ("gateway", "collect", "done"): 4.0,
        },
        "attempts": {},
        "deliveries": dict.fromkeys(COUNTED_STATUSES, 0.0),
        "store_up": 1.0,
    }
    assert scrapes(server) == [expected] * SCRAPES
    # One file per process and kind, named by pid: both workers wrote theirs.
    assert {int(p.stem.split("_")[-1]) for p in multiproc.glob("counter_*.db")} >= pids

    # A worker killed and replaced: what it counted stays counted.
    victim = sorted(pids)[0]
    os.kill(victim, signal.SIGKILL)
    server.wait_for_workers(3)
    assert scrapes(server) == [expected] * SCRAPES
    report(
        f"{backend}: 2 gunicorn workers (pids {sorted(pids)}), {len(jobs) + extra} requests, "
        f"{SCRAPES} scrapes before and after SIGKILL of {victim}: all exact"
    )


@pytest.mark.system
def test_a_delivery_workers_attempts_reach_the_servers_scrape(
    multiproc: Path, sqlite_url: str, start_server: ServerFactory, report: ReportFn
) -> None:
    server = start_server(sqlite_url, workers=2, dispatch="deferred")
    for i in range(5):
        assert post(server.port, signed("igv", f"d{i:03d}")).status == 200
    stored = scrapes(server)
    assert {tuple(s["deliveries"].items()) for s in stored} == {
        (("pending", 5.0), ("processing", 0.0), ("failed", 0.0), ("dead", 0.0))
    }
    assert all(s["attempts"] == {} and s["dispatches"] == {} for s in stored)

    # Same host, same directory, same config: another process's attempts.
    done = subprocess.run(
        [sys.executable, "-c", f"from {__name__} import drain; drain()"],
        cwd=ROOT,
        env={**os.environ, **server.settings},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "drained 5\n"
    wait_for(lambda: len(server.effects()) == 5, "the five receiver rows")
    assert (
        scrapes(server)
        == [
            {
                "requests": {("igv", "order-status", "200"): 5.0},
                "dispatches": {("igv", "order-status", "done"): 5.0},
                "attempts": {("igv", "order-status", "done"): 5.0},
                "deliveries": dict.fromkeys(COUNTED_STATUSES, 0.0),
                "store_up": 1.0,
            }
        ]
        * SCRAPES
    )
    report("sqlite: 5 deferred deliveries drained by another process, counted by the server")
