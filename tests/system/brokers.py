"""Helpers of the Celery system tests: a Redis broker of the test's own and
``celery worker`` processes.

The broker is ``redis-server`` started by the test on a free loopback port,
with no persistence (``--save '' --appendonly no``) and a directory of its
own, so that killing it loses every message it held, as a broker that
crashes without persistence does. The machine's own Redis (6379) and any
other server on the machine are never touched.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .support import BOOT_TIMEOUT, ROOT, STOP_TIMEOUT

#: The ``redis-server`` binary (Debian's package puts it here).
REDIS_SERVER = os.environ.get("ORDERHOOKS_TEST_REDIS_SERVER", "/usr/bin/redis-server")
#: Seconds the web processes leave a broker alone after a failed publish
#: (init_celery's broker_cooldown; shorter than the default 10, so the outage
#: test need not wait long).
BROKER_COOLDOWN = 1.0
#: The environment variable that gives ``tests.system.celery_app`` its broker.
BROKER_URL = "ORDERHOOKS_SYSTEM_BROKER_URL"
#: What the gunicorn server's ``GUNICORN_CMD_ARGS`` is set to: loads
#: ``tests.system.celery_app`` as its config, whose one setting is the
#: ``post_worker_init`` hook that gives each worker's app an enqueuer.
GUNICORN_ARGS = "--config python:tests.system.celery_app"
#: What the README tells hosts to set: publishing to a broker that is down
#: fails within milliseconds (connection refused) or about a second (no
#: answer at all) instead of Celery's default of about 6 s of reconnecting
#: inside the platform's request.
FAST_FAILING_BROKER: dict[str, Any] = {
    "broker_connection_timeout": 1.0,
    "broker_transport_options": {
        "max_retries": 1,
        "interval_start": 0,
        "interval_step": 0.2,
        "interval_max": 0.2,
        "socket_connect_timeout": 1,
        "socket_timeout": 2,
    },
}
#: The machine's own Redis: never ours, whatever a free-port search returns.
_MACHINE_REDIS_PORT = 6379


def _free_port() -> int:
    """A loopback port nobody listens on now.

    redis-server cannot take over a bound socket as gunicorn does, so there
    is a short window in which another process could take the port; the
    start then fails loudly (redis-server exits) and is retried.
    """
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port != _MACHINE_REDIS_PORT:
            return port


_PROCESS_ID = re.compile(rb"\r\nprocess_id:(\d+)\r\n")


def _answering_pid(port: int) -> int | None:
    """The pid of the Redis server answering on ``port``, if one does: the
    test must be talking to its own server, not one that took the port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as connection:
            connection.sendall(b"INFO server\r\n")
            reply = b""
            while not (found := _PROCESS_ID.search(reply)) and len(reply) < 65536:
                chunk = connection.recv(65536)
                if not chunk:
                    return None
                reply += chunk
            return int(found[1]) if found else None
    except OSError:
        return None


@dataclass
class RedisServer:
    """A ``redis-server`` on a loopback port of its own.

    :meth:`kill` is the outage (SIGKILL: every queued message is gone);
    :meth:`start` again brings it back on the same port, empty.
    """

    directory: Path
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self.process is None, "the broker is already running"
        self.directory.mkdir(parents=True, exist_ok=True)
        fixed = self.port != 0
        for _ in range(5):
            if not fixed:
                self.port = _free_port()
            if self._launch():
                return
            if fixed:
                break
        raise RuntimeError(f"redis-server did not start on port {self.port}:\n{self.log()}")

    def _launch(self) -> bool:
        command = [
            REDIS_SERVER,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.directory),
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--databases", "1",
        ]  # fmt: skip
        self.starts += 1
        with (self.directory / "redis.log").open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + BOOT_TIMEOUT
        while _answering_pid(self.port) != self.process.pid:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self._reap(signal.SIGKILL)
                return False
            time.sleep(0.02)
        return True

    def log(self) -> str:
        path = self.directory / "redis.log"
        return path.read_text("utf-8", "replace") if path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: the broker and every message it held vanish at once."""
        self._reap(signal.SIGKILL)

    def stop(self) -> None:
        self._reap(signal.SIGTERM)

    def _reap(self, signum: int) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signum)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT)


# -- celery workers -----------------------------------------------------------------

#: What a worker logs once it consumes: "<name>@<host> ready.".
_READY = re.compile(r"\S+@\S+ ready\.")
_CONNECTED = re.compile(r"Connected to redis://")


@dataclass
class CeleryWorker:
    """One ``celery -A tests.system.celery_app worker`` process (solo pool:
    the tasks run in the process itself, so a receiver's ``Effect.pid`` is
    this process's pid)."""

    settings: dict[str, str]
    log_path: Path
    name: str
    process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None, "the worker was never started"
        return self.process.pid

    def start(self) -> None:
        command = [
            sys.executable, "-m", "celery",
            "-A", "tests.system.celery_app",
            "worker",
            "--pool", "solo",
            "--hostname", f"{self.name}@%h",
            "--loglevel", "INFO",
            # Nothing but the tasks: no broadcast traffic between workers.
            "--without-gossip", "--without-mingle", "--without-heartbeat",
        ]  # fmt: skip
        env = {**os.environ, **self.settings, "PYTHONUNBUFFERED": "1"}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env
            )
        self._wait(_READY, 1, "become ready")

    def log(self) -> str:
        return self.log_path.read_text("utf-8", "replace") if self.log_path.exists() else ""

    def connections(self) -> int:
        """How many times it connected to the broker (start-up included)."""
        return len(_CONNECTED.findall(self.log()))

    def wait_connected(self, count: int) -> None:
        """Wait until it connected ``count`` times in all (a reconnection
        after an outage is the second)."""
        self._wait(_CONNECTED, count, f"connect to the broker {count} times")

    def _wait(self, pattern: re.Pattern[str], count: int, what: str) -> None:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while len(pattern.findall(self.log())) < count:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"celery worker {self.name} exited with {self.process.returncode} "
                    f"before it did {what}:\n{self.log()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"celery worker {self.name} did not {what}:\n{self.log()}")
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM (warm shutdown: the task in hand finishes), a bounded
        wait, then SIGKILL. Safe to call again."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT)
