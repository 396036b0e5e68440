// Against a real gateway that is killed and restarted on the same port: reconnect with backoff,
// resume with since/epoch without a gap or a duplicate, resync when the gap cannot be filled,
// and the resume store across an app restart.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { GatewayClient, type ResumePosition, type ResumeStore } from "../index.js";
import { clientOptions, Gateway, Recorder, Redis, sleep, unique, uniquePrefix, waitFor } from "./helpers.js";

const prefix = uniquePrefix();
let gateway: Gateway;
let redis: Redis;
const clients: GatewayClient[] = [];

function newClient(userId: string, overrides: Parameters<typeof clientOptions>[2] = {}): [GatewayClient, Recorder] {
  const client = new GatewayClient(clientOptions(gateway.url, userId, overrides));
  clients.push(client);
  return [client, new Recorder(client)];
}

/** The ride requests a client handled, as [seq, requestId]. */
function handled(client: GatewayClient): [number | undefined, string][] {
  const seen: [number | undefined, string][] = [];
  client.on("ride_request", (m) => {
    seen.push([m.seq, m.payload.requestId]);
  });
  return seen;
}

async function broadcast(userId: string, n: number, devices: number): Promise<void> {
  const { status, body } = await gateway.broadcast(userId, { type: "ride_request", payload: { requestId: `r${n}` } });
  assert.equal(status, 202, JSON.stringify(body));
  assert.equal(body["seq"], n);
  assert.equal(body["devices"], devices);
}

/** Records a message straight through the gateway's Redis function (works while no gateway runs). */
async function record(userId: string, n: number): Promise<void> {
  const message = { type: "ride_request", payload: { requestId: `r${n}` } };
  const seq = await redis.command("FCALL", `${prefix}_publish`, 1, userId, JSON.stringify(message));
  assert.equal(seq, n);
}

function memoryStore(initial: ResumePosition | null = null): ResumeStore & { value: ResumePosition | null; saves: number } {
  const store = {
    value: initial,
    saves: 0,
    load: async () => store.value,
    save: async (epoch: string, seq: number) => {
      store.value = { epoch, seq };
      store.saves += 1;
    },
  };
  return store;
}

const range = (from: number, to: number): number[] => Array.from({ length: to - from + 1 }, (_, i) => from + i);

describe("resume (real gateway, restarted)", { timeout: 90_000 }, () => {
  before(async () => {
    gateway = await Gateway.start(prefix, { SHUTDOWN_DRAIN_SECONDS: "0.2" });
    redis = await Redis.connect();
  });

  after(async () => {
    await Promise.all(clients.map((c) => c.close()));
    await gateway?.stop();
    await redis.cleanup(prefix);
    redis.close();
  });

  test("gateway killed and restarted on the same port: reconnects, every seq exactly once and in order", { timeout: 30_000 }, async () => {
    const userId = unique("killed");
    const [client, recorder] = newClient(userId);
    const seen = handled(client);
    await client.connect();
    for (const n of [1, 2, 3]) await broadcast(userId, n, 1);
    await waitFor("r1-r3", () => seen.length === 3);

    await gateway.kill("SIGKILL");
    const lost = await recorder.next("disconnected");
    assert.equal(lost.willRetry, true);
    for (const n of [4, 5, 6, 7, 8]) await record(userId, n); // while no gateway runs
    await sleep(500); // a few refused attempts, with backoff
    assert.ok(recorder.of("disconnected").length >= 2, "it kept retrying while the gateway was down");

    await gateway.start();
    const resumed = await recorder.next("connected", 2, 10_000);
    assert.equal(resumed.payload.recovered, true);
    for (const n of [9, 10]) await broadcast(userId, n, 1);
    await waitFor("r1-r10", () => seen.length >= 10, 5_000);
    await sleep(300); // time for anything delivered twice
    assert.deepEqual(
      seen,
      range(1, 10).map((n) => [n, `r${n}`]),
    );
    assert.deepEqual(recorder.of("resync"), []);
    assert.deepEqual(client.resumePosition, { epoch: resumed.payload.epoch, seq: 10 });
  });

  test("a deploy (SIGTERM: close 1001): reconnects after a short jittered delay and resumes", { timeout: 30_000 }, async () => {
    const userId = unique("deploy");
    const [client, recorder] = newClient(userId, { goingAwayMaxMs: 300 });
    const seen = handled(client);
    await client.connect();
    await broadcast(userId, 1, 1);
    await waitFor("r1", () => seen.length === 1);

    await gateway.kill("SIGTERM");
    const lost = await recorder.next("disconnected");
    assert.equal(lost.code, 1001);
    assert.equal(lost.willRetry, true);
    assert.ok((lost.delayMs ?? Infinity) <= 300);
    await record(userId, 2);
    await gateway.start();
    const resumed = await recorder.next("connected", 2, 10_000);
    assert.equal(resumed.payload.recovered, true);
    await waitFor("r2", () => seen.length === 2);
    assert.deepEqual(seen, [
      [1, "r1"],
      [2, "r2"],
    ]);
  });

  test("a gap the gateway cannot fill (recovered: false): resync event, the store gets the new position", { timeout: 15_000 }, async () => {
    const userId = unique("resync");
    const store = memoryStore({ epoch: "an-epoch-long-gone", seq: 5 });
    const [client, recorder] = newClient(userId, { resumeStore: store });
    const seen = handled(client);
    const connected = await client.connect();
    assert.equal(connected.recovered, false);
    assert.ok(typeof connected.epoch === "string");
    const [resync] = recorder.of("resync");
    assert.deepEqual(resync, {
      reason: "not_recovered",
      previous: { epoch: "an-epoch-long-gone", seq: 5 },
      current: { epoch: connected.epoch, seq: 0 },
    });
    assert.deepEqual(store.value, { epoch: connected.epoch, seq: 0 });
    await broadcast(userId, 1, 1);
    await waitFor("r1", () => seen.length === 1);
    await waitFor("the store at seq 1", () => store.value?.seq === 1);
    assert.deepEqual(client.resumePosition, { epoch: connected.epoch, seq: 1 });
  });

  test("resumes across an app restart from its store: only what was missed", { timeout: 15_000 }, async () => {
    const userId = unique("restart");
    const store = memoryStore();
    const [first] = newClient(userId, { resumeStore: store });
    const firstSeen = handled(first);
    await first.connect();
    for (const n of [1, 2]) await broadcast(userId, n, 1);
    await waitFor("r1-r2", () => firstSeen.length === 2);
    await first.close();
    await waitFor("the device gone from presence", async () => (await redis.command("HLEN", `${prefix}:presence:${userId}`)) === 0);
    for (const n of [3, 4]) await broadcast(userId, n, 0);

    const [second, recorder] = newClient(userId, { resumeStore: store }); // the app, started again
    const secondSeen = handled(second);
    const connected = await second.connect();
    assert.equal(connected.recovered, true);
    await waitFor("r3-r4", () => secondSeen.length === 2);
    await sleep(300);
    assert.deepEqual(secondSeen, [
      [3, "r3"],
      [4, "r4"],
    ]);
    assert.deepEqual(recorder.of("resync"), []);
    assert.equal(store.value?.seq, 4);
  });
});
