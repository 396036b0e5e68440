// Resuming without gaps (PROTOCOL.md section 7): the client keeps the user's history `epoch`
// (from `connected`) and the `seq` of the last recorded message its app handled, reconnects
// with since=<seq>&epoch=<epoch>, and drops whatever it already handled (by seq).
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

  /** True for a recorded message the app has already handled (a replay overlapping live delivery). */
  isDuplicate(seq: number): boolean {
    return this.#position !== null && seq <= this.#position.seq;
  }

  /** The app handled the recorded message `seq`; returns false when there is no epoch to count under. */
  advance(seq: number): boolean {
    if (this.#position === null || seq <= this.#position.seq) return false;
    this.#position = { epoch: this.#position.epoch, seq };
    return true;
  }
}
