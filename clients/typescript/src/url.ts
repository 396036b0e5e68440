// How a connection is opened: the URL and the subprotocols, the one place that decides how the
// token travels. By default as the subprotocol `bearer.<JWT>` next to `tornado-gateway`
// (docs/PROTOCOL.md, "Connecting"): a browser cannot set an Authorization header, and a token in
// the URL ends up in proxy access logs. `tokenTransport: "query"` puts it in `?token=` instead
// (gateways before the subprotocol addition), and so does a token with characters a subprotocol
// name cannot hold (a JWT never has them).
import type { ResumePosition } from "./resume.js";
import type { Platform, UserType } from "./types.js";

export type TokenTransport = "subprotocol" | "query";

export const SUBPROTOCOL = "tornado-gateway";
const SUBPROTOCOL_SAFE = /^[A-Za-z0-9!#$%&'*+.^_`|~-]+$/;

export interface ConnectParams {
  token: string;
  /** Default "subprotocol". */
  tokenTransport?: TokenTransport;
  userType: UserType;
  deviceId: string;
  platform: Platform;
  /** Where to resume from (since=<seq>&epoch=<epoch>), or null for a fresh start. */
  resumeFrom: ResumePosition | null;
}

/**
 * `ws://host:4010` and `ws://host:4010/` get the gateway's `/ws` path; a URL with another path
 * (`wss://example.com/gateway/ws`) is used as it is.
 */
export function buildConnectUrl(base: string, params: ConnectParams): string {
  let url = base;
  const hash = url.indexOf("#");
  if (hash >= 0) url = url.slice(0, hash);
  const scheme = url.indexOf("://");
  const pathStart = url.indexOf("/", scheme >= 0 ? scheme + 3 : 0);
  const queryStart = url.indexOf("?");
  const path = pathStart < 0 || (queryStart >= 0 && pathStart > queryStart) ? "" : url.slice(pathStart, queryStart >= 0 ? queryStart : undefined);
  if (path === "" || path === "/") {
    const head = queryStart >= 0 ? url.slice(0, queryStart) : url;
    const query = queryStart >= 0 ? url.slice(queryStart) : "";
    url = `${head.replace(/\/$/, "")}/ws${query}`;
  }
  const query: [string, string][] = tokenInSubprotocol(params) ? [] : [["token", params.token]];
  query.push(
    ["userType", params.userType],
    ["deviceId", params.deviceId],
    ["platform", params.platform],
  );
  if (params.resumeFrom !== null) {
    query.push(["since", String(params.resumeFrom.seq)], ["epoch", params.resumeFrom.epoch]);
  }
  const encoded = query.map(([k, v]) => `${k}=${encodeURIComponent(v)}`).join("&");
  return `${url}${url.includes("?") ? "&" : "?"}${encoded}`;
}

function tokenInSubprotocol(params: ConnectParams): boolean {
  return (params.tokenTransport ?? "subprotocol") === "subprotocol" && SUBPROTOCOL_SAFE.test(params.token);
}

/** The subprotocols to offer: the server selects `tornado-gateway` and never echoes the token. */
export function connectProtocols(params: ConnectParams): string[] {
  return tokenInSubprotocol(params) ? [SUBPROTOCOL, `bearer.${params.token}`] : [];
}
