"""The client's real address behind trusted proxies (`TRUSTED_PROXIES`); pure, no I/O.

One forwarding header is believed, the one the proxies set (`FORWARDED_HEADER`: `X-Forwarded-For`
by default, or RFC 7239's `Forwarded`, or `X-Real-IP`), and only when the direct peer is a trusted
proxy. A proxy passes on the headers it does not set itself, so believing any other header would
let a client write its own address. In the chain, the client is the right-most address that is not
itself a trusted proxy (each proxy appends the address it saw, so everything left of the last
untrusted hop may be forged): the rule of uvicorn's `--forwarded-allow-ips` and gunicorn's
`forwarded_allow_ips`. Tornado's own `xheaders` option is not used: it believes the headers of any
peer, has no CIDRs and ignores `Forwarded`.

A hop that is not an address (`unknown`, an obfuscated `_name`, garbage) ends the walk, and so does
a chain of trusted proxies only: then no client is named, the address used is the last trusted hop,
and the request is not vouched for (`trusted` false: it never counts as a loopback caller). Never
an exception.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Iterable, Sequence
from typing import Final, Protocol

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

FORWARDING_HEADERS: Final = ("X-Forwarded-For", "Forwarded", "X-Real-IP")
_FOR = re.compile(r'(?:^|;)\s*for\s*=\s*("[^"]*"|[^;,\s]*)', re.IGNORECASE)


class Headers(Protocol):
    def get_list(self, name: str) -> list[str]: ...


class Request(Protocol):
    remote_ip: str | None

    @property
    def headers(self) -> Headers: ...


@dataclasses.dataclass(frozen=True, slots=True)
class ClientAddress:
    ip: str  # what the per-IP limit, the logs and the broadcast rule use
    proxied: bool = False  # the request carried a forwarding header (any of them)
    trusted: bool = False  # a trusted proxy named the client: `ip` is the forwarded client's


def parse_address(text: str) -> Address | None:
    """One hop as proxies write it: `1.2.3.4`, `1.2.3.4:5678`, `[2001:db8::1]:443`, `2001:db8::1`,
    quoted or not. IPv4-mapped IPv6 addresses count as the IPv4 address."""
    text = text.strip().strip('"').strip()
    if text.startswith("["):
        text = text[1:text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:  # IPv4 with a port; IPv6 has at least two colons
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def parse_networks(entries: Iterable[str]) -> tuple[Network, ...]:
    """`TRUSTED_PROXIES` entries (addresses or CIDRs); raises ValueError naming a bad one."""
    networks: list[Network] = []
    for entry in entries:
        entry = entry.strip()
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ValueError(f"TRUSTED_PROXIES: {entry!r} is not an IP address or CIDR") from None
    return tuple(networks)


def header_name(setting: str) -> str:
    """`FORWARDED_HEADER` in its canonical spelling; raises ValueError for any other header."""
    for name in FORWARDING_HEADERS:
        if setting.strip().lower() == name.lower():
            return name
    raise ValueError(f"FORWARDED_HEADER must be one of {', '.join(FORWARDING_HEADERS)}; got {setting!r}")


def forwarded_hops(headers: Headers, name: str) -> list[str]:
    """The chain of client addresses header `name` claims, left (origin) to right (nearest proxy)."""
    values = headers.get_list(name)
    if name == "Forwarded":
        return [match.group(1) for element in ",".join(values).split(",")
                for match in [_FOR.search(element.strip())] if match]
    if name == "X-Real-IP":
        return values[-1:]
    return [hop for hop in ",".join(values).split(",") if hop.strip()]


def is_proxied(headers: Headers) -> bool:
    return any(headers.get_list(name) for name in FORWARDING_HEADERS)


class TrustedProxies:
    """The `TRUSTED_PROXIES` setting, and the resolution of a request's client address."""

    __slots__ = ("networks", "header")

    def __init__(self, networks: Sequence[Network] = (), header: str = "X-Forwarded-For") -> None:
        self.networks = tuple(networks)
        self.header = header_name(header)

    @classmethod
    def parse(cls, entries: Iterable[str], header: str = "X-Forwarded-For") -> TrustedProxies:
        return cls(parse_networks(entries), header)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, address: Address) -> bool:
        return any(address in network for network in self.networks)

    def resolve(self, peer: str, headers: Headers) -> ClientAddress:
        if not is_proxied(headers):
            return ClientAddress(peer)
        nearest = parse_address(peer)
        if nearest is None or not self.trusts(nearest):
            return ClientAddress(peer, proxied=True)  # forged, or a proxy nobody declared: ignored
        for hop in reversed(forwarded_hops(headers, self.header)):
            address = parse_address(hop)
            if address is None:
                break
            if not self.trusts(address):
                return ClientAddress(str(address), proxied=True, trusted=True)
            nearest = address
        return ClientAddress(str(nearest), proxied=True)  # no client named: nobody vouches for this one


def resolve_client(request: Request, proxies: TrustedProxies) -> ClientAddress:
    """The client's address, also written to `request.remote_ip` (as Tornado's `xheaders` does) so
    that the access log, the connection log and the per-IP limit all see the client, not the proxy."""
    client = proxies.resolve(request.remote_ip or "", request.headers)
    request.remote_ip = client.ip
    return client
