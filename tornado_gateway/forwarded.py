"""The client's real address behind trusted proxies (`TRUSTED_PROXIES`); pure, no I/O.

Forwarding headers are honoured only when the direct peer is a trusted proxy; then the client is
the right-most address of the chain that is not itself a trusted proxy (each proxy appends the
address it saw, so everything left of the last untrusted hop may be forged). This is the rule of
uvicorn's `--forwarded-allow-ips` and gunicorn's `forwarded_allow_ips`. Tornado's own `xheaders`
option is not used: it believes the headers of any peer, has no CIDRs and ignores RFC 7239's
`Forwarded`.

Precedence when several are present: `Forwarded`, then `X-Forwarded-For`, then `X-Real-IP`. A hop
that is not an address (`unknown`, an obfuscated `_name`, garbage) ends the walk: the client is then
the last trusted hop, never an exception.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Iterable, Sequence
from typing import Final, Protocol

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

FORWARDING_HEADERS: Final = ("Forwarded", "X-Forwarded-For", "X-Real-IP")
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
    proxied: bool = False  # the request carried forwarding headers
    trusted: bool = False  # ...from a trusted proxy, so `ip` is the forwarded client's


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


def forwarded_hops(headers: Headers) -> list[str] | None:
    """The chain of client addresses the headers claim, left (origin) to right (nearest proxy);
    None when the request carries no forwarding header."""
    forwarded = headers.get_list("Forwarded")
    if forwarded:
        return [match.group(1) for element in ",".join(forwarded).split(",")
                for match in [_FOR.search(element.strip())] if match]
    forwarded_for = headers.get_list("X-Forwarded-For")
    if forwarded_for:
        return [hop for hop in ",".join(forwarded_for).split(",") if hop.strip()]
    real_ip = headers.get_list("X-Real-IP")
    if real_ip:
        return [real_ip[-1]]
    return None


class TrustedProxies:
    """The `TRUSTED_PROXIES` setting, and the resolution of a request's client address."""

    __slots__ = ("networks",)

    def __init__(self, networks: Sequence[Network] = ()) -> None:
        self.networks = tuple(networks)

    @classmethod
    def parse(cls, entries: Iterable[str]) -> TrustedProxies:
        return cls(parse_networks(entries))

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, address: Address) -> bool:
        return any(address in network for network in self.networks)

    def resolve(self, peer: str, headers: Headers) -> ClientAddress:
        hops = forwarded_hops(headers)
        if hops is None:
            return ClientAddress(peer)
        nearest = parse_address(peer)
        if nearest is None or not self.trusts(nearest):
            return ClientAddress(peer, proxied=True)  # forged, or a proxy nobody declared: ignored
        for hop in reversed(hops):
            address = parse_address(hop)
            if address is None:
                break
            nearest = address
            if not self.trusts(address):
                break
        return ClientAddress(str(nearest), proxied=True, trusted=True)


def resolve_client(request: Request, proxies: TrustedProxies) -> ClientAddress:
    """The client's address, also written to `request.remote_ip` (as Tornado's `xheaders` does) so
    that the access log, the connection log and the per-IP limit all see the client, not the proxy."""
    client = proxies.resolve(request.remote_ip or "", request.headers)
    request.remote_ip = client.ip
    return client
