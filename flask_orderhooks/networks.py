"""Address allow-lists: parsed once from config, checked per request.

One implementation for the callback routes (``ORDERHOOKS_ALLOWED_IPS``) and
the metrics endpoint (``ORDERHOOKS_METRICS_ALLOWED_IPS``), so both read a
dual-stack listener's addresses the same way.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import NamedTuple

from werkzeug.middleware.proxy_fix import ProxyFix

from .exc import ConfigurationError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


#: Where IPv4 addresses sit in IPv6 (``::ffff:a.b.c.d``, RFC 4291 2.5.5.2).
_IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def parse_networks(key: str, items: Iterable[object]) -> tuple[IPNetwork, ...]:
    """Addresses or CIDR networks; a single address is a one-address network.

    An IPv4-mapped network (``::ffff:203.0.113.0/120``, as a dual-stack
    listener writes its IPv4 clients) is its IPv4 network
    (``203.0.113.0/24``): :func:`address_allowed` matches clients as IPv4.

    :raises ConfigurationError: naming ``key`` and the item that is wrong.
    """
    networks: list[IPNetwork] = []
    for item in items:
        if isinstance(item, (bool, int, bytes, bytearray)):
            # ipaddress reads a number or 4/16 bytes as a packed address
            # (True is 0.0.0.1, b"10.0" is 49.48.46.48): never what was meant.
            raise ConfigurationError(
                key,
                f"{item!r} is not an address or CIDR network; write it as a string, such as "
                '"10.0.0.0/8".',
            )
        try:
            network = ipaddress.ip_network(item, strict=False)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ConfigurationError(key, f"{item!r} is not an address or CIDR network.") from None
        zone = getattr(network.network_address, "scope_id", None)
        if zone is not None:
            # Containment compares numbers only: the zone would be ignored.
            raise ConfigurationError(
                key,
                f"{item!r} names a zone (%{zone}), which is not checked: an address matches "
                "on every interface. Write it without the zone.",
            )
        if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_IPV4_MAPPED):
            network = ipaddress.IPv4Network(
                (int(network.network_address) & 0xFFFFFFFF, network.prefixlen - 96)
            )
        networks.append(network)
    return tuple(networks)


def address_allowed(remote: str | None, networks: Iterable[IPNetwork]) -> bool:
    """Whether the client address ``remote`` is in one of ``networks``; an
    address that does not parse is in none."""
    try:
        address = ipaddress.ip_address(remote or "")
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        # A dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d.
        address = address.ipv4_mapped
    return any(address in network for network in networks)


#: Headers a reverse proxy (or a CDN in front of it) adds to a request it
#: forwards: the client's address first, then those that only show a proxy was
#: there (nginx with nothing but ``X-Forwarded-Proto``, Apache's
#: ``X-Forwarded-Server``). A scraper that reaches the app directly sends none.
FORWARDING_HEADERS = (
    "X-Forwarded-For",
    "Forwarded",
    "X-Real-IP",
    "X-Client-IP",
    "True-Client-IP",
    "CF-Connecting-IP",
    "X-Forwarded-Proto",
    "X-Forwarded-Host",
    "X-Forwarded-Port",
    "X-Forwarded-Prefix",
    "X-Forwarded-Server",
    "Via",
)

#: How deep :func:`forwarded_past_the_app` looks for a ProxyFix among the
#: middlewares wrapped around the app's ``wsgi_app``.
_MIDDLEWARE_DEPTH = 16


class Unresolved(NamedTuple):
    """A forwarded request whose ``remote_addr`` is still the proxy's."""

    #: The first forwarding header the request carries.
    header: str
    #: Whether a ProxyFix ran (and left the address alone).
    proxy_fix: bool


def forwarded_past_the_app(
    environ: Mapping[str, object], wsgi_app: object = None
) -> Unresolved | None:
    """Why the ``remote_addr`` of a request that came through a proxy is the
    proxy's, not the client's; ``None`` when it came straight to the app or
    Werkzeug's ``ProxyFix`` put the client's address in its place.

    A proxy on the same machine is loopback: an allow-list that holds
    loopback would let every client of the proxy in. ``ProxyFix`` leaves
    ``werkzeug.proxy_fix.orig`` in the environ whatever it did, so that alone
    says nothing: with ``x_for=0``, with fewer ``X-Forwarded-For`` entries
    than its ``x_for``, or behind a proxy that sends ``X-Real-IP`` only, the
    address stays the proxy's.

    :param wsgi_app: the app's ``wsgi_app``, where a ProxyFix the app was
        wrapped in is found and asked for its ``x_for``: it tells a client
        at the proxy's own address (ProxyFix set the same value again) from
        a request it did not resolve.
    """
    header = next(
        (n for n in FORWARDING_HEADERS if environ.get("HTTP_" + n.upper().replace("-", "_"))),
        None,
    )
    if header is None:
        return None
    original = environ.get("werkzeug.proxy_fix.orig")
    if not isinstance(original, Mapping):
        return Unresolved(header, proxy_fix=False)
    if environ.get("REMOTE_ADDR") != original.get("REMOTE_ADDR"):
        # Only ProxyFix's x_for writes REMOTE_ADDR, from X-Forwarded-For.
        return None
    x_for = _proxy_fix_x_for(wsgi_app)
    forwarded_for = str(environ.get("HTTP_X_FORWARDED_FOR") or "")
    entries = [entry for entry in forwarded_for.split(",") if entry.strip()]
    if x_for is not None and 0 < x_for <= len(entries):
        return None
    return Unresolved(header, proxy_fix=True)


def _proxy_fix_x_for(wsgi_app: object) -> int | None:
    """The ``x_for`` of the first ProxyFix in the chain of middlewares
    (each holding the next as ``.app``), or ``None`` when there is none."""
    for _ in range(_MIDDLEWARE_DEPTH):
        if isinstance(wsgi_app, ProxyFix):
            return wsgi_app.x_for
        wsgi_app = getattr(wsgi_app, "app", None)
        if wsgi_app is None:
            break
    return None
