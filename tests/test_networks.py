"""Allow-list items that ``ipaddress`` would take as something else than
what they look like: a number or bytes as a packed address, a zone that is
never compared. Both keys share the parser."""

from __future__ import annotations

import pytest

from flask_orderhooks import ConfigurationError
from flask_orderhooks.networks import address_allowed, parse_networks


@pytest.mark.parametrize(
    ("item", "why"),
    [
        # ip_network(True) is 0.0.0.1/32, ip_network(0) is 0.0.0.0/32: a YAML
        # or JSON list with a bare number is not the address it looks like.
        (True, "True is not an address or CIDR network; write it as a string, such as "),
        (
            2130706433,
            "2130706433 is not an address or CIDR network; write it as a string, such as ",
        ),
        # Four bytes are a packed address: b"\x7f\x00\x00\x01" is 127.0.0.1.
        (b"10.0", "b'10.0' is not an address or CIDR network; write it as a string, such as "),
    ],
    ids=["bool", "int", "bytes"],
)
def test_items_that_are_not_text_are_refused(item: object, why: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        parse_networks("ORDERHOOKS_METRICS_ALLOWED_IPS", [item])
    assert str(info.value) == (f'ORDERHOOKS_METRICS_ALLOWED_IPS: {why}"10.0.0.0/8".')


def test_a_zone_is_refused_rather_than_ignored() -> None:
    """ipaddress compares networks by number: fe80::1%eth0 in a list let
    fe80::1 in on every interface."""
    networks = parse_networks("K", ["fe80::/10"])
    assert address_allowed("fe80::1%eth0", networks)  # a client's zone is fine
    with pytest.raises(ConfigurationError) as info:
        parse_networks("ORDERHOOKS_ALLOWED_IPS['igv']", ["fe80::1%eth0"])
    assert str(info.value) == (
        "ORDERHOOKS_ALLOWED_IPS['igv']: 'fe80::1%eth0' names a zone (%eth0), which is not "
        "checked: an address matches on every interface. Write it without the zone."
    )
