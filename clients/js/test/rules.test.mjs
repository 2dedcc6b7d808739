// The recovery rules, message by message, against a scripted fake WebSocket:
// the orderings a real server produces only under load.

import assert from "node:assert/strict";
import { test } from "node:test";

import { Client } from "../trioserve.js";
import { Events, recorder } from "./helpers.mjs";

/** A WebSocket whose server side is the test: `sent` records, `deliver` plays the server. */
function fakeWebSockets() {
  const sockets = new Events();
  class FakeWebSocket {
    constructor(url) {
      this.url = url;
      this.readyState = 0;
      this.sent = new Events();
      sockets.push({ kind: "socket", ws: this });
      queueMicrotask(() => {
        this.readyState = 1;
        this.onopen?.({});
      });
    }

    send(text) {
      this.sent.push({ kind: "out", msg: JSON.parse(text) });
    }

    deliver(msg) {
      this.onmessage?.({ data: JSON.stringify(msg) });
    }

    close(code = 1005, reason = "") {
      this.readyState = 3;
      queueMicrotask(() => this.onclose?.({ code, reason }));
    }

    /** The next command of `op`, waiting for it. */
    async next(op) {
      const seen = this.sent.of("out").filter((e) => e.msg.op === op).length;
      this._taken ??= {};
      const index = this._taken[op] ?? 0;
      if (index >= seen) {
        await this.sent.waitFor((items) => items.filter((e) => e.msg.op === op).length > index, op, 5000);
      }
      this._taken[op] = index + 1;
      return this.sent.of("out").filter((e) => e.msg.op === op)[index].msg;
    }
  }
  return { FakeWebSocket, sockets };
}

const pub = (offset, data = offset) => ({ op: "pub", topic: "t", offset, data });

async function setup() {
  const { FakeWebSocket, sockets } = fakeWebSockets();
  const client = new Client("ws://fake/ws", { WebSocket: FakeWebSocket, minReconnectDelay: 1, pingInterval: 0 });
  const seen = new Events();
  const sub = client.subscribe("t", recorder(seen));
  const [{ ws }] = await sockets.count("socket", 1);
  return { client, sub, seen, ws, sockets };
}

test("publications that arrive before the subscribe reply wait for it; duplicates are skipped", async () => {
  const { client, seen, ws } = await setup();
  const subscribe = await ws.next("subscribe");
  assert.equal(subscribe.since, undefined);
  ws.deliver(pub(5)); // already in the position the reply will give
  ws.deliver(pub(6));
  assert.deepEqual(seen.items, []);
  ws.deliver({ id: subscribe.id, ok: true, topic: "t", epoch: "e1", offset: 5 });
  ws.deliver(pub(6)); // a duplicate
  ws.deliver(pub(7));
  assert.deepEqual(seen.of("pub").map((p) => p.offset), [6, 7]);
  assert.equal(client.statistics().duplicates, 2);
  await client.close();
});

test("a jump on a live connection is refetched with since, in order", async () => {
  const { client, seen, ws } = await setup();
  const first = await ws.next("subscribe");
  ws.deliver({ id: first.id, ok: true, topic: "t", epoch: "e1", offset: 0 });
  ws.deliver(pub(1));
  ws.deliver(pub(4)); // 2 and 3 were dropped for this client
  const refetch = await ws.next("subscribe");
  assert.deepEqual(refetch.since, { epoch: "e1", offset: 1 });
  ws.deliver(pub(5)); // held until the reply
  ws.deliver({ id: refetch.id, ok: true, topic: "t", epoch: "e1", offset: 5, recovered: true,
    publications: [pub(2), pub(3), pub(4), pub(5)] });
  ws.deliver(pub(6));
  assert.deepEqual(seen.of("pub").map((p) => p.offset), [1, 2, 3, 4, 5, 6]);
  assert.deepEqual(seen.of("gap"), []);
  await client.close();
});

test("an unrecoverable resubscribe reports the gap before the held publications", async () => {
  const { client, seen, ws, sockets } = await setup();
  const first = await ws.next("subscribe");
  ws.deliver({ id: first.id, ok: true, topic: "t", epoch: "e1", offset: 10 });
  ws.deliver(pub(11));
  ws.close(1001, "going away");
  const [, { ws: ws2 }] = await sockets.count("socket", 2);
  const again = await ws2.next("subscribe");
  assert.deepEqual(again.since, { epoch: "e1", offset: 11 });
  ws2.deliver(pub(31, "live")); // arrives before the reply, which says 31
  ws2.deliver({ id: again.id, ok: true, topic: "t", epoch: "e1", offset: 31, recovered: false, publications: [] });
  assert.deepEqual(seen.items.filter((e) => e.kind !== "subscribed").map((e) => e.kind === "gap" ? [e.lastOffset, e.offset] : e.offset),
    [11, [11, 30], 31]);
  assert.equal(client.statistics().gaps, 1);
  await client.close();
});

test("a resubscribe the server refuses ends the subscription through onError", async () => {
  const { client, seen, ws, sockets, sub } = await setup();
  const first = await ws.next("subscribe");
  ws.deliver({ id: first.id, ok: true, topic: "t", epoch: "e1", offset: 0 });
  ws.close(1006, "");
  const [, { ws: ws2 }] = await sockets.count("socket", 2);
  const again = await ws2.next("subscribe");
  ws2.deliver({ id: again.id, ok: false, error: { code: "forbidden", message: "not any more" } });
  assert.deepEqual(seen.of("error"), [{ kind: "error", code: "forbidden", message: "forbidden: not any more" }]);
  assert.equal(sub.active, false);
  assert.equal(client.getSubscription("t"), null);
  await client.close();
});

test("a publish in flight when the connection drops rejects with connection_lost; presence is sent again", async () => {
  const { client, ws, sockets } = await setup();
  const publishing = client.publish("t", 1);
  const presence = client.presence("t");
  await ws.next("publish");
  await ws.next("presence");
  ws.close(1006, "");
  await assert.rejects(publishing, (err) => err.code === "connection_lost");
  const [, { ws: ws2 }] = await sockets.count("socket", 2);
  const resent = await ws2.next("presence");
  ws2.deliver({ id: resent.id, ok: true, topic: "t", clients: [{ client: "a", conn: "c1", transport: "websocket" }] });
  assert.deepEqual(await presence, [{ client: "a", conn: "c1", transport: "websocket" }]);
  await client.close();
});

test("an exception in a handler goes to the error event and delivery goes on", async () => {
  const { FakeWebSocket, sockets } = fakeWebSockets();
  const client = new Client("ws://fake/ws", { WebSocket: FakeWebSocket, pingInterval: 0 });
  const errors = [];
  client.on("error", (err) => errors.push(err.message));
  const offsets = [];
  client.subscribe("t", {
    onPublication(p) {
      offsets.push(p.offset);
      if (p.offset === 1) throw new Error("handler bug");
    },
  });
  const [{ ws }] = await sockets.count("socket", 1);
  const first = await ws.next("subscribe");
  ws.deliver({ id: first.id, ok: true, topic: "t", epoch: "e1", offset: 0 });
  ws.deliver(pub(1));
  ws.deliver(pub(2));
  assert.deepEqual(offsets, [1, 2]);
  assert.deepEqual(errors, ["handler bug"]);
  await client.close();
});
