"""Signed callbacks for the system tests, one builder per route."""

from __future__ import annotations

from flask_orderhooks.testing import (
    SignedCallback,
    gateway_collect,
    gateway_payout,
    igv_order_status,
    sud_order_changed,
)
from tests.conftest import GATEWAY_KEYS, IGV_SECRET, SUD_APP_ID, SUD_APPS

#: The four routes, in the order a mixed batch cycles through them.
KINDS = ("igv", "collect", "payout", "sud")


def signed(kind: str, tag: str) -> SignedCallback:
    """A callback of ``kind`` whose idempotency key contains ``tag``."""
    if kind == "igv":
        return igv_order_status(IGV_SECRET, request_id=f"R{tag}")
    if kind == "collect":
        return gateway_collect(GATEWAY_KEYS["10001"], id=f"C{tag}", trans_id=f"T{tag}")
    if kind == "payout":
        return gateway_payout(GATEWAY_KEYS["10001"], id=f"P{tag}", trans_id=f"W{tag}")
    if kind == "sud":
        return sud_order_changed(SUD_APPS[SUD_APP_ID], app_id=SUD_APP_ID, notify_id=f"N{tag}")
    raise ValueError(f"Unknown kind {kind!r}; use one of {', '.join(KINDS)}.")


def mixed(count: int, run: str) -> list[SignedCallback]:
    """``count`` distinct callbacks cycling through the four routes."""
    return [signed(KINDS[i % len(KINDS)], f"{run}{i:05d}") for i in range(count)]
