"""SUD app ids: one app given twice is refused at start-up."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from flask_orderhooks import ConfigurationError, OrderHooks


def _init(tmp_path: Path, **config: Any) -> OrderHooks:
    app = Flask("sud_app_given_twice", instance_path=str(tmp_path))
    app.config.update(config)
    return OrderHooks(app)


def test_one_sud_app_id_given_twice_is_refused(tmp_path: Path) -> None:
    """1 and "1" are one app: one secret was dropped without a word, and
    every callback signed with it refused (401)."""
    with pytest.raises(ConfigurationError) as info:
        _init(tmp_path, ORDERHOOKS_SUD_APPS={1: "old-secret", "1": "new-secret"})
    assert str(info.value) == "ORDERHOOKS_SUD_APPS: the app id '1' is given twice."
