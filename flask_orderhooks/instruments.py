"""Where the pipeline reports what it did, for metrics and other observers.

The request path calls these hooks on every callback, so they cost one
attribute read and a loop over an empty tuple when nobody observes: metrics
are an extra (``flask-orderhooks[metrics]``), and an app without them must
not pay for them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

logger = logging.getLogger("flask_orderhooks")


class Observer(Protocol):
    """Hears about answers, dispatches and worker attempts.

    Every method must be cheap and must not raise; one that raises is logged
    and changes nothing (the callback's answer and the store are decided
    before observers hear of them).
    """

    def answered(self, provider: str, callback: str, status: int) -> None:
        """A callback request was answered with HTTP ``status``."""

    def dispatched(self, provider: str, callback: str, outcome: str, seconds: float) -> None:
        """The receivers of one delivery ran for ``seconds``: ``"done"`` when
        every one returned, ``"failed"`` when one raised (or none listens)."""

    def attempted(self, provider: str, callback: str, outcome: str) -> None:
        """A worker (or the Celery task) finished one attempt: ``"done"`` or ``"failed"``."""


class Instruments:
    """The observers of one app; the pipeline reports to them."""

    __slots__ = ("observers",)

    def __init__(self) -> None:
        self.observers: tuple[Observer, ...] = ()

    def add(self, observer: Observer) -> None:
        self.observers = (*self.observers, observer)

    def answered(self, provider: str, callback: str, status: int) -> None:
        for observer in self.observers:
            _safely(observer.answered, provider, callback, status)

    def dispatched(self, provider: str, callback: str, outcome: str, seconds: float) -> None:
        for observer in self.observers:
            _safely(observer.dispatched, provider, callback, outcome, seconds)

    def attempted(self, provider: str, callback: str, outcome: str) -> None:
        for observer in self.observers:
            _safely(observer.attempted, provider, callback, outcome)

    def timed(self, provider: str, callback: str, run: Callable[[], None]) -> Callable[[], None]:
        """``run`` reporting its duration and outcome, when anyone observes."""
        if not self.observers:
            return run

        def timed_run() -> None:
            started = time.perf_counter()
            try:
                run()
            except BaseException:
                self.dispatched(provider, callback, "failed", time.perf_counter() - started)
                raise
            self.dispatched(provider, callback, "done", time.perf_counter() - started)

        return timed_run


def _safely(method: Callable[..., None], *args: object) -> None:
    try:
        method(*args)
    except Exception:
        logger.exception("OrderHooks: an observer raised (ignored)")
