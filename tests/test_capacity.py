"""The capacity model (scripts/capacity.py, docs/CAPACITY.md; issue #11): the committed document is what the
committed inputs give, and the model behaves as a model should. Pure computation: no Redis, no gateway, seconds.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest

from scripts import capacity
from scripts.capacity import Assumptions, Inputs, Plan, plan, report

DEFAULT_ARGV: list[str] = []


@pytest.fixture(scope="module")
def inputs() -> Inputs:
    return Inputs.load()


def with_mix(a: Assumptions, **changes: Any) -> Assumptions:
    return dataclasses.replace(a, mix=dataclasses.replace(a.mix, **changes))


def with_host(a: Assumptions, **changes: Any) -> Assumptions:
    return dataclasses.replace(a, host=dataclasses.replace(a.host, **changes))


def test_the_committed_document_is_what_the_committed_inputs_give(inputs: Inputs) -> None:
    # `make capacity` writes it with the default options; a change to the inputs, the model or the defaults
    # without `python scripts/capacity.py --write-doc` fails here.
    assert capacity.generated_block() == report(inputs, capacity.assumptions(capacity.parse_args(DEFAULT_ARGV)),
                                                DEFAULT_ARGV)


def test_every_figure_the_model_reads_says_where_it_comes_from(inputs: Inputs) -> None:
    for name, figure in inputs.figures.items():
        assert figure.get("source"), name
        assert figure.get("kind") in {"measured", "config", "source", "pending"}, name
        if figure.get("kind") != "pending":
            assert figure.get("value") is not None, name


def test_doubling_the_location_rate_raises_the_gateway_hosts_needed(inputs: Inputs) -> None:
    # With the open-file limit raised, gateway CPU is what sizes the hosts: twice the location updates, more hosts.
    a = with_host(Assumptions(), fds=1_000_000)
    twice = with_mix(a, location_interval_s=a.mix.location_interval_s / 2)
    for target in a.targets:
        before, after = plan(target, inputs, a), plan(target, inputs, twice)
        assert before.host.binding == "gateway CPU"
        assert after.hosts_exact > before.hosts_exact * 1.3
        assert after.hosts >= before.hosts
    assert plan(10_000_000, inputs, twice).hosts > plan(10_000_000, inputs, a).hosts
    # Under the measured 20,000 open files the descriptors bind: the CPU limit falls, the hosts do not move.
    d = Assumptions()
    d2 = with_mix(d, location_interval_s=d.mix.location_interval_s / 2)
    p, p2 = plan(10_000_000, inputs, d), plan(10_000_000, inputs, d2)
    assert p2.host.limits["gateway CPU"] < p.host.limits["gateway CPU"]
    assert p2.hosts == p.hosts and p.host.binding == "file descriptors"


def test_more_service_messages_need_more_redis_shards(inputs: Inputs) -> None:
    a = Assumptions()
    more = with_mix(a, service_per_min=a.mix.service_per_min * 4)
    for target in a.targets:
        assert (plan(target, inputs, more).layouts[-1].shards or 0) > (plan(target, inputs, a).layouts[-1].shards or 0)


def assert_bottleneck_is_least_headroom(p: Plan) -> None:
    for layout in p.layouts:
        limits = p.limits(layout)
        first = p.bottleneck(layout)
        assert first.headroom == min(limit.headroom for limit in limits)
        assert all(first.headroom <= limit.headroom for limit in limits)


def test_the_bottleneck_named_is_the_limit_with_the_least_headroom(inputs: Inputs) -> None:
    a = Assumptions()
    for target in a.targets:
        assert_bottleneck_is_least_headroom(plan(target, inputs, a))
    # Squeeze one resource at a time: it becomes the one named.
    small_memory = with_host(a, memory_gib=1.5)
    p = plan(1_000_000, inputs, small_memory)
    assert_bottleneck_is_least_headroom(p)
    assert p.host.binding == "gateway memory" and p.first_bottleneck.name == "gateway memory"
    slow_redis = inputs.with_values(redis__fcall_publish_us=400.0, redis__fcall_publish_cluster_us=400.0)
    p = plan(1_000_000, inputs=slow_redis, a=a)
    assert_bottleneck_is_least_headroom(p)
    assert p.chosen.key != capacity.SINGLE and p.first_bottleneck.name == "Redis CPU per shard"
    assert p.bottleneck(p.layouts[0]).name == "Redis CPU (one thread)" and p.layouts[0].shards is None


def test_the_classic_publish_of_client_events_is_a_wall_more_shards_cannot_move(inputs: Inputs) -> None:
    a = Assumptions()
    p = plan(10_000_000, inputs, a)
    as_built, events_sharded = p.layouts[1], p.layouts[2]
    assert as_built.key == capacity.CLUSTER and events_sharded.key == capacity.EVENTS_SHARDED
    # Every node receives every location update: the per-node floor does not fall with the shards.
    assert as_built.shards is None and p.bottleneck(as_built).headroom < 1
    assert "classic PUBLISH" in p.bottleneck(as_built).name
    assert events_sharded.shards is not None and p.bottleneck(events_sharded).headroom >= 1
    assert p.chosen is events_sharded
    # At a tenth of the load the same layout carries it.
    assert plan(1_000_000, inputs, a).layouts[1].shards is not None


def test_the_cluster_spublish_figure_is_used_when_present_and_its_absence_said(inputs: Inputs) -> None:
    a = with_mix(Assumptions(), recorded_share=0.0)  # every service message live: the figure matters
    missing = inputs.with_values(**{capacity.CLUSTER_SPUBLISH.replace(".", "__"): None})
    assert "not in the inputs yet" in report(missing, a)
    measured = inputs.with_values(**{capacity.CLUSTER_SPUBLISH.replace(".", "__"): 50.0})
    text = report(measured, a)
    assert "measured on a 3-shard Redis Cluster" in text and "not in the inputs yet" not in text
    shards_measured = plan(10_000_000, measured, a).layouts[-1].shards
    shards_missing = plan(10_000_000, missing, a).layouts[-1].shards
    assert shards_measured is not None and shards_missing is not None and shards_measured > shards_missing


def test_the_storm_drain_grows_with_connections_per_process(inputs: Inputs) -> None:
    a = Assumptions()
    storms = [capacity.storm(plan(t, inputs, a), inputs, a) for t in a.targets]
    for s in storms:
        rate = inputs.value("storm.clients") / inputs.value("storm.recovery_s") / inputs.value("storm.processes")
        assert math.isclose(s.drain_measured_s, s.per_process / rate)
        assert s.redis_us >= inputs.value("storm.redis_us_per_reconnect")
        assert s.drain_s == max(s.drain_measured_s, s.drain_redis_cpu_s, s.users_shard_s)
    raised = with_host(a, fds=1_000_000)
    bigger = capacity.storm(plan(10_000_000, inputs, raised), inputs, raised)
    assert bigger.per_process > storms[-1].per_process and bigger.drain_measured_s > storms[-1].drain_measured_s
