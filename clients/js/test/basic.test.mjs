// Subscribing, publishing, presence and error replies against a real trioserve.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { Client, TrioserveError } from "../trioserve.js";
import { Events, WebSocket, httpPublish, range, recorder, startServer, within } from "./helpers.mjs";

describe("a server with client publishing", () => {
  let server;
  const clients = [];
  const connect = (options = {}) => {
    const client = new Client(server.url, { WebSocket, ...options });
    clients.push(client);
    return client;
  };

  before(async () => {
    server = await startServer(["--client-publish"]);
  });

  after(async () => {
    await Promise.all(clients.map((c) => c.close()));
    await server.stop();
  });

  test("every publication arrives once, in order, from a client and over HTTP", async () => {
    const alice = connect();
    const bob = connect();
    const seen = new Events();
    const states = [];
    alice.on("state", (s) => states.push(s));
    const sub = alice.subscribe("news", recorder(seen));
    const info = await within(sub.ready, "subscribed");
    assert.deepEqual({ ...info, epoch: typeof info.epoch },
      { topic: "news", epoch: "string", offset: 0, recovered: false, resubscribed: false });
    assert.equal(alice.state, "connected");
    assert.deepEqual(states, ["connected"]);
    for (const n of range(1, 20)) {
      const result = await bob.publish("news", { n });
      assert.equal(result.offset, n);
      assert.equal(result.subscribers, 1);
    }
    await httpPublish(server.httpUrl, "news", { n: 21 });
    await seen.count("pub", 21);
    assert.deepEqual(seen.of("pub").map((p) => p.offset), range(1, 21));
    assert.deepEqual(seen.of("pub").map((p) => p.data.n), range(1, 21));
    assert.deepEqual(sub.position, { epoch: info.epoch, offset: 21 });
    assert.deepEqual(seen.of("gap"), []);
    assert.equal(alice.statistics().publications, 21);
  });

  test("presence, ping and a custom op's error", async () => {
    const client = connect();
    const sub = client.subscribe("room");
    await sub.ready;
    const members = await client.presence("room");
    assert.equal(members.length, 1);
    assert.equal(members[0].transport, "websocket");
    await client.ping();
    await assert.rejects(client.request("no_such_op"), (err) => err instanceof TrioserveError && err.code === "unknown_op");
  });

  test("a refused subscribe rejects ready with the server's code", async () => {
    const client = connect();
    const sub = client.subscribe("not a topic!");
    await assert.rejects(sub.ready, (err) => err.code === "bad_request" && /topic/.test(err.message));
    assert.equal(sub.active, false);
    assert.equal(client.getSubscription("not a topic!"), null);
    // The client carries on.
    await client.ping();
  });

  test("subscribing twice to a topic throws; after unsubscribe nothing more arrives", async () => {
    const client = connect();
    const seen = new Events();
    const sub = client.subscribe("once", recorder(seen));
    assert.throws(() => client.subscribe("once"), /already subscribed/);
    await sub.ready;
    await client.publish("once", 1);
    await seen.count("pub", 1);
    sub.unsubscribe();
    // The unsubscribe went out before this publish on the same socket: the server has no subscriber left.
    const result = await client.publish("once", 2);
    assert.equal(result.subscribers, 0);
    // A new subscription starts where its reply says. Publication 2 was accepted with
    // no subscriber, but the hub may fan it out after this subscribe: then the new
    // subscription starts at offset 1 and receives 2 live, as the protocol says.
    const seenAgain = new Events();
    const again = client.subscribe("once", recorder(seenAgain));
    const info = await again.ready;
    await client.publish("once", 3);
    const expected = info.offset >= 2 ? [3] : [2, 3];
    await seenAgain.count("pub", expected.length);
    assert.deepEqual(seenAgain.of("pub").map((p) => p.data), expected);
    assert.deepEqual(seen.of("pub").map((p) => p.data), [1]);  // nothing after the unsubscribe
  });

  test("since: a new client continues from a saved position", async () => {
    const first = connect();
    const seen = new Events();
    const sub = first.subscribe("saved", recorder(seen));
    await sub.ready;
    for (const n of range(1, 3)) await first.publish("saved", n);
    await seen.count("pub", 3);
    const position = sub.position;
    sub.unsubscribe();
    for (const n of range(4, 6)) await first.publish("saved", n);
    const later = new Events();
    const second = connect();
    const resumed = second.subscribe("saved", { ...recorder(later), since: position });
    const info = await resumed.ready;
    assert.equal(info.recovered, true);
    await later.count("pub", 3);
    assert.deepEqual(later.of("pub").map((p) => p.offset), [4, 5, 6]);
  });

  test("publish checks its data before sending", async () => {
    const client = connect();
    await assert.rejects(client.publish("news", undefined), TypeError);
    await assert.rejects(client.publish("news", 10n), TypeError);
  });

  test("close rejects what is pending and ends the subscriptions quietly", async () => {
    const client = connect();
    const seen = new Events();
    const sub = client.subscribe("closing", recorder(seen));
    await sub.ready;
    const states = [];
    client.on("state", (s) => states.push(s));
    await client.close();
    assert.equal(client.state, "disconnected");
    assert.deepEqual(states, ["disconnected"]);
    assert.equal(sub.active, false);
    assert.deepEqual(seen.of("error"), []);
    await assert.rejects(client.ping(), (err) => err.code === "closed");
    assert.throws(() => client.subscribe("other"), (err) => err.code === "closed");
  });
});

describe("a server without client publishing", () => {
  test("publish is refused with forbidden, and the connection stays", async () => {
    const server = await startServer();
    const client = new Client(server.url, { WebSocket });
    try {
      await assert.rejects(client.publish("news", 1), (err) => err.code === "forbidden" && err instanceof TrioserveError);
      await client.ping();
      assert.equal(client.statistics().reconnects, 0);
    } finally {
      await client.close();
      await server.stop();
    }
  });
});

describe("the served module", () => {
  test("GET /trioserve.js is this file, importable as an ES module", async () => {
    const server = await startServer();
    try {
      const res = await fetch(`${server.httpUrl}/trioserve.js`);
      assert.equal(res.status, 200);
      assert.equal(res.headers.get("content-type"), "text/javascript; charset=utf-8");
      const served = await res.text();
      const { readFile } = await import("node:fs/promises");
      assert.equal(served, await readFile(new URL("../trioserve.js", import.meta.url), "utf8"));
      const module = await import(`data:text/javascript;base64,${Buffer.from(served).toString("base64")}`);
      assert.equal(typeof module.Client, "function");
      assert.equal(module.default, module.Client);
    } finally {
      await server.stop();
    }
  });
});
