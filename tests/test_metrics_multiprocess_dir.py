"""``PROMETHEUS_MULTIPROC_DIR`` as prometheus_client reads it: set but empty
is unset (a systemd ``Environment=PROMETHEUS_MULTIPROC_DIR=``, a compose file's
blank value), never "set too late"."""

from __future__ import annotations

from pathlib import Path

import pytest
from flask import Flask

from flask_orderhooks import OrderHooks
from flask_orderhooks.metrics import get_metrics
from tests.conftest import BASE_CONFIG


def test_an_empty_multiprocess_dir_is_process_local_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # prometheus_client chose its mode at import from the same value: empty
    # is no directory, so its values are in memory.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "")
    app = Flask("multiprocess_dir", instance_path=str(tmp_path))
    app.config.update(
        BASE_CONFIG,
        ORDERHOOKS_DATABASE_URI=f"sqlite:///{tmp_path / 'own.db'}",
        ORDERHOOKS_METRICS_URL="/metrics",
    )
    hooks = OrderHooks(app)
    try:
        metrics = get_metrics(app)
        assert metrics.multiprocess_dir is None
        assert repr(metrics) == "<Metrics process-local routes=4>"
        response = app.test_client().get("/metrics")
        assert response.status_code == 200
        assert "orderhooks_store_up 1.0" in response.text
    finally:
        standalone = hooks.state(app).standalone
        assert standalone is not None
        standalone.engine.dispose()
