"""A driver client in Python (Tornado): connect, answer heartbeats, stream locations, print pushes,
answer receipts, and resume after a dropped connection without missing a recorded message.

    .venv/bin/python examples/driver_client.py ws://localhost:4010 TOKEN [seconds]

Resuming (PROTOCOL.md section 7): keep the `epoch` from `connected` and the `seq` of the last
recorded message handled; after a drop, reconnect (backoff with jitter) with `since=<seq>&epoch=<epoch>`.
`recovered: true`: the missed messages follow, in order. `recovered: false`: re-read state from the services.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sys
import time
from typing import Any
from urllib.parse import urlencode

from tornado.httpclient import HTTPClientError
from tornado.websocket import WebSocketClientConnection, WebSocketClosedError, WebSocketError, websocket_connect

NO_RECONNECT = {4400, 4401, 4409}  # fix the request or token first; 4409: another session of this device took over
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 10.0  # seconds, doubling, each delay jittered down by up to half


def reread_state_from_services() -> None:
    """Placeholder: a real app fetches its current rides and offers from the services (HTTP) here."""
    print("re-reading state from the services")


class DriverClient:
    def __init__(self, base: str, token: str, seconds: float) -> None:
        self.base, self.token = base, token
        self.deadline = time.monotonic() + seconds if seconds > 0 else float("inf")
        self.epoch: str | None = None  # from `connected`: names this run of the user's recorded messages
        self.seq = 0  # connected's seq, then the seq of each recorded message handled
        self.has_connected = False
        self.failures = 0  # connects and drops since the last `connected`
        self.sent = 0

    async def run(self) -> None:
        while True:
            query = {"token": self.token, "userType": "driver", "deviceId": "pixel-8-py", "platform": "android"}
            if self.epoch is not None:
                query |= {"since": str(self.seq), "epoch": self.epoch}
            try:
                ws = await websocket_connect(f"{self.base}/ws?{urlencode(query)}")
            except (OSError, HTTPClientError, WebSocketError) as exc:
                print("connect failed:", exc)
            else:
                if await self.session(ws):
                    return
            delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2**self.failures) * random.uniform(0.5, 1.0)
            self.failures += 1
            if time.monotonic() + delay >= self.deadline:
                return
            print(f"reconnecting in {delay:.1f}s")
            await asyncio.sleep(delay)

    async def session(self, ws: WebSocketClientConnection) -> bool:
        """Read until the socket closes; True when the client should not reconnect."""
        while time.monotonic() < self.deadline:
            try:
                raw = await asyncio.wait_for(ws.read_message(), timeout=0.5)
            except TimeoutError:
                self.sent += 1
                send(ws, {"type": "location_update", "id": f"loc-{self.sent}", "payload": {
                    "latitude": 12.97, "longitude": 77.59, "timestamp": int(time.time() * 1000)}})
                continue
            if raw is None:
                print("closed", ws.close_code, ws.close_reason)
                return ws.close_code in NO_RECONNECT
            self.handle(ws, json.loads(raw))
        ws.close(1000, "done")
        print("closed 1000 done")
        return True

    def handle(self, ws: WebSocketClientConnection, message: dict[str, Any]) -> None:
        print(message["type"], json.dumps(message["payload"]))
        if message["type"] == "connected":
            self.on_connected(message["payload"])
        elif message["type"] == "heartbeat":
            send(ws, {"type": "heartbeat_ack", "payload": message["payload"]})
        if message.get("receipt"):  # the service wants to know the app has seen this message
            send(ws, {"type": "receipt", "payload": {"messageId": message["id"]}})
            print("receipt", message["id"])
        if "seq" in message:  # a recorded message, now handled
            self.seq = message["seq"]

    def on_connected(self, payload: dict[str, Any]) -> None:
        recovered = payload.get("recovered") is True
        if self.has_connected:
            print("recovered", "true" if recovered else "false")
            if not recovered:
                reread_state_from_services()
        if not recovered:  # a fresh start: continue from the user's current seq (missed messages follow otherwise)
            self.epoch, self.seq = payload.get("epoch"), payload.get("seq", 0)
        self.has_connected, self.failures = True, 0


def send(ws: WebSocketClientConnection, frame: dict[str, Any]) -> None:
    with contextlib.suppress(WebSocketClosedError):  # the socket just dropped: the reconnect takes over
        ws.write_message(json.dumps(frame))


if __name__ == "__main__":
    asyncio.run(DriverClient(sys.argv[1], sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else 0).run())
