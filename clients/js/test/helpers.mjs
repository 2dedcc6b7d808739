// What the client's tests share: a real trioserve (and redis-server) as child
// processes, tokens, and waiting on events with a bound.
//
// The server is `python -m trioserve serve`, run by $TRIOSERVE_PYTHON (pytest
// sets it: tests/clients/test_js.py), else the repository's .venv, else python3.
// The `ws` package is tests/interop's (scripts/test runs `npm ci` there).

import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { existsSync } from "node:fs";
import { createRequire } from "node:module";
import net from "node:net";
import { fileURLToPath } from "node:url";

export const REPO = fileURLToPath(new URL("../../../", import.meta.url));
const require = createRequire(new URL("../../../tests/interop/package.json", import.meta.url));
/** The `ws` package's WebSocket and WebSocketServer. */
export const WebSocket = require("ws");
export const { WebSocketServer } = WebSocket;

const VENV_PYTHON = `${REPO}.venv/bin/python`;
export const PYTHON = process.env.TRIOSERVE_PYTHON || (existsSync(VENV_PYTHON) ? VENV_PYTHON : "python3");
/** How long anything a test waits for may take: generous, for a loaded CI machine. */
export const WAIT = 20000;
const LISTENING = /listening on http:\/\/127\.0\.0\.1:(\d+) /;

/** Reject after `ms` unless `promise` settles first. */
export function within(promise, what, ms = WAIT) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** A list of what happened, in order; `waitFor` waits (bounded) until a predicate on it holds. */
export class Events {
  constructor() {
    this.items = [];
    this._waiters = [];
  }

  push(item) {
    this.items.push(item);
    for (const waiter of [...this._waiters]) {
      if (waiter.predicate(this.items)) {
        this._waiters.splice(this._waiters.indexOf(waiter), 1);
        waiter.resolve(this.items);
      }
    }
  }

  of(kind) {
    return this.items.filter((item) => item.kind === kind);
  }

  waitFor(predicate, what, ms = WAIT) {
    if (predicate(this.items)) return Promise.resolve(this.items);
    const waiter = { predicate };
    const promise = new Promise((resolve) => {
      waiter.resolve = resolve;
    });
    this._waiters.push(waiter);
    return within(promise, what, ms).catch((err) => {
      this._waiters.splice(this._waiters.indexOf(waiter), 1);
      err.message += `; events so far: ${JSON.stringify(this.items.slice(-20))}`;
      throw err;
    });
  }

  /** Wait until there are `count` items of `kind`. */
  count(kind, count, ms = WAIT) {
    return this.waitFor((items) => items.filter((i) => i.kind === kind).length >= count,
      `${count} ${kind} events`, ms);
  }
}

/** A subscription's handlers that record into `events`. */
export function recorder(events) {
  return {
    onPublication: (pub) => events.push({ kind: "pub", offset: pub.offset, data: pub.data }),
    onGap: (gap) => events.push({ kind: "gap", ...gap }),
    onSubscribed: (info) => events.push({ kind: "subscribed", ...info }),
    onError: (error) => events.push({ kind: "error", code: error.code, message: error.message }),
  };
}

export function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.on("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

class Child {
  constructor(argv, env) {
    this.log = "";
    this.exited = new Promise((resolve) => {
      this.proc = spawn(argv[0], argv.slice(1), { cwd: REPO, env, stdio: ["ignore", "ignore", "pipe"] });
      this.proc.on("exit", (code, signal) => resolve({ code, signal }));
    });
    this._logEvents = new Events();
    this.proc.stderr.setEncoding("utf8");
    this.proc.stderr.on("data", (chunk) => {
      this.log += chunk;
      this._logEvents.push(chunk);
    });
  }

  /** The first match of `regex` in the log from `start` on, waiting for it. */
  async waitForLog(regex, start = 0, ms = WAIT) {
    const find = () => regex.exec(this.log.slice(start));
    if (!find()) {
      await Promise.race([
        this._logEvents.waitFor(() => find() !== null, `${regex} in the log:\n${this.log}`, ms),
        this.exited.then(() => {
          if (!find()) throw new Error(`exited before ${regex} appeared in its log:\n${this.log}`);
        }),
      ]);
    }
    return find();
  }

  kill(signal) {
    if (this.proc.exitCode === null && this.proc.signalCode === null) this.proc.kill(signal);
  }

  /** SIGTERM (a trioserve drains), then SIGKILL if it lingers. */
  async stop() {
    this.kill("SIGTERM");
    const timer = setTimeout(() => this.kill("SIGKILL"), WAIT);
    const result = await this.exited;
    clearTimeout(timer);
    return result;
  }
}

/**
 * `python -m trioserve serve --port PORT ARGS` (port 0 picks one), once it
 * listens. `env` adds TRIOSERVE_* variables; none are inherited.
 */
export async function startServer(args = [], { port = 0, env = {} } = {}) {
  const clean = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("TRIOSERVE_")));
  const server = new Child([PYTHON, "-m", "trioserve", "serve", "--port", String(port), ...args],
    { ...clean, ...env });
  try {
    const match = await server.waitForLog(LISTENING);
    server.port = Number(match[1]);
  } catch (err) {
    server.kill("SIGKILL");
    throw err;
  }
  server.url = `ws://127.0.0.1:${server.port}/ws`;
  server.httpUrl = `http://127.0.0.1:${server.port}`;
  return server;
}

/** A redis-server on a free loopback port, without persistence. */
export async function startRedis() {
  const port = await freePort();
  // It logs to stdout; Child reads stderr, so point it there.
  const redis = new Child(["sh", "-c", 'exec redis-server "$@" 1>&2', "redis-server", "--port", String(port),
    "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], process.env);
  redis.url = `redis://127.0.0.1:${port}/0`;
  try {
    await redis.waitForLog(/Ready to accept connections/);
  } catch (err) {
    redis.kill("SIGKILL");
    throw err;
  }
  return redis;
}

/** POST /api/publish; the reply's JSON. */
export async function httpPublish(httpUrl, topic, data, apiKey) {
  const headers = apiKey ? { authorization: `Bearer ${apiKey}` } : {};
  const res = await fetch(`${httpUrl}/api/publish`, { method: "POST", headers, body: JSON.stringify({ topic, data }) });
  const body = await res.json();
  if (!res.ok) throw new Error(`publish ${topic}: HTTP ${res.status} ${JSON.stringify(body)}`);
  return body;
}

/** An HS256 JWT. */
export function makeToken(secret, { sub = "alice", ttl = 3600, ...claims } = {}) {
  const b64 = (obj) => Buffer.from(JSON.stringify(obj)).toString("base64url");
  const head = b64({ alg: "HS256", typ: "JWT" });
  const body = b64({ sub, exp: Math.floor(Date.now() / 1000) + ttl, ...claims });
  const sig = createHmac("sha256", secret).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${sig}`;
}

/** A WebSocket class that records what its instances send and receive into `events`. */
export function spyingWebSocket(events) {
  return class SpyWebSocket extends WebSocket {
    constructor(url, ...rest) {
      super(url, ...rest);
      events.push({ kind: "socket", url });
      this.addEventListener("message", (event) => events.push({ kind: "in", msg: JSON.parse(event.data) }));
    }

    send(data, ...rest) {
      events.push({ kind: "out", msg: JSON.parse(data) });
      return super.send(data, ...rest);
    }
  };
}

export function range(from, to) {
  return Array.from({ length: to - from + 1 }, (_, i) => from + i);
}
