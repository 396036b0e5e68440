"""SIGTERM drains gracefully; logs carry connection lines but never tokens or API keys."""

from __future__ import annotations

import json
import signal

import pytest
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


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_connection_open_and_close_are_logged_without_the_token(make_gateway,  # type: ignore[no-untyped-def]
                                                                      log_format: str) -> None:
    gateway = make_gateway({"GATEWAY_API_KEY": "api-key-must-not-leak-42", "LOG_LEVEL": "DEBUG",
                            "LOG_FORMAT": log_format})
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
    assert "GET /ws" in log
    assert token not in log
    assert token.split(".")[1] not in log  # not even the claims part
    assert "api-key-must-not-leak-42" not in log
    assert "wrong-key-also-secret" not in log
    assert "token=" not in log
    if log_format == "text":
        assert f"user={user}" in log and "device=logdev" in log and f"server={gateway.server_id}" in log
        return
    lines = [json.loads(line) for line in log.splitlines() if line.strip()]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    opened = [line for line in lines if line.get("event") == "opened" and line.get("user") == user]
    closed = [line for line in lines if line.get("event") == "closed" and line.get("user") == user]
    assert len(opened) == 1 and len(closed) == 1
    assert {k: opened[0][k] for k in ("connection", "type", "device", "platform", "server", "ip")} == {
        "connection": client.connection_id, "type": "driver", "device": "logdev", "platform": "ios",
        "server": gateway.server_id, "ip": "127.0.0.1"}
    assert opened[0]["level"] == "INFO" and opened[0]["message"].startswith(f"opened {client.connection_id} user=")
    assert {k: closed[0][k] for k in ("connection", "type", "device", "server", "reason")} == {
        "connection": client.connection_id, "type": "driver", "device": "logdev", "server": gateway.server_id,
        "reason": "-"}
    assert closed[0]["code"] in (None, 1000)  # as in the text line: the client's close frame carried no code
    assert isinstance(closed[0]["after"], float)
    assert any(line["logger"] == "tornado_gateway.access" and "/broadcast/user/" in line["message"] for line in lines)


async def _ready_is_not_200(gateway) -> bool:  # type: ignore[no-untyped-def]
    try:
        return (await gateway.http("GET", "/ready"))[0] != 200
    except OSError:
        return True


def test_log_format_is_text_or_json() -> None:
    from tornado_gateway.config import ConfigError, load_settings

    base = {"JWT_SECRET": "a-secret-long-enough-for-the-checks-0123456789"}
    assert load_settings(base).log_format == "text"
    assert load_settings({**base, "LOG_FORMAT": "JSON"}).log_format == "json"
    with pytest.raises(ConfigError, match="LOG_FORMAT"):
        load_settings({**base, "LOG_FORMAT": "xml"})
