// Real processes and sockets for the SDK's tests: a gateway (`python -m tornado_gateway`) on a
// loopback port, the shared Redis under a key prefix of this test file's own, HS256 tokens
// minted here, a TCP proxy that can go silent, and a tiny RESP client. Nothing is mocked.
import { type ChildProcess, spawn } from "node:child_process";
import { createHmac, randomBytes } from "node:crypto";
import { existsSync } from "node:fs";
import net from "node:net";
import { fileURLToPath } from "node:url";

import { after, before } from "node:test";
import { type ClientEvents, GatewayClient, type GatewayClientOptions, type GatewayEvents } from "../index.js";

/** The repository (clients/typescript/dist/test/ is four levels down); TSDK_REPO_ROOT overrides it. */
export const REPO_ROOT = process.env["TSDK_REPO_ROOT"] ?? fileURLToPath(new URL("../../../../", import.meta.url));
export const SECRET = "tsdk-test-secret-0123456789-0123456789-abcdef";
const REDIS_URL = process.env["TSDK_REDIS_URL"] ?? process.env["TEST_REDIS_URL"] ?? "redis://127.0.0.1:6379";

function python(): string {
  const fromEnv = process.env["TSDK_PYTHON"];
  if (fromEnv) return fromEnv;
  const venv = `${REPO_ROOT}.venv/bin/python`;
  return existsSync(venv) ? venv : "python3";
}

/** A Redis key prefix (and function-name prefix) for one test file: letters, digits and `_`. */
export function uniquePrefix(): string {
  return `tsdk_${randomBytes(5).toString("hex")}`;
}

export function unique(name: string): string {
  return `${name}-${randomBytes(5).toString("hex")}`;
}

export const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

/** Polls `check` until it returns a truthy value; fails with `what` after `timeoutMs`. */
export type Truthy<T> = Exclude<T, false | 0 | "" | null | undefined>;

export async function waitFor<T>(what: string, check: () => T | Promise<T>, timeoutMs = 5_000): Promise<Truthy<T>> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value) return value as Truthy<T>;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(20);
  }
}

function base64url(text: string): string {
  return Buffer.from(text).toString("base64url");
}

/** An HS256 JWT for `sub` as `userType`, valid for `ttlS` seconds. */
export function mintToken(sub: string, userType: string, options: { ttlS?: number; secret?: string } = {}): string {
  const now = Math.floor(Date.now() / 1000);
  const header = base64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const body = base64url(JSON.stringify({ sub, userType, iat: now, exp: now + (options.ttlS ?? 3600) }));
  const signature = createHmac("sha256", options.secret ?? SECRET).update(`${header}.${body}`).digest("base64url");
  return `${header}.${body}.${signature}`;
}

/** A loopback port nothing listens on, below the kernel's ephemeral range (so it stays free for a restart). */
export async function freePort(): Promise<number> {
  for (let i = 0; i < 200; i++) {
    const port = 20_000 + Math.floor(Math.random() * 12_768);
    const free = await new Promise<boolean>((resolve) => {
      const server = net.createServer();
      server.once("error", () => resolve(false));
      server.listen(port, "127.0.0.1", () => server.close(() => resolve(true)));
    });
    if (free) return port;
  }
  throw new Error("no free port");
}

const children = new Set<ChildProcess>();
process.on("exit", () => {
  for (const child of children) if (child.exitCode === null && child.pid !== undefined) process.kill(child.pid, "SIGKILL");
});

/** One `python -m tornado_gateway` process; `start()` again after `kill()` reuses the port. */
export class Gateway {
  readonly env: Record<string, string>;
  proc: ChildProcess | null = null;
  output = "";

  private constructor(readonly port: number, readonly prefix: string, env: Record<string, string>) {
    this.env = env;
  }

  static async start(prefix: string, env: Record<string, string> = {}): Promise<Gateway> {
    const gateway = new Gateway(await freePort(), prefix, env);
    await gateway.start();
    return gateway;
  }

  get url(): string {
    return `ws://127.0.0.1:${this.port}`;
  }

  get http(): string {
    return `http://127.0.0.1:${this.port}`;
  }

  async start(): Promise<void> {
    const proc = spawn(python(), ["-m", "tornado_gateway"], {
      cwd: REPO_ROOT,
      stdio: ["ignore", "pipe", "pipe"],
      env: {
        ...process.env,
        PORT: String(this.port),
        BIND_ADDRESS: "127.0.0.1",
        REDIS_URL,
        REDIS_PREFIX: this.prefix,
        JWT_SECRET: SECRET,
        HEARTBEAT_INTERVAL: "0.5",
        HEARTBEAT_TIMEOUT: "2",
        STATSD_HOST: "",
        LOG_LEVEL: "WARNING",
        PYTHONUNBUFFERED: "1",
        ...this.env,
      },
    });
    children.add(proc);
    this.proc = proc;
    const keep = (chunk: Buffer): void => {
      this.output = (this.output + chunk.toString()).slice(-20_000);
    };
    proc.stdout?.on("data", keep);
    proc.stderr?.on("data", keep);
    await waitFor(
      `the gateway on port ${this.port} to be ready`,
      async () => {
        if (proc.exitCode !== null) throw new Error(`the gateway exited with ${proc.exitCode}:\n${this.output}`);
        try {
          return (await fetch(`${this.http}/ready`)).status === 200;
        } catch {
          return false;
        }
      },
      15_000,
    );
  }

  /** Sends `signal` to the process (by its pid) and waits for it to exit. */
  async kill(signal: NodeJS.Signals = "SIGKILL", timeoutMs = 10_000): Promise<void> {
    const proc = this.proc;
    if (proc === null || proc.exitCode !== null || proc.signalCode !== null || proc.pid === undefined) return;
    const exited = new Promise<void>((resolve) => proc.once("exit", () => resolve()));
    process.kill(proc.pid, signal);
    const timer = setTimeout(() => {
      if (proc.exitCode === null && proc.pid !== undefined) process.kill(proc.pid, "SIGKILL");
    }, timeoutMs);
    await exited;
    clearTimeout(timer);
    children.delete(proc);
  }

  stop(): Promise<void> {
    return this.kill("SIGTERM");
  }

  /** POST /broadcast/user/{userId} (loopback: no API key needed). */
  async broadcast(userId: string, message: object): Promise<{ status: number; body: Record<string, unknown> }> {
    const response = await fetch(`${this.http}/broadcast/user/${encodeURIComponent(userId)}`, {
      method: "POST",
      body: JSON.stringify(message),
      headers: { "Content-Type": "application/json" },
    });
    return { status: response.status, body: (await response.json()) as Record<string, unknown> };
  }

  async stats(): Promise<{ totalConnections: number }> {
    return (await (await fetch(`${this.http}/stats`)).json()) as { totalConnections: number };
  }
}

// --- Redis (RESP over node:net) ------------------------------------------------------------

export type RespValue = string | number | null | RespValue[] | Error;

/** Parses one RESP value from `buffer` at `offset`; null when it is not all there yet. */
function parseResp(buffer: Buffer, offset: number): [RespValue, number] | null {
  const end = buffer.indexOf("\r\n", offset);
  if (end < 0) return null;
  const kind = String.fromCharCode(buffer[offset] as number);
  const line = buffer.toString("utf8", offset + 1, end);
  const next = end + 2;
  switch (kind) {
    case "+":
      return [line, next];
    case "-":
      return [new Error(line), next];
    case ":":
      return [Number(line), next];
    case "$": {
      const length = Number(line);
      if (length < 0) return [null, next];
      if (buffer.length < next + length + 2) return null;
      return [buffer.toString("utf8", next, next + length), next + length + 2];
    }
    case "*": {
      const count = Number(line);
      if (count < 0) return [null, next];
      const items: RespValue[] = [];
      let at = next;
      for (let i = 0; i < count; i++) {
        const item = parseResp(buffer, at);
        if (item === null) return null;
        items.push(item[0]);
        at = item[1];
      }
      return [items, at];
    }
    default:
      throw new Error(`unexpected RESP type ${kind}`);
  }
}

export class Redis {
  private buffer = Buffer.alloc(0);
  private readonly replies: { resolve: (value: RespValue) => void; reject: (error: Error) => void }[] = [];
  private readonly listeners = new Map<string, (message: string) => void>();

  private constructor(private readonly socket: net.Socket) {
    socket.on("data", (chunk: Buffer) => this.onData(chunk));
    socket.on("error", (error) => {
      for (const reply of this.replies.splice(0)) reply.reject(error);
    });
  }

  static connect(url = REDIS_URL): Promise<Redis> {
    const parsed = new URL(url);
    return new Promise((resolve, reject) => {
      const socket = net.connect(Number(parsed.port || 6379), parsed.hostname, () => resolve(new Redis(socket)));
      socket.once("error", reject);
    });
  }

  command(...args: (string | number)[]): Promise<RespValue> {
    const parts = args.map(String);
    let frame = `*${parts.length}\r\n`;
    for (const part of parts) frame += `$${Buffer.byteLength(part)}\r\n${part}\r\n`;
    return new Promise((resolve, reject) => {
      this.replies.push({ resolve, reject });
      this.socket.write(frame);
    });
  }

  /** SUBSCRIBE on this connection (it then takes no other commands); resolves once subscribed. */
  async subscribe(channel: string, listener: (message: string) => void): Promise<void> {
    this.listeners.set(channel, listener);
    await this.command("SUBSCRIBE", channel);
  }

  close(): void {
    this.socket.destroy();
  }

  /** Deletes every key under `prefix:` and the prefix's function library (functions outlive keys). */
  async cleanup(prefix: string): Promise<void> {
    let cursor = "0";
    do {
      const [next, keys] = (await this.command("SCAN", cursor, "MATCH", `${prefix}:*`, "COUNT", 1000)) as [string, string[]];
      cursor = next;
      if (keys.length > 0) await this.command("DEL", ...keys);
    } while (cursor !== "0");
    await this.command("FUNCTION", "DELETE", `${prefix}_history`);
  }

  private onData(chunk: Buffer): void {
    this.buffer = Buffer.concat([this.buffer, chunk]);
    let offset = 0;
    for (;;) {
      const parsed = parseResp(this.buffer, offset);
      if (parsed === null) break;
      offset = parsed[1];
      const value = parsed[0];
      if (Array.isArray(value) && value[0] === "message" && typeof value[1] === "string") {
        this.listeners.get(value[1])?.(String(value[2]));
        continue;
      }
      const reply = this.replies.shift();
      if (value instanceof Error) reply?.reject(value);
      else reply?.resolve(value);
    }
    this.buffer = this.buffer.subarray(offset);
  }
}

// --- a TCP proxy that can go silent ----------------------------------------------------------

/**
 * Relays loopback TCP to the gateway. `freeze()` makes the connections open at that moment pass
 * nothing in either direction while they stay open (a NAT that forgot them); later ones work.
 */
export class FreezableProxy {
  private server: net.Server | null = null;
  private readonly pairs: { client: net.Socket; upstream: net.Socket; frozen: boolean }[] = [];
  port = 0;

  constructor(private readonly upstreamPort: number) {}

  async start(): Promise<this> {
    this.port = await freePort();
    const server = net.createServer((client) => {
      const upstream = net.connect(this.upstreamPort, "127.0.0.1");
      const pair = { client, upstream, frozen: false };
      this.pairs.push(pair);
      client.on("data", (data) => {
        if (!pair.frozen) upstream.write(data);
      });
      upstream.on("data", (data) => {
        if (!pair.frozen) client.write(data);
      });
      const end = (): void => {
        client.destroy();
        upstream.destroy();
      };
      for (const socket of [client, upstream]) {
        socket.on("error", end);
        socket.on("close", () => {
          if (!pair.frozen) end();
        });
      }
    });
    await new Promise<void>((resolve) => server.listen(this.port, "127.0.0.1", resolve));
    this.server = server;
    return this;
  }

  get url(): string {
    return `ws://127.0.0.1:${this.port}`;
  }

  freeze(): void {
    for (const pair of this.pairs) pair.frozen = true;
  }

  async stop(): Promise<void> {
    for (const pair of this.pairs) {
      pair.client.destroy();
      pair.upstream.destroy();
    }
    await new Promise<void>((resolve) => (this.server ? this.server.close(() => resolve()) : resolve()));
  }
}

// --- recording a client's events ------------------------------------------------------------

export interface Recorded {
  type: string;
  at: number;
  event: unknown;
}

const CLIENT_EVENTS: (keyof ClientEvents)[] = [
  "connecting",
  "disconnected",
  "resync",
  "message",
  "receipt_sent",
  "token_refreshed",
  "client_error",
];

/** Every event of a client, in order, for assertions; server messages are recorded as "message". */
export class Recorder {
  readonly events: Recorded[] = [];

  constructor(client: GatewayClient) {
    for (const type of CLIENT_EVENTS) {
      client.on(type, (event) => {
        this.events.push({ type, at: Date.now(), event });
      });
    }
  }

  /** The events of `type` so far: a client event, or the server messages of that type. */
  of<K extends keyof GatewayEvents>(type: K): GatewayEvents[K][] {
    const clientEvent = (CLIENT_EVENTS as string[]).includes(type);
    return this.events
      .filter((e) => (clientEvent ? e.type === type : e.type === "message" && (e.event as { type: string }).type === type))
      .map((e) => e.event as GatewayEvents[K]);
  }

  /** Waits for the `count`-th event of `type` and returns it. */
  async next<K extends keyof GatewayEvents>(type: K, count = 1, timeoutMs = 5_000): Promise<GatewayEvents[K]> {
    const found = await waitFor(`${count} ${String(type)} event(s)`, () => this.of(type).length >= count && this.of(type), timeoutMs);
    return found[count - 1] as GatewayEvents[K];
  }
}

export function clientOptions(
  gatewayUrl: string,
  userId: string,
  overrides: Partial<GatewayClientOptions> = {},
): GatewayClientOptions {
  return {
    url: gatewayUrl,
    token: mintToken(userId, overrides.userType ?? "driver"),
    userType: "driver",
    deviceId: "d1",
    platform: "ios",
    backoff: { baseMs: 100, capMs: 1_000 },
    ...overrides,
  };
}

/**
 * A real gateway for the tests of one describe() block (call it inside the block): started before
 * them with its own Redis prefix; afterwards every client made with `newClient` is closed, the
 * gateway stopped and the prefix's keys removed.
 */
export class GatewaySuite {
  readonly prefix = uniquePrefix();
  readonly clients: GatewayClient[] = [];
  #gateway: Gateway | undefined;

  constructor(env: Record<string, string> = {}) {
    before(async () => {
      this.#gateway = await Gateway.start(this.prefix, env);
    });
    after(async () => {
      await Promise.all(this.clients.map((c) => c.close()));
      await this.#gateway?.stop();
      const redis = await Redis.connect();
      await redis.cleanup(this.prefix);
      redis.close();
    });
  }

  get gateway(): Gateway {
    if (this.#gateway === undefined) throw new Error("the gateway starts in before()");
    return this.#gateway;
  }

  newClient(userId: string, overrides: Parameters<typeof clientOptions>[2] = {}): [GatewayClient, Recorder] {
    const client = new GatewayClient(clientOptions(this.gateway.url, userId, overrides));
    this.clients.push(client);
    return [client, new Recorder(client)];
  }
}
