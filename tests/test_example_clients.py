"""The README's JavaScript client flow works unchanged: connect as a driver on ios, answer
heartbeats, send location updates, receive a ride_request pushed through the broadcast API."""

from __future__ import annotations

import asyncio
import shutil
import subprocess

import pytest

from tests.helpers import ROOT, make_token

NODE = shutil.which("node")


@pytest.mark.skipif(NODE is None, reason="node is not installed")
async def test_javascript_driver_client_flow(make_gateway) -> None:  # type: ignore[no-untyped-def]
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
