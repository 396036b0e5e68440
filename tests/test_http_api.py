"""Contract section 5 (HTTP): broadcast authorisation and validation, health and readiness."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import GatewayProcess, module_gateway, unique
from tornado_gateway.config import load_settings
from tornado_gateway.forwarded import ClientAddress
from tornado_gateway.http_api import broadcast_refusal

KEY = "svc-key-0123456789"
NOTE = {"type": "notification", "payload": {"title": "Hi", "body": "there"}}


keyed = module_gateway({"GATEWAY_API_KEY": KEY, "MAX_MESSAGE_SIZE": "2048"})


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_broadcast_returns_202_with_message_id_and_device_count(keyed: GatewayProcess) -> None:
    user = unique()
    a = await keyed.connect(user, "rider", "a")
    b = await keyed.connect(user, "rider", "b")
    status, body = await keyed.http("POST", f"/broadcast/user/{user}", NOTE, auth())
    assert status == 202
    assert body["devices"] == 2
    assert (await a.recv("notification"))["id"] == body["messageId"]
    assert (await b.recv("notification"))["id"] == body["messageId"]
    a.close()
    b.close()


async def test_broadcast_to_an_offline_user_reports_zero_devices(keyed: GatewayProcess) -> None:
    status, body = await keyed.http("POST", f"/broadcast/user/{unique()}", NOTE, auth())
    assert (status, body["devices"]) == (202, 0)


async def test_broadcast_keeps_the_producer_id(keyed: GatewayProcess) -> None:
    client = await keyed.connect()
    status, body = await keyed.http("POST", f"/broadcast/user/{client.user_id}", {**NOTE, "id": "svc-9"}, auth())
    assert (status, body["messageId"]) == (202, "svc-9")
    assert (await client.recv("notification"))["id"] == "svc-9"
    client.close()


@pytest.mark.parametrize("headers", [{}, auth("wrong-key"), {"Authorization": KEY}],
                         ids=["no-key", "wrong-key", "not-bearer"])
async def test_broadcast_without_the_right_key_is_401(keyed: GatewayProcess, headers: dict[str, str]) -> None:
    status, body = await keyed.http("POST", "/broadcast/user/u1", NOTE, headers)
    assert status == 401
    assert body["error"] == "AUTH_FAILED"


@pytest.mark.parametrize("body", [
    {"type": "teleport", "payload": {}}, {"type": "heartbeat", "payload": {}}, {"type": "connected", "payload": {}},
    {"type": "ride_request", "payload": {}}, {"type": "ride_status", "payload": {"rideId": "r"}},
    {"type": "notification"}, {"type": "notification", "payload": "hi"}, [1, 2],
], ids=["unknown", "gateway-heartbeat", "gateway-connected", "missing-requestId", "missing-status",
        "no-payload", "payload-not-object", "not-object"])
async def test_broadcast_with_a_bad_body_is_400_naming_the_problem(keyed: GatewayProcess, body: object) -> None:
    status, reply = await keyed.http("POST", "/broadcast/user/u1", body, auth())
    assert status == 400
    assert reply["error"] in {"INVALID_MESSAGE", "UNKNOWN_TYPE"}
    assert reply["message"]


async def test_broadcast_with_invalid_json_is_400(keyed: GatewayProcess) -> None:
    status, reply = await keyed.http("POST", "/broadcast/user/u1", raw=b"{nope", headers=auth())
    assert (status, reply["error"]) == (400, "INVALID_JSON")


async def test_broadcast_body_over_max_message_size_is_413(keyed: GatewayProcess) -> None:
    big = {"type": "notification", "payload": {"title": "t", "body": "x" * 3000}}
    status, reply = await keyed.http("POST", "/broadcast/user/u1", big, auth())
    assert status == 413
    assert reply["error"] == "TOO_LARGE"


async def test_broadcast_without_an_api_key_is_accepted_from_loopback(gateway: GatewayProcess) -> None:
    status, _body = await gateway.http("POST", f"/broadcast/user/{unique()}", NOTE)
    assert status == 202


def test_broadcast_without_an_api_key_is_403_from_other_addresses() -> None:
    refusal = broadcast_refusal(None, ClientAddress("10.1.2.3"), None)
    assert refusal is not None and refusal[0] == 403
    assert broadcast_refusal(None, ClientAddress("127.0.0.1"), None) is None
    assert broadcast_refusal(None, ClientAddress("::1"), None) is None


def test_broadcast_key_check_accepts_only_the_exact_bearer_key() -> None:
    assert broadcast_refusal(KEY, ClientAddress("10.1.2.3"), f"Bearer {KEY}") is None
    assert broadcast_refusal(KEY, ClientAddress("127.0.0.1"), None) == (401, "AUTH_FAILED", "missing or wrong API key")
    assert broadcast_refusal(KEY, ClientAddress("127.0.0.1"), f"Bearer {KEY}x") is not None


async def test_health_is_200_while_the_process_runs(gateway: GatewayProcess) -> None:
    status, body = await gateway.http("GET", "/health")
    assert (status, body["status"]) == (200, "ok")


async def test_ready_is_200_when_redis_is_connected(gateway: GatewayProcess) -> None:
    status, body = await gateway.http("GET", "/ready")
    assert (status, body["ready"]) == (200, True)


async def test_unknown_path_is_404(gateway: GatewayProcess) -> None:
    status, _body = await gateway.http("GET", "/nope")
    assert status == 404


async def test_broadcast_payload_with_nan_is_400_not_a_crash(keyed: GatewayProcess) -> None:
    raw = b'{"type": "notification", "payload": {"title": "t", "body": "b", "score": NaN}}'
    status, reply = await keyed.http("POST", "/broadcast/user/u1", raw=raw, headers=auth())
    assert (status, reply["error"]) == (400, "INVALID_MESSAGE")
    assert (await keyed.http("GET", "/health"))[0] == 200


def test_an_empty_api_key_in_a_conf_file_is_no_key(tmp_path: Path) -> None:
    conf = tmp_path / "gateway.conf"
    conf.write_text('gateway_api_key = ""\njwt_secret = "from-the-conf-file-0123456789"\n')
    settings = load_settings({}, conf_file=str(conf))
    assert settings.gateway_api_key is None
    assert load_settings({"GATEWAY_API_KEY": "", "JWT_SECRET": "s" * 32}).gateway_api_key is None


def test_an_empty_api_key_never_matches_an_empty_authorization_header() -> None:
    refusal = broadcast_refusal("", ClientAddress("10.1.2.3"), "Bearer ")
    assert refusal is not None and refusal[0] == 403


async def test_a_gateway_with_an_empty_api_key_in_its_conf_file_warns_and_stays_loopback_only(
        make_gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    conf = tmp_path / "gateway.conf"
    conf.write_text('gateway_api_key = ""\n')
    gateway = make_gateway({"GATEWAY_CONF": str(conf)})
    assert "GATEWAY_API_KEY is not set" in gateway.log()
    status, _body = await gateway.http("POST", f"/broadcast/user/{unique()}", NOTE,
                                       headers={"Authorization": "Bearer "})
    assert status == 202  # loopback: allowed without a key, as documented
