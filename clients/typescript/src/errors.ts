import type { GatewayErrorCode } from "./types.js";

/**
 * A refused or unanswered message: `code` is the gateway's error code (`FORBIDDEN`,
 * `INVALID_MESSAGE`, `RATE_LIMITED`, `UNAVAILABLE`, ...) or one of the client's own
 * (`TIMEOUT`, `DISCONNECTED`, `NOT_CONNECTED`, `CLOSED`); `ref` is the id of the message it is about.
 */
export class GatewayError extends Error {
  readonly code: GatewayErrorCode;
  readonly ref: string | undefined;

  constructor(code: GatewayErrorCode, message: string, ref?: string) {
    super(message);
    this.name = "GatewayError";
    this.code = code;
    this.ref = ref;
  }
}
