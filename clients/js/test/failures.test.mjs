// Timeouts, unreachable servers, the HTTP fallback for publish, backoff and heartbeats.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { Client, TrioserveError } from "../trioserve.js";
import { Events, WebSocket, WebSocketServer, freePort, recorder, startServer, within } from "./helpers.mjs";

/** A WebSocket server that accepts connections and never says anything. */
async function silentServer() {
  const wss = new WebSocketServer({ host: "127.0.0.1", port: 0 });
  await new Promise((resolve) => wss.on("listening", resolve));
  wss.connections = new Events();
  wss.on("connection", (ws) => wss.connections.push({ kind: "connection", ws }));
  wss.url = `ws://127.0.0.1:${wss.address().port}/ws`;
  wss.stop = () => {
    for (const ws of wss.clients) ws.terminate();
    return new Promise((resolve) => wss.close(resolve));
  };
  return wss;
}

describe("a server that never answers", () => {
  let wss;
  before(async () => {
    wss = await silentServer();
  });
  after(() => wss.stop());

  test("requests reject with code timeout, and subscribe's ready too", async () => {
    const client = new Client(wss.url, { WebSocket, timeout: 300, pingInterval: 0 });
    try {
      const sub = client.subscribe("t");
      const results = await Promise.allSettled([client.ping(), client.publish("t", 1), client.presence("t"), sub.ready]);
      for (const result of results) {
        assert.equal(result.status, "rejected");
        assert.ok(result.reason instanceof TrioserveError);
        assert.equal(result.reason.code, "timeout", result.reason.message);
      }
      assert.match(results[0].reason.message, /no reply to "ping" within 300 ms/);
      assert.equal(sub.active, false);
      assert.equal(client.state, "connected");
    } finally {
      await client.close();
    }
  });

  test("the heartbeat gives up on a silent connection and reconnects", async () => {
    const events = new Events();
    const client = new Client(wss.url, { WebSocket, pingInterval: 100, pingTimeout: 100 });
    client.on("disconnect", (info) => events.push({ kind: "disconnect", ...info }));
    client.on("state", (state) => events.push({ kind: "state", state }));
    try {
      await events.waitFor((items) => items.some((e) => e.kind === "disconnect"), "a disconnect");
      assert.deepEqual(events.of("disconnect")[0], { kind: "disconnect", code: 1006, reason: "heartbeat timeout", reconnect: true });
      await events.waitFor((items) => items.filter((e) => e.state === "connected").length >= 2, "a second connection");
    } finally {
      await client.close();
    }
  });
});

describe("no server at all", () => {
  let port;
  let url;
  before(async () => {
    port = await freePort();
    url = `ws://127.0.0.1:${port}/ws`;
  });

  test("requests reject with no_connection once the timeout passes", async () => {
    const client = new Client(url, { WebSocket, timeout: 300, httpUrl: false });
    try {
      const sub = client.subscribe("t");
      for (const request of [client.presence("t"), client.publish("t", 1), sub.ready]) {
        await assert.rejects(request, (err) => {
          assert.equal(err.code, "no_connection");
          assert.match(err.message, /not connected within 300 ms .*could not connect to ws:\/\/127\.0\.0\.1/);
          return true;
        });
      }
      assert.equal(client.state, "connecting");
    } finally {
      await client.close();
    }
  });

  test("the reconnect backoff is jittered, exponential and bounded", async () => {
    const retries = new Events();
    const client = new Client(url, { WebSocket, minReconnectDelay: 10, maxReconnectDelay: 80 });
    client.on("retry", (info) => retries.push({ kind: "retry", ...info }));
    let server;
    try {
      await retries.count("retry", 12);
      const seen = retries.of("retry").slice(0, 12);
      seen.forEach((retry, i) => {
        assert.equal(retry.attempt, i + 1);
        assert.equal(retry.error.code, "no_connection");
        const cap = Math.min(80, 10 * 2 ** i);
        assert.ok(retry.delay >= 0 && retry.delay <= cap, `attempt ${retry.attempt}: ${retry.delay} ms > ${cap}`);
      });
      // Jittered: not all the same.
      assert.ok(new Set(seen.map((r) => r.delay)).size > 1);
      assert.ok(client.statistics().failedAttempts >= 12);
      // It keeps trying: a server that appears is found.
      const connected = new Promise((resolve) => client.on("state", (s) => s === "connected" && resolve()));
      server = await startServer([], { port });
      await within(connected, "the client to connect");
      await client.ping();
    } finally {
      await client.close();
      await server?.stop();
    }
  });
});

describe("publish over HTTP when the WebSocket cannot connect", () => {
  let server;
  let deadUrl;
  before(async () => {
    server = await startServer(["--api-key", "k3y"]);
    deadUrl = `ws://127.0.0.1:${await freePort()}/ws`;
  });
  after(() => server.stop());

  test("goes to POST /api/publish with the API key, and the subscribers get it", async () => {
    const reader = new Client(server.url, { WebSocket });
    const writer = new Client(deadUrl, { WebSocket, httpUrl: server.httpUrl, apiKey: "k3y" });
    const seen = new Events();
    try {
      await reader.subscribe("news", recorder(seen)).ready;
      const result = await writer.publish("news", { via: "http" });
      assert.deepEqual(result, { offset: 1, subscribers: 1 });
      await seen.count("pub", 1);
      assert.deepEqual(seen.of("pub")[0].data, { via: "http" });
      assert.equal(writer.state, "connecting");
    } finally {
      await Promise.all([reader.close(), writer.close()]);
    }
  });

  test("an HTTP error reply rejects with its code and status", async () => {
    const writer = new Client(deadUrl, { WebSocket, httpUrl: server.httpUrl, apiKey: "wrong" });
    try {
      await assert.rejects(writer.publish("news", 1), (err) => err.code === "unauthorized" && err.status === 401);
    } finally {
      await writer.close();
    }
  });

  test("no HTTP API either: the publish waits for the WebSocket, then no_connection names both failures", async () => {
    const writer = new Client(deadUrl, { WebSocket, timeout: 300, httpUrl: `http://127.0.0.1:${await freePort()}` });
    try {
      await assert.rejects(writer.publish("news", 1), (err) => {
        assert.equal(err.code, "no_connection");
        assert.match(err.message,
          /^not connected within 300 ms for "publish": could not connect to ws:.*; POST http:.*\/api\/publish failed too/);
        return true;
      });
    } finally {
      await writer.close();
    }
  });

  test("no HTTP API yet: a publish waiting for the WebSocket goes out once it connects", async () => {
    const port = await freePort();
    const writer = new Client(`ws://127.0.0.1:${port}/ws`, { WebSocket, minReconnectDelay: 10, maxReconnectDelay: 50 });
    const retries = new Events();
    writer.on("retry", () => retries.push({ kind: "retry" }));
    let later;
    try {
      const publishing = writer.publish("news", "waited");
      await retries.count("retry", 2); // the WebSocket failed, and so did the HTTP API
      later = await startServer(["--client-publish"], { port });
      assert.equal((await publishing).offset, 1);
      assert.equal(writer.state, "connected");
    } finally {
      await writer.close();
      await later?.stop();
    }
  });
});

describe("closes the client does not come back from", () => {
  test("a server close with 1000 ends the client with code closed", async () => {
    const wss = await silentServer();
    const client = new Client(wss.url, { WebSocket, pingInterval: 0 });
    const errors = new Events();
    client.on("error", (err) => errors.push({ kind: "error", code: err.code, closeCode: err.closeCode }));
    const sub = client.subscribe("t", { timeout: Infinity });
    try {
      const [{ ws }] = await wss.connections.count("connection", 1);
      ws.close(1000, "bye");
      await errors.count("error", 1);
      assert.deepEqual(errors.items, [{ kind: "error", code: "closed", closeCode: 1000 }]);
      assert.equal(client.state, "disconnected");
      await assert.rejects(sub.ready, (err) => err.code === "closed");
      await assert.rejects(client.ping(), (err) => err.code === "closed");
    } finally {
      await client.close();
      await wss.stop();
    }
  });
});
