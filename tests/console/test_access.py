"""The console is off by default, closed without an access function, needs
SECRET_KEY, and every response carries the security headers."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, cast

import pytest
from flask import Flask, Response, redirect, session

from flask_orderhooks import ConfigurationError, OrderHooks
from flask_orderhooks.console import CONTENT_SECURITY_POLICY
from flask_orderhooks.extension import ConsoleAccess
from flask_orderhooks.testing import igv_order_status
from tests.conftest import BASE_CONFIG
from tests.console.conftest import CONSOLE, SECRET_KEY, Console, ConsoleFactory


def _app(tmp_path: Path, **config: Any) -> tuple[Flask, OrderHooks]:
    app = Flask("console_config", instance_path=str(tmp_path / "instance"))
    app.config.update(BASE_CONFIG)
    app.config["ORDERHOOKS_DATABASE_URI"] = f"sqlite:///{tmp_path / 'own.sqlite3'}"
    app.config.update(config)
    return app, OrderHooks(app)


def test_off_by_default(tmp_path: Path) -> None:
    app, _hooks = _app(tmp_path, SECRET_KEY=SECRET_KEY)
    assert "orderhooks_console" not in app.blueprints
    assert app.test_client().get(CONSOLE + "/").status_code == 404


def test_any_path_turns_it_on(tmp_path: Path) -> None:
    app, hooks = _app(tmp_path, SECRET_KEY=SECRET_KEY, ORDERHOOKS_CONSOLE_URL="/staff/hooks/")
    hooks.console_access(lambda: True)
    response = app.test_client().get("/staff/hooks/")
    assert response.status_code == 200
    assert "<h1>Deliveries</h1>" in response.get_data(as_text=True)


def test_needs_secret_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as info:
        _app(tmp_path, ORDERHOOKS_CONSOLE_URL=CONSOLE)
    assert info.value.key == "SECRET_KEY"
    assert str(info.value) == (
        "SECRET_KEY: the operator console (ORDERHOOKS_CONSOLE_URL) signs its forms' CSRF "
        "tokens and keeps them in the session: set the app's SECRET_KEY."
    )


@pytest.mark.parametrize("url", ["console", "/a/<int:x>", "/a?b=1", "/a#b", 42, True, "/"])
def test_console_url_must_be_a_path(tmp_path: Path, url: object) -> None:
    with pytest.raises(ConfigurationError) as info:
        _app(tmp_path, SECRET_KEY=SECRET_KEY, ORDERHOOKS_CONSOLE_URL=url)
    assert info.value.key == "ORDERHOOKS_CONSOLE_URL"
    assert str(info.value) == (
        "ORDERHOOKS_CONSOLE_URL: must be a URL path below the root such as "
        f"'/orderhooks/console', not {url!r}."
    )


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("ORDERHOOKS_CONSOLE_PAGE_SIZE", 0),
        ("ORDERHOOKS_CONSOLE_PAGE_SIZE", "50"),
        ("ORDERHOOKS_CONSOLE_PAGE_SIZE", True),
        ("ORDERHOOKS_CONSOLE_CSRF_MAX_AGE", 10),
    ],
)
def test_console_numbers_are_checked(tmp_path: Path, key: str, value: object) -> None:
    with pytest.raises(ConfigurationError) as info:
        _app(tmp_path, SECRET_KEY=SECRET_KEY, ORDERHOOKS_CONSOLE_URL=CONSOLE, **{key: value})
    assert info.value.key == key
    assert f"not {value!r}." in str(info.value)


def test_refused_without_access_function(
    make_console: ConsoleFactory, caplog: pytest.LogCaptureFixture
) -> None:
    console = make_console(login=False)
    client = console.client()
    with caplog.at_level(logging.WARNING, logger="flask_orderhooks"):
        for path in ("/", "/static/console.css", "/delivery/igv/order-status?key=1"):
            response = client.get(CONSOLE + path)
            assert response.status_code == 403
            assert "no access function is registered" in response.get_data(as_text=True)
        response = client.post(CONSOLE + "/delivery/igv/order-status/replay", data={"key": "1"})
        assert response.status_code == 403
    lines = [r.getMessage() for r in caplog.records if "console" in r.getMessage()]
    assert len(lines) == 4
    assert lines[0] == (
        f"OrderHooks console: refused {CONSOLE}/ (403): no access function is registered. "
        "Decorate a function with @hooks.console_access that returns True for your staff "
        "(or a redirect to your login page); until then every console request is refused."
    )


def test_access_function_decides(console: Console) -> None:
    # The fixture's function: a redirect to the host's login page, then True.
    client = console.client(staff=False)
    response = client.get(CONSOLE + "/?status=failed")
    assert response.status_code == 302
    assert response.headers["Location"] == "/login?next=/orderhooks/console/?status%3Dfailed"
    response = client.post("/login?next=/orderhooks/console/", data={"user": "bob"})
    assert response.headers["Location"] == "/orderhooks/console/"
    assert client.get(CONSOLE + "/").status_code == 200


def test_access_function_false_is_403(make_console: ConsoleFactory) -> None:
    console = make_console(login=False)
    console.hooks.console_access(lambda: False)
    response = console.client().get(CONSOLE + "/")
    assert response.status_code == 403
    assert "You may not use this console." in response.get_data(as_text=True)


def test_access_function_may_answer_itself(make_console: ConsoleFactory) -> None:
    console = make_console(login=False)
    console.hooks.console_access(lambda: Response("go away", status=401))
    response = console.client().get(CONSOLE + "/")
    assert (response.status_code, response.get_data(as_text=True)) == (401, "go away")
    # The host's own answer is still sent under the console's headers.
    assert response.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY


_NOT_ACCEPTED = (
    "The console is closed: its access function gave an answer it does not accept. "
    "See the server log."
)


def _not_a_verdict_line(type_name: str, path: str = "/") -> str:
    return (
        f"OrderHooks console: refused {CONSOLE}{path} (403): the @hooks.console_access function "
        f"returned a {type_name}. It must return True (the request goes on), False or None "
        "(403), or a response such as redirect(...) (sent as it is); anything else is refused."
    )


@pytest.mark.parametrize(
    ("verdict", "type_name"),
    [
        (1, "int"),
        ("alice", "str"),
        (("welcome, alice", 200), "tuple"),
        ({"staff": True}, "dict"),
        (b"yes", "bytes"),
        (1.0, "float"),
    ],
)
def test_access_function_answer_outside_the_contract_is_403(
    make_console: ConsoleFactory,
    caplog: pytest.LogCaptureFixture,
    verdict: object,
    type_name: str,
) -> None:
    """Fail closed: a truthy answer that is not True opens nothing, and is
    never sent back as a page."""
    console = make_console(login=False)
    answer = cast(ConsoleAccess, lambda: verdict)
    console.hooks.console_access(answer)
    with caplog.at_level(logging.WARNING, logger="flask_orderhooks"):
        response = console.client().get(CONSOLE + "/")
    page = response.get_data(as_text=True)
    assert response.status_code == 403
    assert _NOT_ACCEPTED in page
    assert "<h1>Deliveries</h1>" not in page
    assert "alice" not in page
    assert response.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.ERROR, _not_a_verdict_line(type_name))
    ]


def test_access_function_returning_the_session_value_is_403(
    make_console: ConsoleFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """The mistake the contract guards against: ``return session.get("staff")``
    (a user name for staff, None for others) instead of a bool."""
    console = make_console(login=False)
    console.hooks.console_access(lambda: session.get("staff"))
    cb = igv_order_status(app=console.app)
    assert console.send(cb, fail=True) == 500
    with caplog.at_level(logging.WARNING, logger="flask_orderhooks"):
        staff = console.client()
        assert staff.get(CONSOLE + "/").status_code == 403
        retry = staff.post(
            CONSOLE + "/delivery/igv/order-status/retry", data={"key": cb.key, "csrf_token": "x"}
        )
        assert retry.status_code == 403
        assert _NOT_ACCEPTED in retry.get_data(as_text=True)
        # None, for a visitor without the session value: the plain refusal.
        visitor = console.client(staff=False).get(CONSOLE + "/")
        assert visitor.status_code == 403
        assert "You may not use this console." in visitor.get_data(as_text=True)
    assert console.row(cb).attempts == 1
    lines = [
        (r.levelno, r.getMessage())
        for r in caplog.records
        if r.getMessage().startswith("OrderHooks console")
    ]
    assert lines == [
        (logging.ERROR, _not_a_verdict_line("str")),
        (logging.ERROR, _not_a_verdict_line("str", "/delivery/igv/order-status/retry")),
    ]


def test_access_is_checked_before_anything_else(make_console: ConsoleFactory) -> None:
    console = make_console(login=False)
    cb = igv_order_status(app=console.app)
    assert console.send(cb, fail=True) == 500
    console.hooks.console_access(lambda: redirect("/login"))
    client = console.client()
    response = client.post(
        CONSOLE + "/delivery/igv/order-status/retry", data={"key": cb.key, "csrf_token": "x"}
    )
    assert response.status_code == 302
    assert console.row(cb).attempts == 1


EXPECTED_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}


def test_every_response_has_the_security_headers(console: Console) -> None:
    cb = igv_order_status(app=console.app)
    assert console.send(cb) == 200
    client = console.client()
    answers = [
        client.get(CONSOLE + "/"),
        client.get(CONSOLE + "/?status=nonsense"),
        client.get(CONSOLE + "/delivery/igv/order-status", query_string={"key": cb.key}),
        client.get(CONSOLE + "/delivery/igv/order-status", query_string={"key": "missing"}),
        client.get(CONSOLE + "/static/console.css"),
        client.post(CONSOLE + "/delivery/igv/order-status/replay", data={"key": cb.key}),
        console.client(staff=False).get(CONSOLE + "/"),
    ]
    assert [a.status_code for a in answers] == [200, 400, 200, 404, 200, 400, 302]
    for answer in answers:
        for name, value in EXPECTED_HEADERS.items():
            assert answer.headers[name] == value, (answer.request.path, name)
        answer.close()


def test_assets_come_from_the_blueprint(console: Console) -> None:
    client = console.client()
    page = client.get(CONSOLE + "/").get_data(as_text=True)
    assert '<link rel="stylesheet" href="/orderhooks/console/static/console.css">' in page
    # Nothing loaded from anywhere else, no script, no inline style.
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in page
    assert "<script" not in page
    assert "style=" not in page
    assert "<style" not in page
    css = client.get(CONSOLE + "/static/console.css")
    assert css.mimetype == "text/css"
    assert b".oc-fill-failed" in css.data
    css.close()


def test_routing_errors_under_the_console_have_the_security_headers(console: Console) -> None:
    """A URL below the console that no console view answers (a GET of a
    button's URL, a path that does not exist) is Flask's 404 or 405, outside
    the blueprint: it still carries the console's headers. The host's own
    pages, and its 404s elsewhere, are left alone."""
    client = console.client()
    answers = [
        client.get(CONSOLE + "/delivery/igv/order-status/replay", query_string={"key": "k"}),
        client.put(CONSOLE + "/delivery/igv/order-status/retry"),
        client.get(CONSOLE + "/no-such-page"),
        client.get(CONSOLE + "/delivery/igv"),
    ]
    assert [a.status_code for a in answers] == [405, 405, 404, 404]
    for answer in answers:
        for name, value in EXPECTED_HEADERS.items():
            assert answer.headers.get(name) == value, (answer.request.path, name)
    for path in ("/login", "/no-such-page", CONSOLE + "-other"):
        assert "Content-Security-Policy" not in client.get(path).headers, path
