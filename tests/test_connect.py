"""Contract section 1: connecting, the `connected` frame, and every refusal with its close code."""

from __future__ import annotations

import pytest
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

from tests.helpers import Client, GatewayProcess, make_token, unique


async def refused(gateway: GatewayProcess, **params: str) -> tuple[int | None, list[dict]]:
    client = await Client.open(gateway.ws_url(**params))
    return await client.closed()


def good_params(user_id: str = "u-params", user_type: str = "driver") -> dict[str, str]:
    return {"token": make_token(user_id, user_type), "userType": user_type, "deviceId": "dev-1", "platform": "ios"}


async def test_connected_is_the_first_frame_with_the_contract_fields(gateway: GatewayProcess) -> None:
    user = unique()
    client = await Client.open(gateway.ws_url(**good_params(user)))
    first = await client.recv()
    assert first["type"] == "connected"
    assert set(first) == {"type", "payload", "id", "timestamp"}
    payload = first["payload"]
    assert payload["userId"] == user
    assert payload["userType"] == "driver"
    assert payload["deviceId"] == "dev-1"
    assert payload["platform"] == "ios"
    assert payload["serverId"] == gateway.server_id
    assert payload["heartbeatInterval"] == 30000
    assert payload["connectionId"]
    client.close()


async def test_token_may_come_in_the_authorization_header(gateway: GatewayProcess) -> None:
    user = unique()
    params = good_params(user)
    token = params.pop("token")
    client = await Client.open(gateway.ws_url(**params), headers={"Authorization": f"Bearer {token}"})
    assert (await client.recv())["payload"]["userId"] == user
    client.close()


async def subprotocol_client(gateway: GatewayProcess, subprotocols: list[str],
                             params: dict[str, str]) -> tuple[Client, str | None]:
    request = HTTPRequest(gateway.ws_url(**params), connect_timeout=5, request_timeout=5)
    ws = await websocket_connect(request, subprotocols=subprotocols)
    return Client(ws), ws.selected_subprotocol


async def test_token_may_come_as_a_bearer_subprotocol_and_is_never_echoed(gateway: GatewayProcess) -> None:
    user = unique()
    params = good_params(user)
    token = params.pop("token")
    client, selected = await subprotocol_client(gateway, ["tornado-gateway", f"bearer.{token}"], params)
    assert (await client.recv())["payload"]["userId"] == user
    assert selected == "tornado-gateway"
    client.close()


async def test_a_bad_subprotocol_token_is_4401(gateway: GatewayProcess) -> None:
    params = good_params()
    del params["token"]
    client, _ = await subprotocol_client(gateway, ["tornado-gateway", "bearer.not-a-jwt"], params)
    code, frames = await client.closed()
    assert (code, frames[0]["payload"]["code"]) == (4401, "AUTH_FAILED")


@pytest.mark.parametrize("user_type", ["driver", "rider", "restaurant", "delivery_partner"])
async def test_every_user_type_can_connect(gateway: GatewayProcess, user_type: str) -> None:
    client = await gateway.connect(user_type=user_type, platform="web")
    client.close()


@pytest.mark.parametrize("change", [
    {"userType": "admin"}, {"userType": None}, {"deviceId": ""}, {"deviceId": "a" * 129}, {"deviceId": "bad id"},
    {"deviceId": None}, {"platform": "windows"}, {"platform": None},
], ids=["unknown-userType", "no-userType", "empty-deviceId", "long-deviceId", "deviceId-with-space",
        "no-deviceId", "unknown-platform", "no-platform"])
async def test_invalid_query_parameters_close_with_4400(gateway: GatewayProcess, change: dict) -> None:
    params = good_params()
    for key, value in change.items():
        if value is None:
            params.pop(key)
        else:
            params[key] = value.replace(" ", "%20")
    code, frames = await refused(gateway, **params)
    assert code == 4400
    assert [f["payload"]["code"] for f in frames] == ["INVALID_PARAMS"]


async def test_query_parameters_are_checked_before_the_token(gateway: GatewayProcess) -> None:
    code, frames = await refused(gateway, token="garbage", userType="driver", deviceId="d1", platform="beos")
    assert code == 4400
    assert frames[0]["payload"]["code"] == "INVALID_PARAMS"


async def test_missing_token_closes_with_4401(gateway: GatewayProcess) -> None:
    params = good_params()
    params.pop("token")
    code, frames = await refused(gateway, **params)
    assert code == 4401
    assert frames[0]["payload"]["code"] == "AUTH_FAILED"


@pytest.mark.parametrize("token", [
    "not-a-jwt",
    make_token("u1", secret="some-other-secret-0123456789-0123456789"),
    make_token("u1", ttl_s=-10),
    make_token("u1", "rider"),  # userType claim differs from the parameter
    make_token(None, "driver"),  # type: ignore[arg-type]
    make_token("u1", None),  # type: ignore[arg-type]
], ids=["malformed", "bad-signature", "expired", "userType-mismatch", "no-sub", "no-userType-claim"])
async def test_bad_tokens_close_with_4401(gateway: GatewayProcess, token: str) -> None:
    params = good_params()
    params["token"] = token
    code, frames = await refused(gateway, **params)
    assert code == 4401
    assert [f["payload"]["code"] for f in frames] == ["AUTH_FAILED"]


async def test_refusal_error_frame_has_the_envelope(gateway: GatewayProcess) -> None:
    code, frames = await refused(gateway, userType="nobody")
    assert code == 4400
    assert set(frames[0]) == {"type", "payload", "id", "timestamp"}
    assert frames[0]["type"] == "error"
    assert frames[0]["payload"]["message"]
