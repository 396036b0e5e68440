"""The README's metric catalogue is the code's: every metric the code defines and emits is listed with
its kind, and nothing is listed that the code never emits. Names seen on the wire fit the catalogue
(tests/test_metrics.py and tests/test_metrics_pipeline.py check that against real runs). And what
metrics.py puts on the wire is what StatsD needs to count right: sample rates, one gauge per instance."""

from __future__ import annotations

import json
import re
import socket

from scripts.dashboard import DOCS_DIR, GRAFANA_JSON, PANELS, docs_markdown, grafana_json
from tests.metrics_catalogue import ROOT, code_catalogue, constants_never_used, matches, readme_catalogue
from tornado_gateway.metrics import MAX_DATAGRAM, MAX_TIMER_SAMPLES, Metrics


def test_the_readme_catalogue_lists_exactly_the_metrics_the_code_defines_with_their_kinds() -> None:
    readme, code = readme_catalogue(), code_catalogue()
    missing = sorted(set(code) - set(readme))
    listed_only = sorted(set(readme) - set(code))
    assert not missing, f"metrics the code emits but README's Metrics table does not list: {missing}"
    assert not listed_only, f"metrics README lists but the code never emits: {listed_only}"
    wrong_kind = {name: (readme[name], code[name]) for name in code if readme[name] != code[name]}
    assert not wrong_kind, f"README kind vs code kind: {wrong_kind}"


def test_every_metric_defined_is_emitted_by_some_module() -> None:
    assert constants_never_used() == []


def test_the_catalogue_check_notices_a_missing_and_an_extra_row() -> None:
    text = (ROOT / "README.md").read_text()
    without = "\n".join(line for line in text.splitlines() if not line.startswith("| `auth.failures`"))
    assert set(code_catalogue()) - set(readme_catalogue(without)) == {"auth.failures"}
    extra = text.replace("| `auth.failures` |", "| `auth.made_up` | counter | x |\n| `auth.failures` |", 1)
    assert set(readme_catalogue(extra)) - set(code_catalogue()) == {"auth.made_up"}


def _lines(sock: socket.socket) -> list[str]:
    lines: list[str] = []
    sock.settimeout(1.0)
    try:
        while True:
            data = sock.recv(65536)
            assert len(data) <= MAX_DATAGRAM
            lines.extend(data.decode().splitlines())
            sock.settimeout(0.2)
    except TimeoutError:
        return lines


def test_sampled_timers_carry_their_rate_so_statsd_counts_every_event() -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind(("127.0.0.1", 0))
    try:
        metrics = Metrics("127.0.0.1", listener.getsockname()[1], "gw", instance="host.a:1")
        for i in range(1000):
            metrics.timing("delivery_ms.ride_request", float(i))
        for i in range(50):
            metrics.timing("redis.publish_ms", 1.0 + i)
        metrics.incr("messages.in.location_update", 7)
        metrics.gauge("connections.active.total", 12)
        metrics.gauge("cluster.users.unique", 9)
        metrics.flush()
        lines = _lines(listener)
        sampled = [line for line in lines if line.startswith("gw.delivery_ms.ride_request:")]
        assert len(sampled) == MAX_TIMER_SAMPLES
        # StatsD adds 1/rate to a timer's count for each sample (stats.js): the sum is the number of events.
        assert round(sum(1 / float(line.rsplit("|@", 1)[1]) for line in sampled)) == 1000
        values = sorted(float(line.split(":")[1].split("|")[0]) for line in sampled)
        assert values[0] < 250 and values[-1] > 750, "a sample of the whole second, not its first 200 events"
        unsampled = [line for line in lines if line.startswith("gw.redis.publish_ms:")]
        assert len(unsampled) == 50 and all(line.endswith("|ms") for line in unsampled)
        assert "gw.messages.in.location_update:7|c" in lines
        assert "gw.instance.host_a_1.connections.active.total:12|g" in lines  # one path component per instance
        assert "gw.cluster.users.unique:9|g" in lines  # the same figure from every instance: no instance
        metrics.flush()  # nothing counted since: only the gauges, again (StatsD drops gauges not re-sent)
        assert sorted(_lines(listener)) == ["gw.cluster.users.unique:9|g",
                                            "gw.instance.host_a_1.connections.active.total:12|g"]
    finally:
        listener.close()


def test_the_committed_dashboard_and_render_urls_are_what_scripts_dashboard_defines() -> None:
    fix = "run: python -m scripts.dashboard --definitions-only"
    assert GRAFANA_JSON.read_text() == grafana_json(), fix
    assert (DOCS_DIR / "README.md").read_text() == docs_markdown(), fix
    dashboard = json.loads(GRAFANA_JSON.read_text())
    assert [p["title"] for p in dashboard["panels"]] == [p.title for p in PANELS]
    assert dashboard["templating"]["list"][0]["name"] == "prefix"


def test_every_dashboard_query_reads_metrics_of_the_catalogue() -> None:
    catalogue = readme_catalogue()
    path = re.compile(r"stats\.(counters|gauges|timers)\.\$prefix\.([A-Za-z0-9_.*{},-]+)")
    unknown = []
    for panel in PANELS:
        for target in panel.targets:
            found = path.findall(target)
            assert found, f"{panel.id}: no StatsD series in {target}"
            for kind, rest in found:
                for expanded in _braces(rest):
                    parts = expanded.replace("*", "any").split(".")
                    metric = ".".join(parts if kind == "gauges" else parts[:-1])
                    pattern = matches(metric, catalogue)
                    if pattern is None or catalogue[pattern] != kind[:-1]:
                        unknown.append(f"{panel.id}: {kind} {expanded}")
    assert not unknown, unknown


def _braces(text: str) -> list[str]:
    match = re.search(r"\{([^}]*)\}", text)
    if match is None:
        return [text]
    return [expanded for choice in match.group(1).split(",")
            for expanded in _braces(text[:match.start()] + choice + text[match.end():])]
