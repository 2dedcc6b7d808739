// Recovery across restarts: a gap with the in-memory hub, every publication
// exactly once with Redis (server restarts and worker restarts).

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { Client } from "../trioserve.js";
import { Events, WebSocket, httpPublish, range, recorder, startRedis, startServer } from "./helpers.mjs";

const FAST = { WebSocket, minReconnectDelay: 20, maxReconnectDelay: 200 };

/** Resubscribes so far: subscribe replies after the first. */
const resubscribes = (events) => events.filter((e) => e.kind === "subscribed" && e.resubscribed).length;

describe("the in-memory hub", () => {
  test("a restart is a new epoch: the subscriber is told of the gap, then gets what follows", async () => {
    let server = await startServer(["--drain-timeout", "5"]);
    const port = server.port;
    const client = new Client(server.url, FAST);
    const seen = new Events();
    const disconnects = [];
    client.on("disconnect", (info) => disconnects.push(info.code));
    try {
      const sub = client.subscribe("news", recorder(seen));
      const first = await sub.ready;
      for (const n of range(1, 3)) await httpPublish(server.httpUrl, "news", n);
      await seen.count("pub", 3);
      assert.equal((await server.stop()).code, 0);
      server = await startServer(["--drain-timeout", "5"], { port });
      await seen.waitFor((items) => resubscribes(items) >= 1, "the resubscribe");
      await httpPublish(server.httpUrl, "news", "after");
      await seen.count("pub", 4);
      assert.deepEqual(disconnects, [1001]);
      const gap = seen.of("gap");
      assert.equal(gap.length, 1);
      assert.equal(gap[0].topic, "news");
      assert.equal(gap[0].recovered, false);
      assert.equal(gap[0].lastEpoch, first.epoch);
      assert.equal(gap[0].lastOffset, 3);
      assert.notEqual(gap[0].epoch, first.epoch);
      assert.equal(gap[0].offset, 0);
      // In order: the three before, the gap, the new server's first.
      assert.deepEqual(seen.items.filter((e) => e.kind !== "subscribed").map((e) => e.kind === "gap" ? "gap" : e.data),
        [1, 2, 3, "gap", "after"]);
      assert.deepEqual(seen.of("pub").map((e) => e.offset), [1, 2, 3, 1]);
      assert.deepEqual(sub.position, { epoch: gap[0].epoch, offset: 1 });
    } finally {
      await client.close();
      await server.stop();
    }
  });
});

describe("the Redis broker", () => {
  let redis;
  let other; // a second node on the same Redis: it publishes while the first is down
  before(async () => {
    redis = await startRedis();
    other = await startServer(["--broker", redis.url]);
  });
  after(async () => {
    await other?.stop();
    await redis?.stop();
  });

  /** Publish `from`..`to` to `topic` through the other node, one after another. */
  async function publish(topic, from, to) {
    for (const n of range(from, to)) {
      const reply = await httpPublish(other.httpUrl, topic, n);
      assert.equal(reply.offset, n);
    }
  }

  test("across a server restart: every publication exactly once, in order, no gap", async () => {
    let server = await startServer(["--broker", redis.url, "--drain-timeout", "5"]);
    const port = server.port;
    const client = new Client(server.url, FAST);
    const seen = new Events();
    try {
      await client.subscribe("orders", recorder(seen)).ready;
      await publish("orders", 1, 10);
      await seen.count("pub", 10);
      await server.stop();
      await publish("orders", 11, 20); // while the subscriber's server is down
      // Publishing goes on while the client reconnects and resubscribes.
      const publishing = publish("orders", 21, 60);
      server = await startServer(["--broker", redis.url, "--drain-timeout", "5"], { port });
      await publishing;
      await seen.count("pub", 60);
      assert.deepEqual(seen.of("pub").map((p) => p.offset), range(1, 60));
      assert.deepEqual(seen.of("pub").map((p) => p.data), range(1, 60));
      assert.deepEqual(seen.of("gap"), []);
      const again = seen.of("subscribed").filter((s) => s.resubscribed);
      assert.equal(again.length, 1);
      assert.equal(again[0].recovered, true);
      assert.equal(client.statistics().gaps, 0);
    } finally {
      await client.close();
      await server.stop();
    }
  });

  test("across worker restarts: the killed workers' subscriber recovers exactly", async () => {
    const workers = await startServer(["--broker", redis.url, "--workers", "2"]);
    const client = new Client(workers.url, FAST);
    const seen = new Events();
    const disconnects = [];
    client.on("disconnect", (info) => disconnects.push(info.code));
    try {
      await workers.waitForLog(/worker 1 \(pid \d+\) ready/);
      await workers.waitForLog(/worker 2 \(pid \d+\) ready/);
      await client.subscribe("jobs", recorder(seen)).ready;
      await publish("jobs", 1, 5);
      await seen.count("pub", 5);
      const start = workers.log.length;
      const pids = [...workers.log.matchAll(/worker \d \(pid (\d+)\) ready/g)].map((m) => Number(m[1]));
      assert.equal(pids.length, 2);
      for (const pid of pids) process.kill(pid, "SIGKILL");
      await publish("jobs", 6, 10);
      const publishing = publish("jobs", 11, 30);
      await workers.waitForLog(/worker 1 \(pid \d+\) ready again/, start);
      await workers.waitForLog(/worker 2 \(pid \d+\) ready again/, start);
      await publishing;
      await seen.count("pub", 30);
      assert.deepEqual(seen.of("pub").map((p) => p.offset), range(1, 30));
      assert.deepEqual(seen.of("gap"), []);
      assert.deepEqual(disconnects, [1006]);
    } finally {
      await client.close();
      await workers.stop();
    }
  });
});
