"""client_address(): the real client behind trusted proxies, from X-Forwarded-For."""

from __future__ import annotations

import ipaddress

import pytest

from realtime.client_address import UNKNOWN, client_address, is_loopback, parse_address
from realtime.config import Config

LOOPBACK = Config().trusted_proxy_networks  # the default: 127.0.0.0/8 and ::1
PROXIES = (*LOOPBACK, ipaddress.ip_network("10.0.0.0/24"), ipaddress.ip_network("fd00::/64"))


def test_the_default_trusted_proxies_are_loopback():
    assert [str(n) for n in LOOPBACK] == ["127.0.0.0/8", "::1/128"]


def test_without_a_header_the_client_is_the_peer():
    assert client_address("127.0.0.1", None, LOOPBACK) == "127.0.0.1"
    assert client_address("203.0.113.9", None, LOOPBACK) == "203.0.113.9"


@pytest.mark.parametrize("header", ["", "   ", " , ,"])
def test_an_empty_header_is_no_header(header):
    assert client_address("127.0.0.1", header, LOOPBACK) == "127.0.0.1"


def test_the_header_of_an_untrusted_peer_is_ignored():
    assert client_address("203.0.113.9", "127.0.0.1", LOOPBACK) == "203.0.113.9"
    assert client_address("203.0.113.9", "garbage", LOOPBACK) == "203.0.113.9"


def test_behind_a_trusted_proxy_the_client_is_the_forwarded_address():
    assert client_address("127.0.0.1", "203.0.113.9", LOOPBACK) == "203.0.113.9"
    assert client_address("127.0.0.1", "127.0.0.1", LOOPBACK) == "127.0.0.1"


def test_the_rightmost_untrusted_address_wins_and_what_is_left_of_it_is_ignored():
    # The client wrote "127.0.0.1, 198.51.100.1" itself; 203.0.113.9 connected to the first
    # proxy (10.0.0.5), which connected to the second (10.0.0.6), which connected to us.
    header = "127.0.0.1, 198.51.100.1, 203.0.113.9, 10.0.0.5"
    assert client_address("10.0.0.6", header, PROXIES) == "203.0.113.9"
    assert client_address("10.0.0.6", "not an address, 203.0.113.9", PROXIES) == "203.0.113.9"


def test_when_every_address_is_a_trusted_proxy_the_leftmost_is_the_client():
    assert client_address("127.0.0.1", "10.0.0.1, 10.0.0.2, 127.0.0.1", PROXIES) == "10.0.0.1"


def test_several_headers_joined_by_commas_are_one_list():
    assert client_address("127.0.0.1", "198.51.100.1,203.0.113.9", LOOPBACK) == "203.0.113.9"


@pytest.mark.parametrize("header", [
    "garbage",
    "203.0.113.9:4711",          # with a port
    "[2001:db8::1]",             # with brackets
    "203.0.113.9, 10.0.0.999",   # an octet out of range
    "127.0.0.1, 10.0.0.5 x",     # two words in one entry
    "unknown",                   # RFC 7239's obfuscated identifier, which is no address
])
def test_a_malformed_entry_on_the_way_makes_the_client_unknown(header):
    address = client_address("127.0.0.1", header, PROXIES)
    assert address == UNKNOWN
    assert not is_loopback(address)


@pytest.mark.parametrize("peer", [None, "", "not-an-ip"])
def test_a_peer_that_is_not_an_address_is_unknown(peer):
    assert client_address(peer, "127.0.0.1", LOOPBACK) == UNKNOWN


def test_ipv6_peers_and_entries():
    assert client_address("::1", "2001:db8::7", LOOPBACK) == "2001:db8::7"
    assert client_address("::1", " 2001:0db8:0000::7 ", LOOPBACK) == "2001:db8::7"
    assert client_address("fd00::2", "2001:db8::7, fd00::3", PROXIES) == "2001:db8::7"
    assert client_address("2001:db8::7", "::1", LOOPBACK) == "2001:db8::7"
    # the address families mix in one chain
    assert client_address("::1", "2001:db8::7, 127.0.0.1", LOOPBACK) == "2001:db8::7"


def test_ipv4_mapped_ipv6_addresses_are_their_ipv4_address():
    # What a dual-stack socket reports for an IPv4 peer: it is trusted as 127.0.0.1 is.
    assert client_address("::ffff:127.0.0.1", "203.0.113.9", LOOPBACK) == "203.0.113.9"
    assert client_address("::ffff:127.0.0.1", None, LOOPBACK) == "127.0.0.1"
    assert is_loopback("::ffff:127.0.0.1")


def test_no_trusted_proxies_means_the_header_is_never_believed():
    assert client_address("127.0.0.1", "203.0.113.9", ()) == "127.0.0.1"


@pytest.mark.parametrize("address,loopback", [
    ("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("10.0.0.1", False),
    ("2001:db8::1", False), (UNKNOWN, False), ("", False),
])
def test_is_loopback(address, loopback):
    assert is_loopback(address) is loopback


def test_parse_address_takes_bare_addresses_only():
    assert str(parse_address(" 10.0.0.1 ")) == "10.0.0.1"
    assert parse_address("10.0.0.1:80") is None
    assert parse_address(None) is None
