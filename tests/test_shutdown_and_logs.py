"""SIGTERM drains gracefully; logs carry connection lines but never tokens or API keys."""

from __future__ import annotations

import signal

import redis

from tests.helpers import Client, eventually, make_token, unique


async def test_sigterm_closes_clients_with_1001_deregisters_and_exits_0(make_gateway,  # type: ignore[no-untyped-def]
                                                                       redis_client: redis.Redis,
                                                                       prefix: str) -> None:
    gateway = make_gateway()
    client = await gateway.connect(device_id="tab")
    key = f"{prefix}:presence:{client.user_id}"
    assert redis_client.hexists(key, "tab")
    gateway.signal(signal.SIGTERM)
    code, frames = await client.closed(timeout=10)
    assert code == 1001
    assert not [f for f in frames if f["type"] == "error"]  # 1001 is not a 4xxx: no error frame
    assert gateway.wait(15) == 0
    assert not redis_client.hexists(key, "tab")
    assert not redis_client.sismember(f"{prefix}:servers", gateway.server_id)
    assert not redis_client.exists(f"{prefix}:server:{gateway.server_id}")


async def test_draining_instance_accepts_no_new_connections(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gateway = make_gateway({"SHUTDOWN_DRAIN_SECONDS": "1.5"})
    holders = [await gateway.connect() for _ in range(3)]
    gateway.signal(signal.SIGTERM)
    await eventually(lambda: _ready_is_not_200(gateway), timeout=5)
    try:
        late = await Client.open(gateway.ws_url(token=make_token("late"), userType="driver", deviceId="d",
                                                platform="ios"))
        code, _frames = await late.closed()
        assert code == 1001
    except OSError:
        pass  # the listening socket is already closed: also a refusal
    for client in holders:
        assert (await client.closed(timeout=10))[0] == 1001
    assert gateway.wait(15) == 0


async def test_connection_open_and_close_are_logged_without_the_token(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gateway = make_gateway({"GATEWAY_API_KEY": "api-key-must-not-leak-42", "LOG_LEVEL": "DEBUG"})
    user = unique()
    token = make_token(user)
    client = await gateway.connect(user, device_id="logdev", token=token)
    bad = await Client.open(gateway.ws_url(token=token + "tampered", userType="driver", deviceId="x",
                                           platform="ios"))
    await bad.closed()
    await gateway.http("POST", f"/broadcast/user/{user}", {"type": "notification",
                                                          "payload": {"title": "t", "body": "b"}},
                       {"Authorization": "Bearer api-key-must-not-leak-42"})
    await gateway.http("POST", f"/broadcast/user/{user}", {}, {"Authorization": "Bearer wrong-key-also-secret"})
    client.close()
    await eventually(lambda: "closed" in gateway.log() and user in gateway.log())
    log = gateway.log()
    assert f"user={user}" in log and "device=logdev" in log and f"server={gateway.server_id}" in log
    assert "GET /ws" in log
    assert token not in log
    assert token.split(".")[1] not in log  # not even the claims part
    assert "api-key-must-not-leak-42" not in log
    assert "wrong-key-also-secret" not in log
    assert "token=" not in log


async def _ready_is_not_200(gateway) -> bool:  # type: ignore[no-untyped-def]
    try:
        return (await gateway.http("GET", "/ready"))[0] != 200
    except OSError:
        return True
