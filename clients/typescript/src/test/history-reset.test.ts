// Against a real gateway with HISTORY_TTL 1 s: the user's history expires while the client stays
// connected, so the next recorded messages start again at seq 1 under a new epoch, with no epoch
// in their envelopes. Each of them must reach the app, in order, after a resync.
import assert from "node:assert/strict";
import { describe, test } from "node:test";

import type { GatewayClient } from "../index.js";
import { FreezableProxy, GatewaySuite, sleep, unique, waitFor } from "./helpers.js";

/** The ride requests a client handled, as [seq, requestId]. */
function handled(client: GatewayClient): [number | undefined, string][] {
  const seen: [number | undefined, string][] = [];
  client.on("ride_request", (m) => {
    seen.push([m.seq, m.payload.requestId]);
  });
  return seen;
}

describe("history restarted while connected (real gateway, HISTORY_TTL 1 s)", { timeout: 60_000 }, () => {
  const suite = new GatewaySuite({ HISTORY_TTL: "1" });

  async function broadcast(userId: string, requestId: string): Promise<number> {
    const { status, body } = await suite.gateway.broadcast(userId, { type: "ride_request", payload: { requestId } });
    assert.equal(status, 202, JSON.stringify(body));
    return body["seq"] as number;
  }

  test("seq 1 and 2 after the TTL are handled in order after a resync; the next resume resyncs again", { timeout: 30_000 }, async () => {
    const userId = unique("ttl");
    assert.equal(await broadcast(userId, "before"), 1); // before the client connects
    const proxy = await new FreezableProxy(suite.gateway.port).start();
    try {
      const [client, recorder] = suite.newClient(userId, { url: proxy.url });
      const seen = handled(client);
      const connected = await client.connect();
      const firstEpoch = connected.epoch as string;
      assert.equal(connected.seq, 1);

      await sleep(1_500); // the history expires; nothing was received on this socket yet
      assert.deepEqual([await broadcast(userId, "a"), await broadcast(userId, "b")], [1, 2]);
      await waitFor("a and b", () => seen.length === 2);
      assert.deepEqual(seen, [
        [1, "a"],
        [2, "b"],
      ]);
      assert.deepEqual(recorder.of("resync"), [
        { reason: "history_reset", previous: { epoch: firstEpoch, seq: 1 }, current: { epoch: firstEpoch, seq: 1 } },
      ]);
      assert.deepEqual(client.resumePosition, { epoch: firstEpoch, seq: 2 });

      await sleep(1_500); // again, now after this socket received seq 2
      assert.deepEqual([await broadcast(userId, "c"), await broadcast(userId, "d"), await broadcast(userId, "e")], [1, 2, 3]);
      await waitFor("c, d and e", () => seen.length === 5);
      assert.deepEqual(seen.slice(2), [
        [1, "c"],
        [2, "d"],
        [3, "e"],
      ]);
      assert.equal(recorder.of("resync").length, 2);

      proxy.freeze(); // the socket goes silent: the client replaces it, resuming with the old epoch
      const again = await recorder.next("connected", 2, 10_000);
      assert.equal(again.payload.recovered, false);
      const newEpoch = again.payload.epoch as string;
      assert.notEqual(newEpoch, firstEpoch);
      const line = again.payload.seq as number; // 3, or 0 if the TTL passed again while reconnecting
      const [, , resync] = await waitFor("a third resync", () => recorder.of("resync").length === 3 && recorder.of("resync"));
      assert.deepEqual(resync, { reason: "not_recovered", previous: { epoch: firstEpoch, seq: 3 }, current: { epoch: newEpoch, seq: line } });
      assert.equal(await broadcast(userId, "f"), line + 1);
      await waitFor("f", () => seen.length === 6);
      assert.deepEqual(seen.at(-1), [line + 1, "f"]);
      assert.deepEqual(client.resumePosition, { epoch: newEpoch, seq: line + 1 });
      await sleep(200);
      assert.equal(seen.length, 6);
      assert.equal(recorder.of("resync").length, 3);
    } finally {
      await proxy.stop();
    }
  });
});
