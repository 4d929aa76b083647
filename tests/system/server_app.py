"""The host application the system tests run under real gunicorn workers.

gunicorn loads ``tests.system.server_app:create_app()``, which reads all of
its configuration from the environment, so every worker of one server is the
same app. The test process calls :func:`build_app` with the same settings to
create the tables before gunicorn starts and to read the outcome afterwards.

Receivers write one :class:`Effect` row per dispatch through ``db.session``
and never commit: the extension commits the row together with the delivery's
``done`` mark, so a committed row *is* a committed effect. ``Effect.key`` is
deliberately not unique: a second dispatch of a key must show up as a second
row, not be hidden by a constraint.

Receiver behaviours (``ORDERHOOKS_SYSTEM_RECEIVER``), decided per key across
all workers through files in ``ORDERHOOKS_SYSTEM_CONTROL_DIR``:

``record``
    write the row (after ``ORDERHOOKS_SYSTEM_RECEIVER_DELAY`` seconds, if set).
``fail-once``
    the first attempt of a key writes and flushes a row, then raises; later
    attempts write the row.
``block-once``
    the first attempt of a key writes and flushes a row, writes the worker's
    pid to ``<control>/<marker>.pid``, then waits until ``<control>/release``
    exists (bounded); later attempts write the row.
``fail-twice``
    the first two attempts of a key write and flush a row, then raise; the
    third and later attempts write the row.
``fail-always``
    every attempt writes and flushes a row, then raises.

Deferred dispatch (``ORDERHOOKS_DISPATCH="deferred"``) runs the receivers in
``flask --app tests.system.server_app:create_app orderhooks worker``
processes started with the same environment; the behaviours above are then
decided across the worker processes. With a control directory, every
``delivery_failed`` and ``delivery_dead`` signal, in whichever process, leaves
one JSON file in ``<control>/signals`` (see :func:`signal_records`).

``ORDERHOOKS_SYSTEM_CLOCK_FILE`` names a file holding a number of seconds:
every process's extension then runs on real time plus that offset, so a test
moves the retry schedule forward in all of them at once by rewriting it.

With ``ORDERHOOKS_SYSTEM_TIME_LOCKS`` set, the process times each of its
transactions from its first locking statement to its end, and prints the count
and the longest to stderr when it exits (see :func:`time_lock_holds`).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import re
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from flask_orderhooks import (
    OrderHooks,
    delivery_dead,
    delivery_failed,
    game_order_changed,
    order_pending_delivery,
    payment_collected,
    payout_finished,
)
from flask_orderhooks.events import (
    GameOrderChanged,
    OrderPendingDelivery,
    PaymentCollected,
    PayoutFinished,
)
from flask_orderhooks.store import DeliveryStore, StoredDelivery

DATABASE_URL = "ORDERHOOKS_SYSTEM_DATABASE_URL"
RECEIVER = "ORDERHOOKS_SYSTEM_RECEIVER"
CONTROL_DIR = "ORDERHOOKS_SYSTEM_CONTROL_DIR"
#: Seconds every receiver spends before writing, inside the delivery's
#: transaction: holds the row lock (PostgreSQL) or the write lock (SQLite) long
#: enough for duplicates to pile up behind it.
RECEIVER_DELAY = "ORDERHOOKS_SYSTEM_RECEIVER_DELAY"
#: Seconds between a delivery's claim (committed) and its dispatch, which takes
#: the lock: widens the window in which a duplicate finds the delivery claimed
#: but not yet locked, so it polls and is answered busy. On a fast machine that
#: window is one statement wide and a storm may never hit it.
DISPATCH_DELAY = "ORDERHOOKS_SYSTEM_DISPATCH_DELAY"
#: The host's SQLite busy timeout in seconds (the driver's default is 5): a
#: short one turns lock waits into "database is locked" errors.
SQLITE_TIMEOUT = "ORDERHOOKS_SYSTEM_SQLITE_TIMEOUT"
#: A file holding the seconds every process adds to the real time: the
#: extension's clock (see the module docstring).
CLOCK_FILE = "ORDERHOOKS_SYSTEM_CLOCK_FILE"
#: Set: the process reports how long its transactions held row locks.
TIME_LOCKS = "ORDERHOOKS_SYSTEM_TIME_LOCKS"
#: The line :func:`time_lock_holds` prints at exit.
LOCK_HOLDS_LINE = "orderhooks-system: {count} lock-holding transactions, longest {ms:.0f} ms"
LOCK_HOLDS = re.compile(r"orderhooks-system: (\d+) lock-holding transactions, longest (\d+) ms")
#: Config keys read from the environment as JSON values.
JSON_CONFIG_KEYS = (
    "ORDERHOOKS_IGV_SECRET",
    "ORDERHOOKS_GATEWAY_KEY",
    "ORDERHOOKS_SUD_APPS",
    "ORDERHOOKS_CLAIM_TIMEOUT",
    "ORDERHOOKS_DUPLICATE_WAIT",
    "ORDERHOOKS_DISPATCH",
    "ORDERHOOKS_RETRY_DELAYS",
    "ORDERHOOKS_WORKER_POLL_INTERVAL",
)
RECEIVERS = ("record", "fail-once", "block-once", "fail-twice", "fail-always")
#: How many attempts of a key ``fail-twice`` fails.
FAIL_TWICE = 2
#: Longest a blocked receiver waits for the release file. Shorter than
#: gunicorn's --timeout, so gunicorn never kills the worker before the test does.
BLOCK_LIMIT = 40.0
#: The error text of a planned failure, with the key appended.
PLANNED_FAILURE = "planned failure of the first attempt for"
#: The error text of ``fail-twice``'s and ``fail-always``'s failures: the
#: attempt's number (as the receivers counted it) and the key are appended.
PLANNED_ATTEMPT_FAILURE = "planned failure of attempt"
#: The subdirectory of the control directory that holds the signal records.
SIGNALS = "signals"


class Base(DeclarativeBase):
    pass


class Effect(Base):
    """One row per dispatch a receiver ran (committed only with its delivery)."""

    __tablename__ = "system_effects"
    id: Mapped[int] = mapped_column(primary_key=True)
    provider: Mapped[str] = mapped_column(sa.String(16))
    callback: Mapped[str] = mapped_column(sa.String(32))
    key: Mapped[str] = mapped_column(sa.String(200), index=True)
    pid: Mapped[int]
    note: Mapped[str] = mapped_column(sa.String(40))


def delivery_key(event: object) -> tuple[str, str, str]:
    """The store's ``(provider, callback, key)`` of the delivery behind ``event``."""
    if isinstance(event, OrderPendingDelivery):
        return "igv", "order-status", event.request_id
    if isinstance(event, PaymentCollected):
        return "gateway", "collect", f"{event.id}:{event.status}"
    if isinstance(event, PayoutFinished):
        return "gateway", "payout", f"{event.id}:{event.status}"
    if isinstance(event, GameOrderChanged):
        return "sud", "order-changed", event.notify_id
    raise TypeError(f"No system-test key for {type(event).__name__}.")


def marker(key: str) -> str:
    """A file name for ``key`` (gateway keys hold ``:``, iGV ids anything)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]


def _first_attempt(control: Path, key: str) -> bool:
    # O_EXCL makes exactly one attempt, in whichever worker, the first one.
    try:
        fd = os.open(control / f"{marker(key)}.first", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def _attempt_number(control: Path, key: str) -> int:
    """The number of this attempt of ``key``, counted across every process.

    Each attempt creates the next ``<marker>.attempt-<n>`` with ``O_EXCL``:
    two attempts can never get the same number.
    """
    number = 1
    while True:
        path = control / f"{marker(key)}.attempt-{number}"
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            number += 1
            continue
        os.close(fd)
        return number


def _write_pid(control: Path, key: str) -> None:
    # Written whole then renamed: the test never reads half a pid.
    final = control / f"{marker(key)}.pid"
    partial = final.with_suffix(".partial")
    partial.write_text(str(os.getpid()))
    os.replace(partial, final)


def _make_receiver(db: SQLAlchemy, behaviour: str, control: Path | None, delay: float) -> Any:
    def receive(sender: Flask, *, event: object, **_: Any) -> None:
        provider, callback, key = delivery_key(event)
        if delay:
            time.sleep(delay)
        effect = Effect(provider=provider, callback=callback, key=key, pid=os.getpid())
        if behaviour in {"fail-twice", "fail-always"} and control is not None:
            number = _attempt_number(control, key)
            if behaviour == "fail-always" or number <= FAIL_TWICE:
                effect.note = f"attempt {number}"
                db.session.add(effect)
                # Flushed, then rolled back by the failure: never committed.
                db.session.flush()
                raise RuntimeError(f"{PLANNED_ATTEMPT_FAILURE} {number} for {key}")
            effect.note = "committed"
            db.session.add(effect)
            return
        if behaviour == "record" or control is None or not _first_attempt(control, key):
            effect.note = "committed"
            db.session.add(effect)
            return
        effect.note = "first attempt"
        db.session.add(effect)
        # Sent to the database now, inside the delivery's transaction: the
        # test proves the rollback, not a row that never left the process.
        db.session.flush()
        if behaviour == "fail-once":
            raise RuntimeError(f"{PLANNED_FAILURE} {key}")
        _write_pid(control, key)
        deadline = time.monotonic() + BLOCK_LIMIT
        while not (control / "release").exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    return receive


def _write_json(path: Path, record: Mapping[str, Any]) -> None:
    # Written whole then renamed: a reader never sees half a record.
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(record), "utf-8")
    os.replace(partial, path)


def _delivery_record(
    name: str, delivery: StoredDelivery, extra: Mapping[str, Any]
) -> dict[str, Any]:
    return {
        "signal": name,
        "pid": os.getpid(),
        "provider": delivery.provider,
        "callback": delivery.callback,
        "key": delivery.key,
        "status": delivery.status,
        "attempts": delivery.attempts,
        "error": delivery.error,
        "next_attempt_at": (
            None if delivery.next_attempt_at is None else delivery.next_attempt_at.isoformat()
        ),
        **extra,
    }


def _connect_signal_records(app: Flask, control: Path) -> None:
    """Leave one file per ``delivery_failed`` and ``delivery_dead`` signal."""
    folder = control / SIGNALS
    folder.mkdir(exist_ok=True)

    def failed(
        sender: Flask,
        *,
        delivery: StoredDelivery,
        error: str,
        next_attempt_at: Any,
        **_: Any,
    ) -> None:
        nxt = None if next_attempt_at is None else next_attempt_at.isoformat()
        record = _delivery_record(
            "delivery_failed", delivery, {"signal_error": error, "signal_next_attempt_at": nxt}
        )
        _write_json(folder / f"failed-{marker(delivery.key)}-{uuid.uuid4().hex}.json", record)

    def dead(sender: Flask, *, delivery: StoredDelivery, error: str, **_: Any) -> None:
        record = _delivery_record("delivery_dead", delivery, {"signal_error": error})
        _write_json(folder / f"dead-{marker(delivery.key)}-{uuid.uuid4().hex}.json", record)

    delivery_failed.connect(failed, app, weak=False)
    delivery_dead.connect(dead, app, weak=False)


def signal_records(control: Path, name: str) -> list[dict[str, Any]]:
    """Every record of signal ``name`` (``"delivery_failed"`` or
    ``"delivery_dead"``) sent by any process of one server and its workers."""
    prefix = {"delivery_failed": "failed-", "delivery_dead": "dead-"}[name]
    folder = control / SIGNALS
    if not folder.exists():
        return []
    records = [
        json.loads(path.read_text("utf-8"))
        for path in folder.iterdir()
        if path.name.startswith(prefix) and path.suffix == ".json"
    ]
    return sorted(records, key=lambda r: (r["provider"], r["callback"], r["key"], r["attempts"]))


def offset_clock(path: Path) -> Callable[[], float]:
    """Real time plus the seconds in ``path``, read at every call."""

    def clock() -> float:
        return time.time() + float(path.read_text("utf-8"))

    return clock


def set_clock_offset(path: Path, seconds: float) -> None:
    """Move every process's clock to real time plus ``seconds``."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(repr(float(seconds)), "utf-8")
    os.replace(partial, path)


def build_app(
    settings: Mapping[str, str], *, connect_receivers: bool = True
) -> tuple[Flask, SQLAlchemy, OrderHooks]:
    """The host app for ``settings`` (environment-style names and values).

    :param connect_receivers: ``False`` in the test process, which only
        creates tables and reads results and must not leave receivers behind.
    """
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = settings[DATABASE_URL]
    if SQLITE_TIMEOUT in settings:
        app.config["SQLALCHEMY_ENGINE_OPTIONS"] = {
            "connect_args": {"timeout": float(settings[SQLITE_TIMEOUT])}
        }
    for name in JSON_CONFIG_KEYS:
        if name in settings:
            app.config[name] = json.loads(settings[name])
    db = SQLAlchemy(app, model_class=Base)
    if CLOCK_FILE in settings:
        hooks = OrderHooks(app, db=db, clock=offset_clock(Path(settings[CLOCK_FILE])))
    else:
        hooks = OrderHooks(app, db=db)
    if TIME_LOCKS in settings:
        with app.app_context():
            time_lock_holds(db.engine)
    if DISPATCH_DELAY in settings:
        _delay_dispatch(hooks.state(app).store, float(settings[DISPATCH_DELAY]))
    if connect_receivers:
        behaviour = settings.get(RECEIVER, "record")
        if behaviour not in RECEIVERS:
            raise ValueError(
                f"{RECEIVER} must be one of {', '.join(RECEIVERS)}, not {behaviour!r}."
            )
        control = Path(settings[CONTROL_DIR]) if CONTROL_DIR in settings else None
        delay = float(settings.get(RECEIVER_DELAY, "0"))
        receiver = _make_receiver(db, behaviour, control, delay)
        for signal in (
            order_pending_delivery,
            payment_collected,
            payout_finished,
            game_order_changed,
        ):
            signal.connect(receiver, app, weak=False)
        if control is not None:
            _connect_signal_records(app, control)
    return app, db, hooks


def time_lock_holds(engine: sa.Engine) -> None:
    """Time each transaction on ``engine`` from its first locking statement
    (a write or ``FOR UPDATE``) to its commit or rollback, and print how many
    there were and the longest when the process exits.

    The server's own catalog cannot say this on MariaDB: its
    ``innodb_trx.trx_started`` and ``trx_wait_started`` were seen seconds
    stale, and a read-only transaction's id is the connection's, batch after
    batch. So the purge process reports it itself.
    """
    longest = [0.0]
    count = [0]
    locking = ("INSERT", "UPDATE", "DELETE", "SET STATEMENT")

    def before(conn: sa.Connection, _cursor: Any, statement: str, *_: Any) -> None:
        text = statement.lstrip().upper()
        if "orderhooks_locked_at" not in conn.info and (
            text.startswith(locking) or "FOR UPDATE" in text
        ):
            conn.info["orderhooks_locked_at"] = time.monotonic()

    def ended(conn: sa.Connection) -> None:
        began = conn.info.pop("orderhooks_locked_at", None)
        if began is not None:
            count[0] += 1
            longest[0] = max(longest[0], time.monotonic() - began)

    sa.event.listen(engine, "before_cursor_execute", before)
    sa.event.listen(engine, "commit", ended)
    sa.event.listen(engine, "rollback", ended)

    def report() -> None:
        print(LOCK_HOLDS_LINE.format(count=count[0], ms=longest[0] * 1000), file=sys.stderr)

    atexit.register(report)


def _delay_dispatch(store: DeliveryStore, seconds: float) -> None:
    dispatch = store.dispatch

    def delayed(*args: Any, **kwargs: Any) -> None:
        time.sleep(seconds)
        dispatch(*args, **kwargs)

    store.dispatch = delayed  # type: ignore[method-assign]


def create_app() -> Flask:
    """gunicorn's entry point: the app configured from ``os.environ``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s [%(process)d] %(name)s: %(message)s"))
    library = logging.getLogger("flask_orderhooks")
    library.addHandler(handler)
    library.setLevel(logging.WARNING)
    # The handler above already prints; the root logger would print twice.
    library.propagate = False
    return build_app(os.environ)[0]
