"""A chunked body gunicorn cannot parse is the client's error: a 400 in the
platform's form and one WARNING line, never the 500 "unexpected error" with a
traceback that gunicorn's own exceptions (not OSError) used to give."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Callable

import pytest

from flask_orderhooks.testing import SignedCallback

from .callbacks import signed
from .conftest import ServerFactory
from .support import REQUEST_TIMEOUT, Server


def _send_raw(server: Server, cb: SignedCallback, chunked_body: bytes) -> tuple[int, bytes]:
    """POST ``cb``'s headers with ``chunked_body`` as it is on the wire;
    the answer's status and body (the server closes the connection)."""
    head = [
        f"POST {cb.url()} HTTP/1.1",
        f"Host: 127.0.0.1:{server.port}",
        "Transfer-Encoding: chunked",
        "Connection: close",
        *(f"{name}: {value}" for name, value in cb.headers.items()),
    ]
    request = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + chunked_body
    with socket.create_connection(("127.0.0.1", server.port), timeout=REQUEST_TIMEOUT) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while data := sock.recv(65536):
            answer += data
    status_line, _, rest = answer.partition(b"\r\n")
    _headers, _, body = rest.partition(b"\r\n\r\n")
    return int(status_line.split()[1]), body


def _chunks(body: bytes) -> bytes:
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)


@pytest.mark.system
@pytest.mark.parametrize(
    ("framing", "error"),
    [
        pytest.param(lambda body: b"zz\r\n%s\r\n0\r\n\r\n" % body, "InvalidChunkSize", id="size"),
        pytest.param(
            lambda body: b"%x\r\n%sXY0\r\n\r\n" % (len(body), body),
            "ChunkMissingTerminator",
            id="terminator",
        ),
        pytest.param(
            lambda body: b"%x;=\r\n%s\r\n0\r\n\r\n" % (len(body), body),
            "InvalidChunkExtension",
            id="extension",
        ),
    ],
)
def test_a_malformed_chunked_body_is_a_400_with_one_warning(
    start_server: ServerFactory, sqlite_url: str, framing: Callable[[bytes], bytes], error: str
) -> None:
    server = start_server(sqlite_url, workers=1)
    cb = signed("igv", uuid.uuid4().hex[:12])
    reason = f"The body's chunked transfer coding is malformed ({error})."
    try:
        assert _send_raw(server, cb, framing(cb.body)) == (400, reason.encode())
        # The same callback, framed right, is read and dispatched.
        assert _send_raw(server, cb, _chunks(cb.body)) == (200, b"OK")
    finally:
        server.stop()
    lines = [line for line in server.log().splitlines() if " flask_orderhooks: " in line]
    assert [line.split(" flask_orderhooks: ", 1)[1] for line in lines] == [
        f"igv order-status (unverified '{cb.key}'): refused 400 from 127.0.0.1: {reason}"
    ]
    assert lines[0].startswith("WARNING [")
    assert "Traceback" not in server.log()
    assert [(d.key, d.status) for d in server.deliveries()] == [(cb.key, "done")]
