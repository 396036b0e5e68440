// A driver app's connection, in plain WebSocket API (browsers; Node 22+, or Node 20 with
// --experimental-websocket). Connects as a driver on iOS, answers heartbeats, streams its
// location, and prints what services push (a ride_request sent with POST /broadcast/user/{id}).
//
//   node --experimental-websocket examples/driver_client.js ws://localhost:4010 TOKEN [seconds]
//
// Reconnect with backoff on any close except 4400/4401 (fix the request) and 4409 (replaced).
const [url = "ws://localhost:4010", token = "", seconds = "0"] = process.argv.slice(2);
const params = new URLSearchParams({ token, userType: "driver", deviceId: "iphone-15-abc", platform: "ios" });
const ws = new WebSocket(`${url}/ws?${params}`);
let locationTimer = null;
let sent = 0;

ws.onmessage = (event) => {
  const message = JSON.parse(event.data);
  switch (message.type) {
    case "connected":
      console.log("connected", JSON.stringify(message.payload));
      locationTimer = setInterval(sendLocation, 200);
      break;
    case "heartbeat":
      ws.send(JSON.stringify({ type: "heartbeat_ack", payload: { timestamp: message.payload.timestamp } }));
      console.log("heartbeat answered");
      break;
    case "ack":
      console.log("ack", message.payload.id);
      break;
    case "ride_request":
      console.log("ride_request", JSON.stringify(message.payload));
      ws.send(JSON.stringify({ type: "dispatch_response", id: `dr-${message.payload.requestId}`,
                               payload: { requestId: message.payload.requestId, action: "accept" } }));
      break;
    case "error":
      console.log("error", message.payload.code, message.payload.message);
      break;
    default:
      console.log(message.type, JSON.stringify(message.payload));
  }
};

function sendLocation() {
  sent += 1;
  ws.send(JSON.stringify({
    type: "location_update", id: `loc-${sent}`,
    payload: { latitude: 12.9716 + sent * 1e-5, longitude: 77.5946, heading: 90, speed: 8.2,
               accuracy: 5, timestamp: Date.now(), isAvailable: true },
  }));
}

ws.onclose = (event) => {
  clearInterval(locationTimer);
  console.log("closed", event.code, event.reason);
};

if (Number(seconds) > 0) setTimeout(() => ws.close(1000, "done"), Number(seconds) * 1000);
