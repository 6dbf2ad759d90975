"""Who the client really is, behind the proxies this node trusts.

A node behind nginx sees every request come from nginx. nginx says who its client was in
``X-Forwarded-For``, but anybody can send that header: it is only believed when the peer is a
trusted proxy, and then only as far as the chain of trusted proxies goes. Each proxy appends the
address it saw on the right, so the list is read from the right: the first address that is not
a trusted proxy is the client, and everything to its left was written by that client (or by
proxies the node knows nothing about) and is ignored.

Independent of Flask and WSGI, so that the HTTP API and the Engine.IO transports ask the same
question the same way.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# What client_address() answers when it cannot tell (a peer or an X-Forwarded-For entry that is
# not an IP address). As in RFC 7239's "for=unknown": not an address, so it is never loopback
# and never in a trusted network.
UNKNOWN = "unknown"


def client_address(remote_addr: str | None, forwarded_for: str | None,
                   trusted: Iterable[IPNetwork]) -> str:
    """The address of the client behind ``remote_addr``, the peer of the TCP connection.

    ``forwarded_for`` is the ``X-Forwarded-For`` header (several headers joined with commas),
    ``None`` when absent; ``trusted`` the networks of the proxies whose header is believed.

    - The peer is not a trusted proxy, or sent no header (or an empty one): the peer.
    - Otherwise the header's entries, walked from the right: the first one that is not a
      trusted proxy; if all of them are, the leftmost.
    - A peer or an entry reached by that walk that is not an IP address: :data:`UNKNOWN`, so
      that a garbled chain never passes for the proxy in front of it. Entries left of the
      client are never looked at.

    Addresses come back in their canonical form (``::1``, ``10.0.0.1``); IPv4-mapped IPv6
    addresses (``::ffff:10.0.0.1``, what a dual-stack socket reports) as the IPv4 address.
    """
    networks = tuple(trusted)
    peer = parse_address(remote_addr)
    if peer is None:
        return UNKNOWN
    if forwarded_for is None or not _is_trusted(peer, networks):
        return str(peer)
    # Empty list elements ("a, , b", or a header with nothing in it) are no entries at all, as
    # HTTP's list syntax says (RFC 9110, section 5.6.1).
    entries = [entry.strip() for entry in forwarded_for.split(",")]
    entries = [entry for entry in entries if entry]
    client = peer
    for entry in reversed(entries):
        address = parse_address(entry)
        if address is None:
            return UNKNOWN
        client = address
        if not _is_trusted(address, networks):
            break
    return str(client)


def parse_address(text: str | None) -> IPAddress | None:
    """``text`` as an IP address (IPv4-mapped IPv6 unwrapped), or None if it is not one.

    Only bare addresses: ``10.0.0.1:5000`` or ``[::1]`` (with a port or brackets) is not one.
    """
    if not text:
        return None
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_loopback(address: str) -> bool:
    """True when ``address`` (as :func:`client_address` returns it) is a loopback address."""
    parsed = parse_address(address)
    return parsed is not None and parsed.is_loopback


def _is_trusted(address: IPAddress, networks: tuple[IPNetwork, ...]) -> bool:
    # `in` is False (not an error) across IP versions.
    return any(address in network for network in networks)
