// A small typed event emitter whose emit waits for async handlers (so the client can send a
// receipt, or move its resume position, only once the app has really handled a message).

export type Handler<T> = (event: T) => unknown;

/** What one emit did: how many handlers it called, and how many of them threw or rejected. */
export interface EmitOutcome {
  handlers: number;
  failures: number;
}

function isThenable(value: unknown): value is PromiseLike<unknown> {
  return (
    value !== null &&
    (typeof value === "object" || typeof value === "function") &&
    typeof (value as { then?: unknown }).then === "function"
  );
}

export class Emitter<Events extends object> {
  readonly #handlers = new Map<keyof Events, Set<Handler<never>>>();

  constructor(private readonly onHandlerError: (error: unknown, event: keyof Events) => void) {}

  on<K extends keyof Events>(type: K, handler: Handler<Events[K]>): () => void {
    let set = this.#handlers.get(type);
    if (set === undefined) {
      set = new Set();
      this.#handlers.set(type, set);
    }
    set.add(handler as Handler<never>);
    return () => this.off(type, handler);
  }

  off<K extends keyof Events>(type: K, handler: Handler<Events[K]>): void {
    this.#handlers.get(type)?.delete(handler as Handler<never>);
  }

  has(type: keyof Events): boolean {
    return (this.#handlers.get(type)?.size ?? 0) > 0;
  }

  /**
   * Calls every handler of `type` (in registration order, each started without waiting for the
   * previous one) and resolves once all have settled, with how many ran and how many failed
   * (threw or rejected). With no handler registered: `{handlers: 0, failures: 0}`.
   */
  async emit<K extends keyof Events>(type: K, event: Events[K]): Promise<EmitOutcome> {
    const set = this.#handlers.get(type);
    const outcome: EmitOutcome = { handlers: set?.size ?? 0, failures: 0 };
    if (set === undefined || set.size === 0) return outcome;
    const waits: PromiseLike<unknown>[] = [];
    for (const handler of [...set] as Handler<Events[K]>[]) {
      try {
        const result = handler(event);
        if (isThenable(result)) waits.push(result);
      } catch (error) {
        outcome.failures += 1;
        this.onHandlerError(error, type);
      }
    }
    for (const wait of waits) {
      try {
        await wait;
      } catch (error) {
        outcome.failures += 1;
        this.onHandlerError(error, type);
      }
    }
    return outcome;
  }
}
