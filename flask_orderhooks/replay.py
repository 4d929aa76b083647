"""Replaying a stored delivery by hand: what ``flask orderhooks replay`` and
the operator console's buttons both run, so the two can never disagree."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from flask import Flask

from .exc import CallbackError
from .logtext import for_log
from .store import DONE, StoredDelivery
from .views import send

if TYPE_CHECKING:
    from .extension import AppState

logger = logging.getLogger("flask_orderhooks")

#: How a replay ended: dispatched and done; not dispatched because it is done
#: already (without ``force``); or failed (not configured, no longer verifies,
#: a receiver raised, the store is down).
ReplayStatus = Literal["done", "already_done", "failed"]


@dataclass(frozen=True)
class ReplayOutcome:
    """What a replay did, and the sentence that tells an operator."""

    status: ReplayStatus
    message: str
    #: The attempt this replay made, if it made one.
    attempt: int | None = None

    @property
    def ok(self) -> bool:
        """Whether nothing went wrong (done, or done already)."""
        return self.status != "failed"


def replay(app: Flask, state: AppState, row: StoredDelivery, *, force: bool) -> ReplayOutcome:
    """Verify ``row`` again (without the timestamp window) and dispatch it now.

    A done delivery is dispatched again only with ``force``, and only if
    ``row`` was read as done: ``force`` never takes over a delivery that
    became done since ``row`` was read (a worker finished it while
    ``replay --failed --force`` went through its list), which would dispatch
    it a second time. Runs inside an app context of ``app``; the outcome is
    also recorded in the store (done, or failed with the error) exactly as
    any other attempt.
    """
    if row.status == DONE and not force:
        return ReplayOutcome("already_done", "already done; not replayed.")
    if row.compacted_at is not None:
        return ReplayOutcome(
            "failed",
            f"compacted by purge at {row.compacted_at:%Y-%m-%d %H:%M:%S} UTC: its body is "
            "gone; not replayed.",
        )
    provider = state.providers.get(row.provider)
    if provider is None:
        return ReplayOutcome(
            "failed", f"the {row.provider} platform is not configured; not replayed."
        )
    try:
        delivery = provider.read(row.callback, row.body, row.headers, now=None)
    except CallbackError as exc:
        return ReplayOutcome("failed", f"failed: {exc.reason}")
    except Exception as exc:
        # A provider's own error: reported, not raised, so that a replay of
        # many rows (--failed) goes on with the next one.
        logger.exception(
            "%s %s %s: replay: the provider failed to read it",
            row.provider,
            row.callback,
            for_log(row.key),
        )
        return ReplayOutcome(
            "failed",
            f"failed: the {row.provider} provider could not read it ({type(exc).__name__}).",
        )
    try:
        # Forced only over the done row the caller saw: ``row`` may be stale.
        claim = state.store.claim(delivery, force=force and row.status == DONE)
        if claim is None:
            return ReplayOutcome("already_done", "already done; not replayed.")
        run = state.instruments.timed(row.provider, row.callback, lambda: send(app, delivery))
        state.store.dispatch(delivery, claim, run)
    except CallbackError as exc:
        return ReplayOutcome("failed", f"failed: {exc.reason}")
    return ReplayOutcome("done", f"replayed, attempt {claim.attempt}: done.", attempt=claim.attempt)
