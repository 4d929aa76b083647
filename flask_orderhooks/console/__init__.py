"""The operator console: the deliveries as support staff read them, and the
replay and "retry now" buttons.

Off unless ``ORDERHOOKS_CONSOLE_URL`` is set; closed to everyone until the
host registers an access function with :meth:`OrderHooks.console_access`.
See ``docs/console.rst``.

.. versionadded:: 0.3
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flask import Flask

from ..config import URL_PATH
from ..exc import ConfigurationError
from .views import BLUEPRINT, CONTENT_SECURITY_POLICY, ConsoleSettings, make_blueprint

if TYPE_CHECKING:
    from ..extension import AppState, OrderHooks

__all__ = [
    "BLUEPRINT",
    "CONTENT_SECURITY_POLICY",
    "DEFAULTS",
    "ConsoleSettings",
    "load_settings",
    "register_console",
]

#: The console's own config keys, beside ``ORDERHOOKS_CONSOLE_URL``.
DEFAULTS: dict[str, Any] = {
    # Deliveries per page of the list.
    "ORDERHOOKS_CONSOLE_PAGE_SIZE": 50,
    # Seconds a page's forms stay usable (their CSRF token's lifetime).
    "ORDERHOOKS_CONSOLE_CSRF_MAX_AGE": 3600,
}


def _whole_number(config: Any, key: str, low: int, high: int) -> int:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigurationError(
            key, f"must be a whole number from {low} to {high}, not {value!r}."
        )
    return value


def load_settings(app: Flask) -> ConsoleSettings:
    """Read and check the console's config.

    :raises ConfigurationError: a value is wrong, or ``SECRET_KEY`` is unset.
    """
    for key, value in DEFAULTS.items():
        app.config.setdefault(key, value)
    url = app.config["ORDERHOOKS_CONSOLE_URL"]
    # Not "/": the console's /static would be the app's own static route.
    if not isinstance(url, str) or not URL_PATH.fullmatch(url) or not url.strip("/"):
        raise ConfigurationError(
            "ORDERHOOKS_CONSOLE_URL",
            f"must be a URL path below the root such as '/orderhooks/console', not {url!r}.",
        )
    if not app.secret_key:
        raise ConfigurationError(
            "SECRET_KEY",
            "the operator console (ORDERHOOKS_CONSOLE_URL) signs its forms' CSRF tokens "
            "and keeps them in the session: set the app's SECRET_KEY.",
        )
    return ConsoleSettings(
        url=url.rstrip("/") or "/",
        page_size=_whole_number(app.config, "ORDERHOOKS_CONSOLE_PAGE_SIZE", 1, 1000),
        csrf_max_age=_whole_number(app.config, "ORDERHOOKS_CONSOLE_CSRF_MAX_AGE", 60, 7 * 86400),
    )


def register_console(
    app: Flask, hooks: OrderHooks, state: AppState, settings: ConsoleSettings
) -> None:
    """Register the console's blueprint at ``settings.url`` (called by
    :meth:`OrderHooks.init_app` when ``ORDERHOOKS_CONSOLE_URL`` is set, with
    the settings :func:`load_settings` read before anything was registered)."""
    app.register_blueprint(make_blueprint(hooks, state, settings), url_prefix=settings.url)
