"""StatsD metrics reach a real UDP listener with the documented names, and a broken metrics target never
breaks the gateway. (tests/test_metrics_pipeline.py runs the real StatsD daemon and carbon behind two
instances.)"""

from __future__ import annotations

import socket

from tests.helpers import GatewayProcess, make_token, received_metrics
from tests.metrics_catalogue import matches, readme_catalogue
from tornado_gateway.metrics import instance_node


async def test_connection_message_error_and_broadcast_metrics_are_sent(make_gateway) -> None:  # type: ignore[no-untyped-def]
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind(("127.0.0.1", 0))
    listener.setblocking(False)
    port = listener.getsockname()[1]
    gateway: GatewayProcess = make_gateway({"STATSD_HOST": "127.0.0.1", "STATSD_PORT": str(port),
                                            "STATSD_PREFIX": "gw"})
    client = await gateway.connect(user_type="driver")
    await client.request({"type": "location_update", "payload": {"latitude": 1, "longitude": 2, "timestamp": 3}})
    await client.request({"type": "nope", "payload": {}})
    await gateway.http("POST", f"/broadcast/user/{client.user_id}",
                       {"type": "notification", "payload": {"title": "t", "body": "b"}})
    await gateway.http("POST", "/broadcast/user/x", {"type": "bad"})
    await client.recv("notification")
    refused = await gateway.connect(token=make_token("u", "rider"), expect_connected=False)
    await refused.closed()
    client.close()
    instance = f"gw.instance.{instance_node(gateway.server_id)}"
    wanted = {"gw.connections.opened", "gw.messages.in.location_update", "gw.errors.UNKNOWN_TYPE",
              "gw.broadcast.requests.202", "gw.broadcast.requests.400", "gw.messages.out.notification",
              "gw.auth.failures", "gw.connections.rejected.4401", f"{instance}.connections.active.driver",
              f"{instance}.connections.active.total", f"{instance}.users.unique", "gw.redis.publish_ms"}
    seen = await received_metrics(listener, wanted)
    listener.close()
    assert wanted <= seen, f"missing: {wanted - seen}"
    assert "gw.connections.active.driver" not in seen  # gauges only per instance: sums across instances work
    catalogue = readme_catalogue()
    unlisted = sorted(name for name in seen if matches(name.removeprefix("gw."), catalogue) is None)
    assert not unlisted, f"emitted but not in README's catalogue: {unlisted}"


async def test_an_unresolvable_statsd_host_does_not_stop_the_gateway(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gateway: GatewayProcess = make_gateway({"STATSD_HOST": "statsd.invalid"})
    client = await gateway.connect()
    assert (await client.request({"type": "heartbeat_ack", "payload": {}}))["type"] == "ack"
    client.close()
