// What to do when a connection ends, by close code (docs/PROTOCOL.md, "Close codes"). Pure, so
// the rules can be read and tested on their own.
import { type BackoffOptions, fullJitter } from "./backoff.js";

export interface ThrottledBackoffOptions extends BackoffOptions {
  /** Always waited at least this long (ms) after 4429 or 1013, plus a full-jitter delay. */
  minMs: number;
}

export interface ReconnectPolicy {
  /** Ordinary failures: network loss (1006), 1011, 4408, 4503, a failed attempt. */
  backoff: BackoffOptions;
  /** After 4429 (rate limited, too many devices) and 1013 (instance full). */
  throttled: ThrottledBackoffOptions;
  /** After 1001 (instance shutting down): a random delay in [0, goingAwayMaxMs]. */
  goingAwayMaxMs: number;
  /** Consecutive 4401s (each followed by a fresh token) before giving up. */
  maxAuthFailures: number;
}

export const DEFAULT_POLICY: ReconnectPolicy = {
  backoff: { baseMs: 500, capMs: 30_000 },
  throttled: { minMs: 2_000, baseMs: 5_000, capMs: 60_000 },
  goingAwayMaxMs: 1_000,
  maxAuthFailures: 3,
};

export interface CloseContext {
  code: number;
  /** Failed attempts since the last `connected` (0 for the first failure). */
  attempt: number;
  /** Whether a token provider can be asked for a fresh token. */
  canRefreshToken: boolean;
  /** Consecutive 4401 closes since the last `connected`, this one included. */
  authFailures: number;
}

export type ReconnectDecision =
  | { retry: false; why: string }
  | { retry: true; delayMs: number; freshToken: boolean };

export const CLOSE_INVALID_PARAMS = 4400;
export const CLOSE_AUTH_FAILED = 4401;
export const CLOSE_REPLACED = 4409;
export const CLOSE_RATE_LIMITED = 4429;
export const CLOSE_GOING_AWAY = 1001;
export const CLOSE_TRY_AGAIN_LATER = 1013;

export function decideReconnect(
  context: CloseContext,
  policy: ReconnectPolicy = DEFAULT_POLICY,
  random: () => number = Math.random,
): ReconnectDecision {
  const { code, attempt } = context;
  switch (code) {
    case CLOSE_INVALID_PARAMS:
      return { retry: false, why: "the gateway refused the connection parameters (4400): fix the request" };
    case CLOSE_REPLACED:
      return { retry: false, why: "replaced by a newer connection of this user and device (4409)" };
    case CLOSE_AUTH_FAILED:
      if (!context.canRefreshToken) {
        return { retry: false, why: "the token was refused (4401) and there is no token provider to get a fresh one" };
      }
      if (context.authFailures >= policy.maxAuthFailures) {
        return { retry: false, why: `fresh tokens were refused ${context.authFailures} times in a row (4401)` };
      }
      return { retry: true, delayMs: fullJitter(attempt, policy.backoff, random), freshToken: true };
    case CLOSE_RATE_LIMITED:
    case CLOSE_TRY_AGAIN_LATER:
      return {
        retry: true,
        delayMs: policy.throttled.minMs + fullJitter(attempt, policy.throttled, random),
        freshToken: false,
      };
    case CLOSE_GOING_AWAY:
      return { retry: true, delayMs: random() * policy.goingAwayMaxMs, freshToken: false };
    default:
      return { retry: true, delayMs: fullJitter(attempt, policy.backoff, random), freshToken: false };
  }
}
