"""Thousands of clients stall at once (a cell tower, a carrier hiccup): memory stays bounded by the
instance's budget, the healthy clients lose nothing, and memory comes back afterwards (issue #13).

The load generator's stall phase (scripts/loadgen.py, `--stall`) runs the scenario: clients connected
with a tiny receive buffer stop reading at once (their kernel buffers fill, so the gateway's writes
back up for real) while messages keep flowing to everyone, plus a flood for the stalled ones. The short
versions run in `make test`; the 19,400-client ones (the open-file limit of 20,000 per process leaves
room for about that many on one instance) behind `make soak`.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from scripts.loadgen import LoadConfig, StallPlan, StallReport, Target, run, source_addresses
from tests.helpers import SECRET, GatewayProcess, unique

MiB = 1024 * 1024
SHORT = {"connections": 2000, "stalled": 200}
SOAK = {"connections": 19_400, "stalled": 2000}
# The short run's budget is small enough that 200 stalled clients (200 x 64 KiB + kernel buffers) overflow it.
SHORT_BUDGET = 4 * MiB
LARGE_BUDGET = 32 * MiB
# RSS above baseline + budget that is not a queue (stated, from the runs in docs/BENCHMARKS.md, where it
# was 1.5-6 MB): the messages being processed, allocator slack (a growing bytearray keeps up to 1/8 more),
# and the <= 8 KiB chunk plus close frame a shed client's transport keeps for its 5 s close timeout
# (2,000 x 8 KiB = 16 MiB in the soak).
RSS_MARGIN = 16 * MiB
SOAK_RSS_MARGIN = 40 * MiB
# The soak's traffic: what one instance, the load generator and Redis sustain together on this 2-core
# machine with room to spare (the stall must be what is measured, not a saturated box): 2,000 messages/s to
# everyone, 4,000/s more to the stalled clients (each is offered ~2 x 800 B/s, past its 64 KiB limit within
# the minute, and all of them past the budget well before).
SOAK_RATE = 2000
SOAK_FLOOD = 4000
# Healthy clients' p99 in the short run: a loose bound (the machine is shared); the soak holds the 50 ms.
SHORT_P99_MS = 500.0


def stall_config(gateway: GatewayProcess, prefix: str, plan: StallPlan, connections: int, workers: int) -> LoadConfig:
    target = Target(host="127.0.0.1", port=gateway.port, flavor="gateway", secret=SECRET, prefix=prefix,
                    redis_host="127.0.0.1", redis_port=int(gateway.redis_url.rsplit(":", 1)[1]))
    assert gateway.proc is not None
    return LoadConfig(target=target, connections=connections, connect_rate=2000.0, workers=workers, hold_s=3.0,
                      fanout_via=[], fanout_rates=[], step_s=0.0, upstream_rates=[], server_pid=gateway.proc.pid,
                      run_id=unique("stall"), connect_timeout_s=60.0, concurrency=800,
                      source_ips=source_addresses(max(2, connections // 5000 + 1), random.randrange(1, 255)),
                      quiet=True, stall=plan)


def stalled_gateway(make_gateway: Callable[..., GatewayProcess], **env: str) -> GatewayProcess:
    # SOCKET_SNDBUF: a bounded kernel buffer per client, so a stalled client backs up into the gateway soon.
    return make_gateway({"LOG_LEVEL": "WARNING", "SOCKET_SNDBUF": "16384", "MAX_DEVICES_PER_USER": "0", **env})


def run_stall(gateway: GatewayProcess, prefix: str, plan: StallPlan, connections: int, workers: int = 1) -> StallReport:
    report = run(stall_config(gateway, prefix, plan, connections, workers))
    assert report["connect"]["connected"] == connections, report["close_codes"]
    stall = report["stall"]
    assert stall is not None
    print(f"\n{stall}")
    return stall


def assert_healthy_lost_nothing(stall: StallReport, p99_ms: float) -> None:
    assert stall["healthy_closed"] == 0
    assert stall["sent_healthy"] > 0
    assert stall["lost_healthy"] == 0, stall
    assert stall["delivered_healthy"] == stall["sent_healthy"]
    assert stall["p99_ms"] < p99_ms, stall


def assert_memory_bounded_and_back(stall: StallReport, budget: int, margin: int) -> None:
    baseline, peak, final = (stall["rss_baseline_mb"] * MiB, stall["rss_peak_mb"] * MiB, stall["rss_final_mb"] * MiB)
    assert peak <= baseline + budget + margin, stall
    assert final <= baseline * 1.2, stall


async def test_a_mass_stall_is_shed_within_the_budget_and_the_memory_comes_back(
        make_gateway: Callable[..., GatewayProcess], prefix: str) -> None:
    gateway = stalled_gateway(make_gateway, OUTBOUND_BUDGET=str(SHORT_BUDGET))
    plan = StallPlan(SHORT["stalled"], seconds=10.0, rate=2000, flood_rate=3600, flood_type="notification")
    stall = run_stall(gateway, prefix, plan, SHORT["connections"])

    assert_healthy_lost_nothing(stall, SHORT_P99_MS)
    assert_memory_bounded_and_back(stall, SHORT_BUDGET, RSS_MARGIN)
    assert stall["stalled_lost"] == SHORT["stalled"], "every stalled client was offered more than its limit"
    assert "outbound budget reached" in gateway.log(), "the budget, not only the per-client limit, was reached"


async def test_memory_queued_for_stalled_clients_is_given_back_once_they_are_gone(
        make_gateway: Callable[..., GatewayProcess], prefix: str) -> None:
    """The previous per-client default (1 MiB) and a larger budget, so that the queues grow the instance by
    tens of MB: without giving freed memory back (memory.Reclaimer) RSS stayed that much up for good."""
    gateway = stalled_gateway(make_gateway, MAX_OUTBOUND_BUFFER=str(MiB), OUTBOUND_BUDGET=str(LARGE_BUDGET))
    plan = StallPlan(SHORT["stalled"], seconds=10.0, rate=2000, flood_rate=3600, flood_type="notification",
                     flood_bytes=1500)
    stall = run_stall(gateway, prefix, plan, SHORT["connections"])

    assert_healthy_lost_nothing(stall, SHORT_P99_MS)
    assert stall["rss_peak_mb"] - stall["rss_baseline_mb"] > 0.5 * LARGE_BUDGET / MiB, "the queues did grow"
    assert_memory_bounded_and_back(stall, LARGE_BUDGET, RSS_MARGIN)


async def test_clients_that_resume_after_5_s_are_not_closed_and_get_their_latest_positions(
        make_gateway: Callable[..., GatewayProcess], prefix: str) -> None:
    gateway = stalled_gateway(make_gateway)
    # The window ends when they resume: what they read then is what waited for them in the gateway.
    plan = StallPlan(SHORT["stalled"], seconds=5.0, resume_after_s=5.0, rate=2000, flood_rate=3600,
                     flood_type="driver_location")
    stall = run_stall(gateway, prefix, plan, SHORT["connections"])

    assert_healthy_lost_nothing(stall, SHORT_P99_MS)
    assert stall["resumed"]
    assert stall["stalled_lost"] == 0 and stall["stalled_open"] == SHORT["stalled"], stall
    assert stall["stale_positions"] == 0, "each resumed client ends on the newest position of every driver"
    assert stall["missing_statuses"] == 0, "and gets every ride_status queued for it"
    assert "4503" not in gateway.log()


@pytest.mark.soak
async def test_soak_a_tenth_of_a_full_instance_stalls_for_a_minute(
        make_gateway: Callable[..., GatewayProcess], prefix: str) -> None:
    gateway = stalled_gateway(make_gateway)  # the default budget: 4 KiB x MAX_CONNECTIONS (76 MiB here)
    plan = StallPlan(SOAK["stalled"], seconds=60.0, rate=SOAK_RATE, flood_rate=SOAK_FLOOD, flood_type="notification",
                     flood_bytes=800)
    stall = run_stall(gateway, prefix, plan, SOAK["connections"], workers=2)

    assert_healthy_lost_nothing(stall, 50.0)
    assert_memory_bounded_and_back(stall, 4096 * (20_000 - 512), SOAK_RSS_MARGIN)
    assert stall["stalled_lost"] > 0


@pytest.mark.soak
async def test_soak_a_tenth_of_a_full_instance_stalls_for_5_s_and_resumes(
        make_gateway: Callable[..., GatewayProcess], prefix: str) -> None:
    gateway = stalled_gateway(make_gateway)
    plan = StallPlan(SOAK["stalled"], seconds=5.0, resume_after_s=5.0, rate=SOAK_RATE, flood_rate=SOAK_FLOOD,
                     flood_type="driver_location")
    stall = run_stall(gateway, prefix, plan, SOAK["connections"], workers=2)

    assert_healthy_lost_nothing(stall, 50.0)
    assert stall["stalled_lost"] == 0 and stall["stalled_open"] == SOAK["stalled"], stall
    assert stall["stale_positions"] == 0
    assert stall["missing_statuses"] == 0
