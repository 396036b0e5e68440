// A driver app's connection, in plain WebSocket API (browsers; Node 22+, or Node 20 with
// --experimental-websocket). Connects as a driver on iOS, answers heartbeats, streams its
// location, prints what services push (a ride_request sent with POST /broadcast/user/{id}),
// answers receipts, and resumes after a dropped connection without missing a recorded message.
//
//   node --experimental-websocket examples/driver_client.js ws://localhost:4010 TOKEN [seconds]
//
// Resuming (PROTOCOL.md section 7): keep the `epoch` from `connected` and the `seq` of the last
// recorded message handled; after a drop, reconnect (backoff with jitter) with since=<seq>&epoch=<epoch>.
// `recovered: true`: the missed messages follow, in order. `recovered: false`: re-read state from the services.
const [url = "ws://localhost:4010", token = "", seconds = "0"] = process.argv.slice(2);
const NO_RECONNECT = new Set([4400, 4401, 4409]); // fix the request or token first; 4409: another session took over
const BACKOFF_FIRST_MS = 500, BACKOFF_MAX_MS = 10_000; // doubling, each delay jittered down by up to half

let ws = null;
let epoch = null;     // from `connected`: names this run of the user's recorded messages
let lastSeq = 0;      // connected's seq, then the seq of each recorded message handled
let hasConnected = false;
let failures = 0;     // connects and drops since the last `connected`
let stopping = false; // set when we close on purpose: no reconnect then
let locationTimer = null, retryTimer = null;
let sent = 0;

function reReadStateFromServices() {
  // Placeholder: a real app fetches its current rides and offers from the services (HTTP) here.
  console.log("re-reading state from the services");
}

function connect() {
  const params = new URLSearchParams({ token, userType: "driver", deviceId: "iphone-15-abc", platform: "ios" });
  if (epoch !== null) { params.set("since", String(lastSeq)); params.set("epoch", epoch); }
  const socket = new WebSocket(`${url}/ws?${params}`);
  ws = socket;
  let lost = false;
  const onLost = (code, reason) => { // once per socket, whichever comes first
    if (lost) return;
    lost = true;
    clearTimeout(openTimer);
    clearInterval(locationTimer);
    console.log("closed", code, reason);
    if (stopping || NO_RECONNECT.has(code)) return;
    const delay = Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * 2 ** failures) * (0.5 + Math.random() / 2);
    failures += 1;
    console.log(`reconnecting in ${(delay / 1000).toFixed(1)}s`);
    retryTimer = setTimeout(connect, delay);
  };
  // Node 20's WebSocket fires no "close" when the connection fails before it opens: hence the
  // "error" handler and the timer (browsers fire "close" after "error" in every case).
  const openTimer = setTimeout(() => { socket.close(); onLost(1006, "not open after 10 s"); }, 10_000);
  socket.onopen = () => clearTimeout(openTimer);
  socket.onmessage = (event) => handle(JSON.parse(event.data));
  socket.onerror = () => onLost(1006, "connection failed");
  socket.onclose = (event) => onLost(event.code, event.reason);
}

function send(frame) {
  ws.send(JSON.stringify(frame));
}

function handle(message) {
  switch (message.type) {
    case "connected":
      console.log("connected", JSON.stringify(message.payload));
      onConnected(message.payload);
      break;
    case "heartbeat":
      send({ type: "heartbeat_ack", payload: { timestamp: message.payload.timestamp } });
      console.log("heartbeat answered");
      break;
    case "ack":
      console.log("ack", message.payload.id);
      break;
    case "ride_request":
      console.log("ride_request", JSON.stringify(message.payload));
      send({ type: "dispatch_response", id: `dr-${message.payload.requestId}`,
             payload: { requestId: message.payload.requestId, action: "accept" } });
      break;
    case "error":
      console.log("error", message.payload.code, message.payload.message);
      break;
    default:
      console.log(message.type, JSON.stringify(message.payload));
  }
  if (message.receipt) { // the service wants to know the app has seen this message
    send({ type: "receipt", payload: { messageId: message.id } });
    console.log("receipt", message.id);
  }
  if (message.seq !== undefined) lastSeq = message.seq; // a recorded message, now handled
}

function onConnected(payload) {
  const recovered = payload.recovered === true;
  if (hasConnected) {
    console.log("recovered", recovered);
    if (!recovered) reReadStateFromServices();
  }
  if (!recovered) { // a fresh start: continue from the user's current seq (missed messages follow otherwise)
    epoch = payload.epoch ?? null;
    lastSeq = payload.seq ?? 0;
  }
  hasConnected = true;
  failures = 0;
  locationTimer = setInterval(sendLocation, 200);
}

function sendLocation() {
  sent += 1;
  send({
    type: "location_update", id: `loc-${sent}`,
    payload: { latitude: 12.9716 + sent * 1e-5, longitude: 77.5946, heading: 90, speed: 8.2,
               accuracy: 5, timestamp: Date.now(), isAvailable: true },
  });
}

connect();
if (Number(seconds) > 0) {
  setTimeout(() => {
    stopping = true;
    clearTimeout(retryTimer);
    ws.close(1000, "done");
  }, Number(seconds) * 1000);
}
