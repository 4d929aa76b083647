"""A body that does not arrive whole is the client's failure, not ours.

Werkzeug raises ``ClientDisconnected`` when the input ends before its
Content-Length, and a server's input stream raises ``OSError`` when the
connection drops mid-body. Both reached the pipeline's last resort: a 500
"Internal error" and an ERROR line with a traceback, "unexpected error", as
if the extension had a bug (pages on-call, counts as an internal error).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from flask_orderhooks import OrderHooks
from flask_orderhooks.testing import SignedCallback, gateway_collect, igv_order_status
from tests.conftest import BASE_CONFIG, GATEWAY_KEYS, IGV_SECRET


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Flask]:
    app = Flask("orderhooks_body_cut_short", instance_path=str(tmp_path / "instance"))
    app.config.update(BASE_CONFIG)
    app.config["ORDERHOOKS_DATABASE_URI"] = f"sqlite:///{tmp_path / 'hooks.sqlite3'}"
    hooks = OrderHooks(app)
    with app.app_context():
        hooks.create_all()
    yield app
    standalone = hooks.state(app).standalone
    assert standalone is not None
    standalone.engine.dispose()


class DroppedStream(io.RawIOBase):
    """A connection that resets after half of the body."""

    def __init__(self, body: bytes) -> None:
        self.rest = body[: len(body) // 2]

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if not self.rest:
            raise ConnectionResetError(104, "Connection reset by peer")
        size = min(len(buffer), len(self.rest))
        buffer[:size] = self.rest[:size]
        self.rest = self.rest[size:]
        return size


def _callbacks() -> list[SignedCallback]:
    return [
        igv_order_status(IGV_SECRET, request_id="cut-1"),
        gateway_collect(GATEWAY_KEYS["10001"], id="CUT-1"),
    ]


@pytest.mark.parametrize("how", ["short of its Content-Length", "connection reset"])
def test_a_body_cut_short_is_a_400_with_a_warning(
    app: Flask, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    client = app.test_client()
    reason = "The body ended before it was read whole (the client disconnected?)."
    for cb, answer in zip(_callbacks(), [reason, "fail"], strict=True):
        cut = io.BytesIO(cb.body[:-5])
        stream = DroppedStream(cb.body) if how == "connection reset" else cut
        environ = {"CONTENT_LENGTH": str(len(cb.body)), "wsgi.input": stream}
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="flask_orderhooks"):
            response = client.post(cb.url(), headers=cb.headers, environ_overrides=environ)
        assert (response.status_code, response.get_data(as_text=True)) == (400, answer)
        assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
            (
                "WARNING",
                f"{cb.provider} {cb.callback} {_label(cb)}: refused 400 from 127.0.0.1: {reason}",
            )
        ]
        with app.app_context():
            assert app.extensions["orderhooks"].store.get(cb.key) == []


def _label(cb: SignedCallback) -> str:
    return f"(unverified '{cb.key}')" if cb.provider == "igv" else "-"
