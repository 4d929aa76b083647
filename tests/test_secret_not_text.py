"""A secret that is not text fails init_app naming its key, never holding it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from flask_orderhooks import ConfigurationError, OrderHooks


def _init(tmp_path: Path, **config: Any) -> OrderHooks:
    app = Flask("secret_not_text", instance_path=str(tmp_path))
    app.config.update(config)
    return OrderHooks(app)


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("ORDERHOOKS_IGV_SECRET", "s3cr\udcffet-from-the-env", "ORDERHOOKS_IGV_SECRET"),
        (
            "ORDERHOOKS_GATEWAY_KEY",
            {"10001": ["ok", "k\udcffey"]},
            "ORDERHOOKS_GATEWAY_KEY['10001']",
        ),
        ("ORDERHOOKS_SUD_APPS", {"1": "s\udcffecret"}, "ORDERHOOKS_SUD_APPS['1']"),
    ],
)
def test_a_secret_that_is_not_text_names_the_key_not_the_secret(
    tmp_path: Path, key: str, value: object, named: str
) -> None:
    """A byte that is not UTF-8 in an environment variable reaches Python as
    a lone surrogate. It raised UnicodeEncodeError, whose ``object`` is the
    whole secret (what an error tracker's report shows), naming no key."""
    with pytest.raises(ConfigurationError) as info:
        _init(tmp_path, **{key: value})
    assert str(info.value) == (
        f"{named}: a secret is not UTF-8 text (a byte of another encoding in an "
        "environment variable or a file?); set it again."
    )
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__
