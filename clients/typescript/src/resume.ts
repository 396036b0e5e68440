// Resuming without gaps (PROTOCOL.md section 7): the client keeps the user's history `epoch`
// (from `connected`) and the `seq` of the last recorded message its app handled, reconnects
// with since=<seq>&epoch=<epoch>, and drops what a recovered replay sends again (by seq).
// Within one connection recorded seqs only go up (PROTOCOL 7.2): one that does not means the
// user's history started again under a new epoch (ConnectionSeqs).
import type { ConnectedPayload } from "./messages.js";

export interface ResumePosition {
  epoch: string;
  seq: number;
}

/**
 * Optional persistence, so an app resumes across restarts too (localStorage, AsyncStorage, a
 * file). `save` is awaited after each recorded message is handled; keep it cheap.
 */
export interface ResumeStore {
  load(): Promise<ResumePosition | null>;
  save(epoch: string, seq: number): Promise<void>;
}

export interface ConnectedOutcome {
  /** The gateway could not replay what was missed: the app must re-read its state. */
  resync: boolean;
  previous: ResumePosition | null;
}

/**
 * The recorded seqs of one connection. The gateway sends them strictly increasing, each once
 * (PROTOCOL 7.2), starting above a baseline: the `since` resumed from when `connected` says
 * `recovered: true` (the replay starts at since + 1), else `connected`'s `seq` (0 when absent).
 * A seq not above the previous one (or the baseline) means the user's history started again
 * while connected: it expired HISTORY_TTL after the last record, or Redis lost it.
 */
export class ConnectionSeqs {
  #last: number;

  private constructor(
    /** A resume the gateway recovered: its replay may repeat what an earlier connection delivered. */
    readonly recovered: boolean,
    baseline: number,
  ) {
    this.#last = baseline;
  }

  static fromConnected(payload: ConnectedPayload, resumedFrom: ResumePosition | null): ConnectionSeqs {
    const recovered = resumedFrom !== null && payload.recovered === true && payload.epoch === resumedFrom.epoch;
    const seq = typeof payload.seq === "number" && Number.isSafeInteger(payload.seq) ? payload.seq : 0;
    return new ConnectionSeqs(recovered, recovered && resumedFrom !== null ? resumedFrom.seq : seq);
  }

  /** Records `seq`; true when it restarts the history (not above the previous one). */
  restarts(seq: number): boolean {
    const restart = seq <= this.#last;
    this.#last = seq;
    return restart;
  }
}

export class ResumeTracker {
  #position: ResumePosition | null = null;

  get position(): ResumePosition | null {
    return this.#position === null ? null : { ...this.#position };
  }

  /** A position loaded from a store; ignored unless well-formed. */
  restore(position: ResumePosition | null): void {
    if (
      position !== null &&
      typeof position === "object" &&
      typeof position.epoch === "string" &&
      position.epoch !== "" &&
      Number.isSafeInteger(position.seq) &&
      position.seq >= 0
    ) {
      this.#position = { epoch: position.epoch, seq: position.seq };
    }
  }

  /**
   * The `connected` frame of a connection opened with `resumedFrom` (null: no since/epoch sent).
   * Recovered: keep counting (the missed messages follow). Otherwise start from the user's
   * current seq under the (maybe new) epoch.
   */
  onConnected(payload: ConnectedPayload, resumedFrom: ResumePosition | null): ConnectedOutcome {
    const previous = this.position;
    if (resumedFrom !== null && payload.recovered === true && payload.epoch === resumedFrom.epoch) {
      if (this.#position === null) this.#position = { ...resumedFrom };
      return { resync: false, previous };
    }
    this.#position =
      typeof payload.epoch === "string" ? { epoch: payload.epoch, seq: typeof payload.seq === "number" ? payload.seq : 0 } : null;
    return { resync: resumedFrom !== null, previous };
  }

  /**
   * True for a recorded message the app has already handled. Only meaningful for the replay of a
   * recovered resume (it may repeat what the connection before delivered): within one connection
   * a seq that does not go up is a history restart (ConnectionSeqs), not a duplicate.
   */
  isDuplicate(seq: number): boolean {
    return this.#position !== null && seq <= this.#position.seq;
  }

  /**
   * The history started again and the app handled its recorded message `seq`: count from it. The
   * new epoch is unknown (recorded messages carry none), so the old epoch string is kept: the next
   * reconnect resumes with it and the gateway answers `recovered: false` (another resync, then
   * the new epoch). Returns false when there is no position.
   */
  rebase(seq: number): boolean {
    if (this.#position === null) return false;
    this.#position = { epoch: this.#position.epoch, seq };
    return true;
  }

  /** The app handled the recorded message `seq`; returns false when there is no epoch to count under. */
  advance(seq: number): boolean {
    if (this.#position === null || seq <= this.#position.seq) return false;
    this.#position = { epoch: this.#position.epoch, seq };
    return true;
  }
}
