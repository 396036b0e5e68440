"""A real metrics pipeline on this machine, as operators run it: the Etsy StatsD daemon (npm `statsd`,
installed into tools/statsd with `npm ci`) and its Graphite backend, feeding a carbon-cache (Debian's
graphite-carbon) that writes whisper files into a temporary directory, and optionally graphite-web's
render API (Debian's graphite-web) reading them, as Grafana's Graphite data source would.

Used by tests/test_metrics_pipeline.py and scripts/dashboard.py (`make dashboard`). Every process is
started here on free loopback ports below 32768 and stopped by its own pid; the temporary directory
is removed afterwards. StatsD flushes every second and carbon keeps 1-second points (1s:10m), so
what a gateway counts reaches a whisper file within about three seconds.

The whisper files are read with the system Python (`/usr/bin/python3`), which has Debian's
python3-whisper next to graphite-carbon; the project's virtualenv does not need it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

from scripts.loadgen import free_port

ROOT = Path(__file__).resolve().parent.parent
STATSD_DIR = ROOT / "tools" / "statsd"
STATSD_MAIN = STATSD_DIR / "node_modules" / "statsd" / "stats.js"
STATSD_STAMP = STATSD_DIR / "node_modules" / ".installed-stamp"
SYSTEM_PYTHON = "/usr/bin/python3"
CARBON_CACHE = shutil.which("carbon-cache") or "/usr/bin/carbon-cache"
DJANGO_ADMIN = "/usr/bin/django-admin"
FLUSH_INTERVAL_MS = 1000
START_TIMEOUT_S = 30.0

#: The StatsD configuration the README documents (JSON, which StatsD reads as JavaScript): the new
#: namespace (stats.counters.<name>.count/.rate, stats.timers.<name>.*, stats.gauges.<name>), p50 and
#: p99 of every timer, and gauges not sent again dropped after a flush, so a dead instance's gauges
#: end instead of repeating its last value forever. The stack changes only hosts, ports and the interval.
STATSD_CONFIG = ROOT / "conf" / "statsd" / "config.js"

_READ_WHISPER = r"""
import json, os, sys, whisper
root = sys.argv[1]
series = {}
for folder, _dirs, files in os.walk(root):
    for name in files:
        if name.endswith(".wsp"):
            path = os.path.join(folder, name)
            metric = os.path.relpath(path, root)[:-4].replace(os.sep, ".")
            (start, _end, step), values = whisper.fetch(path, 0)
            series[metric] = [[start + i * step, v] for i, v in enumerate(values) if v is not None]
json.dump(series, sys.stdout)
"""


def missing_tools(*, graphite_web: bool = False) -> list[str]:
    """What this machine lacks to run the stack (`.ci/run` installs all of it)."""
    missing = []
    if shutil.which("node") is None or shutil.which("npm") is None:
        missing.append("node and npm")
    if not Path(CARBON_CACHE).exists():
        missing.append("graphite-carbon (Debian)")
    if not Path(SYSTEM_PYTHON).exists() or subprocess.run(
            [SYSTEM_PYTHON, "-c", "import whisper"], capture_output=True, check=False).returncode != 0:
        missing.append("python3-whisper (Debian, comes with graphite-carbon)")
    if graphite_web and not (Path(DJANGO_ADMIN).exists() and subprocess.run(
            [SYSTEM_PYTHON, "-c", "import graphite.render"], capture_output=True, check=False).returncode == 0):
        missing.append("graphite-web (Debian)")
    return missing


def ensure_statsd() -> Path:
    """`npm ci` in tools/statsd unless node_modules matches the lock file already."""
    lock = STATSD_DIR / "package-lock.json"
    if not STATSD_STAMP.exists() or STATSD_STAMP.stat().st_mtime < lock.stat().st_mtime or not STATSD_MAIN.exists():
        subprocess.run(["npm", "ci", "--omit=optional", "--no-audit", "--no-fund", "--silent"], cwd=STATSD_DIR,
                       check=True, timeout=300)
        STATSD_STAMP.touch()
    return STATSD_MAIN


def free_udp_and_tcp_port() -> int:
    """StatsD listens on UDP (metrics) and TCP (its admin port, mgmt_port = this + 1 is separate)."""
    for _ in range(50):
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free UDP port")


def wait_for_tcp(port: int, proc: subprocess.Popen[bytes], what: str, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout_s:.0f} s:\n{tail(log)}")


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop(proc: subprocess.Popen[bytes] | None, timeout_s: float = 10.0) -> None:
    """SIGTERM to the pid this module started, SIGKILL if it does not exit in time."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


class MetricsStack:
    """StatsD -> carbon-cache -> whisper files (-> graphite-web), each on its own free port."""

    def __init__(self, *, graphite_web: bool = False, keep_dir: bool = False) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="metrics-stack-"))
        self.whisper_dir = self.dir / "whisper"
        self.graphite_web = graphite_web
        self.keep_dir = keep_dir
        self.statsd_port = free_udp_and_tcp_port()
        self.statsd_admin_port = free_port()
        self.carbon_line_port = free_port()
        self.carbon_pickle_port = free_port()
        self.carbon_query_port = free_port()
        self.web_port = free_port()
        self.carbon: subprocess.Popen[bytes] | None = None
        self.statsd: subprocess.Popen[bytes] | None = None
        self.web: subprocess.Popen[bytes] | None = None

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> MetricsStack:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        stats_js = ensure_statsd()
        for sub in ("whisper", "conf", "log", "web/log"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self._write_carbon_conf()
        self.carbon = self._spawn([CARBON_CACHE, f"--config={self.dir / 'conf' / 'carbon.conf'}", "--nodaemon",
                                   f"--pidfile={self.dir / 'carbon.pid'}", f"--logdir={self.dir / 'log'}", "start"],
                                  "carbon.out")
        if self.graphite_web:  # Django's start-up checks take a couple of seconds: overlap them with carbon's
            self._write_graphite_settings()
            env = {**os.environ, "PYTHONPATH": str(self.dir), "DJANGO_SETTINGS_MODULE": "graphite.settings",
                   "GRAPHITE_SETTINGS_MODULE": "gateway_graphite_settings"}
            self.web = self._spawn([DJANGO_ADMIN, "runserver", "--noreload",
                                    f"127.0.0.1:{self.web_port}"], "graphite-web.out", env=env)
        wait_for_tcp(self.carbon_line_port, self.carbon, "carbon-cache", self.dir / "carbon.out", START_TIMEOUT_S)
        config = {**json.loads(STATSD_CONFIG.read_text()), "flushInterval": FLUSH_INTERVAL_MS,
                  "address": "127.0.0.1", "port": self.statsd_port,
                  "mgmt_address": "127.0.0.1", "mgmt_port": self.statsd_admin_port,
                  "graphiteHost": "127.0.0.1", "graphitePort": self.carbon_line_port}
        (self.dir / "statsd.js").write_text(json.dumps(config, indent=2) + "\n")
        self.statsd = self._spawn(["node", str(stats_js), str(self.dir / "statsd.js")], "statsd.out",
                                  cwd=stats_js.parent)
        wait_for_tcp(self.statsd_admin_port, self.statsd, "statsd", self.dir / "statsd.out", START_TIMEOUT_S)
        if self.web is not None:
            self._wait_for_web()

    def _spawn(self, argv: list[str], log_name: str, *, env: dict[str, str] | None = None,
               cwd: Path | None = None) -> subprocess.Popen[bytes]:
        with open(self.dir / log_name, "ab") as log:
            return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, cwd=cwd or self.dir)

    def _write_carbon_conf(self) -> None:
        conf = self.dir / "conf"
        (conf / "carbon.conf").write_text(f"""[cache]
STORAGE_DIR = {self.dir}/
LOCAL_DATA_DIR = {self.whisper_dir}/
CONF_DIR = {conf}/
LOG_DIR = {self.dir}/log/
PID_DIR = {self.dir}/
DATABASE = whisper
ENABLE_LOGROTATION = False
MAX_CACHE_SIZE = inf
MAX_UPDATES_PER_SECOND = inf
MAX_CREATES_PER_MINUTE = inf
LINE_RECEIVER_INTERFACE = 127.0.0.1
LINE_RECEIVER_PORT = {self.carbon_line_port}
ENABLE_UDP_LISTENER = False
PICKLE_RECEIVER_INTERFACE = 127.0.0.1
PICKLE_RECEIVER_PORT = {self.carbon_pickle_port}
CACHE_QUERY_INTERFACE = 127.0.0.1
CACHE_QUERY_PORT = {self.carbon_query_port}
LOG_LISTENER_CONN_SUCCESS = False
WHISPER_AUTOFLUSH = False
""")
        # One archive of 1-second points for 10 minutes: StatsD's flush interval is the finest resolution
        # that means anything (two flushes in one point would overwrite each other).
        (conf / "storage-schemas.conf").write_text(f"""[carbon]
pattern = ^carbon\\.
retentions = 1s:10m

[everything]
pattern = .*
retentions = {FLUSH_INTERVAL_MS // 1000}s:10m
""")
        (conf / "storage-aggregation.conf").write_text("""[counts]
pattern = \\.count$
xFilesFactor = 0
aggregationMethod = sum

[default]
pattern = .*
xFilesFactor = 0
aggregationMethod = average
""")

    def _write_graphite_settings(self) -> None:
        web = self.dir / "web"
        (self.dir / "gateway_graphite_settings.py").write_text(f"""# graphite-web settings for this stack only
SECRET_KEY = "metrics-stack-{os.getpid()}-{time.time_ns()}"
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
STORAGE_DIR = "{web}/"
WHISPER_DIR = "{self.whisper_dir}/"
STANDARD_DIRS = ["{self.whisper_dir}/"]
LOG_DIR = "{web}/log/"
INDEX_FILE = "{web}/index"
CARBONLINK_HOSTS = ["127.0.0.1:{self.carbon_query_port}"]
DATABASES = {{"default": {{"NAME": "{web}/graphite.db", "ENGINE": "django.db.backends.sqlite3"}}}}
TIME_ZONE = "UTC"
""")

    def _wait_for_web(self) -> None:
        assert self.web is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.web.poll() is not None:
                raise RuntimeError(f"graphite-web exited with {self.web.returncode}:\n"
                                   f"{tail(self.dir / 'graphite-web.out')}")
            with contextlib.suppress(OSError):
                self.render_json("stats.statsd.numStats")
                return
            time.sleep(0.1)
        raise RuntimeError(f"graphite-web did not answer:\n{tail(self.dir / 'graphite-web.out')}")

    def stop(self) -> None:
        for proc in (self.web, self.statsd, self.carbon):
            stop(proc)
        self.web = self.statsd = self.carbon = None
        if not self.keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> MetricsStack:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{tail(self.dir / name)}"
                         for name in ("statsd.out", "carbon.out", "graphite-web.out") if (self.dir / name).exists())

    # --- reading what an operator sees --------------------------------------------------------

    def whisper_series(self) -> dict[str, list[tuple[int, float]]]:
        """Every whisper file's non-empty points, by Graphite metric name (stats.counters.x.count)."""
        out = subprocess.run([SYSTEM_PYTHON, "-c", _READ_WHISPER, str(self.whisper_dir)], capture_output=True,
                             check=True, timeout=60)
        raw: dict[str, list[list[float]]] = json.loads(out.stdout)
        return {name: [(int(ts), float(value)) for ts, value in points] for name, points in raw.items()}

    def fetch(self, path: str) -> bytes:
        """A graphite-web URL path as documented (`/render?target=...`), fetched verbatim."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.web_port}{path}", timeout=20) as response:
            data: bytes = response.read()
        return data

    def render_json(self, *targets: str, since: str = "-10min") -> list[dict[str, Any]]:
        """graphite-web's /render with format=json (what Grafana's Graphite data source asks for)."""
        query = urllib.parse.urlencode([*(("target", t) for t in targets), ("from", since), ("format", "json")])
        with urllib.request.urlopen(f"http://127.0.0.1:{self.web_port}/render?{query}", timeout=20) as response:
            result: list[dict[str, Any]] = json.loads(response.read())
        return result

    def render_png(self, path: Path, targets: list[str], *, title: str, since: str, until: str = "now",
                   width: int = 900, height: int = 320, extra: dict[str, str] | None = None) -> None:
        params = [*(("target", t) for t in targets), ("from", since), ("until", until), ("title", title),
                  ("width", str(width)), ("height", str(height)), ("bgcolor", "white"), ("fgcolor", "black"),
                  ("majorGridLineColor", "#cccccc"), ("minorGridLineColor", "#eeeeee"), ("hideLegend", "false"),
                  ("fontSize", "10"), ("lineWidth", "2"), *(extra or {}).items()]
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"http://127.0.0.1:{self.web_port}/render?{query}", timeout=30) as response:
            data = response.read()
        if not data.startswith(b"\x89PNG"):
            raise RuntimeError(f"graphite-web returned no PNG for {targets}: {data[:200]!r}")
        path.write_bytes(data)
