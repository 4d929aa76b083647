"""A provider written by a host app, through the public API only: it gets the
store, dispatch modes, retries, CLI, console and testing kit of the built-ins."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import html
import json
import logging
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import pytest
from blinker import Namespace
from click.testing import Result
from flask import Flask, Response
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from flask_orderhooks import (
    BUILTIN_PROVIDERS,
    BadSignature,
    ConfigurationError,
    Delivery,
    Dispatch,
    MalformedPayload,
    OrderHooks,
    Provider,
    SignatureExpired,
    delivery_dead,
)
from flask_orderhooks.cli import orderhooks as orderhooks_cli
from flask_orderhooks.extension import _NAME_CHARACTERS as NAME_CHARACTERS
from flask_orderhooks.pytest_plugin import OrderHooksClient
from flask_orderhooks.store import StoredDelivery
from flask_orderhooks.testing import SignedCallback, build
from tests.conftest import BASE_CONFIG, AppFactory, Recorder
from tests.console.conftest import CONSOLE, SECRET_KEY, install_login

# -- the host's side: the Acme platform ----------------------------------------

_acme = Namespace()
#: Acme's own signal. ``event``: :class:`AcmeSettlement`.
acme_settled = _acme.signal("acme.order-settled")

ACME_SECRET = "acme-shared-secret-0123456789"
#: 2026-05-04T12:30:00Z: the frozen "now" of these tests.
NOW = int(datetime(2026, 5, 4, 12, 30, tzinfo=UTC).timestamp())


@dataclass(frozen=True)
class AcmeSettlement:
    delivery: str
    order: str
    amount: int
    settled_at: datetime


class AcmeProvider(Provider):
    """``POST {prefix}/acme/orders``: ``X-Acme-Signature`` is the hex
    HMAC-SHA256 of ``timestamp.delivery.body`` with ``ACME_SECRET``."""

    name = "acme"
    routes: Mapping[str, str] = {"order-settled": "/acme/orders"}
    signed_headers = ("X-Acme-Delivery", "X-Acme-Timestamp", "X-Acme-Signature")
    key_header = "X-Acme-Delivery"
    signals = (acme_settled,)
    config_defaults: ClassVar[Mapping[str, Any]] = {"ACME_SECRET": None, "ACME_MAX_AGE": 600}

    def __init__(self, secret: bytes, max_age: float) -> None:
        self.secret = secret
        self.max_age = max_age
        self.replay_window = max_age

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> AcmeProvider | None:
        max_age = config["ACME_MAX_AGE"]
        if isinstance(max_age, bool) or not isinstance(max_age, int) or max_age <= 0:
            raise ConfigurationError("ACME_MAX_AGE", "must be a positive number of seconds.")
        secret = config["ACME_SECRET"]
        if secret is None:
            return None
        if not isinstance(secret, str) or len(secret) < 16:
            raise ConfigurationError("ACME_SECRET", "must be a string of 16 characters or more.")
        return cls(secret.encode(), max_age)

    def read(
        self, callback: str, body: bytes, headers: Mapping[str, str], *, now: float | None
    ) -> Delivery:
        values = {}
        for name in self.signed_headers:
            if not headers.get(name):
                raise BadSignature(f"The {name} header is missing.")
            values[name] = headers[name]
        delivery, stamp, given = values.values()
        expected = acme_signature(stamp, delivery, body, self.secret)
        if not hmac.compare_digest(expected.encode(), given.encode("latin-1")):
            raise BadSignature("The X-Acme-Signature does not match.")
        if not stamp.isdigit():
            raise MalformedPayload("The X-Acme-Timestamp is not Unix seconds.")
        if now is not None and abs(now - int(stamp)) > self.max_age:
            raise SignatureExpired("The X-Acme-Timestamp is outside the window.")
        try:
            data = json.loads(body)
            order, amount = data["order"], data["amount"]
        except (ValueError, TypeError, KeyError):
            raise MalformedPayload("The body is not an Acme settlement.") from None
        event = AcmeSettlement(delivery, order, amount, datetime.fromtimestamp(int(stamp), UTC))
        return Delivery(
            provider=self.name,
            callback=callback,
            key=delivery,
            body=body,
            headers=values,
            dispatches=(Dispatch(acme_settled, event),),
            reference=order,
        )

    def sample(self, callback: str, **fields: Any) -> SignedCallback:
        """The testing kit's builder: signed with this provider's secret."""
        return acme_callback(self.secret.decode(), **fields)

    def answer(self, status: int, reason: str) -> Response:
        payload = {"received": True} if status < 300 else {"error": reason}
        return Response(json.dumps(payload), status=status, mimetype="application/json")


def acme_signature(stamp: str, delivery: str, body: bytes, secret: bytes) -> str:
    content = f"{stamp}.{delivery}.".encode() + body
    return hmac.new(secret, content, hashlib.sha256).hexdigest()


def acme_callback(
    secret: str = ACME_SECRET,
    *,
    delivery: str = "dlv-1",
    order: str = "A-1001",
    amount: int = 1200,
    at: int = NOW,
    body: bytes | None = None,
) -> SignedCallback:
    """What the host's own tests build: the kit's :class:`SignedCallback`."""
    raw = body if body is not None else json.dumps({"order": order, "amount": amount}).encode()
    headers = {
        "Content-Type": "application/json",
        "X-Acme-Delivery": delivery,
        "X-Acme-Timestamp": str(at),
        "X-Acme-Signature": acme_signature(str(at), delivery, raw, secret.encode()),
    }
    return SignedCallback("acme", "order-settled", "/acme/orders", raw, headers, delivery)


# -- fixtures ------------------------------------------------------------------


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Host:
    """An app with the Acme provider and a receiver on its signal."""

    app: Flask
    hooks: OrderHooks
    clock: Clock
    recorder: Recorder
    events: list[AcmeSettlement] = field(default_factory=list)
    fail_next: int = 0
    always_fail: bool = False

    def receive(self, sender: Flask, *, event: AcmeSettlement, **extra: Any) -> None:
        assert sender is self.app and not extra
        self.events.append(event)
        if self.always_fail or self.fail_next:
            self.fail_next = max(0, self.fail_next - 1)
            raise RuntimeError("acme receiver exploded on purpose")

    def post(self, cb: SignedCallback, **environ: Any) -> TestResponse:
        return self.app.test_client().post(
            cb.url(), data=cb.body, headers=cb.headers, environ_overrides=environ
        )

    def answer(self, cb: SignedCallback, **environ: Any) -> tuple[int, Any]:
        response = self.post(cb, **environ)
        assert response.mimetype == "application/json"
        return response.status_code, json.loads(response.data)

    def row(self, key: str, provider: str = "acme") -> StoredDelivery:
        with self.app.app_context():
            (row,) = self.hooks.store.get(key, provider=provider)
        return row

    def cli(self, *args: str) -> Result:
        return self.app.test_cli_runner().invoke(orderhooks_cli, list(args))

    def igv(self, request_id: str) -> SignedCallback:
        with self.app.app_context():
            cb = build("igv", app=self.app, request_id=request_id)
        response = self.app.test_client().post(cb.url(), data=cb.body, headers=cb.headers)
        assert response.status_code == 200
        return cb


HostFactory = Callable[..., Host]
RECEIVED = (200, {"received": True})


@pytest.fixture
def host(recorder: Callable[..., tuple[Flask, Recorder]]) -> Iterator[HostFactory]:
    """``host(providers=..., **config)``: built-ins and Acme by default."""
    made: list[Host] = []

    def factory(
        providers: list[type[Provider]] | None = None, *, now: float = NOW, **config: Any
    ) -> Host:
        clock = Clock(now)
        chosen = providers if providers is not None else [*BUILTIN_PROVIDERS, AcmeProvider]
        app, rec = recorder(
            hooks_options={"clock": clock, "providers": chosen},
            **{"ACME_SECRET": ACME_SECRET, **config},
        )
        result = Host(app, app.extensions["orderhooks"], clock, rec)
        acme_settled.connect(result.receive, app, weak=False)
        made.append(result)
        return result

    try:
        yield factory
    finally:
        for result in made:
            acme_settled.disconnect(result.receive, result.app)


def plain_app(tmp_path: Path, **config: Any) -> Flask:
    app = Flask("acme_host", instance_path=str(tmp_path))
    app.config.update({**BASE_CONFIG, "ACME_SECRET": ACME_SECRET, **config})
    return app


# -- the route and its answers -------------------------------------------------


def test_the_route_answers_in_acme_form(host: HostFactory) -> None:
    h = host()
    assert h.answer(acme_callback()) == RECEIVED
    assert h.events == [
        AcmeSettlement("dlv-1", "A-1001", 1200, datetime(2026, 5, 4, 12, 30, tzinfo=UTC))
    ]
    forged = acme_callback("another-secret-entirely", delivery="dlv-2")
    assert h.answer(forged) == (401, {"error": "The X-Acme-Signature does not match."})
    unsigned = acme_callback(delivery="dlv-3")
    del unsigned.headers["X-Acme-Timestamp"]
    assert h.answer(unsigned) == (401, {"error": "The X-Acme-Timestamp header is missing."})
    late = acme_callback(delivery="dlv-4", at=NOW - 601)
    assert h.answer(late) == (401, {"error": "The X-Acme-Timestamp is outside the window."})
    assert h.answer(acme_callback(delivery="dlv-5", at=NOW - 600)) == RECEIVED
    broken = acme_callback(delivery="dlv-6", body=b'{"order": "A-1"}')
    assert h.answer(broken) == (400, {"error": "The body is not an Acme settlement."})
    assert [e.delivery for e in h.events] == ["dlv-1", "dlv-5"]
    # The built-ins beside it are untouched.
    h.igv("req-1")
    assert h.row("req-1", "igv").status == "done"
    row = h.row("dlv-1")
    assert (row.callback, row.status, row.reference) == ("order-settled", "done", "A-1001")
    assert row.headers == {
        name: acme_callback().headers[name] for name in AcmeProvider.signed_headers
    }


def test_alone_the_built_in_routes_are_gone(host: HostFactory) -> None:
    h = host([AcmeProvider], ORDERHOOKS_STANDARD_WEBHOOKS={"shop": "whsec_c2VjcmV0"})
    client = h.app.test_client()
    for path in (
        "/orderhooks/igv/order-status",
        "/orderhooks/gateway/collect",
        "/orderhooks/gateway/payout",
        "/orderhooks/sud/order-changed",
        "/orderhooks/standard/shop",
    ):
        assert client.post(path, data=b"{}").status_code == 404, path
    assert list(h.hooks.state(h.app).providers) == ["acme"]
    assert h.answer(acme_callback()) == RECEIVED


def test_the_store_down_is_503_in_acme_form(tmp_path: Path) -> None:
    # Port 9 (discard) refuses connections on this loopback: a database that is down.
    app = plain_app(
        tmp_path, ORDERHOOKS_DATABASE_URI="postgresql+psycopg://postgres@127.0.0.1:9/test"
    )
    OrderHooks(app, providers=[AcmeProvider], clock=Clock())
    cb = acme_callback()
    response = app.test_client().post(cb.url(), data=cb.body, headers=cb.headers)
    assert (response.status_code, json.loads(response.data)) == (
        503,
        {"error": "The store is unavailable."},
    )


def test_allowed_ips_name_the_host_provider(host: HostFactory, tmp_path: Path) -> None:
    h = host(ORDERHOOKS_ALLOWED_IPS={"acme": ["10.0.0.0/8"]})
    assert h.answer(acme_callback(), REMOTE_ADDR="127.0.0.1") == (
        403,
        {"error": "The client address is not allowed."},
    )
    assert h.answer(acme_callback(), REMOTE_ADDR="10.1.2.3") == RECEIVED
    with pytest.raises(ConfigurationError) as caught:
        OrderHooks(
            plain_app(tmp_path, ORDERHOOKS_ALLOWED_IPS={"paypal": ["10.0.0.0/8"]}),
            providers=[*BUILTIN_PROVIDERS, AcmeProvider],
        )
    assert str(caught.value) == (
        "ORDERHOOKS_ALLOWED_IPS: unknown platform 'paypal'; "
        "use one of igv, gateway, sud, standard, acme."
    )
    with pytest.raises(ConfigurationError) as alone:
        OrderHooks(
            plain_app(tmp_path, ORDERHOOKS_ALLOWED_IPS={"igv": ["10.0.0.0/8"]}),
            providers=[AcmeProvider],
        )
    assert str(alone.value) == ("ORDERHOOKS_ALLOWED_IPS: unknown platform 'igv'; use one of acme.")


# -- the store -------------------------------------------------------------------


def test_exactly_once_and_key_conflicts(host: HostFactory) -> None:
    h = host()
    cb = acme_callback()
    assert h.answer(cb) == RECEIVED
    assert h.answer(cb) == RECEIVED
    assert len(h.events) == 1
    h.fail_next = 1
    failed = acme_callback(delivery="dlv-f")
    assert h.answer(failed) == (500, {"error": "A receiver failed; the delivery will be retried."})
    other = acme_callback(delivery="dlv-f", amount=999)
    assert h.answer(other) == (409, {"error": "This key is stored with a different body."})
    assert h.answer(failed) == RECEIVED
    assert [(e.delivery, e.amount) for e in h.events] == [
        ("dlv-1", 1200),
        ("dlv-f", 1200),
        ("dlv-f", 1200),
    ]
    row = h.row("dlv-f")
    assert (row.status, row.attempts) == ("done", 2)


def test_deferred_dispatch_retries_and_dead(host: HostFactory) -> None:
    h = host(ORDERHOOKS_DISPATCH="deferred", ORDERHOOKS_RETRY_DELAYS=[10, 20])
    dead: list[StoredDelivery] = []

    def on_dead(sender: Flask, *, delivery: StoredDelivery, error: str) -> None:
        dead.append(delivery)

    delivery_dead.connect(on_dead, h.app, weak=False)
    try:
        h.always_fail = True
        assert h.answer(acme_callback()) == RECEIVED
        assert h.events == [] and h.row("dlv-1").status == "pending"
        with h.app.app_context():
            assert h.hooks.process_due() == 1
            assert (h.row("dlv-1").status, h.row("dlv-1").attempts) == ("failed", 1)
            h.clock.now += 9
            assert h.hooks.process_due() == 0
            h.clock.now += 1
            assert h.hooks.process_due() == 1
            h.clock.now += 20
            assert h.hooks.process_due() == 1
            h.clock.now += 3600
            assert h.hooks.process_due() == 0
    finally:
        delivery_dead.disconnect(on_dead, h.app)
    row = h.row("dlv-1")
    assert (row.status, row.attempts) == ("dead", 3)
    assert row.error == "RuntimeError: acme receiver exploded on purpose"
    assert [(d.provider, d.callback, d.key) for d in dead] == [("acme", "order-settled", "dlv-1")]
    assert len(h.events) == 3
    # Fixed: the operator replays it, far outside the timestamp window.
    h.always_fail = False
    result = h.cli("replay", "dlv-1")
    assert result.exit_code == 0, result.output
    assert result.output == "acme order-settled dlv-1: replayed, attempt 4: done.\n"
    assert h.row("dlv-1").status == "done"


class BrokenOnRereadProvider(AcmeProvider):
    """Reads a request, and raises a plain bug when it reads the stored copy
    again (a worker's attempt, a replay: ``now`` is None)."""

    def read(
        self, callback: str, body: bytes, headers: Mapping[str, str], *, now: float | None
    ) -> Delivery:
        if now is None:
            raise LookupError("acme lost its table")
        return super().read(callback, body, headers, now=now)


def test_a_provider_that_raises_on_a_stored_delivery_fails_that_attempt(
    host: HostFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Not a CallbackError: before, the exception left the worker's pass and
    the row processing, to raise again after every lease, and a replay of
    many rows stopped at it. Now the attempt is failed, retried on schedule,
    and the replay reports it."""
    h = host([BrokenOnRereadProvider], ORDERHOOKS_DISPATCH="deferred", ORDERHOOKS_RETRY_DELAYS=[10])
    assert h.answer(acme_callback()) == RECEIVED
    with h.app.app_context(), caplog.at_level(logging.ERROR, logger="flask_orderhooks"):
        assert h.hooks.process_due() == 1
    row = h.row("dlv-1")
    assert (row.status, row.attempts, row.error) == (
        "failed",
        1,
        "LookupError: acme lost its table",
    )
    assert h.events == []
    assert [r.getMessage() for r in caplog.records] == [
        "acme order-settled dlv-1: the provider failed to read the stored delivery"
    ]
    replayed = h.cli("replay", "dlv-1")
    assert replayed.exit_code == 1
    assert replayed.output == (
        "acme order-settled dlv-1: failed: the acme provider could not read it (LookupError).\n"
        "Error: 1 of 1 replays did not succeed.\n"
    )
    assert h.row("dlv-1").attempts == 1, "nothing was claimed"


# -- the CLI -----------------------------------------------------------------------


def test_the_cli_lists_shows_and_replays(host: HostFactory) -> None:
    h = host()
    h.igv("req-1")
    h.fail_next = 1
    assert h.answer(acme_callback(delivery="dlv-9"))[0] == 500
    listed = h.cli("deliveries", "--provider", "acme")
    assert listed.exit_code == 0, listed.output
    lines = listed.output.splitlines()
    assert len(lines) == 2
    assert lines[1].split()[2:7] == ["acme", "order-settled", "dlv-9", "failed", "1"]
    assert "req-1" not in listed.output
    shown = h.cli("show", "dlv-9")
    assert shown.exit_code == 0, shown.output
    cb = acme_callback(delivery="dlv-9")
    for line in (
        "acme order-settled dlv-9",
        "  status:   failed",
        "  attempts: 1",
        "  error:    RuntimeError: acme receiver exploded on purpose",
        "  header:   X-Acme-Delivery: dlv-9",
        f"  header:   X-Acme-Signature: {cb.headers['X-Acme-Signature']}",
        f"  header:   X-Acme-Timestamp: {NOW}",
        "  body:     " + cb.body.decode(),
    ):
        assert line in shown.output.splitlines()
    assert ACME_SECRET not in shown.output
    replayed = h.cli("replay", "dlv-9")
    assert replayed.output == "acme order-settled dlv-9: replayed, attempt 2: done.\n"
    assert [e.delivery for e in h.events] == ["dlv-9", "dlv-9"]


def test_purge_respects_the_host_providers_window(host: HostFactory) -> None:
    h = host([AcmeProvider])
    assert h.answer(acme_callback()) == RECEIVED
    # Inside acme's 600 s window a purged key could be replayed: compacted.
    h.clock.now += 400
    inside = h.cli("purge", "--older-than", "5m")
    assert inside.exit_code == 0, inside.output
    assert inside.output.splitlines() == [
        "Deleted 0 and compacted 1 deliveries older than 5m (done).",
        "Done deliveries of acme were compacted, not deleted: their signatures can still "
        "be replayed.",
    ]
    with h.app.app_context():
        (tombstone,) = h.hooks.store.get("dlv-1")
    assert (tombstone.status, tombstone.body, tombstone.headers) == ("done", b"", {})
    assert tombstone.compacted_at is not None
    # Past the window it is deleted.
    h.clock.now += 7200
    purged = h.cli("purge", "--older-than", "1h")
    assert purged.exit_code == 0, purged.output
    assert purged.output.splitlines() == [
        "Deleted 1 and compacted 0 deliveries older than 1h (done)."
    ]
    with h.app.app_context():
        assert h.hooks.store.get("dlv-1") == []


class TimelessProvider(AcmeProvider):
    """A platform whose signature never expires, like the gateway's."""

    name = "timeless"
    routes: Mapping[str, str] = {"order-settled": "/timeless/orders"}

    def __init__(self, secret: bytes, max_age: float) -> None:
        super().__init__(secret, max_age)
        self.replay_window = None

    def read(
        self, callback: str, body: bytes, headers: Mapping[str, str], *, now: float | None
    ) -> Delivery:
        delivery = super().read(callback, body, headers, now=None)
        return Delivery(**{**delivery.__dict__, "provider": self.name})


def test_purge_compacts_a_timeless_host_provider_like_the_gateway(host: HostFactory) -> None:
    h = host([*BUILTIN_PROVIDERS, AcmeProvider, TimelessProvider])
    acme = acme_callback(delivery="dlv-a")
    assert h.answer(acme) == RECEIVED
    timeless = dataclasses.replace(
        acme_callback(delivery="dlv-t"), provider="timeless", path="/timeless/orders"
    )
    assert h.answer(timeless) == RECEIVED
    h.clock.now += 7200
    purged = h.cli("purge", "--older-than", "1h")
    assert purged.exit_code == 0, purged.output
    assert purged.output.splitlines()[0] == (
        "Deleted 1 and compacted 1 deliveries older than 1h (done)."
    )
    with h.app.app_context():
        assert h.hooks.store.get("dlv-a") == []
        (tombstone,) = h.hooks.store.get("dlv-t")
    assert (tombstone.provider, tombstone.body, tombstone.compacted_at is not None) == (
        "timeless",
        b"",
        True,
    )
    # The replay is still a duplicate: answered, not dispatched again.
    dispatched = len(h.events)
    assert h.answer(timeless) == RECEIVED
    assert len(h.events) == dispatched


# -- the console ---------------------------------------------------------------------


def _token(page: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert match is not None
    return html.unescape(match[1])


def _staff(h: Host) -> FlaskClient:
    client = h.app.test_client()
    with client.session_transaction() as s:
        s["staff"] = "alice"
    return client


def test_the_console_lists_shows_and_replays_it(host: HostFactory) -> None:
    h = host(SECRET_KEY=SECRET_KEY, ORDERHOOKS_CONSOLE_URL=CONSOLE, ORDERHOOKS_RETRY_DELAYS=[60])
    install_login(h.app, h.hooks)
    h.igv("req-1")
    h.fail_next = 1
    assert h.answer(acme_callback(delivery="dlv-c", order="A-77"))[0] == 500
    client = _staff(h)
    listing = client.get(f"{CONSOLE}/", query_string={"provider": "acme"})
    assert listing.status_code == 200
    page = listing.get_data(as_text=True)
    assert '<option value="acme" selected>acme</option>' in page
    assert re.findall(r'<tr class="oc-row" data-key="([^"]*)"', page) == ["dlv-c"]
    everything = client.get(f"{CONSOLE}/").get_data(as_text=True)
    assert sorted(re.findall(r'<tr class="oc-row" data-key="([^"]*)"', everything)) == [
        "dlv-c",
        "req-1",
    ]
    # Found by the order id the provider put in Delivery.reference.
    found = client.get(f"{CONSOLE}/", query_string={"q": "A-77"}).get_data(as_text=True)
    assert re.findall(r'<tr class="oc-row" data-key="([^"]*)"', found) == ["dlv-c"]
    detail = client.get(f"{CONSOLE}/delivery/acme/order-settled", query_string={"key": "dlv-c"})
    assert detail.status_code == 200
    text = detail.get_data(as_text=True)
    assert 'id="oc-replay"' in text and "is not configured on this app" not in text
    assert ACME_SECRET not in text
    replayed = client.post(
        f"{CONSOLE}/delivery/acme/order-settled/replay",
        data={"key": "dlv-c", "csrf_token": _token(text)},
    )
    assert replayed.status_code == 303
    assert replayed.headers["Location"] == f"{CONSOLE}/delivery/acme/order-settled?key=dlv-c"
    row = h.row("dlv-c")
    assert (row.status, row.attempts) == ("done", 2)
    assert len(h.events) == 2


# -- the testing kit -------------------------------------------------------------------


@pytest.fixture
def app(make_app: AppFactory) -> Flask:
    """The app the ``orderhooks`` fixture drives: built-ins and Acme."""
    return make_app(
        hooks_options={"providers": [*BUILTIN_PROVIDERS, AcmeProvider]},
        ACME_SECRET=ACME_SECRET,
    )[0]


def test_the_fixture_posts_a_host_built_callback(orderhooks: OrderHooksClient, app: Flask) -> None:
    events: list[AcmeSettlement] = []

    def receive(sender: Flask, *, event: AcmeSettlement) -> None:
        events.append(event)

    acme_settled.connect(receive, app, weak=False)
    try:
        cb = acme_callback(at=int(app.extensions["orderhooks"].clock()))
        first, second = orderhooks.post(cb), orderhooks.post(cb)
    finally:
        acme_settled.disconnect(receive, app)
    assert (first.status_code, second.status_code) == (200, 200)
    assert json.loads(second.data) == {"received": True}
    assert [e.delivery for e in events] == ["dlv-1"]


def test_the_fixture_captures_a_host_providers_events(orderhooks: OrderHooksClient) -> None:
    cb = acme_callback(at=int(orderhooks.app.extensions["orderhooks"].clock()))
    with orderhooks.captured() as events:
        response = orderhooks.post(cb)
    assert response.status_code == 200
    assert [e.signal for e in events] == ["acme.order-settled"]


def test_the_fixture_builds_a_host_providers_callback(orderhooks: OrderHooksClient) -> None:
    # AcmeProvider.sample() signs with the configured ACME_SECRET.
    at = int(orderhooks.app.extensions["orderhooks"].clock())
    cb = orderhooks.build("acme", delivery="dlv-sample", at=at)
    assert (cb.provider, cb.callback, cb.key) == ("acme", "order-settled", "dlv-sample")
    assert orderhooks.build("acme:order-settled", delivery="dlv-x", at=at).key == "dlv-x"
    with orderhooks.captured() as events:
        first, again = orderhooks.deliver_twice("acme", delivery="dlv-twice", at=at)
    assert (first.status_code, again.status_code) == (200, 200)
    assert [e.signal for e in events] == ["acme.order-settled"]
    with pytest.raises(ValueError, match="Unknown callback kind 'nope'"):
        orderhooks.build("nope")


# -- refusals -------------------------------------------------------------------------


def test_providers_must_be_provider_classes() -> None:
    with pytest.raises(TypeError) as caught:
        OrderHooks(providers=[object])  # type: ignore[list-item]
    assert str(caught.value) == "providers must be Provider subclasses, not <class 'object'>."
    with pytest.raises(TypeError):
        OrderHooks(providers=[AcmeProvider(b"s", 1)])  # type: ignore[list-item]


class Unnamed(Provider):
    # No name at all: neither its own nor inherited.
    routes: Mapping[str, str] = {}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Unnamed | None:
        return None

    def read(
        self, callback: str, body: bytes, headers: Mapping[str, str], *, now: float | None
    ) -> Delivery:
        raise NotImplementedError

    def answer(self, status: int, reason: str) -> Response:
        raise NotImplementedError


def _named(name: object) -> type[AcmeProvider]:
    return type("Renamed", (AcmeProvider,), {"name": name})


@pytest.mark.parametrize(
    ("cls", "message"),
    [
        (Unnamed, f"Unnamed.name must be 1 to 16 {NAME_CHARACTERS}, not None."),
        (_named(""), f"Renamed.name must be 1 to 16 {NAME_CHARACTERS}, not ''."),
        (
            _named("a" * 17),
            f"Renamed.name must be 1 to 16 {NAME_CHARACTERS}, not '{'a' * 17}'.",
        ),
        (_named(7), f"Renamed.name must be 1 to 16 {NAME_CHARACTERS}, not 7."),
        # A segment of the console's URLs, a Flask endpoint, a metrics label.
        (_named("acme/pay"), f"Renamed.name must be 1 to 16 {NAME_CHARACTERS}, not 'acme/pay'."),
        (_named("acme pay"), f"Renamed.name must be 1 to 16 {NAME_CHARACTERS}, not 'acme pay'."),
        (_named("acmé"), f"Renamed.name must be 1 to 16 {NAME_CHARACTERS}, not 'acmé'."),
    ],
)
def test_a_provider_needs_a_name_of_1_to_16(cls: type[Provider], message: str) -> None:
    with pytest.raises(ValueError) as caught:
        OrderHooks(providers=[cls])
    assert str(caught.value) == message
    # 16 exactly is fine.
    OrderHooks(providers=[_named("a" * 16)])


def test_names_are_unique() -> None:
    with pytest.raises(ValueError) as caught:
        OrderHooks(providers=[AcmeProvider, _named("acme")])
    assert str(caught.value) == "Two providers are named 'acme'; names must be unique."
    with pytest.raises(ValueError) as builtin:
        OrderHooks(providers=[*BUILTIN_PROVIDERS, _named("igv")])
    assert str(builtin.value) == "Two providers are named 'igv'; names must be unique."


def test_a_callback_name_past_32_characters_is_refused(tmp_path: Path) -> None:
    long = type("LongCallback", (AcmeProvider,), {"routes": {"c" * 33: "/acme/long"}})
    with pytest.raises(ValueError) as caught:
        OrderHooks(plain_app(tmp_path), providers=[long])
    assert str(caught.value) == (
        f"LongCallback: the callback name '{'c' * 33}' must be 1 to 32 {NAME_CHARACTERS}."
    )
    fits = type("FitsCallback", (AcmeProvider,), {"routes": {"c" * 32: "/acme/fits"}})
    OrderHooks(plain_app(tmp_path / "fits"), providers=[fits])


@pytest.mark.parametrize("callback", ["orders/settled", "orders settled", "\u202eorders"])
def test_a_callback_name_the_console_cannot_link_to_is_refused(
    tmp_path: Path, callback: str
) -> None:
    """A "/" would make the console's /delivery/<provider>/<callback> links
    404; spaces and other characters have no place in an endpoint either."""
    odd = type("OddCallback", (AcmeProvider,), {"routes": {callback: "/acme/odd"}})
    app = plain_app(tmp_path)
    with pytest.raises(ValueError) as caught:
        OrderHooks(app, providers=[odd])
    assert str(caught.value) == (
        f"OddCallback: the callback name {callback!r} must be 1 to 32 {NAME_CHARACTERS}."
    )
    assert "orderhooks" not in app.extensions


@pytest.mark.parametrize(
    ("config", "key", "message"),
    [
        ({"ACME_SECRET": "short"}, "ACME_SECRET", "must be a string of 16 characters or more."),
        ({"ACME_SECRET": 12345}, "ACME_SECRET", "must be a string of 16 characters or more."),
        ({"ACME_MAX_AGE": 0}, "ACME_MAX_AGE", "must be a positive number of seconds."),
    ],
)
def test_from_config_errors_reach_init_app(
    config: dict[str, Any], key: str, message: str, tmp_path: Path
) -> None:
    app = plain_app(tmp_path, **config)
    with pytest.raises(ConfigurationError) as caught:
        OrderHooks(app, providers=[*BUILTIN_PROVIDERS, AcmeProvider])
    assert (caught.value.key, str(caught.value)) == (key, f"{key}: {message}")
    assert "orderhooks" not in app.extensions


def test_config_defaults_are_set_before_from_config(tmp_path: Path) -> None:
    app = Flask("defaults", instance_path=str(tmp_path))
    OrderHooks(app, providers=[AcmeProvider])
    assert (app.config["ACME_SECRET"], app.config["ACME_MAX_AGE"]) == (None, 600)
    configured = plain_app(tmp_path / "set", ACME_MAX_AGE=30)
    hooks = OrderHooks(configured, providers=[AcmeProvider])
    assert hooks.state(configured).providers["acme"].replay_window == 30


def test_not_configured_its_routes_404_and_the_log_names_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = plain_app(tmp_path, ACME_SECRET=None)
    with caplog.at_level(logging.INFO, "flask_orderhooks"):
        hooks = OrderHooks(app, providers=[*BUILTIN_PROVIDERS, AcmeProvider])
    cb = acme_callback()
    assert app.test_client().post(cb.url(), data=cb.body, headers=cb.headers).status_code == 404
    assert "acme" not in hooks.state(app).providers
    assert (
        "OrderHooks: standard, acme off (no credentials configured); their routes answer 404."
        in caplog.messages
    )


# -- no platform is left in the pipeline's modules ------------------------------------

PACKAGE = Path(__file__).resolve().parent.parent / "flask_orderhooks"
PLATFORM = re.compile(
    r"\b(igv|gateway|sud|standard)\b|ORDERHOOKS_(IGV|GATEWAY|SUD|STANDARD)_", re.IGNORECASE
)


@pytest.mark.parametrize(
    "module",
    [
        "config.py",
        "extension.py",
        "views.py",
    ],
)
def test_no_built_in_platform_is_named_in_the_pipeline(module: str) -> None:
    lines = (PACKAGE / module).read_text(encoding="utf-8").splitlines()
    found = [
        f"{module}:{n}: {line.strip()}" for n, line in enumerate(lines, 1) if PLATFORM.search(line)
    ]
    assert found == []
