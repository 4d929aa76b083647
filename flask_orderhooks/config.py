"""Reading and checking the ``ORDERHOOKS_*`` config, once, in ``init_app``.

Every value is validated here so that a typo fails at start-up with a message
naming the key, never on the first callback at three in the morning.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .exc import ConfigurationError

#: The platforms the extension knows, as used in config and in the store.
PLATFORMS = ("igv", "gateway", "sud")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULTS: dict[str, Any] = {
    "ORDERHOOKS_URL_PREFIX": "/orderhooks",
    "ORDERHOOKS_IGV_SECRET": None,
    "ORDERHOOKS_IGV_MAX_AGE": 3600,
    "ORDERHOOKS_MAX_CLOCK_SKEW": 300,
    "ORDERHOOKS_GATEWAY_KEY": None,
    "ORDERHOOKS_GATEWAY_SIGN_TEMPLATE": "{params}&key={key}",
    "ORDERHOOKS_SUD_APPS": None,
    "ORDERHOOKS_SUD_VERIFY": True,
    "ORDERHOOKS_SUD_MAX_AGE": 3600,
    "ORDERHOOKS_SUD_TIMESTAMP_UNIT": "ms",
    "ORDERHOOKS_DATABASE_URI": None,
    "ORDERHOOKS_DUPLICATE_WAIT": 3.0,
    "ORDERHOOKS_CLAIM_TIMEOUT": 30.0,
    "ORDERHOOKS_MAX_BODY": 64 * 1024,
    "ORDERHOOKS_ALLOWED_IPS": None,
    "ORDERHOOKS_DISPATCH": "inline",
    # 10 s, 1 min, 5 min, 30 min, 2 h, 12 h: seven attempts over about 15
    # hours, well past every platform's own retries (the gateway's 60 s,
    # iGV's 35 minutes), so a receiver's outage of an evening is survived.
    "ORDERHOOKS_RETRY_DELAYS": [10, 60, 300, 1800, 7200, 43200],
    "ORDERHOOKS_WORKER_POLL_INTERVAL": 0.5,
    # Off by default: the operator console and the metrics endpoint open
    # only where the host asks for them.
    "ORDERHOOKS_CONSOLE_URL": None,
    "ORDERHOOKS_METRICS_URL": None,
}

#: The dispatch modes: receivers run in the platform's request, or on a worker.
DISPATCH_MODES = ("inline", "deferred")


class Secrets:
    """One or more secrets, newest first, that never show in a repr or a log.

    Config lists them oldest first (rotation: append the new one, remove the
    old one later), the way Flask's ``SECRET_KEY_FALLBACKS`` does; verification
    tries the newest first because it is the one that normally matches.
    """

    __slots__ = ("_values",)

    def __init__(self, oldest_first: Sequence[str]) -> None:
        self._values = tuple(s.encode("utf-8") for s in reversed(oldest_first))

    @property
    def newest_first(self) -> tuple[bytes, ...]:
        return self._values

    @property
    def newest(self) -> bytes:
        return self._values[0]

    def __repr__(self) -> str:
        return f"<Secrets: {len(self._values)} hidden>"

    __str__ = __repr__


@dataclass(frozen=True)
class Settings:
    """The validated configuration of one app. Its repr hides every secret."""

    url_prefix: str
    igv_secrets: Secrets | None
    igv_max_age: float | None
    max_clock_skew: float
    gateway_default_keys: Secrets | None
    gateway_merchant_keys: Mapping[str, Secrets] | None
    gateway_sign_template: str
    sud_apps: Mapping[str, Secrets] | None
    sud_verify: bool
    sud_max_age: float | None
    sud_timestamp_unit: str
    # A database URL may carry a password: kept out of the repr.
    database_uri: str | None = field(repr=False)
    duplicate_wait: float
    claim_timeout: float
    max_body: int
    allowed_ips: Mapping[str, tuple[IPNetwork, ...]] = field(default_factory=dict)
    dispatch: str = "inline"
    retry_delays: tuple[float, ...] = ()
    worker_poll_interval: float = 0.5

    @property
    def deferred(self) -> bool:
        return self.dispatch == "deferred"

    @property
    def gateway_enabled(self) -> bool:
        return self.gateway_default_keys is not None or bool(self.gateway_merchant_keys)

    @property
    def enabled_platforms(self) -> tuple[str, ...]:
        on = {
            "igv": self.igv_secrets is not None,
            "gateway": self.gateway_enabled,
            "sud": bool(self.sud_apps),
        }
        return tuple(p for p in PLATFORMS if on[p])

    def gateway_keys_for(self, mch_id: str) -> Secrets | None:
        if self.gateway_merchant_keys is not None:
            return self.gateway_merchant_keys.get(mch_id)
        return self.gateway_default_keys


def load_settings(config: Mapping[str, Any]) -> Settings:
    """Validate the ``ORDERHOOKS_*`` keys of ``config``.

    :raises ConfigurationError: naming the first key that is wrong.
    """
    gateway_default, gateway_merchants = _gateway_keys(config["ORDERHOOKS_GATEWAY_KEY"])
    unit = config["ORDERHOOKS_SUD_TIMESTAMP_UNIT"]
    if unit not in ("ms", "s"):
        raise ConfigurationError(
            "ORDERHOOKS_SUD_TIMESTAMP_UNIT", f'must be "ms" or "s", not {unit!r}.'
        )
    sud_verify = config["ORDERHOOKS_SUD_VERIFY"]
    if not isinstance(sud_verify, bool):
        raise ConfigurationError("ORDERHOOKS_SUD_VERIFY", "must be True or False.")
    prefix = config["ORDERHOOKS_URL_PREFIX"]
    if not isinstance(prefix, str) or (prefix and not prefix.startswith("/")):
        raise ConfigurationError(
            "ORDERHOOKS_URL_PREFIX", 'must be a path starting with "/", such as "/orderhooks".'
        )
    database_uri = config["ORDERHOOKS_DATABASE_URI"]
    if database_uri is not None and (not isinstance(database_uri, str) or not database_uri):
        raise ConfigurationError(
            "ORDERHOOKS_DATABASE_URI", "must be a SQLAlchemy database URL string or None."
        )
    return Settings(
        url_prefix=prefix.rstrip("/"),
        igv_secrets=_optional_secrets("ORDERHOOKS_IGV_SECRET", config["ORDERHOOKS_IGV_SECRET"]),
        igv_max_age=_seconds("ORDERHOOKS_IGV_MAX_AGE", config, allow_none=True),
        max_clock_skew=_required_seconds("ORDERHOOKS_MAX_CLOCK_SKEW", config),
        gateway_default_keys=gateway_default,
        gateway_merchant_keys=gateway_merchants,
        gateway_sign_template=_sign_template(config["ORDERHOOKS_GATEWAY_SIGN_TEMPLATE"]),
        sud_apps=_sud_apps(config["ORDERHOOKS_SUD_APPS"]),
        sud_verify=sud_verify,
        sud_max_age=_seconds("ORDERHOOKS_SUD_MAX_AGE", config, allow_none=True),
        sud_timestamp_unit=unit,
        database_uri=database_uri,
        duplicate_wait=_required_seconds("ORDERHOOKS_DUPLICATE_WAIT", config),
        claim_timeout=_required_seconds("ORDERHOOKS_CLAIM_TIMEOUT", config, positive=True),
        max_body=_max_body(config["ORDERHOOKS_MAX_BODY"]),
        allowed_ips=_allowed_ips(config["ORDERHOOKS_ALLOWED_IPS"]),
        dispatch=_dispatch(config["ORDERHOOKS_DISPATCH"]),
        retry_delays=_retry_delays(config["ORDERHOOKS_RETRY_DELAYS"]),
        worker_poll_interval=_required_seconds(
            "ORDERHOOKS_WORKER_POLL_INTERVAL", config, positive=True
        ),
    )


def _dispatch(value: object) -> str:
    if value not in DISPATCH_MODES:
        raise ConfigurationError(
            "ORDERHOOKS_DISPATCH", f'must be "inline" or "deferred", not {value!r}.'
        )
    return str(value)


def _retry_delays(value: object) -> tuple[float, ...]:
    key = "ORDERHOOKS_RETRY_DELAYS"
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ConfigurationError(
            key, "must be a list of seconds, such as [10, 60, 300] (an empty list: no retries)."
        )
    delays = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            raise ConfigurationError(key, f"every delay must be a number of seconds, not {item!r}.")
        if not math.isfinite(item) or item < 0:
            raise ConfigurationError(
                key, "every delay must be a finite number of seconds, zero or more."
            )
        delays.append(float(item))
    return tuple(delays)


def _secrets(key: str, value: object) -> Secrets:
    if isinstance(value, str):
        values: list[object] = [value]
    elif isinstance(value, (list, tuple)):
        values = list(value)
        if not values:
            raise ConfigurationError(key, "the list of secrets is empty; give at least one.")
    else:
        raise ConfigurationError(
            key,
            f"must be a string or a list of strings (oldest first), not {type(value).__name__}.",
        )
    for item in values:
        if not isinstance(item, str):
            raise ConfigurationError(
                key, f"every secret must be a string, not {type(item).__name__}."
            )
        if not item.strip():
            raise ConfigurationError(key, "a secret is empty; remove it or set a real secret.")
    return Secrets([str(v) for v in values])


def _optional_secrets(key: str, value: object) -> Secrets | None:
    return None if value is None else _secrets(key, value)


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
            merchants[str(mch_id)] = _secrets(f"{key}[{mch_id!r}]", keys)
        return None, merchants
    return _secrets(key, value), None


def _sud_apps(value: object) -> Mapping[str, Secrets] | None:
    key = "ORDERHOOKS_SUD_APPS"
    if value is None:
        return None
    if not isinstance(value, Mapping) or not value:
        raise ConfigurationError(key, "must be a non-empty mapping {app_id: secret or list}.")
    apps: dict[str, Secrets] = {}
    for app_id, secrets in value.items():
        if isinstance(app_id, bool) or not isinstance(app_id, (str, int)) or not str(app_id):
            raise ConfigurationError(key, "app ids must be non-empty strings.")
        apps[str(app_id)] = _secrets(f"{key}[{app_id!r}]", secrets)
    return apps


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


def _seconds(key: str, config: Mapping[str, Any], *, allow_none: bool) -> float | None:
    value = config[key]
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "a number of seconds or None" if allow_none else "a number of seconds"
        raise ConfigurationError(key, f"must be {kind}, not {type(value).__name__}.")
    if not math.isfinite(value) or value < 0:
        raise ConfigurationError(key, "must be a finite number of seconds, zero or more.")
    return float(value)


def _required_seconds(key: str, config: Mapping[str, Any], *, positive: bool = False) -> float:
    value = _seconds(key, config, allow_none=False)
    assert value is not None
    if positive and value == 0:
        raise ConfigurationError(key, "must be more than zero seconds.")
    return value


def _max_body(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigurationError("ORDERHOOKS_MAX_BODY", "must be a positive number of bytes.")
    return value


def _allowed_ips(value: object) -> Mapping[str, tuple[IPNetwork, ...]]:
    key = "ORDERHOOKS_ALLOWED_IPS"
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigurationError(
            key, 'must be a mapping such as {"gateway": ["203.0.113.0/24"]}, or None.'
        )
    allowed: dict[str, tuple[IPNetwork, ...]] = {}
    for platform, networks in value.items():
        if platform not in PLATFORMS:
            raise ConfigurationError(
                key, f"unknown platform {platform!r}; use one of {', '.join(PLATFORMS)}."
            )
        if isinstance(networks, str) or not isinstance(networks, (list, tuple)) or not networks:
            raise ConfigurationError(
                f"{key}[{platform!r}]", "must be a non-empty list of addresses or CIDR networks."
            )
        parsed = []
        for network in networks:
            try:
                parsed.append(ipaddress.ip_network(network, strict=False))
            except (TypeError, ValueError):
                raise ConfigurationError(
                    f"{key}[{platform!r}]", f"{network!r} is not an address or CIDR network."
                ) from None
        allowed[platform] = tuple(parsed)
    return allowed
