"""What every platform plugs into the one request pipeline.

A provider knows four things about its platform: its config keys, how a
request is verified, how a verified body becomes events and an idempotency
key, and what the platform reads as "done" or "retry". The pipeline in
:mod:`.views` and the store in :mod:`.store` do everything else, the same way
for every platform, built-in or the host's own.
"""

from __future__ import annotations

import hmac
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar, Self

from blinker import NamedSignal
from flask import Response

if TYPE_CHECKING:
    from .testing import SignedCallback

from .exc import BadSignature, MalformedPayload, SignatureExpired


@dataclass(frozen=True)
class Dispatch:
    """One signal to send, with its event."""

    signal: NamedSignal
    event: object


@dataclass(frozen=True)
class Delivery:
    """A verified, parsed callback: what the store records and dispatches.

    :param key: the idempotency key within ``(provider, callback)``.
    :param headers: the request headers needed to verify ``body`` again later.
    :param dispatches: the signals to send, in order, in one transaction.
    :param reference: the order id the body names, if any: stored so that
        support staff find the delivery by it (the console's search).

    .. versionchanged:: 0.3
        ``reference``.
    """

    provider: str
    callback: str
    key: str
    body: bytes
    headers: Mapping[str, str]
    dispatches: tuple[Dispatch, ...]
    reference: str | None = None


class Provider(ABC):
    """A platform: its config, its routes, its verification, its parsing,
    its answers.

    Subclass it to receive another platform's callbacks through the same
    store, dispatch modes, retries, CLI, console and testing kit as the
    built-in ones, and pass the class to ``OrderHooks(providers=[...])``.
    The extension calls :meth:`from_config` once per app in ``init_app``;
    the instance it returns serves every request of that app, from several
    threads at once, so keep it immutable.

    .. versionchanged:: 0.3
        A public, documented base class; providers build themselves from
        the config with :meth:`from_config`.
    """

    #: The platform's name in config, URLs, logs and the store (at most 16
    #: characters, unique among the app's providers).
    name: ClassVar[str]
    #: ``{callback name: URL rule below the extension's prefix}``. Callback
    #: names (at most 32 characters) are stored with each delivery. A class
    #: attribute, or set per instance by :meth:`from_config`.
    routes: Mapping[str, str]
    #: The headers stored with a delivery so it can be verified again.
    signed_headers: ClassVar[tuple[str, ...]] = ()
    #: A header naming the idempotency key before verification, for the log
    #: line of a refused request.
    key_header: ClassVar[str | None] = None
    #: The signals the provider's deliveries send: the testing kit's
    #: ``captured()`` listens to them.
    signals: ClassVar[tuple[NamedSignal, ...]] = ()
    #: Defaults of the provider's own config keys, set on ``app.config`` (with
    #: ``setdefault``) before :meth:`from_config` reads them.
    config_defaults: ClassVar[Mapping[str, Any]] = {}
    #: How long after it arrived a signed request can still be accepted, in
    #: seconds, or ``None`` when it never expires (no timestamp is signed):
    #: for a timestamp window of ``max_age`` that allows ``max_skew`` ahead,
    #: ``max_age + max_skew`` (:func:`acceptance_window`). Purge deletes a
    #: delivery only once it is older than this: a younger one is kept as a
    #: tombstone, so a replay is still refused.
    replay_window: float | None = None

    @classmethod
    @abstractmethod
    def from_config(cls, config: Mapping[str, Any]) -> Self | None:
        """The provider configured by ``config`` (the app's), or ``None``
        when the platform is not configured (its routes then answer 404).

        :raises ConfigurationError: a key of the provider has a wrong value;
            the error names the key, never a secret.
        """

    @abstractmethod
    def read(
        self, callback: str, body: bytes, headers: Mapping[str, str], *, now: float | None
    ) -> Delivery:
        """Verify the request, then parse it into a :class:`Delivery`.

        :param now: the current Unix time in seconds for timestamp windows, or
            ``None`` to skip them (replaying a stored delivery).
        :raises RequestRefused: with the reason, before anything is stored.
        """

    @abstractmethod
    def answer(self, status: int, reason: str) -> Response:
        """Render the platform's documented answer for an HTTP status."""

    def sample(self, callback: str, **fields: Any) -> SignedCallback:
        """A correctly signed request for ``callback``, built from this
        provider's own secrets: what :func:`flask_orderhooks.testing.build`
        and the pytest fixture's ``build``/``deliver`` return for the kind
        ``"<name>"`` (its first callback) or ``"<name>:<callback>"``.
        Optional; override it to give your platform the testing kit.

        .. versionadded:: 0.3
        """
        raise NotImplementedError(
            f"{type(self).__name__} has no sample(); build a SignedCallback yourself "
            "or define sample(callback, **fields)."
        )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


_DIGITS = re.compile(r"[0-9]{1,19}")


def header(headers: Mapping[str, str], name: str) -> str:
    """The value of a required signature header, or :class:`BadSignature`."""
    value = headers.get(name)
    if not value:
        raise BadSignature(f"The {name} header is missing or empty.")
    return value


def header_bytes(value: str, name: str) -> bytes:
    """A header's original bytes (WSGI servers hand them over as latin-1)."""
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        raise BadSignature(f"The {name} header is not readable.") from None


def signature_matches(expected_hex: str, given: str) -> bool:
    """Constant-time comparison of hex digests.

    Compared as bytes: ``hmac.compare_digest`` raises ``TypeError`` on
    non-ASCII ``str``, and a mangled header must be a bad signature, not a 500.
    """
    try:
        given_bytes = given.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return hmac.compare_digest(expected_hex.encode("ascii"), given_bytes)


def millisecond_timestamp(value: str, name: str) -> int:
    """Parse a Unix timestamp (a header or a field): ASCII digits only.

    :param name: how to name it in the reason, e.g. ``"X-Timestamp header"``.
    """
    if not _DIGITS.fullmatch(value):
        raise MalformedPayload(f"The {name} is not a Unix timestamp.")
    return int(value)


def acceptance_window(max_age: float | None, max_skew: float) -> float | None:
    """How long after its arrival a request checked by :func:`check_age`
    can still be accepted: its timestamp may be up to ``max_skew`` ahead of
    the clock, and is accepted until ``max_age`` after itself. ``None`` (it
    never expires) without a ``max_age``.

    Not ``max_age`` alone: a request stamped ``max_skew`` ahead stays
    acceptable that much longer, and a purge that deleted its delivery after
    ``max_age`` would let a captured copy in again (with another body, on a
    platform that signs none).
    """
    return None if max_age is None else max_age + max_skew


def check_age(
    timestamp_ms: int, now: float | None, max_age: float | None, max_skew: float, what: str
) -> None:
    """Refuse a timestamp older than ``max_age`` or further ahead than ``max_skew``.

    Called after the signature matched, like itsdangerous' ``TimestampSigner``:
    an attacker learns nothing about the window from a forged request.
    """
    if now is None:
        return
    age = now - timestamp_ms / 1000
    if max_age is not None and age > max_age:
        raise SignatureExpired(f"The {what} is older than {max_age:g} seconds.")
    if -age > max_skew:
        raise SignatureExpired(f"The {what} is more than {max_skew:g} seconds in the future.")


def utc_from_ms(timestamp_ms: int) -> datetime:
    """An aware UTC datetime from Unix milliseconds."""
    try:
        return datetime.fromtimestamp(timestamp_ms / 1000, tz=UTC)
    except (OverflowError, OSError, ValueError):
        raise MalformedPayload("A timestamp is out of range.") from None


# Field readers: each names the field and what was expected, so the log line
# of a refused body says exactly what the platform sent wrong.


def req_str(obj: Mapping[str, Any], name: str) -> str:
    """A required non-empty string field, or :class:`MalformedPayload` naming it."""
    value = obj.get(name)
    if not isinstance(value, str) or not value:
        raise MalformedPayload(f"The field {name!r} must be a non-empty string.")
    return value


def opt_str(obj: Mapping[str, Any], name: str) -> str | None:
    """An optional string field (missing or null: ``None``), or :class:`MalformedPayload`."""
    value = obj.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise MalformedPayload(f"The field {name!r} must be a string or null.")
    return value


def req_int(obj: Mapping[str, Any], name: str) -> int:
    """A required integer field (never a bool), or :class:`MalformedPayload` naming it."""
    value = obj.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise MalformedPayload(f"The field {name!r} must be an integer.")
    return value


def opt_int(obj: Mapping[str, Any], name: str) -> int | None:
    """An optional integer field (missing or null: ``None``), or :class:`MalformedPayload`."""
    return None if obj.get(name) is None else req_int(obj, name)


def req_object(obj: Mapping[str, Any], name: str) -> dict[str, Any]:
    """A required JSON object field, or :class:`MalformedPayload` naming it."""
    value = obj.get(name)
    if not isinstance(value, dict):
        raise MalformedPayload(f"The field {name!r} must be an object.")
    return value
