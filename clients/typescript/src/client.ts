// GatewayClient: one app's connection to the gateway, kept alive across network changes,
// deploys and token expiry. Protocol: docs/PROTOCOL.md (and /shared PROTOCOL sections 1-3, 7).
import { type BackoffOptions } from "./backoff.js";
import { type EmitOutcome, Emitter, type Handler } from "./emitter.js";
import { GatewayError } from "./errors.js";
import { tokenExpiresAt } from "./jwt.js";
import type { AckMessage, ConnectedMessage, ConnectedPayload, ErrorPayload, ServerMessage } from "./messages.js";
import {
  CLOSE_AUTH_FAILED,
  CLOSE_GOING_AWAY,
  DEFAULT_POLICY,
  decideReconnect,
  type ReconnectPolicy,
  type ThrottledBackoffOptions,
} from "./reconnect.js";
import { ConnectionSeqs, type ResumePosition, type ResumeStore, ResumeTracker } from "./resume.js";
import type {
  ClientMessageType,
  ClientPayloadOf,
  Platform,
  ServerMessageOf,
  ServerMessageType,
  UserType,
  WebSocketConstructor,
  WebSocketLike,
} from "./types.js";
import { buildConnectUrl, connectProtocols, type TokenTransport } from "./url.js";

/** A token, or a function that fetches a fresh one (called at connect, after 4401, and before `exp`). */
export type TokenSource = string | (() => string | Promise<string>);

export interface GatewayClientOptions {
  /** The gateway: `wss://gateway.example.com` (the `/ws` path is added when the URL has none). */
  url: string;
  token: TokenSource;
  userType: UserType;
  deviceId: string;
  platform: Platform;
  /** The WebSocket class; default `globalThis.WebSocket`. */
  WebSocket?: WebSocketConstructor;
  /** How the token travels: "subprotocol" (default: `bearer.<JWT>`, never in the URL, so never in
   * proxy logs) or "query" (`?token=`, for gateways older than the subprotocol addition). */
  tokenTransport?: TokenTransport;
  /** Persists the resume position (epoch, seq) across app restarts; kept in memory regardless. */
  resumeStore?: ResumeStore;
  /** How long `send(..., {id})` waits for its `ack` or `error` (ms). Default 10 000. */
  ackTimeoutMs?: number;
  /** A connection without its `connected` frame this long after it was started is dropped and retried (ms). Default 10 000. */
  connectTimeoutMs?: number;
  /** Ordinary reconnects: full jitter in [0, min(capMs, baseMs * 2^n)]. Default 500 / 30 000 ms. */
  backoff?: Partial<BackoffOptions>;
  /** After 4429 and 1013: minMs + full jitter. Default 2 000 + [0, min(60 000, 5 000 * 2^n)] ms. */
  throttledBackoff?: Partial<ThrottledBackoffOptions>;
  /** After 1001 (a deploy): a random delay in [0, goingAwayMaxMs]. Default 1 000 ms. */
  goingAwayMaxMs?: number;
  /** The socket counts as dead after this many heartbeat intervals without any frame. Default 2. */
  deadAfterHeartbeats?: number;
  /** Refresh the token this long before `exp` (at most a fifth of its lifetime). Default 60 000 ms. */
  tokenRefreshLeadMs?: number;
  /**
   * Send `receipt` for messages that ask for one, once their handlers ran: only when at least one
   * handler (of the message's type, or "message") ran and none threw. Default true.
   */
  autoReceipts?: boolean;
  /** For tests: the random source of the jitter. */
  random?: () => number;
}

export type ClientState = "idle" | "connecting" | "connected" | "reconnecting" | "closed";

export interface DisconnectedEvent {
  code: number;
  reason: string;
  /** False after close(), 4400, 4409, a refused token that cannot be refreshed. */
  willRetry: boolean;
  /** When willRetry: the wait before the next attempt (ms). */
  delayMs?: number;
}

export interface ResyncEvent {
  /**
   * `not_recovered`: the gateway answered a resume with `recovered: false`. `history_reset`: a
   * recorded seq did not go up on one connection, so the user's history started again (it expired
   * HISTORY_TTL after the last record, or Redis lost it) under a new epoch; the message that showed
   * it is handled right after this event.
   */
  reason: "not_recovered" | "history_reset";
  /** not_recovered: the position the client asked to resume from; history_reset: the position before. */
  previous: ResumePosition | null;
  /**
   * Where it counts from now, or null without recording. not_recovered: the user's current epoch
   * and seq. history_reset: the old epoch string (the new one is not known until the next
   * `connected`, so the next reconnect gets `recovered: false` and another resync) with the seq
   * of the message that started the new history.
   */
  current: ResumePosition | null;
}

/** The client's own events; the server's messages are events too, under their `type`. */
export interface ClientEvents {
  connecting: { attempt: number };
  disconnected: DisconnectedEvent;
  /**
   * Messages may have been missed: re-read state from the services. The gateway could not replay
   * what was missed (`recovered: false`), or the user's history started again while connected.
   */
  resync: ResyncEvent;
  /** Every server message, after its typed handlers. */
  message: ServerMessage;
  receipt_sent: { messageId: string };
  token_refreshed: { expiresAt: number | null };
  state: ClientState;
  /** Something went wrong that the client handles itself (a throwing handler, a failing token provider or store). */
  client_error: Error;
}

export type GatewayEvents = { [K in ServerMessageType]: ServerMessageOf<K> } & ClientEvents;

export interface SendOptions {
  /** The message id (1-128 characters); generated when missing. */
  id?: string;
  /** Overrides ackTimeoutMs for this message. */
  timeoutMs?: number;
}

interface PendingAck {
  /** Sent by the client itself (token refreshes): its ack is not shown to the app. */
  internal: boolean;
  resolve: (ack: AckMessage) => void;
  reject: (error: GatewayError) => void;
  timer: ReturnType<typeof setTimeout>;
}

/** One WebSocket attempt, from its creation to its end. */
interface Attempt {
  socket: WebSocketLike;
  resumedFrom: ResumePosition | null;
  opened: boolean;
  connected: boolean;
  ended: boolean;
  heartbeatMs: number;
  lastFrameAt: number;
  lastError: ErrorPayload | null;
  /** Its recorded seqs, from its `connected` on (null before). */
  seqs: ConnectionSeqs | null;
  timers: Set<ReturnType<typeof setTimeout>>;
  onEnd: (() => void) | null;
  /** The reason given to close(), reported when the gateway's close frame echoes none. */
  closeReason: string;
}

const OPEN = 1;
const SERVICE_CONTROL = new Set(["heartbeat", "ack", "error"]);

function asError(value: unknown): Error {
  return value instanceof Error ? value : new Error(String(value));
}

export class GatewayClient {
  readonly #options: GatewayClientOptions;
  readonly #policy: ReconnectPolicy;
  readonly #random: () => number;
  readonly #events: Emitter<GatewayEvents>;
  readonly #resume = new ResumeTracker();
  readonly #pending = new Map<string, PendingAck>();
  readonly #idPrefix = `c${Math.random().toString(36).slice(2, 8)}`;
  #nextId = 0;

  #state: ClientState = "idle";
  #stopped = true;
  #run = 0; // bumped by connect() and close(): an #open() of an earlier run gives up
  #current: Attempt | null = null;
  #retryTimer: ReturnType<typeof setTimeout> | null = null;
  #failures = 0; // failed attempts since the last `connected`
  #authFailures = 0; // 4401s in a row since the last `connected`
  #connection: ConnectedPayload | null = null;
  #waiters: { resolve: (payload: ConnectedPayload) => void; reject: (error: Error) => void }[] = [];

  #token: string | null = null;
  #tokenObtainedAt = 0;
  #tokenStale = false;
  #refreshTimer: ReturnType<typeof setTimeout> | null = null;
  #refreshing = false;

  #storeLoaded: Promise<void> | null = null;
  #queue: Promise<void> = Promise.resolve();
  #receiptOutbox: string[] = [];

  constructor(options: GatewayClientOptions) {
    this.#options = options;
    this.#random = options.random ?? Math.random;
    this.#policy = {
      backoff: { ...DEFAULT_POLICY.backoff, ...options.backoff },
      throttled: { ...DEFAULT_POLICY.throttled, ...options.throttledBackoff },
      goingAwayMaxMs: options.goingAwayMaxMs ?? DEFAULT_POLICY.goingAwayMaxMs,
      maxAuthFailures: DEFAULT_POLICY.maxAuthFailures,
    };
    this.#events = new Emitter<GatewayEvents>((error, type) => {
      if (type === "client_error") {
        if (typeof console !== "undefined") console.error("gateway client: a client_error handler threw", error);
        return;
      }
      this.#report(asError(error));
    });
    if (typeof options.token === "string") this.#setToken(options.token);
  }

  /** idle, connecting, connected, reconnecting (waiting to retry) or closed. */
  get state(): ClientState {
    return this.#state;
  }

  /** The payload of the current connection's `connected` frame, or null while not connected. */
  get connection(): ConnectedPayload | null {
    return this.#state === "connected" ? this.#connection : null;
  }

  /** Where a reconnect would resume from: the user's epoch and the last recorded seq handled. */
  get resumePosition(): ResumePosition | null {
    return this.#resume.position;
  }

  /** Registers a handler; returns a function that removes it. Async handlers are awaited before the receipt. */
  on<K extends keyof GatewayEvents>(type: K, handler: Handler<GatewayEvents[K]>): () => void {
    return this.#events.on(type, handler);
  }

  off<K extends keyof GatewayEvents>(type: K, handler: Handler<GatewayEvents[K]>): void {
    this.#events.off(type, handler);
  }

  /**
   * Starts connecting (and keeps the connection up until close()). Resolves with the first
   * `connected` payload; rejects when the client gives up before that (4400, 4409, a token that
   * cannot be fixed) or close() is called.
   */
  connect(): Promise<ConnectedPayload> {
    if (this.#state === "connected" && this.#connection !== null) return Promise.resolve(this.#connection);
    const connected = new Promise<ConnectedPayload>((resolve, reject) => this.#waiters.push({ resolve, reject }));
    if (this.#stopped) {
      this.#stopped = false;
      this.#run += 1;
      this.#failures = 0;
      this.#authFailures = 0;
      void this.#open();
    }
    return connected;
  }

  /**
   * Closes the connection for good (no reconnect). Resolves once the socket has closed (at
   * most about 2 s). Messages still waiting for an ack are rejected with `CLOSED`.
   */
  close(code = 1000, reason = "client closed"): Promise<void> {
    this.#stopped = true;
    this.#run += 1;
    this.#clearRetry();
    this.#clearRefresh();
    this.#rejectWaiters(new GatewayError("CLOSED", "close() was called"));
    this.#rejectPending("CLOSED", "close() was called");
    const attempt = this.#current;
    if (attempt === null || attempt.ended) {
      this.#setState("closed");
      return Promise.resolve();
    }
    return new Promise<void>((resolve) => {
      attempt.onEnd = resolve;
      attempt.closeReason = reason;
      try {
        attempt.socket.close(code, reason);
      } catch {
        // already closing
      }
      // A socket whose peer is gone never completes the close handshake: end it locally.
      this.#later(attempt, 2_000, () => this.#lost(attempt, code, reason));
    });
  }

  /**
   * Sends a client message. Without options: fire and forget; returns false when there is no
   * connected socket (nothing was sent). With options (`{}` or `{id}`): resolves with the `ack`
   * for its id, rejects with a GatewayError on the `error` that refers to it, on a timeout, or
   * when the connection is lost first.
   */
  send<K extends ClientMessageType>(type: K, payload: ClientPayloadOf<K>): boolean;
  send<K extends ClientMessageType>(type: K, payload: ClientPayloadOf<K>, options: SendOptions): Promise<AckMessage>;
  send<K extends ClientMessageType>(
    type: K,
    payload: ClientPayloadOf<K>,
    options?: SendOptions,
  ): boolean | Promise<AckMessage> {
    if (options === undefined) {
      const attempt = this.#current;
      return attempt !== null && attempt.connected && this.#write(attempt, { type, payload });
    }
    return this.#request(type, payload, options, false);
  }

  // --- connecting --------------------------------------------------------------------------

  async #open(): Promise<void> {
    this.#retryTimer = null;
    const run = this.#run;
    this.#setState("connecting");
    void this.#events.emit("connecting", { attempt: this.#failures });
    let token: string;
    try {
      await this.#loadStore();
      token = await this.#tokenForConnect();
    } catch (error) {
      if (this.#stopped || run !== this.#run) return;
      this.#report(asError(error));
      this.#scheduleRetry(1006, `could not get a token: ${asError(error).message}`, null);
      return;
    }
    if (this.#stopped || run !== this.#run) return;
    const Ctor =
      this.#options.WebSocket ?? (globalThis as unknown as { WebSocket?: WebSocketConstructor }).WebSocket;
    if (Ctor === undefined) {
      this.#stopped = true;
      this.#setState("closed");
      this.#rejectWaiters(new Error("no WebSocket: pass the WebSocket option (Node 20: run with --experimental-websocket)"));
      return;
    }
    const resumedFrom = this.#resume.position;
    const params = {
      token,
      tokenTransport: this.#options.tokenTransport,
      userType: this.#options.userType,
      deviceId: this.#options.deviceId,
      platform: this.#options.platform,
      resumeFrom: resumedFrom,
    };
    const url = buildConnectUrl(this.#options.url, params);
    const protocols = connectProtocols(params);
    let socket: WebSocketLike;
    try {
      socket = protocols.length > 0 ? new Ctor(url, protocols) : new Ctor(url);
    } catch (error) {
      this.#report(asError(error));
      this.#scheduleRetry(1006, `could not open a WebSocket: ${asError(error).message}`, null);
      return;
    }
    const attempt: Attempt = {
      socket,
      resumedFrom,
      opened: false,
      connected: false,
      ended: false,
      heartbeatMs: 0,
      lastFrameAt: Date.now(),
      lastError: null,
      seqs: null,
      timers: new Set(),
      onEnd: null,
      closeReason: "",
    };
    this.#current = attempt;
    socket.onopen = () => {
      attempt.opened = true;
    };
    socket.onmessage = (event: { data?: unknown }) => this.#onFrame(attempt, event.data);
    socket.onerror = () => {
      // Browsers follow "error" with "close"; Node 20 fires no "close" for a connection that
      // failed before it opened. Either way the attempt ends once, with the close code if any.
      if (attempt.opened) this.#later(attempt, 1_000, () => this.#lost(attempt, 1006, "connection error"));
      else this.#lost(attempt, 1006, "connection failed");
    };
    socket.onclose = (event: { code?: number; reason?: string }) =>
      this.#lost(attempt, typeof event.code === "number" ? event.code : 1006, event.reason ?? "");
    const connectTimeoutMs = this.#options.connectTimeoutMs ?? 10_000;
    this.#later(attempt, connectTimeoutMs, () => {
      if (!attempt.connected) this.#abandon(attempt, `no connected frame within ${connectTimeoutMs} ms`);
    });
  }

  async #loadStore(): Promise<void> {
    const store = this.#options.resumeStore;
    if (store === undefined) return;
    this.#storeLoaded ??= store.load().then(
      (position) => this.#resume.restore(position),
      (error: unknown) => {
        this.#storeLoaded = null; // try again at the next connect
        this.#report(asError(error));
      },
    );
    await this.#storeLoaded;
  }

  /** A token good for a new connection: the provider is asked when there is none, after 4401, and near `exp`. */
  async #tokenForConnect(): Promise<string> {
    const source = this.#options.token;
    if (typeof source === "string") return source;
    if (this.#token === null || this.#tokenStale || this.#expiresSoon()) {
      this.#setToken(await source());
    }
    return this.#token as string;
  }

  #setToken(token: string): void {
    this.#token = token;
    this.#tokenObtainedAt = Date.now();
    this.#tokenStale = false;
  }

  /** How long before `exp` a fresh token is wanted: tokenRefreshLeadMs, at most a fifth of its lifetime. */
  #refreshLead(expiresAt: number): number {
    const lifetime = Math.max(0, expiresAt - this.#tokenObtainedAt);
    return Math.min(this.#options.tokenRefreshLeadMs ?? 60_000, lifetime / 5);
  }

  #expiresSoon(): boolean {
    if (this.#token === null) return true;
    const expiresAt = tokenExpiresAt(this.#token);
    return expiresAt !== null && expiresAt - Date.now() <= this.#refreshLead(expiresAt);
  }

  // --- frames ------------------------------------------------------------------------------

  #onFrame(attempt: Attempt, data: unknown): void {
    if (attempt.ended) return;
    attempt.lastFrameAt = Date.now();
    let parsed: ServerMessage;
    try {
      parsed = JSON.parse(String(data)) as ServerMessage;
    } catch {
      this.#report(new Error("the gateway sent a frame that is not JSON"));
      return;
    }
    const message = parsed;
    if (message === null || typeof message !== "object" || typeof message.type !== "string") return;
    switch (message.type) {
      case "heartbeat":
        this.#write(attempt, { type: "heartbeat_ack", payload: { timestamp: message.payload?.timestamp } });
        break;
      case "ack": {
        const internal = this.#pending.get(message.payload?.id)?.internal === true;
        this.#settle(message.payload?.id, (pending) => pending.resolve(message));
        if (internal) return; // the client's own token_refresh
        break;
      }
      case "error":
        this.#onError(attempt, message.payload);
        break;
      case "connected":
        this.#onConnected(attempt, message);
        return;
      default: {
        const seq = "seq" in message && typeof message.seq === "number" ? message.seq : undefined;
        // Seen here, in arrival order, whatever the app's handlers are still busy with.
        const restarted = seq !== undefined && attempt.seqs !== null && attempt.seqs.restarts(seq);
        this.#enqueue(() => this.#deliver(message, attempt, restarted));
        return;
      }
    }
    // Control frames reach the app at once (not behind a slow handler of a service message).
    if (SERVICE_CONTROL.has(message.type)) void this.#emitMessage(message);
  }

  #onError(attempt: Attempt, payload: ErrorPayload): void {
    attempt.lastError = payload;
    if (payload.ref !== undefined) {
      const ref = payload.ref;
      this.#settle(ref, (pending) => pending.reject(new GatewayError(payload.code, payload.message, ref)));
    } else if (payload.code === "AUTH_FAILED" && attempt.connected) {
      // "token expired: send token_refresh ... within N s": refresh now if we can.
      void this.#refreshToken();
    }
  }

  #onConnected(attempt: Attempt, message: ConnectedMessage): void {
    const payload = message.payload;
    attempt.connected = true;
    attempt.seqs = ConnectionSeqs.fromConnected(payload, attempt.resumedFrom);
    attempt.heartbeatMs = typeof payload.heartbeatInterval === "number" ? payload.heartbeatInterval : 0;
    this.#failures = 0;
    this.#authFailures = 0;
    this.#connection = payload;
    this.#setState("connected");
    this.#watchLiveness(attempt);
    this.#scheduleRefresh();
    this.#enqueue(async () => {
      const outcome = this.#resume.onConnected(payload, attempt.resumedFrom);
      await this.#emitMessage(message);
      if (outcome.resync) {
        await this.#events.emit("resync", {
          reason: "not_recovered",
          previous: attempt.resumedFrom,
          current: this.#resume.position,
        });
      }
      await this.#saveResume();
      this.#flushReceipts();
      const waiters = this.#waiters;
      this.#waiters = [];
      for (const waiter of waiters) waiter.resolve(payload);
    });
  }

  /**
   * A service message: handlers first (awaited), then its receipt, then the resume position moves
   * on. `restarted`: its seq did not go up on its connection (the user's history started again):
   * resync first, then handled like any other.
   */
  async #deliver(message: ServerMessage, attempt: Attempt, restarted: boolean): Promise<void> {
    const seq = "seq" in message && typeof message.seq === "number" ? message.seq : undefined;
    if (seq !== undefined && restarted) {
      const previous = this.#resume.position;
      const current = previous === null ? null : { epoch: previous.epoch, seq };
      await this.#events.emit("resync", { reason: "history_reset", previous, current });
    } else if (seq !== undefined && attempt.seqs?.recovered === true && this.#resume.isDuplicate(seq)) {
      return; // handled already: queued or handled on the connection before, replayed on this one
    }
    const outcome = await this.#emitMessage(message);
    const handled = outcome.handlers > 0 && outcome.failures === 0; // someone showed it, nobody failed
    if (handled && "receipt" in message && message.receipt === true && this.#options.autoReceipts !== false) {
      this.#sendReceipt(message.id);
    }
    if (seq === undefined) return;
    if (restarted ? this.#resume.rebase(seq) : this.#resume.advance(seq)) await this.#saveResume();
  }

  async #emitMessage(message: ServerMessage): Promise<EmitOutcome> {
    const typed = await this.#events.emit(message.type, message as never);
    const all = await this.#events.emit("message", message);
    return { handlers: typed.handlers + all.handlers, failures: typed.failures + all.failures };
  }

  #enqueue(task: () => Promise<void>): void {
    this.#queue = this.#queue.then(task).catch((error: unknown) => this.#report(asError(error)));
  }

  async #saveResume(): Promise<void> {
    const store = this.#options.resumeStore;
    const position = this.#resume.position;
    if (store === undefined || position === null) return;
    try {
      await store.save(position.epoch, position.seq);
    } catch (error) {
      this.#report(asError(error));
    }
  }

  // --- receipts ----------------------------------------------------------------------------

  /**
   * Written once, without an id (no ack awaited, never repeated: Dispatch must not see one
   * receipt twice). Not connected at that moment: sent right after the next `connected`. A
   * receipt lost with its socket is what Dispatch's re-offer is for.
   */
  #sendReceipt(messageId: string): void {
    const attempt = this.#current;
    if (attempt !== null && attempt.connected && this.#write(attempt, { type: "receipt", payload: { messageId } })) {
      void this.#events.emit("receipt_sent", { messageId });
    } else {
      this.#queueReceipt(messageId);
    }
  }

  #queueReceipt(messageId: string): void {
    if (!this.#receiptOutbox.includes(messageId)) this.#receiptOutbox.push(messageId);
  }

  #flushReceipts(): void {
    const outbox = this.#receiptOutbox;
    this.#receiptOutbox = [];
    for (const messageId of outbox) this.#sendReceipt(messageId);
  }

  // --- requests and acks -------------------------------------------------------------------

  #request<K extends ClientMessageType>(
    type: K,
    payload: ClientPayloadOf<K>,
    options: SendOptions,
    internal: boolean,
  ): Promise<AckMessage> {
    const id = options.id ?? `${this.#idPrefix}-${++this.#nextId}`;
    const attempt = this.#current;
    if (attempt === null || !attempt.connected) {
      return Promise.reject(new GatewayError("NOT_CONNECTED", `not connected: ${type} was not sent`, id));
    }
    if (this.#pending.has(id)) {
      return Promise.reject(new GatewayError("DUPLICATE_ID", `a message with id ${id} is still waiting for its ack`, id));
    }
    return new Promise<AckMessage>((resolve, reject) => {
      const timeoutMs = options.timeoutMs ?? this.#options.ackTimeoutMs ?? 10_000;
      const timer = setTimeout(() => {
        this.#pending.delete(id);
        reject(new GatewayError("TIMEOUT", `no ack for ${type} ${id} within ${timeoutMs} ms`, id));
      }, timeoutMs);
      this.#pending.set(id, { internal, resolve, reject, timer });
      if (!this.#write(attempt, { type, payload, id })) {
        this.#settle(id, (pending) => pending.reject(new GatewayError("NOT_CONNECTED", `${type} could not be written`, id)));
      }
    });
  }

  #settle(id: string | undefined, action: (pending: PendingAck) => void): void {
    if (id === undefined) return;
    const pending = this.#pending.get(id);
    if (pending === undefined) return;
    this.#pending.delete(id);
    clearTimeout(pending.timer);
    action(pending);
  }

  #rejectPending(code: "DISCONNECTED" | "CLOSED", why: string): void {
    for (const id of [...this.#pending.keys()]) {
      this.#settle(id, (pending) => pending.reject(new GatewayError(code, why, id)));
    }
  }

  #write(attempt: Attempt, frame: { type: string; payload: unknown; id?: string }): boolean {
    if (attempt.ended || attempt.socket.readyState !== OPEN) return false;
    try {
      attempt.socket.send(JSON.stringify(frame));
      return true;
    } catch {
      return false;
    }
  }

  // --- liveness and token refresh ------------------------------------------------------------

  /** No frame for about two heartbeat intervals: the socket is dead even if it looks open. */
  #watchLiveness(attempt: Attempt): void {
    if (attempt.heartbeatMs <= 0) return;
    const deadAfterMs = attempt.heartbeatMs * (this.#options.deadAfterHeartbeats ?? 2) + 250;
    const check = (): void => {
      const silentFor = Date.now() - attempt.lastFrameAt;
      if (silentFor >= deadAfterMs) this.#abandon(attempt, `no frame from the gateway for ${silentFor} ms`);
      else this.#later(attempt, deadAfterMs - silentFor, check);
    };
    attempt.lastFrameAt = Date.now();
    this.#later(attempt, deadAfterMs, check);
  }

  #scheduleRefresh(): void {
    this.#clearRefresh();
    if (typeof this.#options.token === "string" || this.#token === null) return;
    const expiresAt = tokenExpiresAt(this.#token);
    if (expiresAt === null) return;
    const delay = Math.max(0, expiresAt - this.#refreshLead(expiresAt) - Date.now());
    this.#refreshTimer = setTimeout(() => {
      this.#refreshTimer = null;
      void this.#refreshToken();
    }, delay);
  }

  #clearRefresh(): void {
    if (this.#refreshTimer !== null) clearTimeout(this.#refreshTimer);
    this.#refreshTimer = null;
  }

  /** A fresh token from the provider, sent in-band (`token_refresh`) so the connection stays up. */
  async #refreshToken(): Promise<void> {
    const source = this.#options.token;
    if (typeof source === "string" || this.#refreshing || this.#stopped) return;
    this.#refreshing = true;
    const attempt = this.#current;
    const previousExpiry = this.#token === null ? null : tokenExpiresAt(this.#token);
    try {
      let token: string;
      try {
        token = await source();
      } catch (error) {
        this.#report(asError(error));
        this.#retryRefreshSoon(attempt);
        return;
      }
      this.#setToken(token); // also what the next connect uses
      if (attempt === null || attempt !== this.#current || !attempt.connected) return;
      const expiresAt = tokenExpiresAt(token);
      try {
        await this.#request("token_refresh", { token }, {}, true);
      } catch (error) {
        this.#report(asError(error));
        if (error instanceof GatewayError && error.code === "AUTH_FAILED") this.#tokenStale = true;
        else this.#retryRefreshSoon(attempt);
        return;
      }
      void this.#events.emit("token_refreshed", { expiresAt });
      // A provider that keeps handing out the same token would make this loop: schedule only
      // when the new token lives longer; the gateway's 4401 then brings a reconnect instead.
      if (expiresAt !== null && (previousExpiry === null || expiresAt > previousExpiry)) this.#scheduleRefresh();
    } finally {
      this.#refreshing = false;
    }
  }

  #retryRefreshSoon(attempt: Attempt | null): void {
    if (attempt === null || attempt !== this.#current || attempt.ended) return;
    this.#clearRefresh();
    this.#refreshTimer = setTimeout(() => {
      this.#refreshTimer = null;
      void this.#refreshToken();
    }, 2_000);
  }

  // --- ending and reconnecting ---------------------------------------------------------------

  /** Gives up on a socket that is not answering: close it and treat it as lost right away. */
  #abandon(attempt: Attempt, reason: string): void {
    if (attempt.ended) return;
    try {
      attempt.socket.close(4000, "unresponsive");
    } catch {
      // never opened
    }
    this.#lost(attempt, 1006, reason);
  }

  #lost(attempt: Attempt, code: number, reason: string): void {
    if (attempt.ended) return;
    attempt.ended = true;
    for (const timer of attempt.timers) clearTimeout(timer);
    attempt.timers.clear();
    const socket = attempt.socket;
    socket.onopen = socket.onmessage = socket.onerror = socket.onclose = null;
    if (this.#current === attempt) this.#current = null;
    this.#clearRefresh();
    this.#rejectPending(this.#stopped ? "CLOSED" : "DISCONNECTED", `connection closed (${code})`);
    const onEnd = attempt.onEnd;
    attempt.onEnd = null;
    if (this.#stopped) {
      this.#setState("closed");
      void this.#events.emit("disconnected", { code, reason: reason || attempt.closeReason, willRetry: false });
      onEnd?.();
      return;
    }
    this.#scheduleRetry(code, reason, attempt);
  }

  #scheduleRetry(code: number, reason: string, attempt: Attempt | null): void {
    if (code === CLOSE_AUTH_FAILED) this.#authFailures += 1;
    const decision = decideReconnect(
      {
        code,
        attempt: this.#failures,
        canRefreshToken: typeof this.#options.token !== "string",
        authFailures: this.#authFailures,
      },
      this.#policy,
      this.#random,
    );
    if (!decision.retry) {
      this.#stopped = true;
      this.#setState("closed");
      void this.#events.emit("disconnected", { code, reason, willRetry: false });
      const error = attempt?.lastError;
      this.#rejectWaiters(
        error != null
          ? new GatewayError(error.code, error.message)
          : new GatewayError("DISCONNECTED", `${decision.why} (${code} ${reason})`),
      );
      return;
    }
    if (decision.freshToken) this.#tokenStale = true;
    if (code !== CLOSE_GOING_AWAY) this.#failures += 1; // a deploy is not a failure of this client
    this.#setState("reconnecting");
    this.#clearRetry();
    this.#retryTimer = setTimeout(() => void this.#open(), decision.delayMs);
    void this.#events.emit("disconnected", { code, reason, willRetry: true, delayMs: decision.delayMs });
  }

  #clearRetry(): void {
    if (this.#retryTimer !== null) clearTimeout(this.#retryTimer);
    this.#retryTimer = null;
  }

  #rejectWaiters(error: Error): void {
    const waiters = this.#waiters;
    this.#waiters = [];
    for (const waiter of waiters) waiter.reject(error);
  }

  /** A timer that belongs to one attempt and dies with it. */
  #later(attempt: Attempt, delayMs: number, action: () => void): void {
    if (attempt.ended) return;
    const timer = setTimeout(() => {
      attempt.timers.delete(timer);
      action();
    }, delayMs);
    attempt.timers.add(timer);
  }

  #setState(state: ClientState): void {
    if (this.#state === state) return;
    this.#state = state;
    void this.#events.emit("state", state);
  }

  #report(error: Error): void {
    void this.#events.emit("client_error", error);
  }
}
