// The developer console's script: a plain ES module, no build step, no dependencies but the
// gateway's own TypeScript SDK, compiled into clients/typescript/dist/ (`make sdk`) and served
// by the gateway (in --dev only) under /console/sdk/. Everything the page shows is set with
// textContent, never parsed as HTML: frames carry whatever services and users put in them.

const SDK_URL = new URL("./sdk/index.js", import.meta.url).href;
const MAX_ROWS = 500; // the frame log keeps the newest ones
const STATS_EVERY_MS = 3000;
// A console should be back soon after you restart the gateway, not after the SDK's 30 s ceiling.
const CONSOLE_BACKOFF = { baseMs: 500, capMs: 5000 };

const CLIENT_EXAMPLES = {
  location_update: () => ({ latitude: 12.9716, longitude: 77.5946, heading: 90, speed: 8.5, accuracy: 5,
    timestamp: Date.now(), isAvailable: true }),
  dispatch_response: () => ({ requestId: "r1", action: "accept" }),
  receipt: () => ({ messageId: lastServiceMessageId ?? "a-message-id" }),
  heartbeat_ack: () => ({ timestamp: Date.now() }),
  token_refresh: () => ({ token: "paste a fresh token here" }),
};

const BROADCAST_EXAMPLES = {
  notification: () => ({ title: "Hello from the console", body: "Sent with POST /broadcast" }),
  ride_request: () => ({ requestId: `r-${Date.now()}`, pickup: "MG Road", dropoff: "Airport", fare: 420 }),
  ride_status: () => ({ rideId: "ride-1", status: "driver_assigned" }),
  driver_location: () => ({ driverId: "d-1", latitude: 12.9716, longitude: 77.5946 }),
  eta_update: () => ({ rideId: "ride-1", etaSeconds: 240 }),
  order_status: () => ({ orderId: "order-1", status: "preparing" }),
};

const $ = (id) => document.getElementById(id);

let sdk = null; // the SDK module, once loaded
let client = null; // the current GatewayClient; events of earlier ones are ignored
let connects = 0;
let lastServiceMessageId = null;

// --- the frame log ---------------------------------------------------------------------------

function timeOfDay(date = new Date()) {
  return date.toTimeString().slice(0, 8) + "." + String(date.getMilliseconds()).padStart(3, "0");
}

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

/** One row, newest first. `dir` is in, out or event; data-* attributes make rows easy to find. */
function addRow(dir, type, fields, text) {
  const row = document.createElement("tr");
  row.dataset.testid = "frame";
  row.dataset.dir = dir;
  row.dataset.type = type;
  for (const [name, value] of Object.entries(fields)) {
    if (value !== undefined && value !== null) row.dataset[name] = String(value);
  }
  const arrow = { in: "\u2193", out: "\u2191", event: "\u2022" }[dir];
  row.append(cell(timeOfDay(), "time"), cell(arrow, "dir"), cell(type, "type"), cell(fields.seq ?? "", "seq"),
    cell(fields.id ?? fields.ref ?? "", "id"), cell(text, "json"));
  row.title = dir === "in" ? "received" : dir === "out" ? "sent" : "client event";
  applyFilter(row);
  const body = $("frames");
  body.prepend(row);
  while (body.childElementCount > MAX_ROWS) body.lastElementChild.remove();
}

/** A frame as it crossed the socket (both directions), whatever the SDK then made of it. */
function logFrame(dir, raw) {
  let frame;
  try {
    frame = JSON.parse(String(raw));
  } catch {
    addRow(dir, "(not JSON)", {}, String(raw));
    return;
  }
  const payload = frame && typeof frame.payload === "object" && frame.payload !== null ? frame.payload : {};
  const ref = frame.type === "ack" ? payload.id : frame.type === "error" ? payload.ref : undefined;
  addRow(dir, String(frame.type), { seq: frame.seq, id: frame.id, ref }, JSON.stringify(frame));
}

function logEvent(type, text) {
  addRow("event", type, {}, text);
}

function applyFilter(row) {
  const wanted = $("filter").value.trim().toLowerCase();
  const hideHeartbeats = $("hide-heartbeats").checked;
  const type = row.dataset.type;
  const hidden = (wanted !== "" && !type.toLowerCase().includes(wanted))
    || (hideHeartbeats && (type === "heartbeat" || type === "heartbeat_ack"));
  row.classList.toggle("hidden", hidden);
}

function refilter() {
  for (const row of $("frames").children) applyFilter(row);
}

/** The SDK's WebSocket, tapped: every frame in and out reaches the log before the SDK sees it. */
class TappedWebSocket extends WebSocket {
  constructor(url, protocols) {
    super(url, protocols); // the token travels as the bearer subprotocol, never in the URL
    this.addEventListener("message", (event) => logFrame("in", event.data));
  }

  send(data) {
    logFrame("out", data);
    super.send(data);
  }
}

// --- connection state --------------------------------------------------------------------------

function showState(state, detail = "") {
  const badge = $("state");
  badge.dataset.state = state;
  badge.textContent = detail ? `${state}: ${detail}` : state;
}

function showResume() {
  const position = client?.resumePosition;
  $("resume").textContent = position ? `${position.epoch} / ${position.seq}` : "-";
}

function describeClose(code, reason) {
  const names = { 1000: "normal", 1001: "going away", 1006: "lost", 1009: "too big", 1013: "try later",
    4400: "invalid params", 4401: "auth failed", 4408: "heartbeat timeout", 4409: "replaced",
    4429: "rate limited", 4503: "too slow" };
  return `${code} ${names[code] ?? ""}${reason ? ` (${reason})` : ""}`.replace(/\s+/g, " ").trim();
}

/** Shows what one client does; ignores clients that a later Connect has replaced. */
function watch(gateway) {
  const mine = (handler) => (event) => {
    if (gateway === client) handler(event);
  };
  gateway.on("connecting", mine(({ attempt }) => {
    showState("connecting", attempt > 0 ? `retry ${attempt}` : "");
    logEvent("connecting", attempt > 0 ? `retry ${attempt}` : "first attempt");
  }));
  gateway.on("connected", mine((message) => {
    const p = message.payload;
    connects += 1;
    $("connects").textContent = String(connects);
    $("connection-id").textContent = p.connectionId;
    $("server-id").textContent = p.serverId;
    const resumed = p.recovered === undefined ? "" : p.recovered ? ", resumed" : ", not recoverable";
    showState("connected", `${p.userId} (${p.userType}) on ${p.serverId}${resumed}`);
    showResume();
    $("client-send").disabled = false;
  }));
  gateway.on("disconnected", mine(({ code, reason, willRetry, delayMs }) => {
    const close = describeClose(code, reason);
    $("last-close").textContent = close;
    $("connection-id").textContent = "-";
    $("client-send").disabled = true;
    const retry = willRetry ? `, retrying in ${Math.round(delayMs ?? 0)} ms` : ", not retrying";
    showState("disconnected", close + retry);
    logEvent("disconnected", close + retry);
    if (!willRetry) connectionEnded();
  }));
  gateway.on("resync", mine(() => logEvent("resync", "the gateway could not replay what was missed")));
  gateway.on("client_error", mine((error) => logEvent("client_error", String(error?.message ?? error))));
  gateway.on("message", mine((message) => {
    if (!["connected", "heartbeat", "ack", "error"].includes(message.type)) lastServiceMessageId = message.id;
    showResume();
  }));
}

function connectionEnded() {
  $("connect").disabled = sdk === null;
  $("disconnect").disabled = true;
  $("client-send").disabled = true;
}

// --- connect / disconnect ----------------------------------------------------------------------

function apiHeaders(extra = {}) {
  const key = $("api-key").value.trim();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

/** A token from the gateway itself (POST /console/token, --dev only), asked again when the SDK needs one. */
async function mintToken(userId, userType) {
  const response = await fetch("/console/token", {
    method: "POST",
    headers: apiHeaders({ "Content-Type": "application/json" }),
    body: JSON.stringify({ userId, userType }),
  });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(`POST /console/token: ${response.status} ${body.message ?? ""}`);
  return body.token;
}

function gatewayUrl() {
  return `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}`;
}

async function connect(event) {
  event.preventDefault();
  await disconnect();
  const userId = $("user-id").value.trim();
  const userType = $("user-type").value;
  const pasted = $("token").value.trim();
  const gateway = new sdk.GatewayClient({
    url: gatewayUrl(),
    token: pasted || (() => mintToken(userId, userType)),
    userType,
    deviceId: $("device-id").value.trim(),
    platform: $("platform").value,
    WebSocket: TappedWebSocket,
    backoff: CONSOLE_BACKOFF,
  });
  client = gateway;
  watch(gateway);
  $("bc-user").placeholder = userId;
  $("connect").disabled = true;
  $("disconnect").disabled = false;
  gateway.connect().catch((error) => {
    if (gateway === client) logEvent("gave up", `${error.code ?? ""} ${error.message}`.trim());
  });
}

async function disconnect() {
  const gateway = client;
  if (gateway === null) return;
  $("disconnect").disabled = true;
  await gateway.close();
  connectionEnded();
}

// --- client messages and broadcasts ------------------------------------------------------------

function showResult(element, text, attributes) {
  for (const name of Object.keys(element.dataset)) delete element.dataset[name];
  Object.assign(element.dataset, attributes);
  element.textContent = text;
}

function parsePayload(textarea, result) {
  try {
    return JSON.parse(textarea.value);
  } catch (error) {
    showResult(result, `payload is not JSON: ${error.message}`, { outcome: "error", failed: "json" });
    return undefined;
  }
}

async function sendClientMessage(event) {
  event.preventDefault();
  const result = $("client-result");
  const type = $("client-type").value;
  const payload = parsePayload($("client-payload"), result);
  if (payload === undefined || client === null) return;
  if (!$("client-wait-ack").checked) {
    const sent = client.send(type, payload);
    showResult(result, sent ? `sent ${type} (no id: no ack)` : "not connected: nothing sent",
      { outcome: sent ? "sent" : "error" });
    return;
  }
  const id = $("client-id").value.trim();
  const started = performance.now();
  showResult(result, `sent ${type}, waiting for the ack...`, { outcome: "pending" });
  try {
    const ack = await client.send(type, payload, id ? { id } : {});
    const ms = Math.round(performance.now() - started);
    showResult(result, `ack ${ack.payload.id} in ${ms} ms`, { outcome: "ack", ref: ack.payload.id });
  } catch (error) {
    showResult(result, `${error.code ?? "ERROR"}: ${error.message}`,
      { outcome: "error", code: error.code ?? "", ref: error.ref ?? "" });
  }
}

async function pushBroadcast(event) {
  event.preventDefault();
  const result = $("bc-result");
  const payload = parsePayload($("bc-payload"), result);
  if (payload === undefined) return;
  const userId = $("bc-user").value.trim() || $("user-id").value.trim();
  const message = { type: $("bc-type").value, payload };
  const id = $("bc-id").value.trim();
  if (id) message.id = id;
  if ($("bc-receipt").checked) message.receipt = true;
  try {
    const response = await fetch(`/broadcast/user/${encodeURIComponent(userId)}`, {
      method: "POST",
      headers: apiHeaders({ "Content-Type": "application/json" }),
      body: JSON.stringify(message),
    });
    showResult(result, `${response.status} ${await response.text()}`, { status: String(response.status) });
  } catch (error) {
    showResult(result, `the gateway did not answer: ${error.message}`, { status: "0", failed: "network" });
  }
}

// --- /stats ------------------------------------------------------------------------------------

/** /stats as a short list; its figures also go into data-* attributes (data-total-connections...). */
function showStats(stats) {
  const panel = $("stats");
  const rows = [];
  for (const [name, value] of Object.entries(stats)) {
    const dt = document.createElement("dt");
    const dd = document.createElement("dd");
    dt.textContent = name;
    dd.textContent = typeof value === "object" && value !== null
      ? Object.entries(value).map(([k, v]) => `${k} ${typeof v === "object" ? JSON.stringify(v) : v}`).join(", ")
      : String(value);
    rows.push(dt, dd);
    if (typeof value !== "object") panel.dataset[name] = String(value);
  }
  panel.replaceChildren(...rows);
}

async function refreshStats() {
  const panel = $("stats");
  try {
    const response = await fetch("/stats", { cache: "no-store" });
    showStats(await response.json());
    panel.dataset.ok = "true";
    $("stats-age").textContent = `at ${timeOfDay().slice(0, 8)}, every ${STATS_EVERY_MS / 1000} s`;
  } catch {
    panel.dataset.ok = "false";
    $("stats-age").textContent = "the gateway is not answering";
  }
}

// --- start -------------------------------------------------------------------------------------

function fillExample(select, textarea, examples) {
  const example = examples[select.value];
  textarea.value = example ? JSON.stringify(example(), null, 2) : "{}";
}

async function loadSdk() {
  try {
    return await import(SDK_URL);
  } catch (error) {
    // The gateway's 404 says what to do ("SDK not built: run make sdk"); show it.
    const response = await fetch(SDK_URL).catch(() => null);
    const why = response && !response.ok ? (await response.text()).trim() : `the SDK did not load: ${error}`;
    const banner = $("banner");
    banner.textContent = why;
    banner.hidden = false;
    return null;
  }
}

async function start() {
  const clientType = $("client-type");
  const bcType = $("bc-type");
  clientType.addEventListener("change", () => fillExample(clientType, $("client-payload"), CLIENT_EXAMPLES));
  bcType.addEventListener("change", () => fillExample(bcType, $("bc-payload"), BROADCAST_EXAMPLES));
  fillExample(clientType, $("client-payload"), CLIENT_EXAMPLES);
  fillExample(bcType, $("bc-payload"), BROADCAST_EXAMPLES);
  $("filter").addEventListener("input", refilter);
  $("hide-heartbeats").addEventListener("change", refilter);
  $("clear").addEventListener("click", () => $("frames").replaceChildren());
  $("connect-form").addEventListener("submit", connect);
  $("disconnect").addEventListener("click", () => void disconnect());
  $("client-form").addEventListener("submit", sendClientMessage);
  $("broadcast-form").addEventListener("submit", pushBroadcast);
  void refreshStats();
  setInterval(refreshStats, STATS_EVERY_MS);
  sdk = await loadSdk();
  $("connect").disabled = sdk === null;
  document.body.dataset.ready = sdk === null ? "no-sdk" : "true";
}

void start();
