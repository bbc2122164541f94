"""Which URLs a webhook may target: refuses private, loopback and other non-public addresses (SSRF protection).

Imported by the API (to refuse a bad URL at submission, with a 400) and by the webhook worker (to check again at
delivery, since DNS may have changed in between, and to connect to the very address it checked). Standard library
only: no torch, no Celery.

A host is allowed when every address it resolves to is public, or when it is allow-listed
(`INFERQ_WEBHOOK_ALLOW_HOSTS`). Allow-list entries are host names (matched as written in the URL, case-insensitive),
IP addresses or CIDR networks (matched against the resolved addresses). IPv6 addresses that carry an IPv4 address
(IPv4-mapped and -compatible, NAT64, 6to4, Teredo) are judged by the IPv4 address they lead to.
"""
from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], list[str]]

SCHEMES = {"http": 80, "https": 443}


class WebhookTargetError(ValueError):
    """The URL is malformed or points somewhere webhooks may not go; the message says why (shown to clients)."""


def resolve(host: str, port: int) -> list[str]:
    """Every address the host name resolves to (the client may connect to any of them)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise WebhookTargetError(f"webhook host {host!r} does not resolve: {exc}") from None
    return sorted({str(info[4][0]) for info in infos})


def check_target(url: str, allow_hosts: Iterable[str] = (), resolver: Resolver = resolve) -> list[str]:
    """Raise WebhookTargetError unless `url` is an http(s) URL whose host is public or allow-listed. Returns the
    addresses that were checked for a host name (connect to one of them, never resolve the name again: DNS could
    answer differently the second time), or [] for an IP literal or a host allow-listed by name."""
    try:
        parts = urlsplit(url)
        port = parts.port or SCHEMES.get(parts.scheme.lower(), 0)
    except ValueError as exc:  # e.g. a port out of range
        raise WebhookTargetError(f"webhook URL is invalid: {exc}") from None
    if parts.scheme.lower() not in SCHEMES:
        raise WebhookTargetError(f"webhook URL must be http or https, got {url!r}")
    host = (parts.hostname or "").lower()
    if not host:
        raise WebhookTargetError(f"webhook URL has no host: {url!r}")

    names, networks = _parse_allow_list(allow_hosts)
    if host in names:
        return []
    literal = _as_ip(host)
    resolved = [] if literal is not None else resolver(host, port)
    addresses = [literal] if literal is not None else [_as_ip(a) for a in resolved]
    for address in addresses:
        if address is None:  # pragma: no cover - resolvers return addresses
            raise WebhookTargetError(f"webhook host {host!r} resolved to something that is not an address")
        if not _is_public(address) and not any(address in net for net in networks):
            raise WebhookTargetError(
                f"webhook host {host!r} is a private, loopback or otherwise non-public address ({address}); "
                "such targets are refused unless allow-listed in INFERQ_WEBHOOK_ALLOW_HOSTS")
    return resolved


def _parse_allow_list(allow_hosts: Iterable[str]) -> tuple[set[str], list[IPNetwork]]:
    names: set[str] = set()
    networks: list[IPNetwork] = []
    for entry in allow_hosts:
        entry = entry.strip().lower().strip("[]")
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            names.add(entry)
    return names, networks


def _as_ip(text: str) -> IPAddress | None:
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 zone ("fe80::1%eth0")
    except ValueError:
        return None
    # An IPv4 address written as IPv6 (::ffff:10.0.0.1) reaches the IPv4 host: judge that one.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


# IPv6 ranges that carry an IPv4 address a packet may end up at: IPv4-compatible (::a.b.c.d, deprecated but
# routed by some stacks) and NAT64's well-known prefix, both in the low 32 bits. 6to4 and Teredo have their own
# accessors in ipaddress. NAT64's local-use prefix may translate to anything: never public.
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if (address in _IPV4_COMPATIBLE and int(address) > 1) or address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]  # the client's address, which Teredo relays reach
    return None


def _is_public(address: IPAddress) -> bool:
    # is_global excludes private, loopback, link-local (cloud metadata at 169.254.169.254), shared (100.64/10),
    # reserved and unspecified ranges; multicast is not a webhook receiver either.
    if isinstance(address, ipaddress.IPv6Address):
        if address.is_site_local or address in _NAT64_LOCAL:  # fec0::/10: deprecated, still private in practice
            return False
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            return _is_public(embedded)
    return address.is_global and not address.is_multicast
