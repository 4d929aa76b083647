"""The Celery side of the system tests' host app, configured from the environment.

Loaded two ways, with the same environment as the gunicorn server:

``celery -A tests.system.celery_app worker``
    :data:`app` is the Celery app; the host app is
    :func:`server_app.build_app` ``(os.environ)``, receivers included, and
    :func:`~flask_orderhooks.celery.init_celery` registers the tasks on
    ``app`` without ``app=``: the tasks find the one app the extension is
    registered on.
gunicorn ``--config python:tests.system.celery_app``
    (through ``GUNICORN_CMD_ARGS``, see :data:`brokers.GUNICORN_ARGS`): gunicorn
    calls :func:`post_worker_init` in every worker, which gives the app that
    worker serves a Celery app of its own, so that the deliveries it stores
    are enqueued. The server's command line stays the one every system test
    uses.

The broker is ``ORDERHOOKS_SYSTEM_BROKER_URL``, a Redis server the test
started itself (:class:`tests.system.brokers.RedisServer`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from celery import Celery
from flask import Flask

from flask_orderhooks import OrderHooks
from flask_orderhooks.celery import init_celery

from . import server_app
from .brokers import BROKER_COOLDOWN, BROKER_URL, FAST_FAILING_BROKER


def make_celery(broker_url: str) -> Celery:
    """A Celery app on ``broker_url`` with the settings the README recommends."""
    celery = Celery("orderhooks_system", broker=broker_url)
    celery.conf.update(
        FAST_FAILING_BROKER,
        # Workers keep reconnecting after an outage (the test's broker comes
        # back); at start-up too, which also silences Celery 5's warning.
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        # One message in hand per worker process: a worker holding a batch
        # of prefetched messages would starve the other one in a storm.
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
    )
    return celery


def attach(flask_app: Flask, broker_url: str) -> Celery:
    """Give ``flask_app``'s OrderHooks a Celery app of its own on ``broker_url``."""
    hooks = flask_app.extensions["orderhooks"]
    assert isinstance(hooks, OrderHooks)
    celery = make_celery(broker_url)
    init_celery(celery, hooks, app=flask_app, broker_cooldown=BROKER_COOLDOWN)
    return celery


def post_worker_init(worker: Any) -> None:
    """gunicorn's hook, in each worker once it loaded the app it serves."""
    attach(worker.wsgi, os.environ[BROKER_URL])


def _worker_app(environ: Mapping[str, str]) -> Celery:
    celery = make_celery(environ[BROKER_URL])
    # The app stays referenced until init_celery() holds it: OrderHooks
    # holds its apps weakly.
    flask_app, _, hooks = server_app.build_app(environ)
    assert flask_app in hooks._states
    init_celery(celery, hooks)
    return celery


#: The Celery app ``celery -A tests.system.celery_app worker`` runs.
app = _worker_app(os.environ)
