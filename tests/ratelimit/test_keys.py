"""Client IPs and key functions: X-Forwarded-For is believed only from trusted proxies."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hardening import ConfigurationError
from hardening.ratelimit import (
    RequestInfo,
    TrustedProxies,
    client_ip,
    first_key,
    global_key,
    ip_key,
    joined_key,
    user_key,
)

PROXIES = TrustedProxies(["10.0.0.0/8", "::1"])


def test_untrusted_peer_ignores_forwarded_for() -> None:
    """A client connecting directly cannot choose its key with a spoofed header."""
    assert client_ip("203.0.113.9", "1.2.3.4", PROXIES) == "203.0.113.9"


def test_trusted_proxy_forwards_client() -> None:
    """Behind a trusted proxy, the address it saw is the client."""
    assert client_ip("10.0.0.2", "198.51.100.7", PROXIES) == "198.51.100.7"


def test_spoofed_entries_left_of_the_real_client_are_ignored() -> None:
    """Whatever a client prepends, the rightmost untrusted hop wins."""
    xff = "6.6.6.6, 7.7.7.7, 198.51.100.7, 10.1.1.1"
    assert client_ip("10.0.0.2", xff, PROXIES) == "198.51.100.7"


def test_all_trusted_chain_gives_leftmost() -> None:
    """When every hop is a proxy, the leftmost address is the best guess."""
    assert client_ip("10.0.0.2", "10.9.9.9, 10.1.1.1", PROXIES) == "10.9.9.9"


def test_malformed_hop_stops_the_walk() -> None:
    """Garbage in the header never becomes the key; the last good address does."""
    assert client_ip("10.0.0.2", "198.51.100.7, not-an-ip", PROXIES) == "10.0.0.2"


@pytest.mark.parametrize(
    ("peer", "xff", "expected"),
    [
        ("::1", "[2001:db8::1]:443", "2001:db8::1"),
        ("::ffff:10.0.0.3", "192.0.2.1:5678", "192.0.2.1"),
        (None, "1.2.3.4", "unknown"),
        ("unix-socket", None, "unix-socket"),
    ],
)
def test_address_forms(peer: str | None, xff: str | None, expected: str) -> None:
    """Ports, brackets, IPv4-mapped IPv6 and missing peers are handled."""
    assert client_ip(peer, xff, PROXIES) == expected


def test_bad_proxy_network_is_a_configuration_error() -> None:
    """A typo in the trusted networks fails loudly at start-up."""
    with pytest.raises(ConfigurationError):
        TrustedProxies(["10.0.0.0/33"])


@given(st.text(max_size=200))
def test_any_header_from_untrusted_peer_is_ignored(xff: str) -> None:
    """Property: from an untrusted peer, no header value changes the address."""
    assert client_ip("203.0.113.9", xff, PROXIES) == "203.0.113.9"


@given(st.text(max_size=200))
def test_any_header_from_trusted_peer_never_raises(xff: str) -> None:
    """Property: hostile headers from a proxy never raise and give a valid address."""
    import ipaddress

    ipaddress.ip_address(client_ip("10.0.0.2", xff, PROXIES))


def test_key_functions_compose() -> None:
    """User keys fall back to IP keys; joined keys combine; global is shared."""
    request = RequestInfo(client="10.0.0.2", headers={"x-forwarded-for": "192.0.2.5"})
    by_user = user_key(lambda r: r.headers.get("x-user"))
    by_ip = ip_key(["10.0.0.0/8"])
    assert first_key(by_user, by_ip)(request) == "ip:192.0.2.5"
    logged_in = RequestInfo(client="10.0.0.2", headers={"x-user": "42"})
    assert first_key(by_user, by_ip)(logged_in) == "user:42"
    assert joined_key(global_key("saves"), by_user)(logged_in) == "saves|user:42"
    assert first_key(by_user)(request) == "anonymous"
