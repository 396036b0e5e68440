// Reconnect delays: exponential backoff with "full jitter" (a uniformly random delay in
// [0, min(cap, base * 2^attempt)]), so that thousands of apps dropped at once by the same
// network event or deploy do not come back in lockstep.

export interface BackoffOptions {
  /** The ceiling of the first delay (ms); doubles with every failed attempt. Default 500. */
  baseMs: number;
  /** The largest ceiling (ms). Default 30 000. */
  capMs: number;
}

export const DEFAULT_BACKOFF: BackoffOptions = { baseMs: 500, capMs: 30_000 };

/** The ceiling of the delay before attempt number `attempt` (0 = the first retry). */
export function backoffCeiling(attempt: number, options: BackoffOptions): number {
  // 2 ** attempt stays finite for any attempt count we can reach; Math.min keeps it at the cap.
  return Math.min(options.capMs, options.baseMs * 2 ** Math.min(attempt, 52));
}

/** A uniformly random delay in [0, ceiling]. */
export function fullJitter(attempt: number, options: BackoffOptions, random: () => number = Math.random): number {
  return random() * backoffCeiling(attempt, options);
}

/** Counts failed attempts since the last success. */
export class Backoff {
  attempt = 0;

  constructor(
    private readonly options: BackoffOptions = DEFAULT_BACKOFF,
    private readonly random: () => number = Math.random,
  ) {}

  /** The delay before the next attempt; counts the attempt. */
  next(): number {
    const delay = fullJitter(this.attempt, this.options, this.random);
    this.attempt += 1;
    return delay;
  }

  reset(): void {
    this.attempt = 0;
  }
}
