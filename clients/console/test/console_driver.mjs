// Drives the developer console in a real headless Chromium for tests/test_console_browser.py.
//
//   node console_driver.mjs        (CHROMIUM=/usr/bin/chromium by default)
//
// A thin remote control: one JSON command per line on stdin, one JSON answer per line on stdout
// ({"ok": true, "value": ...} or {"ok": false, "error": "..."}), so the test itself reads as
// Python. Playwright comes from the TypeScript SDK's devDependencies (playwright-core, which
// downloads no browser: it drives Debian's chromium). Everything the page logs to its console
// and every uncaught page error is kept; the `problems` command returns them.
import { createRequire } from "node:module";
import { createInterface } from "node:readline";

const require = createRequire(new URL("../../typescript/package.json", import.meta.url));
const { chromium } = require("playwright-core");

const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
const problems = [];
const browser = await chromium.launch({
  executablePath,
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
  timeout: 30_000,
});
const context = await browser.newContext({ viewport: { width: 1400, height: 1000 } });
const page = await context.newPage();
page.on("pageerror", (error) => problems.push(`page error: ${error.message}`));
page.on("console", (message) => {
  if (message.type() === "error") problems.push(`console error: ${message.text()}`);
});

/** `selector`, narrowed to the elements containing `hasText` when given. */
function locate({ selector, hasText }) {
  const all = page.locator(selector);
  return (hasText === undefined ? all : all.filter({ hasText })).first();
}

const commands = {
  goto: async ({ url }) => {
    await page.goto(url, { waitUntil: "load", timeout: 15_000 });
    return page.url();
  },
  fill: async ({ selector, value }) => page.locator(selector).fill(value, { timeout: 5_000 }),
  select: async ({ selector, value }) => page.locator(selector).selectOption(value, { timeout: 5_000 }),
  check: async ({ selector, checked }) => page.locator(selector).setChecked(checked, { timeout: 5_000 }),
  click: async ({ selector }) => page.locator(selector).click({ timeout: 5_000 }),
  // Waits until an element matching the selector (and containing hasText) is in the page.
  wait: async (args) => {
    await locate(args).waitFor({ state: "attached", timeout: args.timeoutMs ?? 10_000 });
    return locate(args).evaluate((element) => element.outerHTML.slice(0, 600));
  },
  text: async ({ selector }) => page.locator(selector).first().textContent({ timeout: 5_000 }),
  attr: async ({ selector, name }) => page.locator(selector).first().getAttribute(name, { timeout: 5_000 }),
  count: async ({ selector }) => page.locator(selector).count(),
  // Writes a PNG (a path relative to the driver's working directory) and returns its size. The
  // panels are scrolled back to their tops first (clicking scrolls them).
  screenshot: async ({ path }) => {
    await page.evaluate(() => document.querySelectorAll(".side, .log").forEach((panel) => panel.scrollTo(0, 0)));
    return (await page.screenshot({ path, fullPage: false })).length;
  },
  problems: async () => problems.slice(),
};

async function answer(line) {
  let request;
  try {
    request = JSON.parse(line);
  } catch {
    return { ok: false, error: `not JSON: ${line}` };
  }
  if (request.cmd === "quit") return null;
  const command = commands[request.cmd];
  if (command === undefined) return { ok: false, error: `unknown command ${request.cmd}` };
  try {
    const value = await command(request);
    return { ok: true, value: value ?? null };
  } catch (error) {
    return { ok: false, error: String(error?.message ?? error).split("\n").slice(0, 12).join("\n") };
  }
}

process.stdout.write(JSON.stringify({ ok: true, value: `ready ${browser.version()}` }) + "\n");
for await (const line of createInterface({ input: process.stdin })) {
  if (!line.trim()) continue;
  const reply = await answer(line);
  if (reply === null) break;
  process.stdout.write(JSON.stringify(reply) + "\n");
}
await browser.close();
process.exit(0); // stdin may still be open: do not wait for it
