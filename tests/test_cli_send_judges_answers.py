"""``flask orderhooks send`` judges the answer the way the platform does: SUD
reads ``ret_code`` (a failure may come with HTTP 200, see
``ORDERHOOKS_SUD_FAILURE_HTTP_STATUS``), the gateway reads the text
``success``. A deploy's smoke test must fail when the platform would retry."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from flask import Flask
from werkzeug.serving import make_server

from tests.conftest import Recorder
from tests.test_cli import run

RecorderFactory = Callable[..., tuple[Flask, Recorder]]


@contextmanager
def serving(app: Flask) -> Iterator[str]:
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(10)


@pytest.mark.parametrize("kind", ["sud", "sud-batch"])
def test_a_sud_failure_answered_with_http_200_fails_the_command(
    recorder: RecorderFactory, kind: str
) -> None:
    app, rec = recorder(ORDERHOOKS_SUD_FAILURE_HTTP_STATUS=200)
    rec.fail_next = 1
    with serving(app) as url:
        result = run(app, "send", kind, "--url", url)
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert lines[1].startswith('200 {"ret_code": 500, "ret_msg": '), result.output
    assert lines[-1] == (
        "Error: The server answered 200 with ret_code 500: the callback was not accepted."
    )


def test_a_sud_success_still_succeeds(recorder: RecorderFactory) -> None:
    app, rec = recorder(ORDERHOOKS_SUD_FAILURE_HTTP_STATUS=200)
    with serving(app) as url:
        result = run(app, "send", "sud", "--url", url)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == '200 {"ret_code": 0, "ret_msg": "SUCCESS"}'
    assert len(rec.events) == 1


@pytest.mark.parametrize(
    ("answer", "said"),
    [
        ("fail", "with 'fail', not 'success'"),
        ("", "with '', not 'success'"),
    ],
)
@pytest.mark.parametrize("kind", ["collect", "payout"])
def test_a_gateway_answer_other_than_success_fails_the_command(
    recorder: RecorderFactory, kind: str, answer: str, said: str
) -> None:
    config, _ = recorder()
    other = Flask("not_the_shop")

    @other.post("/orderhooks/gateway/<callback>")
    def answer_200(callback: str) -> tuple[str, int]:
        return answer, 200

    with serving(other) as url:
        result = run(config, "send", kind, "--url", url)
    assert result.exit_code == 1, result.output
    assert result.output.splitlines()[-1] == (
        f"Error: The server answered 200 {said}: the callback was not accepted."
    )


@pytest.mark.parametrize(
    "body", [b"not json", b"[]", b'{"ret_code": "0"}', b'{"ret_code": true}', b"{}"]
)
def test_a_sud_answer_without_ret_code_0_fails_the_command(
    recorder: RecorderFactory, body: bytes
) -> None:
    config, _ = recorder()
    other = Flask("not_the_shop")

    @other.post("/orderhooks/sud/order-changed")
    def answer_200() -> tuple[bytes, int]:
        return body, 200

    with serving(other) as url:
        result = run(config, "send", "sud", "--url", url)
    assert result.exit_code == 1, result.output
    assert result.output.splitlines()[-1] == (
        "Error: The server answered 200 without ret_code 0: the callback was not accepted."
    )


def test_a_deeply_nested_sud_answer_is_not_a_crash(recorder: RecorderFactory) -> None:
    config, _ = recorder()
    other = Flask("not_the_shop")

    @other.post("/orderhooks/sud/order-changed")
    def answer_200() -> tuple[str, int]:
        return "[" * 100_000, 200

    with serving(other) as url:
        result = run(config, "send", "sud", "--url", url)
    assert result.exit_code == 1, result.output
    assert result.output.splitlines()[-1] == (
        "Error: The server answered 200 without ret_code 0: the callback was not accepted."
    )
