"""Standard Webhooks: the signing scheme of Svix, Resend, Clerk, Supabase and others.

Each message carries ``webhook-id`` (the idempotency key, the same on every
retry), ``webhook-timestamp`` (Unix seconds) and ``webhook-signature``: a
space-separated list of ``v1,<base64>`` entries, each an HMAC-SHA256 of
``id.timestamp.body`` with a secret (``whsec_`` and base64); Svix names
them ``svix-id``, ``svix-timestamp`` and ``svix-signature``, read when a
request has none of the ``webhook-*`` ones. Any one entry
made with any configured secret verifies the message, which is how senders
rotate keys. The timestamp must be within five minutes of this server's
clock, both ways. Any 2xx answer means done; anything else is retried.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Mapping
from typing import Any, ClassVar

from flask import Response

from .config import Secrets, read_seconds
from .events import StandardWebhook
from .exc import BadSignature, ConfigurationError
from .jsonbody import parse_object
from .provider import (
    Delivery,
    Dispatch,
    Provider,
    acceptance_window,
    check_age,
    header,
    header_bytes,
    millisecond_timestamp,
    utc_from_ms,
)
from .signals import webhook_received

CONFIG_KEY = "ORDERHOOKS_STANDARD_WEBHOOKS"
TOLERANCE_KEY = "ORDERHOOKS_STANDARD_WEBHOOKS_TOLERANCE"
#: A source's name is a URL segment and the stored callback name.
_SOURCE = re.compile(r"[A-Za-z0-9_-]{1,32}")
_PREFIX = "whsec_"
#: The id, timestamp and signature headers: the standard's names, and the
#: ones Svix sends unless an account has them white-labelled (its senders,
#: Resend and Clerk among them, use them; Svix's own libraries read both).
_STANDARD = ("webhook-id", "webhook-timestamp", "webhook-signature")
_SVIX = ("svix-id", "svix-timestamp", "svix-signature")


def standard_signature(msg_id: str, timestamp: str, body: bytes, secret: bytes) -> str:
    """One ``webhook-signature`` entry: ``v1,`` and the base64 HMAC-SHA256 of
    ``id.timestamp.body`` with the decoded secret."""
    content = msg_id.encode("latin-1") + b"." + timestamp.encode("latin-1") + b"." + body
    digest = hmac.new(secret, content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


class StandardWebhooksProvider(Provider):
    """``ORDERHOOKS_STANDARD_WEBHOOKS = {"<source>": "whsec_…" or a rotation
    list (oldest first)}`` gives each source the route
    ``POST {prefix}/standard/<source>``;
    ``ORDERHOOKS_STANDARD_WEBHOOKS_TOLERANCE`` (seconds, default 300) is the
    timestamp window, both ways. Signal: :data:`~.signals.webhook_received`.

    .. versionadded:: 0.3
    """

    name = "standard"
    signed_headers = _STANDARD + _SVIX
    key_header = "webhook-id"
    signals = (webhook_received,)
    config_defaults: ClassVar[Mapping[str, Any]] = {CONFIG_KEY: None, TOLERANCE_KEY: 300}

    def __init__(self, sources: Mapping[str, Secrets], *, tolerance: float = 300) -> None:
        self.sources = dict(sources)
        self.tolerance = tolerance
        self.routes = {source: f"/standard/{source}" for source in self.sources}
        # The tolerance holds both ways.
        self.replay_window = acceptance_window(tolerance, tolerance)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> StandardWebhooksProvider | None:
        # Zero would refuse every webhook: none arrives in the instant it was signed.
        tolerance = read_seconds(config, TOLERANCE_KEY, positive=True)
        value = config.get(CONFIG_KEY)
        if value is None:
            return None
        if not isinstance(value, Mapping) or not value:
            raise ConfigurationError(
                CONFIG_KEY, 'must be a non-empty mapping {"<source>": "whsec_..." or a list}.'
            )
        sources: dict[str, Secrets] = {}
        spelled: dict[str, str] = {}
        for source, secrets in value.items():
            if not isinstance(source, str) or not _SOURCE.fullmatch(source):
                raise ConfigurationError(
                    CONFIG_KEY,
                    f"source names are 1 to 32 letters, digits, '-' or '_', not {source!r}.",
                )
            # Route endpoints spell '-' as '_': "a-b" and "a_b" would clash.
            twin = spelled.setdefault(source.replace("-", "_"), source)
            if twin != source:
                raise ConfigurationError(
                    CONFIG_KEY, f"the sources {twin!r} and {source!r} differ only in - and _."
                )
            sources[source] = _secrets(f"{CONFIG_KEY}[{source!r}]", secrets)
        return cls(sources, tolerance=tolerance)

    def read(
        self, callback: str, body: bytes, headers: Mapping[str, str], *, now: float | None
    ) -> Delivery:
        secrets = self.sources.get(callback)
        if secrets is None:
            # Only a stored delivery gets here (a worker's attempt, a replay):
            # its source was removed from the config, and its route with it.
            raise BadSignature(f"The source {callback!r} is not configured.")
        names = _header_names(headers)
        id_name, timestamp_name, signature_name = names
        msg_id = header(headers, id_name)
        timestamp = header(headers, timestamp_name)
        given = header(headers, signature_name)
        header_bytes(msg_id, id_name)
        header_bytes(timestamp, timestamp_name)
        # Entries of other schemes (v1a, asymmetric) are skipped, not refused:
        # a sender may add them beside the v1 ones.
        offered = [
            entry.encode("latin-1")
            for entry in given.split(" ")
            if entry.startswith("v1,") and entry.isascii()
        ]
        if not offered:
            raise BadSignature(f"The {signature_name} header has no v1 signature.")
        # Once per secret, never per entry: the sender chooses how many
        # entries there are, and each signature hashes the whole body.
        expected = [
            standard_signature(msg_id, timestamp, body, secret).encode("ascii")
            for secret in secrets.newest_first
        ]
        if not any(hmac.compare_digest(mine, entry) for mine in expected for entry in offered):
            raise BadSignature(f"The {signature_name} does not match.")
        seconds = millisecond_timestamp(timestamp, f"{timestamp_name} header")
        check_age(seconds * 1000, now, self.tolerance, self.tolerance, timestamp_name)
        data = parse_object(body)
        kind = data.get("type")
        event = StandardWebhook(
            source=callback,
            id=msg_id,
            timestamp=utc_from_ms(seconds * 1000),
            type=kind if isinstance(kind, str) else None,
            data=data.get("data"),
            raw=data,
        )
        return Delivery(
            provider=self.name,
            callback=callback,
            key=msg_id,
            body=body,
            # Stored under the names they came with, to verify again the same way.
            headers={name: headers[name] for name in names},
            dispatches=(Dispatch(webhook_received, event),),
        )

    def answer(self, status: int, reason: str) -> Response:
        return Response(reason, status=status, mimetype="text/plain")


def _header_names(headers: Mapping[str, str]) -> tuple[str, str, str]:
    """The names of the request's three headers: the standard's when all
    three are there, else Svix's when all three of those are (as Svix's own
    libraries choose); neither whole, the set the refusal names is Svix's
    if the request has only Svix headers, else the standard's. Never a mix:
    the three are read together, and whichever set is read, its signature
    covers its id and timestamp, so a stray or forged header of the other
    set changes nothing."""
    for names in (_STANDARD, _SVIX):
        if all(headers.get(name) for name in names):
            return names
    if not any(headers.get(name) for name in _STANDARD) and any(
        headers.get(name) for name in _SVIX
    ):
        return _SVIX
    return _STANDARD


def _secrets(key: str, value: object) -> Secrets:
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values:
        raise ConfigurationError(key, "the list of secrets is empty; give at least one.")
    decoded: list[str | bytes] = []
    for item in values:
        if not isinstance(item, str) or not item.strip():
            raise ConfigurationError(key, 'every secret must be a "whsec_..." string.')
        try:
            decoded.append(decode_secret(item))
        except ValueError as exc:
            raise ConfigurationError(key, str(exc)) from None
    return Secrets(decoded)


def decode_secret(secret: str) -> bytes:
    """The key of a ``whsec_…`` secret (the prefix may be left out), decoded
    strictly: the testing kit signs with exactly the key this provider
    verifies with.

    :raises ValueError: with a reason that never holds the secret.
    """
    try:
        key = base64.b64decode(secret.removeprefix(_PREFIX), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError('a secret is not base64 after its "whsec_" prefix.') from None
    if not key:
        raise ValueError("a secret is empty.")
    return key
