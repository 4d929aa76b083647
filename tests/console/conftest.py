"""The console's fixtures: a host app with a login page and an access
function, on every store backend, fed through the real callback routes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from flask import Flask, redirect, request, session, url_for
from flask.testing import FlaskClient
from flask.typing import ResponseReturnValue

from flask_orderhooks import OrderHooks, get_extension
from flask_orderhooks.testing import SignedCallback
from tests.conftest import Recorder

CONSOLE = "/orderhooks/console"
SECRET_KEY = "console-tests-secret-key"
#: 2026-05-04T12:30:00Z: the frozen "now" of every console test.
NOW = datetime(2026, 5, 4, 12, 30, tzinfo=UTC).timestamp()


class Clock:
    """The extension's clock, moved by hand."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Console:
    """A host app with the console on, and what a test needs around it."""

    app: Flask
    hooks: OrderHooks
    recorder: Recorder
    clock: Clock

    def client(self, *, staff: bool = True) -> FlaskClient:
        """A test client, logged in as staff unless ``staff=False``."""
        client = self.app.test_client()
        if staff:
            with client.session_transaction() as s:
                s["staff"] = "alice"
        return client

    def send(self, callback: SignedCallback, *, fail: bool = False) -> int:
        """Post ``callback`` through its real route; ``fail``: the receiver raises."""
        self.recorder.fail_next = 1 if fail else 0
        response = self.app.test_client().post(
            callback.url(), data=callback.body, headers=callback.headers
        )
        self.recorder.fail_next = 0
        return response.status_code

    def row(self, callback: SignedCallback) -> Any:
        with self.app.app_context():
            rows = self.hooks.store.get(
                callback.key, provider=callback.provider, callback=callback.callback
            )
        assert len(rows) == 1
        return rows[0]


def install_login(app: Flask, hooks: OrderHooks) -> None:
    """The host's side: a login page and the console's access function."""

    @app.route("/login", methods=["GET", "POST"])
    def login() -> ResponseReturnValue:
        target = request.args.get("next", "/")
        if not target.startswith("/") or target.startswith("//"):
            target = "/"
        if request.method == "POST":
            session["staff"] = request.form.get("user", "alice")
            return redirect(target)
        return (
            "<!doctype html><title>Shop login</title><form method=post>"
            "<input name=user value=alice><button id=login type=submit>Log in</button></form>"
        )

    @hooks.console_access
    def staff_only() -> bool | ResponseReturnValue:
        if session.get("staff"):
            return True
        return redirect(url_for("login", next=request.full_path))


ConsoleFactory = Callable[..., Console]


@pytest.fixture
def make_console(
    recorder: Callable[..., tuple[Flask, Recorder]],
) -> ConsoleFactory:
    """``make_console(**config)``: a :class:`Console` on the test's backend."""

    def factory(*, login: bool = True, **config: Any) -> Console:
        clock = Clock()
        options: dict[str, Any] = {
            "SECRET_KEY": SECRET_KEY,
            "ORDERHOOKS_CONSOLE_URL": CONSOLE,
            "ORDERHOOKS_RETRY_DELAYS": [60, 300],
            **config,
        }
        app, rec = recorder(hooks_options={"clock": clock}, **options)
        hooks = get_extension(app)
        if login:
            install_login(app, hooks)
        return Console(app=app, hooks=hooks, recorder=rec, clock=clock)

    return factory


@pytest.fixture
def console(make_console: ConsoleFactory) -> Console:
    return make_console()
