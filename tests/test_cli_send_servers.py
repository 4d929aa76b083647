"""``flask orderhooks send`` against servers that do not speak HTTP, and
base URLs that carry credentials: one clear error line and exit 1 (or a
usage error), never a traceback, never a password on the terminal."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from flask import Flask

from flask_orderhooks import OrderHooks
from tests.conftest import BASE_CONFIG
from tests.test_cli import run


@pytest.fixture
def app(tmp_path: Path) -> Flask:
    app = Flask("send_servers", instance_path=str(tmp_path))
    app.config.update(
        BASE_CONFIG, ORDERHOOKS_DATABASE_URI=f"sqlite:///{tmp_path / 'orderhooks.sqlite3'}"
    )
    OrderHooks(app)
    return app


@contextmanager
def answering(answer: bytes) -> Iterator[str]:
    """A server that reads the request's first bytes, writes ``answer`` and
    closes: an SSH banner, a truncated HTTP answer."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        # One request: send makes one connection.
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(10)
            conn.recv(65536)
            conn.sendall(answer)
            # Read what is left of the request until send hangs up: closing
            # with unread bytes would reset the connection, and send would
            # see a reset instead of the answer.
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(65536):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()
        thread.join(10)


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (b"SSH-2.0-OpenSSH_9.2\r\n", "BadStatusLine"),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort",
            "IncompleteRead",
        ),
        (
            b"HTTP/1.1 500 Oops\r\nContent-Length: 100\r\n\r\nshort",
            "IncompleteRead",
        ),
        (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000 + b"\r\n\r\n", "LineTooLong"),
    ],
    ids=["not-http", "short-body", "short-error-body", "header-too-long"],
)
def test_a_server_that_does_not_answer_http_is_one_error_line(
    app: Flask, answer: bytes, why: str
) -> None:
    with answering(answer) as url:
        result = run(app, "send", "igv", "--url", url)
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    target = f"{url}/orderhooks/igv/order-status"
    assert result.output.splitlines()[-1].startswith(
        f"Error: {target} did not answer in HTTP ({why}"
    ), result.output


def test_credentials_in_the_url_are_a_usage_error_that_does_not_repeat_them(app: Flask) -> None:
    """urllib sends no credentials from a URL (it would ask the host
    "user:s3cret@127.0.0.1" for a port), and every line ``send`` prints
    names the URL: the password would only reach the terminal and its
    scrollback."""
    result = run(app, "send", "igv", "--url", "http://ops:s3cret@127.0.0.1:9")
    assert result.exit_code == 2, result.output
    assert "s3cret" not in result.output
    assert (
        "http://***@127.0.0.1:9 holds a user name or password; send cannot use them, give "
        "the server's URL without them." in " ".join(result.output.split())
    ), result.output
