"""CSRF tokens for the console's forms: signed with the app's secret key,
bound to a random value kept in the operator's session, and expiring."""

from __future__ import annotations

import hmac
import secrets

from flask import Flask, session
from itsdangerous import BadData, URLSafeTimedSerializer

#: The itsdangerous salt: a token made for the console is worth nothing to
#: any other signer using the same ``SECRET_KEY``, and the reverse.
SALT = "orderhooks-console-csrf"
#: The session key holding the value tokens are bound to.
SESSION_KEY = "_orderhooks_console_csrf"


def _serializer(app: Flask) -> URLSafeTimedSerializer:
    # Oldest to newest, as itsdangerous wants: tokens signed before a key
    # rotation (SECRET_KEY_FALLBACKS) stay valid until they expire.
    keys = [*(app.config.get("SECRET_KEY_FALLBACKS") or []), app.secret_key]
    return URLSafeTimedSerializer([key for key in keys if key], salt=SALT)


def token(app: Flask) -> str:
    """A token for the current session, creating the session's value if needed."""
    value = session.get(SESSION_KEY)
    if not isinstance(value, str):
        value = secrets.token_urlsafe(32)
        session[SESSION_KEY] = value
    return _serializer(app).dumps(value)


def is_valid(app: Flask, given: str | None, max_age: int) -> bool:
    """Whether ``given`` was made by :func:`token` for this session, less than
    ``max_age`` seconds ago."""
    expected = session.get(SESSION_KEY)
    if not given or not isinstance(expected, str):
        return False
    try:
        value = _serializer(app).loads(given, max_age=max_age)
    except BadData:
        return False
    if not isinstance(value, str):
        return False
    return hmac.compare_digest(value.encode("utf-8"), expected.encode("utf-8"))
