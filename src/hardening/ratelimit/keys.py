"""Rate-limit keys: who a request is.

Client IPs that trust ``X-Forwarded-For`` only from configured proxies, user ids, a global key,
and ways to compose them. Framework-free: the ASGI and WSGI adapters turn a scope or environ
into a :class:`RequestInfo`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache

from hardening.errors import ConfigurationError

__all__ = [
    "KeyFunc",
    "RequestInfo",
    "TrustedProxies",
    "client_ip",
    "first_key",
    "global_key",
    "ip_key",
    "joined_key",
    "user_key",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
UNKNOWN_CLIENT = "unknown"


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """The parts of a request a key function may look at.

    Attributes:
        method: the HTTP method.
        path: the request path.
        client: the peer address of the connection (``None`` over a Unix socket).
        headers: header names (lower case) to values; repeated headers joined with ``", "``.
    """

    method: str = "GET"
    path: str = "/"
    client: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


KeyFunc = Callable[[RequestInfo], "str | None"]


@lru_cache(maxsize=4096)  # peers repeat; parsing costs microseconds on every request
def _parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip().strip('"')
    if text.startswith("["):  # [v6]:port
        text = text[1 : text.find("]")] if "]" in text else text[1:]
    elif text.count(":") == 1:  # v4:port
        text = text.split(":", 1)[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@lru_cache(maxsize=4096)
def _text(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    return str(ip)


class TrustedProxies:
    """The networks whose ``X-Forwarded-For`` is believed.

    Args:
        networks: CIDRs or addresses, e.g. ``["10.0.0.0/8", "127.0.0.1"]``.

    Raises:
        ConfigurationError: an entry is not an address or network.
    """

    def __init__(self, networks: Iterable[str | IPNetwork] = ()) -> None:
        parsed: list[IPNetwork] = []
        for net in networks:
            try:
                parsed.append(ipaddress.ip_network(net, strict=False))
            except ValueError as exc:
                raise ConfigurationError(f"not a proxy network: {net!r}") from exc
        self.networks: tuple[IPNetwork, ...] = tuple(parsed)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        """Return whether ``ip`` belongs to a trusted proxy network."""
        return any(ip in net for net in self.networks if net.version == ip.version)

    def __repr__(self) -> str:
        return f"TrustedProxies({[str(n) for n in self.networks]!r})"


def client_ip(
    peer: str | None,
    forwarded_for: str | None,
    trusted: TrustedProxies | Iterable[str] = (),
) -> str:
    """The client's address, believing ``X-Forwarded-For`` only from trusted proxies.

    Walks from the connection's peer leftwards through ``X-Forwarded-For`` while each hop is a
    trusted proxy, and returns the first address that is not: anything a client wrote to the
    left of that is ignored, so a spoofed header cannot change the key. A malformed hop stops
    the walk at the last trusted address.

    Args:
        peer: the connection's peer address.
        forwarded_for: the ``X-Forwarded-For`` value(s), comma separated.
        trusted: the trusted proxy networks.

    Returns:
        The address as text (IPv4-mapped IPv6 shown as IPv4), or ``"unknown"``.
    """
    proxies = trusted if isinstance(trusted, TrustedProxies) else TrustedProxies(trusted)
    ip = _parse_ip(peer) if peer else None
    if ip is None:
        return peer or UNKNOWN_CLIENT
    if not forwarded_for or not proxies or not proxies.trusts(ip):
        return _text(ip)
    for hop in reversed(forwarded_for.split(",")):
        hop_ip = _parse_ip(hop)
        if hop_ip is None:
            break
        ip = hop_ip
        if not proxies.trusts(hop_ip):
            break
    return _text(ip)


def ip_key(trusted_proxies: TrustedProxies | Iterable[str] = ()) -> KeyFunc:
    """A key function giving ``"ip:<client address>"``.

    Args:
        trusted_proxies: the networks whose ``X-Forwarded-For`` is believed.

    Returns:
        The key function.
    """
    proxies = (
        trusted_proxies
        if isinstance(trusted_proxies, TrustedProxies)
        else TrustedProxies(trusted_proxies)
    )

    def key(request: RequestInfo) -> str:
        return "ip:" + client_ip(request.client, request.headers.get("x-forwarded-for"), proxies)

    return key


def user_key(get_user: Callable[[RequestInfo], str | None]) -> KeyFunc:
    """A key function giving ``"user:<id>"``, or ``None`` for anonymous requests.

    Args:
        get_user: returns the authenticated user's id for a request, or ``None``.

    Returns:
        The key function (compose with :func:`first_key` to fall back to the IP).
    """

    def key(request: RequestInfo) -> str | None:
        user = get_user(request)
        return None if user is None or user == "" else f"user:{user}"

    return key


def global_key(name: str = "global") -> KeyFunc:
    """A key function giving one shared key for every request."""

    def key(request: RequestInfo) -> str:
        return name

    return key


def first_key(*funcs: KeyFunc) -> KeyFunc:
    """Compose key functions: the first that gives a key wins (e.g. user, else IP).

    Args:
        *funcs: key functions, in order of preference.

    Returns:
        A key function giving ``"anonymous"`` when none gives a key.
    """

    def key(request: RequestInfo) -> str:
        for func in funcs:
            value = func(request)
            if value:
                return value
        return "anonymous"

    return key


def joined_key(*funcs: KeyFunc, separator: str = "|") -> KeyFunc:
    """Compose key functions: every key joined (e.g. per user *and* per route).

    Args:
        *funcs: key functions; ones that give ``None`` are left out.
        separator: what joins the parts.

    Returns:
        The key function.
    """

    def key(request: RequestInfo) -> str:
        return separator.join(value for func in funcs if (value := func(request)))

    return key
