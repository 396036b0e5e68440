"""The developer console (`/console`, issue #10) in a real headless Chromium.

Debian's chromium is driven by playwright-core (from the TypeScript SDK's devDependencies) through
clients/console/test/console_driver.mjs, a small Node process that answers one JSON line per
command; the test itself reads as Python. The page connects through the SDK with a token the
gateway mints in --dev, shows the frames it receives (a broadcast this test pushes and one pushed
from the page's own form), sends a client message and shows its ack, shows /stats, and reconnects
by itself after the gateway process is stopped and started again on the same port, resuming what
was recorded meanwhile. Outside --dev every console URL is a 404.

Skipped only when node or chromium is missing; the SDK must be built (`make sdk`, which `make test`
runs first), otherwise the browser test fails and says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from tornado.httpclient import AsyncHTTPClient
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.web import Application

from tests.helpers import ROOT, GatewayProcess, unique
from tornado_gateway import console
from tornado_gateway.redis_keys import Keys

NODE = shutil.which("node")
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
TYPESCRIPT = ROOT / "clients" / "typescript"
DRIVER = ROOT / "clients" / "console" / "test" / "console_driver.mjs"
#: Where the screenshot goes; CONSOLE_SCREENSHOT=docs/console.png refreshes the README's picture.
SCREENSHOT_ENV = "CONSOLE_SCREENSHOT"


def browser_unavailable() -> str | None:
    if NODE is None:
        return "node is not installed"
    if not os.access(CHROMIUM, os.X_OK):
        return f"chromium is not installed at {CHROMIUM} (apt-get install chromium, or set CHROMIUM)"
    return None


class ConsolePage:
    """The console in headless Chromium: a console_driver.mjs process, one JSON line per command.

    The driver runs in its own process group (Chromium is its child), so closing it can end
    exactly what this test started, by that group's id, if it does not quit when asked."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def launch(cls) -> ConsolePage:
        assert NODE is not None
        proc = await asyncio.create_subprocess_exec(
            NODE, str(DRIVER), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, "CHROMIUM": CHROMIUM}, start_new_session=True)
        page = cls(proc)
        try:
            await page._reply(timeout=45.0)  # "ready <version>" once Chromium runs
        except BaseException:
            await page.close()
            raise
        return page

    async def call(self, cmd: str, *, timeout: float = 20.0, **args: Any) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"cmd": cmd, **args}) + "\n").encode())
        await self.proc.stdin.drain()
        return await self._reply(timeout)

    async def _reply(self, timeout: float) -> Any:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise AssertionError(f"the browser driver exited:\n{await self._stderr()}")
        reply = json.loads(line)
        if not reply["ok"]:
            raise AssertionError(reply["error"])
        return reply["value"]

    async def _stderr(self) -> str:
        assert self.proc.stderr is not None
        with contextlib.suppress(TimeoutError):
            return (await asyncio.wait_for(self.proc.stderr.read(), 5)).decode(errors="replace")
        return ""

    async def wait(self, selector: str, *, has_text: str | None = None, timeout: float = 10.0) -> str:
        """Until an element matching `selector` (containing `has_text`) is in the page; its HTML.
        On a timeout the failure shows the state badge and the newest frames."""
        args: dict[str, Any] = {"selector": selector, "timeoutMs": int(timeout * 1000)}
        if has_text is not None:
            args["hasText"] = has_text
        try:
            html: str = await self.call("wait", timeout=timeout + 10, **args)
        except AssertionError as exc:
            state = await self.call("text", selector="#state")
            frames = await self.call("text", selector="#frames")
            raise AssertionError(f"{exc}\nstate: {state}\nframes (newest first): {frames[:3000]}") from None
        return html

    async def text(self, selector: str) -> str:
        text: str = await self.call("text", selector=selector)
        return text

    async def fill(self, selector: str, value: str) -> None:
        await self.call("fill", selector=selector, value=value)

    async def select(self, selector: str, value: str) -> None:
        await self.call("select", selector=selector, value=value)

    async def click(self, selector: str) -> None:
        await self.call("click", selector=selector)

    async def close(self) -> None:
        if self.proc.returncode is None and self.proc.stdin is not None:
            with contextlib.suppress(OSError, RuntimeError):
                self.proc.stdin.write(b'{"cmd": "quit"}\n')
                await self.proc.stdin.drain()
        try:
            await asyncio.wait_for(self.proc.wait(), 15)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # the group this test started: node and its Chromium
            await self.proc.wait()


@pytest.fixture
async def console_page() -> AsyncIterator[ConsolePage]:
    reason = browser_unavailable()
    if reason is not None:
        pytest.skip(reason)
    missing = [str(p.relative_to(ROOT)) for p in (TYPESCRIPT / "dist" / "index.js",
                                                  TYPESCRIPT / "node_modules" / "playwright-core")
               if not p.exists()]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: build the SDK with `make sdk` (make test does it first)")
    page = await ConsolePage.launch()
    yield page
    await page.close()


async def connect_page(page: ConsolePage, gateway: GatewayProcess, user: str) -> str:
    """Opens the console, connects as `user` (a driver), returns the connectionId it shows."""
    await page.call("goto", url=f"{gateway.base}/console")
    await page.wait("body[data-ready=true]")
    await page.fill("#user-id", user)
    await page.select("#user-type", "driver")
    await page.fill("#device-id", "browser-1")
    await page.select("#platform", "web")
    await page.click("#connect")
    await page.wait("#state[data-state=connected]")
    await page.wait("tr[data-dir=in][data-type=connected]", has_text=f'"userId":"{user}"')
    connection_id = await page.text("#connection-id")
    assert connection_id not in ("", "-")
    return connection_id


async def page_shows_pushed_messages(page: ConsolePage, gateway: GatewayProcess, user: str) -> None:
    """A broadcast from the test, then one from the page's own form: both arrive, numbered 1 and 2."""
    status, body = await gateway.http("POST", f"/broadcast/user/{user}", {
        "type": "notification", "id": "from-test-1", "payload": {"title": "pushed by the test", "body": "b"}})
    assert (status, body["devices"], body["seq"]) == (202, 1, 1)
    await page.wait('tr[data-dir=in][data-type=notification][data-id="from-test-1"][data-seq="1"]',
                    has_text="pushed by the test")

    await page.select("#bc-type", "ride_request")  # fills in an example payload
    await page.fill("#bc-id", "from-page-1")
    await page.click("#bc-send")
    await page.wait('#bc-result[data-status="202"]', has_text='"seq":2')
    await page.wait('tr[data-dir=in][data-type=ride_request][data-id="from-page-1"][data-seq="2"]')


async def page_sends_client_messages(page: ConsolePage) -> None:
    """A location update is acked (both frames in the log); a bad dispatch_response shows its error."""
    await page.select("#client-type", "location_update")
    await page.fill("#client-id", "loc-1")
    await page.click("#client-send")
    await page.wait('#client-result[data-outcome=ack][data-ref="loc-1"]')
    await page.wait('tr[data-dir=out][data-type=location_update][data-id="loc-1"]')
    await page.wait('tr[data-dir=in][data-type=ack][data-ref="loc-1"]')

    await page.select("#client-type", "dispatch_response")
    await page.fill("#client-payload", '{"action": "accept"}')  # requestId missing
    await page.fill("#client-id", "bad-1")
    await page.click("#client-send")
    await page.wait('#client-result[data-outcome=error][data-code=INVALID_MESSAGE][data-ref="bad-1"]')
    await page.wait('tr[data-dir=in][data-type=error][data-ref="bad-1"]')


async def test_console_connects_shows_frames_sends_and_reconnects_after_a_restart(
        make_gateway: Callable[..., GatewayProcess], console_page: ConsolePage, redis_client: redis.Redis,
        prefix: str, tmp_path: Path) -> None:
    gateway = make_gateway({"SHUTDOWN_DRAIN_SECONDS": "0.2"}, args=["--dev"])
    page = console_page
    user = unique("console")
    first_connection = await connect_page(page, gateway, user)
    await page_shows_pushed_messages(page, gateway, user)
    await page_sends_client_messages(page)
    await page.wait(f'#stats[data-ok=true][data-server-id="{gateway.server_id}"][data-total-connections="1"]')

    # The gateway goes away (SIGTERM: 1001), a message is recorded while it is down, it comes back.
    await asyncio.to_thread(gateway.stop)
    await page.wait("tr[data-dir=event][data-type=disconnected]", has_text="1001")
    await page.wait("#stats[data-ok=false]")
    message = {"type": "notification", "id": "while-down-1", "payload": {"title": "recorded while down", "body": "b"}}
    recorded = redis_client.fcall(Keys(prefix).function("publish"), 1, user, json.dumps(message))
    assert recorded == 3
    await asyncio.to_thread(gateway.start)

    await page.wait("#state[data-state=connected]", timeout=20)
    assert await page.text("#connects") == "2"
    assert await page.text("#connection-id") != first_connection
    await page.wait("tr[data-dir=in][data-type=connected]", has_text='"recovered":true')
    await page.wait('tr[data-dir=in][data-type=notification][data-id="while-down-1"][data-seq="3"]')
    status, body = await gateway.http("POST", f"/broadcast/user/{user}", {
        "type": "notification", "id": "after-restart-1", "payload": {"title": "after the restart", "body": "b"}})
    assert (status, body["seq"]) == (202, 4)
    await page.wait('tr[data-dir=in][data-type=notification][data-id="after-restart-1"][data-seq="4"]')
    await page.wait('#stats[data-ok=true][data-total-connections="1"]', timeout=10)

    screenshot = os.environ.get(SCREENSHOT_ENV) or str(tmp_path / "console.png")
    assert await page.call("screenshot", path=screenshot) > 10_000  # bytes of PNG written
    problems = await page.call("problems")
    # Chromium logs each refused WebSocket attempt while the gateway is down; script errors are bugs.
    assert [p for p in problems if p.startswith("page error")] == [], problems


async def test_console_is_not_served_without_dev(gateway: GatewayProcess) -> None:
    for method, path in [("GET", "/console"), ("GET", "/console/"), ("GET", "/console/app.js"),
                         ("GET", "/console/sdk/index.js"), ("POST", "/console/token")]:
        body = {"userId": "u1", "userType": "driver"} if method == "POST" else None
        status, _ = await gateway.http(method, path, body)
        assert status == 404, (method, path, status)


async def test_console_token_and_files_in_dev(make_gateway: Callable[..., GatewayProcess]) -> None:
    gateway = make_gateway({"GATEWAY_API_KEY": "console-key"}, args=["--dev"])
    status, page = await gateway.http("GET", "/console")
    assert status == 200 and "/console/app.js" in page
    assert (await gateway.http("GET", "/console/app.js"))[0] == 200
    for path in ("/console/test/console_driver.mjs", "/console/sdk/..%2F..%2Fconsole%2Fapp.js",
                 "/console/sdk/..%2Fpackage.json"):
        status, _ = await gateway.http("GET", path)
        assert status in (403, 404), path

    wanted = {"userId": "console-user", "userType": "rider"}
    assert (await gateway.http("POST", "/console/token", wanted))[0] == 401  # the broadcast rule: key set
    key = {"Authorization": "Bearer console-key"}
    status, body = await gateway.http("POST", "/console/token", wanted, headers=key)
    assert status == 200 and body["userId"] == "console-user"
    client = await gateway.connect("console-user", user_type="rider", token=body["token"])
    assert client.frames[0]["payload"]["userId"] == "console-user"
    client.close()
    for bad in ({"userId": "", "userType": "rider"}, {"userId": "u", "userType": "admin"}, ["u", "rider"]):
        status, body = await gateway.http("POST", "/console/token", bad, headers=key)
        assert (status, body["error"]) == (400, "INVALID_PARAMS"), bad
    assert (await gateway.http("GET", "/console/token"))[0] == 405


async def test_the_sdk_route_says_how_to_build_the_sdk_when_it_is_missing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dist = tmp_path / "dist"
    monkeypatch.setattr(console, "SDK_DIR", dist)
    app = Application([(r"/console/sdk/(.*)", console.ConsoleSdkHandler, {"path": str(dist)})])
    sockets = bind_sockets(0, "127.0.0.1")
    server = HTTPServer(app)
    server.add_sockets(sockets)
    base = f"http://127.0.0.1:{sockets[0].getsockname()[1]}/console/sdk"
    try:
        missing = await AsyncHTTPClient().fetch(f"{base}/index.js", raise_error=False)
        assert (missing.code, missing.body.decode().strip()) == (404, "SDK not built: run make sdk")
        dist.mkdir()
        (dist / "index.js").write_text("export {};\n")
        built = await AsyncHTTPClient().fetch(f"{base}/index.js", raise_error=False)
        assert built.code == 200 and "javascript" in built.headers["Content-Type"]
        other = await AsyncHTTPClient().fetch(f"{base}/nope.js", raise_error=False)
        assert other.code == 404 and b"SDK not built" not in other.body
    finally:
        server.stop()
