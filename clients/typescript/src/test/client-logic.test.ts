// The client's logic against a hand-driven socket: exact orderings a real gateway cannot be
// made to produce on demand (a replay overlapping live delivery, a close code of our choosing).
import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { GatewayClient, type GatewayClientOptions, GatewayError, type ResumeStore } from "../index.js";
import { fakeWebSocket, type FakeSocket } from "./fake-socket.js";
import { mintToken, Recorder, sleep, waitFor } from "./helpers.js";

function setup(overrides: Partial<GatewayClientOptions> = {}) {
  const { WebSocket, sockets } = fakeWebSocket();
  const client = new GatewayClient({
    url: "ws://gateway.test",
    token: "t0",
    userType: "driver",
    deviceId: "d1",
    platform: "ios",
    WebSocket,
    random: () => 0,
    ...overrides,
  });
  const recorder = new Recorder(client);
  const socket = async (n: number): Promise<FakeSocket> =>
    waitFor(`socket #${n + 1}`, () => sockets[n], 2_000) as Promise<FakeSocket>;
  return { client, recorder, sockets, socket };
}

const ride = (seq: number, extra: object = {}) => ({
  type: "ride_request",
  id: `m${seq}`,
  timestamp: Date.now(),
  seq,
  payload: { requestId: `r${seq}` },
  ...extra,
});

describe("client logic (fake socket)", () => {
  test("answers heartbeats with heartbeat_ack at once", async () => {
    const { client, socket } = setup();
    const connected = client.connect();
    const s = await socket(0);
    s.connected();
    await connected;
    s.receive({ type: "heartbeat", id: "h1", timestamp: 1, payload: { timestamp: 1234 } });
    assert.deepEqual(s.sent, [{ type: "heartbeat_ack", payload: { timestamp: 1234 } }]);
    await client.close();
  });

  test("handlers run in order, async ones awaited; receipt after the handler; resume URL", async () => {
    const { client, socket } = setup();
    const log: string[] = [];
    client.on("ride_request", async (m) => {
      log.push(`start ${m.payload.requestId}`);
      await sleep(30);
      log.push(`end ${m.payload.requestId}`);
    });
    const connected = client.connect();
    const s = await socket(0);
    assert.equal(s.query.get("since"), null);
    s.connected({ epoch: "E", seq: 0 });
    await connected;
    for (const seq of [1, 2, 3]) s.receive(ride(seq, seq === 2 ? { receipt: true } : {}));
    await waitFor("three handled", () => log.length === 6);
    assert.deepEqual(log, ["start r1", "end r1", "start r2", "end r2", "start r3", "end r3"]);
    const receipts = s.sent.filter((f) => f.type === "receipt");
    assert.equal(receipts.length, 1);
    assert.deepEqual(receipts[0]?.payload, { messageId: "m2" });
    assert.deepEqual(client.resumePosition, { epoch: "E", seq: 3 });

    s.serverClose(1006);
    const s2 = await socket(1);
    assert.equal(s2.query.get("since"), "3");
    assert.equal(s2.query.get("epoch"), "E");
    s2.connected({ epoch: "E", seq: 4, recovered: true });
    s2.receive(ride(4)); // the replay starts at since + 1
    await waitFor("r4 handled", () => log.includes("end r4"));
    assert.equal(log.filter((l) => l === "start r3").length, 1);
    assert.deepEqual(client.resumePosition, { epoch: "E", seq: 4 });
    await client.close();
  });

  test("recovered: false emits resync after connected, before later messages", async () => {
    const saved: [string, number][] = [];
    const store: ResumeStore = {
      load: async () => ({ epoch: "old", seq: 9 }),
      save: async (epoch, seq) => {
        saved.push([epoch, seq]);
      },
    };
    const { client, socket, recorder } = setup({ resumeStore: store });
    const order: string[] = [];
    client.on("connected", () => {
      order.push("connected");
    });
    client.on("resync", async () => {
      await sleep(20);
      order.push("resync");
    });
    client.on("ride_request", (m) => {
      order.push(m.payload.requestId);
    });
    const connected = client.connect();
    const s = await socket(0);
    assert.equal(s.query.get("since"), "9");
    assert.equal(s.query.get("epoch"), "old");
    s.connected({ epoch: "new", seq: 2, recovered: false });
    s.receive(ride(3));
    await connected;
    await waitFor("r3", () => order.includes("r3"));
    assert.deepEqual(order, ["connected", "resync", "r3"]);
    assert.deepEqual(recorder.of("resync"), [
      { reason: "not_recovered", previous: { epoch: "old", seq: 9 }, current: { epoch: "new", seq: 2 } },
    ]);
    assert.deepEqual(saved, [["new", 2], ["new", 3]]);
    await client.close();
  });

  test("a seq that does not go up on one connection: resync (history_reset), then handled; the next resume resyncs again", async () => {
    const saved: [string, number][] = [];
    const store: ResumeStore = {
      load: async () => null,
      save: async (epoch, seq) => {
        saved.push([epoch, seq]);
      },
    };
    const { client, socket, recorder } = setup({ resumeStore: store });
    const order: string[] = [];
    client.on("resync", (e) => {
      order.push(`resync ${e.reason}`);
    });
    client.on("ride_request", (m) => {
      order.push(`${m.payload.requestId}`);
    });
    const connected = client.connect();
    const s = await socket(0);
    s.connected({ epoch: "E", seq: 5 });
    await connected;
    s.receive(ride(1)); // not above connected's seq 5: the history started again before anything came
    s.receive(ride(2));
    s.receive(ride(3));
    s.receive(ride(1)); // and again, below the last seq this socket received
    s.receive(ride(2));
    await waitFor("five handled", () => order.filter((o) => !o.startsWith("resync")).length === 5);
    assert.deepEqual(order, ["resync history_reset", "r1", "r2", "r3", "resync history_reset", "r1", "r2"]);
    assert.deepEqual(recorder.of("resync"), [
      { reason: "history_reset", previous: { epoch: "E", seq: 5 }, current: { epoch: "E", seq: 1 } },
      { reason: "history_reset", previous: { epoch: "E", seq: 3 }, current: { epoch: "E", seq: 1 } },
    ]);
    assert.deepEqual(client.resumePosition, { epoch: "E", seq: 2 }); // the new epoch is not known yet
    assert.deepEqual(saved.at(-1), ["E", 2]);

    s.serverClose(1006);
    const s2 = await socket(1);
    assert.equal(s2.query.get("since"), "2");
    assert.equal(s2.query.get("epoch"), "E");
    s2.connected({ epoch: "E3", seq: 2, recovered: false });
    s2.receive(ride(3));
    await waitFor("r3 on the new connection", () => order.length === 9);
    assert.deepEqual(order.slice(7), ["resync not_recovered", "r3"]);
    assert.deepEqual(client.resumePosition, { epoch: "E3", seq: 3 });
    await client.close();
  });

  test("a recovered replay repeating what is still queued from the connection before: each seq handled once", async () => {
    const { client, socket, recorder } = setup();
    let release = (): void => {};
    const held = new Promise<void>((resolve) => (release = resolve));
    const handled: number[] = [];
    client.on("ride_request", async (m) => {
      if (m.seq === 1) await held; // 2 and 3 wait, unhandled, behind 1
      handled.push(m.seq ?? -1);
    });
    const connected = client.connect();
    const s = await socket(0);
    s.connected({ epoch: "E", seq: 0 });
    await connected;
    for (const seq of [1, 2, 3]) s.receive(ride(seq));
    s.serverClose(1006);
    const s2 = await socket(1);
    assert.equal(s2.query.get("since"), "0"); // nothing handled yet: all of 1-3 come again
    s2.connected({ epoch: "E", seq: 3, recovered: true });
    for (const seq of [1, 2, 3, 4]) s2.receive(ride(seq));
    release();
    await waitFor("1-4", () => handled.length === 4);
    s2.receive(ride(1)); // after the replay, on the same connection: the history started again
    await waitFor("the new 1", () => handled.length === 5);
    assert.deepEqual(handled, [1, 2, 3, 4, 1]);
    assert.deepEqual(
      recorder.of("resync").map((e) => e.reason),
      ["history_reset"],
    );
    await client.close();
  });

  test("a receipt only when a handler of the type (or \"message\") ran and none threw", async () => {
    const { WebSocket, sockets } = fakeWebSocket();
    const client = new GatewayClient({ url: "ws://gateway.test", token: "t0", userType: "driver", deviceId: "d1", platform: "ios", WebSocket });
    client.on("notification", () => {}); // another type only
    const connected = client.connect();
    const s = await waitFor("the socket", () => sockets[0]);
    s.connected({ epoch: "E", seq: 0 });
    await connected;
    const receipts = (): unknown[] => s.sent.filter((f) => f.type === "receipt").map((f) => f.payload["messageId"]);
    s.receive(ride(1, { receipt: true }));
    await waitFor("1 handled", () => client.resumePosition?.seq === 1);
    assert.deepEqual(receipts(), [], "nobody handled m1");
    const off = client.on("message", () => {});
    s.receive(ride(2, { receipt: true }));
    await waitFor("2 handled", () => client.resumePosition?.seq === 2);
    assert.deepEqual(receipts(), ["m2"]);
    off();
    client.on("ride_request", (m) => {
      if (m.seq === 3) throw new Error("could not show it");
    });
    s.receive(ride(3, { receipt: true }));
    s.receive(ride(4, { receipt: true }));
    await waitFor("4 handled", () => client.resumePosition?.seq === 4);
    assert.deepEqual(receipts(), ["m2", "m4"]);
    await client.close();
  });

  test("send with an id: resolved by its ack, rejected by its error, by a timeout, by a lost connection", async () => {
    const { client, socket, recorder } = setup({ ackTimeoutMs: 100 });
    const connected = client.connect();
    const s = await socket(0);
    s.connected();
    await connected;
    const payload = { latitude: 1, longitude: 2, timestamp: 3 };
    assert.equal(client.send("location_update", payload), true);

    const acked = client.send("location_update", payload, { id: "a1" });
    s.receive({ type: "ack", id: "x", timestamp: 1, payload: { id: "a1" } });
    assert.equal((await acked).payload.id, "a1");

    const refused = client.send("location_update", payload, { id: "a2" });
    s.receive({ type: "error", id: "x", timestamp: 1, payload: { code: "FORBIDDEN", message: "no", ref: "a2" } });
    await assert.rejects(refused, (e: unknown) => e instanceof GatewayError && e.code === "FORBIDDEN" && e.ref === "a2");
    assert.equal(recorder.of("error").length, 1); // the app still sees the error frame

    await assert.rejects(client.send("location_update", payload, { id: "a3" }), { code: "TIMEOUT" });
    const lost = client.send("location_update", payload, {});
    s.serverClose(1006);
    await assert.rejects(lost, { code: "DISCONNECTED" });
    await assert.rejects(client.send("location_update", payload, {}), { code: "NOT_CONNECTED" });
    assert.equal(client.send("location_update", payload), false);
    await client.close();
  });

  test("4409 and 4400: no reconnect; connect() rejects with the error frame's code", async () => {
    for (const [code, errorCode] of [
      [4409, "REPLACED"],
      [4400, "INVALID_PARAMS"],
    ] as const) {
      const { client, socket, recorder, sockets } = setup();
      const connected = client.connect();
      const s = await socket(0);
      s.open();
      s.receive({ type: "error", id: "e", timestamp: 1, payload: { code: errorCode, message: "bye" } });
      s.serverClose(code);
      await assert.rejects(connected, { code: errorCode });
      await sleep(50);
      assert.equal(sockets.length, 1);
      assert.equal(client.state, "closed");
      assert.deepEqual(recorder.of("disconnected"), [{ code, reason: "", willRetry: false }]);
    }
  });

  test("4401: a fresh token from the provider, then reconnect; a static token gives up", async () => {
    let calls = 0;
    const { client, socket } = setup({ token: async () => `tok${++calls}` });
    const connected = client.connect();
    const s = await socket(0);
    assert.equal(s.token, "tok1");
    assert.equal(s.query.get("token"), null); // a JWT-safe token never goes into the URL
    s.open();
    s.serverClose(4401);
    const s2 = await socket(1);
    assert.equal(s2.token, "tok2");
    s2.connected();
    await connected;
    await client.close();

    const fixed = setup();
    const failed = fixed.client.connect();
    (await fixed.socket(0)).serverClose(4401);
    await assert.rejects(failed);
    await sleep(50);
    assert.equal(fixed.sockets.length, 1);
  });

  test("4429 waits the throttled delay; 1001 a short one; a connected resets the backoff", async () => {
    const { client, socket, recorder } = setup({ throttledBackoff: { minMs: 300 }, goingAwayMaxMs: 50, random: () => 1 });
    const connected = client.connect();
    (await socket(0)).serverClose(4429);
    const first = await recorder.next("disconnected");
    assert.equal(first.delayMs, 300 + 5000);
    await client.close();
    await assert.rejects(connected, { code: "CLOSED" });

    const other = setup({ goingAwayMaxMs: 50, random: () => 1, backoff: { baseMs: 10, capMs: 1000 } });
    const ok = other.client.connect();
    (await other.socket(0)).serverClose(1006); // attempt 0: up to 10 ms
    (await other.socket(1)).serverClose(1006); // attempt 1: up to 20 ms
    const s3 = await other.socket(2);
    s3.connected();
    await ok;
    s3.serverClose(1001);
    const s4 = await other.socket(3);
    s4.serverClose(1006); // backoff starts again from the base after the connected
    const delays = other.recorder.of("disconnected").map((d) => d.delayMs);
    assert.deepEqual(delays, [10, 20, 50, 10]);
    await other.client.close();
  });

  test("a socket without any frame for two heartbeat intervals is dropped and replaced", async () => {
    const { client, socket, recorder } = setup();
    const connected = client.connect();
    const s = await socket(0);
    s.connected({ heartbeatInterval: 50 });
    await connected;
    const started = Date.now();
    const lost = await recorder.next("disconnected", 1, 2_000);
    assert.equal(lost.code, 1006);
    assert.equal(lost.willRetry, true);
    assert.ok(Date.now() - started >= 300, "not before 2 x 50 ms + 250 ms");
    assert.equal(s.closedWith?.code, 4000);
    (await socket(1)).connected();
    await client.close();
  });

  test("refreshes the token in-band before exp and schedules the next refresh", async () => {
    let calls = 0;
    const { client, socket, recorder } = setup({
      token: async () => {
        calls += 1;
        return mintToken("u1", "driver", { ttlS: 2 });
      },
    });
    const connected = client.connect();
    const s = await socket(0);
    s.connected();
    await connected;
    const refresh = await waitFor("a token_refresh frame", () => s.sent.find((f) => f.type === "token_refresh"), 3_000);
    assert.equal(calls, 2);
    assert.equal(typeof refresh.payload["token"], "string");
    s.receive({ type: "ack", id: "x", timestamp: 1, payload: { id: refresh.id } });
    await recorder.next("token_refreshed");
    assert.equal(recorder.of("ack").length, 0, "the client's own acks are not shown to the app");
    await client.close();
  });
});
