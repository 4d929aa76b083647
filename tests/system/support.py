"""Helpers of the system tests: a gunicorn server, ``flask orderhooks worker``
processes, a TCP forwarder, answers.

Kept out of ``conftest.py`` so that test modules import them by name.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from flask_orderhooks.store import StoredDelivery
from flask_orderhooks.testing import SignedCallback

from . import server_app

ROOT = Path(__file__).resolve().parents[2]
#: Every wait in these tests is bounded by one of these, never asserted.
BOOT_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
REQUEST_TIMEOUT = 60.0

#: The reasons a 503 may give when the store is busy or another worker holds
#: the delivery: the answers a platform must simply retry.
BUSY_REASONS = frozenset(
    {
        "Another worker is handling this delivery; retry later.",
        "The store is busy; retry later.",
        "The claim on this delivery expired; retry later.",
    }
)
UNAVAILABLE_REASON = "The store is unavailable."


@dataclass(frozen=True)
class Answer:
    """One HTTP answer as the platform would read it."""

    status: int
    content_type: str
    body: bytes


def post(port: int, callback: SignedCallback, *, timeout: float = REQUEST_TIMEOUT) -> Answer:
    """POST ``callback`` to the server on ``port`` with a fresh connection."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", callback.url(), body=callback.body, headers=callback.headers)
        response = connection.getresponse()
        return Answer(response.status, response.getheader("Content-Type", ""), response.read())
    finally:
        connection.close()


def form(provider: str, answer: Answer) -> tuple[str, str]:
    """Classify ``answer`` in ``provider``'s documented form.

    :returns: ``("success", "")``, ``("failure", reason)`` for a non-200 answer
        in the platform's failure form (the gateway's carries no reason:
        ``""``), or ``("foreign", description)`` for anything else, such as an
        HTML error page or a success body with a failure status.
    """
    text = answer.body.decode("utf-8", "replace")
    if provider == "igv":
        if answer.content_type.startswith("text/plain"):
            if answer.status == 200 and text == "OK":
                return "success", ""
            if answer.status != 200 and text:
                return "failure", text
    elif provider == "gateway":
        if answer.content_type.startswith("text/plain"):
            if answer.status == 200 and text == "success":
                return "success", ""
            if answer.status != 200 and text == "fail":
                return "failure", ""
    elif provider == "sud" and answer.content_type == "application/json":
        try:
            payload = json.loads(text)
        except ValueError:
            payload = None
        if answer.status == 200 and payload == {"ret_code": 0, "ret_msg": "SUCCESS"}:
            return "success", ""
        if (
            answer.status != 200
            and isinstance(payload, dict)
            and set(payload) == {"ret_code", "ret_msg"}
            and payload["ret_code"] == answer.status
        ):
            return "failure", str(payload["ret_msg"])
    return "foreign", f"{answer.status} {answer.content_type} {text[:200]!r}"


def is_success(provider: str, answer: Answer) -> bool:
    return form(provider, answer)[0] == "success"


def is_busy(provider: str, answer: Answer) -> bool:
    """A 503 in the platform's failure form that tells it to retry."""
    kind, reason = form(provider, answer)
    # The gateway's failure body is "fail" whatever the reason.
    return (
        kind == "failure"
        and answer.status == 503
        and (provider == "gateway" or reason in BUSY_REASONS)
    )


def resend_until_success(
    port: int, callback: SignedCallback, *, attempts: int = 40, pause: float = 0.25
) -> tuple[int, list[Answer]]:
    """Resend until the platform would read success, as its retries would.

    :returns: the number of resends it took and every non-success answer.
    :raises AssertionError: no success after ``attempts`` resends, or an
        answer in neither the platform's success nor its failure form.
    """
    refused: list[Answer] = []
    for attempt in range(1, attempts + 1):
        try:
            answer = post(port, callback)
        except (ConnectionError, http.client.HTTPException, TimeoutError) as exc:
            # A worker killed mid-request drops the connection: that is a retry too.
            refused.append(Answer(0, "", repr(exc).encode()))
            time.sleep(pause)
            continue
        kind, detail = form(callback.provider, answer)
        assert kind != "foreign", f"answer outside the platform's form: {detail}"
        if kind == "success":
            return attempt, refused
        refused.append(answer)
        time.sleep(pause)
    raise AssertionError(
        f"{callback.provider} {callback.key}: no success after {attempts} resends; "
        f"last answers {refused[-3:]}"
    )


def status_counts(answers: list[Answer]) -> dict[int, int]:
    return dict(sorted(Counter(a.status for a in answers).items()))


# -- the server -------------------------------------------------------------------

_BOOTING = re.compile(r"Booting worker with pid: (\d+)")


@dataclass
class Server:
    """A gunicorn server running ``server_app`` with one set of settings."""

    settings: dict[str, str]
    control: Path
    log_path: Path
    workers: int
    threads: int
    process: subprocess.Popen[bytes] | None = None
    port: int = 0
    _reader: tuple[Any, Any, Any] | None = field(default=None, repr=False)

    def start(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            # The test binds the port and hands the socket over: no window in
            # which another process on this machine could take a "free" port.
            listener.bind(("127.0.0.1", 0))
            listener.listen(1024)
            self.port = listener.getsockname()[1]
            fd = listener.fileno()
            worker_class = "gthread" if self.threads > 1 else "sync"
            command = [
                sys.executable, "-m", "gunicorn",
                "--bind", f"fd://{fd}",
                "--workers", str(self.workers),
                "--worker-class", worker_class,
                "--threads", str(self.threads),
                # Longer than the blocking receiver's bound: only the tests kill workers.
                "--timeout", "90",
                "--graceful-timeout", "3",
                "--log-level", "info",
                "--error-logfile", "-",
                # gunicorn 27 otherwise shares one control socket in $HOME
                # between every server on the machine.
                "--no-control-socket",
                "--chdir", str(ROOT),
                "tests.system.server_app:create_app()",
            ]  # fmt: skip
            env = {**os.environ, **self.settings, "PYTHONUNBUFFERED": "1"}
            with self.log_path.open("ab") as log:
                self.process = subprocess.Popen(
                    command, stdout=log, stderr=subprocess.STDOUT, env=env, pass_fds=(fd,)
                )
        finally:
            listener.close()
        self.wait_for_workers(self.workers)

    def log(self) -> str:
        return self.log_path.read_text("utf-8", "replace")

    def booted_pids(self) -> list[int]:
        """Every worker pid gunicorn reported booting, oldest first."""
        return [int(pid) for pid in _BOOTING.findall(self.log())]

    def wait_for_workers(self, count: int) -> None:
        """Wait until ``count`` workers booted in all and the server answers."""
        deadline = time.monotonic() + BOOT_TIMEOUT
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.process.returncode}:\n{self.log()}")
            if len(self.booted_pids()) >= count and self._answers():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"gunicorn did not boot {count} workers:\n{self.log()}")
            time.sleep(0.1)

    def _answers(self) -> bool:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            connection.request("GET", "/orderhooks/igv/order-status")
            return connection.getresponse().status == 405
        except (OSError, http.client.HTTPException):
            return False
        finally:
            connection.close()

    def post(self, callback: SignedCallback) -> Answer:
        return post(self.port, callback)

    def stop(self) -> None:
        """SIGTERM, a bounded wait, then SIGKILL; then any worker left behind."""
        process, self.process = self.process, None
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(STOP_TIMEOUT)
            for pid in self.booted_pids():
                # A worker orphaned by a killed master: ours, and only by its pid.
                if _is_gunicorn(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        self.close_reader()

    # -- reading the outcome from the test process --------------------------------

    def _app(self) -> tuple[Any, Any, Any]:
        if self._reader is None:
            self._reader = server_app.build_app(self.settings, connect_receivers=False)
        return self._reader

    def effects(self) -> list[server_app.Effect]:
        """Every committed receiver row."""
        app, db, _ = self._app()
        with app.app_context():
            rows = list(db.session.scalars(sa.select(server_app.Effect).order_by("id")))
            db.session.expunge_all()
            return rows

    def deliveries(self) -> list[StoredDelivery]:
        """Every stored delivery."""
        app, _, hooks = self._app()
        with app.app_context():
            return list(hooks.store.list())

    def close_reader(self) -> None:
        if self._reader is not None:
            app, db, _ = self._reader
            with app.app_context():
                db.engine.dispose()
            self._reader = None


# -- delivery workers ----------------------------------------------------------------

#: ``flask`` run with the app that gunicorn serves, from the repository root.
FLASK_COMMAND = (sys.executable, "-m", "flask", "--app", "tests.system.server_app:create_app")
_STARTED = re.compile(r"^Worker (\d+) started", re.MULTILINE)


def flask_command(
    settings: Mapping[str, str], *args: str, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """Run ``flask <args>`` with the server's environment, bounded by ``timeout``."""
    return subprocess.run(
        [*FLASK_COMMAND, *args],
        cwd=ROOT,
        env={**os.environ, **settings, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@dataclass
class Worker:
    """One ``flask orderhooks worker`` process with a server's settings."""

    settings: dict[str, str]
    log_path: Path
    poll_interval: float | None = None
    process: subprocess.Popen[bytes] | None = None
    #: The exit code once the process was reaped (negative: killed by a signal).
    returncode: int | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None, "the worker was never started"
        return self.process.pid

    def start(self) -> None:
        command = [*FLASK_COMMAND, "orderhooks", "worker"]
        if self.poll_interval is not None:
            command += ["--poll-interval", str(self.poll_interval)]
        env = {**os.environ, **self.settings, "PYTHONUNBUFFERED": "1"}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env
            )
        self.wait_started()

    def log(self) -> str:
        return self.log_path.read_text("utf-8", "replace")

    def wait_started(self) -> None:
        """Wait for the one line a worker prints when it starts, naming its pid."""
        deadline = time.monotonic() + BOOT_TIMEOUT
        while not (started := _STARTED.search(self.log())):
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the worker exited with {self.process.returncode}:\n{self.log()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not start:\n{self.log()}")
            time.sleep(0.05)
        assert int(started[1]) == self.pid, self.log()

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def terminate(self) -> None:
        """Send SIGTERM, and return at once."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)

    def kill(self) -> int:
        """SIGKILL, and reap it; its exit code (``-SIGKILL``)."""
        assert self.process is not None
        self.process.kill()
        return self.wait()

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        """Reap the process, waiting at most ``timeout``; its exit code.

        :raises subprocess.TimeoutExpired: it is still running.
        """
        assert self.process is not None
        self.returncode = self.process.wait(timeout)
        return self.returncode

    def stop(self) -> int | None:
        """SIGTERM, a bounded wait, then SIGKILL; the exit code (``None``:
        never started). Safe to call again."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_TIMEOUT)
        self.returncode = process.returncode
        return self.returncode


def _is_gunicorn(pid: int) -> bool:
    try:
        return b"gunicorn" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def prepare_database(settings: Mapping[str, str]) -> None:
    """Create the tables once, before any worker starts (workers racing
    ``create_all()`` on PostgreSQL crash each other)."""
    app, db, _ = server_app.build_app(settings, connect_receivers=False)
    with app.app_context():
        if db.engine.dialect.name == "sqlite":
            with db.engine.connect() as connection:
                # Stored in the database file: every worker's connection gets WAL.
                mode = connection.exec_driver_sql("PRAGMA journal_mode=WAL").scalar()
                assert mode == "wal", mode
        db.create_all()
        db.engine.dispose()


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


# -- a TCP forwarder that can take the database away ------------------------------

#: The COMMIT each driver sends, byte for byte, by SQLAlchemy backend name.
COMMIT_MESSAGES = {
    # A PostgreSQL simple-protocol Query message carrying COMMIT, as psycopg sends it.
    "postgresql": b"Q\x00\x00\x00\x0bCOMMIT\x00",
    # A MySQL COM_QUERY packet, as PyMySQL's Connection.commit() sends it (seen
    # through this forwarder): payload length 7 (3 bytes, little-endian),
    # sequence id 0, then COM_QUERY (0x03) and the statement text.
    "mysql": b"\x07\x00\x00\x00\x03COMMIT",
}
_DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306}


def backend_name(url: str) -> str:
    """The label of ``url``'s database in test ids and reports: ``"postgresql"``,
    ``"mariadb"`` (SQLAlchemy's ``mysql`` dialect, on the MariaDB fixture) or
    ``"sqlite"``."""
    name = sa.make_url(url).get_backend_name()
    return "mariadb" if name == "mysql" else name


def forwarded(url: str, forwarder: Forwarder) -> str:
    """``url`` through ``forwarder``'s port."""
    return sa.make_url(url).set(port=forwarder.port).render_as_string(hide_password=False)


@dataclass(eq=False)
class _Link:
    """One forwarded connection: the app's side and the database's side."""

    client: socket.socket
    upstream: socket.socket
    armed: bool = False
    #: Set once the database's answers must no longer reach the app.
    muted: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Trap:
    """A one-shot connection cut, triggered by ``marker`` in a statement's text.

    ``commit``: on the connection that sent ``marker``, forward the next COMMIT,
    then cut before its answer. Otherwise cut instead of forwarding ``marker``.
    """

    marker: bytes
    commit: bool
    committed: Callable[[], bool] | None = None
    sprung: threading.Event = field(default_factory=threading.Event)


class Forwarder:
    """Forwards a loopback port to ``target``; :meth:`stop` makes it vanish.

    Stopped means what a database outage looks like from the app: every open
    connection is cut and new ones are refused. :meth:`lose_commit_ack` cuts
    one connection in the worst place: after the database committed, before
    the app heard that it did.

    :meth:`to` builds one for a database URL, with its driver's COMMIT.
    """

    @classmethod
    def to(cls, url: str) -> Forwarder:
        """A forwarder to the server of ``url`` (PostgreSQL or MySQL/MariaDB)."""
        parsed = sa.make_url(url)
        backend = parsed.get_backend_name()
        target = (parsed.host or "127.0.0.1", parsed.port or _DEFAULT_PORTS[backend])
        return cls(target, commit_message=COMMIT_MESSAGES[backend])

    def __init__(self, target: tuple[str, int], *, commit_message: bytes) -> None:
        self.target = target
        #: The driver's COMMIT on the wire (:data:`COMMIT_MESSAGES`).
        self.commit_message = commit_message
        self.port = 0
        self._listener: socket.socket | None = None
        self._links: set[_Link] = set()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._trap: _Trap | None = None
        self.connections = 0

    def start(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Rebinding the same port while cut connections sit in TIME_WAIT.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.1)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._spawn(self._accept, listener)

    def lose_commit_ack(self, marker: bytes, committed: Callable[[], bool]) -> threading.Event:
        """Arm a one-shot trap: on the connection that sends ``marker`` (part of
        a statement's text), forward its next COMMIT, wait until ``committed()``
        (asked over another connection) says the database ran it, then cut the
        connection without passing the answer on.

        :returns: an event set once the trap has sprung.
        """
        self._trap = _Trap(marker, commit=True, committed=committed)
        return self._trap.sprung

    def cut_before(self, marker: bytes) -> threading.Event:
        """Arm a one-shot trap: cut the connection that is about to send
        ``marker`` to the database, instead of sending it. What the same
        write held before ``marker`` still goes (a pipeline's earlier
        statements: psycopg may send them in one write with it). The
        database stays reachable: what a dropped connection looks like, not
        an outage.

        Markers are matched in the statement text, which psycopg sends until
        it prepares a statement (its fifth run on one connection): arm traps
        on a fresh server. PyMySQL always sends the text, with the parameters
        already in it.

        :returns: an event set once the trap has sprung.
        """
        self._trap = _Trap(marker, commit=False)
        return self._trap.sprung

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            link = _Link(client, upstream)
            with self._lock:
                self._links.add(link)
                self.connections += 1
            self._spawn(self._to_database, link)
            self._spawn(self._to_app, link)

    def _to_database(self, link: _Link) -> None:
        try:
            while data := link.client.recv(65536):
                trap = self._trap
                if trap is not None and not trap.sprung.is_set() and self._spring(trap, link, data):
                    return
                link.upstream.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                link.upstream.shutdown(socket.SHUT_WR)

    def _spring(self, trap: _Trap, link: _Link, data: bytes) -> bool:
        """Cut ``link`` if ``data`` springs ``trap``; whether it did."""
        if not trap.commit:
            at = data.find(trap.marker)
            if at < 0:
                return False
            # Complete messages before it run; the one it starts never ends.
            link.upstream.sendall(data[:at])
        else:
            link.armed = link.armed or trap.marker in data
            if not (link.armed and self.commit_message in data):
                return False
            link.muted.set()
            link.upstream.sendall(data)
            # Cut only once the commit is durable: the app never hears of it.
            deadline = time.monotonic() + 20
            while trap.committed is not None and not trap.committed():
                if time.monotonic() > deadline:
                    break
                time.sleep(0.02)
        trap.sprung.set()
        self._cut(link)
        return True

    def _to_app(self, link: _Link) -> None:
        try:
            while data := link.upstream.recv(65536):
                if link.muted.is_set():
                    continue
                link.client.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                link.client.shutdown(socket.SHUT_WR)

    def _cut(self, link: _Link) -> None:
        with self._lock:
            self._links.discard(link)
        for sock in (link.client, link.upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            links, self._links = self._links, set()
        for link in links:
            self._cut(link)
        threads, self._threads = self._threads, []
        for thread in threads:
            thread.join(5)

    @contextlib.contextmanager
    def running(self) -> Iterator[Forwarder]:
        self.start()
        try:
            yield self
        finally:
            self.stop()
