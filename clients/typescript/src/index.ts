// @tornado-gateway/client: a typed client for the tornado-gateway WebSocket protocol.
export {
  GatewayClient,
  type ClientEvents,
  type ClientState,
  type DisconnectedEvent,
  type GatewayClientOptions,
  type GatewayEvents,
  type ResyncEvent,
  type SendOptions,
  type TokenSource,
} from "./client.js";
export { GatewayError } from "./errors.js";
export { Backoff, backoffCeiling, DEFAULT_BACKOFF, fullJitter, type BackoffOptions } from "./backoff.js";
export {
  DEFAULT_POLICY,
  decideReconnect,
  type CloseContext,
  type ReconnectDecision,
  type ReconnectPolicy,
  type ThrottledBackoffOptions,
} from "./reconnect.js";
export { ConnectionSeqs, ResumeTracker, type ResumePosition, type ResumeStore } from "./resume.js";
export { decodeJwtPayload, tokenExpiresAt } from "./jwt.js";
export { buildConnectUrl, connectProtocols, SUBPROTOCOL, type ConnectParams, type TokenTransport } from "./url.js";
export type { EmitOutcome, Handler } from "./emitter.js";
export type * from "./types.js";
export type * from "./messages.js";
