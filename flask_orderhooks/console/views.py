"""The console's pages and actions: one blueprint, every view behind the
host's access function, every response under a strict CSP."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from flask import (
    Blueprint,
    Flask,
    abort,
    current_app,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask.typing import ResponseReturnValue
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.wrappers import Response

from ..logtext import quoted
from ..replay import replay
from ..store import DEAD, DONE, FAILED, PENDING, PROCESSING, STATUSES, StoredDelivery
from . import body as bodies
from . import chart as charts
from . import csrf
from .queries import (
    Cursor,
    Filters,
    body_digest,
    hourly_counts,
    last_hours,
    list_page,
    one,
    unbindable,
    utc,
)

if TYPE_CHECKING:
    from ..extension import AppState, OrderHooks

logger = logging.getLogger("flask_orderhooks")

BLUEPRINT = "orderhooks_console"

#: Sent with every console response. No script at all, no inline style: a
#: body that smuggles markup past the escaping still runs nothing and loads
#: nothing; the page cannot be framed (clickjacking the replay button).
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS: Mapping[str, str] = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    # Bodies, keys and order ids must not stay in a shared machine's cache.
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # Keys ride in the console's URLs.
    "Referrer-Policy": "same-origin",
}

# The list's query parameters that are filters (``after`` is the page).
_FILTER_ARGS = ("q", "status", "provider", "callback", "from", "until")

# Where an action's outcome waits for the page it redirects to.
_OUTCOME_KEY = "_orderhooks_console_outcome"

_NO_ACCESS_FUNCTION = (
    "OrderHooks console: refused %s (403): no access function is registered. "
    "Decorate a function with @hooks.console_access that returns True for your "
    "staff (or a redirect to your login page); until then every console request "
    "is refused."
)

_NOT_A_VERDICT = (
    "OrderHooks console: refused %s (403): the @hooks.console_access function returned "
    "a %s. It must return True (the request goes on), False or None (403), or a "
    "response such as redirect(...) (sent as it is); anything else is refused."
)


@dataclass(frozen=True)
class ConsoleSettings:
    """The console's validated configuration."""

    url: str
    page_size: int
    csrf_max_age: int


def _ui_time(value: datetime | None) -> str:
    """UTC, ISO 8601, to the second."""
    if value is None:
        return "—"
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(text: str) -> datetime:
    """A time from the filter form (``datetime-local``: no zone), read as UTC.

    :raises ValueError: it is not a time.
    :raises OverflowError: in UTC it falls before the year 1 or after 9999.
    """
    return utc(datetime.fromisoformat(text.strip().replace("Z", "+00:00")))


class _BadInput(Exception):
    """A value of the request the console refuses with 400 before any query:
    the client's error, never the store's."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _bindable(name: str, value: str) -> str:
    """``value``, the request's ``name``, once every store backend can bind it.

    :raises _BadInput: it holds a character no backend can (NUL, a lone
        surrogate), which no stored delivery holds either.
    """
    problem = unbindable(value)
    if problem is not None:
        raise _BadInput(
            f"The {name} in this request holds {problem}, which no delivery's {name} "
            "may hold; nothing was looked up or changed. Check the link."
        )
    return value


def _logged(text: str) -> str:
    """A request's path or a key as a log line holds it: a newline in it must
    not forge a line, nor an override hide what it says (the pages' rule)."""
    return bodies.visible(text)


def _seen_attempts(text: str | None) -> int:
    """The attempts a force form says its page showed: the done state the
    operator confirmed to run again, and only that one.

    :raises _BadInput: the form does not say (a page older than this
        field, a hand-made request), or not as a number of attempts.
    """
    if text is None or not text.strip():
        raise _BadInput(
            "This force replay does not say which attempt of the delivery the page "
            "showed, so it cannot be applied to that state only; nothing was done. "
            "Reload the page and confirm again."
        )
    value = text.strip()
    if not (value.isascii() and value.isdigit()) or len(value) > _LONGEST_ATTEMPTS:
        raise _BadInput(
            f"The attempts in this force replay, {value[: _LONGEST_ATTEMPTS + 1]!r}, are not a "
            "number of attempts; nothing was done. Reload the page and confirm again."
        )
    return int(value)


# Digits of the largest attempts count a form may carry (the column's range).
_LONGEST_ATTEMPTS = len(str(2**31 - 1))


def _seen_created(text: str | None) -> datetime:
    """When the delivery a force form's page showed was stored: with its
    attempts, what tells it from one stored anew after purge deleted it
    (at attempt 1 again).

    :raises _BadInput: the form does not say, or not as an aware ISO time.
    """
    if text is None or not text.strip():
        raise _BadInput(
            "This force replay does not say when the delivery the page showed was stored, "
            "so it cannot be applied to that delivery only; nothing was done. Reload the "
            "page and confirm again."
        )
    value = text.strip()
    try:
        when: datetime | None = datetime.fromisoformat(value)
    except ValueError:
        when = None
    if when is None or when.tzinfo is None or len(value) > _LONGEST_TIME:
        raise _BadInput(
            f"The creation time in this force replay, {value[: _LONGEST_TIME + 1]!r}, is not "
            "a time; nothing was done. Reload the page and confirm again."
        )
    return when


# Characters of the longest creation time a form may carry:
# 2026-12-03T10:00:00.123456+00:00, and some room.
_LONGEST_TIME = 40


def created_text(row: StoredDelivery) -> str:
    """The creation time a force form carries: UTC, to the microsecond the
    store keeps."""
    return row.created_at.astimezone(UTC).isoformat(timespec="microseconds")


def _changed_since_seen(seen: int, row: StoredDelivery) -> str:
    """Why a force replay was not run: the delivery is no longer in the state
    the operator confirmed (another replay, a double submit or a worker ran
    it since the page was shown)."""
    return (
        f"not replayed: the page showed attempt {seen}, and the delivery has changed "
        f"since (it is {row.status}, attempt {row.attempts}). Nothing was done; "
        "look at it again before replaying."
    )


def _stored_anew(row: StoredDelivery) -> str:
    """Why a force replay was not run: the delivery its page showed was
    purged, and the row now under its key was stored after."""
    return (
        "not replayed: the delivery the page showed is gone (purged), and this one was "
        f"stored anew since (it is {row.status}, attempt {row.attempts}). Nothing was done; "
        "look at it again before replaying."
    )


def make_blueprint(hooks: OrderHooks, state: AppState, settings: ConsoleSettings) -> Blueprint:
    """The console's blueprint, to register at ``settings.url``."""
    bp = Blueprint(
        BLUEPRINT,
        __name__,
        template_folder="templates",
        static_folder="static",
        static_url_path="/static",
    )
    store = state.store

    def app() -> Flask:
        return current_app._get_current_object()  # type: ignore[attr-defined,no-any-return]

    def ready() -> None:
        # The extension's own store creates its table on first use.
        if state.standalone is not None:
            state.standalone.ensure_table()

    def page(template: str, status: int = 200, **context: Any) -> ResponseReturnValue:
        return render_template(f"orderhooks_console/{template}", **context), status

    def refusal(status: int, message: str) -> ResponseReturnValue:
        return page("refused.html", status, status_code=status, message=message)

    @bp.before_request
    def guard() -> ResponseReturnValue | None:
        check = hooks.console_access_check
        if check is None:
            logger.warning(_NO_ACCESS_FUNCTION, _logged(request.path))
            return refusal(403, "The console is closed: no access function is registered.")
        verdict = check()
        if verdict is True:
            return None
        if verdict is False or verdict is None:
            return refusal(403, "You may not use this console.")
        if isinstance(verdict, Response):
            # The host's own answer, such as a redirect to its login page.
            return verdict
        # Fail closed: a truthy 1 or session.get("staff")'s string may not
        # open the console, nor be sent back as a page.
        logger.error(_NOT_A_VERDICT, _logged(request.path), type(verdict).__name__)
        return refusal(
            403,
            "The console is closed: its access function gave an answer it does not "
            "accept. See the server log.",
        )

    @bp.after_request
    def secure(response: Response) -> Response:
        for name, value in SECURITY_HEADERS.items():
            response.headers[name] = value
        return response

    @bp.after_app_request
    def secure_routing_errors(response: Response) -> Response:
        # A 404 or 405 below the console matched no rule, so it is outside
        # the blueprint and its after_request; the docs promise the headers
        # on every console response. A host route that matched is its own.
        path = request.path
        below = path == settings.url or path.startswith(settings.url.rstrip("/") + "/")
        if below and request.url_rule is None and request.routing_exception is not None:
            return secure(response)
        return response

    @bp.errorhandler(_BadInput)
    def bad_input(exc: _BadInput) -> ResponseReturnValue:
        logger.warning(
            "OrderHooks console: refused %s (400): %s", _logged(request.path), exc.message
        )
        return refusal(400, exc.message)

    @bp.errorhandler(SQLAlchemyError)
    def store_down(exc: SQLAlchemyError) -> ResponseReturnValue:
        logger.error("OrderHooks console: the delivery store failed (%s)", type(exc).__name__)
        return refusal(503, "The delivery store is unavailable; try again in a moment.")

    @bp.app_template_filter("orderhooks_console_time")
    def time_filter(value: datetime | None) -> str:
        return _ui_time(value)

    # Keys, order ids, headers and errors come from requests, and a row's
    # platform and callback are whatever the table holds: a page shows
    # their hidden characters (a right-to-left override) as escapes, the
    # body's rule; links and forms carry the stored value itself.
    bp.app_template_filter("orderhooks_console_visible")(bodies.visible)

    @bp.get("/")
    def index() -> ResponseReturnValue:
        args = request.args
        errors: list[str] = []

        def choice(name: str, allowed: Sequence[str]) -> str | None:
            value = args.get(name, "").strip()
            if not value:
                return None
            if value not in allowed:
                errors.append(f"Unknown {name} {quoted(value)}.")
                return None
            return value

        def when(name: str, label: str) -> datetime | None:
            value = args.get(name, "").strip()
            if not value:
                return None
            try:
                return _parse_time(value)
            except ValueError:
                errors.append(
                    f"The {label} time {quoted(value)} is not a time such as 2026-05-04T10:00."
                )
            except OverflowError:
                errors.append(
                    f"The {label} time {quoted(value)} is out of range: in UTC it falls before "
                    "the year 1 or after 9999."
                )
            return None

        def search() -> str | None:
            value = args.get("q", "").strip()
            if not value:
                return None
            problem = unbindable(value)
            if problem is not None:
                errors.append(
                    f"The search {quoted(value)} holds {problem}, which no delivery key or "
                    "order id holds."
                )
                return None
            return value

        callbacks = sorted({cb for _, cb in state.routes})
        filters = Filters(
            status=choice("status", STATUSES),
            provider=choice("provider", sorted(state.providers)),
            callback=choice("callback", callbacks),
            since=when("from", "from"),
            until=when("until", "until"),
            search=search(),
        )
        after: Cursor | None = None
        if args.get("after"):
            try:
                after = Cursor.decode(args["after"])
            except ValueError as exc:
                errors.append(f"The page link is damaged ({exc}); start again from the newest.")
        ready()
        start, end = last_hours(datetime.fromtimestamp(state.clock(), UTC))
        chart = charts.build(hourly_counts(store, start=start, end=end), start)
        context: dict[str, Any] = {
            "args": args,
            "statuses": STATUSES,
            "providers": sorted(state.providers),
            "callbacks": callbacks,
            "chart": chart,
            "errors": errors,
            "filtered": any(args.get(name) for name in _FILTER_ARGS),
        }
        if errors:
            for error in errors:
                logger.warning(
                    "OrderHooks console: refused %s (400): %s", _logged(request.path), error
                )
            return page("list.html", 400, rows=[], next_url=None, newest_url=None, **context)
        result = list_page(
            store, filters, pairs=state.routes, after=after, limit=settings.page_size
        )
        # The filters ride along to the next page; nothing else does.
        kept: dict[str, Any] = {name: args[name] for name in _FILTER_ARGS if args.get(name)}
        next_url = None
        if result.next is not None:
            next_url = url_for(".index", **kept, after=result.next.encode())
        newest_url = url_for(".index", **kept) if after is not None else None
        return page(
            "list.html", rows=result.rows, next_url=next_url, newest_url=newest_url, **context
        )

    def find(provider: str, callback: str, key: str | None) -> StoredDelivery:
        if not key:
            abort(404)
        row_id = (
            _bindable("platform", provider),
            _bindable("callback", callback),
            _bindable("key", key),
        )
        ready()
        row = one(store, *row_id)
        # MySQL's utf8mb4_bin pads ('gateway ' = 'gateway'): a link that is
        # 404 on SQLite and PostgreSQL would show the row under a platform
        # that is not configured, and act on it.
        if row is None or (row.provider, row.callback) != row_id[:2]:
            abort(404)
        return row

    def next_attempt(row: StoredDelivery) -> str:
        if row.status == FAILED and row.next_attempt_at is not None:
            return _ui_time(row.next_attempt_at)
        if row.status == PENDING:
            return "now (waiting for a worker)"
        if row.status == PROCESSING:
            return (
                f"in progress; taken over after {_ui_time(row.lease_expires_at)} if its worker died"
            )
        if row.status == DEAD:
            return "none: every local attempt failed (replay it, or wait for the platform's resend)"
        return "—"

    @bp.get("/delivery/<provider>/<callback>")
    def delivery(provider: str, callback: str) -> ResponseReturnValue:
        row = find(provider, callback, request.args.get("key"))
        outcome = session.get(_OUTCOME_KEY)
        if isinstance(outcome, dict) and outcome.get("for") == [provider, callback, row.key]:
            session.pop(_OUTCOME_KEY)
        else:
            outcome = None
        signed = state.providers.get(provider)
        # A tombstone's body and headers are gone, not empty: it is shown as
        # compacted, and nothing can replay it.
        compacted = row.compacted_at is not None
        return page(
            "detail.html",
            row=row,
            body=bodies.show(row.body),
            headers=sorted(row.headers.items()),
            failures=row.failed_attempts,
            reference=row.reference,
            next_attempt=next_attempt(row),
            compacted=compacted,
            digest=body_digest(store, provider, callback, row.key) if compacted else None,
            can_replay=row.status in (FAILED, DEAD, PENDING) and not compacted,
            can_force=row.status == DONE and not compacted,
            created=created_text(row),
            can_retry=row.status == FAILED and row.next_attempt_at is not None,
            configured=signed is not None,
            csrf_token=csrf.token(app()),
            outcome=outcome,
        )

    def act(provider: str, callback: str, action: str) -> ResponseReturnValue:
        if not csrf.is_valid(app(), request.form.get("csrf_token"), settings.csrf_max_age):
            logger.warning(
                "OrderHooks console: refused a %s of %s %s: missing or expired CSRF token",
                action,
                _logged(provider),
                _logged(callback),
            )
            return refusal(
                400,
                "This form has expired or did not come from the console; nothing was "
                "done. Reload the page and try again.",
            )
        row = find(provider, callback, request.form.get("key"))
        force = action == "replay" and request.form.get("force") == "yes"
        seen = _seen_attempts(request.form.get("attempts")) if force else None
        seen_created = _seen_created(request.form.get("created")) if force else None
        if action == "retry" and (row.status != FAILED or row.next_attempt_at is None):
            ok, message = (
                False,
                f"no attempt is scheduled (the delivery is {row.status}); nothing done.",
            )
        elif seen_created is not None and seen_created != row.created_at:
            ok, message = False, _stored_anew(row)
        elif seen is not None and seen != row.attempts:
            ok, message = False, _changed_since_seen(seen, row)
        else:
            result = replay(app(), state, row, force=force and row.status == DONE)
            ok, message = result.ok, result.message
        logger.info(
            "OrderHooks console: %s of %s %s %s: %s",
            action,
            _logged(provider),
            _logged(callback),
            _logged(row.key),
            _logged(message),
        )
        label = "Replay" if action == "replay" else "Retry now"
        session[_OUTCOME_KEY] = {
            "for": [provider, callback, row.key],
            "ok": ok,
            "message": f"{label}: {message}",
        }
        # 303: the browser fetches the page with GET; reloading it repeats nothing.
        return redirect(
            url_for(".delivery", provider=provider, callback=callback, key=row.key), 303
        )

    @bp.post("/delivery/<provider>/<callback>/replay")
    def replay_delivery(provider: str, callback: str) -> ResponseReturnValue:
        return act(provider, callback, "replay")

    @bp.post("/delivery/<provider>/<callback>/retry")
    def retry_delivery(provider: str, callback: str) -> ResponseReturnValue:
        return act(provider, callback, "retry")

    return bp
