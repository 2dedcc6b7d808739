// The fallback to Server-Sent Events when the WebSocket cannot connect.
//
// Run with `node --experimental-eventsource` (Node's EventSource is behind
// that flag; tests/clients/test_js.py passes it for this file), so the
// EventSource is Node's own, a real one, as in a browser. A WebSocket that
// "cannot connect" is a real refused upgrade: the gate below points it at a
// path the server has no WebSocket on, as a proxy that blocks WebSocket would.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { Client, TrioserveError } from "../trioserve.js";
import { Events, WebSocket, httpPublish, range, recorder, startServer } from "./helpers.mjs";

const { EventSource } = globalThis;

function gatedWebSocket(gate) {
  return class GatedWebSocket extends WebSocket {
    constructor(url, ...rest) {
      super(gate.blocked ? url.replace("/ws", "/blocked") : url, ...rest);
      gate.sockets.push(this);
    }
  };
}

/** An EventSource that a proxy refuses while `gate.sseBlocked` (a 404, as for a path it does not pass). */
function gatedEventSource(gate) {
  return class GatedEventSource extends EventSource {
    constructor(url, ...rest) {
      super(gate.sseBlocked ? url.replace("/sse", "/blocked") : url, ...rest);
    }
  };
}

const FAST = { minReconnectDelay: 20, maxReconnectDelay: 200, timeout: 5000, pingInterval: 0 };

describe("the SSE fallback", () => {
  let server;
  before(async () => {
    assert.equal(typeof EventSource, "function", "run with --experimental-eventsource");
    server = await startServer(["--history-size", "5"]);
  });
  after(() => server.stop());

  test("subscriptions go over /sse, publish over POST /api/publish, other requests reject saying why", async () => {
    const gate = { blocked: true, sockets: [] };
    const events = new Events();
    const client = new Client(server.url, { WebSocket: gatedWebSocket(gate), EventSource, ...FAST });
    try {
      const sub = client.subscribe("fb.news", recorder(events));
      const info = await sub.ready;
      assert.equal(info.topic, "fb.news");
      assert.equal(info.offset, 0);
      assert.equal(client.transport, "sse");
      const { offset } = await client.publish("fb.news", { hi: 1 });
      assert.equal(offset, 1);
      await events.count("pub", 1);
      assert.deepEqual(events.of("pub"), [{ kind: "pub", offset: 1, data: { hi: 1 } }]);
      await assert.rejects(client.presence("fb.news"), (err) => {
        assert.ok(err instanceof TrioserveError);
        assert.equal(err.code, "no_connection");
        assert.match(err.message, /"presence" needs the WebSocket, which cannot connect/);
        return true;
      });
      // A second subscription joins the stream (a new one, from where the first is).
      const second = client.subscribe("fb.chat", recorder(events));
      await second.ready;
      await httpPublish(server.httpUrl, "fb.news", 2);
      await httpPublish(server.httpUrl, "fb.chat", "c");
      await events.count("pub", 3);
      assert.deepEqual(events.of("pub").map((e) => e.offset), [1, 2, 1]);
      assert.equal(events.of("gap").length, 0);
    } finally {
      await client.close();
    }
  });

  test("exactly once and in order from the WebSocket to the stream and back", async () => {
    const gate = { blocked: false, sockets: [] };
    const events = new Events();
    const client = new Client(server.url, { WebSocket: gatedWebSocket(gate), EventSource, ...FAST });
    const seen = [];
    try {
      const sub = client.subscribe("fb.switch", {
        ...recorder(events),
        onPublication: (pub) => {
          seen.push(pub.offset);
          events.push({ kind: "pub", offset: pub.offset, via: client.transport });
        },
      });
      await sub.ready;
      assert.equal(client.transport, "websocket");
      for (const i of range(1, 3)) await httpPublish(server.httpUrl, "fb.switch", i);
      await events.count("pub", 3);
      // The WebSocket drops, and cannot come back: publications meanwhile come over /sse.
      gate.blocked = true;
      gate.sockets.at(-1).terminate();
      for (const i of range(4, 5)) await httpPublish(server.httpUrl, "fb.switch", i);
      await events.count("pub", 5);
      await events.waitFor(() => client.transport === "sse", "the stream");
      await httpPublish(server.httpUrl, "fb.switch", 6);
      await events.count("pub", 6);
      assert.equal(events.of("pub")[5].via, "sse");
      // The WebSocket is let through again: it takes the subscription back, with since.
      gate.blocked = false;
      await events.waitFor(() => client.transport === "websocket", "the WebSocket back", 10000);
      for (const i of range(7, 8)) await httpPublish(server.httpUrl, "fb.switch", i);
      await events.count("pub", 8);
      assert.deepEqual(seen, range(1, 8));
      assert.equal(events.of("pub")[7].via, "websocket");
      assert.equal(events.of("gap").length, 0);
    } finally {
      await client.close();
    }
  });

  test("a gap history cannot fill is reported over the stream too", async () => {
    const gate = { blocked: false, sseBlocked: true, sockets: [] };
    const events = new Events();
    const client = new Client(server.url, {
      WebSocket: gatedWebSocket(gate), EventSource: gatedEventSource(gate), ...FAST,
    });
    try {
      const sub = client.subscribe("fb.gap", recorder(events));
      await sub.ready;
      await httpPublish(server.httpUrl, "fb.gap", 1);
      await events.count("pub", 1);
      gate.blocked = true;
      gate.sockets.at(-1).terminate();
      // More than --history-size 5 while neither transport gets through.
      for (const i of range(2, 9)) await httpPublish(server.httpUrl, "fb.gap", i);
      gate.sseBlocked = false;
      await events.count("gap", 1);
      const gap = events.of("gap")[0];
      assert.equal(gap.topic, "fb.gap");
      assert.equal(gap.lastOffset, 1);
      assert.equal(gap.offset, 9);
      await httpPublish(server.httpUrl, "fb.gap", 10);
      await events.waitFor((items) => items.some((e) => e.kind === "pub" && e.offset === 10), "offset 10");
    } finally {
      await client.close();
    }
  });
});
