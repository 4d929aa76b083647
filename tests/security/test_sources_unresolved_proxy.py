"""An allow list read through a proxy the app does not resolve.

Behind nginx on the same machine without ProxyFix, ``remote_addr`` is the
proxy's (loopback). An operator who then lists loopback so that callbacks
get through has a list that lets every client of the proxy in. Callbacks are
not refused for it (the signature still decides; refusing the platform's own
callbacks would lose them), but it is said loudly, once per process and
platform.
"""

from __future__ import annotations

import logging

import pytest

from flask_orderhooks.testing import gateway_collect

from .conftest import TargetFactory
from .support import GATEWAY_KEYS, MERCHANT_A

_UNRESOLVED = "came through a proxy (X-Forwarded-Proto header) whose client the app does not"


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "flask_orderhooks" and r.levelno == logging.WARNING
    ]


def test_an_allowed_proxy_address_is_warned_of_once(
    make_target: TargetFactory, caplog: pytest.LogCaptureFixture
) -> None:
    target = make_target(ORDERHOOKS_ALLOWED_IPS={"gateway": ["127.0.0.1"]})
    environ = {"REMOTE_ADDR": "127.0.0.1", "HTTP_X_FORWARDED_PROTO": "https"}
    with caplog.at_level(logging.WARNING, logger="flask_orderhooks"):
        for n in range(3):
            cb = gateway_collect(GATEWAY_KEYS[str(MERCHANT_A)], id=f"proxied-{n}")
            target.accept_cb(cb, environ_base=environ)
    warned = [m for m in _warnings(caplog) if _UNRESOLVED in m]
    assert len(warned) == 1, _warnings(caplog)
    assert warned[0].startswith("gateway: ORDERHOOKS_ALLOWED_IPS allowed 127.0.0.1,")
    assert "ProxyFix" in warned[0]


def test_a_direct_client_of_an_allowed_address_is_not_warned_of(
    make_target: TargetFactory, caplog: pytest.LogCaptureFixture
) -> None:
    target = make_target(ORDERHOOKS_ALLOWED_IPS={"gateway": ["127.0.0.1"]})
    with caplog.at_level(logging.WARNING, logger="flask_orderhooks"):
        cb = gateway_collect(GATEWAY_KEYS[str(MERCHANT_A)], id="direct-1")
        target.accept_cb(cb, environ_base={"REMOTE_ADDR": "127.0.0.1"})
    assert not [m for m in _warnings(caplog) if "proxy" in m]


def test_a_platform_without_a_list_is_not_warned_of(
    make_target: TargetFactory, caplog: pytest.LogCaptureFixture
) -> None:
    target = make_target()
    environ = {"REMOTE_ADDR": "127.0.0.1", "HTTP_X_FORWARDED_FOR": "203.0.113.9"}
    with caplog.at_level(logging.WARNING, logger="flask_orderhooks"):
        cb = gateway_collect(GATEWAY_KEYS[str(MERCHANT_A)], id="unlisted-1")
        target.accept_cb(cb, environ_base=environ)
    assert not [m for m in _warnings(caplog) if "proxy" in m]
