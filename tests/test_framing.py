"""WebSocket framing after the upgrade (ws_protocol.FrameProtocol), byte by byte on a raw socket.

The contract's clients use ordinary WebSocket libraries; these tests send what such libraries (and
broken ones) put on the wire: fragments, pings, frames glued to the upgrade request, protocol
violations. docs/PROTOCOL.md lists the close codes.
"""

from __future__ import annotations

import asyncio
import json
import zlib
from collections.abc import Iterator

import pytest
import redis.asyncio

from tests.helpers import GatewayProcess, RawSocketClient, client_frame, make_token, unique

TEXT, BINARY, CONTINUATION, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA
LOCATION = {"latitude": 12.97, "longitude": 77.59, "heading": 90, "speed": 8.5, "accuracy": 4,
            "timestamp": 1767000000000, "isAvailable": True}


def frame_json(message: dict[str, object]) -> bytes:
    return json.dumps(message).encode()


@pytest.fixture(scope="module", params=["uvloop", "asyncio"])
def gateway(request: pytest.FixtureRequest, redis_url: str, prefix: str) -> Iterator[GatewayProcess]:
    """The protocol runs on either loop (EVENT_LOOP); their transports differ in pausing and buffering."""
    process = GatewayProcess(redis_url, prefix, {"EVENT_LOOP": request.param}).start()
    yield process
    process.stop()


@pytest.fixture
def driver(gateway: GatewayProcess) -> Iterator[RawSocketClient]:
    client = RawSocketClient(gateway.port, make_token(unique(), "driver"), "driver", "d1")
    assert client.read_json()["type"] == "connected"
    yield client
    client.close()


async def test_frames_sent_together_with_the_upgrade_request_are_answered(gateway: GatewayProcess) -> None:
    early = client_frame(TEXT, frame_json({"type": "heartbeat_ack", "id": "early-1"}))
    client = RawSocketClient(gateway.port, make_token(unique(), "driver"), "driver", "d1", early=early)
    assert client.read_json()["type"] == "connected"
    reply = client.read_json()
    assert (reply["type"], reply["payload"]) == ("ack", {"id": "early-1"})
    client.close()


async def test_messages_published_while_a_connection_is_set_up_arrive_in_order_without_gaps(
        gateway: GatewayProcess, redis_url: str, prefix: str) -> None:
    """The socket changes hands (Tornado's stream -> FrameProtocol) right after `connected`: messages
    published around that moment must neither be lost nor reordered."""
    publisher = redis.asyncio.Redis.from_url(redis_url)
    try:
        for _ in range(5):
            user = unique()
            channel = f"{prefix}:user:{user}"
            stop = asyncio.Event()

            async def pump(channel: str, stop: asyncio.Event, reached: list[int]) -> None:
                n = 0
                while not stop.is_set():
                    receivers = await publisher.publish(channel, json.dumps(
                        {"type": "notification", "payload": {"title": str(n), "body": "b"}}))
                    if receivers and not reached:
                        reached.append(n)  # the first message the gateway was subscribed for
                    n += 1
                    await asyncio.sleep(0.001)

            reached: list[int] = []
            pumping = asyncio.create_task(pump(channel, stop, reached))
            client = await asyncio.to_thread(RawSocketClient, gateway.port, make_token(user, "rider"), "rider", "d1")
            assert (await asyncio.to_thread(client.read_json))["type"] == "connected"
            await asyncio.sleep(0.2)
            stop.set()
            await pumping
            await publisher.publish(channel, json.dumps({"type": "notification",
                                                         "payload": {"title": "end", "body": "b"}}))
            titles: list[str] = []
            while not titles or titles[-1] != "end":
                titles.append((await asyncio.to_thread(client.read_json))["payload"]["title"])
            numbers = [int(t) for t in titles[:-1]]
            assert reached and numbers, "messages were published after the subscription"
            assert numbers[0] == reached[0], "the first message Redis delivered to the gateway reached the client"
            assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), "no gap, no reordering"
            client.close()
    finally:
        await publisher.aclose()


async def test_a_message_fragmented_over_several_frames_is_reassembled(driver: RawSocketClient) -> None:
    data = frame_json({"type": "heartbeat_ack", "id": "frag-1"})
    driver.send_frame(TEXT, data[:5], fin=False)
    driver.send_frame(CONTINUATION, data[5:12], fin=False)
    driver.send_frame(PING, b"between fragments")  # control frames may interleave
    driver.send_frame(CONTINUATION, data[12:])
    opcode, payload = driver.read_frame()
    assert (opcode, payload) == (PONG, b"between fragments")
    reply = driver.read_json()
    assert reply["type"] == "ack"
    assert reply["payload"] == {"id": "frag-1"}


async def test_a_ping_is_answered_with_a_pong_carrying_its_payload(driver: RawSocketClient) -> None:
    driver.send_frame(PING, b"are you there")
    assert driver.read_frame() == (PONG, b"are you there")


async def test_acks_come_in_the_order_of_the_frames_even_when_one_waits_for_redis(
        driver: RawSocketClient) -> None:
    frames = [client_frame(TEXT, frame_json({"type": "location_update", "id": "loc-1", "payload": LOCATION})),
              client_frame(TEXT, frame_json({"type": "heartbeat_ack", "id": "hb-2"})),
              client_frame(TEXT, frame_json({"type": "location_update", "id": "loc-3", "payload": LOCATION})),
              client_frame(TEXT, frame_json({"type": "heartbeat_ack", "id": "hb-4"}))]
    driver.sock.sendall(b"".join(frames))  # one TCP write: the gateway sees them together
    refs = [driver.read_json()["payload"]["id"] for _ in frames]
    assert refs == ["loc-1", "hb-2", "loc-3", "hb-4"]


async def test_a_client_close_is_echoed_with_its_code_and_the_socket_closed(driver: RawSocketClient) -> None:
    driver.send_frame(CLOSE, (1000).to_bytes(2, "big") + b"bye")
    assert driver.read_close() == 1000
    assert driver.sock.recv(1) == b""


async def test_invalid_utf8_in_a_text_frame_closes_with_1007(driver: RawSocketClient) -> None:
    driver.send_frame(TEXT, b'{"type": "heartbeat_ack", "id": "\xff"}')
    assert driver.read_close() == 1007


@pytest.mark.parametrize("violation", [
    pytest.param({"opcode": TEXT, "payload": b"{}", "masked": False}, id="unmasked-frame"),
    pytest.param({"opcode": TEXT, "payload": b"{}", "rsv": 4}, id="reserved-bit-without-an-extension"),
    pytest.param({"opcode": PING, "payload": b"x", "fin": False}, id="fragmented-control-frame"),
    pytest.param({"opcode": PING, "payload": b"x" * 126}, id="control-frame-over-125-bytes"),
    pytest.param({"opcode": CONTINUATION, "payload": b"{}"}, id="continuation-without-a-message"),
    pytest.param({"opcode": 0x3, "payload": b"{}"}, id="reserved-opcode"),
])
async def test_a_framing_violation_closes_with_1002(driver: RawSocketClient, violation: dict[str, object]) -> None:
    violation = dict(violation)  # the parameter is shared by both loops' runs
    opcode = violation.pop("opcode")
    payload = violation.pop("payload")
    assert isinstance(opcode, int) and isinstance(payload, bytes)
    driver.send_frame(opcode, payload, **violation)  # type: ignore[arg-type]
    assert driver.read_close() == 1002


async def test_a_new_message_inside_a_fragmented_one_closes_with_1002(driver: RawSocketClient) -> None:
    driver.send_frame(TEXT, b'{"type":', fin=False)
    driver.send_frame(TEXT, b"{}")
    assert driver.read_close() == 1002


async def test_a_frame_header_announcing_more_than_the_maximum_closes_with_1009_at_once(
        driver: RawSocketClient) -> None:
    driver.sock.sendall(bytes((0x81, 0x80 | 127)) + (2 ** 40).to_bytes(8, "big") + b"mask")  # no payload follows
    assert driver.read_close() == 1009


@pytest.mark.parametrize(("payload", "code"), [
    pytest.param(b"\x03", 1002, id="one-byte-payload"),
    pytest.param((1005).to_bytes(2, "big"), 1002, id="code-1005-is-never-sent"),
    pytest.param((999).to_bytes(2, "big"), 1002, id="code-below-1000"),
    pytest.param((1000).to_bytes(2, "big") + b"\xff", 1007, id="reason-not-utf8"),
])
async def test_an_invalid_close_frame_is_answered_with_its_error_code(driver: RawSocketClient, payload: bytes,
                                                                      code: int) -> None:
    driver.send_frame(CLOSE, payload)
    assert driver.read_close() == code


async def test_an_application_close_code_is_echoed(driver: RawSocketClient) -> None:
    driver.send_frame(CLOSE, (4000).to_bytes(2, "big"))
    assert driver.read_close() == 4000


async def test_a_fragmented_message_over_the_maximum_closes_with_1009(driver: RawSocketClient) -> None:
    chunk = b"x" * 40000  # each fragment is under MAX_MESSAGE_SIZE (64 KiB), the message is not
    driver.send_frame(TEXT, chunk, fin=False)
    driver.send_frame(CONTINUATION, chunk)
    assert driver.read_close() == 1009


async def test_binary_frames_still_get_invalid_json_and_the_connection_stays(driver: RawSocketClient) -> None:
    driver.send_frame(BINARY, frame_json({"type": "heartbeat_ack", "id": "bin-1"}))
    assert driver.read_json()["payload"]["code"] == "INVALID_JSON"
    driver.send_frame(TEXT, frame_json({"type": "heartbeat_ack", "id": "after-bin"}))
    assert driver.read_json()["payload"] == {"id": "after-bin"}


async def test_compression_when_enabled_is_negotiated_and_messages_flow(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gateway: GatewayProcess = make_gateway({"COMPRESSION": "true"})
    client = RawSocketClient(gateway.port, make_token(unique(), "driver"), "driver", "d1",
                             extensions="permessage-deflate")
    assert "sec-websocket-extensions: permessage-deflate" in client.response_headers.lower()
    inflate = zlib.decompressobj(-zlib.MAX_WBITS)

    def next_message() -> dict[str, object]:
        opcode, payload = client.read_frame()
        assert opcode == TEXT
        assert client.last_first_byte & 0x40, "RSV1 set: the server compressed the frame"
        message: dict[str, object] = json.loads(inflate.decompress(payload + b"\x00\x00\xff\xff"))
        return message

    assert next_message()["type"] == "connected"
    client.send_frame(TEXT, frame_json({"type": "heartbeat_ack", "id": "deflate-1"}))  # RSV1 clear: not compressed
    assert next_message()["payload"] == {"id": "deflate-1"}
    client.close()
