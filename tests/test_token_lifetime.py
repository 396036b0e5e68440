"""A connection stays authorised only while its token is valid, unless it sends token_refresh."""

from __future__ import annotations

import pytest

from tests.helpers import GatewayProcess, make_token, module_gateway, unique

SHORT = {"HEARTBEAT_INTERVAL": "0.2", "HEARTBEAT_TIMEOUT": "30", "TOKEN_EXPIRY_GRACE": "0.6"}


short = module_gateway(SHORT)


async def test_expired_token_gets_an_error_then_4401_after_the_grace(short: GatewayProcess) -> None:
    user = unique()
    client = await short.connect(user, token=make_token(user, ttl_s=1))
    code, frames = await client.closed(timeout=6)
    errors = [f["payload"] for f in frames if f["type"] == "error"]
    assert code == 4401
    assert errors[0]["code"] == "AUTH_FAILED" and "token_refresh" in errors[0]["message"]
    assert errors[-1]["code"] == "AUTH_FAILED"


async def test_token_refresh_keeps_the_connection_authorised(short: GatewayProcess) -> None:
    user = unique()
    client = await short.connect(user, token=make_token(user, ttl_s=1))
    reply = await client.request({"type": "token_refresh", "payload": {"token": make_token(user, ttl_s=600)}})
    assert reply["type"] == "ack"
    assert await client.no_frame("error", within=2.5)
    assert client.ws.close_code is None
    client.close()


async def test_token_refresh_during_the_grace_cancels_the_close(short: GatewayProcess) -> None:
    user = unique()
    client = await short.connect(user, token=make_token(user, ttl_s=1))
    warning = await client.recv("error", timeout=4)
    assert warning["payload"]["code"] == "AUTH_FAILED"
    assert (await client.request({"type": "token_refresh",
                                  "payload": {"token": make_token(user, ttl_s=600)}}))["type"] == "ack"
    assert await client.no_frame("error", within=1.5)
    assert client.ws.close_code is None
    client.close()


@pytest.mark.parametrize("token_for", ["other-user", "other-type", "garbage"])
async def test_token_refresh_with_a_bad_token_is_refused_and_changes_nothing(short: GatewayProcess,
                                                                            token_for: str) -> None:
    user = unique()
    client = await short.connect(user, token=make_token(user, ttl_s=600))
    token = {"other-user": make_token("someone-else", ttl_s=600),
             "other-type": make_token(user, "rider", ttl_s=600), "garbage": "x.y.z"}[token_for]
    reply = await client.request({"type": "token_refresh", "payload": {"token": token}})
    assert reply["type"] == "error"
    assert reply["payload"]["code"] == "AUTH_FAILED"
    assert client.ws.close_code is None
    client.close()
