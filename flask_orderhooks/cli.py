"""``flask orderhooks …``: look at, replay, purge and send deliveries.

The platforms give up early (the gateway retries once, iGV three times in 35
minutes); these commands let an operator finish by hand what they gave up on.
"""

from __future__ import annotations

import os
import re
import urllib.error
import urllib.parse
import urllib.request
from datetime import UTC, datetime, timedelta
from typing import Any

import click
from flask import current_app
from flask.cli import with_appcontext
from sqlalchemy.exc import SQLAlchemyError

from .extension import AppState, get_extension
from .replay import replay
from .store import DEAD, DONE, FAILED, PROCESSING, STATUSES, StoredDelivery
from .testing import KINDS, build
from .worker import Worker, process_due

_DURATION = re.compile(r"(\d+)\s*([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class Duration(click.ParamType[timedelta]):
    """``30d``, ``12h``, ``90m``, ``45s`` or ``2w``."""

    name = "duration"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> timedelta:
        if isinstance(value, timedelta):
            return value
        match = _DURATION.fullmatch(str(value).strip())
        if not match:
            self.fail(f"{value!r} is not a duration such as 30d, 12h, 90m or 45s.", param, ctx)
        return timedelta(seconds=int(match[1]) * _UNITS[match[2]])


def _state() -> AppState:
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    try:
        return get_extension(app).state(app)
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None


def _now(state: AppState) -> datetime:
    # The extension's clock, not the wall clock: rows are stamped with it.
    return datetime.fromtimestamp(state.clock(), UTC)


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
    "--provider", metavar="NAME", help="Only this platform (igv, gateway, sud or a host's own)."
)
@click.option("--since", type=Duration(), help="Only those received within this age, e.g. 24h.")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
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
            r.key,
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
@click.argument("key")
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
        click.echo(f"{r.provider} {r.callback} {r.key}")
        click.echo(f"  status:   {r.status}")
        click.echo(f"  attempts: {r.attempts}")
        click.echo(f"  created:  {r.created_at.isoformat()}")
        click.echo(f"  updated:  {r.updated_at.isoformat()}")
        click.echo(f"  next:     {_next_attempt(state, r)}")
        click.echo(f"  error:    {r.error or '-'}")
        for failed in r.failed_attempts:
            click.echo(
                f"  failed:   attempt {failed.attempt} at {failed.at.isoformat()}: "
                + _one_line(failed.error, 100)
            )
        if r.compacted_at is not None:
            click.echo(f"  compacted: {r.compacted_at.isoformat()} (body and headers purged)")
        for name, value in sorted(r.headers.items()):
            click.echo(f"  header:   {name}: {value}")
        click.echo("  body:     " + r.body.decode("utf-8", errors="replace"))


@orderhooks.command("replay")
@click.argument("key", required=False)
@click.option("--failed", "all_failed", is_flag=True, help="Replay every failed delivery.")
@click.option("--dead", "all_dead", is_flag=True, help="Replay every dead delivery.")
@click.option("--force", is_flag=True, help="Replay deliveries that are already done.")
@with_appcontext
def replay_command(key: str | None, all_failed: bool, all_dead: bool, force: bool) -> None:
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
    state = _state()
    if statuses:
        rows = [row for status in statuses for row in state.store.list(status=status)]
    else:
        # Only configured routes: a delivery of any other has no receiver to replay to.
        rows = state.store.get(key or "", routes=state.routes, anywhere=False)
    if not rows:
        raise click.ClickException(
            f"No {' or '.join(statuses)} deliveries."
            if statuses
            else f"No delivery is stored under the key {key!r}."
        )
    failures = 0
    for row in rows:
        failures += not _replay_one(state, row, force=force)
    if failures:
        raise click.ClickException(f"{failures} of {len(rows)} replays did not succeed.")


def _replay_one(state: AppState, row: StoredDelivery, *, force: bool) -> bool:
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    outcome = replay(app, state, row, force=force)
    message = outcome.message
    if row.status == DONE and not force:
        message = "already done; not replayed (use --force to dispatch it again)."
    click.echo(f"{row.provider} {row.callback} {row.key}: {message}")
    return outcome.ok


@orderhooks.command("worker")
@click.option("--once", is_flag=True, help="Dispatch what is due now, then exit.")
@click.option(
    "--poll-interval",
    type=click.FloatRange(min=0.01),
    help="Seconds between looks when idle (default: ORDERHOOKS_WORKER_POLL_INTERVAL).",
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
        result = process_due(app, state)
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
@click.option("--older-than", "age", type=Duration(), required=True, help="e.g. 30d.")
@click.option(
    "--failed", "with_failed", is_flag=True, help="Also delete failed and dead deliveries."
)
@click.option("--processing", "with_processing", is_flag=True, help="Also delete processing ones.")
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
    as a duplicate. Other done deliveries are deleted. Failed, dead and
    processing ones are kept unless asked for; they are never compacted
    (they may still need their body). Runs in short batches while traffic
    flows.
    """
    state = _state()
    statuses = (
        (DONE,)
        + ((FAILED, DEAD) if with_failed else ())
        + ((PROCESSING,) if with_processing else ())
    )
    cutoff = _now(state) - age
    deleted = compacted = 0
    kept_whole: list[str] = []
    for name, provider in state.providers.items():
        window = provider.replay_window
        replayable = compact_only or window is None or age.total_seconds() < window
        if replayable:
            compacted += state.store.compact(older_than=cutoff, provider=name)
            kept_whole.append(name)
        deletable = tuple(s for s in statuses if not (replayable and s == DONE))
        if deletable:
            deleted += state.store.purge(older_than=cutoff, statuses=deletable, provider=name)
    click.echo(
        f"Deleted {deleted} and compacted {compacted} deliveries older than {_human(age)} "
        f"({', '.join(statuses)})."
    )
    if kept_whole:
        click.echo(
            f"Done deliveries of {', '.join(kept_whole)} were compacted, not deleted: their "
            "signatures can still be replayed."
        )


@orderhooks.command("send")
@click.argument("kind", type=click.Choice(KINDS))
@click.option("--url", required=True, help="The server's base URL, e.g. http://127.0.0.1:5000.")
@click.option("--field", "fields", multiple=True, metavar="KEY=VALUE", help="Override a field.")
@click.option("--timeout", type=float, default=10.0, show_default=True)
@with_appcontext
def send_command(kind: str, url: str, fields: tuple[str, ...], timeout: float) -> None:
    """Post a signed sample callback, built from the app's config, to a server."""
    state = _state()
    overrides: dict[str, Any] = {}
    for item in fields:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE.", param_hint="--field")
        overrides[name] = int(value) if re.fullmatch(r"-?\d+", value) else value
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    try:
        callback = build(kind, app=app, **overrides)
    except LookupError as exc:
        raise click.ClickException(f"{kind}: {exc.args[0]}") from None
    except TypeError as exc:
        raise click.ClickException(f"{kind}: {exc}") from None
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise click.BadParameter(f"{url!r} is not an http:// or https:// URL.", param_hint="--url")
    target = url.rstrip("/") + callback.url(state.settings.url_prefix or "/")
    request = urllib.request.Request(  # noqa: S310 - the scheme is checked above
        target, data=callback.body, headers=callback.headers, method="POST"
    )
    try:
        # The scheme was checked above: only http and https are ever opened.
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            status, body = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise click.ClickException(f"Could not reach {target}: {reason}") from None
    click.echo(f"POST {target} (key {callback.key})")
    click.echo(f"{status} {body.decode('utf-8', errors='replace')}")


def _one_line(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _human(age: timedelta) -> str:
    seconds = int(age.total_seconds())
    for unit in ("w", "d", "h", "m"):
        if seconds and seconds % _UNITS[unit] == 0:
            return f"{seconds // _UNITS[unit]}{unit}"
    return f"{seconds}s"
