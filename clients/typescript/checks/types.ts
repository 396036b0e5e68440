// Compile-time checks of the SDK's typing (npm run typecheck): each @ts-expect-error line must
// fail to compile, every other line must compile.
import { GatewayClient, type GatewayError } from "../src/index.js";

declare const client: GatewayClient;

client.on("ride_request", (m) => m.payload.requestId.toUpperCase());
client.on("connected", (m) => m.payload.heartbeatInterval + (m.payload.seq ?? 0));
client.on("error", (m) => m.payload.code === "FORBIDDEN");
client.on("disconnected", (e) => e.willRetry && e.code === 4409);
client.on("resync", (e) => e.current?.epoch);
client.on("ride_request", (m) => {
  // @ts-expect-error: requestId is a string
  const requestId: number = m.payload.requestId;
  return requestId;
});
client.on("eta_update", (m) => {
  // @ts-expect-error: an eta_update has no requestId
  const requestId: string = m.payload.requestId;
  return requestId;
});
// @ts-expect-error: not an event
client.on("ride_requests", () => undefined);

const sent: boolean = client.send("location_update", { latitude: 1, longitude: 2, timestamp: 3 });
const acked: Promise<{ type: "ack"; payload: { id: string } }> = client.send(
  "dispatch_response",
  { requestId: "r1", action: "accept" },
  { id: "dr-r1" },
);
// @ts-expect-error: action must be "accept" or "reject"
client.send("dispatch_response", { requestId: "r1", action: "maybe" });
// @ts-expect-error: location_update needs a timestamp
client.send("location_update", { latitude: 1, longitude: 2 });
// @ts-expect-error: ride_request is not a client message type
client.send("ride_request", { requestId: "r1" });

export function codeOf(error: GatewayError): string {
  switch (error.code) {
    case "FORBIDDEN":
    case "TIMEOUT":
    case "DISCONNECTED":
      return error.code;
    default:
      return "other";
  }
}
export { acked, sent };
