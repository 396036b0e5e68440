"""A driver client in Python (Tornado): connect, answer heartbeats, stream locations, print pushes.

    .venv/bin/python examples/driver_client.py ws://localhost:4010 TOKEN [seconds]
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from urllib.parse import urlencode

from tornado.websocket import websocket_connect


async def run(base: str, token: str, seconds: float) -> None:
    query = urlencode({"token": token, "userType": "driver", "deviceId": "pixel-8-py", "platform": "android"})
    ws = await websocket_connect(f"{base}/ws?{query}")
    deadline = time.monotonic() + seconds if seconds > 0 else float("inf")
    sent = 0
    while time.monotonic() < deadline:
        try:
            raw = await asyncio.wait_for(ws.read_message(), timeout=0.5)
        except TimeoutError:
            sent += 1
            ws.write_message(json.dumps({"type": "location_update", "id": f"loc-{sent}", "payload": {
                "latitude": 12.97, "longitude": 77.59, "timestamp": int(time.time() * 1000)}}))
            continue
        if raw is None:
            print("closed", ws.close_code, ws.close_reason)
            return
        message = json.loads(raw)
        if message["type"] == "heartbeat":
            ws.write_message(json.dumps({"type": "heartbeat_ack", "payload": message["payload"]}))
        print(message["type"], json.dumps(message["payload"]))
    ws.close()


if __name__ == "__main__":
    asyncio.run(run(sys.argv[1], sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else 0))
