"""The demo: the example shop receives signed callbacks over real HTTP.

One callback of each kind, a platform's retry of one of them and a forged
one are posted to the shop, running on a local server with SQLite in a fresh
temporary folder. For each the demo prints what was sent, the answer, and
what happened; then the deliveries table and the shop's records::

    python -m example_app.demo        # or ./scripts/demo

It exits 0 when every callback had the expected outcome, 1 otherwise.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from blinker import NamedSignal
from flask import Flask
from werkzeug.serving import WSGIRequestHandler, make_server

from flask_orderhooks import (
    callback_unhandled,
    game_order_changed,
    get_extension,
    order_pending_delivery,
    payment_collected,
    payout_finished,
)
from flask_orderhooks.testing import (
    SignedCallback,
    gateway_collect,
    gateway_payout,
    igv_order_status,
    sud_order,
    sud_order_batch_changed,
    sud_order_changed,
)

from . import create_app
from .models import GameOrder, Order, Payment, Payout, db

DISPATCHED = "dispatched"
DUPLICATE = "duplicate"
REFUSED = "refused"
FAILED = "failed"

_SIGNALS: dict[str, NamedSignal] = {
    "order_pending_delivery": order_pending_delivery,
    "payment_collected": payment_collected,
    "payout_finished": payout_finished,
    "game_order_changed": game_order_changed,
    "callback_unhandled": callback_unhandled,
}

_WIDTH = 100
_INDENT = " " * 12


@dataclass(frozen=True)
class Step:
    """One callback to post, and the answer and outcome it should get."""

    title: str
    callback: SignedCallback
    status: int
    outcome: str


def steps(app: Flask) -> list[Step]:
    """The callbacks the demo posts, signed with the app's secrets."""
    igv = igv_order_status(app=app, request_id="2002986662652579841")
    paid = gateway_collect(app=app, id="C1001", trans_id="SHOP-1001", order_amount="100.00")
    underpaid = gateway_collect(
        app=app, id="C1002", trans_id="SHOP-1002", order_amount="50.00", payed_amount="45.00"
    )
    payout = gateway_payout(app=app, id="P2001", trans_id="WDL-2001", order_amount="30.00")
    gift = sud_order_changed(
        app=app, notify_id="N-3001", order_id="G-3001", out_order_id="SHOP-G-3001", value=5
    )
    batch = sud_order_batch_changed(
        app=app,
        notify_id="N-3002",
        orders=[
            sud_order(order_id="G-3002", out_order_id="SHOP-G-3002", cmd="bet", value=10),
            sud_order(
                order_id="G-3003", out_order_id="SHOP-G-3003", cmd="bet", status="EXECUTE_FAIL"
            ),
        ],
    )
    # Signed with a key the shop does not have, as an attacker would have to.
    forged = gateway_collect(
        "a-guessed-key", app=app, id="C1003", trans_id="SHOP-1003", order_amount="999.00"
    )
    return [
        Step("iGV order status: order SO1689644928115784 awaits delivery", igv, 200, DISPATCHED),
        Step("Gateway collect: SHOP-1001 paid 100.00 of 100.00", paid, 200, DISPATCHED),
        Step("Gateway collect: SHOP-1002 paid 45.00 of 50.00", underpaid, 200, DISPATCHED),
        Step("Gateway payout: WDL-2001 paid out 30.00", payout, 200, DISPATCHED),
        Step("SUD order changed: one gift", gift, 200, DISPATCHED),
        Step("SUD order batch changed: two bets", batch, 200, DISPATCHED),
        Step("Platform retry: the SHOP-1001 collect again", paid, 200, DUPLICATE),
        Step("Forgery: a collect signed with a guessed key", forged, 401, REFUSED),
    ]


class _QuietHandler(WSGIRequestHandler):
    """The demo prints its own account of each request."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


class _LogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        label = "shop" if record.name == "example_app.receivers" else record.levelname.lower()
        return f"    {label:<8}{record.getMessage()}"


@contextmanager
def _show_logs() -> Iterator[None]:
    """Print what the shop's receivers log, and the extension's warnings."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_LogFormatter())
    levels = {"example_app": logging.INFO, "flask_orderhooks": logging.WARNING}
    saved = {}
    for name, level in levels.items():
        logger = logging.getLogger(name)
        saved[name] = logger.level
        logger.setLevel(level)
        logger.addHandler(handler)
    try:
        yield
    finally:
        for name, level in saved.items():
            logger = logging.getLogger(name)
            logger.removeHandler(handler)
            logger.setLevel(level)


@contextmanager
def _signals_sent(app: Flask) -> Iterator[list[str]]:
    """The names of the signals ``app`` sends inside the block: how the demo
    tells a dispatched callback from a duplicate, which gets the same answer."""
    sent: list[str] = []
    receivers = []
    for name, signal in _SIGNALS.items():

        def record(sender: Flask, *, event: object, _name: str = name) -> None:
            sent.append(_name)

        signal.connect(record, app, weak=False)
        receivers.append((signal, record))
    try:
        yield sent
    finally:
        for signal, receiver in receivers:
            signal.disconnect(receiver, app)


# The server is on this machine: never send its requests through a proxy.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _post(url: str, callback: SignedCallback) -> tuple[int, str]:
    request = urllib.request.Request(
        url, data=callback.body, headers=callback.headers, method="POST"
    )
    try:
        with _opener.open(request, timeout=10) as response:
            return int(response.status), response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode("utf-8", "replace")


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _lines(parts: Sequence[str], width: int) -> list[str]:
    """Pack ``parts`` into lines of at most ``width`` (a longer part stays whole)."""
    lines: list[str] = []
    for part in parts:
        if lines and len(lines[-1]) + 2 + len(part) <= width:
            lines[-1] += "  " + part
        else:
            lines.append(part)
    return lines


def _show_request(prefix: str, callback: SignedCallback) -> None:
    print(f"    sent    POST {callback.url(prefix)}")
    width = _WIDTH - len(_INDENT)
    headers = [
        f"{name}: {_short(value, 20)}"
        for name, value in callback.headers.items()
        if name != "Content-Type"
    ]
    body = callback.body.decode("utf-8")
    chunks = [body[i : i + width] for i in range(0, len(body), width)]
    if len(chunks) > 3:
        chunks = [*chunks[:2], _short(chunks[2] + "...", width)]
    for line in _lines(headers, width) + chunks:
        print(_INDENT + line)


def _outcome(status: int, sent: Sequence[str]) -> str:
    if status != 200:
        return REFUSED if 400 <= status < 500 else FAILED
    return DISPATCHED if sent else DUPLICATE


def _explain(outcome: str, sent: Sequence[str]) -> str:
    if outcome == DISPATCHED:
        names = sorted(set(sent), key=sent.index)
        return "dispatched: " + ", ".join(
            name if sent.count(name) == 1 else f"{name} x{sent.count(name)}" for name in names
        )
    if outcome == DUPLICATE:
        return "duplicate: answered as done, the receivers did not run again"
    if outcome == REFUSED:
        return "refused: nothing stored, no receiver ran"
    return "failed: the platform would retry"


def run_steps(app: Flask, base_url: str) -> int:
    """Post every step's callback; print and count the unexpected outcomes."""
    prefix = get_extension(app).state(app).settings.url_prefix
    unexpected = 0
    all_steps = steps(app)
    for number, step in enumerate(all_steps, 1):
        print(f"\n[{number}] {step.title}")
        _show_request(prefix, step.callback)
        with _signals_sent(app) as sent:
            status, body = _post(base_url + step.callback.url(prefix), step.callback)
        print(f"    answer  {status} {body}")
        outcome = _outcome(status, sent)
        if (status, outcome) == (step.status, step.outcome):
            verdict = "(as expected)"
        else:
            unexpected += 1
            verdict = f"UNEXPECTED: expected {step.status} {step.outcome}"
        print(f"    result  {_explain(outcome, sent)}  {verdict}")
    if unexpected:
        print(f"\n{unexpected} of {len(all_steps)} callbacks did NOT have the expected outcome.")
    else:
        print(f"\nAll {len(all_steps)} callbacks had the expected outcome.")
    return unexpected


def _table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    print(f"\n{title}")
    if not rows:
        print("  (none)")
        return
    cells = [list(header)] + [["" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def show_tables(app: Flask) -> None:
    """Print the deliveries table and the shop's records, oldest first."""
    with app.app_context():
        deliveries = get_extension(app).state(app).store.list()[::-1]
        _table(
            "Deliveries (the forged callback is not here: it was refused before the store)",
            ("PLATFORM", "CALLBACK", "KEY", "STATUS", "ATTEMPTS", "LAST ERROR"),
            [
                (d.provider, d.callback, d.key, d.status, d.attempts, _short(d.error or "", 40))
                for d in deliveries
            ],
        )
        session = db.session
        _table(
            "Shop orders (iGV)",
            ("ORDER", "IGV ID", "BUYER", "DELIVERY STATE"),
            [
                (o.order_num, o.igv_order_id, o.buyer_id, o.delivery_state)
                for o in session.scalars(sa.select(Order).order_by(Order.id))
            ],
        )
        _table(
            "Shop payments (gateway collect)",
            ("ID", "SHOP ORDER", "ORDERED", "PAID", "CREDITED", "NOTE"),
            [
                (
                    p.gateway_id,
                    p.trans_id,
                    p.order_amount,
                    p.payed_amount,
                    "yes" if p.credited else "no",
                    p.note,
                )
                for p in session.scalars(sa.select(Payment).order_by(Payment.id))
            ],
        )
        _table(
            "Shop payouts (gateway payout)",
            ("ID", "WITHDRAWAL", "AMOUNT", "STATE", "FINISHED AT"),
            [
                (p.gateway_id, p.trans_id, p.amount, p.state, p.finished_at)
                for p in session.scalars(sa.select(Payout).order_by(Payout.id))
            ],
        )
        _table(
            "Shop game orders (SUD)",
            ("SHOP ORDER", "SUD ORDER", "CMD", "FROM", "TO", "VALUE", "STATUS"),
            [
                (g.out_order_id, g.order_id, g.cmd, g.from_uid, g.to_uid, g.value, g.status)
                for g in session.scalars(sa.select(GameOrder).order_by(GameOrder.id))
            ],
        )


def main() -> int:
    """Run the demo; 0 when every outcome was the expected one."""
    with tempfile.TemporaryDirectory(prefix="orderhooks-demo-") as instance, _show_logs():
        print(f"flask-orderhooks demo: the example shop, with SQLite in {instance}")
        # The database is named explicitly so that a FLASK_SQLALCHEMY_DATABASE_URI
        # in the environment cannot point the demo at a real database.
        database = "sqlite:///" + str(Path(instance, "shop.sqlite3"))
        # The demo's callbacks are signed with the public demo secrets.
        app = create_app(
            {"SQLALCHEMY_DATABASE_URI": database, "SHOP_DEMO_SECRETS": True},
            instance_path=instance,
        )
        server = make_server("127.0.0.1", 0, app, request_handler=_QuietHandler)
        thread = threading.Thread(target=server.serve_forever, name="demo-server", daemon=True)
        thread.start()
        base_url = f"http://127.0.0.1:{server.server_port}"
        print(f"Serving on {base_url}; posting callbacks with urllib.")
        try:
            unexpected = run_steps(app, base_url)
            show_tables(app)
        finally:
            server.shutdown()
            thread.join()
            server.server_close()
            with app.app_context():
                db.engine.dispose()
    print("\nServer stopped.", "FAILED." if unexpected else "OK.")
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
