"""Source addresses, the documented ProxyFix setup, and the order of checks.

Cheap checks come first: the source address, then the body size, then the
signature, then the body. A request refused at any step ran no receiver and
changed no row (every refusal goes through :meth:`Target.refuse`).
"""

from __future__ import annotations

import io
import ipaddress
import itertools
from typing import Any

import pytest

from flask_orderhooks.networks import address_allowed, parse_networks
from flask_orderhooks.testing import (
    SignedCallback,
    gateway_collect,
    igv_order_status,
    sud_order_changed,
)

from .conftest import Target, TargetFactory
from .support import (
    GATEWAY_KEYS,
    IGV_PATH,
    IGV_SECRET,
    MERCHANT_A,
    NOW_MS,
    PLATFORM_OF_PATH,
    SUD_APP_A,
    SUD_APPS,
    SUD_PATH,
    igv_headers,
    refused,
    sud_headers,
)

ALLOWED = {
    "igv": ["198.51.100.7"],
    "gateway": ["203.0.113.0/24"],
    "sud": ["192.0.2.0/24", "2001:db8::/32"],
}
FORBIDDEN = "The client address is not allowed."
_ids = itertools.count()


@pytest.fixture(scope="module")
def guarded(make_target: TargetFactory) -> Target:
    return make_target(ORDERHOOKS_ALLOWED_IPS=ALLOWED)


@pytest.fixture(scope="module")
def proxied(make_target: TargetFactory) -> Target:
    """Behind one trusted reverse proxy, as the README documents."""
    return make_target(proxy_fix=True, ORDERHOOKS_ALLOWED_IPS=ALLOWED)


@pytest.fixture(scope="module")
def mapped(make_target: TargetFactory) -> Target:
    """The gateway's network written as a dual-stack listener shows it."""
    return make_target(ORDERHOOKS_ALLOWED_IPS={"gateway": ["::ffff:203.0.113.0/120"]})


def _callback(platform: str) -> SignedCallback:
    key = f"src-{next(_ids)}"
    if platform == "igv":
        return igv_order_status(IGV_SECRET, request_id=key, timestamp_ms=NOW_MS)
    if platform == "gateway":
        return gateway_collect(GATEWAY_KEYS[str(MERCHANT_A)], id=key)
    return sud_order_changed(
        SUD_APPS[SUD_APP_A], app_id=SUD_APP_A, notify_id=key, timestamp_ms=NOW_MS
    )


ADDRESSES = [
    ("igv", "198.51.100.7", True),
    ("igv", "198.51.100.8", False),
    ("igv", "203.0.113.5", False),
    ("gateway", "203.0.113.5", True),
    ("gateway", "203.0.113.255", True),
    ("gateway", "203.0.114.1", False),
    ("gateway", "198.51.100.7", False),
    ("gateway", "127.0.0.1", False),
    ("gateway", "::1", False),
    ("gateway", "", False),
    ("gateway", "unknown", False),
    ("gateway", "203.0.113.5:4431", False),
    ("gateway", " 203.0.113.5", False),
    ("gateway", "203.0.113.5, 10.0.0.1", False),
    ("sud", "192.0.2.10", True),
    ("sud", "2001:db8::1", True),
    ("sud", "2001:db9::1", False),
    ("sud", "fe80::1%eth0", False),
]


@pytest.mark.parametrize(("platform", "address", "allowed"), ADDRESSES)
def test_only_allowed_addresses_reach_the_verifier(
    guarded: Target, platform: str, address: str, allowed: bool
) -> None:
    cb = _callback(platform)
    environ = {"REMOTE_ADDR": address}
    if allowed:
        guarded.accept_cb(cb, environ_base=environ)
    else:
        # Correctly signed, and still refused: the address is checked first.
        guarded.refuse_cb(cb, refused(platform, 403, FORBIDDEN), environ_base=environ)


def test_ipv4_mapped_address_of_an_allowed_network_is_allowed(guarded: Target) -> None:
    cb = _callback("gateway")
    response = guarded.post(
        cb.url(), cb.body, cb.headers, environ_base={"REMOTE_ADDR": "::ffff:203.0.113.5"}
    )
    if response.status_code == 200:
        guarded.verified.add(("gateway", "collect", cb.key))
    assert (response.status_code, response.get_data(as_text=True)) == (200, "success")


def test_ipv4_mapped_address_of_another_network_is_refused(guarded: Target) -> None:
    cb = _callback("gateway")
    guarded.refuse_cb(cb, (403, "fail"), environ_base={"REMOTE_ADDR": "::ffff:198.51.100.1"})


def test_an_ipv4_mapped_network_in_the_allow_list_admits_its_clients() -> None:
    """A dual-stack listener reports an IPv4 client as ::ffff:a.b.c.d, which
    is also what the refusal's log line shows ("refused 403 from
    ::ffff:203.0.113.5"). address_allowed unwraps the client address to
    IPv4, but parse_networks kept a configured ::ffff:… network as IPv6, and
    an IPv4 address is never in an IPv6 network: the platform's own
    address, copied from that log line, stayed refused. Such a network is
    now its IPv4 network (prefix - 96); other IPv6 networks stay IPv6."""
    networks = parse_networks(
        "ORDERHOOKS_ALLOWED_IPS['igv']",
        ["::ffff:203.0.113.0/120", "::ffff:198.51.100.7", "2001:db8::/32", "::/0"],
    )
    assert networks == (
        ipaddress.ip_network("203.0.113.0/24"),
        ipaddress.ip_network("198.51.100.7/32"),
        ipaddress.ip_network("2001:db8::/32"),
        ipaddress.ip_network("::/0"),
    )
    for address in ("::ffff:203.0.113.5", "203.0.113.5", "::ffff:198.51.100.7", "198.51.100.7"):
        assert address_allowed(address, networks), address
    only_mapped = parse_networks("k", ["::ffff:203.0.113.0/120"])
    for address in ("::ffff:203.0.114.5", "203.0.114.5", "::ffff:198.51.100.7", "2001:db8::1"):
        assert not address_allowed(address, only_mapped), address


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("::ffff:203.0.113.5", True),
        ("203.0.113.5", True),
        ("::ffff:203.0.114.5", False),
        ("203.0.114.5", False),
    ],
)
def test_a_route_whose_allow_list_is_written_ipv4_mapped_admits_its_clients(
    mapped: Target, address: str, allowed: bool
) -> None:
    """The same through a route: the operator copied the ::ffff: form of the
    platform's address from a refusal's log line into the allow-list."""
    cb = _callback("gateway")
    environ = {"REMOTE_ADDR": address}
    if allowed:
        mapped.accept_cb(cb, environ_base=environ)
    else:
        mapped.refuse_cb(cb, refused("gateway", 403, FORBIDDEN), environ_base=environ)


def test_platforms_without_a_list_accept_any_address(make_target: TargetFactory) -> None:
    only_gateway = make_target(ORDERHOOKS_ALLOWED_IPS={"gateway": ["203.0.113.0/24"]})
    only_gateway.accept_cb(_callback("igv"), environ_base={"REMOTE_ADDR": "198.51.100.99"})
    only_gateway.refuse_cb(
        _callback("gateway"), (403, "fail"), environ_base={"REMOTE_ADDR": "198.51.100.99"}
    )


PROXY = "10.0.0.2"
FORWARDED = [
    pytest.param("203.0.113.9", True, id="client-allowed"),
    pytest.param("198.51.100.1", False, id="client-other"),
    pytest.param("198.51.100.1, 203.0.113.9", True, id="spoofed-first-hop-ignored"),
    pytest.param("203.0.113.9, 198.51.100.1", False, id="spoofed-allowed-first-hop"),
    pytest.param(None, False, id="no-header-the-proxy-itself"),
    pytest.param("nonsense", False, id="garbage"),
]


@pytest.mark.parametrize(("forwarded", "allowed"), FORWARDED)
def test_behind_proxy_fix_only_the_last_hop_counts(
    proxied: Target, forwarded: str | None, allowed: bool
) -> None:
    cb = _callback("gateway")
    headers = dict(cb.headers)
    if forwarded is not None:
        headers["X-Forwarded-For"] = forwarded
    environ = {"REMOTE_ADDR": PROXY}
    if allowed:
        proxied.accept(cb.url(), cb.body, headers, cb.key, environ_base=environ)
    else:
        proxied.refuse(cb.url(), cb.body, headers, (403, "fail"), environ_base=environ)


def test_behind_proxy_fix_two_forwarded_headers_are_one_list(proxied: Target) -> None:
    cb = _callback("gateway")
    headers = [
        *cb.headers.items(),
        ("X-Forwarded-For", "198.51.100.1"),
        ("X-Forwarded-For", "203.0.113.9"),
    ]
    proxied.accept(cb.url(), cb.body, headers, cb.key, environ_base={"REMOTE_ADDR": PROXY})


@pytest.mark.parametrize(
    ("remote", "forwarded", "allowed"),
    [
        ("198.51.100.1", "203.0.113.9", False),
        ("203.0.113.9", "198.51.100.1", True),
    ],
)
def test_without_proxy_fix_forwarded_for_is_ignored(
    guarded: Target, remote: str, forwarded: str, allowed: bool
) -> None:
    cb = _callback("gateway")
    headers = {**cb.headers, "X-Forwarded-For": forwarded}
    environ = {"REMOTE_ADDR": remote}
    if allowed:
        guarded.accept(cb.url(), cb.body, headers, cb.key, environ_base=environ)
    else:
        guarded.refuse(cb.url(), cb.body, headers, (403, "fail"), environ_base=environ)


# -- order of checks ------------------------------------------------------------------


class ExplodingStream(io.RawIOBase):
    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        raise AssertionError("the body was read")


TOO_BIG = {"wsgi.input": ExplodingStream(), "CONTENT_LENGTH": str(64 * 1024 + 1)}
FORGED_IGV = {**igv_headers("order-1"), "X-Signature": "0" * 64}
FORGED_SUD = {**sud_headers(b"{}"), "Sud-Signature": "0" * 40}
GATEWAY_PATH = "/orderhooks/gateway/collect"

ORDER = [
    # (what, path, remote address, headers, body, environ, status, reason)
    (
        "forbidden source before size",
        IGV_PATH,
        "192.0.2.1",
        FORGED_IGV,
        b"",
        TOO_BIG,
        403,
        FORBIDDEN,
    ),
    ("forbidden source before size", GATEWAY_PATH, "192.0.2.1", {}, b"", TOO_BIG, 403, FORBIDDEN),
    (
        "forbidden source before size",
        SUD_PATH,
        "203.0.113.1",
        FORGED_SUD,
        b"",
        TOO_BIG,
        403,
        FORBIDDEN,
    ),
    (
        "forbidden source before signature",
        IGV_PATH,
        "192.0.2.1",
        FORGED_IGV,
        b"{}",
        {},
        403,
        FORBIDDEN,
    ),
    ("forbidden source before body", GATEWAY_PATH, "192.0.2.1", {}, b"[", {}, 403, FORBIDDEN),
    (
        "size before signature",
        IGV_PATH,
        "198.51.100.7",
        FORGED_IGV,
        b"",
        TOO_BIG,
        413,
        "The body is larger than 65536 bytes.",
    ),
    (
        "size before signature",
        SUD_PATH,
        "192.0.2.1",
        FORGED_SUD,
        b"",
        TOO_BIG,
        413,
        "The body is larger than 65536 bytes.",
    ),
    (
        "signature before body",
        IGV_PATH,
        "198.51.100.7",
        FORGED_IGV,
        b"[",
        {},
        401,
        "The X-Signature does not match.",
    ),
    (
        "signature before body",
        SUD_PATH,
        "192.0.2.1",
        FORGED_SUD,
        b"[",
        {},
        401,
        "The Sud-Signature does not match.",
    ),
    (
        "the gateway's sign is inside the body",
        GATEWAY_PATH,
        "203.0.113.1",
        {},
        b"[",
        {},
        400,
        "The body must be a JSON object, not an array.",
    ),
    (
        "window before body",
        IGV_PATH,
        "198.51.100.7",
        igv_headers("old-1", timestamp=str(NOW_MS - 7_200_000)),
        b"[",
        {},
        401,
        "The X-Timestamp is older than 3600 seconds.",
    ),
    (
        "timestamp format before body",
        IGV_PATH,
        "198.51.100.7",
        igv_headers("fmt-1", timestamp="soon"),
        b"[",
        {},
        400,
        "The X-Timestamp header is not a Unix timestamp.",
    ),
]


@pytest.mark.parametrize(
    ("path", "remote", "headers", "body", "environ", "status", "reason"),
    [pytest.param(*row[1:], id=f"{row[0]}-{PLATFORM_OF_PATH[row[1]]}") for row in ORDER],
)
def test_order_of_checks(
    guarded: Target,
    path: str,
    remote: str,
    headers: dict[str, str],
    body: bytes,
    environ: dict[str, Any],
    status: int,
    reason: str,
) -> None:
    guarded.refuse(
        path,
        body,
        headers,
        refused(PLATFORM_OF_PATH[path], status, reason),
        environ_base={"REMOTE_ADDR": remote},
        environ_overrides=environ,
    )
