"""Address allow-lists: parsed once from config, checked per request.

One implementation for the callback routes (``ORDERHOOKS_ALLOWED_IPS``) and
the metrics endpoint (``ORDERHOOKS_METRICS_ALLOWED_IPS``), so both read a
dual-stack listener's addresses the same way.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

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
        try:
            network = ipaddress.ip_network(item, strict=False)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ConfigurationError(key, f"{item!r} is not an address or CIDR network.") from None
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


#: Headers a reverse proxy adds to name the client it forwards.
FORWARDING_HEADERS = ("X-Forwarded-For", "Forwarded", "X-Real-IP")


def forwarded_past_the_app(environ: Mapping[str, object]) -> str | None:
    """The forwarding header of a request that came through a proxy the app
    does not resolve, or ``None``.

    Such a request's ``remote_addr`` is the proxy's address, which is
    loopback when nginx runs on the same machine: an allow-list that holds
    loopback would let every client of the proxy in. Werkzeug's ``ProxyFix``
    leaves ``werkzeug.proxy_fix.orig`` in the environ once it has put the
    client's address in ``remote_addr``."""
    if "werkzeug.proxy_fix.orig" in environ:
        return None
    for name in FORWARDING_HEADERS:
        if environ.get("HTTP_" + name.upper().replace("-", "_")):
            return name
    return None
