"""A MariaDB server of a test's own, for server options the machine's server
does not have (and which a test must never change there: most are global,
and some can only be set at start, such as ``innodb_rollback_on_timeout``).

``mariadb-install-db`` makes a data directory under the test's temporary
directory, and ``mariadbd`` serves it on a free loopback port, with a socket
and a pid file of its own, until the test ends. The machine's server
(3306) is never touched.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pymysql
import pytest

from .conftest import summary

#: Seconds a private server gets to answer, and then to stop.
BOOT_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
#: The machine's own server: never ours, whatever a free-port search returns.
_MACHINE_PORT = 3306


def _binary(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(path) for d in ("/usr/sbin", "/usr/bin") if (path := Path(d) / name).exists()),
        None,
    )


def _require_binaries() -> tuple[str, str]:
    """The server and its installer, or a loud skip (a failure under
    ``ORDERHOOKS_REQUIRE_MARIADB=1``, as ``.ci/run`` sets)."""
    server, install = _binary("mariadbd"), _binary("mariadb-install-db")
    if server and install:
        return server, install
    message = (
        "mariadbd and mariadb-install-db are NOT INSTALLED; the tests that need a "
        "MariaDB server of their own (server options set at its start) did not run. "
        "Install Debian's mariadb-server package."
    )
    if os.environ.get("ORDERHOOKS_REQUIRE_MARIADB") == "1":
        pytest.fail("ORDERHOOKS_REQUIRE_MARIADB=1: " + message, pytrace=False)
    summary("MARIADB TESTS SKIPPED").append(message)
    pytest.skip(message)


def _free_port() -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port != _MACHINE_PORT:
            return port


def _answers(port: int, socket_path: Path) -> bool:
    """Whether our server answers on ``port``: the one whose socket is ours,
    not another that took the port meanwhile."""
    try:
        connection = pymysql.connect(host="127.0.0.1", port=port, user="root", connect_timeout=1)
    except pymysql.err.Error:
        return False
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT @@socket")
            row = cursor.fetchone()
        return row is not None and row[0] == str(socket_path)
    finally:
        connection.close()


@contextmanager
def private_mariadb(directory: Path, options: Sequence[str]) -> Iterator[str]:
    """A server started with ``options`` (``--name=value``); yields the URL
    of its database ``test``."""
    server, install = _require_binaries()
    data = directory / "data"
    log = directory / "server.log"
    subprocess.run(
        [
            install, "--no-defaults", f"--datadir={data}", "--user=root",
            "--auth-root-authentication-method=normal", "--skip-test-db",
        ],
        check=True, capture_output=True, timeout=BOOT_TIMEOUT,
    )  # fmt: skip
    socket_path = directory / "mariadb.sock"
    for _ in range(5):
        port = _free_port()
        with log.open("ab") as out:
            process = subprocess.Popen(
                [
                    server, "--no-defaults", f"--datadir={data}", "--user=root",
                    f"--port={port}", "--bind-address=127.0.0.1",
                    f"--socket={socket_path}", f"--pid-file={directory / 'mariadb.pid'}",
                    "--skip-name-resolve", "--skip-log-bin",
                    "--innodb-buffer-pool-size=16M", "--innodb-log-file-size=8M",
                    *options,
                ],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + BOOT_TIMEOUT
        while not _answers(port, socket_path):
            if process.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        else:
            break
        _stop(process)
    else:
        raise RuntimeError("mariadbd did not start:\n" + log.read_text("utf-8", "replace"))
    try:
        admin = pymysql.connect(host="127.0.0.1", port=port, user="root")
        with admin.cursor() as cursor:
            cursor.execute("CREATE DATABASE test CHARACTER SET utf8mb4")
        admin.close()
        yield f"mysql+pymysql://root@127.0.0.1:{port}/test?charset=utf8mb4"
    finally:
        _stop(process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(STOP_TIMEOUT)
