// A typed driver app in a few lines: connect, narrow each server message by its type, accept
// offers, stream the location. `npm run typecheck` compiles it with tsc --strict; the runnable
// JavaScript twin is examples/driver_client.js at the repository root. Node 20 needs
// `--experimental-websocket`; browsers, React Native and Node 22+ have WebSocket built in.
import { GatewayClient, GatewayError, type ServerMessage } from "../src/index.js";

const [url = "ws://localhost:4010", token = ""] = process.argv.slice(2);

const client = new GatewayClient({ url, token, userType: "driver", deviceId: "pixel-8-a1b2", platform: "android" });

/** One line per server message: `msg.type` narrows `msg.payload` to that type's payload. */
function describe(msg: ServerMessage): string {
  switch (msg.type) {
    case "connected":
      return `connected as ${msg.payload.userId}, heartbeat every ${msg.payload.heartbeatInterval} ms`;
    case "heartbeat":
      return `heartbeat ${msg.payload.timestamp}`;
    case "ack":
      return `ack ${msg.payload.id}`;
    case "error":
      return `gateway refused ${msg.payload.ref ?? "a frame"}: ${msg.payload.code} ${msg.payload.message}`;
    case "ride_request":
      return `ride request ${msg.payload.requestId}${msg.seq === undefined ? "" : ` (seq ${msg.seq})`}`;
    case "ride_status":
      return `ride ${msg.payload.rideId} is ${msg.payload.status}`;
    case "driver_location":
      return `driver ${msg.payload.driverId} at ${msg.payload.latitude},${msg.payload.longitude}`;
    case "eta_update":
      return `ride ${msg.payload.rideId}: ${msg.payload.etaSeconds} s away`;
    case "notification":
      return `${msg.payload.title}: ${msg.payload.body}`;
    case "order_status":
      return `order ${msg.payload.orderId} is ${msg.payload.status}`;
    default: {
      const unknownType: never = msg; // a new server message type would not compile here
      return String(unknownType);
    }
  }
}

client.on("message", (msg) => console.log(describe(msg)));
client.on("disconnected", ({ code, reason, willRetry, delayMs }) =>
  console.log(`closed ${code} ${reason}`, willRetry ? `(retrying in ${Math.round(delayMs ?? 0)} ms)` : ""),
);
client.on("resync", () => console.log("missed messages are gone: re-read rides from the services"));

// Accept every offer; the receipt for it is sent by the client once this handler has finished.
client.on("ride_request", async (offer) => {
  try {
    await client.send("dispatch_response", { requestId: offer.payload.requestId, action: "accept" }, { id: `dr-${offer.payload.requestId}` });
  } catch (error) {
    if (error instanceof GatewayError) console.log(`accept failed: ${error.code}`);
  }
});

const connected = await client.connect();
console.log(`resuming from ${JSON.stringify(client.resumePosition)} on ${connected.serverId}`);

setInterval(() => {
  client.send("location_update", { latitude: 12.9716, longitude: 77.5946, timestamp: Date.now(), isAvailable: true });
}, 5_000);
