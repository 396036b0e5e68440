"""The `soak` marker: long connection-churn runs, collected always, run only with `--run-soak`.

Registered from tests/conftest.py (`pytest_plugins = ["tests.soak_plugin"]`) or with `-p tests.soak_plugin`.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("soak", "connection-churn soak tests")
    group.addoption("--run-soak", action="store_true", default=False,
                    help="run the tests marked `soak` (minutes long); they are skipped otherwise")
    group.addoption("--soak-minutes", type=float, default=5.0, help="how long a soak test churns (default 5)")
    group.addoption("--soak-rate", type=int, default=3000,
                    help="connections opened and closed per minute during a soak (default 3000)")
    group.addoption("--soak-batch", type=int, default=200,
                    help="concurrent clients per churn round, in the short churn test too (default 200)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "soak: long connection-churn soak; runs only with --run-soak")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    soak_items = [item for item in items if item.get_closest_marker("soak") is not None]
    if not config.getoption("--run-soak"):
        skip = pytest.mark.skip(reason="soak test: run with --run-soak")
        for item in soak_items:
            item.add_marker(skip)
        return
    # pytest-timeout's default (pyproject.toml) is far shorter than a soak: give each the churn time plus setup.
    budget = int(config.getoption("--soak-minutes") * 60) + 180
    for item in soak_items:
        item.add_marker(pytest.mark.timeout(budget))
