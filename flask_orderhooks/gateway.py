"""Payment gateway: collect and payout order results.

The ``sign`` field is an MD5 over every other non-empty field, sorted by key,
as ``k1=v1&k2=v2…``, with the merchant key added by
``ORDERHOOKS_GATEWAY_SIGN_TEMPLATE``. Values are signed as their JSON text, so
numbers are parsed to exact decimals that remember how they were written.
The platform reads the plain-text body: ``success`` is done, anything else
is retried.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any, ClassVar

from flask import Response

from .config import Secrets, read_secrets
from .events import PaymentCollected, PayoutFinished
from .exc import BadSignature, ConfigurationError, MalformedPayload
from .jsonbody import JSONDecimal, parse_object, render_value
from .provider import (
    Delivery,
    Dispatch,
    Provider,
    opt_str,
    req_int,
    req_str,
    signature_matches,
)
from .signals import payment_collected, payout_finished


def gateway_sign_string(fields: Mapping[str, Any], key: str, template: str) -> str:
    """The text the gateway hashes: non-empty fields but ``sign``, sorted."""
    params = "&".join(
        f"{name}={render_value(fields[name])}"
        for name in sorted(fields)
        if name != "sign" and fields[name] is not None and fields[name] != ""
    )
    return template.format(params=params, key=key)


def gateway_signature(fields: Mapping[str, Any], key: str, template: str) -> str:
    """The ``sign`` value the gateway sends: lower-case hex MD5."""
    text = gateway_sign_string(fields, key, template)
    # MD5 is the platform's choice, not ours; it is not used for security here.
    return hashlib.md5(text.encode("utf-8"), usedforsecurity=False).hexdigest()


_AMOUNT = re.compile(r"-?[0-9]{1,30}(\.[0-9]{1,30})?")


def _amount(obj: Mapping[str, Any], name: str, *, required: bool) -> Decimal | None:
    value = obj.get(name)
    # "" like null: the signing rule leaves both out, so the gateway sends
    # both for "no value" (a processing collect has paid nothing yet).
    if value in (None, "") and not required:
        return None
    if isinstance(value, JSONDecimal) or (isinstance(value, int) and not isinstance(value, bool)):
        return Decimal(value)
    # Decimal() alone would also take " 100.00 ", "1_000", "+5" or Arabic-Indic
    # digits: an amount is plain ASCII digits with an optional fraction.
    if isinstance(value, str) and _AMOUNT.fullmatch(value):
        return Decimal(value)
    raise MalformedPayload(f"The field {name!r} must be a decimal amount.")


#: Fields only one kind of callback carries (the platform's field lists).
#: The sign covers the fields but not the kind, and both kinds use the same
#: key, so a signed collect body is just as well signed on the payout route.
_ONLY_IN = {
    "collect": ("payed_amount", "channel"),
    "payout": ("canceled_at",),
}


def _refuse_the_other_kind(callback: str, data: Mapping[str, Any]) -> None:
    """Refuse a body that carries a field only the other kind of callback
    has: a captured collect result posted to the payout route would
    otherwise be a signed, successful payout of the same ``trans_id``."""
    for kind, fields in _ONLY_IN.items():
        if kind == callback:
            continue
        for name in fields:
            if data.get(name) not in (None, ""):
                raise MalformedPayload(
                    f"The body has {name!r}, a field of {kind} callbacks, not of {callback} "
                    "callbacks: it was posted to the wrong route."
                )


class GatewayProvider(Provider):
    """The payment gateway: ``ORDERHOOKS_GATEWAY_KEY`` turns it on, either one
    key (or rotation list) for every merchant or ``{mch_id: key or list}``;
    ``ORDERHOOKS_GATEWAY_SIGN_TEMPLATE`` says where the key goes in the
    signed text. Its signature has no timestamp: a captured callback stays
    valid forever, so purge keeps a tombstone of every gateway delivery."""

    name = "gateway"
    routes: Mapping[str, str] = {
        "collect": "/gateway/collect",
        "payout": "/gateway/payout",
    }
    signals = (payment_collected, payout_finished)
    config_defaults: ClassVar[Mapping[str, Any]] = {
        "ORDERHOOKS_GATEWAY_KEY": None,
        "ORDERHOOKS_GATEWAY_SIGN_TEMPLATE": "{params}&key={key}",
    }

    def __init__(
        self,
        *,
        default_keys: Secrets | None = None,
        merchant_keys: Mapping[str, Secrets] | None = None,
        sign_template: str = "{params}&key={key}",
    ) -> None:
        self.default_keys = default_keys
        self.merchant_keys = merchant_keys
        self.sign_template = sign_template

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> GatewayProvider | None:
        default_keys, merchant_keys = _gateway_keys(config.get("ORDERHOOKS_GATEWAY_KEY"))
        template = _sign_template(config.get("ORDERHOOKS_GATEWAY_SIGN_TEMPLATE"))
        if default_keys is None and not merchant_keys:
            return None
        return cls(default_keys=default_keys, merchant_keys=merchant_keys, sign_template=template)

    def keys_for(self, mch_id: str) -> Secrets | None:
        """The keys that may have signed a callback of merchant ``mch_id``."""
        if self.merchant_keys is not None:
            return self.merchant_keys.get(mch_id)
        return self.default_keys

    def read(
        self, callback: str, body: bytes, headers: Mapping[str, str], *, now: float | None
    ) -> Delivery:
        # The signature lives inside the body, so the body is parsed (strictly,
        # and nothing more) before it can be verified.
        data = parse_object(body)
        self._verify(data)
        _refuse_the_other_kind(callback, data)
        status = req_int(data, "status")
        common: dict[str, Any] = {
            "id": req_str(data, "id"),
            "trans_id": req_str(data, "trans_id"),
            "mch_id": req_int(data, "mch_id"),
            "order_amount": _amount(data, "order_amount", required=True),
            "status": status,
            "created_at": opt_str(data, "created_at"),
            "payed_at": opt_str(data, "payed_at"),
            "raw": data,
        }
        if callback == "collect":
            dispatch = Dispatch(
                payment_collected,
                PaymentCollected(
                    payed_amount=_amount(data, "payed_amount", required=False),
                    channel=opt_str(data, "channel"),
                    **common,
                ),
            )
        else:
            dispatch = Dispatch(
                payout_finished,
                PayoutFinished(canceled_at=opt_str(data, "canceled_at"), **common),
            )
        return Delivery(
            provider=self.name,
            callback=callback,
            # A new status of the same order is a new event; the same status
            # again is a duplicate.
            key=f"{common['id']}:{status}",
            body=body,
            headers={},
            dispatches=(dispatch,),
            # The merchant's own order id: what support staff look up.
            reference=common["trans_id"],
        )

    def _verify(self, data: Mapping[str, Any]) -> None:
        given = data.get("sign")
        if given is None:
            raise BadSignature("The body has no sign field.")
        if not isinstance(given, str) or not given:
            raise BadSignature("The sign field must be a non-empty string.")
        mch_id = data.get("mch_id")
        merchant = (
            str(mch_id) if isinstance(mch_id, (int, str)) and not isinstance(mch_id, bool) else ""
        )
        keys = self.keys_for(merchant)
        if keys is None:
            raise BadSignature("No key is configured for this mch_id.")
        template = self.sign_template
        if not any(
            signature_matches(gateway_signature(data, key.decode("utf-8"), template), given)
            for key in keys.newest_first
        ):
            raise BadSignature("The sign field does not match.")

    def answer(self, status: int, reason: str) -> Response:
        return Response(
            "success" if status == 200 else "fail", status=status, mimetype="text/plain"
        )


def _gateway_keys(value: object) -> tuple[Secrets | None, Mapping[str, Secrets] | None]:
    key = "ORDERHOOKS_GATEWAY_KEY"
    if value is None:
        return None, None
    if isinstance(value, Mapping):
        if not value:
            raise ConfigurationError(key, "the merchant mapping is empty; give {mch_id: key}.")
        merchants: dict[str, Secrets] = {}
        for mch_id, keys in value.items():
            if isinstance(mch_id, bool) or not isinstance(mch_id, (str, int)):
                raise ConfigurationError(key, "merchant ids must be strings or integers.")
            if str(mch_id) in merchants:
                # 10001 and "10001" are one merchant: which key would verify?
                raise ConfigurationError(key, f"the merchant id {str(mch_id)!r} is given twice.")
            merchants[str(mch_id)] = read_secrets(f"{key}[{mch_id!r}]", keys)
        return None, merchants
    return read_secrets(key, value), None


def _sign_template(value: object) -> str:
    key = "ORDERHOOKS_GATEWAY_SIGN_TEMPLATE"
    if not isinstance(value, str):
        raise ConfigurationError(key, 'must be a string such as "{params}&key={key}".')
    try:
        rendered = value.format(params="\0P", key="\0K")
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigurationError(
            key, f"may only use the fields {{params}} and {{key}} ({exc.__class__.__name__})."
        ) from None
    if rendered.count("\0P") != 1 or rendered.count("\0K") != 1:
        raise ConfigurationError(key, "must contain {params} and {key} exactly once each.")
    return value
