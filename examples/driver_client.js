// A driver app's connection through the TypeScript/JavaScript SDK (clients/typescript; build it
// once with `npm ci && npm run build` there). Connects as a driver on iOS, streams its location,
// prints what services push (a ride_request sent with POST /broadcast/user/{id}) and accepts it.
// The SDK does the rest by itself: answers heartbeats, reconnects with capped, jittered backoff,
// resumes with since/epoch without missing or repeating a recorded message, and sends the
// receipt a message asks for once the handler below has run.
//
//   node --experimental-websocket examples/driver_client.js ws://localhost:4010 TOKEN [seconds]
//
// (Browsers, React Native and Node 22+ have WebSocket built in; Node 20 needs the flag.)
import { GatewayClient } from "../clients/typescript/dist/index.js";

const [url = "ws://localhost:4010", token = "", seconds = "0"] = process.argv.slice(2);

const client = new GatewayClient({
  url,
  token, // a string; pass `async () => fetchFreshToken()` to have the SDK refresh it before it expires
  userType: "driver",
  deviceId: "iphone-15-abc",
  platform: "ios",
  backoff: { baseMs: 500, capMs: 5_000 }, // a phone app would rather use the default 30 s cap
});

let hasConnected = false;
let locationTimer = null;
let sent = 0;

function reReadStateFromServices() {
  // Placeholder: a real app fetches its current rides and offers from the services (HTTP) here.
  console.log("re-reading state from the services");
}

client.on("message", (message) => {
  switch (message.type) {
    case "connected":
      console.log("connected", JSON.stringify(message.payload));
      if (hasConnected) console.log("recovered", message.payload.recovered === true);
      hasConnected = true;
      clearInterval(locationTimer);
      locationTimer = setInterval(sendLocation, 200);
      break;
    case "heartbeat": // already answered by the SDK
      console.log("heartbeat answered");
      break;
    case "ack":
      console.log("ack", message.payload.id);
      break;
    case "ride_request":
      console.log("ride_request", JSON.stringify(message.payload));
      client
        .send("dispatch_response", { requestId: message.payload.requestId, action: "accept" },
              { id: `dr-${message.payload.requestId}` })
        .catch(() => {}); // lost with the connection: the offer comes again or times out server-side
      break;
    case "error":
      console.log("error", message.payload.code, message.payload.message);
      break;
    default:
      console.log(message.type, JSON.stringify(message.payload));
  }
});

// recovered: false (the missed messages are no longer kept): the app re-reads its state.
client.on("resync", reReadStateFromServices);
client.on("receipt_sent", ({ messageId }) => console.log("receipt", messageId));
client.on("disconnected", ({ code, reason, willRetry, delayMs }) => {
  clearInterval(locationTimer);
  console.log("closed", code, reason);
  if (willRetry) console.log(`reconnecting in ${(delayMs / 1000).toFixed(1)}s`);
});

function sendLocation() {
  sent += 1;
  client
    .send("location_update", {
      latitude: 12.9716 + sent * 1e-5, longitude: 77.5946, heading: 90, speed: 8.2,
      accuracy: 5, timestamp: Date.now(), isAvailable: true,
    }, { id: `loc-${sent}` })
    .catch(() => {}); // not connected right now: the next one goes out after the reconnect
}

client.connect().catch((error) => console.log("gave up:", error.code, error.message));
if (Number(seconds) > 0) {
  setTimeout(() => client.close(1000, "done"), Number(seconds) * 1000);
}
