"""The TypeScript/JavaScript SDK (clients/typescript) passes its own tests: `npm test` builds it with
tsc --strict, type-checks the examples, and runs node's test runner against real gateways started
from this repository's Python (the shared Redis, a key prefix of its own per test file).

`ensure_sdk_built()` is also what the JavaScript example tests call: examples/driver_client.js
imports the SDK's build output."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers import ROOT

NODE = shutil.which("node")
NPM = shutil.which("npm")
SDK_DIR = ROOT / "clients" / "typescript"


def _run(command: list[str], timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=SDK_DIR, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def install_sdk_dependencies() -> None:
    """`npm ci` (the committed package-lock.json) unless node_modules is already there."""
    if NODE is None or NPM is None:
        pytest.skip("node or npm is not installed")
    if (SDK_DIR / "node_modules" / ".bin" / "tsc").exists():
        return
    result = _run([NPM, "ci", "--no-audit", "--no-fund"], timeout=600)
    assert result.returncode == 0, f"npm ci failed:\n{result.stdout}\n{result.stderr}"


def ensure_sdk_built() -> None:
    """dist/ up to date with src/ (built when missing or older than a source file)."""
    install_sdk_dependencies()
    assert NPM is not None
    built = SDK_DIR / "dist" / "index.js"
    sources = [*(SDK_DIR / "src").rglob("*.ts"), SDK_DIR / "tsconfig.json"]
    if built.exists() and built.stat().st_mtime >= max(path.stat().st_mtime for path in sources):
        return
    result = _run([NPM, "run", "build"], timeout=300)
    assert result.returncode == 0, f"npm run build failed:\n{result.stdout}\n{result.stderr}"


@pytest.mark.skipif(NODE is None or NPM is None, reason="node or npm is not installed")
def test_typescript_sdk_npm_test(redis_url: str) -> None:
    install_sdk_dependencies()
    assert NPM is not None
    env = {**os.environ, "TSDK_REDIS_URL": redis_url, "TSDK_PYTHON": sys.executable}
    result = _run([NPM, "test"], timeout=900, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"npm test failed:\n{output[-30000:]}"
    assert "# fail 0" in result.stdout, output[-30000:]
    passed = [line for line in result.stdout.splitlines() if line.startswith("# pass ")]
    assert passed and int(passed[-1].split()[-1]) > 0, output[-30000:]
