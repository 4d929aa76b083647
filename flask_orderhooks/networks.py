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


def parse_networks(key: str, items: Iterable[object]) -> tuple[IPNetwork, ...]:
    """Addresses or CIDR networks; a single address is a one-address network.

    :raises ConfigurationError: naming ``key`` and the item that is wrong.
    """
    networks = []
    for item in items:
        try:
            networks.append(ipaddress.ip_network(item, strict=False))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ConfigurationError(key, f"{item!r} is not an address or CIDR network.") from None
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
