// Type-level helpers over the generated message types (src/messages.ts, generated from
// schema/gateway.schema.json: never edit that file by hand).
import type { ClientMessage, ConnectedPayload, ErrorPayload, ServerMessage } from "./messages.js";

/** Every `type` the gateway can send. */
export type ServerMessageType = ServerMessage["type"];
/** The server message of one type: `ServerMessageOf<"ride_request">` is `RideRequestMessage`. */
export type ServerMessageOf<K extends ServerMessageType> = Extract<ServerMessage, { type: K }>;

/** Every `type` a client may send. */
export type ClientMessageType = ClientMessage["type"];
/** The payload of a client message type: `ClientPayloadOf<"location_update">` is `LocationUpdatePayload`. */
export type ClientPayloadOf<K extends ClientMessageType> = Extract<ClientMessage, { type: K }>["payload"];

/** What services push (ride_request, ...): the server messages other than the gateway's own control frames. */
export type PushedMessage = Exclude<ServerMessage, { type: "connected" | "heartbeat" | "ack" | "error" }>;
export type PushedMessageType = PushedMessage["type"];

export type UserType = ConnectedPayload["userType"];
export type Platform = ConnectedPayload["platform"];
/** The error codes the gateway sends in `error` frames. */
export type ServerErrorCode = ErrorPayload["code"];

/** What the client reports when it could not get an answer from the gateway at all. */
export type ClientErrorCode =
  | "TIMEOUT" // no ack or error within ackTimeoutMs
  | "DISCONNECTED" // the connection was lost before the ack (the message may or may not have reached Redis)
  | "NOT_CONNECTED" // there was no connected socket to send on
  | "CLOSED" // close() was called
  | "DUPLICATE_ID"; // a message with that id is still waiting for its ack

export type GatewayErrorCode = ServerErrorCode | ClientErrorCode;

/**
 * The minimal WebSocket surface the client uses: the WHATWG `WebSocket` of browsers, React
 * Native and Node 22+ (Node 20 with `--experimental-websocket`) all fit, and so does the `ws`
 * package's class.
 */
export interface WebSocketLike {
  readonly readyState: number;
  onopen: ((event: any) => void) | null; // eslint-disable-line @typescript-eslint/no-explicit-any
  onmessage: ((event: any) => void) | null; // eslint-disable-line @typescript-eslint/no-explicit-any
  onerror: ((event: any) => void) | null; // eslint-disable-line @typescript-eslint/no-explicit-any
  onclose: ((event: any) => void) | null; // eslint-disable-line @typescript-eslint/no-explicit-any
  send(data: string): void;
  close(code?: number, reason?: string): void;
}

export type WebSocketConstructor = new (url: string, protocols?: string[]) => WebSocketLike;
