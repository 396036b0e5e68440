"""The example clients work as the README says: the JavaScript flow (connect as a driver on ios, answer
heartbeats, send location updates, receive a ride_request pushed through the broadcast API), and both
examples resume after their connection is cut from outside (a TCP proxy between them and the gateway)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis

from tests.helpers import ROOT, GatewayProcess, eventually, make_token, unique
from tests.tcp_proxy import DelayingProxy
from tests.test_typescript_sdk import ensure_sdk_built

NODE = shutil.which("node")


@pytest.mark.skipif(NODE is None, reason="node is not installed")
async def test_javascript_driver_client_flow(make_gateway) -> None:  # type: ignore[no-untyped-def]
    ensure_sdk_built()  # the example imports clients/typescript/dist
    gateway = make_gateway({"HEARTBEAT_INTERVAL": "0.5", "HEARTBEAT_TIMEOUT": "2"})
    token = make_token("js-driver", "driver")
    proc = await asyncio.create_subprocess_exec(
        NODE, "--experimental-websocket", "--no-warnings", str(ROOT / "examples" / "driver_client.js"),
        f"ws://127.0.0.1:{gateway.port}", token, "3", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    first = await asyncio.wait_for(proc.stdout.readline(), 10)
    assert first.startswith(b"connected")
    status, body = await gateway.http("POST", "/broadcast/user/js-driver",
                                      {"type": "ride_request", "payload": {"requestId": "ride-77"}})
    assert (status, body["devices"]) == (202, 1)
    output = (first + await asyncio.wait_for(proc.stdout.read(), 15)).decode()
    await proc.wait()
    assert 'ride_request {"requestId":"ride-77"}' in output
    assert "heartbeat answered" in output
    assert "ack loc-1" in output
    assert "ack dr-ride-77" in output
    assert "closed 1000" in output
    assert "error" not in output


class ExampleClient:
    """One example client process; its output read line by line as it comes."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._seen = 0  # lines already matched by `line()`

    @classmethod
    async def start(cls, language: str, url: str, token: str, seconds: float) -> ExampleClient:
        if language == "javascript":
            if NODE is None:
                pytest.skip("node is not installed")
            ensure_sdk_built()  # the example imports clients/typescript/dist
            command = [NODE, "--experimental-websocket", "--no-warnings", str(ROOT / "examples" / "driver_client.js")]
        else:
            command = [sys.executable, "-u", str(ROOT / "examples" / "driver_client.py")]
        proc = await asyncio.create_subprocess_exec(*command, url, token, str(seconds), cwd=ROOT,
                                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        return cls(proc)

    async def line(self, prefix: str, timeout: float = 5.0) -> str:
        """The next line (after the last one matched) that starts with `prefix`."""
        async def find() -> str:
            while True:
                for index in range(self._seen, len(self.lines)):
                    if self.lines[index].startswith(prefix):
                        self._seen = index + 1
                        return self.lines[index]
                if not await self._read_line():
                    raise AssertionError(f"the client exited before printing {prefix!r}:\n" + "\n".join(self.lines))

        try:
            return await asyncio.wait_for(find(), timeout)
        except TimeoutError:
            raise AssertionError(f"no {prefix!r} within {timeout}s:\n" + "\n".join(self.lines)) from None

    async def finish(self, timeout: float) -> list[str]:
        """Every line, once the client has exited by itself."""
        async def drain() -> None:
            while await self._read_line():
                pass
        await asyncio.wait_for(drain(), timeout)
        await self.proc.wait()
        return self.lines

    async def stop(self) -> list[str]:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            await self.proc.wait()
        return self.lines

    async def _read_line(self) -> bool:
        assert self.proc.stdout is not None
        raw = await self.proc.stdout.readline()
        if raw:
            self.lines.append(raw.decode().rstrip("\n"))
        return bool(raw)


async def offer(gateway: GatewayProcess, user: str, n: int, devices: int) -> str:
    """A recorded ride_request that asks for a receipt; returns its message id."""
    status, body = await gateway.http("POST", f"/broadcast/user/{user}",
                                      {"type": "ride_request", "payload": {"requestId": f"r{n}"}, "receipt": True})
    assert (status, body["devices"]) == (202, devices), body
    return str(body["messageId"])


async def cut(proxy: DelayingProxy, client: ExampleClient, gateway: GatewayProcess) -> None:
    """Drop the client's connection from outside and keep it away until it has retried once in vain."""
    proxy.refusing = True
    proxy.drop()
    await client.line("closed")
    await client.line("reconnecting in")
    await client.line("reconnecting in")  # the first reconnect was refused: it backs off and tries again

    async def no_connections() -> bool:
        return bool((await gateway.http("GET", "/stats"))[1]["totalConnections"] == 0)
    await eventually(no_connections)


def pushed(lines: list[str], kind: str) -> list[dict[str, Any]]:
    """The payloads the client printed for messages of `kind` (`<type> <payload JSON>`)."""
    return [json.loads(line.split(" ", 1)[1]) for line in lines if line.startswith(f"{kind} ")]


@contextlib.asynccontextmanager
async def example_behind_proxy(language: str, gateway: GatewayProcess, user: str,
                               seconds: float) -> AsyncIterator[tuple[ExampleClient, DelayingProxy]]:
    """The example client connected through a proxy that the test can cut; stopped afterwards."""
    proxy = await DelayingProxy("127.0.0.1", gateway.port).start()
    client = await ExampleClient.start(language, f"ws://127.0.0.1:{proxy.port}", make_token(user, "driver"), seconds)
    try:
        await client.line("connected", timeout=10)
        yield client, proxy
    finally:
        await client.stop()
        await proxy.stop()


async def first_offer_receipted(gateway: GatewayProcess, client: ExampleClient, redis_client: redis.Redis,
                                prefix: str, user: str) -> list[str]:
    """One live ride_request, its receipt already in Redis (one still in flight would be cut off)."""
    ids = [await offer(gateway, user, 1, devices=1)]
    await client.line("receipt")
    await receipts_answered(redis_client, prefix, user, ids)
    return ids


async def receipts_answered(redis_client: redis.Redis, prefix: str, user: str, ids: list[str]) -> None:
    """The user's receipts on the gateway's receipt stream are exactly `ids`, in order."""
    def receipts() -> list[str]:
        events = [json.loads(fields[b"data"]) for _, fields in redis_client.xrange(f"{prefix}:stream:receipt")]
        return [event["payload"]["messageId"] for event in events if event["userId"] == user]
    await eventually(lambda: receipts() == ids, timeout=2)


@pytest.mark.parametrize("language", ["javascript", "python"])
async def test_example_client_resumes_after_its_connection_is_cut(  # type: ignore[no-untyped-def]
        language: str, make_gateway, redis_client: redis.Redis, prefix: str) -> None:
    gateway = make_gateway({"HEARTBEAT_INTERVAL": "1", "HEARTBEAT_TIMEOUT": "3"})
    user = unique("driver")
    async with example_behind_proxy(language, gateway, user, 6) as (client, proxy):
        ids = await first_offer_receipted(gateway, client, redis_client, prefix, user)
        await cut(proxy, client, gateway)
        ids += [await offer(gateway, user, n, devices=0) for n in (2, 3, 4)]  # recorded while it is away
        proxy.refusing = False
        assert await client.line("recovered", timeout=10) == "recovered true"
        for _ in (2, 3, 4):
            await client.line("ride_request")
        ids.append(await offer(gateway, user, 5, devices=1))  # live again
        lines = await client.finish(timeout=10)
    output = "\n".join(lines)
    assert [p["requestId"] for p in pushed(lines, "ride_request")] == ["r1", "r2", "r3", "r4", "r5"], output
    assert [line.split()[1] for line in lines if line.startswith("receipt ")] == ids, output
    assert "recovered false" not in output and "re-reading state" not in output
    assert lines[-1].startswith("closed 1000"), output
    assert not [line for line in lines if line.startswith("error ")], output
    await receipts_answered(redis_client, prefix, user, ids)


@pytest.mark.parametrize("language", ["javascript", "python"])
async def test_example_client_rereads_state_when_the_gap_is_gone_then_resumes_from_there(  # type: ignore[no-untyped-def]
        language: str, make_gateway, redis_client: redis.Redis, prefix: str) -> None:
    gateway = make_gateway({"HEARTBEAT_INTERVAL": "1", "HEARTBEAT_TIMEOUT": "3", "HISTORY_SIZE": "2"})
    user = unique("driver")
    async with example_behind_proxy(language, gateway, user, 60) as (client, proxy):
        ids = await first_offer_receipted(gateway, client, redis_client, prefix, user)
        await cut(proxy, client, gateway)
        for n in (2, 3, 4):  # seq 2 falls out of a history of 2: the client cannot resume from seq 1
            await offer(gateway, user, n, devices=0)
        proxy.refusing = False
        assert await client.line("recovered", timeout=10) == "recovered false"
        await client.line("re-reading state from the services")
        ids.append(await offer(gateway, user, 5, devices=1))
        await client.line("receipt")
        await receipts_answered(redis_client, prefix, user, ids)
        await cut(proxy, client, gateway)  # from here on it resumes from seq 5
        ids.append(await offer(gateway, user, 6, devices=0))
        proxy.refusing = False
        assert await client.line("recovered", timeout=10) == "recovered true"
        await client.line("receipt")
        await asyncio.sleep(0.5)  # time for anything sent twice
        lines = await client.stop()
    output = "\n".join(lines)
    assert [p["requestId"] for p in pushed(lines, "ride_request")] == ["r1", "r5", "r6"], output
    assert [line.split()[1] for line in lines if line.startswith("receipt ")] == ids, output
    await receipts_answered(redis_client, prefix, user, ids)
