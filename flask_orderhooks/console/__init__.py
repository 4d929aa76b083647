"""Placeholder: being written (owned by a helper session)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flask import Flask

if TYPE_CHECKING:
    from ..extension import AppState, OrderHooks


def register_console(app: Flask, hooks: OrderHooks, state: AppState) -> None:
    raise NotImplementedError("register_console is being written")
