"""A MySQL status column whose collation is not the connection's, a huge
metrics bucket, and muted operator signals (found by the final review of
session 13)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from flask import Flask

from flask_orderhooks.store import TABLE_NAME
from tests.conftest import MARIADB_URL, Recorder, private_database
from tests.test_durability import make, post, rows

RecorderFactory = Callable[..., tuple[Flask, Recorder]]


@pytest.fixture
def own_mariadb(mariadb_url: str) -> Iterator[str]:
    with private_database(MARIADB_URL, "orderhooks_review") as url:
        yield url


@pytest.mark.mariadb
@pytest.mark.parametrize("backend", ["mariadb"])
def test_claim_works_when_the_status_collation_is_not_the_connections(
    recorder: RecorderFactory, own_mariadb: str
) -> None:
    """The forced-replay fence compares CONCAT(status, ':', CAST(attempts AS
    CHAR)) with a parameter. CAST(... AS CHAR) takes collation_connection
    (IMPLICIT), the status column its own collation (IMPLICIT): when they
    differ (a table made before a server upgrade changed utf8mb4's default
    collation, a DBA's CONVERT TO ... COLLATE utf8mb4_unicode_ci) the CONCAT
    has no collation and the claim statement fails with 1267 'Illegal mix of
    collations' on every callback. feffe2a compared status alone: no error."""
    app, rec = recorder(host_db=False, ORDERHOOKS_DATABASE_URI=own_mariadb)
    engine = sa.create_engine(own_mariadb)
    with engine.begin() as connection:
        connection.exec_driver_sql(
            f"ALTER TABLE {TABLE_NAME} MODIFY status VARCHAR(16) "
            "CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci NOT NULL"
        )
    engine.dispose()
    cb = make("collect", app)
    answer = post(app, cb)
    assert answer.status_code == 200, answer.get_data(as_text=True)
    assert len(rec.events) == 1
    (row,) = rows(app)
    assert (row.status, row.attempts) == ("done", 1)


def _plain_app(tmp_path: Path, **config: object) -> Flask:
    from tests.conftest import BASE_CONFIG

    app = Flask("review_final", instance_path=str(tmp_path))
    app.config.update(BASE_CONFIG)
    app.config.update(config)
    return app


def test_a_huge_integer_bucket_is_a_configuration_error(tmp_path: Path) -> None:
    """metrics._buckets calls math.isfinite() on an int: 10**400 (a JSON
    number of 400 digits from from_prefixed_env) raises OverflowError, where
    the session fixed the same thing for durations and retry delays and the
    docs promise ConfigurationError naming the key."""
    from flask_orderhooks import OrderHooks
    from flask_orderhooks.exc import ConfigurationError

    app = _plain_app(
        tmp_path, ORDERHOOKS_METRICS_URL="/metrics", ORDERHOOKS_METRICS_BUCKETS=[0.1, 10**400]
    )
    with pytest.raises(ConfigurationError) as info:
        OrderHooks(app)
    assert info.value.key == "ORDERHOOKS_METRICS_BUCKETS"
    assert "orderhooks" not in app.extensions


def test_a_muted_operator_signal_calls_no_receiver() -> None:
    """blinker's Signal.muted() (1.7+) stops send(); _tell_operators iterates
    receivers_for() itself and ignores is_muted, so `with
    delivery_failed.muted():` (a host's test, a maintenance script) no longer
    keeps a pager quiet as it did when _failed called send()."""
    from datetime import UTC, datetime
    from types import SimpleNamespace

    from flask_orderhooks.extension import _tell_operators
    from flask_orderhooks.signals import delivery_failed

    app = Flask("review_muted")
    heard: list[object] = []

    def pager(sender: object, **kwargs: object) -> None:
        heard.append(kwargs)

    delivery = SimpleNamespace(provider="igv", callback="order_pending", key="K1")
    delivery_failed.connect(pager, app)
    try:
        with delivery_failed.muted():
            _tell_operators(
                app,
                delivery_failed,
                delivery,  # type: ignore[arg-type]
                error="x",
                next_attempt_at=datetime.now(UTC),
            )
    finally:
        delivery_failed.disconnect(pager, app)
    assert heard == []
