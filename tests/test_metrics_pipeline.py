"""The whole metrics path, as operators run it: two gateway instances -> the real Etsy StatsD daemon
(npm `statsd`, Graphite backend) -> a real carbon-cache (Debian's graphite-carbon) -> whisper files,
read back directly and through graphite-web's render API with the dashboard's own queries.

What an operator sees must be what happened: connections by user type summed over the instances
equal what is connected, message counts equal what was sent, timer counts equal the number of
events (also when an instance sampled them), and every series in Graphite is in the README's
catalogue. StatsD flushes every second and carbon keeps 1-second points, so the run takes ~25 s.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from scripts.dashboard import PANELS, concrete, render_query
from scripts.metrics_stack import MetricsStack, missing_tools
from tests.helpers import Client, GatewayProcess, eventually, make_token, unique
from tests.metrics_catalogue import matches, metrics_section, readme_catalogue
from tornado_gateway.metrics import instance_node
from tornado_gateway.redis_keys import Keys

MISSING = missing_tools(graphite_web=True)
if MISSING and os.environ.get("CI"):  # CI installs them (.ci/run): a skip there would hide a broken pipeline
    raise RuntimeError(f"the metrics pipeline test needs {', '.join(MISSING)}")
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"needs {', '.join(MISSING)} (.ci/run installs them)")

PREFIX = "gateway"  # STATSD_PREFIX: the default, as operators' queries spell it
BURST = 600  # recorded ride requests published at once: more than one flush's 200 timer samples


@pytest.fixture(scope="module")
def stack() -> Iterator[MetricsStack]:
    with MetricsStack(graphite_web=True) as running:
        yield running


class Seen:
    """Whisper files read back: sums of counters, last values of gauges, by Graphite name."""

    def __init__(self, series: dict[str, list[tuple[int, float]]]) -> None:
        self.series = series

    def total(self, name: str) -> float:
        return sum(value for _ts, value in self.series.get(name, []))

    def last(self, name: str) -> float | None:
        points = self.series.get(name)
        return points[-1][1] if points else None

    def counter(self, metric: str) -> float:
        return self.total(f"stats.counters.{PREFIX}.{metric}.count")

    def timer_count(self, metric: str) -> float:
        return self.total(f"stats.timers.{PREFIX}.{metric}.count")

    def gauge_sum(self, metric: str, instances: list[str]) -> float | None:
        values = [self.last(f"stats.gauges.{PREFIX}.instance.{instance_node(i)}.{metric}") for i in instances]
        return None if None in values else sum(v for v in values if v is not None)


async def wait_for(stack: MetricsStack, expected: dict[str, float], read: Any, timeout: float = 15.0) -> Seen:
    """Read the whisper files until every expected figure is there (StatsD flush + carbon write)."""
    deadline = time.monotonic() + timeout
    while True:
        seen = Seen(stack.whisper_series())
        got = {key: read(seen, key) for key in expected}
        if all(got[key] is not None and round(got[key], 6) == value for key, value in expected.items()):
            return seen
        if time.monotonic() > deadline:
            wrong = {key: (got[key], value) for key, value in expected.items() if got[key] != value}
            raise AssertionError(f"Graphite shows (seen, expected): {wrong}\n{stack.logs()}")
        await asyncio.sleep(0.5)


def readme_graphite_examples() -> list[str]:
    """The targets of the README's `| to see | target |` table."""
    section = metrics_section()
    table = section[section.index("| to see | target |"):]
    table = table[:table.index("\n\n")]
    return [t for line in table.splitlines()[2:] for t in re.findall(r"`([^`]+)`", line.split("|")[2])]


def last_datapoint(result: list[dict[str, Any]]) -> dict[str, float]:
    return {s["target"]: next(v for v, _ts in reversed(s["datapoints"]) if v is not None) for s in result
            if any(v is not None for v, _ts in s["datapoints"])}


async def test_two_instances_through_statsd_and_carbon_add_up(stack: MetricsStack, make_gateway,  # type: ignore[no-untyped-def]
                                                            redis_client: redis.Redis, prefix: str) -> None:
    env = {"STATSD_HOST": "127.0.0.1", "STATSD_PORT": str(stack.statsd_port), "STATSD_PREFIX": PREFIX,
           "INSTANCE_TTL": "3"}
    first: GatewayProcess = make_gateway(env)
    second: GatewayProcess = make_gateway(env)
    instances = [first.server_id, second.server_id]
    both = unique("both")
    # (gateway, user, type, device): 13 connections of 12 users, `both` with a device on each instance.
    plan = [(first, unique("d"), "driver", "a") for _ in range(3)] + \
           [(second, unique("d"), "driver", "a") for _ in range(2)] + \
           [(first, unique("r"), "rider", "a") for _ in range(2)] + [(second, unique("r"), "rider", "a")] + \
           [(first, both, "rider", "phone"), (second, both, "rider", "tablet")] + \
           [(first, unique("x"), "restaurant", "till")] + \
           [(second, unique("p"), "delivery_partner", "a") for _ in range(2)]
    clients: list[tuple[Client, str]] = []
    for gateway, user, user_type, device in plan:
        clients.append((await gateway.connect(user, user_type, device), user_type))
    refused = await first.connect(token=make_token("nobody", "rider") + "x", user_type="rider",
                                  expect_connected=False)
    await refused.closed()

    sent: dict[str, int] = {"location_update": 0, "dispatch_response": 0, "receipt": 0, "heartbeat_ack": 0}
    for client, user_type in clients:
        if user_type in ("driver", "delivery_partner"):
            for i in range(2):
                reply = await client.request({"type": "location_update",
                                              "payload": {"latitude": 12.9, "longitude": 77.6, "timestamp": i}})
                assert reply["type"] == "ack"
                sent["location_update"] += 1
        if user_type == "driver" and sent["dispatch_response"] < 2:
            await client.request({"type": "dispatch_response", "payload": {"requestId": "r1", "action": "accept"}})
            sent["dispatch_response"] += 1
        if user_type == "rider":
            await client.request({"type": "heartbeat_ack", "payload": {"timestamp": 1}})
            sent["heartbeat_ack"] += 1
    for client, _type in clients[8:10]:  # `both`, on each instance
        await client.request({"type": "receipt", "payload": {"messageId": "m1"}})
        sent["receipt"] += 1
    rider = next(c for c, t in clients if t == "rider")
    assert (await rider.request({"type": "location_update", "payload": {}}))["payload"]["code"] == "FORBIDDEN"
    restaurant = next(c for c, t in clients if t == "restaurant")
    assert (await restaurant.request({"type": "nope", "payload": {}}))["payload"]["code"] == "UNKNOWN_TYPE"

    users = sorted({user for _g, user, _t, _d in plan})
    for user in users:  # recorded, one record per user; `both` gets it on two devices
        status, body = await first.http("POST", f"/broadcast/user/{user}",
                                         {"type": "notification", "payload": {"title": "t", "body": "b"}})
        assert status == 202 and body["seq"] >= 1
    for client, _type in clients:
        await client.recv("notification")
    status, _body = await second.http("POST", f"/broadcast/user/{plan[6][1]}", {
        "type": "driver_location", "payload": {"driverId": "d", "latitude": 1.0, "longitude": 2.0}})
    assert status == 202  # a latest-value type: published live (one PUBLISH), not recorded
    await clients[6][0].recv("driver_location")
    # A burst to `both` through the Redis function, as services record: each instance delivers all of it
    # and times each delivery, far more than the 200 samples per flush it sends: the rate must make up.
    function = Keys(prefix).function("publish")
    pipe = redis_client.pipeline(transaction=False)
    for i in range(BURST):
        pipe.fcall(function, 1, both, json.dumps({"type": "ride_request", "payload": {"requestId": f"b{i}"}}))
    pipe.execute()
    for client, _type in clients[8:10]:
        for _ in range(BURST):
            await client.recv("ride_request", timeout=10)
    for client, _type in clients[:1] + clients[5:7] + clients[10:11]:  # a driver, two riders, the restaurant
        client.close()
    left = {"driver": 4, "rider": 3, "restaurant": 0, "delivery_partner": 2}

    devices = len(plan)
    expected_counters = {
        "connections.opened": devices,
        "connections.closed.client": 4,
        "connections.rejected.4401": 1,
        "auth.failures": 1,
        **{f"messages.in.{kind}": count for kind, count in sent.items()},
        "errors.FORBIDDEN": 1,
        "errors.UNKNOWN_TYPE": 1,
        "broadcast.requests.202": len(users) + 1,
        "messages.recorded": len(users),
        "messages.out.notification": devices,
        "messages.out.driver_location": 1,
        "messages.out.ride_request": 2 * BURST,
    }
    expected_timers = {
        "delivery_ms.notification": devices,  # one per record and instance that wrote it (one device each)
        "delivery_ms.ride_request": 2 * BURST,
        # client events (PUBLISH, or XADD + PUBLISH) and the one live broadcast
        "redis.publish_ms": sent["location_update"] + sent["dispatch_response"] + sent["receipt"] + 1,
    }
    expected_gauges = {f"connections.active.{t}": n for t, n in left.items()}
    expected_gauges["connections.active.total"] = sum(left.values())
    expected_gauges["users.unique"] = 3 + 6  # per instance: `both` counts on each, so this sum is not the cluster's
    distinct = 4 + 2 + 2  # drivers, `both` and the other rider, delivery partners

    await eventually(lambda: redis_client.scard(f"{prefix}:users") == distinct, timeout=10)
    seen = await wait_for(stack, {**{f"c:{k}": v for k, v in expected_counters.items()},
                                  **{f"t:{k}": v for k, v in expected_timers.items()},
                                  **{f"g:{k}": v for k, v in expected_gauges.items()},
                                  "cluster:users.unique": distinct},
                          lambda s, key: (s.counter(key[2:]) if key.startswith("c:") else
                                          s.timer_count(key[2:]) if key.startswith("t:") else
                                          s.gauge_sum(key[2:], instances) if key.startswith("g:") else
                                          s.last(f"stats.gauges.{PREFIX}.cluster.users.unique")))
    # The sampled timer really was sampled: a flush sent at most 200 of the burst's values per instance.
    assert round(seen.timer_count("delivery_ms.ride_request"), 6) == 2 * BURST
    assert max(v for _ts, v in seen.series[f"stats.timers.{PREFIX}.delivery_ms.ride_request.count"]) > 200

    # Every series the gateways produced is in the README's catalogue, with the kind StatsD saw.
    catalogue = readme_catalogue()
    kinds = {"counters": "counter", "gauges": "gauge", "timers": "timer"}
    unlisted = []
    for name in seen.series:
        parts = name.split(".")
        if parts[0] != "stats" or parts[1] not in kinds or parts[2] != PREFIX:
            continue
        metric = ".".join(parts[3:-1] if parts[1] in ("counters", "timers") else parts[3:])
        pattern = matches(metric, catalogue)
        if pattern is None or catalogue[pattern] != kinds[parts[1]]:
            unlisted.append(name)
    assert not unlisted, f"in Graphite but not in README's catalogue (or another kind): {unlisted}"

    # What the dashboard shows, asked of graphite-web as Grafana would: the cluster sums by user type.
    panel = next(p for p in PANELS if p.id == "connections_by_type")
    by_type = last_datapoint(stack.render_json(*(concrete(t, PREFIX) for t in panel.targets), since="-2min"))
    assert by_type == {t: float(n) for t, n in left.items()}
    panel = next(p for p in PANELS if p.id == "connections_by_instance")
    by_instance = last_datapoint(stack.render_json(*(concrete(t, PREFIX) for t in panel.targets), since="-2min"))
    assert by_instance == {instance_node(first.server_id): 3.0, instance_node(second.server_id): 6.0}
    summed = last_datapoint(stack.render_json(
        f"sumSeries(stats.gauges.{PREFIX}.instance.*.connections.active.driver)", since="-2min"))
    assert list(summed.values()) == [4.0]
    for panel in PANELS:  # every documented render URL works as written (docs/dashboard/README.md)
        answer = json.loads(stack.fetch(render_query(panel, PREFIX, since="-2min") + "&format=json"))
        assert isinstance(answer, list), panel.id
    assert by_type == last_datapoint(json.loads(stack.fetch(render_query(PANELS[0], PREFIX, "-2min") + "&format=json")))
    # The README's example queries work as written, and name what they say.
    examples = readme_graphite_examples()
    assert len(examples) >= 7
    for target in examples:
        answer = stack.render_json(target, since="-2min")
        assert answer, f"README's {target} finds no series"
        if "connections.closed" in target:
            assert {s["target"] for s in answer} == {"client"}
        if target.startswith("sumSeries("):
            assert list(last_datapoint(answer).values()) == [float(left["driver"])]
        if "cluster.users.unique" in target:
            assert list(last_datapoint(answer).values()) == [float(distinct)]
    print(f"\nGraphite saw: connections by type {by_type}, by instance {by_instance}; "
          f"opened {seen.counter('connections.opened'):g}, location_update in "
          f"{seen.counter('messages.in.location_update'):g}, ride_request out "
          f"{seen.counter('messages.out.ride_request'):g}, delivery_ms.ride_request count "
          f"{seen.timer_count('delivery_ms.ride_request'):g} (max per flush "
          f"{max(v for _t, v in seen.series[f'stats.timers.{PREFIX}.delivery_ms.ride_request.count']):g}), "
          f"redis.publish_ms count {seen.timer_count('redis.publish_ms'):g}, cluster users "
          f"{seen.last(f'stats.gauges.{PREFIX}.cluster.users.unique'):g}")
    for client, _type in clients:
        client.close()
