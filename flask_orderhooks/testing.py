"""Build correctly signed callbacks, for tests and for trying a deployment.

Each function returns a :class:`SignedCallback` (body bytes and headers)
signed with the same code the verifiers use, with the secret given or the
newest one configured on the app (``app=`` or the current app)::

    from flask_orderhooks.testing import gateway_collect

    cb = gateway_collect(trans_id="T1", payed_amount="99.00", app=app)
    response = client.post(cb.url(), data=cb.body, headers=cb.headers)

.. versionadded:: 0.1
"""

from __future__ import annotations

import json
import re
import secrets as _random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, TypeVar

from flask import Flask, current_app, has_app_context

from .extension import get_extension
from .gateway import GatewayProvider, gateway_signature
from .igv import IGVProvider, igv_signature
from .jsonbody import parse_object
from .provider import Provider
from .standard_webhooks import StandardWebhooksProvider, decode_secret, standard_signature
from .sud import ORDER_BATCH_CHANGED, ORDER_CHANGED, SUDProvider, sud_signature

#: The platform and callback names :func:`build` and ``flask orderhooks send`` take.
KINDS = ("igv", "collect", "payout", "sud", "sud-batch", "standard")


@dataclass(frozen=True)
class SignedCallback:
    """A signed callback request, ready to post.

    :param path: the route below the extension's URL prefix.
    :param key: the idempotency key the store will file it under.
    """

    provider: str
    callback: str
    path: str
    body: bytes
    headers: dict[str, str] = field(repr=False)
    key: str

    def url(self, prefix: str = "/orderhooks") -> str:
        """The request path under ``prefix`` (``ORDERHOOKS_URL_PREFIX``)."""
        return prefix.rstrip("/") + self.path

    @property
    def json(self) -> dict[str, Any]:
        """The body, parsed the way the extension parses it."""
        return parse_object(self.body)


_P = TypeVar("_P", bound=Provider)


def _provider(app: Flask | None, cls: type[_P]) -> _P | None:
    """The app's configured provider of type ``cls``, or ``None``."""
    target = app if app is not None else current_app._get_current_object()  # type: ignore[attr-defined]
    provider = get_extension(target).state(target).providers.get(cls.name)
    return provider if isinstance(provider, cls) else None


def _target(app: Flask | None) -> Flask | None:
    """``app``, else the current app, else ``None``."""
    if app is None and has_app_context():
        target: Flask = current_app._get_current_object()  # type: ignore[attr-defined]
        return target
    return app


def _configured(app: Flask | None, cls: type[_P]) -> _P | None:
    """Like :func:`_provider`, but ``None`` without an app or the extension."""
    target = _target(app)
    if target is None or "orderhooks" not in target.extensions:
        return None
    return _provider(target, cls)


def _now_ms(timestamp_ms: int | str | None, app: Flask | None) -> str:
    """The given timestamp, or "now" by the app's clock (``OrderHooks(clock=)``)."""
    if timestamp_ms is not None:
        return str(timestamp_ms)
    target = _target(app)
    clock: Callable[[], float] = time.time
    if target is not None and "orderhooks" in target.extensions:
        clock = get_extension(target).state(target).clock
    return str(int(clock() * 1000))


def _igv_secret(secret: str | None, app: Flask | None) -> str:
    if secret is not None:
        return secret
    provider = _provider(app, IGVProvider)
    if provider is None:
        raise LookupError("ORDERHOOKS_IGV_SECRET is not configured; pass secret=.")
    return provider.secrets.newest.decode("utf-8")


def igv_order_status(
    secret: str | None = None,
    *,
    request_id: str | None = None,
    timestamp_ms: int | str | None = None,
    order_id: int = 1689644928115784,
    order_num: str | None = None,
    seller_order_status: int = 1,
    buyer_id: str = "1907369850568257537",
    created_at: str = "2025-12-17T13:44:16",
    extra: Mapping[str, Any] | None = None,
    app: Flask | None = None,
) -> SignedCallback:
    """An iGV order status callback (``X-Signature`` over timestamp and id)."""
    key = _igv_secret(secret, app)
    request_id = request_id or str(_random.randbelow(10**19))
    timestamp = _now_ms(timestamp_ms, app)
    body = {
        "createdAt": created_at,
        "orderId": order_id,
        "orderNum": order_num or f"SO{order_id}",
        "sellerOrderStatus": seller_order_status,
        "buyerId": buyer_id,
        **(extra or {}),
    }
    headers = {
        "Content-Type": "application/json",
        "X-Request-Id": request_id,
        "X-Timestamp": timestamp,
        "X-Signature": igv_signature(timestamp, request_id, key.encode("utf-8")),
    }
    return SignedCallback(
        "igv", "order-status", "/igv/order-status", _dumps(body), headers, request_id
    )


#: ``ORDERHOOKS_GATEWAY_SIGN_TEMPLATE``'s default: a key given without an app.
_DEFAULT_SIGN_TEMPLATE: str = GatewayProvider.config_defaults["ORDERHOOKS_GATEWAY_SIGN_TEMPLATE"]


def _gateway_key(secret: str | None, app: Flask | None, mch_id: int) -> tuple[str, str]:
    """The key (``secret=``, else the app's newest for ``mch_id``) and the
    sign template, which comes from the app (``app=`` or the current one)
    whichever way the key does."""
    if secret is not None:
        # A key passed in must still be signed the way that app verifies, as
        # the SUD builders follow its timestamp unit: with its template.
        configured = _configured(app, GatewayProvider)
        return secret, configured.sign_template if configured else _DEFAULT_SIGN_TEMPLATE
    provider = _provider(app, GatewayProvider)
    keys = provider.keys_for(str(mch_id)) if provider else None
    if provider is None or keys is None:
        raise LookupError(f"No ORDERHOOKS_GATEWAY_KEY for mch_id {mch_id}; pass secret=.")
    return keys.newest.decode("utf-8"), provider.sign_template


def _gateway(
    callback: str,
    secret: str | None,
    app: Flask | None,
    template: str | None,
    fields: dict[str, Any],
    extra: Mapping[str, Any] | None,
) -> SignedCallback:
    key, configured_template = _gateway_key(secret, app, fields["mch_id"])
    body = {**fields, **(extra or {})}
    unsigned = _dumps(body)
    # Signing the parsed body is what the verifier does: one implementation.
    body["sign"] = gateway_signature(parse_object(unsigned), key, template or configured_template)
    return SignedCallback(
        "gateway",
        callback,
        f"/gateway/{callback}",
        _dumps(body),
        {"Content-Type": "application/json"},
        f"{fields['id']}:{fields['status']}",
    )


def gateway_collect(
    secret: str | None = None,
    *,
    id: str | None = None,
    trans_id: str = "ORDER-10001",
    mch_id: int = 10001,
    order_amount: str | Decimal = "100.00",
    payed_amount: str | Decimal | None = None,
    channel: str = "bank",
    status: int = 60,
    created_at: str = "2026-05-04 10:05:00",
    payed_at: str | None = "2026-05-04 10:06:10",
    template: str | None = None,
    extra: Mapping[str, Any] | None = None,
    app: Flask | None = None,
) -> SignedCallback:
    """A gateway collect result. A :class:`~decimal.Decimal` amount is sent as
    a JSON number (the older form), a string as a string."""
    fields = {
        "id": id or f"C{_random.randbelow(10**12):012d}",
        "trans_id": trans_id,
        "mch_id": mch_id,
        "order_amount": order_amount,
        "payed_amount": order_amount if payed_amount is None else payed_amount,
        "channel": channel,
        "status": status,
        "created_at": created_at,
        "payed_at": payed_at,
    }
    return _gateway("collect", secret, app, template, fields, extra)


def gateway_payout(
    secret: str | None = None,
    *,
    id: str | None = None,
    trans_id: str = "WDL-10001",
    mch_id: int = 10001,
    order_amount: str | Decimal = "100.00",
    status: int = 60,
    created_at: str = "2026-05-04 10:10:00",
    payed_at: str | None = None,
    canceled_at: str | None = None,
    template: str | None = None,
    extra: Mapping[str, Any] | None = None,
    app: Flask | None = None,
) -> SignedCallback:
    """A gateway payout result (``status`` 60 success, 50 canceled)."""
    fields: dict[str, Any] = {
        "id": id or f"P{_random.randbelow(10**12):012d}",
        "trans_id": trans_id,
        "mch_id": mch_id,
        "order_amount": order_amount,
        "status": status,
        "created_at": created_at,
    }
    if status == 60:
        fields["payed_at"] = payed_at or "2026-05-04 10:15:00"
    if status == 50:
        fields["canceled_at"] = canceled_at or "2026-05-04 10:23:00"
    return _gateway("payout", secret, app, template, fields, extra)


def sud_order(**fields: Any) -> dict[str, Any]:
    """One SUD order entry with sensible defaults; keyword fields override."""
    order_id = str(fields.pop("order_id", _random.randbelow(10**13)))
    return {
        "order_id": order_id,
        "out_order_id": f"OUT-{order_id}",
        "mg_id": "1461564080052506636",
        "room_id": "9009",
        "cmd": "gift",
        "from_uid": "u001",
        "to_uid": "u002",
        "value": 1,
        "seq": 0,
        "payload": {"score": 1},
        "status": "EXECUTE_SUCCESS",
        **fields,
    }


#: A timestamp the SUD kit can write in seconds too.
_WHOLE_MS = re.compile(r"[0-9]+")


def _sud(
    secret: str | None,
    app_id: str | None,
    app: Flask | None,
    notify_id: str | None,
    notify_event: str,
    data: Mapping[str, Any],
    timestamp_ms: int | str | None,
    timestamp_unit: str | None,
    nonce: str | None,
    extra: Mapping[str, Any] | None,
) -> SignedCallback:
    if app_id is None or secret is None:
        sud = _provider(app, SUDProvider)
        apps = sud.apps if sud else None
        if not apps:
            raise LookupError("ORDERHOOKS_SUD_APPS is not configured; pass app_id= and secret=.")
        app_id = app_id or next(iter(apps))
        if secret is None:
            if app_id not in apps:
                raise LookupError(f"App {app_id!r} is not in ORDERHOOKS_SUD_APPS; pass secret=.")
            secret = apps[app_id].newest.decode("utf-8")
    notify_time = _now_ms(timestamp_ms, app)
    if timestamp_unit is None:
        sud = _configured(app, SUDProvider)
        timestamp_unit = sud.timestamp_unit if sud else "ms"
    if timestamp_unit not in ("ms", "s"):
        raise ValueError(f'timestamp_unit must be "ms" or "s", not {timestamp_unit!r}.')
    timestamp = notify_time
    if timestamp_unit == "s" and _WHOLE_MS.fullmatch(notify_time):
        # notify_time stays in ms: the protocol gives it so whatever the header's unit.
        timestamp = str(int(notify_time) // 1000)
    notify_id = notify_id or _random.token_hex(32)
    body = _dumps(
        {
            "notify_id": notify_id,
            "notify_time": notify_time,
            "app_id": app_id,
            "notify_event": notify_event,
            "data": dict(data),
            **(extra or {}),
        }
    )
    nonce = nonce or _random.token_urlsafe(12)
    headers = {
        "Content-Type": "application/json",
        "Sud-AppId": app_id,
        "Sud-Timestamp": timestamp,
        "Sud-Nonce": nonce,
        "Sud-Signature": sud_signature(app_id, timestamp, nonce, body, secret.encode("utf-8")),
    }
    return SignedCallback("sud", "order-changed", "/sud/order-changed", body, headers, notify_id)


def sud_order_changed(
    secret: str | None = None,
    *,
    app_id: str | None = None,
    notify_id: str | None = None,
    timestamp_ms: int | str | None = None,
    timestamp_unit: str | None = None,
    nonce: str | None = None,
    extra: Mapping[str, Any] | None = None,
    app: Flask | None = None,
    **order: Any,
) -> SignedCallback:
    """A SUD ``order.changed`` notification; keyword fields go into the order.

    :param timestamp_ms: the notification's time in Unix milliseconds
        (default: now by the app's clock), written into ``notify_time``.
    :param timestamp_unit: the unit of the ``Sud-Timestamp`` header, ``"ms"``
        or ``"s"`` (default: the app's ``ORDERHOOKS_SUD_TIMESTAMP_UNIT``, or
        ``"ms"`` without an app). A ``timestamp_ms`` that is not whole
        milliseconds is sent as given, in both places.

    .. versionchanged:: 0.3
        ``Sud-Timestamp`` follows ``ORDERHOOKS_SUD_TIMESTAMP_UNIT``;
        ``timestamp_unit``.
    """
    return _sud(
        secret,
        app_id,
        app,
        notify_id,
        ORDER_CHANGED,
        sud_order(**order),
        timestamp_ms,
        timestamp_unit,
        nonce,
        extra,
    )


def sud_order_batch_changed(
    secret: str | None = None,
    *,
    orders: Sequence[Mapping[str, Any]] | None = None,
    app_id: str | None = None,
    notify_id: str | None = None,
    timestamp_ms: int | str | None = None,
    timestamp_unit: str | None = None,
    nonce: str | None = None,
    extra: Mapping[str, Any] | None = None,
    app: Flask | None = None,
) -> SignedCallback:
    """A SUD ``order.batch.changed`` notification (default: two orders);
    the timestamp as in :func:`sud_order_changed`.

    .. versionchanged:: 0.3
        ``Sud-Timestamp`` follows ``ORDERHOOKS_SUD_TIMESTAMP_UNIT``;
        ``timestamp_unit``.
    """
    entries = [dict(o) for o in orders] if orders is not None else [sud_order(), sud_order()]
    data = {"mg_id": "1461564080052506636", "room_id": "9009", "orders": entries}
    return _sud(
        secret,
        app_id,
        app,
        notify_id,
        ORDER_BATCH_CHANGED,
        data,
        timestamp_ms,
        timestamp_unit,
        nonce,
        extra,
    )


def standard_webhook(
    secret: str | None = None,
    *,
    source: str | None = None,
    type: str = "order.paid",
    data: Mapping[str, Any] | None = None,
    msg_id: str | None = None,
    timestamp: int | str | None = None,
    extra: Mapping[str, Any] | None = None,
    app: Flask | None = None,
) -> SignedCallback:
    """A Standard Webhooks message for ``source`` (default: the first one of
    ``ORDERHOOKS_STANDARD_WEBHOOKS``), signed with ``secret`` (a ``whsec_…``
    string; default: that source's newest).

    :param timestamp: Unix seconds (default: now by the app's clock).
    :raises ValueError: ``timestamp`` is not whole Unix seconds, or
        ``secret`` is not one the provider would accept.

    .. versionadded:: 0.3
    """
    key: bytes
    if secret is None or source is None:
        provider = _provider(app, StandardWebhooksProvider)
        sources = provider.sources if provider else {}
        if not sources:
            raise LookupError(
                "ORDERHOOKS_STANDARD_WEBHOOKS is not configured; pass source= and secret=."
            )
        source = source or next(iter(sources))
        if secret is None:
            if source not in sources:
                raise LookupError(f"No secret for the source {source!r}; pass secret=.")
            key = sources[source].newest
    if secret is not None:
        try:
            key = decode_secret(secret)
        except ValueError as exc:
            # A secret the provider would refuse at start-up must not sign
            # with some other key (b64decode drops what it cannot read).
            raise ValueError(f"secret: {exc}") from None
    assert source is not None
    msg_id = msg_id or "msg_" + _random.token_urlsafe(18)
    stamp = str(timestamp) if timestamp is not None else str(int(_now_ms(None, app)) // 1000)
    body = _dumps(
        {
            "type": type,
            "timestamp": _unix_time(stamp).isoformat(),
            "data": dict(data) if data is not None else {"id": "ord_" + _random.token_hex(8)},
            **(extra or {}),
        }
    )
    headers = {
        "Content-Type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": stamp,
        "webhook-signature": standard_signature(msg_id, stamp, body, key),
    }
    return SignedCallback("standard", source, f"/standard/{source}", body, headers, msg_id)


#: A ``webhook-timestamp`` the route reads: ASCII digits.
_WHOLE_SECONDS = re.compile(r"[0-9]+")


def _unix_time(stamp: str) -> datetime:
    """The time of a ``webhook-timestamp``, written into the body too.

    :raises ValueError: ``stamp`` is not whole Unix seconds of a year
        between 1 and 9999.
    """
    try:
        # ASCII digits only, as the route reads the header: int() would take
        # "1_767_225_600", "+1", "-5", padding and other scripts' digits.
        if not _WHOLE_SECONDS.fullmatch(stamp):
            raise ValueError(stamp)
        return datetime.fromtimestamp(int(stamp), UTC)
    except (ValueError, OverflowError, OSError):
        # fromtimestamp() refuses a year out of its range.
        raise ValueError(
            f"timestamp must be whole Unix seconds of a year from 1 to 9999, such as 1767225600, "
            f"not {stamp!r}."
        ) from None


def build(kind: str, *, app: Flask | None = None, **fields: Any) -> SignedCallback:
    """Build a callback by kind name: one of :data:`KINDS`, or a configured
    provider's ``"<name>"`` / ``"<name>:<callback>"`` (its
    :meth:`~flask_orderhooks.Provider.sample`).

    .. versionchanged:: 0.3
        A host provider's kinds.
    """
    builders: dict[str, Any] = {
        "igv": igv_order_status,
        "collect": gateway_collect,
        "payout": gateway_payout,
        "sud": sud_order_changed,
        "sud-batch": sud_order_batch_changed,
        "standard": standard_webhook,
    }
    if kind not in builders:
        return _sample(kind, app, fields)
    result: SignedCallback = builders[kind](app=app, **fields)
    return result


def _sample(kind: str, app: Flask | None, fields: dict[str, Any]) -> SignedCallback:
    name, _, callback = kind.partition(":")
    target = app
    if target is None and has_app_context():
        target = current_app._get_current_object()  # type: ignore[attr-defined]
    provider = None
    if target is not None and "orderhooks" in target.extensions:
        provider = get_extension(target).state(target).providers.get(name)
    if provider is None:
        raise ValueError(
            f"Unknown callback kind {kind!r}; use one of {', '.join(KINDS)}, "
            "or a configured provider's name."
        )
    return provider.sample(callback or next(iter(provider.routes)), **fields)


# A private-use character marks a Decimal while json.dumps runs, so it can be
# written back as a bare JSON number with exactly its own text.
_MARK = "\ue000"
_MARKED_NUMBER = re.compile(f'"{_MARK}([^"{_MARK}]*){_MARK}"')


def _dumps(body: Mapping[str, Any]) -> bytes:
    """Compact JSON; a Decimal is written as a JSON number with its own text."""

    def encode(value: object) -> str:
        if isinstance(value, Decimal):
            return f"{_MARK}{value}{_MARK}"
        raise TypeError(f"{type(value).__name__} is not JSON serializable")

    text = json.dumps(body, separators=(",", ":"), ensure_ascii=False, default=encode)
    return _MARKED_NUMBER.sub(r"\1", text).encode("utf-8")
