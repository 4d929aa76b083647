"""The shop's staff: a login, the page of recent callbacks and records, and
who may use the operator console.

A real shop uses its own login (Flask-Login, SSO) and a form library with
CSRF protection (Flask-WTF); this one checks one password and keeps a CSRF
token in the session, which is enough to show the parts: a login page that
marks the session, pages that ask for it, and the access function the
console asks on every request. Failed logins are limited per client address
(Flask-Limiter), so the password cannot be guessed at the server's speed.

All of it is off unless ``SHOP_STAFF_PASSWORD`` is set: a shop must not open
its orders to whoever guesses a default password.
"""

from __future__ import annotations

import hmac
import logging
import re
import secrets
from collections.abc import Callable
from functools import wraps
from typing import Any, ParamSpec
from urllib.parse import unquote, urlsplit

from flask import (
    Blueprint,
    Flask,
    Response,
    current_app,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask.typing import ResponseReturnValue
from flask_limiter import Limiter, RequestLimit
from flask_limiter.util import get_remote_address
from limits import parse_many
from werkzeug.exceptions import HTTPException

from flask_orderhooks import OrderHooks
from flask_orderhooks.console import BLUEPRINT as CONSOLE_BLUEPRINT

from .views import recent_records

__all__ = [
    "LOGIN_LIMIT_KEY",
    "PASSWORD_KEY",
    "local_target",
    "prepare_staff",
    "register_staff",
    "staff",
]

logger = logging.getLogger(__name__)

staff = Blueprint("staff", __name__)

#: The config key of the staff password; without it the staff side is off.
PASSWORD_KEY = "SHOP_STAFF_PASSWORD"
#: The config key of how many failed logins a client address may make, in
#: Flask-Limiter's notation; one more is refused with 429, whatever the
#: password, until the window has passed. Where the counts live is
#: Flask-Limiter's ``RATELIMIT_STORAGE_URI``: this process's memory unless set,
#: so a shop served by several processes sets a shared one (``redis://…``).
LOGIN_LIMIT_KEY = "SHOP_LOGIN_LIMIT"
DEFAULT_LOGIN_LIMIT = "5 per minute; 30 per hour"
#: The session keys: whether the session is a logged-in staff member's, and
#: the token its forms carry.
STAFF_SESSION_KEY = "staff"
CSRF_SESSION_KEY = "_shop_csrf"
#: Where a login goes when its ``next`` is missing or not a page of this shop.
DEFAULT_ENDPOINT = "staff.records"

# A path of this site, as the browser will read it: one "/" then printable
# ASCII only. No second "/" and no "\" anywhere (browsers read "\" as "/", so
# "//host" and "/\host" go to another host), and no space, tab, CR, LF or
# other control character (browsers drop tabs and newlines from a URL, which
# turns "/\t/host" into "//host"; a CR or LF in a header is refused with a
# 500). Non-ASCII is refused too: some browsers fold look-alikes such as
# "。" into ".".
_LOCAL_PATH = re.compile(r"/(?!/)[!-\[\]-~]*")

P = ParamSpec("P")


# -- configuration ------------------------------------------------------------------


def prepare_staff(app: Flask) -> bool:
    """Whether the staff side is on: it is when ``SHOP_STAFF_PASSWORD`` is set.

    Off, the operator console is switched off too (its only access function
    is the staff login). On, the app gets a ``SECRET_KEY`` if it has none.

    :raises ValueError: the password is not a string.
    """
    if not _configured_password(app):
        app.config["ORDERHOOKS_CONSOLE_URL"] = None
        logger.warning(
            "%s is not set: the staff login, the staff page and the operator console "
            "are off. Set it (e.g. FLASK_%s in the environment) to turn them on.",
            PASSWORD_KEY,
            PASSWORD_KEY,
        )
        return False
    _ensure_secret_key(app)
    return True


def _configured_password(app: Flask) -> str:
    """The staff password, or "" when there is none."""
    password = app.config.get(PASSWORD_KEY)
    if password is None:
        return ""
    if not isinstance(password, str):
        # FLASK_* variables are read as JSON: 1234 arrives as a number. The
        # message never shows the value: it is a secret.
        raise ValueError(
            f"{PASSWORD_KEY} must be a string; quote a password made of digits "
            f"(FLASK_{PASSWORD_KEY}='\"...\"')."
        )
    return password


def _ensure_secret_key(app: Flask) -> None:
    # Never a key written in the source: anyone who read it could sign a
    # staff session cookie and the console's CSRF tokens.
    if app.secret_key:
        return
    app.secret_key = secrets.token_urlsafe(32)
    logger.warning(
        "SECRET_KEY is not set: using a random key for this process, so staff "
        "sessions end when the shop restarts (and are not shared between worker "
        "processes). Set it (e.g. FLASK_SECRET_KEY) to keep them."
    )


def register_staff(app: Flask, hooks: OrderHooks) -> None:
    """Add the staff pages and let logged-in staff into the console."""
    _check_login_limit(app)
    # Unless the shop says where: this process's memory (without the warning
    # Flask-Limiter gives when it has to pick).
    app.config.setdefault("RATELIMIT_STORAGE_URI", "memory://")
    app.register_blueprint(staff)
    # One limiter per app: its storage and its counts are the app's own.
    limiter = Limiter(get_remote_address, app=app, headers_enabled=True)
    app.view_functions["staff.login"] = limiter.limit(
        _login_limit,
        methods=["POST"],
        # Only failures count: staff who log in are never locked out by it.
        deduct_when=lambda response: response.status_code == 401,
        on_breach=_too_many_logins,
    )(login)

    @hooks.console_access
    def shop_staff() -> bool | ResponseReturnValue:
        return True if is_staff() else _to_login()


# -- the session ----------------------------------------------------------------------


def is_staff() -> bool:
    return session.get(STAFF_SESSION_KEY) is True


def _to_login() -> ResponseReturnValue:
    return redirect(url_for("staff.login", next=request.full_path))


def staff_only(view: Callable[P, ResponseReturnValue]) -> Callable[P, ResponseReturnValue]:
    """Send anyone but logged-in staff to the login page first."""

    @wraps(view)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> ResponseReturnValue:
        return view(*args, **kwargs) if is_staff() else _to_login()

    return guarded


def csrf_token() -> str:
    """The token this session's forms carry, made on first use."""
    token = session.get(CSRF_SESSION_KEY)
    if not isinstance(token, str):
        token = secrets.token_urlsafe(32)
        session[CSRF_SESSION_KEY] = token
    return token


def _csrf_ok() -> bool:
    # Another site can make a browser post here but cannot read the token,
    # which lives in this site's signed session cookie and its pages.
    expected = session.get(CSRF_SESSION_KEY)
    given = request.form.get("csrf_token", "")
    return isinstance(expected, str) and hmac.compare_digest(
        given.encode("utf-8"), expected.encode("utf-8")
    )


def _password_matches(given: str) -> bool:
    expected = _configured_password(current_app)
    # compare_digest: the time taken says nothing about how much matched.
    return bool(expected) and hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


# -- where a login goes next -----------------------------------------------------------


def local_target(candidate: str | None) -> str | None:
    """``candidate`` when it is a page of this app, else None.

    A page of this app: a path that only a browser at this site can reach
    (see ``_LOCAL_PATH``), even after percent-decoding (``%2F%2Fhost``,
    ``%5C``), that a GET route of the app answers. Anything else, however
    it is spelled, is refused rather than repaired.
    """
    if not candidate or not all(
        _LOCAL_PATH.fullmatch(form) for form in (candidate, unquote(candidate))
    ):
        return None
    parts = urlsplit(candidate)
    if parts.scheme or parts.netloc or not _is_a_page(parts.path):
        return None
    return candidate


def _is_a_page(path: str) -> bool:
    adapter = current_app.url_map.bind_to_environ(request.environ)
    try:
        adapter.match(unquote(path), method="GET")
    except HTTPException:  # NotFound, MethodNotAllowed, RequestRedirect
        return False
    return True


# -- the pages ---------------------------------------------------------------------------


@staff.after_request
def _not_cached(response: Response) -> Response:
    # The staff pages show other people's orders: no shared cache keeps them.
    response.headers["Cache-Control"] = "no-store"
    return response


def _login_page(message: str | None, status: int) -> ResponseReturnValue:
    return render_template("login.html", message=message, csrf_token=csrf_token()), status


@staff.route("/login", methods=["GET", "POST"])
def login() -> ResponseReturnValue:
    if request.method == "GET":
        return _login_page(None, 200)
    if not _csrf_ok():
        return _login_page("The form expired; please log in again.", 400)
    if not _password_matches(request.form.get("password", "")):
        logger.warning("Staff login refused: wrong password (from %s).", request.remote_addr)
        return _login_page("Wrong password.", 401)
    # A new session: nothing from before the login (its CSRF token) carries over.
    session.clear()
    session[STAFF_SESSION_KEY] = True
    return redirect(local_target(request.args.get("next")) or url_for(DEFAULT_ENDPOINT))


def _login_limit() -> str:
    return str(current_app.config[LOGIN_LIMIT_KEY])


def _check_login_limit(app: Flask) -> None:
    """A limit Flask-Limiter cannot read fails here, at start, not as a 500
    at the first login."""
    limit = app.config.setdefault(LOGIN_LIMIT_KEY, DEFAULT_LOGIN_LIMIT)
    try:
        if not isinstance(limit, str) or not parse_many(limit):
            raise ValueError
    except ValueError:
        raise ValueError(
            f'{LOGIN_LIMIT_KEY} must be a limit such as "{DEFAULT_LOGIN_LIMIT}", not {limit!r}.'
        ) from None


def _too_many_logins(limit: RequestLimit) -> Response:
    logger.warning(
        "Staff login refused: too many failed logins from %s (at most %s).",
        request.remote_addr,
        limit.limit,
    )
    page = render_template(
        "login.html", message="Too many failed logins; try again later.", csrf_token=csrf_token()
    )
    return Response(page, status=429)


@staff.post("/logout")
def logout() -> ResponseReturnValue:
    if not _csrf_ok():
        return "The form expired; go back, reload the page and try again.", 400
    session.clear()
    return redirect(url_for("shop.index"))


@staff.get("/staff/")
@staff_only
def records() -> ResponseReturnValue:
    page: dict[str, Any] = recent_records()
    return render_template(
        "records.html",
        csrf_token=csrf_token(),
        console_on=CONSOLE_BLUEPRINT in current_app.blueprints,
        **page,
    )
