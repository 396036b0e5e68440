"""CI smoke of the load generator against a real 2-process gateway: correctness only, no performance thresholds.

Why: the benchmark harness (scripts/loadgen.py) is only trustworthy if it counts right. A few
thousand sockets, a short hold and a fan-out through Redis PUBLISH must show every client
connected, every message delivered exactly once and every client still connected at the end;
a regression in either the gateway or the generator shows up here in well under a minute.
The recording benchmark (bench.py's `recording` scenario) rests on two more facts checked here:
PUBLISH, FCALL and POST /broadcast of a recorded type all reach the clients, and only the recorded
paths deliver an envelope `seq`, so the bench's recorded/unrecorded comparison compares what it says.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable

import pytest

from scripts.loadgen import LoadConfig, Target, fanout_order, run, source_addresses
from tests.helpers import SECRET, GatewayProcess, unique

CONNECTIONS = 2000
MESSAGES_PER_S = 1000
STEP_S = 3.0
RECORDING_CONNECTIONS = 500
RECORDING_PER_S = 400

pytestmark = pytest.mark.timeout(90)


def smoke_config(gateway: GatewayProcess, prefix: str) -> LoadConfig:
    target = Target(host="127.0.0.1", port=gateway.port, flavor="gateway", secret=SECRET, prefix=prefix,
                    redis_host="127.0.0.1", redis_port=int(gateway.redis_url.rsplit(":", 1)[1]))
    assert gateway.proc is not None
    return LoadConfig(target=target, connections=CONNECTIONS, connect_rate=2000.0, workers=2, hold_s=3.0,
                      fanout_via=["publish"], fanout_rates=[MESSAGES_PER_S], step_s=STEP_S, upstream_rates=[],
                      server_pid=gateway.proc.pid, run_id=unique("smoke"), connect_timeout_s=20.0, concurrency=500,
                      source_ips=source_addresses(2, random.randrange(1, 255)), quiet=True)


def test_connect_hold_and_publish_fanout_lose_nothing(make_gateway: Callable[..., GatewayProcess],
                                                      prefix: str) -> None:
    gateway = make_gateway({"PROCESSES": "2", "LOG_LEVEL": "WARNING", "HEARTBEAT_INTERVAL": "1",
                            "HEARTBEAT_TIMEOUT": "5"})
    report = run(smoke_config(gateway, prefix))

    assert report["connect"]["connected"] == CONNECTIONS, report["close_codes"]
    assert report["hold"]["heartbeats"] > 0
    [step] = report["steps"]
    assert step["sent"] >= 0.9 * MESSAGES_PER_S * STEP_S
    assert step["no_receiver"] == 0
    assert step["delivered"] == step["sent"]
    assert step["lost"] == 0
    assert report["final_connected"] == CONNECTIONS
    assert report["close_codes"] == {}


def test_recorded_type_reaches_clients_with_seq_only_through_recorded_paths(
        make_gateway: Callable[..., GatewayProcess], prefix: str) -> None:
    gateway = make_gateway({"PROCESSES": "2", "LOG_LEVEL": "WARNING"})
    base = smoke_config(gateway, prefix)
    config = dataclasses.replace(
        base, target=dataclasses.replace(base.target, message_type="ride_status"), connections=RECORDING_CONNECTIONS,
        hold_s=1.0, fanout_via=["publish", "fcall", "http"], fanout_rates=[RECORDING_PER_S], step_s=2.0)
    report = run(config)

    assert report["connect"]["connected"] == RECORDING_CONNECTIONS, report["close_codes"]
    by_kind = {step["kind"]: step for step in report["steps"]}
    assert [step["kind"] for step in report["steps"]] == ["publish", "fcall", "http"]
    for step in by_kind.values():
        assert step["sent"] >= 0.9 * RECORDING_PER_S * 2.0
        assert step["errors"] == 0
        assert step["delivered"] == step["sent"]
    assert by_kind["publish"]["sequenced"] == 0  # plain PUBLISH is live-only
    assert by_kind["fcall"]["sequenced"] == by_kind["fcall"]["delivered"]
    assert by_kind["http"]["sequenced"] == by_kind["http"]["delivered"]


def test_fanout_steps_alternate_paths_rate_by_rate() -> None:
    target = Target("127.0.0.1", 1, "gateway", SECRET, "p", "127.0.0.1", 6379)
    config = LoadConfig(target=target, connections=1, connect_rate=1.0, workers=1, hold_s=0.0,
                        fanout_via=["publish", "fcall", "http"], fanout_rates=[1000, 8000], step_s=1.0,
                        upstream_rates=[], server_pid=None, run_id="r", connect_timeout_s=1.0, concurrency=1,
                        source_ips=("127.0.0.2",), http_rates=[1000, 3000])

    assert fanout_order(config) == [("publish", 1000), ("fcall", 1000), ("http", 1000), ("http", 3000),
                                    ("publish", 8000), ("fcall", 8000)]
