"""The client address behind trusted proxies (tornado_gateway/forwarded.py): pure, no sockets.

Forwarding headers count only when the direct peer is a trusted proxy; the client is the right-most
address that is not a trusted proxy; malformed input gives a clear answer, never an exception."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tornado.httputil import HTTPHeaders

from tornado_gateway.config import ConfigError, load_settings
from tornado_gateway.forwarded import ClientAddress, TrustedProxies, parse_address
from tornado_gateway.http_api import broadcast_refusal

PROXIES = TrustedProxies.parse(["10.0.0.0/8", "127.0.0.1", "2001:db8:ffff::/48"])


class RawHeaders:
    """Header lines as they could arrive from any client: Tornado's HTTPHeaders would refuse some
    of these values before they reach the resolution, which must cope with them all the same."""

    def __init__(self, pairs: tuple[tuple[str, str], ...]) -> None:
        self.pairs = pairs

    def get_list(self, name: str) -> list[str]:
        return [value for key, value in self.pairs if key.lower() == name.lower()]


def headers(*pairs: tuple[str, str]) -> RawHeaders:
    return RawHeaders(pairs)


def resolve(peer: str, *pairs: tuple[str, str], proxies: TrustedProxies = PROXIES) -> ClientAddress:
    return proxies.resolve(peer, headers(*pairs))


def test_without_forwarding_headers_the_peer_is_the_client() -> None:
    assert resolve("10.1.2.3") == ClientAddress("10.1.2.3")


def test_headers_from_an_untrusted_peer_are_ignored() -> None:
    assert resolve("198.51.100.7", ("X-Forwarded-For", "127.0.0.1")) == \
        ClientAddress("198.51.100.7", proxied=True, trusted=False)


def test_with_no_trusted_proxies_forged_headers_change_nothing() -> None:
    client = resolve("127.0.0.1", ("X-Forwarded-For", "203.0.113.9"), proxies=TrustedProxies())
    assert (client.ip, client.trusted) == ("127.0.0.1", False)


def test_a_trusted_proxy_names_the_client() -> None:
    assert resolve("127.0.0.1", ("X-Forwarded-For", "203.0.113.9")) == \
        ClientAddress("203.0.113.9", proxied=True, trusted=True)


def test_the_client_is_the_right_most_address_that_is_not_a_trusted_proxy() -> None:
    chain = "1.1.1.1, 203.0.113.9, 10.0.0.5, 10.9.9.9"  # 1.1.1.1 may be forged by 203.0.113.9
    assert resolve("10.0.0.1", ("X-Forwarded-For", chain)).ip == "203.0.113.9"


def test_a_chain_of_only_trusted_proxies_names_no_client() -> None:
    assert resolve("10.0.0.1", ("X-Forwarded-For", "10.0.0.7, 10.0.0.8")) == \
        ClientAddress("10.0.0.7", proxied=True, trusted=False)


def test_tornado_headers_work_too() -> None:
    real = HTTPHeaders({"X-Forwarded-For": "203.0.113.9"})
    assert PROXIES.resolve("127.0.0.1", real).ip == "203.0.113.9"


def test_repeated_forwarded_for_headers_are_one_chain() -> None:
    client = resolve("10.0.0.1", ("X-Forwarded-For", "1.1.1.1"), ("X-Forwarded-For", "203.0.113.9"))
    assert client.ip == "203.0.113.9"


def test_only_the_configured_header_is_believed() -> None:
    forged = ("Forwarded", "for=127.0.0.1")  # a client's own header, passed on by a proxy that sets XFF
    assert resolve("127.0.0.1", forged, ("X-Forwarded-For", "203.0.113.9")).ip == "203.0.113.9"
    assert resolve("127.0.0.1", forged) == ClientAddress("127.0.0.1", proxied=True, trusted=False)


def test_a_forged_header_the_proxy_does_not_set_never_makes_a_loopback_caller() -> None:
    for forged in (("Forwarded", "for=127.0.0.1"), ("Forwarded", "for=unknown"), ("Forwarded", "proto=https"),
                   ("X-Real-IP", "127.0.0.1")):
        assert broadcast_refusal(None, resolve("127.0.0.1", forged), None) is not None, forged


def test_rfc_7239_forwarded_when_configured() -> None:
    proxies = TrustedProxies(PROXIES.networks, "forwarded")
    client = resolve("10.0.0.1", ("Forwarded", 'for=192.0.2.60;proto=https;by=10.0.0.1, for="10.0.0.2"'),
                     ("X-Forwarded-For", "203.0.113.9"), proxies=proxies)
    assert client.ip == "192.0.2.60"


def test_forwarded_ipv6_with_port_in_brackets() -> None:
    proxies = TrustedProxies(PROXIES.networks, "Forwarded")
    assert resolve("10.0.0.1", ("Forwarded", 'For="[2001:db8:cafe::17]:4711"'), proxies=proxies).ip == \
        "2001:db8:cafe::17"


def test_x_real_ip_when_configured() -> None:
    proxies = TrustedProxies(PROXIES.networks, "X-Real-IP")
    assert resolve("127.0.0.1", ("X-Real-IP", "203.0.113.9"), ("X-Forwarded-For", "1.1.1.1"), proxies=proxies).ip == \
        "203.0.113.9"


def test_ipv6_peer_and_hops() -> None:
    assert resolve("2001:db8:ffff::1", ("X-Forwarded-For", "2001:db8:1::5, 2001:db8:ffff::9")).ip == "2001:db8:1::5"


def test_ipv4_with_a_port_and_ipv4_mapped_ipv6() -> None:
    assert resolve("::ffff:127.0.0.1", ("X-Forwarded-For", "203.0.113.9:50123")).ip == "203.0.113.9"


def test_an_unknown_or_obfuscated_hop_ends_the_walk_at_the_last_trusted_proxy_unvouched() -> None:
    proxies = TrustedProxies(PROXIES.networks, "Forwarded")
    assert resolve("10.0.0.1", ("Forwarded", "for=unknown"), proxies=proxies) == \
        ClientAddress("10.0.0.1", proxied=True, trusted=False)
    assert resolve("10.0.0.1", ("X-Forwarded-For", "203.0.113.9, _hidden, 10.0.0.4")) == \
        ClientAddress("10.0.0.4", proxied=True, trusted=False)


@pytest.mark.parametrize("value", ["", " , ,", "not an address", "999.1.1.1", "[::1", "for=", "\x00",
                                   "1.2.3.4.5", "[]:80", "fe80::1%eth0%x"])
def test_malformed_headers_give_a_clear_result(value: str) -> None:
    client = resolve("127.0.0.1", ("X-Forwarded-For", value))
    assert client.proxied and client.ip in ("127.0.0.1", "fe80::1")


@given(st.text(max_size=200))
def test_no_header_value_raises(value: str) -> None:
    for name in ("Forwarded", "X-Forwarded-For", "X-Real-IP"):
        client = TrustedProxies(PROXIES.networks, name).resolve("127.0.0.1", headers((name, value)))
        assert client.ip


def test_parse_address_forms() -> None:
    assert str(parse_address("1.2.3.4")) == "1.2.3.4"
    assert str(parse_address('"[2001:db8::1]:443"')) == "2001:db8::1"
    assert str(parse_address("2001:db8::1")) == "2001:db8::1"
    assert parse_address("unknown") is None


def test_trusted_proxies_setting_is_checked_at_start() -> None:
    assert load_settings({"TRUSTED_PROXIES": "10.0.0.0/8, 127.0.0.1, ::1"}, dev=True).trusted_proxies == \
        ("10.0.0.0/8", "127.0.0.1", "::1")
    with pytest.raises(ConfigError, match="TRUSTED_PROXIES: 'nginx' is not an IP address or CIDR"):
        load_settings({"TRUSTED_PROXIES": "nginx"}, dev=True)


def test_forwarded_header_setting_is_one_of_three() -> None:
    assert load_settings({"FORWARDED_HEADER": "forwarded"}, dev=True).forwarded_header == "forwarded"
    with pytest.raises(ConfigError, match="FORWARDED_HEADER must be one of X-Forwarded-For, Forwarded, X-Real-IP"):
        load_settings({"FORWARDED_HEADER": "X-Client-IP"}, dev=True)


def test_broadcast_without_a_key_is_for_direct_loopback_callers() -> None:
    assert broadcast_refusal(None, ClientAddress("127.0.0.1"), None) is None
    assert broadcast_refusal(None, ClientAddress("::1"), None) is None
    assert broadcast_refusal(None, ClientAddress("203.0.113.9"), None) is not None


def test_broadcast_without_a_key_through_a_proxy_is_refused() -> None:
    untrusted = ClientAddress("127.0.0.1", proxied=True, trusted=False)
    forwarded_remote = ClientAddress("203.0.113.9", proxied=True, trusted=True)
    assert broadcast_refusal(None, untrusted, None) == \
        (403, "FORBIDDEN", "GATEWAY_API_KEY is not set: broadcast is for loopback callers, not through a proxy")
    assert broadcast_refusal(None, forwarded_remote, None) is not None


def test_broadcast_through_a_trusted_proxy_for_a_loopback_client_is_accepted() -> None:
    assert broadcast_refusal(None, ClientAddress("127.0.0.1", proxied=True, trusted=True), None) is None


def test_broadcast_with_a_key_ignores_addresses() -> None:
    assert broadcast_refusal("k" * 32, ClientAddress("203.0.113.9", proxied=True), "Bearer " + "k" * 32) is None
    assert broadcast_refusal("k" * 32, ClientAddress("127.0.0.1"), None) is not None
