// client.rpc(): a call to the application's backend through the server
// (proxy_rpc_url), against a real trioserve and a real HTTP backend in Node.

import assert from "node:assert/strict";
import http from "node:http";
import { after, before, describe, test } from "node:test";

import { Client, TrioserveError } from "../trioserve.js";
import { WebSocket, startServer, within } from "./helpers.mjs";

/** The application's backend: `sum` adds its data, anything else is refused with 404. */
function startBackend() {
  const calls = [];
  const backend = http.createServer((req, res) => {
    let body = "";
    req.on("data", (chunk) => { body += chunk; });
    req.on("end", () => {
      const call = JSON.parse(body);
      calls.push(call);
      const answer = call.method === "sum"
        ? { result: call.data.reduce((a, b) => a + b, 0) }
        : { error: { code: 404, message: `no method ${call.method}` } };
      res.writeHead(200, { "Content-Type": "application/json" });
      res.end(JSON.stringify(answer));
    });
  });
  return new Promise((resolve) => {
    backend.listen(0, "127.0.0.1", () => resolve({ backend, calls, url: `http://127.0.0.1:${backend.address().port}/rpc` }));
  });
}

describe("rpc through the server's backend proxy", () => {
  let app;
  let server;
  let plain;
  const clients = [];
  const connect = (url) => {
    const client = new Client(url, { WebSocket });
    clients.push(client);
    return client;
  };

  before(async () => {
    app = await startBackend();
    server = await startServer(["--proxy-rpc-url", app.url]);
    plain = await startServer();
  });

  after(async () => {
    await Promise.all(clients.map((c) => c.close()));
    await Promise.all([server.stop(), plain.stop()]);
    app.backend.close();
  });

  test("the backend's result comes back, and its refusal is an rpc_error with its code", async () => {
    const client = connect(server.url);
    assert.equal(await within(client.rpc("sum", [1, 2, 3]), "the rpc"), 6);
    const refused = await within(client.rpc("nope", { x: 1 }).catch((err) => err), "the refused rpc");
    assert.ok(refused instanceof TrioserveError);
    assert.equal(refused.code, "rpc_error");
    assert.equal(refused.status, 404);
    assert.equal(refused.serverMessage, "no method nope");
    assert.deepEqual(app.calls.map((c) => [c.method, c.data]), [["sum", [1, 2, 3]], ["nope", { x: 1 }]]);
  });

  test("a server without a backend answers unknown_op", async () => {
    const client = connect(plain.url);
    const err = await within(client.rpc("sum", [1]).catch((e) => e), "the rpc");
    assert.ok(err instanceof TrioserveError);
    assert.equal(err.code, "unknown_op");
    assert.equal(err.status, undefined);
  });
});
