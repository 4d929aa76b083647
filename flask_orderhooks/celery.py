"""Celery as the wake-up channel of deferred dispatch.

:func:`init_celery` registers two tasks on a Celery app and makes the
extension enqueue one of them for every delivery it stores:

``orderhooks.dispatch`` (``provider, callback, key``)
    dispatches that one delivery if it is due, through
    :meth:`~flask_orderhooks.OrderHooks.dispatch_due`. Enqueued right after a
    deferred delivery is stored, and again, with a countdown, after a failed
    attempt that has a next one.
``orderhooks.process_due``
    one pass over everything due now,
    :meth:`~flask_orderhooks.OrderHooks.process_due`; returns how many
    deliveries it attempted. Run it from Celery beat every 30 to 60 seconds.

The database row, not the message, decides whether a delivery is done, when
it is due and who holds it. A message that is lost (the broker was down or
restarted without persistence, a worker died holding it) costs latency until
the next ``orderhooks.process_due``; a message that arrives twice, or for a
delivery that is already done, dispatches nothing. That is why the beat
schedule is not optional.

.. versionadded:: 0.2
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

from flask import Flask, has_app_context

from .logtext import for_log
from .store import FAILED, PENDING

if TYPE_CHECKING:
    from celery import Celery

    from .extension import Enqueuer, OrderHooks

#: The name of the task that dispatches one delivery if it is due.
DISPATCH_TASK = "orderhooks.dispatch"
#: The name of the task that dispatches everything due now (the sweep).
PROCESS_DUE_TASK = "orderhooks.process_due"

logger = logging.getLogger("flask_orderhooks")

#: The most deliveries one ``orderhooks.process_due`` task attempts by default.
SWEEP_BATCH = 100

#: The OrderHooks each Celery app's tasks were registered for: a second
#: registration would otherwise silently keep the first one's tasks, since
#: Celery returns the existing task for a name it already knows.
_registered: WeakKeyDictionary[Any, OrderHooks] = WeakKeyDictionary()


def init_celery(
    celery_app: Celery,
    hooks: OrderHooks,
    *,
    app: Flask | None = None,
    broker_cooldown: float = 10.0,
    sweep_batch: int = SWEEP_BATCH,
) -> None:
    """Dispatch ``hooks``' deferred deliveries on ``celery_app``'s workers.

    Registers the tasks ``orderhooks.dispatch`` and ``orderhooks.process_due``
    and sets :attr:`~flask_orderhooks.OrderHooks.enqueuer`, so that every
    delivery stored with ``ORDERHOOKS_DISPATCH = "deferred"`` is enqueued
    at once, and every failed attempt that has a next one is enqueued with a
    countdown of its retry delay. Call it where the Celery app is built, in
    the web processes (which enqueue) and in the workers (which run the
    tasks) alike::

        celery_app = Celery(__name__, broker="redis://...")
        init_celery(celery_app, hooks)
        celery_app.conf.beat_schedule = {
            "orderhooks-sweep": {"task": "orderhooks.process_due", "schedule": 30.0},
        }

    The tasks run in a Flask app context: the one already active (Flask's
    ``FlaskTask`` pattern pushes one around every task), else ``app``'s,
    else that of the one app ``hooks`` is registered on (now, or, if it is
    registered on none yet, when the task runs).

    Enqueuing publishes without Celery's publish retries
    (``apply_async(retry=False)``): a request that stores a delivery while
    the broker is down must not wait on it. The extension logs the failure
    at WARNING and answers the platform success all the same; the delivery
    stays due in the store for ``orderhooks.process_due``. Celery still
    reconnects inside that call for up to ``broker_connection_timeout``
    (4 s by default, about 6 s with its retry interval: longer than the
    payment gateway waits for an answer). So after a failed publish the
    enqueuer does not try the broker again for ``broker_cooldown`` seconds:
    the requests in between are answered at once (each still logs its
    WARNING) and the sweep dispatches what they stored. Bound the first
    failure too, in the Celery config of the web processes::

        broker_connection_timeout = 1
        broker_transport_options = {
            "max_retries": 1, "interval_start": 0, "interval_step": 0.2,
            "interval_max": 0.2,
            "socket_connect_timeout": 1, "socket_timeout": 2,  # Redis
        }

    and keep ``broker_connection_retry`` on (the default) with
    ``broker_connection_max_retries = None`` in the workers, so that they
    reconnect after an outage however long it lasts.

    A retry's countdown becomes the message's ETA, and Celery workers hold
    ETA messages in memory until then. On Redis a message not acknowledged
    within the transport's ``visibility_timeout`` (1 h by default, shorter
    than the default retry delays of 2 h and 12 h) is delivered again: the
    delivery is still dispatched once (the row decides), and the sweep
    would find it anyway. With ``task_always_eager`` the dispatch runs inside the
    request that stored the delivery; an eager task cannot wait for a
    countdown (Celery runs it at once), so in eager mode the enqueuer
    publishes nothing that has one: a failed attempt's retry, and a delivery
    found not yet due or locked, are left to ``orderhooks.process_due`` (or
    the next :meth:`~flask_orderhooks.OrderHooks.process_due`). Before, the
    retry ran at once inside the task that failed, found the delivery not
    due, enqueued it again, and so on until RecursionError.

    :param celery_app: the :class:`celery.Celery` application.
    :param hooks: the :class:`~flask_orderhooks.OrderHooks` whose deliveries
        its workers dispatch.
    :param app: the Flask app to run the tasks in when no app context is
        active; needed when ``hooks`` is registered on several apps.
    :param broker_cooldown: seconds without publishing after a publish
        failed (0: try every time).
    :param sweep_batch: the most deliveries one ``orderhooks.process_due``
        task attempts; a sweep that attempted that many enqueues the next
        sweep, which goes on. Bounded, a sweep never outlasts a warm
        shutdown or a ``task_time_limit`` under a steady inflow.
    :raises RuntimeError: ``init_celery`` was already called for
        ``celery_app``, or ``hooks`` already has an enqueuer.
    :raises ValueError: ``sweep_batch`` is not a whole number of at least 1.

    .. versionadded:: 0.2
    """
    if isinstance(sweep_batch, bool) or not isinstance(sweep_batch, int) or sweep_batch < 1:
        raise ValueError(
            f"init_celery(sweep_batch={sweep_batch!r}): the most deliveries one sweep "
            "task attempts must be a whole number of at least 1."
        )
    if celery_app in _registered:
        raise RuntimeError(
            "init_celery() was already called for this Celery app: its tasks "
            f"{DISPATCH_TASK} and {PROCESS_DUE_TASK} can serve one OrderHooks. "
            "Call init_celery() once per Celery app."
        )
    if hooks.enqueuer is not None:
        raise RuntimeError(
            "This OrderHooks already has an enqueuer (hooks.enqueuer): its "
            "deliveries are handed to one queue. Call init_celery() once per OrderHooks."
        )

    if app is None and len(hooks._states) == 1:
        # Held here: OrderHooks holds its apps weakly, and a worker module
        # that builds the app in a factory and keeps only the Celery app
        # would lose it at the next garbage collection.
        [app] = list(hooks._states)

    def dispatch(provider: str, callback: str, key: str) -> bool:
        with _app_context(hooks, app):
            if hooks.dispatch_due(provider, callback, key):
                return True
            _enqueue_when_due(hooks, enqueue, provider, callback, key)
            return False

    def process_due() -> int:
        with _app_context(hooks, app):
            # Bounded: claiming until nothing is due, a sweep under a steady
            # inflow never ended, and a warm shutdown (or a time limit) then
            # killed its worker mid-dispatch.
            attempted = hooks.process_due(limit=sweep_batch)
        if attempted >= sweep_batch and not celery_app.conf.task_always_eager:
            # More may be due: the next sweep goes on, in a task of its own.
            # (Eager, it would run nested in this one, and so on.)
            try:
                sweep_task.apply_async(retry=False)
            except Exception as exc:
                logger.warning(
                    "could not enqueue the next sweep (%s: %s); the next beat sweep goes on",
                    type(exc).__name__,
                    for_log(str(exc)),
                )
        return attempted

    dispatch.__doc__ = "Dispatch one stored delivery if it is due; whether it was attempted."
    process_due.__doc__ = "Dispatch every delivery due now; how many were attempted."
    # shared=False: a shared task would be added to every Celery app created
    # later in the process, bound to this OrderHooks. One result per delivery
    # would only fill a result backend nobody reads.
    dispatch_task = celery_app.task(name=DISPATCH_TASK, shared=False, ignore_result=True)(dispatch)
    sweep_task = celery_app.task(name=PROCESS_DUE_TASK, shared=False)(process_due)

    broker_down_until = [0.0]

    def enqueue(provider: str, callback: str, key: str, countdown: float) -> None:
        if celery_app.conf.task_always_eager:
            if countdown > 0:
                # An eager task runs now whatever its countdown: it would find
                # the delivery not due and enqueue it again, recursively. The
                # row keeps its due time; the sweep dispatches it then.
                return
            # No broker is involved: what this raises is the task's own error
            # (task_eager_propagates), which says nothing about the next
            # delivery's task. A cool-down would leave every delivery stored
            # meanwhile to the sweep.
            dispatch_task.apply_async((provider, callback, key), retry=False)
            return
        if time.monotonic() < broker_down_until[0]:
            raise BrokerCoolingDown(
                f"the broker failed less than {broker_cooldown:g}s ago; not tried"
            )
        try:
            # retry=False: no publish retries inside the platform's request;
            # a failure here is logged by the extension and left to the sweep.
            dispatch_task.apply_async(
                (provider, callback, key),
                # No countdown for "now": an ETA task is held in the worker's
                # memory, outside its prefetch limit, until it falls due.
                countdown=countdown if countdown > 0 else None,
                retry=False,
            )
        except Exception:
            broker_down_until[0] = time.monotonic() + broker_cooldown
            raise

    _registered[celery_app] = hooks
    hooks.enqueuer = enqueue


class BrokerCoolingDown(ConnectionError):
    """A publish failed within ``broker_cooldown`` seconds: not tried now."""


def _enqueue_when_due(
    hooks: OrderHooks, enqueue: Enqueuer, provider: str, callback: str, key: str
) -> None:
    """Enqueue a delivery that is still waiting again, when it is worth
    looking at it again: its message found it not due, or held.

    - Not due by this host's clock: a deferred delivery is due from the web
      host's clock at the moment it was stored, and its message reaches a
      worker within milliseconds, so a worker whose clock is a few
      milliseconds behind finds it "not due yet". Enqueued for then.
    - Due, but locked by another transaction at that instant: the due claim
      skips locked rows (``SKIP LOCKED``), and a duplicate callback of the
      delivery, arriving while it is claimed, locks the row for the length
      of its statement. Enqueued again after
      ``ORDERHOOKS_WORKER_POLL_INTERVAL``, as a worker would look again.

    Either way the message would otherwise be spent and the delivery left
    to the sweep. Done, dead and claimed deliveries are left alone: their
    message has nothing more to do.
    """
    for stored in hooks.store.get(key, provider, callback):
        if stored.status in {PENDING, FAILED} and stored.next_attempt_at is not None:
            countdown = stored.next_attempt_at.timestamp() - hooks.clock()
            if countdown <= 0:
                countdown = hooks.state().settings.worker_poll_interval
            enqueue(provider, callback, key, countdown)


@contextmanager
def _app_context(hooks: OrderHooks, app: Flask | None) -> Iterator[None]:
    if has_app_context():
        yield
        return
    target = app if app is not None else _only_app(hooks)
    with target.app_context():
        yield


def _only_app(hooks: OrderHooks) -> Flask:
    apps = list(hooks._states)
    if not apps:
        raise RuntimeError(
            "The orderhooks Celery tasks need a Flask app, and this OrderHooks is not "
            "registered on any: call hooks.init_app(app) in the worker too, or pass the "
            "app: init_celery(celery_app, hooks, app=app)."
        )
    if len(apps) > 1:
        raise RuntimeError(
            f"The orderhooks Celery tasks need a Flask app, and this OrderHooks is "
            f"registered on {len(apps)} apps. Pass the app: init_celery(celery_app, "
            "hooks, app=app), or run the tasks in an app context (Flask's FlaskTask)."
        )
    return apps[0]
