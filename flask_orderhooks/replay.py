"""Replaying a stored delivery by hand: what ``flask orderhooks replay`` and
the operator console's buttons both run, so the two can never disagree."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal

from flask import Flask

from .exc import CallbackError
from .logtext import for_log
from .store import DEAD, DONE, FAILED, Claim, StoredDelivery
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

    A done delivery is dispatched again only with ``force``, and only in the
    state ``row`` holds: read as done, with ``row.attempts`` attempts, the
    row stored at ``row.created_at`` (not one stored anew after purge
    deleted it) and not compacted since. The
    store's claim checks that state in the same statement that takes the row
    over, so ``force`` never takes over a delivery that became done since
    ``row`` was read (a worker finished it while ``replay --failed --force``
    went through its list), nor one that another forced replay of the same
    state ran already (a double submit, two operators): either would
    dispatch it once more than asked. Runs inside an app context of ``app``;
    the outcome is also recorded in the store (done, or failed with the
    error) exactly as any other attempt.
    """
    if row.status == DONE and not force:
        return ReplayOutcome("already_done", "already done; not replayed.")
    if row.compacted_at is not None:
        return _compacted(row.compacted_at)
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
    forced = force and row.status == DONE
    try:
        # Forced only over the done state the caller saw: ``row`` may be stale.
        claim = state.store.claim(
            delivery,
            force=forced,
            seen_attempts=row.attempts if forced else None,
            seen_created=row.created_at if forced else None,
        )
    except CallbackError as exc:
        return ReplayOutcome("failed", f"failed: {exc.reason}")
    if claim is None:
        if forced:
            compacted_at = _compacted_since(state, row)
            if compacted_at is not None:
                return _compacted(compacted_at)
            return ReplayOutcome(
                "already_done",
                f"already done, and replayed since it was read at attempt {row.attempts}; "
                "not replayed again.",
            )
        return ReplayOutcome("already_done", "already done; not replayed.")
    try:
        run = state.instruments.timed(row.provider, row.callback, lambda: send(app, delivery))
        state.store.dispatch(delivery, claim, run)
    except CallbackError as exc:
        return ReplayOutcome("failed", _failed_attempt(state, row, claim, exc))
    return ReplayOutcome("done", f"replayed, attempt {claim.attempt}: done.", attempt=claim.attempt)


def _compacted_since(state: AppState, row: StoredDelivery) -> datetime | None:
    """When purge compacted ``row`` after it was read, if it did."""
    try:
        now = state.store.get(row.key, provider=row.provider, callback=row.callback)
    except CallbackError:
        # The store failed after the claim: the other reason stands.
        return None
    return now[0].compacted_at if now else None


def _compacted(compacted_at: datetime) -> ReplayOutcome:
    return ReplayOutcome(
        "failed",
        f"compacted by purge at {_utc_text(compacted_at)}: its body is gone; not replayed.",
    )


def _utc_text(when: datetime) -> str:
    """``when`` as a replay's messages write it; in UTC whatever the zone a
    driver handed it back in (PostgreSQL's: the session's)."""
    return f"{when.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC"


# How much of a failed attempt's error a replay's message repeats; the whole
# error is in the row (``show``, the console's failed attempts).
_ERROR_IN_MESSAGE = 200


def _failed_attempt(state: AppState, row: StoredDelivery, claim: Claim, exc: CallbackError) -> str:
    """What became of the delivery after this replay's attempt failed, read
    from the row: ``exc.reason`` is the answer a platform gets ("the delivery
    will be retried"), which is not what happened to a delivery that is now
    dead, and says nothing of when the next attempt is."""
    after = state.store.get(row.key, provider=row.provider, callback=row.callback)
    current = after[0] if after else None
    if current is None or current.attempts != claim.attempt or current.status not in (FAILED, DEAD):
        # Not recorded as this attempt (the store failed, or another worker
        # took the delivery over since): the reason is all that is known.
        return f"failed: {exc.reason}"
    what = f"failed: attempt {claim.attempt} failed ({_short(current.error or exc.reason)})"
    if current.status == DEAD:
        return (
            f"{what}; the delivery is dead: no further attempt will be made "
            "(replay it once the cause is fixed)."
        )
    if current.next_attempt_at is None:
        return f"{what}; no further attempt is planned (replay it once the cause is fixed)."
    return f"{what}; the next attempt is at {_utc_text(current.next_attempt_at)}."


def _short(error: str) -> str:
    """``error`` on one line, cut to :data:`_ERROR_IN_MESSAGE` characters."""
    text = " ".join(error.split())
    if len(text) <= _ERROR_IN_MESSAGE:
        return text
    return text[: _ERROR_IN_MESSAGE - 1] + "…"
