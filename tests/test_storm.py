"""The reconnect storm of scripts/storm.py (PROTOCOL.md 7.2): every client dropped at once and resumed on the
other instance with `since`/`epoch` while messages keep being recorded for it.

Each run starts its own redis-server and two gateways and checks every client message by message:
the seqs it received over both connections are exactly first..last recorded for its user (no gap,
no duplicate, in order), and every resume was `recovered: true` in the same epoch. The small storm
runs with the suite; the 20,000-client one is a soak (`make soak`).
"""

from __future__ import annotations

import shutil

import pytest

from scripts.storm import StormConfig, StormReport, run, summary

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server on the PATH")


def assert_every_client_resumed_without_gap_or_duplicate(report: StormReport, clients: int) -> None:
    v = report["verification"]
    assert report["connected"] == clients, summary(report)
    assert report["record_errors"] == 0, report["first_record_error"]
    assert v["clients"] == clients
    assert v["missing_seqs"] == 0 and v["clients_with_gaps"] == 0 and v["reconnected_with_gaps"] == 0, v["samples"]
    assert v["duplicate_deliveries"] == 0 and v["clients_with_duplicates"] == 0, v["samples"]
    assert v["clients_out_of_order"] == 0 and v["unexpected_seqs"] == 0, v["samples"]
    assert v["exact"] == clients, v["samples"]
    assert v["not_reconnected"] == 0 and v["not_caught_up"] == 0 and v["not_quiescent"] == 0, summary(report)
    assert v["resumes"] >= clients and v["not_recovered"] == 0 and v["epoch_changed"] == 0, summary(report)
    assert v["unexpected_closes"] == 0 and v["close_codes"] == {}, v["close_codes"]
    assert sorted(report["gateway_connections_after"]) == [clients // 2, clients - clients // 2]
    assert report["ok"], summary(report)


@pytest.mark.timeout(60)
def test_a_small_storm_resumes_every_client_on_the_other_instance_without_gap_or_duplicate() -> None:
    # One message per user per second, and the clients stay away 1 s: every resume has a replay to deliver.
    config = StormConfig(clients=300, record_rate=300.0, connect_rate=1000.0, warm_s=3.0, after_s=2.0,
                         storm_timeout_s=20.0, quiesce_timeout_s=10.0, offline_s=1.0, workers=2, quiet=True)
    report = run(config)
    print("\n" + summary(report))

    assert_every_client_resumed_without_gap_or_duplicate(report, 300)
    assert report["recorded_during_storm"] > 0
    assert report["replayed"] >= 200  # ~1 recorded per user during the second offline
    assert report["recorded_total"] >= 0.9 * 300 * (3.0 + 1.0 + 2.0)
    assert report["recovery_s"] < 10.0


@pytest.mark.soak
def test_a_storm_of_20000_clients_resumes_every_one_without_gap_or_duplicate(
        request: pytest.FixtureRequest) -> None:
    if not request.config.getoption("--run-soak", default=False):
        pytest.skip("soak test: run with --run-soak")
    config = StormConfig(clients=20_000, quiet=True)
    report = run(config)
    print("\n" + summary(report))

    assert_every_client_resumed_without_gap_or_duplicate(report, 20_000)
    assert report["recorded_during_storm"] > 0
    assert report["replayed"] > 0
    assert report["recovery_s"] < config.storm_timeout_s
