"""Reading and checking the ``ORDERHOOKS_*`` config, once, in ``init_app``.

Every value is validated here so that a wrong one fails at start-up with a
message naming the key, never on the first callback at three in the morning;
a misspelt key, which nothing reads, is logged with the key it resembles
(:func:`unknown_keys`). Only the
keys of the pipeline itself live here; each platform's keys belong to its
provider (:meth:`.Provider.from_config`), which reads them with the same
checkers (:func:`read_secrets`, :func:`read_seconds`).
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from .exc import ConfigurationError
from .networks import IPNetwork, parse_networks

DEFAULTS: dict[str, Any] = {
    "ORDERHOOKS_URL_PREFIX": "/orderhooks",
    # How far ahead of this server's clock a signed timestamp may be, for
    # every provider that checks one.
    "ORDERHOOKS_MAX_CLOCK_SKEW": 300,
    "ORDERHOOKS_DATABASE_URI": None,
    "ORDERHOOKS_DUPLICATE_WAIT": 3.0,
    "ORDERHOOKS_CLAIM_TIMEOUT": 30.0,
    "ORDERHOOKS_MAX_BODY": 64 * 1024,
    "ORDERHOOKS_ALLOWED_IPS": None,
    "ORDERHOOKS_DISPATCH": "inline",
    # 10 s, 1 min, 5 min, 30 min, 2 h, 12 h: seven attempts over about 15
    # hours, well past the platforms' own retries (a minute to half an
    # hour), so a receiver's outage of an evening is survived.
    "ORDERHOOKS_RETRY_DELAYS": [10, 60, 300, 1800, 7200, 43200],
    "ORDERHOOKS_WORKER_POLL_INTERVAL": 0.5,
    # Off by default: the operator console and the metrics endpoint open
    # only where the host asks for them.
    "ORDERHOOKS_CONSOLE_URL": None,
    "ORDERHOOKS_METRICS_URL": None,
}

#: The dispatch modes: receivers run in the platform's request, or on a worker.
DISPATCH_MODES = ("inline", "deferred")

#: The keys of the optional parts (the console's ``DEFAULTS``, the metrics'
#: ``METRICS_DEFAULTS``), which those modules read only when they are on:
#: named here, so that a misspelt key is noticed without importing them.
OPTIONAL_KEYS = (
    "ORDERHOOKS_CONSOLE_PAGE_SIZE",
    "ORDERHOOKS_CONSOLE_CSRF_MAX_AGE",
    "ORDERHOOKS_METRICS_ALLOWED_IPS",
    "ORDERHOOKS_METRICS_REGISTRY",
    "ORDERHOOKS_METRICS_BUCKETS",
)
#: What every key of the extension's own starts with.
KEY_PREFIX = "ORDERHOOKS_"


def known_keys(provider_defaults: Iterable[Mapping[str, Any]]) -> set[str]:
    """Every key the extension reads: its own, its optional parts', and the
    providers' (their ``config_defaults``)."""
    known = {*DEFAULTS, *OPTIONAL_KEYS}
    for defaults in provider_defaults:
        known.update(defaults)
    return known


def unknown_keys(config: Mapping[str, Any], known: Iterable[str]) -> list[tuple[str, str | None]]:
    """``ORDERHOOKS_*`` keys of ``config`` that nothing reads, each with the
    known key it most resembles (or ``None``): a platform's secret under a
    misspelt key would otherwise leave the platform off with no word of why."""
    known = set(known)
    found = []
    for key in sorted(k for k in config if isinstance(k, str) and k.startswith(KEY_PREFIX)):
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.8)
            found.append((key, close[0] if close else None))
    return found


class Secrets:
    """One or more secrets, newest first, that never show in a repr or a log.

    Config lists them oldest first (rotation: append the new one, remove the
    old one later), the way Flask's ``SECRET_KEY_FALLBACKS`` does; verification
    tries the newest first because it is the one that normally matches.
    """

    __slots__ = ("_values",)

    def __init__(self, oldest_first: Sequence[str | bytes]) -> None:
        # Bytes as given (a key decoded from base64); text as UTF-8.
        self._values = tuple(
            s if isinstance(s, bytes) else s.encode("utf-8") for s in reversed(oldest_first)
        )

    @property
    def newest_first(self) -> tuple[bytes, ...]:
        """Every secret, newest first: the order verification tries them in."""
        return self._values

    @property
    def newest(self) -> bytes:
        """The newest secret: the one to sign with."""
        return self._values[0]

    def __repr__(self) -> str:
        return f"<Secrets: {len(self._values)} hidden>"

    __str__ = __repr__


@dataclass(frozen=True)
class Settings:
    """The validated pipeline configuration of one app (every provider's own
    keys live on the provider). Its repr hides the database URL."""

    url_prefix: str
    max_clock_skew: float
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


#: A plain URL path: no URL variables (``<name>``), no query, no fragment.
URL_PATH = re.compile(r"/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*")


def load_settings(config: Mapping[str, Any], providers: Sequence[str] = ()) -> Settings:
    """Validate the pipeline's ``ORDERHOOKS_*`` keys of ``config``.

    :param providers: the names of the app's providers, which
        ``ORDERHOOKS_ALLOWED_IPS`` may name.
    :raises ConfigurationError: naming the first key that is wrong.
    """
    prefix = config["ORDERHOOKS_URL_PREFIX"]
    # No URL variables ("/<tenant>"): the callback views take no arguments,
    # so every callback would be Flask's HTML 500, not the platform's answer.
    if not isinstance(prefix, str) or (prefix and not URL_PATH.fullmatch(prefix)):
        raise ConfigurationError(
            "ORDERHOOKS_URL_PREFIX",
            'must be a path starting with "/" and without URL variables, such as '
            '"/orderhooks", or "" for none.',
        )
    return Settings(
        url_prefix=prefix.rstrip("/"),
        max_clock_skew=read_seconds(config, "ORDERHOOKS_MAX_CLOCK_SKEW"),
        database_uri=_database_uri(config["ORDERHOOKS_DATABASE_URI"]),
        duplicate_wait=read_seconds(
            config, "ORDERHOOKS_DUPLICATE_WAIT", at_most=(LONGEST_REQUEST_WAIT, "an hour")
        ),
        claim_timeout=read_seconds(config, "ORDERHOOKS_CLAIM_TIMEOUT", positive=True),
        max_body=_max_body(config["ORDERHOOKS_MAX_BODY"]),
        allowed_ips=_allowed_ips(config["ORDERHOOKS_ALLOWED_IPS"], providers),
        dispatch=_dispatch(config["ORDERHOOKS_DISPATCH"]),
        retry_delays=_retry_delays(config["ORDERHOOKS_RETRY_DELAYS"]),
        worker_poll_interval=_poll_interval(config),
    )


def _poll_interval(config: Mapping[str, Any]) -> float:
    key = "ORDERHOOKS_WORKER_POLL_INTERVAL"
    seconds = read_seconds(config, key, at_most=(LONGEST_POLL_INTERVAL, "an hour"))
    if seconds < SHORTEST_POLL_INTERVAL:
        # The worker's --poll-interval has the same floor.
        raise ConfigurationError(
            key,
            f"must be at least {SHORTEST_POLL_INTERVAL} seconds: an idle worker would query "
            "the database without pause.",
        )
    return seconds


def _database_uri(value: object) -> str | None:
    """The standalone store's URL, parsed and its dialect known; the value
    never appears in a message (it may hold a password)."""
    key = "ORDERHOOKS_DATABASE_URI"
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigurationError(key, "must be a SQLAlchemy database URL string or None.")
    try:
        url = sa.make_url(value)
    except ArgumentError:
        raise ConfigurationError(
            key,
            "is not a SQLAlchemy database URL (such as 'postgresql+psycopg://user@host/db').",
        ) from None
    try:
        url.get_dialect()
    except NoSuchModuleError:
        raise ConfigurationError(
            key, f"names the database {url.drivername!r}, which SQLAlchemy does not know."
        ) from None
    return value


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
        if not _finite(item) or item < 0:
            raise ConfigurationError(
                key, "every delay must be a finite number of seconds, zero or more."
            )
        if item > LONGEST_SECONDS:
            raise ConfigurationError(
                key, f"every delay must be at most {LONGEST_SECONDS:.0f} seconds (36500 days)."
            )
        delays.append(float(item))
    return tuple(delays)


def read_secrets(key: str, value: object) -> Secrets:
    """One secret or a rotation list (oldest first) of non-empty strings.

    :raises ConfigurationError: naming ``key``, never the secret.
    """
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
        if item != item.strip():
            # A newline read from a secrets file or an env var with a stray
            # space: every callback would fail its signature, as a 401.
            raise ConfigurationError(
                key, "a secret starts or ends with whitespace (a newline from a file?); strip it."
            )
        try:
            item.encode("utf-8")
        except UnicodeEncodeError:
            # A lone surrogate: os.environ's spelling of a byte that is not
            # UTF-8. The UnicodeEncodeError would carry the whole secret.
            raise ConfigurationError(
                key,
                "a secret is not UTF-8 text (a byte of another encoding in an environment "
                "variable or a file?); set it again.",
            ) from None
    return Secrets([str(v) for v in values])


#: The longest duration a setting takes, as the CLI's: beyond it a date
#: passes the year 9999 and a thread's wait overflows.
LONGEST_SECONDS = 36500 * 86400.0
#: A request that waits longer has been given up by any platform (and by
#: gunicorn's worker timeout), and PostgreSQL's ``lock_timeout``, which the
#: wait becomes, stops at 24.8 days.
LONGEST_REQUEST_WAIT = 3600
#: The CLI's bound for ``worker --poll-interval``.
LONGEST_POLL_INTERVAL = 3600
#: The shortest worker poll interval (config and ``worker --poll-interval``).
SHORTEST_POLL_INTERVAL = 0.01
_LONGEST = (LONGEST_SECONDS, "36500 days")


def read_optional_seconds(
    config: Mapping[str, Any], key: str, *, positive: bool = False
) -> float | None:
    """A number of seconds from zero (more than zero with ``positive``) to
    36500 days, or ``None`` (``config[key]``).

    :raises ConfigurationError: naming ``key``.

    .. versionchanged:: 0.3
       ``positive``.
    """
    value = config[key]
    if value is None:
        return None
    seconds = _seconds(key, value, "a number of seconds or None", _LONGEST)
    if positive and seconds == 0:
        raise ConfigurationError(key, "must be more than zero seconds, or None.")
    return seconds


def read_seconds(
    config: Mapping[str, Any],
    key: str,
    *,
    positive: bool = False,
    at_most: tuple[float, str] = _LONGEST,
) -> float:
    """A number of seconds, zero or more (more than zero with ``positive``),
    up to ``at_most`` (seconds, and how to say it; 36500 days by default).

    :raises ConfigurationError: naming ``key``.
    """
    seconds = _seconds(key, config[key], "a number of seconds", at_most)
    if positive and seconds == 0:
        raise ConfigurationError(key, "must be more than zero seconds.")
    return seconds


def _seconds(key: str, value: object, kind: str, at_most: tuple[float, str]) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError(key, f"must be {kind}, not {type(value).__name__}.")
    if not _finite(value) or value < 0:
        raise ConfigurationError(key, "must be a finite number of seconds, zero or more.")
    longest, said = at_most
    if value > longest:
        raise ConfigurationError(key, f"must be at most {longest:.0f} seconds ({said}).")
    return float(value)


def _finite(value: float) -> bool:
    # An int is finite however large: math.isfinite(10**400) raises
    # OverflowError (a JSON number of 400 digits in the environment).
    return isinstance(value, int) or math.isfinite(value)


def _max_body(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigurationError("ORDERHOOKS_MAX_BODY", "must be a positive number of bytes.")
    return value


def _allowed_ips(value: object, providers: Sequence[str]) -> Mapping[str, tuple[IPNetwork, ...]]:
    key = "ORDERHOOKS_ALLOWED_IPS"
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigurationError(
            key, 'must be a mapping such as {"<provider>": ["203.0.113.0/24"]}, or None.'
        )
    allowed: dict[str, tuple[IPNetwork, ...]] = {}
    for platform, networks in value.items():
        if platform not in providers:
            raise ConfigurationError(
                key, f"unknown platform {platform!r}; use one of {', '.join(providers)}."
            )
        if isinstance(networks, str) or not isinstance(networks, (list, tuple)) or not networks:
            raise ConfigurationError(
                f"{key}[{platform!r}]", "must be a non-empty list of addresses or CIDR networks."
            )
        allowed[platform] = parse_networks(f"{key}[{platform!r}]", networks)
    return allowed
