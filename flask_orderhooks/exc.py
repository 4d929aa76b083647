"""Every error flask-orderhooks raises, under one base class.

Errors raised while handling a callback carry the HTTP status the platform
gets back and a short, public ``reason``. The reason goes into the answer and
the log, so it never contains a secret or an internal detail.
"""

from __future__ import annotations


class OrderHooksError(Exception):
    """Base class of every error raised by flask-orderhooks."""


class ConfigurationError(OrderHooksError, ValueError):
    """A ``ORDERHOOKS_*`` config value is missing, empty or of the wrong type.

    Raised by :meth:`~flask_orderhooks.OrderHooks.init_app`, never later.

    :param key: the config key at fault.
    """

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


class CallbackError(OrderHooksError):
    """A callback could not be handled. Answered with :attr:`status`.

    :param reason: a short public sentence: safe to log and to answer with.
    """

    status: int = 400

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RequestRefused(CallbackError):
    """The request was refused before anything was stored."""


class SourceForbidden(RequestRefused):
    """The client address is not in ``ORDERHOOKS_ALLOWED_IPS``."""

    status = 403


class PayloadTooLarge(RequestRefused):
    """The body is larger than ``ORDERHOOKS_MAX_BODY``."""

    status = 413


class BadSignature(RequestRefused):
    """The signature is missing, unreadable or does not match."""

    status = 401


class SignatureExpired(BadSignature):
    """The signature matches but its timestamp is outside the accepted window."""


class MalformedPayload(RequestRefused):
    """The body or a header is not what the platform documents."""

    status = 400


class KeyConflict(CallbackError):
    """A stored delivery has the same idempotency key but a different body.

    The iGV signature does not cover the body, so a captured request id sent
    again with another body must never dispatch.
    """

    status = 409


class ReceiverFailed(CallbackError):
    """A signal receiver raised; its work was rolled back and the delivery
    stored as failed so that the platform's retry dispatches again."""

    status = 500


class NoReceiver(CallbackError):
    """Nothing is connected to the signal this delivery needs, so nothing
    would handle it. Stored as failed, to be retried or replayed once a
    receiver is connected, instead of being acknowledged and lost."""

    status = 503


class StoreUnavailable(CallbackError):
    """The delivery store could not be reached or did not answer in time,
    or another worker holds this delivery. The platform should retry."""

    status = 503


class StaleSnapshot(StoreUnavailable):
    """The host's database session began a REPEATABLE READ or SERIALIZABLE
    transaction and wrote before the callback view: its snapshot cannot see
    the delivery's claim. The delivery is kept as failed for the retry."""


class ReceiverCommit(OrderHooksError, RuntimeError):
    """Raised by ``db.session.commit()``, or a commit of the session's
    connection, inside a receiver (``db=``).

    The extension commits what the receivers write together with the
    delivery's done mark, once they have all returned: both or neither. A
    commit in the middle would make the delivery done before the rest of
    its receivers ran, so that a failure after it could neither roll back
    what was committed nor be retried. Leave the commit to the extension;
    ``db.session.flush()`` gives new rows their ids, and ``begin_nested()``
    savepoints work as usual.
    """
