// Against a real gateway (HEARTBEAT_INTERVAL 0.5 s, HEARTBEAT_TIMEOUT 2 s): heartbeats, typed
// sends with acks and errors, replacement (4409), a silent socket, close().
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { GatewayError } from "../index.js";
import { FreezableProxy, GatewaySuite, sleep, unique, waitFor } from "./helpers.js";

const location = () => ({ latitude: 12.97, longitude: 77.59, timestamp: Date.now(), heading: 90 });

describe("connection (real gateway)", { timeout: 60_000 }, () => {
  const suite = new GatewaySuite();
  const newClient = suite.newClient.bind(suite);

  test("answers heartbeats by itself and stays connected past the heartbeat timeout", { timeout: 15_000 }, async () => {
    const [client, recorder] = newClient(unique("hb"));
    const connected = await client.connect();
    assert.equal(connected.heartbeatInterval, 500);
    await sleep(3_500); // HEARTBEAT_TIMEOUT is 2 s: a client that does not answer is closed with 4408 by now
    assert.deepEqual(recorder.of("disconnected"), []);
    assert.ok(recorder.of("heartbeat").length >= 5, `heartbeats seen: ${recorder.of("heartbeat").length}`);
    assert.equal(client.state, "connected");
    assert.equal(client.connection?.connectionId, connected.connectionId);
    const ack = await client.send("location_update", location(), { id: "loc-1" });
    assert.equal(ack.payload.id, "loc-1");
  });

  test("typed sends: acked when accepted, rejected with the gateway's error code otherwise", { timeout: 15_000 }, async () => {
    const [driver] = newClient(unique("driver"));
    await driver.connect();
    assert.equal(driver.send("location_update", location()), true);
    const ack = await driver.send("location_update", location(), { id: "loc-2" });
    assert.deepEqual(ack.payload, { id: "loc-2" });
    const generated = await driver.send("dispatch_response", { requestId: "r1", action: "accept" }, {});
    assert.equal(typeof generated.payload.id, "string");

    const invalid = driver.send("location_update", { ...location(), latitude: 123 }, { id: "bad-lat" });
    await assert.rejects(invalid, (e: unknown) => e instanceof GatewayError && e.code === "INVALID_MESSAGE" && e.ref === "bad-lat");

    const riderId = unique("rider");
    const [rider, riderEvents] = newClient(riderId, { userType: "rider", deviceId: "web-1", platform: "web" });
    await rider.connect();
    const forbidden = rider.send("location_update", location(), { id: "rider-loc" });
    await assert.rejects(forbidden, (e: unknown) => {
      assert.ok(e instanceof GatewayError);
      assert.equal(e.code, "FORBIDDEN");
      assert.equal(e.ref, "rider-loc");
      return true;
    });
    assert.equal(riderEvents.of("error")[0]?.payload.code, "FORBIDDEN");
    assert.equal(rider.state, "connected", "an error frame leaves the connection open");
  });

  test("replaced by the same user and device elsewhere (4409): no reconnect", { timeout: 15_000 }, async () => {
    const userId = unique("dup");
    const [first, firstEvents] = newClient(userId);
    await first.connect();
    const [second, secondEvents] = newClient(userId);
    await second.connect();
    const closed = await firstEvents.next("disconnected");
    assert.deepEqual(closed, { code: 4409, reason: closed.reason, willRetry: false });
    assert.equal(firstEvents.of("error")[0]?.payload.code, "REPLACED");
    await sleep(1_500);
    assert.equal(firstEvents.of("connecting").length, 1, "no second attempt");
    assert.equal(first.state, "closed");
    assert.equal(second.state, "connected");
    assert.deepEqual(secondEvents.of("disconnected"), []);
  });

  test("invalid parameters (4400): connect() rejects, no retry", { timeout: 10_000 }, async () => {
    const [client, recorder] = newClient(unique("params"), { deviceId: "has spaces" });
    await assert.rejects(client.connect(), { code: "INVALID_PARAMS" });
    await sleep(500);
    assert.equal(recorder.of("connecting").length, 1);
  });

  test("a socket that goes silent is detected within about two heartbeats and replaced", { timeout: 15_000 }, async () => {
    const proxy = await new FreezableProxy(suite.gateway.port).start();
    try {
      const [client, recorder] = newClient(unique("silent"), { url: proxy.url });
      const first = await client.connect();
      proxy.freeze();
      const frozenAt = Date.now();
      await assert.rejects(client.send("location_update", location(), { id: "lost", timeoutMs: 300 }), { code: "TIMEOUT" });
      const lost = await recorder.next("disconnected", 1, 5_000);
      const detectedAfter = Date.now() - frozenAt;
      assert.equal(lost.code, 1006);
      assert.equal(lost.willRetry, true);
      assert.ok(detectedAfter >= 700 && detectedAfter < 2_500, `detected after ${detectedAfter} ms`);
      const again = await recorder.next("connected", 2, 5_000);
      assert.notEqual(again.payload.connectionId, first.connectionId);
      assert.equal(client.state, "connected");
    } finally {
      await proxy.stop();
    }
  });

  test("close(): disconnected with willRetry false, and the gateway sees the client go", { timeout: 10_000 }, async () => {
    const [client, recorder] = newClient(unique("bye"));
    await client.connect();
    await client.close(1000, "done");
    assert.deepEqual(recorder.of("disconnected"), [{ code: 1000, reason: "done", willRetry: false }]);
    assert.equal(client.state, "closed");
    await sleep(300);
    assert.equal(recorder.of("connecting").length, 1);
    await waitFor("no connection of that user on the gateway", async () => {
      const stats = await suite.gateway.stats();
      return stats.totalConnections <= suite.clients.filter((c) => c.state === "connected").length;
    });
  });
});
