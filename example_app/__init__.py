"""The example shop: how a host application uses flask-orderhooks.

Run it with ``flask --app example_app run`` (the receivers' URLs are under
``/orderhooks``), or watch it receive one callback of each kind with
``./scripts/demo``.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping
from typing import Any

from flask import Flask

from flask_orderhooks import OrderHooks

from .models import db
from .receivers import register_receivers
from .staff import prepare_staff, register_staff
from .views import shop

__all__ = ["DEMO_SECRETS", "create_app", "db"]

logger = logging.getLogger(__name__)

#: DEMO ONLY, never in production: these secrets are public (they are the
#: test suite's), so anyone can sign callbacks with them. They are used only
#: when ``SHOP_DEMO_SECRETS`` is true, as ``./scripts/demo`` sets it; set the
#: real ones through ``create_app(config)`` or the environment (see
#: :func:`create_app`).
DEMO_SECRETS: dict[str, Any] = {
    "ORDERHOOKS_IGV_SECRET": "aBcDeFgHiJkLmNoPqRsTuVwXyZ012345",
    "ORDERHOOKS_GATEWAY_KEY": {"10001": "merchant-key"},
    "ORDERHOOKS_SUD_APPS": {"1461564080052506636": "app-secret"},
    "ORDERHOOKS_STANDARD_WEBHOOKS": {"billing": "whsec_ZGVtby1vbmx5LXN0YW5kYXJkLXdlYmhvb2tz"},
}
# Never here: SECRET_KEY and SHOP_STAFF_PASSWORD. A public session key lets
# anyone sign a staff session (and the console's CSRF tokens); a public
# password lets anyone log in. See staff.prepare_staff.


def create_app(
    config: Mapping[str, Any] | None = None,
    *,
    instance_path: str | os.PathLike[str] | None = None,
) -> Flask:
    """Create the shop.

    Config is read in this order, each overriding the one before: the
    defaults (SQLite in the instance folder), ``FLASK_*`` environment
    variables (``FLASK_ORDERHOOKS_IGV_SECRET=...``; values are read as JSON
    when they parse, so ``FLASK_ORDERHOOKS_GATEWAY_KEY='{"10001": "..."}'``
    gives a mapping and a secret made of digits must be quoted), then
    ``config``.

    The callback secrets have no default: a platform without its secret is
    off (its routes answer 404). ``SHOP_DEMO_SECRETS=True`` (in the
    environment, ``FLASK_SHOP_DEMO_SECRETS=true``) fills in the public
    :data:`DEMO_SECRETS` for every secret not set; a secret that is set wins
    whole, its demo mapping is never merged into it.

    The staff login, the staff page and the operator console are on only
    when ``SHOP_STAFF_PASSWORD`` is set; their sessions are signed with
    ``SECRET_KEY``, a random one for this process when it is not set.

    :param config: config values, e.g. from a test.
    :param instance_path: the instance folder (default: ``instance/`` beside
        the package), where the SQLite database lives.
    """
    app = Flask(
        __name__,
        instance_path=os.path.abspath(instance_path) if instance_path is not None else None,
    )
    app.config["SQLALCHEMY_DATABASE_URI"] = "sqlite:///" + os.path.join(
        app.instance_path, "shop.sqlite3"
    )
    app.config["SHOP_DEMO_SECRETS"] = False
    # The operator console, for the shop's staff (see staff.py); off without
    # a staff password.
    app.config["ORDERHOOKS_CONSOLE_URL"] = "/orderhooks/console"
    # The staff session cookie stays home when another site posts a form here.
    app.config["SESSION_COOKIE_SAMESITE"] = "Lax"
    app.config.from_prefixed_env()
    app.config.update(config or {})
    # After the environment and config: a secret set there wins whole. Were
    # the demo mappings defaults, a nested environment key
    # (FLASK_ORDERHOOKS_SUD_APPS__<id>) would add the real app to them, and
    # the public demo app would still sign callbacks.
    _fill_in_demo_secrets(app)
    os.makedirs(app.instance_path, exist_ok=True)
    # Before OrderHooks: the console it registers needs the SECRET_KEY.
    staff_on = prepare_staff(app)

    db.init_app(app)
    # db=db: the deliveries table joins db.metadata and the receivers' writes
    # commit together with the delivery record.
    hooks = OrderHooks(app, db=db)
    register_receivers(app)
    app.register_blueprint(shop)
    if staff_on:
        register_staff(app, hooks)

    with app.app_context():
        # Enough for an example; a real shop runs Flask-Migrate migrations,
        # which see the deliveries table because it is in db.metadata.
        db.create_all()

    if not app.testing:
        _warn_about_secrets(app)
    return app


def _fill_in_demo_secrets(app: Flask) -> None:
    wanted = app.config["SHOP_DEMO_SECRETS"]
    # Not bool(wanted): FLASK_SHOP_DEMO_SECRETS=false read as the string
    # "False" (or a typo) must not turn public secrets on.
    if not isinstance(wanted, bool):
        raise ValueError(
            f"SHOP_DEMO_SECRETS must be true or false, not a {type(wanted).__name__} "
            "(in the environment: FLASK_SHOP_DEMO_SECRETS=true)."
        )
    if wanted:
        for key, value in DEMO_SECRETS.items():
            if key not in app.config:
                # A copy: the module's mappings stay as they are.
                app.config[key] = copy.deepcopy(value)


def _warn_about_secrets(app: Flask) -> None:
    demo_keys = [key for key in DEMO_SECRETS if _uses_demo_secret(key, app.config.get(key))]
    if demo_keys:
        logger.warning(
            "DEMO-ONLY secrets in use (%s): anyone can sign these callbacks. "
            "Set real ones before going live.",
            ", ".join(demo_keys),
        )
    elif not any(app.config.get(key) for key in DEMO_SECRETS):
        logger.warning(
            "No callback secret is set, so every platform is off and its routes "
            "answer 404. Set the real ones (e.g. FLASK_ORDERHOOKS_GATEWAY_KEY in the "
            "environment), or SHOP_DEMO_SECRETS=true for the public demo ones."
        )


def _uses_demo_secret(key: str, value: object) -> bool:
    demo = DEMO_SECRETS[key]
    if isinstance(demo, dict):
        return isinstance(value, Mapping) and any(
            _holds(value.get(name), secret) for name, secret in demo.items()
        )
    return _holds(value, demo)


def _holds(value: object, secret: str) -> bool:
    # A list is a rotation of secrets, oldest first.
    return value == secret or (isinstance(value, (list, tuple)) and secret in value)
