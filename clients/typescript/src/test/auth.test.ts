// Tokens against a real gateway (TOKEN_EXPIRY_GRACE 1 s): in-band refresh before `exp`, a fresh
// token after 4401, and what happens to a static token that expires.
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { tokenExpiresAt } from "../index.js";
import { GatewaySuite, mintToken, sleep, unique } from "./helpers.js";

describe("tokens (real gateway)", { timeout: 60_000 }, () => {
  const suite = new GatewaySuite({ TOKEN_EXPIRY_GRACE: "1" });
  const newClient = suite.newClient.bind(suite);

  test("a short-lived token is refreshed in-band (token_refresh): the connection outlives several exps", { timeout: 20_000 }, async () => {
    const userId = unique("refresh");
    const issued: string[] = [];
    const [client, recorder] = newClient(userId, {
      token: async () => {
        issued.push(mintToken(userId, "driver", { ttlS: 4 }));
        return issued[issued.length - 1] as string;
      },
    });
    const connected = await client.connect();
    const firstExpiry = tokenExpiresAt(issued[0] as string) as number;
    // Without refreshes the gateway would warn at exp and close with 4401 one second later.
    await sleep(Math.max(0, firstExpiry - Date.now()) + 4_500);
    assert.deepEqual(recorder.of("disconnected"), []);
    assert.deepEqual(recorder.of("client_error"), []);
    assert.deepEqual(recorder.of("error"), [], "no AUTH_FAILED warning: each refresh came before exp");
    assert.ok(recorder.of("token_refreshed").length >= 2, `refreshes: ${recorder.of("token_refreshed").length}`);
    assert.ok(issued.length >= 3);
    assert.equal(client.connection?.connectionId, connected.connectionId, "the same connection throughout");
    const ack = await client.send("location_update", { latitude: 1, longitude: 2, timestamp: Date.now() }, { id: "after-exp" });
    assert.equal(ack.payload.id, "after-exp");
  });

  test("a refused token (4401): the provider is asked for a fresh one and the client reconnects", { timeout: 15_000 }, async () => {
    const userId = unique("fresh");
    let calls = 0;
    const [client, recorder] = newClient(userId, {
      token: async () => {
        calls += 1;
        return calls === 1 ? mintToken(userId, "driver", { secret: "not-the-gateway-secret" }) : mintToken(userId, "driver");
      },
    });
    const connected = await client.connect();
    assert.equal(connected.userId, userId);
    assert.equal(calls, 2);
    const [refused] = recorder.of("disconnected");
    assert.equal(refused?.code, 4401);
    assert.equal(refused?.willRetry, true);
    assert.equal(recorder.of("error")[0]?.payload.code, "AUTH_FAILED");
  });

  test("a static token that expires: closed with 4401 after the grace, no reconnect", { timeout: 15_000 }, async () => {
    const userId = unique("static");
    const [client, recorder] = newClient(userId, { token: mintToken(userId, "driver", { ttlS: 2 }) });
    await client.connect();
    const closed = await recorder.next("disconnected", 1, 8_000);
    assert.equal(closed.code, 4401);
    assert.equal(closed.willRetry, false);
    assert.equal(recorder.of("error")[0]?.payload.code, "AUTH_FAILED");
    await sleep(500);
    assert.equal(recorder.of("connecting").length, 1);
    assert.equal(client.state, "closed");
  });
});
