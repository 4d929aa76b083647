"""``flask orderhooks …``: look at, replay, purge and send deliveries.

The platforms give up early (the gateway retries once, iGV three times in 35
minutes); these commands let an operator finish by hand what they gave up on.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import re
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import click
from flask import current_app
from flask.cli import with_appcontext
from sqlalchemy.exc import SQLAlchemyError

from .config import LONGEST_POLL_INTERVAL, LONGEST_SECONDS
from .console.queries import unbindable
from .exc import StoreUnavailable
from .extension import AppState, get_extension
from .logtext import for_terminal
from .provider import Provider
from .replay import replay
from .store import DEAD, DONE, FAILED, PROCESSING, STATUSES, DeliveryStore, StoredDelivery
from .testing import KINDS, build
from .worker import PassResult, Worker, process_due

_DURATION = re.compile(r"([0-9]+)\s*([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _human(age: timedelta) -> str:
    seconds = int(age.total_seconds())
    for unit in ("w", "d", "h", "m"):
        if seconds and seconds % _UNITS[unit] == 0:
            return f"{seconds // _UNITS[unit]}{unit}"
    return f"{seconds}s"


class Duration(click.ParamType[timedelta]):
    """``30d``, ``12h``, ``90m``, ``45s`` or ``2w``, at most :attr:`LONGEST`."""

    name = "duration"
    #: 100 years: longer than any retention, and a cutoff that far back stays
    #: inside what every backend stores (MySQL's DATETIME starts at year
    #: 1000). Without a bound, 1000000d overflowed the date arithmetic.
    LONGEST = timedelta(seconds=LONGEST_SECONDS)
    #: The bound as help texts and errors write it.
    LONGEST_TEXT = f"{_human(LONGEST)} (100 years)"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> timedelta:
        if isinstance(value, timedelta):
            return value
        match = _DURATION.fullmatch(str(value).strip())
        if not match:
            self.fail(f"{value!r} is not a duration such as 30d, 12h, 90m or 45s.", param, ctx)
        # Digits are counted before int() sees them: it refuses a string of
        # thousands of digits with a ValueError of its own.
        digits = match[1].lstrip("0") or "0"
        longest = int(self.LONGEST.total_seconds())
        seconds = int(digits) * _UNITS[match[2]] if len(digits) <= len(str(longest)) else None
        if seconds is None or seconds > longest:
            self.fail(
                f"{value!r} is longer than {self.LONGEST_TEXT}, the longest duration accepted.",
                param,
                ctx,
            )
        return timedelta(seconds=seconds)


class Seconds(click.FloatRange):
    """A finite number of seconds between ``min`` and ``max``.

    click's FloatRange takes NaN whatever its bounds (every comparison with
    NaN is false), and infinity when it has no maximum: a wait of NaN
    returns at once (an idle worker then polls without pause), and one of
    infinity or of more than :data:`threading.TIMEOUT_MAX` overflows.
    """

    name = "seconds"

    def __init__(self, *, min: float, max: float, min_open: bool = False) -> None:
        if max > threading.TIMEOUT_MAX:
            raise ValueError(f"max={max} is longer than a thread can wait.")
        super().__init__(min=min, max=max, min_open=min_open)

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(
                f"{value!r} is not a finite number of seconds ({self._describe_range()}).",
                param,
                ctx,
            )
        seconds: float = super().convert(number, param, ctx)
        return seconds


#: Any byte http.client refuses in a URL (it raises InvalidURL, which is
#: neither an OSError nor a URLError).
_URL_FORBIDDEN = re.compile(r"[\x00-\x20\x7f]")


class BaseURL(click.ParamType[str]):
    """A server's http:// or https:// base URL, which a callback's path is
    appended to."""

    name = "url"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        url = str(value)
        try:
            parts = urllib.parse.urlsplit(url)
            parts.port  # noqa: B018 - reading it checks the port (a number, 0 to 65535)
        except ValueError as exc:
            self.fail(f"{url!r} is not a valid URL: {exc}.", param, ctx)
        if parts.username is not None or parts.password is not None:
            # urllib sends no credentials from a URL (it asks DNS for the host
            # "user:pass@host"), and send prints its URL on every line: the
            # password would only end up on the terminal. Not repeated here.
            shown = urllib.parse.urlunsplit(parts._replace(netloc="***@" + _host_port(parts)))
            self.fail(
                f"{for_terminal(shown)} holds a user name or password; send cannot use them, "
                "give the server's URL without them.",
                param,
                ctx,
            )
        if parts.scheme not in ("http", "https"):
            self.fail(f"{url!r} is not an http:// or https:// URL.", param, ctx)
        if not parts.hostname:
            self.fail(f"{url!r} names no host, e.g. http://127.0.0.1:5000.", param, ctx)
        if parts.query or parts.fragment:
            self.fail(
                f"{url!r} has a query or a fragment; give the server's base URL only.", param, ctx
            )
        if _URL_FORBIDDEN.search(url) or not url.isascii():
            self.fail(
                f"{url!r} has a space, a control character or a non-ASCII character; "
                "percent-encode it (or write the host in its xn-- form).",
                param,
                ctx,
            )
        return url


def _host_port(parts: urllib.parse.SplitResult) -> str:
    """The netloc of ``parts`` after its ``@``: the host and port alone."""
    return parts.netloc.rpartition("@")[2]


class StoredText(click.ParamType[str]):
    """A key or a provider's name to look up: text every store backend can
    bind as a parameter.

    Argument bytes that are not UTF-8 (``show $'\\xff'`` in a UTF-8 locale)
    reach Python as a lone surrogate, which no driver can encode: SQLite and
    PostgreSQL raised UnicodeEncodeError, and MariaDB's StatementError read
    as a database that is down. No stored delivery holds one (nor NUL).
    """

    name = "text"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value)
        problem = unbindable(text)
        if problem is not None:
            self.fail(
                f"{text!r} holds {problem}, which no stored delivery holds, so nothing "
                "was looked up. Was the argument written in another encoding than "
                "the terminal's?",
                param,
                ctx,
            )
        return text


def _state() -> AppState:
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    try:
        return get_extension(app).state(app)
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None


def _now(state: AppState) -> datetime:
    # The extension's clock, not the wall clock: rows are stamped with it.
    return datetime.fromtimestamp(state.clock(), UTC)


#: Most deliveries one listing prints: each row is read whole, body included,
#: into memory (a larger number also overflowed SQLite's 64-bit LIMIT).
_MOST_LISTED = 100_000


class _StoreErrorsGroup(click.Group):
    """Turns a database that is down into one clear line, not a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SQLAlchemyError as exc:
            raise click.ClickException(
                f"The delivery store is unavailable ({type(exc).__name__}); is the database up?"
            ) from None


@click.group("orderhooks", cls=_StoreErrorsGroup)
def orderhooks() -> None:
    """Inspect and recover order and payment callbacks."""


@orderhooks.command("deliveries")
@click.option("--status", type=click.Choice(STATUSES), help="Only deliveries in this state.")
@click.option(
    "--provider",
    metavar="NAME",
    type=StoredText(),
    help="Only this platform (igv, gateway, sud or a host's own).",
)
@click.option(
    "--since",
    type=Duration(),
    help=f"Only those received within this age, e.g. 24h; at most {Duration.LONGEST_TEXT}.",
)
@click.option(
    "--limit",
    type=click.IntRange(min=1, max=_MOST_LISTED),
    default=100,
    show_default=True,
    help="List at most this many.",
)
@with_appcontext
def deliveries_command(
    status: str | None, provider: str | None, since: timedelta | None, limit: int
) -> None:
    """List stored deliveries, newest received first."""
    state = _state()
    store = state.store
    cutoff = _now(state) - since if since is not None else None
    rows = store.list(status=status, provider=provider, since=cutoff, limit=limit)
    if not rows:
        click.echo("No deliveries.")
        return
    header = ("RECEIVED (UTC)", "PROVIDER", "CALLBACK", "KEY", "STATUS", "ATTEMPTS", "ERROR")
    table = [header] + [
        (
            r.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            r.provider,
            r.callback,
            for_terminal(r.key),
            r.status,
            str(r.attempts),
            _one_line(r.error or "", 60),
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        click.echo(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


@orderhooks.command("show")
@click.argument("key", type=StoredText())
@click.option(
    "--anywhere",
    is_flag=True,
    help="Also look under providers and callbacks no longer configured: a scan of "
    "the whole table (seconds on a large one).",
)
@with_appcontext
def show_command(key: str, anywhere: bool) -> None:
    """Show every delivery stored under KEY, with its body and last error."""
    state = _state()
    rows = state.store.get(key, routes=state.routes, anywhere=anywhere)
    if not rows:
        hint = "" if anywhere else " under a configured route (--anywhere looks everywhere)"
        raise click.ClickException(f"No delivery is stored under the key {key!r}{hint}.")
    for r in rows:
        _show_one(state, r)


def _show_one(state: AppState, r: StoredDelivery) -> None:
    """One delivery, as ``show`` prints it. What a request wrote (the key,
    the headers, the body) or a receiver raised (the errors) is printed
    through :func:`for_terminal`: it runs no escape sequence on the
    operator's terminal, and hides no character."""
    click.echo(f"{r.provider} {r.callback} {for_terminal(r.key)}")
    click.echo(f"  status:   {r.status}")
    click.echo(f"  attempts: {r.attempts}")
    click.echo(f"  created:  {r.created_at.isoformat()}")
    click.echo(f"  updated:  {r.updated_at.isoformat()}")
    click.echo(f"  next:     {_next_attempt(state, r)}")
    click.echo(f"  error:    {for_terminal(r.error, lines=True) if r.error else '-'}")
    for failed in r.failed_attempts:
        click.echo(
            f"  failed:   attempt {failed.attempt} at {failed.at.isoformat()}: "
            + _one_line(failed.error, 100)
        )
    if r.compacted_at is not None:
        click.echo(f"  compacted: {r.compacted_at.isoformat()} (body and headers purged)")
    for name, value in sorted(r.headers.items()):
        click.echo(f"  header:   {for_terminal(name)}: {for_terminal(value)}")
    click.echo("  body:     " + for_terminal(r.body.decode("utf-8", errors="replace"), lines=True))


@orderhooks.command("replay")
@click.argument("key", required=False, type=StoredText())
@click.option("--failed", "all_failed", is_flag=True, help="Replay every failed delivery.")
@click.option("--dead", "all_dead", is_flag=True, help="Replay every dead delivery.")
@click.option("--force", is_flag=True, help="Replay deliveries that are already done.")
@click.option(
    "--route",
    metavar="PROVIDER/CALLBACK",
    help="Only KEY's delivery of this route (needed with --force when KEY is on several).",
)
@with_appcontext
def replay_command(
    key: str | None, all_failed: bool, all_dead: bool, force: bool, route: str | None
) -> None:
    """Dispatch stored deliveries now: KEY, or every failed (--failed) or
    dead (--dead) one.

    Each is verified again with the configured secrets (without the timestamp
    window), sent to the same signals in one transaction, and marked done or
    failed again. Attempts keep counting: a replayed dead delivery that fails
    again is dead again at once (replay it once its cause is fixed).
    """
    statuses = [s for s, on in ((FAILED, all_failed), (DEAD, all_dead)) if on]
    if (key is None) == (not statuses):
        raise click.UsageError("Give a KEY, or --failed and/or --dead, not both and not neither.")
    if route is not None and key is None:
        raise click.UsageError("--route chooses among KEY's deliveries: give a KEY.")
    state = _state()
    rows: Iterable[StoredDelivery]
    if statuses:
        rows = _each_once(state.store, statuses)
    else:
        # Only configured routes: a delivery of any other has no receiver to replay to.
        routes = state.routes if route is None else [_route(state, route)]
        rows = state.store.get(key or "", routes=routes, anywhere=False)
        if force and len(rows) > 1:
            # Two platforms' ids may coincide (a gateway collect and a payout
            # both "123:60"): forcing both would run a second, unrelated
            # delivery's receivers again.
            raise click.UsageError(
                f"The key {for_terminal(key or '')} is stored on "
                f"{', '.join(f'{r.provider}/{r.callback}' for r in rows)}: with --force, "
                "choose one with --route PROVIDER/CALLBACK."
            )
    replayed = failures = 0
    for row in rows:
        replayed += 1
        failures += not _replay_one(state, row, force=force)
    if not replayed:
        raise click.ClickException(
            f"No {' or '.join(statuses)} deliveries."
            if statuses
            else f"No delivery is stored under the key {key!r}."
        )
    if failures:
        raise click.ClickException(f"{failures} of {replayed} replays did not succeed.")


#: Deliveries ``replay --failed`` or ``--dead`` reads at a time: each is read
#: whole, body included, and a year's store may hold many thousands.
_REPLAY_PAGE = 100


def _each(store: DeliveryStore, status: str) -> Iterator[StoredDelivery]:
    """Every delivery in ``status``, newest received first, a keyset page at
    a time. A row replayed meanwhile keeps its place in that order, so the
    next page never holds it again, whatever its status became."""
    after: StoredDelivery | None = None
    while True:
        page = store.list(status=status, limit=_REPLAY_PAGE, after=after)
        yield from page
        if len(page) < _REPLAY_PAGE:
            return
        after = page[-1]


def _each_once(store: DeliveryStore, statuses: Sequence[str]) -> Iterator[StoredDelivery]:
    """Every delivery in each of ``statuses`` in turn (:func:`_each`), each
    one once: a failed delivery whose replay fails on its last attempt is
    dead by the time the dead ones are read, and must not be replayed (nor
    announced dead) a second time by the same run."""
    seen: set[tuple[str, str, str]] = set()
    for n, status in enumerate(statuses):
        last = n == len(statuses) - 1
        for row in _each(store, status):
            identity = (row.provider, row.callback, row.key)
            if identity in seen:
                continue
            if not last:
                # Only a later status's pages can meet it again.
                seen.add(identity)
            yield row


def _route(state: AppState, value: str) -> tuple[str, str]:
    provider, _, callback = value.partition("/")
    if (provider, callback) not in state.routes:
        configured = ", ".join(f"{p}/{c}" for p, c in state.routes)
        raise click.BadParameter(
            f"{for_terminal(value)} is not a configured route ({configured}).",
            param_hint="--route",
        )
    return provider, callback


def _replay_one(state: AppState, row: StoredDelivery, *, force: bool) -> bool:
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    outcome = replay(app, state, row, force=force)
    message = outcome.message
    if row.status == DONE and not force:
        message = "already done; not replayed (use --force to dispatch it again)."
    click.echo(f"{row.provider} {row.callback} {for_terminal(row.key)}: {for_terminal(message)}")
    return outcome.ok


@orderhooks.command("worker")
@click.option("--once", is_flag=True, help="Dispatch what is due now, then exit.")
@click.option(
    "--poll-interval",
    type=Seconds(min=0.01, max=LONGEST_POLL_INTERVAL),
    help="Seconds between looks when idle, at most an hour "
    "(default: ORDERHOOKS_WORKER_POLL_INTERVAL).",
)
@with_appcontext
def worker_command(once: bool, poll_interval: float | None) -> None:
    """Dispatch deliveries as they fall due, until SIGTERM or SIGINT.

    Due: stored by deferred dispatch, failed with its retry delay over, or
    held by a worker that died (its lease ran out). On SIGTERM or SIGINT the
    delivery in hand is finished, then the worker exits 0. Run as many as you
    like, on as many hosts: on PostgreSQL they never take the same delivery
    and never wait for one another's.
    """
    state = _state()
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    if once:
        result = PassResult()
        try:
            process_due(app, state, result=result)
        except StoreUnavailable as exc:
            # What the pass did before the store failed still happened.
            raise click.ClickException(
                f"The delivery store failed after {_deliveries(result.attempted)} "
                f"({result.failed} failed): {exc.reason}"
            ) from None
        click.echo(f"Dispatched {_deliveries(result.attempted)}, {result.failed} failed.")
        return
    interval = poll_interval or state.settings.worker_poll_interval
    worker = Worker(app, state, poll_interval=interval)
    click.echo(
        f"Worker {os.getpid()} started: {state.store.dialect} store, "
        f"looking for due deliveries every {interval:g}s when idle.",
    )
    total = worker.run()
    click.echo(
        f"Worker {os.getpid()} stopped: dispatched {_deliveries(total.attempted)}, "
        f"{total.failed} failed."
    )


def _deliveries(count: int) -> str:
    return f"{count} delivery" if count == 1 else f"{count} deliveries"


def _next_attempt(state: AppState, row: StoredDelivery) -> str:
    if row.next_attempt_at is None:
        if row.status == FAILED:
            # Stored by 0.1, which planned no attempts.
            return "- (none planned: replay it)"
        return "-"
    seconds = (row.next_attempt_at - _now(state)).total_seconds()
    when = f"in {_human(timedelta(seconds=int(seconds)))}" if seconds > 0 else "due now"
    what = " (lease end)" if row.status == PROCESSING else ""
    return f"{row.next_attempt_at.isoformat()}{what}, {when}"


@orderhooks.command("purge")
@click.option(
    "--older-than",
    "age",
    type=Duration(),
    required=True,
    help=f"e.g. 30d; at most {Duration.LONGEST_TEXT}.",
)
@click.option(
    "--failed",
    "with_failed",
    is_flag=True,
    help="Also delete dead deliveries, and failed ones no worker will retry or retried for AGE.",
)
@click.option(
    "--processing",
    "with_processing",
    is_flag=True,
    help="Also delete processing ones whose lease ran out AGE ago.",
)
@click.option(
    "--compact-only",
    is_flag=True,
    help="Keep a tombstone of every done delivery; delete none of them.",
)
@with_appcontext
def purge_command(
    age: timedelta, with_failed: bool, with_processing: bool, compact_only: bool
) -> None:
    """Delete or compact deliveries last updated more than AGE ago.

    A done delivery whose signature could still be replayed (the platform
    signs no timestamp, like the gateway, or its window is longer than AGE)
    is compacted to a tombstone: its body and signed headers are dropped, its
    key, body digest, status and dates kept, so a replay is still answered
    as a duplicate. Other done deliveries are deleted. Done deliveries of a
    provider no longer configured are compacted, never deleted: its replay
    window is unknown without its config. Failed, dead and processing ones
    are kept unless asked for; they are never compacted (they may still need
    their body). Runs in short batches while traffic flows.
    """
    state = _state()
    statuses = (
        (DONE,)
        + ((FAILED, DEAD) if with_failed else ())
        + ((PROCESSING,) if with_processing else ())
    )
    cutoff = _now(state) - age
    purged = _Purged()
    for name in _stored_or_configured(state):
        reason = _why_compacted(state.providers.get(name), age, compact_only)
        if reason is not None:
            purged.compacted(name, reason, state.store.compact(older_than=cutoff, provider=name))
        deletable = tuple(s for s in statuses if not (reason and s == DONE))
        if deletable:
            purged.deleted += state.store.purge(
                older_than=cutoff, statuses=deletable, provider=name
            )
    click.echo(
        f"Deleted {purged.deleted} and compacted {purged.total_compacted} deliveries "
        f"older than {_human(age)} ({', '.join(statuses)})."
    )
    for reason, names in purged.compacted_by_reason.items():
        if names:
            click.echo(
                f"Done deliveries of {', '.join(names)} were compacted, not deleted: {reason}"
            )


#: Why a provider's done deliveries were compacted rather than deleted, in
#: the order purge reports them.
_STILL_REPLAYABLE = "their signatures can still be replayed."
_COMPACT_ONLY = "--compact-only was given."
_NOT_CONFIGURED = "they are not configured in this app, so their replay window is unknown."
_REASONS = (_STILL_REPLAYABLE, _COMPACT_ONLY, _NOT_CONFIGURED)


def _why_compacted(provider: Provider | None, age: timedelta, compact_only: bool) -> str | None:
    """Why done deliveries older than ``age`` must be compacted, not deleted
    (``None``: they may be deleted). A provider that is not configured has
    no known replay window: its signatures are treated as never expiring,
    so its deliveries keep their replay protection (a tombstone) should it
    be configured again with the same secrets."""
    if provider is None:
        return _NOT_CONFIGURED
    window = provider.replay_window
    if window is None or age.total_seconds() < window:
        return _STILL_REPLAYABLE
    return _COMPACT_ONLY if compact_only else None


def _stored_or_configured(state: AppState) -> list[str]:
    """The configured providers, then those the store holds deliveries of
    that are no longer configured (a platform whose credentials were
    removed): their rows are purged too, by the rule for an unknown window."""
    configured = list(state.providers)
    return configured + [name for name in state.store.providers() if name not in configured]


@dataclass
class _Purged:
    """What one purge run deleted and compacted, and why it compacted."""

    deleted: int = 0
    total_compacted: int = 0
    #: Reason -> the providers compacted for it (only those that had rows).
    compacted_by_reason: dict[str, list[str]] = field(
        default_factory=lambda: {reason: [] for reason in _REASONS}
    )

    def compacted(self, provider: str, reason: str, count: int) -> None:
        self.total_compacted += count
        if count:
            self.compacted_by_reason[reason].append(provider)


@orderhooks.command("send")
@click.argument("kind", type=click.Choice(KINDS))
@click.option(
    "--url",
    type=BaseURL(),
    required=True,
    help="The server's base URL, e.g. http://127.0.0.1:5000.",
)
@click.option("--field", "fields", multiple=True, metavar="KEY=VALUE", help="Override a field.")
@click.option(
    "--timeout",
    type=Seconds(min=0, min_open=True, max=3600),
    default=10.0,
    show_default=True,
    help="Seconds to wait for the server, at most an hour.",
)
@with_appcontext
def send_command(kind: str, url: str, fields: tuple[str, ...], timeout: float) -> None:
    """Post a signed sample callback, built from the app's config, to a server."""
    state = _state()
    overrides = dict(_field(item) for item in fields)
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    try:
        callback = build(kind, app=app, **overrides)
    except LookupError as exc:
        raise click.ClickException(f"{kind}: {exc.args[0]}") from None
    except TypeError as exc:
        raise click.ClickException(f"{kind}: {exc}") from None
    except ValueError as exc:
        # A field's value the builder cannot sign (a timestamp that is no number).
        raise click.BadParameter(f"{kind}: {exc}", param_hint="--field") from None
    target = url.rstrip("/") + callback.url(state.settings.url_prefix or "/")
    request = urllib.request.Request(  # noqa: S310 - BaseURL takes http and https only
        target, data=callback.body, headers=callback.headers, method="POST"
    )
    try:
        try:
            # BaseURL took only http and https: no other scheme is ever opened.
            with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
                status, body = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, body = exc.code, exc.read()
    except http.client.HTTPException as exc:
        # Neither an OSError nor a URLError: a port that is not an HTTP
        # server (an SSH banner), or an answer cut short or malformed.
        detail = _one_line(str(exc), _ANSWER_IN_ERROR * 2)
        name = type(exc).__name__
        if not detail.startswith(name):  # IncompleteRead's text names itself
            detail = f"{name}: {detail}"
        raise click.ClickException(
            f"{target} did not answer in HTTP ({detail}); is the URL the app's server?"
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise click.ClickException(f"Could not reach {target}: {reason}") from None
    click.echo(f"POST {target} (key {for_terminal(callback.key)})")
    # The server's answer is printed quoted when it holds what a terminal
    # would run: it is another program's text.
    click.echo(f"{status} {for_terminal(body.decode('utf-8', errors='replace'), lines=True)}")
    refused = _not_accepted(callback.provider, status, body)
    if refused is not None:
        # Exit 1: a script (a deploy's smoke test) must see that the server refused it.
        raise click.ClickException(
            f"The server answered {status}{refused}: the callback was not accepted."
        )


#: How much of a gateway answer that is not ``success`` the error repeats.
_ANSWER_IN_ERROR = 40


def _not_accepted(provider: str, status: int, body: bytes) -> str | None:
    """Why the platform would read this answer as a failure (and retry),
    as the end of "The server answered 200…", or ``None`` when it is done.

    The HTTP status is not always enough: SUD reads ``ret_code``, and a
    failure may come with HTTP 200 (``ORDERHOOKS_SUD_FAILURE_HTTP_STATUS``);
    the gateway reads the text ``success``.
    """
    if not 200 <= status < 300:
        return ""
    if provider == "sud":
        try:
            answer = json.loads(body.decode("utf-8"))
        except (ValueError, RecursionError):
            answer = None
        code = answer.get("ret_code") if isinstance(answer, dict) else None
        if isinstance(code, bool) or not isinstance(code, int):
            return " without ret_code 0"
        return None if code == 0 else f" with ret_code {code}"
    if provider == "gateway" and body != b"success":
        text = body.decode("utf-8", errors="replace")[:_ANSWER_IN_ERROR]
        return f" with {text!r}, not 'success'"
    return None


#: A --field value sent as a JSON number rather than a string.
_INTEGER = re.compile(r"-?[0-9]+")


def _field(item: str) -> tuple[str, Any]:
    """One ``--field KEY=VALUE``: an integer value as a number, others as text."""
    name, sep, value = item.partition("=")
    if not sep or not name:
        raise click.BadParameter(f"{item!r} is not KEY=VALUE.", param_hint="--field")
    if not _INTEGER.fullmatch(value):
        return name, value
    try:
        return name, int(value)
    except ValueError:
        # Python converts integers of at most 4300 digits by default.
        raise click.BadParameter(
            f"{name}: an integer of {len(value.lstrip('-'))} digits is too long to send.",
            param_hint="--field",
        ) from None


def _one_line(text: str, width: int) -> str:
    """``text`` (a receiver's error) on one line of at most ``width``
    characters, through :func:`for_terminal` once its whitespace is one
    space: a table's cell holds no escape sequence, and no line break."""
    text = for_terminal(" ".join(text.split()))
    return text if len(text) <= width else text[: width - 1] + "…"
