"""Config forms, start-up failures that name the key, registration rules, reprs."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_orderhooks import ConfigurationError, OrderHooks, get_extension
from flask_orderhooks.builtin import BUILTIN_PROVIDERS
from flask_orderhooks.config import OPTIONAL_KEYS, known_keys
from flask_orderhooks.console import DEFAULTS as CONSOLE_DEFAULTS
from flask_orderhooks.metrics import METRICS_DEFAULTS
from tests.conftest import BASE_CONFIG, IGV_SECRET


def make(tmp_path: Path, **config: Any) -> Flask:
    app = Flask("config", instance_path=str(tmp_path))
    app.config.update(BASE_CONFIG)
    app.config.update(config)
    return app


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("ORDERHOOKS_IGV_SECRET", "", "a secret is empty; remove it or set a real secret."),
        ("ORDERHOOKS_IGV_SECRET", "   ", "a secret is empty; remove it or set a real secret."),
        (
            "ORDERHOOKS_IGV_SECRET",
            "s" * 32 + "\n",
            "a secret starts or ends with whitespace (a newline from a file?); strip it.",
        ),
        (
            "ORDERHOOKS_GATEWAY_KEY",
            {"10001": [" old-key", "new-key"]},
            "a secret starts or ends with whitespace (a newline from a file?); strip it.",
        ),
        ("ORDERHOOKS_IGV_SECRET", [], "the list of secrets is empty; give at least one."),
        (
            "ORDERHOOKS_IGV_SECRET",
            12345,
            "must be a string or a list of strings (oldest first), not int.",
        ),
        ("ORDERHOOKS_IGV_SECRET", ["ok", 5], "every secret must be a string, not int."),
        ("ORDERHOOKS_GATEWAY_KEY", {}, "the merchant mapping is empty; give {mch_id: key}."),
        ("ORDERHOOKS_GATEWAY_KEY", {1.5: "k"}, "merchant ids must be strings or integers."),
        ("ORDERHOOKS_SUD_APPS", "secret", "must be a non-empty mapping {app_id: secret or list}."),
        ("ORDERHOOKS_SUD_APPS", {"": "s"}, "app ids must be non-empty strings."),
        ("ORDERHOOKS_SUD_VERIFY", "no", "must be True or False."),
        ("ORDERHOOKS_SUD_TIMESTAMP_UNIT", "us", 'must be "ms" or "s", not \'us\'.'),
        (
            "ORDERHOOKS_SUD_FAILURE_HTTP_STATUS",
            True,
            "must be None or an HTTP status from 200 to 599, not True.",
        ),
        (
            "ORDERHOOKS_SUD_FAILURE_HTTP_STATUS",
            "200",
            "must be None or an HTTP status from 200 to 599, not '200'.",
        ),
        (
            "ORDERHOOKS_SUD_FAILURE_HTTP_STATUS",
            199,
            "must be None or an HTTP status from 200 to 599, not 199.",
        ),
        (
            "ORDERHOOKS_GATEWAY_SIGN_TEMPLATE",
            "{params}",
            "must contain {params} and {key} exactly once each.",
        ),
        (
            "ORDERHOOKS_GATEWAY_SIGN_TEMPLATE",
            "{params}{key}{other}",
            "may only use the fields {params} and {key} (KeyError).",
        ),
        ("ORDERHOOKS_GATEWAY_SIGN_TEMPLATE", 5, 'must be a string such as "{params}&key={key}".'),
        ("ORDERHOOKS_IGV_MAX_AGE", "1h", "must be a number of seconds or None, not str."),
        ("ORDERHOOKS_IGV_MAX_AGE", -1, "must be a finite number of seconds, zero or more."),
        # No callback arrives in the instant it was signed: every one refused (401).
        ("ORDERHOOKS_IGV_MAX_AGE", 0, "must be more than zero seconds, or None."),
        ("ORDERHOOKS_SUD_MAX_AGE", 0.0, "must be more than zero seconds, or None."),
        ("ORDERHOOKS_STANDARD_WEBHOOKS_TOLERANCE", 0, "must be more than zero seconds."),
        ("ORDERHOOKS_DUPLICATE_WAIT", None, "must be a number of seconds, not NoneType."),
        # PostgreSQL refused the wait's lock_timeout at every callback (503).
        (
            "ORDERHOOKS_DUPLICATE_WAIT",
            3601,
            "must be at most 3600 seconds (an hour).",
        ),
        # An idle worker's wait overflowed (OverflowError).
        ("ORDERHOOKS_WORKER_POLL_INTERVAL", 1e10, "must be at most 3600 seconds (an hour)."),
        # Dates past the year 9999: a failed attempt's record overflowed (500).
        (
            "ORDERHOOKS_RETRY_DELAYS",
            [10, 1e15],
            "every delay must be at most 3153600000 seconds (36500 days).",
        ),
        (
            "ORDERHOOKS_CLAIM_TIMEOUT",
            1e15,
            "must be at most 3153600000 seconds (36500 days).",
        ),
        ("ORDERHOOKS_IGV_MAX_AGE", 1e15, "must be at most 3153600000 seconds (36500 days)."),
        ("ORDERHOOKS_MAX_CLOCK_SKEW", 1e15, "must be at most 3153600000 seconds (36500 days)."),
        ("ORDERHOOKS_CLAIM_TIMEOUT", 0, "must be more than zero seconds."),
        ("ORDERHOOKS_MAX_BODY", 0, "must be a positive number of bytes."),
        (
            "ORDERHOOKS_URL_PREFIX",
            "hooks",
            'must be a path starting with "/" and without URL variables, such as '
            '"/orderhooks", or "" for none.',
        ),
        ("ORDERHOOKS_DATABASE_URI", "", "must be a SQLAlchemy database URL string or None."),
        (
            "ORDERHOOKS_ALLOWED_IPS",
            ["1.2.3.4"],
            'must be a mapping such as {"<provider>": ["203.0.113.0/24"]}, or None.',
        ),
        (
            "ORDERHOOKS_ALLOWED_IPS",
            {"paypal": ["1.2.3.4"]},
            "unknown platform 'paypal'; use one of igv, gateway, sud, standard.",
        ),
    ],
)
def test_bad_config_fails_in_init_app_naming_the_key(
    key: str, value: Any, message: str, tmp_path: Path
) -> None:
    app = make(tmp_path, **{key: value})
    with pytest.raises(ConfigurationError) as info:
        OrderHooks(app)
    assert info.value.key.startswith(key)
    assert str(info.value).endswith(message)
    assert "orderhooks" not in app.extensions


def test_nested_keys_are_named_precisely(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"^ORDERHOOKS_GATEWAY_KEY\['10001'\]: a secret"):
        OrderHooks(make(tmp_path, ORDERHOOKS_GATEWAY_KEY={"10001": ""}))
    with pytest.raises(
        ConfigurationError, match=r"^ORDERHOOKS_ALLOWED_IPS\['igv'\]: 'nope' is not"
    ):
        OrderHooks(make(tmp_path, ORDERHOOKS_ALLOWED_IPS={"igv": ["nope"]}))
    with pytest.raises(
        ConfigurationError, match=r"^ORDERHOOKS_ALLOWED_IPS\['igv'\]: must be a non"
    ):
        OrderHooks(make(tmp_path, ORDERHOOKS_ALLOWED_IPS={"igv": "10.0.0.0/8"}))


def test_config_errors_never_show_the_secret(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as info:
        OrderHooks(make(tmp_path, ORDERHOOKS_IGV_SECRET=["real-secret-value", 7]))
    assert "real-secret-value" not in str(info.value)


def test_a_misspelt_key_is_logged_with_the_key_it_resembles(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing reads a misspelt key, so its platform stays off (404) with no
    error: the log names it, and the key it most likely meant."""
    app = make(tmp_path, ORDERHOOKS_IGV_SECRETS="s" * 32, ORDERHOOKS_NOT_A_THING=1)
    del app.config["ORDERHOOKS_IGV_SECRET"]
    with caplog.at_level(logging.WARNING, "flask_orderhooks"):
        OrderHooks(app)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "OrderHooks: ORDERHOOKS_IGV_SECRETS is not a setting of flask-orderhooks or of its "
        "providers; it is ignored. Did you mean ORDERHOOKS_IGV_SECRET?",
        "OrderHooks: ORDERHOOKS_NOT_A_THING is not a setting of flask-orderhooks or of its "
        "providers; it is ignored.",
    ]
    assert app.test_client().post("/orderhooks/igv/order-status").status_code == 404


def test_every_documented_key_is_known() -> None:
    """The keys docs/config.rst documents are the ones the unknown-key check
    knows, and the optional parts' keys config.py names are exactly the ones
    those parts read."""
    assert set(OPTIONAL_KEYS) == {*CONSOLE_DEFAULTS, *METRICS_DEFAULTS}
    page = (Path(__file__).parents[1] / "docs" / "config.rst").read_text()
    documented = set(re.findall(r"^\.\. data:: (ORDERHOOKS_\w+)$", page, re.MULTILINE))
    assert len(documented) > 20
    known = known_keys(p.config_defaults for p in BUILTIN_PROVIDERS)
    assert documented == known


def test_defaults_are_set_in_app_config(tmp_path: Path) -> None:
    app = make(tmp_path)
    OrderHooks(app)
    assert app.config["ORDERHOOKS_URL_PREFIX"] == "/orderhooks"
    assert app.config["ORDERHOOKS_IGV_MAX_AGE"] == 3600
    assert app.config["ORDERHOOKS_DUPLICATE_WAIT"] == 3.0
    assert app.config["ORDERHOOKS_CLAIM_TIMEOUT"] == 30.0
    assert app.config["ORDERHOOKS_MAX_BODY"] == 65536
    assert app.config["ORDERHOOKS_GATEWAY_SIGN_TEMPLATE"] == "{params}&key={key}"


def test_init_app_later_and_per_app_state(tmp_path: Path) -> None:
    hooks = OrderHooks()
    first, second = make(tmp_path / "a"), make(tmp_path / "b", ORDERHOOKS_URL_PREFIX="/b")
    hooks.init_app(first)
    hooks.init_app(second)
    assert get_extension(first) is hooks and get_extension(second) is hooks
    assert hooks.state(first).settings.url_prefix == "/orderhooks"
    assert hooks.state(second).settings.url_prefix == "/b"
    with second.app_context():
        assert hooks.store is hooks.state(second).store


def test_second_registration_says_how_to_fix(tmp_path: Path) -> None:
    app = make(tmp_path)
    OrderHooks(app)
    with pytest.raises(RuntimeError, match="already registered on this app"):
        OrderHooks(app)


def test_missing_init_app_says_how_to_fix(tmp_path: Path) -> None:
    app = make(tmp_path)
    with pytest.raises(RuntimeError, match=r"Call hooks.init_app\(app\)"):
        OrderHooks().state(app)
    with pytest.raises(RuntimeError, match=r"Call hooks.init_app\(app\)"):
        get_extension(app)


def test_create_all_refuses_a_host_owned_table(tmp_path: Path) -> None:
    app = make(tmp_path, SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path}/h.db")
    db = SQLAlchemy(app)
    hooks = OrderHooks(app, db=db)
    with pytest.raises(RuntimeError, match=r"run db.create_all\(\)"):
        hooks.create_all(app)
    with app.app_context():
        db.create_all()
        assert sa.inspect(db.engine).has_table("orderhooks_deliveries")
        db.engine.dispose()


def test_reprs_hide_secrets(tmp_path: Path) -> None:
    app = make(
        tmp_path,
        ORDERHOOKS_GATEWAY_KEY={"10001": ["old-merchant-key", "merchant-key"]},
        ORDERHOOKS_DATABASE_URI="postgresql+psycopg://user:db-password@127.0.0.1:9/x",
    )
    hooks = OrderHooks(app)
    state = hooks.state(app)
    text = " ".join(
        [repr(hooks), repr(state), repr(state.settings), str(state.settings), repr(state.store)]
        + [repr(p) for p in state.providers.values()]
        # Everything a provider holds, its secrets included.
        + [repr(vars(p)) for p in state.providers.values()]
    )
    for secret in (IGV_SECRET, "merchant-key", "app-secret", "db-password"):
        assert secret not in text
    assert "<Secrets: 1 hidden>" in text and "<Secrets: 2 hidden>" in text


def test_flask_migrate_sees_the_table_in_host_metadata(tmp_path: Path) -> None:
    """Autogenerate compares db.metadata with the database: the table must be in it."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    app = make(tmp_path, SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path}/m.db")
    db = SQLAlchemy(app)
    OrderHooks(app, db=db)
    with app.app_context(), db.engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), db.metadata)
        added = {d[1].name for d in diff if d[0] == "add_table"}
    assert added == {"orderhooks_deliveries"}
    with app.app_context():
        db.engine.dispose()


def test_the_stores_repr_outside_an_app_context(tmp_path: Path) -> None:
    """With ``db=`` the store's engine is the host's, known only inside an
    app context: its repr must not resolve it (before, it raised "Working
    outside of application context", so any log line or debugger showing
    the store did)."""
    app = make(tmp_path, SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path / 'host.sqlite3'}")
    db = SQLAlchemy(app)
    hooks = OrderHooks(app, db=db)
    store = hooks.state(app).store
    assert repr(store) == "<DeliveryStore (the host's engine) table='orderhooks_deliveries'>"
    with app.app_context():
        assert store.dialect == "sqlite"
        assert repr(store) == "<DeliveryStore sqlite table='orderhooks_deliveries'>"
        db.engine.dispose()
