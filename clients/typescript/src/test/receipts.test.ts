// Delivery receipts against a real gateway: the client answers `"receipt": true` once the app's
// handlers for the message have finished, and the receipt reaches the gateway's Redis channel.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { GatewayClient } from "../index.js";
import { clientOptions, Gateway, Recorder, Redis, sleep, unique, uniquePrefix, waitFor } from "./helpers.js";

const prefix = uniquePrefix();
let gateway: Gateway;
let subscriber: Redis;
const receipts: { at: number; event: { type: string; userId: string; payload: { messageId: string } } }[] = [];
const clients: GatewayClient[] = [];

describe("receipts (real gateway)", { timeout: 60_000 }, () => {
  before(async () => {
    gateway = await Gateway.start(prefix);
    subscriber = await Redis.connect();
    await subscriber.subscribe(`${prefix}:events:receipt`, (message) => {
      receipts.push({ at: Date.now(), event: JSON.parse(message) });
    });
  });

  after(async () => {
    await Promise.all(clients.map((c) => c.close()));
    await gateway?.stop();
    subscriber.close();
    const redis = await Redis.connect();
    await redis.cleanup(prefix);
    redis.close();
  });

  test("the receipt is sent after the async handler finished, and only for messages that ask", { timeout: 20_000 }, async () => {
    const userId = unique("receipts");
    const client = new GatewayClient(clientOptions(gateway.url, userId));
    clients.push(client);
    const recorder = new Recorder(client);
    const handledAt = new Map<string, number>();
    client.on("ride_request", async (offer) => {
      await sleep(300); // the app shows the offer
      if (offer.payload.requestId === "broken") throw new Error("the app could not show it");
      handledAt.set(offer.id, Date.now());
    });
    await client.connect();

    const offer = await gateway.broadcast(userId, { type: "ride_request", payload: { requestId: "r1" }, receipt: true });
    assert.equal(offer.status, 202);
    const messageId = offer.body["messageId"] as string;
    const [receipt] = await waitFor("the receipt on the Redis channel", () => receipts.length >= 1 && receipts);
    assert.equal(receipt?.event.type, "receipt");
    assert.equal(receipt?.event.userId, userId);
    assert.deepEqual(receipt?.event.payload, { messageId });
    assert.ok((receipt?.at ?? 0) >= (handledAt.get(messageId) ?? Infinity), "sent only after the handler finished");
    assert.deepEqual(recorder.of("receipt_sent"), [{ messageId }]);
    assert.equal(recorder.of("ack").length, 0, "the receipt's own ack is not shown to the app");

    await gateway.broadcast(userId, { type: "ride_request", payload: { requestId: "r2" } }); // no receipt asked
    await gateway.broadcast(userId, { type: "ride_request", payload: { requestId: "broken" }, receipt: true });
    await waitFor("the failing handler reported", () => recorder.of("client_error").length === 1);
    await sleep(500);
    assert.equal(receipts.length, 1, "no receipt for r2 (not asked) nor for the offer the app failed to handle");
    assert.equal(handledAt.size, 2);
  });

  test("no receipt for a message no handler took (none for its type, none for \"message\")", { timeout: 20_000 }, async () => {
    const userId = unique("unhandled");
    const client = new GatewayClient(clientOptions(gateway.url, userId)); // no Recorder: it listens to "message"
    clients.push(client);
    client.on("notification", () => {}); // another type only
    await client.connect();
    const mine = (): string[] => receipts.filter((r) => r.event.userId === userId).map((r) => r.event.payload.messageId);

    const first = await gateway.broadcast(userId, { type: "ride_request", payload: { requestId: "r1" }, receipt: true });
    await waitFor("r1 reached the client", () => client.resumePosition?.seq === 1);
    await sleep(500);
    assert.deepEqual(mine(), [], `no receipt for ${String(first.body["messageId"])}`);

    client.on("ride_request", () => {});
    const second = await gateway.broadcast(userId, { type: "ride_request", payload: { requestId: "r2" }, receipt: true });
    await waitFor("the receipt for r2", () => mine().length === 1);
    assert.deepEqual(mine(), [second.body["messageId"]]);
  });
});
