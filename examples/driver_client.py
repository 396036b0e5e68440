"""A driver client in Python, on the SDK (`tornado_gateway.client`): connect, stream locations, print
pushes, and resume after a dropped connection without missing a recorded message.

    .venv/bin/python examples/driver_client.py ws://localhost:4010 TOKEN [seconds]

The SDK does the protocol work: it answers heartbeats, replaces a socket that went silent, reconnects
with capped, fully jittered backoff (none after 4400 or 4409), resumes with `since`/`epoch` and drops
what it already handled, and sends each receipt once the handler has run. What is left to the app:
what to show, and re-reading state from the services when the gateway says the gap is gone ("resync").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time

from tornado_gateway.client import (
    AckTimeout,
    ConnectionClosed,
    ConnectionLost,
    DisconnectedEvent,
    GatewayClient,
    MessageRejected,
    NotConnected,
    ReconnectPolicy,
    ResyncEvent,
    ServerMessage,
)
from tornado_gateway.messages import ConnectedPayload, ErrorPayload

LOCATION_EVERY_S = 1.0


def reread_state_from_services(event: ResyncEvent) -> None:
    """Placeholder: a real app fetches its current rides and offers from the services (HTTP) here."""
    print("re-reading state from the services")


class Printer:
    """Prints what happens, one line each, in the form the tests (and a person) read."""

    def __init__(self) -> None:
        self.connections = 0

    def connected(self, payload: ConnectedPayload) -> None:
        print("connected", json.dumps(payload))
        if self.connections:
            print("recovered", "true" if payload.get("recovered") is True else "false")
        self.connections += 1

    def disconnected(self, event: DisconnectedEvent) -> None:
        if event["code"] is None:
            print("connect failed:", event["reason"])
        else:
            print("closed", event["code"], event["reason"])
        if event["will_retry"]:
            print(f"reconnecting in {event['retry_in_s'] or 0:.1f}s")

    def message(self, message: ServerMessage) -> None:
        print(message["type"], json.dumps(message["payload"]))
        if message.get("receipt"):  # the SDK sends it once this handler has returned
            print("receipt", message["id"])

    def error(self, payload: ErrorPayload) -> None:
        print("error", json.dumps(payload))


async def stream_locations(client: GatewayClient) -> None:
    for n in range(1, sys.maxsize):
        await asyncio.sleep(LOCATION_EVERY_S)
        try:
            await client.send("location_update", {"latitude": 12.97, "longitude": 77.59,
                                                  "timestamp": int(time.time() * 1000)}, id=f"loc-{n}")
        except (NotConnected, ConnectionLost, AckTimeout):
            continue  # between connections: a stale position is not worth resending
        except MessageRejected as exc:
            print("location refused", exc.code, exc.message)
            continue
        print(f"ack loc-{n}")


async def main(url: str, token: str, seconds: float) -> None:
    client = GatewayClient(url, token, "driver", "pixel-8-py", "android",
                           reconnect=ReconnectPolicy(base_s=0.5, cap_s=10.0))
    printer = Printer()
    client.on("connected", printer.connected)
    client.on("disconnected", printer.disconnected)
    client.on("resync", reread_state_from_services)
    client.on("error", printer.error)
    client.on("message", printer.message)
    locations = asyncio.ensure_future(stream_locations(client))
    try:
        await asyncio.wait_for(run_until_stopped(client), seconds if seconds > 0 else None)
    except TimeoutError:
        pass
    finally:
        locations.cancel()
        await client.close(reason="done")


async def run_until_stopped(client: GatewayClient) -> None:
    """Connected, reconnecting, ... until a close code says stop (4400, 4409); then the last
    `disconnected` line has said why."""
    with contextlib.suppress(ConnectionClosed):
        await client.connect()
    await client.wait_closed()

if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else 0))
