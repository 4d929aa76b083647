"""The ``orderhooks`` pytest fixture, registered through the ``pytest11`` entry point.

It needs the host's ``app`` fixture (the pytest-flask convention)::

    def test_credit(orderhooks):
        response = orderhooks.deliver("collect", trans_id="T1", payed_amount="99.00")
        assert response.status_code == 200

.. versionadded:: 0.1
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from blinker import NamedSignal
from flask import Flask
from werkzeug.test import TestResponse

from .extension import get_extension
from .testing import SignedCallback, build


@dataclass(frozen=True)
class CapturedEvent:
    """A signal sent while :meth:`OrderHooksClient.captured` was active.

    :param signal: the signal's name, such as ``"orderhooks.delivery-dead"``.
    :param event: the ``event`` keyword of the providers' signals; ``None``
        for a signal that sends none (``delivery_failed``, ``delivery_dead``).
    :param kwargs: every keyword argument the signal was sent with, ``event``
        included: ``delivery`` and ``error`` of the operators' signals. Not
        compared: an item equals ``CapturedEvent(signal, event)``, as before.

    .. versionchanged:: 0.3
        ``kwargs``; a signal without ``event`` is captured too.
    """

    signal: str
    event: Any
    # Left out of == and hash(): items compare as they did before it was
    # added, and a dict of keywords has no hash.
    kwargs: Mapping[str, Any] = field(default_factory=dict, compare=False)


class OrderHooksClient:
    """Posts signed callbacks to an app through its test client."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.client = app.test_client()

    @property
    def prefix(self) -> str:
        return get_extension(self.app).state(self.app).settings.url_prefix or "/"

    def build(self, kind: str, **fields: Any) -> SignedCallback:
        """A signed callback of ``kind`` (``igv``, ``collect``, ``payout``,
        ``sud``, ``sud-batch``, ``standard``) from the app's configured
        secrets. A host provider's callbacks: build a
        :class:`~flask_orderhooks.testing.SignedCallback` and :meth:`post` it."""
        with self.app.app_context():
            return build(kind, app=self.app, **fields)

    def post(self, callback: SignedCallback) -> TestResponse:
        """Post an already built callback."""
        return self.client.post(
            callback.url(self.prefix), data=callback.body, headers=callback.headers
        )

    def deliver(self, kind: str, **fields: Any) -> TestResponse:
        """Build, sign and post one callback; return the response."""
        return self.post(self.build(kind, **fields))

    def deliver_twice(self, kind: str, **fields: Any) -> tuple[TestResponse, TestResponse]:
        """Post the same signed callback twice, as a platform retry would."""
        callback = self.build(kind, **fields)
        return self.post(callback), self.post(callback)

    @contextmanager
    def captured(self, *signals: NamedSignal) -> Iterator[list[CapturedEvent]]:
        """Record every signal the app's providers send inside the block
        (each provider's :attr:`~flask_orderhooks.Provider.signals`, a host
        provider's included), and ``signals`` too, whatever keywords they
        send (:class:`CapturedEvent`)::

            with orderhooks.captured(delivery_dead) as captured:
                orderhooks.deliver("collect", id="C1")
            [dead] = [c for c in captured if c.signal == "orderhooks.delivery-dead"]
            dead.kwargs["delivery"].key, dead.kwargs["error"]

        .. versionchanged:: 0.3
            Every configured provider's signals; extra ``signals``, with
            or without ``event``.
        """
        events: list[CapturedEvent] = []
        receivers: list[tuple[NamedSignal, Callable[..., None]]] = []
        providers = get_extension(self.app).state(self.app).providers.values()
        listened = dict.fromkeys([s for p in providers for s in p.signals] + list(signals))
        try:
            for signal in listened:
                receiver = _recorder(signal.name, events)
                signal.connect(receiver, self.app, weak=False)
                receivers.append((signal, receiver))
            yield events
        finally:
            for signal, receiver in receivers:
                # From every sender: disconnecting from the app alone leaves
                # blinker holding the receiver, and the list it appends to.
                signal.disconnect(receiver)


def _recorder(name: str, events: list[CapturedEvent]) -> Callable[..., None]:
    """A receiver that appends each send of the signal ``name`` to ``events``."""

    # Any keywords: the operators' signals send delivery and error, a host's
    # signal what it likes; requiring event= would make blinker raise inside
    # the sender instead of recording it.
    def receiver(sender: Flask, **kwargs: Any) -> None:
        events.append(CapturedEvent(name, kwargs.get("event"), kwargs))

    return receiver


@pytest.fixture
def orderhooks(app: Flask) -> OrderHooksClient:
    """Post signed order and payment callbacks to the app under test."""
    return OrderHooksClient(app)
