"""The metric catalogue three ways: the README's table, the names metrics.py defines (and the code
uses), and names seen on the wire. Placeholders (`<userType>`, `{user_type}`) compare as one `<*>`."""

from __future__ import annotations

import re
from pathlib import Path

from tornado_gateway import metrics as m

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("counter", "gauge", "timer")
_PLACEHOLDER = re.compile(r"<[^>]+>|\{[^}]+\}")


def normalise(name: str) -> str:
    return _PLACEHOLDER.sub("<*>", name)


def metrics_section(readme: str | None = None) -> str:
    text = readme if readme is not None else (ROOT / "README.md").read_text()
    start = text.index("\n## Metrics")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else len(text)]


def readme_catalogue(readme: str | None = None) -> dict[str, str]:
    """name pattern -> kind, from the rows `| `name`[, `name`] | kind[, kind] | meaning |`."""
    found: dict[str, str] = {}
    for line in metrics_section(readme).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3:
            continue
        kinds = [k.strip() for k in cells[1].split(",")]
        if not kinds or any(k not in KINDS for k in kinds):
            continue
        names = re.findall(r"`([^`]+)`", cells[0])
        if len(kinds) == 1:
            kinds = kinds * len(names)
        assert len(kinds) == len(names), f"README metrics row with {len(names)} names and {len(kinds)} kinds: {line}"
        for name, kind in zip(names, kinds, strict=True):
            pattern = normalise(name)
            assert pattern not in found, f"{name} is listed twice in the README's metrics table"
            found[pattern] = kind
    return found


def code_catalogue() -> dict[str, str]:
    """name pattern -> kind, from metrics.py's constants, gauges with their instance scope."""
    found: dict[str, str] = {}
    for attr, value in vars(m).items():
        if not attr.isupper() or not isinstance(value, str) or "." not in value or attr == "INSTANCE_SCOPE":
            continue
        if value in m.INSTANCE_GAUGES:
            found[normalise(m.INSTANCE_SCOPE + value)] = "gauge"
        elif value in m.CLUSTER_GAUGES:
            found[normalise(value)] = "gauge"
        else:
            found[normalise(value)] = "timer" if value in m.TIMERS else "counter"
    return found


def constants_never_used() -> list[str]:
    """metrics.py constants that no module of the package refers to (`m.NAME`): never emitted."""
    sources = "\n".join(p.read_text() for p in (ROOT / "tornado_gateway").glob("*.py") if p.name != "metrics.py")
    unused = []
    for attr, value in vars(m).items():
        if attr.isupper() and isinstance(value, str) and "." in value and attr != "INSTANCE_SCOPE" \
                and not re.search(rf"\bm\.{attr}\b", sources):
            unused.append(attr)
    return unused


def matches(name: str, catalogue: dict[str, str]) -> str | None:
    """The catalogue pattern a concrete metric name (without the StatsD prefix) belongs to."""
    for pattern in catalogue:
        regex = "^" + re.escape(pattern).replace(re.escape("<*>"), "[^.]+") + "$"
        if re.match(regex, name):
            return pattern
    return None
