// Tokens: getToken on every connection, a refresh on refresh_required, a
// reconnect with a fresh token after 4001, and the end for a refused token.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { Client } from "../trioserve.js";
import { Events, WebSocket, httpPublish, makeToken, range, recorder, spyingWebSocket, startServer } from "./helpers.mjs";

const SECRET = "js-client-test-secret-0123456789-abcdef";
const CLAIMS = { sub: "alice", subscribe: ["news"], publish: ["news"], presence: true };
// A token that expires within 2 s (exp is whole seconds), and one that lasts.
const shortToken = () => makeToken(SECRET, { ...CLAIMS, ttl: 2 });
const longToken = () => makeToken(SECRET, CLAIMS);

describe("a server that requires tokens", () => {
  let server;
  before(async () => {
    server = await startServer(["--token-secret", SECRET], { env: { TRIOSERVE_REFRESH_GRACE: "1" } });
  });
  after(() => server.stop());

  test("refresh_required: getToken's fresh token is sent, and the connection stays", async () => {
    const wire = new Events();
    const seen = new Events();
    const tokens = [shortToken(), longToken()];
    let calls = 0;
    const client = new Client(server.url, {
      WebSocket: spyingWebSocket(wire),
      getToken: async () => tokens[Math.min(calls++, 1)],
    });
    client.on("disconnect", (info) => seen.push({ kind: "disconnect", ...info }));
    try {
      const sub = client.subscribe("news", recorder(seen));
      await sub.ready;
      await wire.waitFor((items) => items.some((e) => e.kind === "in" && e.msg.op === "refresh_required"),
        "refresh_required");
      const refresh = await wire.waitFor((items) => items.some((e) => e.kind === "out" && e.msg.op === "refresh"),
        "the refresh").then((items) => items.find((e) => e.kind === "out" && e.msg.op === "refresh").msg);
      assert.equal(refresh.token, tokens[1]);
      await wire.waitFor((items) => items.some((e) => e.kind === "in" && e.msg.id === refresh.id),
        "the refresh's reply");
      assert.deepEqual(wire.items.find((e) => e.kind === "in" && e.msg.id === refresh.id).msg,
        { id: refresh.id, ok: true, client: "alice" });
      assert.equal(calls, 2);
      await client.publish("news", "still here");
      await seen.count("pub", 1);
      assert.deepEqual(seen.of("disconnect"), []);
      assert.equal(wire.of("socket").length, 1);
      assert.match(wire.of("socket")[0].url, /\?token=/);
    } finally {
      await client.close();
    }
  });

  test("a 4001 close: getToken gives a fresh token, the client reconnects and recovers", async () => {
    const seen = new Events();
    const errors = [];
    let calls = 0;
    const client = new Client(server.url, {
      WebSocket,
      minReconnectDelay: 20,
      getToken: async () => {
        calls += 1;
        if (calls === 1) return shortToken();
        if (calls === 2) throw new Error("the auth service is down"); // so the refresh fails
        return longToken();
      },
    });
    client.on("disconnect", (info) => seen.push({ kind: "disconnect", ...info }));
    client.on("error", (err) => errors.push(err.message));
    try {
      await client.subscribe("news", recorder(seen)).ready;
      await client.publish("news", 1);
      await seen.waitFor((items) => items.some((e) => e.kind === "disconnect"), "the 4001 close");
      const [closed] = seen.of("disconnect");
      assert.equal(closed.code, 4001);
      assert.match(closed.reason, /unauthorized/);
      assert.equal(closed.reconnect, true);
      await httpPublish(server.httpUrl, "news", 2); // while it reconnects, or after
      await seen.waitFor((items) => items.some((e) => e.kind === "subscribed" && e.resubscribed), "the resubscribe");
      await client.publish("news", 3);
      await seen.count("pub", 3);
      assert.deepEqual(seen.of("pub").map((p) => p.data), range(1, 3));
      assert.deepEqual(seen.of("gap"), []);
      assert.equal(calls, 3);
      assert.equal(client.state, "connected");
      assert.ok(errors.some((m) => /the auth service is down/.test(m)), errors);
    } finally {
      await client.close();
    }
  });

  test("a fixed token that is refused ends the client with unauthorized", async () => {
    const client = new Client(server.url, { WebSocket, token: makeToken(SECRET, { ...CLAIMS, ttl: -10 }) });
    const states = new Events();
    client.on("state", (state) => states.push({ kind: "state", state }));
    client.on("error", () => {});
    const sub = client.subscribe("news", { timeout: Infinity });
    try {
      await assert.rejects(sub.ready, (err) => {
        assert.equal(err.code, "unauthorized");
        assert.equal(err.closeCode, 4001);
        assert.match(err.message, /token_expired/);
        return true;
      });
      assert.equal(client.state, "disconnected");
      assert.equal(client.error.code, "unauthorized");
      await assert.rejects(client.ping(), (err) => err.code === "unauthorized");
    } finally {
      await client.close();
    }
  });

  test("unsubscribed by the server API: the subscription ends with onError, and stays ended", async () => {
    const seen = new Events();
    const client = new Client(server.url, { WebSocket, getToken: longToken });
    try {
      const sub = client.subscribe("news", recorder(seen));
      await sub.ready;
      const res = await fetch(`${server.httpUrl}/api/unsubscribe`,
        { method: "POST", body: JSON.stringify({ user: "alice", topic: "news" }) });
      assert.equal((await res.json()).unsubscribed, 1);
      const [error] = await seen.waitFor((items) => items.some((e) => e.kind === "error"), "onError")
        .then((items) => items.filter((e) => e.kind === "error"));
      assert.equal(error.code, "unsubscribed");
      assert.equal(sub.active, false);  // not subscribed again on the next connection
    } finally {
      await client.close();
    }
  });

  test("getToken's tokens refused twice in a row: the client stops", async () => {
    let calls = 0;
    const client = new Client(server.url, {
      WebSocket,
      minReconnectDelay: 20,
      getToken: () => {
        calls += 1;
        return makeToken("not-the-secret-but-long-enough-0123456789", CLAIMS);
      },
    });
    client.on("error", () => {});
    const done = new Promise((resolve) => client.on("state", (s) => s === "disconnected" && resolve()));
    try {
      await done;
      assert.equal(calls, 2);
      assert.equal(client.error.code, "unauthorized");
      assert.match(client.error.message, /bad_signature/);
    } finally {
      await client.close();
    }
  });
});
