"""Development mode: insecure secret, embedded bus when Redis is unreachable, and it says so."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import ROOT, Client, GatewayProcess, make_token
from tornado_gateway.config import DEV_JWT_SECRET


async def test_dev_mode_without_redis_falls_back_to_the_embedded_bus_and_delivers(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gateway: GatewayProcess = make_gateway({"JWT_SECRET": ""}, url="redis://127.0.0.1:1", args=["--dev"])
    client = await gateway.connect("dev-user", token=make_token("dev-user", secret=DEV_JWT_SECRET))
    status, body = await gateway.http("POST", "/broadcast/user/dev-user",
                                      {"type": "notification", "payload": {"title": "t", "body": "b"}})
    assert (status, body["devices"]) == (202, 1)
    assert (await client.recv("notification"))["payload"]["title"] == "t"
    assert (await gateway.http("GET", "/ready"))[1]["redis"] == "embedded"
    log = gateway.log()
    assert "EMBEDDED single-instance bus" in log
    assert "INSECURE dev secret" in log
    client.close()


def test_without_a_secret_the_gateway_refuses_to_start_with_a_clear_message() -> None:
    env = {"PATH": "/usr/bin:/bin", "PORT": "1"}
    result = subprocess.run([sys.executable, "-m", "tornado_gateway"], env=env, cwd=ROOT, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 2
    assert "JWT_SECRET is not set" in result.stderr
    assert "--dev" in result.stderr


def test_token_command_mints_a_token_the_gateway_accepts() -> None:
    env = {"PATH": "/usr/bin:/bin", "JWT_SECRET": "cli-secret-0123456789-0123456789-xx"}
    result = subprocess.run([sys.executable, "-m", "tornado_gateway", "token", "--sub", "u5", "--user-type",
                             "rider", "--ttl", "60"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    import jwt

    claims = jwt.decode(result.stdout.strip(), env["JWT_SECRET"], algorithms=["HS256"])
    assert (claims["sub"], claims["userType"]) == ("u5", "rider")
    assert 0 < claims["exp"] - claims["iat"] <= 60


async def test_the_embedded_bus_records_and_replays_like_redis(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gateway: GatewayProcess = make_gateway({"JWT_SECRET": ""}, url="memory://", args=["--dev"])
    token = make_token("dev-user", secret=DEV_JWT_SECRET)
    client = await gateway.connect("dev-user", token=token)
    epoch = client.frames[0]["payload"]["epoch"]
    client.close()
    for n in (1, 2):
        status, body = await gateway.http("POST", "/broadcast/user/dev-user",
                                          {"type": "ride_request", "payload": {"requestId": f"r{n}"}})
        assert (status, body["seq"]) == (202, n)
    back = await Client.open(gateway.ws_url(token=token, userType="driver", deviceId="d1", platform="ios",
                                            since="0", epoch=epoch))
    assert (await back.recv("connected"))["payload"]["recovered"] is True
    assert [(await back.recv("ride_request"))["seq"] for _ in range(2)] == [1, 2]
    back.close()
