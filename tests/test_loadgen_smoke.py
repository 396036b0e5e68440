"""CI smoke of the load generator against a real 2-process gateway: correctness only, no performance thresholds.

Why: the benchmark harness (scripts/loadgen.py) is only trustworthy if it counts right. A few
thousand sockets, a short hold and a fan-out through Redis PUBLISH must show every client
connected, every message delivered exactly once and every client still connected at the end;
a regression in either the gateway or the generator shows up here in well under a minute.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from scripts.loadgen import LoadConfig, Target, run, source_addresses
from tests.helpers import SECRET, GatewayProcess, unique

CONNECTIONS = 2000
MESSAGES_PER_S = 1000
STEP_S = 3.0

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
