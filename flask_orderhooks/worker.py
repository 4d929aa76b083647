"""Workers: carry every stored delivery to done, outside the platform's request.

A pass claims the delivery due soonest (a deferred one, a failed one whose
retry delay is over, or one whose worker died and whose lease ran out),
rebuilds its events from the stored raw body, and dispatches it through the
same store transaction as the request path: receivers cannot tell the two
apart, except that a worker runs them in an app context without a request.

``flask orderhooks worker`` loops over passes until SIGTERM or SIGINT;
:meth:`~flask_orderhooks.OrderHooks.process_due` runs one pass (cron, Celery
beat, tests); the Celery task dispatches one given delivery.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

from flask import Flask

from .exc import CallbackError, ReceiverFailed, StoreUnavailable
from .logtext import for_log
from .store import FAILED, DueClaim
from .store.statements import LEASE_LOST
from .views import send

if TYPE_CHECKING:
    from .extension import AppState

logger = logging.getLogger("flask_orderhooks")


@dataclass
class PassResult:
    """What one pass did: deliveries attempted, and how each attempt ended."""

    attempted: int = 0
    done: int = 0
    failed: int = 0


def process_due(
    app: Flask,
    state: AppState,
    *,
    limit: int | None = None,
    key: tuple[str, str, str] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    result: PassResult | None = None,
) -> PassResult:
    """Dispatch deliveries due now, one at a time, until none is left.

    :param limit: attempt at most this many.
    :param key: only this delivery ``(provider, callback, key)``, if it is due.
    :param should_stop: checked before each claim (a worker told to stop
        finishes the delivery in hand, and takes no other).
    :param result: count into this one, as each attempt ends: what a pass
        did before the store failed is still counted.
    :raises StoreUnavailable: the store failed while looking for work.
    """
    if result is None:
        result = PassResult()
    attempted = result.attempted
    while (limit is None or result.attempted - attempted < limit) and not should_stop():
        due = state.store.claim_due(key)
        if due is None:
            break
        result.attempted += 1
        # A context of its own per delivery, as a request would have: a fresh
        # db.session (Flask-SQLAlchemy scopes it to the context) and ``g``.
        with app.app_context():
            succeeded = attempt(app, state, due)
        state.instruments.attempted(
            due.delivery.provider, due.delivery.callback, "done" if succeeded else "failed"
        )
        if succeeded:
            result.done += 1
        else:
            result.failed += 1
        if key is not None:
            break
    return result


def attempt(app: Flask, state: AppState, due: DueClaim) -> bool:
    """Dispatch one claimed delivery; ``True`` when it is done."""
    stored, claim, store = due.delivery, due.claim, state.store
    name = f"{stored.provider} {stored.callback} {for_log(stored.key)}"
    if due.lease_lost:
        lost = claim.attempt - 1
        error = LEASE_LOST
        logger.warning("%s: attempt %d: %s", name, lost, error)
        if lost >= store.retries.max_attempts:
            # That was the last attempt: this claim only records that.
            # The due claim wrote the lost attempt into the history already.
            store.record_failure(
                stored, dataclasses.replace(claim, attempt=lost), error, in_history=False
            )
            return False
        if store.on_failure is not None:
            # The lost attempt failed; the next one is this one, now.
            failed = dataclasses.replace(
                stored, status=FAILED, attempts=lost, next_attempt_at=stored.updated_at
            )
            try:
                store.on_failure(failed, error)
            except Exception:
                logger.exception("%s: a delivery_failed receiver raised", name)
    provider = state.providers.get(stored.provider)
    if provider is None:
        store.record_failure(
            stored,
            claim,
            f"NotConfigured: the {stored.provider} platform has no credentials configured.",
        )
        logger.warning("%s: not dispatched: the platform is not configured", name)
        return False
    try:
        # Verified again with the configured secrets, without the timestamp
        # window, exactly as a replay is: the events are rebuilt from the raw
        # body that was verified when it arrived.
        delivery = provider.read(stored.callback, stored.body, stored.headers, now=None)
    except CallbackError as exc:
        store.record_failure(stored, claim, f"{type(exc).__name__}: {exc.reason}")
        logger.warning("%s: the stored delivery no longer verifies: %s", name, exc.reason)
        return False
    except Exception as exc:
        # A provider that raises anything else (a host provider's bug, a row
        # it no longer understands) fails this attempt like a receiver would:
        # unrecorded, the row would stay processing and raise again at every
        # lease, and the worker's loop would stop at it each time.
        store.record_failure(stored, claim, f"{type(exc).__name__}: {exc}")
        logger.exception("%s: the provider failed to read the stored delivery", name)
        return False
    try:
        run = state.instruments.timed(stored.provider, stored.callback, lambda: send(app, delivery))
        store.dispatch(delivery, claim, run)
    except ReceiverFailed as exc:
        logger.error(
            "%s: attempt %d: %s", name, claim.attempt, exc.reason, exc_info=exc.__cause__ or exc
        )
        return False
    except CallbackError as exc:
        logger.warning("%s: attempt %d: %s", name, claim.attempt, exc.reason)
        return False
    except Exception as exc:
        # Anything the store did not turn into a failed attempt (a host's
        # non-SQLAlchemy error raised while the dispatch's transaction
        # commits: a before_flush or before_insert validation). The dispatch
        # transaction was rolled back on the way out; unrecorded, the row
        # would stay processing until its lease ends, and raise again then.
        # (Recording never turns a done row back: the failure is fenced on
        # this claim and on "not done".)
        store.record_failure(stored, claim, f"{type(exc).__name__}: {exc}")
        logger.exception("%s: attempt %d: the dispatch raised", name, claim.attempt)
        return False
    logger.info("%s: attempt %d: done", name, claim.attempt)
    return True


#: The longest an idle worker sleeps without looking at its stop flag.
_WAKE_SLICE = 0.05
#: While the store stays unavailable, how often the worker says so again
#: (seconds): a line per poll would be 7,200 an hour at 0.5 s.
OUTAGE_REMINDER = 300.0


class Worker:
    """``flask orderhooks worker``: passes until told to stop.

    An idle worker looks for due deliveries every ``poll_interval`` seconds;
    after a pass that found work it looks again at once. SIGTERM and SIGINT
    set a flag: the delivery in hand is finished, then :meth:`run` returns.
    """

    def __init__(self, app: Flask, state: AppState, *, poll_interval: float) -> None:
        self.app = app
        self.state = state
        self.poll_interval = poll_interval
        self.total = PassResult()
        # A plain flag, no threading.Event: the signal handler runs in the
        # main thread between two of its bytecodes, maybe while the main
        # thread holds the Event's (non-reentrant) condition lock inside
        # wait(); Event.set() would then wait for it forever.
        self._stopping = False
        self._signal: int | None = None
        # When the store was first found unavailable in the outage going
        # on, and when the worker last said so (monotonic); None: no outage.
        self._outage: tuple[float, float] | None = None

    def stop(self, signum: int | None = None, _frame: FrameType | None = None) -> None:
        """Finish the delivery in hand, then return from :meth:`run`.

        The SIGTERM and SIGINT handler, and callable from any thread. It
        sets a flag and takes no lock (nor logs: a logging handler's lock,
        or its stream's, may be the one the main thread holds).
        """
        if signum is not None:
            self._signal = signum
        self._stopping = True

    def _should_stop(self) -> bool:
        if self._stopping and self._signal is not None:
            signum, self._signal = self._signal, None
            logger.info("worker: %s received; stopping", signal.Signals(signum).name)
        return self._stopping

    def _store_unavailable(self, exc: StoreUnavailable) -> None:
        """Say that the store is unavailable once when an outage begins, then
        every :data:`OUTAGE_REMINDER` seconds while it lasts (each pass's
        failure at DEBUG): a WARNING per poll would flood the log."""
        now = time.monotonic()
        if self._outage is None:
            self._outage = (now, now)
            logger.warning(
                "worker: the store is unavailable (%s); looking again every %gs, and saying "
                "so again every %gs while it lasts",
                exc.reason,
                self.poll_interval,
                OUTAGE_REMINDER,
            )
            return
        began, said = self._outage
        if now - said >= OUTAGE_REMINDER:
            self._outage = (began, now)
            logger.warning(
                "worker: the store is still unavailable after %.0fs (%s); looking again",
                now - began,
                exc.reason,
            )
        else:
            logger.debug("worker: the store is unavailable (%s); looking again", exc.reason)

    def _store_back(self) -> None:
        """A pass reached the store: an outage, if one was said, is over."""
        if self._outage is not None:
            began, _said = self._outage
            self._outage = None
            logger.warning(
                "worker: the store is back after %.1fs unavailable", time.monotonic() - began
            )

    def _idle(self) -> None:
        """Sleep ``poll_interval``, in short slices that look at the flag: a
        signal does not cut a sleep short (PEP 475 resumes it)."""
        deadline = time.monotonic() + self.poll_interval
        while not self._should_stop():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, _WAKE_SLICE))

    def run(self) -> PassResult:
        # Given back when it returns (a worker run by a test, or embedded).
        previous: list[tuple[signal.Signals, Any]] = []
        if threading.current_thread() is threading.main_thread():
            for which in (signal.SIGTERM, signal.SIGINT):
                previous.append((which, signal.signal(which, self.stop)))
        try:
            while not self._should_stop():
                before = self.total.attempted
                try:
                    # Counted into the totals as each attempt ends: a pass
                    # the store cuts short keeps what it did.
                    process_due(
                        self.app, self.state, should_stop=self._should_stop, result=self.total
                    )
                except StoreUnavailable as exc:
                    self._store_unavailable(exc)
                except Exception:
                    # attempt() records each delivery's own errors; this is
                    # anything else (the store raised what it should have
                    # turned into StoreUnavailable). One bad pass must not
                    # end the loop.
                    logger.exception("worker: the pass failed; looking again")
                else:
                    self._store_back()
                if self.total.attempted == before:
                    self._idle()
        finally:
            for which, handler in previous:
                signal.signal(which, handler)
        return self.total
