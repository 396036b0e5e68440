"""Abuse is refused with the contract's codes: message floods, upgrade floods, device and instance caps,
browser origins. Nothing crashes; the connection survives where the contract says it should."""

from __future__ import annotations

from tests.helpers import Client, GatewayProcess, make_token, unique

LOCATION = {"latitude": 1, "longitude": 2, "timestamp": 3}


async def test_messages_over_the_rate_limit_get_rate_limited_and_the_connection_stays(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gateway = make_gateway({"RATE_LIMIT_PER_SECOND": "5", "RATE_LIMIT_BURST": "5", "RATE_LIMIT_CLOSE_AFTER": "100"})
    client = await gateway.connect()
    for n in range(12):
        client.send({"type": "heartbeat_ack", "id": f"h{n}", "payload": {}})
    replies = [await client.recv() for _ in range(12)]
    acks = [r for r in replies if r["type"] == "ack"]
    limited = [r for r in replies if r["type"] == "error" and r["payload"]["code"] == "RATE_LIMITED"]
    assert len(acks) == 5
    assert len(limited) == 7
    assert client.ws.close_code is None
    client.close()


async def test_persistent_flooding_closes_with_4429(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gateway = make_gateway({"RATE_LIMIT_PER_SECOND": "5", "RATE_LIMIT_BURST": "5", "RATE_LIMIT_CLOSE_AFTER": "20"})
    client = await gateway.connect()
    for _ in range(60):
        client.send({"type": "location_update", "payload": LOCATION})
    code, frames = await client.closed()
    assert code == 4429
    assert frames[-1]["type"] == "error" and frames[-1]["payload"]["code"] == "RATE_LIMITED"


async def test_upgrade_flood_from_one_address_is_refused_with_4429(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gateway = make_gateway({"CONNECT_RATE_PER_IP": "1", "CONNECT_BURST_PER_IP": "3"})
    codes = []
    for _ in range(6):
        client = await Client.open(gateway.ws_url(token=make_token(unique()), userType="driver", deviceId="d",
                                                  platform="ios"))
        first = await client.recv()
        if first["type"] == "connected":
            codes.append("connected")
            client.close()
        else:
            assert first["payload"]["code"] == "RATE_LIMITED"
            codes.append((await client.closed())[0])
    assert codes[:3] == ["connected"] * 3
    assert 4429 in codes[3:]


async def test_devices_beyond_the_per_user_cap_are_refused(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gateway: GatewayProcess = make_gateway({"MAX_DEVICES_PER_USER": "2"})
    user = unique()
    first = await gateway.connect(user, device_id="a")
    second = await gateway.connect(user, device_id="b")
    third = await gateway.connect(user, device_id="c", expect_connected=False)
    code, frames = await third.closed()
    assert code == 4429
    assert frames[0]["payload"]["code"] == "RATE_LIMITED"
    again = await gateway.connect(user, device_id="a")  # a known device may always reconnect (replacement)
    assert (await first.closed())[0] == 4409
    for client in (second, again):
        client.close()


async def test_instance_at_its_connection_cap_refuses_with_1013(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gateway = make_gateway({"MAX_CONNECTIONS": "2"})
    held = [await gateway.connect(), await gateway.connect()]
    extra = await gateway.connect(expect_connected=False)
    code, frames = await extra.closed()
    assert code == 1013
    assert frames[0]["payload"]["code"] == "UNAVAILABLE"
    for client in held:
        client.close()


async def test_browser_origin_outside_the_allow_list_is_refused(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gateway = make_gateway({"ALLOWED_ORIGINS": "https://rider.example.com,https://driver.example.com"})
    good = await gateway.connect(headers={"Origin": "https://rider.example.com"})
    good.close()
    app = await gateway.connect()  # native apps send no Origin header
    app.close()
    try:
        await gateway.connect(headers={"Origin": "https://evil.example.net"}, expect_connected=False)
    except Exception as exc:  # noqa: BLE001 - Tornado raises HTTPClientError for the 403
        assert "403" in str(exc)
    else:
        raise AssertionError("a foreign origin was accepted")


async def test_any_origin_is_accepted_when_no_allow_list_is_set(gateway: GatewayProcess) -> None:
    client = await gateway.connect(headers={"Origin": "https://anything.example"})
    client.close()
