// The pure parts: backoff, the close-code rules, JWT reading, the resume position, the URL.
import assert from "node:assert/strict";
import { describe, test } from "node:test";

import {
  backoffCeiling,
  buildConnectUrl,
  connectProtocols,
  decideReconnect,
  decodeJwtPayload,
  DEFAULT_POLICY,
  fullJitter,
  ConnectionSeqs,
  ResumeTracker,
  tokenExpiresAt,
  type ConnectedPayload,
} from "../index.js";
import { mintToken } from "./helpers.js";

describe("backoff", () => {
  test("the ceiling doubles from the base and stops at the cap", () => {
    const options = { baseMs: 500, capMs: 30_000 };
    assert.deepEqual(
      [0, 1, 2, 3, 4, 5, 6, 7, 100, 5000].map((n) => backoffCeiling(n, options)),
      [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000, 30000],
    );
  });

  test("full jitter is uniform in [0, ceiling]", () => {
    const options = { baseMs: 500, capMs: 30_000 };
    assert.equal(fullJitter(3, options, () => 0), 0);
    assert.equal(fullJitter(3, options, () => 0.5), 2000);
    for (let i = 0; i < 1000; i++) {
      const delay = fullJitter(i % 12, options);
      assert.ok(delay >= 0 && delay <= backoffCeiling(i % 12, options));
    }
  });
});

describe("reconnect rules by close code", () => {
  const context = { attempt: 2, canRefreshToken: true, authFailures: 0 };
  const half = (): number => 0.5;

  test("4400 and 4409: no reconnect", () => {
    assert.equal(decideReconnect({ ...context, code: 4400 }).retry, false);
    assert.equal(decideReconnect({ ...context, code: 4409 }).retry, false);
  });

  test("4401: a fresh token from the provider, then reconnect; give up without a provider or after 3 in a row", () => {
    assert.deepEqual(decideReconnect({ ...context, code: 4401, authFailures: 1 }, DEFAULT_POLICY, half), {
      retry: true,
      delayMs: 1000,
      freshToken: true,
    });
    assert.equal(decideReconnect({ ...context, code: 4401, authFailures: 3 }).retry, false);
    assert.equal(decideReconnect({ ...context, code: 4401, authFailures: 1, canRefreshToken: false }).retry, false);
  });

  test("4429 and 1013 wait longer than a network drop", () => {
    for (const code of [4429, 1013]) {
      const decision = decideReconnect({ ...context, code, attempt: 0 }, DEFAULT_POLICY, () => 0);
      assert.deepEqual(decision, { retry: true, delayMs: DEFAULT_POLICY.throttled.minMs, freshToken: false });
      const most = decideReconnect({ ...context, code, attempt: 2 }, DEFAULT_POLICY, () => 1);
      assert.ok(most.retry && most.delayMs === 2_000 + 20_000);
    }
  });

  test("1001: a small jittered delay whatever the attempt count", () => {
    const decision = decideReconnect({ ...context, code: 1001, attempt: 9 }, DEFAULT_POLICY, () => 0.99);
    assert.ok(decision.retry && decision.delayMs <= DEFAULT_POLICY.goingAwayMaxMs);
  });

  test("anything else: full-jitter backoff", () => {
    for (const code of [1006, 1011, 4408, 4503, 1000]) {
      const decision = decideReconnect({ ...context, code, attempt: 3 }, DEFAULT_POLICY, () => 1);
      assert.deepEqual(decision, { retry: true, delayMs: 4000, freshToken: false });
    }
  });
});

describe("jwt", () => {
  test("reads the claims without verifying, UTF-8 included", () => {
    const token = mintToken("Zoë-ñ-東京", "driver", { ttlS: 60 });
    const claims = decodeJwtPayload(token);
    assert.equal(claims?.["sub"], "Zoë-ñ-東京");
    const exp = tokenExpiresAt(token);
    assert.ok(exp !== null && Math.abs(exp - (Date.now() + 60_000)) < 2_000);
  });

  test("not a JWT: null", () => {
    assert.equal(decodeJwtPayload("opaque-token"), null);
    assert.equal(decodeJwtPayload("a.!!!.c"), null);
    assert.equal(tokenExpiresAt("a.e30.c"), null); // {} has no exp
  });
});

describe("resume position", () => {
  const connected = (extra: Partial<ConnectedPayload>): ConnectedPayload => ({
    connectionId: "c",
    serverId: "s",
    userId: "u",
    userType: "driver",
    deviceId: "d",
    platform: "ios",
    heartbeatInterval: 1000,
    ...extra,
  });

  test("a fresh start counts from the user's current seq; duplicates are recognised", () => {
    const tracker = new ResumeTracker();
    assert.deepEqual(tracker.onConnected(connected({ epoch: "e1", seq: 4 }), null), { resync: false, previous: null });
    assert.deepEqual(tracker.position, { epoch: "e1", seq: 4 });
    assert.equal(tracker.isDuplicate(4), true);
    assert.equal(tracker.isDuplicate(5), false);
    assert.equal(tracker.advance(5), true);
    assert.equal(tracker.advance(5), false);
    assert.equal(tracker.isDuplicate(5), true);
  });

  test("recovered keeps counting; not recovered resyncs under the new epoch", () => {
    const tracker = new ResumeTracker();
    tracker.restore({ epoch: "e1", seq: 7 });
    const from = tracker.position;
    assert.equal(tracker.onConnected(connected({ epoch: "e1", seq: 9, recovered: true }), from).resync, false);
    assert.deepEqual(tracker.position, { epoch: "e1", seq: 7 }); // 8 and 9 follow as replays
    const outcome = tracker.onConnected(connected({ epoch: "e2", seq: 0, recovered: false }), tracker.position);
    assert.deepEqual(outcome, { resync: true, previous: { epoch: "e1", seq: 7 } });
    assert.deepEqual(tracker.position, { epoch: "e2", seq: 0 });
  });

  test("no recording on the gateway: no position", () => {
    const tracker = new ResumeTracker();
    tracker.onConnected(connected({}), null);
    assert.equal(tracker.position, null);
    assert.equal(tracker.isDuplicate(1), false);
  });

  test("one connection's seqs: above the baseline, then strictly increasing; anything else is a restart", () => {
    const fresh = ConnectionSeqs.fromConnected(connected({ epoch: "e1", seq: 4 }), null);
    assert.equal(fresh.recovered, false);
    assert.deepEqual([5, 6, 6, 1, 2, 9, 3].map((seq) => fresh.restarts(seq)), [false, false, true, true, false, false, true]);
    assert.equal(ConnectionSeqs.fromConnected(connected({ epoch: "e1", seq: 4 }), null).restarts(4), true);

    const resumed = ConnectionSeqs.fromConnected(connected({ epoch: "e1", seq: 9, recovered: true }), { epoch: "e1", seq: 7 });
    assert.equal(resumed.recovered, true);
    assert.equal(resumed.restarts(8), false); // the replay starts at since + 1
    const early = ConnectionSeqs.fromConnected(connected({ epoch: "e1", seq: 9, recovered: true }), { epoch: "e1", seq: 7 });
    assert.equal(early.restarts(7), true);

    const lost = ConnectionSeqs.fromConnected(connected({ epoch: "e2", seq: 3, recovered: false }), { epoch: "e1", seq: 7 });
    assert.equal(lost.recovered, false);
    assert.equal(lost.restarts(3), true);
    assert.equal(ConnectionSeqs.fromConnected(connected({}), null).restarts(1), false); // no seq: from 0
  });

  test("rebase keeps the epoch string and takes the seq, even a lower one", () => {
    const tracker = new ResumeTracker();
    assert.equal(tracker.rebase(1), false);
    tracker.restore({ epoch: "e1", seq: 7 });
    assert.equal(tracker.rebase(1), true);
    assert.deepEqual(tracker.position, { epoch: "e1", seq: 1 });
  });

  test("a malformed stored position is ignored", () => {
    const tracker = new ResumeTracker();
    tracker.restore({ epoch: "", seq: 1 });
    tracker.restore({ epoch: "e", seq: -1 });
    tracker.restore({ epoch: "e", seq: 1.5 });
    assert.equal(tracker.position, null);
  });
});

describe("connect URL", () => {
  const params = {
    token: "a.b+c", tokenTransport: "query", userType: "driver", deviceId: "dev:1", platform: "ios", resumeFrom: null,
  } as const;

  test("by default the token travels as the bearer subprotocol, never in the URL", () => {
    const jwt = { ...params, token: "eyJh.eyJz.sig-_x", tokenTransport: undefined };
    assert.equal(buildConnectUrl("ws://h:4010", jwt), "ws://h:4010/ws?userType=driver&deviceId=dev%3A1&platform=ios");
    assert.deepEqual(connectProtocols(jwt), ["tornado-gateway", "bearer.eyJh.eyJz.sig-_x"]);
  });

  test("a token a subprotocol name cannot hold goes in the query instead", () => {
    const opaque = { ...params, token: "a/b=", tokenTransport: undefined };
    assert.deepEqual(connectProtocols(opaque), []);
    assert.match(buildConnectUrl("ws://h:4010", opaque), /\?token=a%2Fb%3D&/);
  });

  test("adds /ws to a bare host and encodes every parameter", () => {
    assert.equal(
      buildConnectUrl("ws://h:4010", params),
      "ws://h:4010/ws?token=a.b%2Bc&userType=driver&deviceId=dev%3A1&platform=ios",
    );
    assert.equal(buildConnectUrl("ws://h:4010/", params).split("?")[0], "ws://h:4010/ws");
  });

  test("keeps a path and a query of its own; adds since and epoch when resuming", () => {
    const url = buildConnectUrl("wss://h/gw/ws?region=eu", { ...params, resumeFrom: { epoch: "e 1", seq: 12 } });
    assert.equal(url, "wss://h/gw/ws?region=eu&token=a.b%2Bc&userType=driver&deviceId=dev%3A1&platform=ios&since=12&epoch=e%201");
  });
});
