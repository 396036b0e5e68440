// A WebSocket stand-in the test drives by hand, for the client's logic in isolation (timing,
// duplicates, close codes). Everything that talks to a real gateway is in the other test files.
import type { WebSocketConstructor, WebSocketLike } from "../index.js";

export class FakeSocket implements WebSocketLike {
  readyState = 0;
  readonly sent: { type: string; payload: Record<string, unknown>; id?: string }[] = [];
  onopen: ((event: unknown) => void) | null = null;
  onmessage: ((event: unknown) => void) | null = null;
  onerror: ((event: unknown) => void) | null = null;
  onclose: ((event: unknown) => void) | null = null;
  closedWith: { code?: number; reason?: string } | null = null;

  constructor(readonly url: string, readonly protocols: string[] = []) {}

  get query(): URLSearchParams {
    return new URL(this.url).searchParams;
  }

  /** The token the client sent, wherever it put it (the bearer subprotocol or `?token=`). */
  get token(): string | null {
    const bearer = this.protocols.find((p) => p.startsWith("bearer."));
    return bearer !== undefined ? bearer.slice("bearer.".length) : this.query.get("token");
  }

  send(data: string): void {
    if (this.readyState !== 1) throw new Error("not open");
    this.sent.push(JSON.parse(data));
  }

  close(code?: number, reason?: string): void {
    this.closedWith = { code, reason };
    if (this.readyState === 3) return;
    this.readyState = 3;
    setTimeout(() => this.onclose?.({ code: code ?? 1005, reason: reason ?? "" }), 0);
  }

  // --- what the "server" does ---
  open(): void {
    this.readyState = 1;
    this.onopen?.({});
  }

  receive(message: object): void {
    this.onmessage?.({ data: JSON.stringify(message) });
  }

  connected(payload: Record<string, unknown> = {}): void {
    if (this.readyState === 0) this.open();
    this.receive({
      type: "connected",
      id: "c-1",
      timestamp: Date.now(),
      payload: {
        connectionId: "conn",
        serverId: "srv",
        userId: "u1",
        userType: "driver",
        deviceId: "d1",
        platform: "ios",
        heartbeatInterval: 30_000,
        ...payload,
      },
    });
  }

  serverClose(code: number, reason = ""): void {
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }
}

/** A WebSocket class whose instances the test can reach. */
export function fakeWebSocket(): { WebSocket: WebSocketConstructor; sockets: FakeSocket[] } {
  const sockets: FakeSocket[] = [];
  class Fake extends FakeSocket {
    constructor(url: string, protocols?: string[]) {
      super(url, protocols);
      sockets.push(this);
    }
  }
  return { WebSocket: Fake, sockets };
}
