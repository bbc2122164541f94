"""Which URLs a webhook may target: refuses private, loopback and other non-public addresses (SSRF protection).

Imported by the API (to refuse a bad URL at submission, with a 400) and by the webhook worker (to check again at
delivery, since DNS may have changed in between). Standard library only: no torch, no Celery.

A host is allowed when every address it resolves to is public, or when it is allow-listed
(`INFERQ_WEBHOOK_ALLOW_HOSTS`). Allow-list entries are host names (matched as written in the URL, case-insensitive),
IP addresses or CIDR networks (matched against the resolved addresses).
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


def check_target(url: str, allow_hosts: Iterable[str] = (), resolver: Resolver = resolve) -> None:
    """Raise WebhookTargetError unless `url` is an http(s) URL whose host is public or allow-listed."""
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
        return
    literal = _as_ip(host)
    addresses = [literal] if literal is not None else [_as_ip(a) for a in resolver(host, port)]
    for address in addresses:
        if address is None:  # pragma: no cover - resolvers return addresses
            raise WebhookTargetError(f"webhook host {host!r} resolved to something that is not an address")
        if not _is_public(address) and not any(address in net for net in networks):
            raise WebhookTargetError(
                f"webhook host {host!r} is a private, loopback or otherwise non-public address ({address}); "
                "such targets are refused unless allow-listed in INFERQ_WEBHOOK_ALLOW_HOSTS")


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


def _is_public(address: IPAddress) -> bool:
    # is_global excludes private, loopback, link-local (cloud metadata at 169.254.169.254), shared (100.64/10),
    # reserved and unspecified ranges; multicast is not a webhook receiver either.
    return address.is_global and not address.is_multicast
