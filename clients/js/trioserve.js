// trioserve.js: the JavaScript client of a trioserve push server.
//
// One ES module, no dependencies, no build step. It runs in browsers, and in
// Node >= 18 when given a WebSocket class (`new Client(url, { WebSocket })`,
// for example the `ws` package's). docs/client-js.md describes it; the wire
// protocol is docs/protocol.md.
//
// The same rules as the Python client (trioserve/client, docs/client.md):
// - a subscription keeps its topic's epoch and the last offset it delivered,
//   and resubscribes with `since` after every reconnect, so each offset is
//   delivered once and in order, or the gap is reported (`onGap`);
// - publications that arrive while a subscribe is in flight wait for its
//   reply, so recovered publications come before live ones;
// - an offset seen already is skipped, a jump on a live connection is
//   refetched with a `since` resubscribe;
// - reconnects use exponential backoff with full jitter.
//
// Transports: the WebSocket carries everything. When it cannot connect,
// subscriptions go over Server-Sent Events (`GET /sse`, with EventSource),
// `publish` over `POST /api/publish`, and the other requests reject with
// `no_connection`, saying why; the WebSocket is retried meanwhile, and takes
// the subscriptions back (with `since`) once it connects. Both transports
// deliver through the same Subscription, so exactly-once and in-order, and
// `onGap`, hold across the switch.

export const VERSION = "0.1.0";

/** Close codes after which the client reconnects: going away (drain), no
 * status, no close frame, server error, service restart, at capacity,
 * heartbeat timeout, slow consumer. 4001 is handled on its own. */
const RECONNECT_CODES = new Set([1001, 1005, 1006, 1011, 1012, 1013, 4002, 4008]);
const UNAUTHORIZED = 4001;
const OPEN = 1; // WebSocket.OPEN, the same in every implementation

const DEFAULTS = {
  timeout: 10000,
  minReconnectDelay: 100,
  maxReconnectDelay: 10000,
  pingInterval: 30000,
  pingTimeout: 10000,
};

/** Every error the client rejects with: `code` names it. */
export class TrioserveError extends Error {
  constructor(code, message, details = undefined) {
    super(message);
    this.name = "TrioserveError";
    this.code = code;
    if (details) Object.assign(this, details);
  }
}

function serverError(reply) {
  const error = reply && typeof reply.error === "object" && reply.error !== null ? reply.error : {};
  const code = typeof error.code === "string" ? error.code : "error";
  const message = typeof error.message === "string" ? error.message : "the server refused the request";
  const details = { serverMessage: message };
  // An rpc_error carries the application backend's own code.
  if (Number.isInteger(error.status)) details.status = error.status;
  return new TrioserveError(code, `${code}: ${message}`, details);
}

function toInt(value) {
  return Number.isInteger(value) ? value : 0;
}

/** Call a user's handler; what it throws goes to the client's "error" event. */
function guarded(client, fn, ...args) {
  if (typeof fn !== "function") return undefined;
  try {
    return fn(...args);
  } catch (err) {
    client._report(err);
    return undefined;
  }
}

/**
 * A subscription to one topic. Made by `client.subscribe()`; it lasts across
 * reconnects until `unsubscribe()` or the client's end.
 */
export class Subscription {
  constructor(client, topic, options) {
    this.topic = topic;
    this._client = client;
    this._handlers = options;
    // The position of the last publication delivered (or the subscribe
    // position before the first): resubscribing asks for what follows it.
    const since = options.since;
    this._epoch = since && typeof since.epoch === "string" ? since.epoch : null;
    this._offset = since && Number.isInteger(since.offset) ? since.offset : null;
    this._active = true;
    this._settled = false;
    // The socket a subscribe is in flight on; publications wait in _held until its reply.
    this._pendingOn = null;
    this._held = [];
    this._readyTimer = null;
    this.ready = new Promise((resolve, reject) => {
      this._resolve = resolve;
      this._reject = reject;
    });
    // Nobody has to await `ready`: a rejection is reported through it, not as unhandled.
    this.ready.catch(() => {});
  }

  /** `{epoch, offset}` of the last publication delivered, or null before the first reply. */
  get position() {
    return this._offset === null ? null : { epoch: this._epoch, offset: this._offset };
  }

  /** Whether the subscription still runs (not unsubscribed, not failed). */
  get active() {
    return this._active;
  }

  /** Stop the subscription. Nothing more is delivered to its handlers. */
  unsubscribe() {
    if (!this._active) return;
    this._client._unsubscribe(this);
  }

  // --- the client's side ------------------------------------------------------------------

  _settle(error, info) {
    if (this._settled) return false;
    this._settled = true;
    clearTimeout(this._readyTimer);
    if (error) this._reject(error);
    else this._resolve(info);
    return true;
  }

  /** No more deliveries: fail with `error` (onError, or `ready` rejects), or end quietly. */
  _end(error, quiet) {
    this._active = false;
    this._pendingOn = null;
    this._held = [];
    if (!this._settle(error) && error && !quiet) guarded(this._client, this._handlers.onError, error);
  }

  _receive(socket, msg) {
    if (this._pendingOn !== null) {
      this._held.push(msg);
      return;
    }
    this._deliver(socket, msg, true);
  }

  _presence(msg) {
    const handler = msg.op === "join" ? this._handlers.onJoin : this._handlers.onLeave;
    guarded(this._client, handler, { topic: this.topic, client: msg.client });
  }

  _deliver(socket, msg, live) {
    const offset = msg.offset;
    if (!Number.isInteger(offset) || !this._active) return;
    const last = this._offset;
    if (last !== null && offset <= last) {
      this._client._stats.duplicates += 1;
      return;
    }
    if (last !== null && offset > last + 1) {
      if (live && this._epoch !== null && this._client._open) {
        // The offsets jumped on a live connection (the server dropped some
        // for a slow consumer): fetch them from its history.
        this._client._sendSubscribe(this);
        this._held.push(msg);
        return;
      }
      this._gap({ lastEpoch: this._epoch, lastOffset: last, epoch: this._epoch, offset: offset - 1 });
    }
    this._offset = offset;
    this._client._stats.publications += 1;
    guarded(this._client, this._handlers.onPublication, { topic: this.topic, offset, data: msg.data });
  }

  /** The server accepted a subscribe sent on `socket`. */
  _apply(socket, reply) {
    const held = this._held;
    this._held = [];
    this._pendingOn = null;
    if (!this._active) return;
    const epoch = typeof reply.epoch === "string" ? reply.epoch : null;
    const offset = toInt(reply.offset);
    const lastEpoch = this._epoch;
    const last = this._offset;
    if (last === null) {
      this._epoch = epoch;
      this._offset = offset;
    }
    const info = {
      topic: this.topic, epoch, offset, recovered: reply.recovered === true, resubscribed: this._settled,
    };
    this._settle(null, info);
    guarded(this._client, this._handlers.onSubscribed, info);
    if (last !== null) this._recover(socket, reply, lastEpoch, last, epoch, offset, held);
    for (const msg of held) {
      if (this._pendingOn === null) this._deliver(socket, msg, true);
      else this._held.push(msg);
    }
  }

  _recover(socket, reply, lastEpoch, last, epoch, offset, held) {
    if (reply.recovered === true) {
      this._epoch = epoch !== null ? epoch : lastEpoch;
      const publications = Array.isArray(reply.publications) ? reply.publications : [];
      for (const msg of publications) {
        if (msg && typeof msg === "object") this._deliver(socket, msg, false);
      }
      return;
    }
    if (epoch === lastEpoch && offset === last) return; // nothing was published meanwhile
    let newOffset = offset;
    for (const msg of held) {
      if (Number.isInteger(msg.offset)) newOffset = Math.min(newOffset, msg.offset - 1);
    }
    this._gap({ lastEpoch, lastOffset: last, epoch, offset: newOffset });
    this._epoch = epoch;
    this._offset = newOffset;
  }

  _gap(position) {
    this._client._stats.gaps += 1;
    guarded(this._client, this._handlers.onGap, { topic: this.topic, recovered: false, ...position });
  }
}

/**
 * A connection to a trioserve server that reconnects by itself. It starts
 * connecting at once; `close()` ends it.
 */
export class Client {
  constructor(url, options = {}) {
    const parsed = new URL(url);
    if (parsed.protocol !== "ws:" && parsed.protocol !== "wss:") {
      throw new TypeError(`expected a ws:// or wss:// URL, got ${url}`);
    }
    this.url = parsed.href;
    this._options = { ...DEFAULTS, ...options };
    const o = this._options;
    for (const name of ["timeout", "minReconnectDelay", "maxReconnectDelay", "pingTimeout"]) {
      if (!(o[name] > 0)) throw new TypeError(`${name} must be a positive number of milliseconds`);
    }
    if (o.maxReconnectDelay < o.minReconnectDelay) {
      throw new TypeError("maxReconnectDelay must be at least minReconnectDelay");
    }
    this._WebSocket = o.WebSocket || globalThis.WebSocket;
    if (typeof this._WebSocket !== "function") {
      throw new TypeError("no WebSocket class: pass { WebSocket } (for example the ws package's) on Node");
    }
    if (o.token !== undefined && o.token !== null && typeof o.token !== "string") {
      throw new TypeError("token must be a string; pass a function as getToken");
    }
    if (o.getToken !== undefined && typeof o.getToken !== "function") {
      throw new TypeError("getToken must be a function returning a token (or a promise of one)");
    }
    this._httpUrl = o.httpUrl === false ? null : httpBase(parsed, o.httpUrl);
    // Bound: a browser's fetch called as a method of another object throws "Illegal invocation".
    this._fetch = o.fetch || globalThis.fetch?.bind(globalThis);
    // The fallback for subscriptions; `EventSource: false` turns it off.
    this._EventSource = o.EventSource === false ? null : o.EventSource || globalThis.EventSource || null;
    this._stream = null; // {es, up}: the event stream, while the WebSocket cannot connect

    this._state = "connecting";
    this._listeners = new Map();
    this._subs = new Map(); // topic -> Subscription
    this._pending = new Map(); // id -> request sent on the current socket
    this._queue = []; // requests waiting for a connection
    this._fallbacks = new Set(); // requests out over HTTP
    this._nextId = 1;
    this._socket = null; // the current WebSocket, connecting or open
    this._open = false;
    this._openedAt = 0;
    this._attempt = 0;
    this._failedSinceOpen = false;
    this._lastError = null;
    this._authFailures = 0;
    this._timer = null; // the reconnect timer
    this._pingTimer = null;
    this._lastMessageAt = 0;
    this._closed = false;
    this._closedDone = null;
    this.error = null; // what ended the client, once it has
    this._stats = { reconnects: 0, failedAttempts: 0, publications: 0, duplicates: 0, gaps: 0 };

    this._onOnline = () => {
      // The browser is back online: try now rather than at the end of the backoff.
      if (this._timer !== null) {
        clearTimeout(this._timer);
        this._timer = null;
        this._attempt = 0;
        this._connect();
      }
    };
    if (typeof globalThis.addEventListener === "function" && typeof globalThis.document === "object") {
      globalThis.addEventListener("online", this._onOnline);
    }
    // In a microtask, so listeners added right after the constructor see everything.
    queueMicrotask(() => this._connect());
  }

  /** "connecting" | "connected" | "disconnected" (for good: after close() or a failure). */
  get state() {
    return this._state;
  }

  /** What carries the subscriptions now: "websocket", "sse" (the fallback) or null. */
  get transport() {
    if (this._open) return "websocket";
    return this._stream !== null && this._stream.up ? "sse" : null;
  }

  /** Counters: reconnects, failedAttempts, publications, duplicates (skipped), gaps. */
  statistics() {
    return { state: this._state, subscriptions: this._subs.size,
             pending: this._pending.size + this._queue.length + this._fallbacks.size,
             ...this._stats };
  }

  /** Listen to "state", "disconnect", "retry" or "error"; returns a function that stops it. */
  on(event, fn) {
    if (!this._listeners.has(event)) this._listeners.set(event, new Set());
    this._listeners.get(event).add(fn);
    return () => this.off(event, fn);
  }

  off(event, fn) {
    this._listeners.get(event)?.delete(fn);
  }

  /**
   * Subscribe to `topic`. Handlers: onPublication({topic, offset, data}),
   * onGap(info), onSubscribed(info), onJoin(event), onLeave(event), onError(err).
   * Options: since ({epoch, offset}: continue from there), timeout (ms for `ready`).
   */
  subscribe(topic, options = {}) {
    this._throwIfClosed();
    if (typeof topic !== "string") throw new TypeError("topic must be a string");
    if (this._subs.has(topic)) throw new Error(`this client is already subscribed to ${JSON.stringify(topic)}`);
    const sub = new Subscription(this, topic, options);
    this._subs.set(topic, sub);
    const timeout = options.timeout ?? this._options.timeout;
    if (Number.isFinite(timeout)) {
      sub._readyTimer = setTimeout(() => {
        if (sub._settled || !sub._active) return;
        this._unsubscribe(sub, this._timeoutError("subscribe", timeout, sub._pendingOn !== null));
      }, timeout);
    }
    if (this._open) this._sendSubscribe(sub);
    else if (this._stream !== null) this._restartStream();
    return sub;
  }

  /** The active subscription to `topic`, if any. */
  getSubscription(topic) {
    return this._subs.get(topic) || null;
  }

  /**
   * Publish `data` (any JSON value) to `topic`: `{offset, subscribers}`. Over
   * the WebSocket when it is up (the server must allow client publishing);
   * over POST /api/publish when the WebSocket cannot connect.
   */
  publish(topic, data) {
    let body;
    try {
      body = JSON.stringify({ topic, data });
    } catch (err) {
      return Promise.reject(new TypeError(`data is not JSON-serialisable: ${err.message}`));
    }
    if (data === undefined || typeof data === "function") {
      return Promise.reject(new TypeError("data must be a JSON value"));
    }
    const fallback = this._httpUrl && this._fetch ? (ms) => this._httpPublish(body, ms) : null;
    return this._request({ op: "publish", topic, data }, { retry: false, fallback })
      .then((reply) => ({ offset: toInt(reply.offset), subscribers: toInt(reply.subscribers) }));
  }

  /** Who is subscribed to `topic` on this server: [{client, conn, transport}]. */
  presence(topic) {
    return this._request({ op: "presence", topic }, { retry: true })
      .then((reply) => (Array.isArray(reply.clients) ? reply.clients : []));
  }

  /**
   * Call `method` on the application's backend through the server (its
   * proxy_rpc_url) and get the backend's result. A refusal rejects with code
   * "rpc_error" and the backend's code as `status`. Not resent after a
   * reconnect: the backend may have acted on it.
   */
  rpc(method, data = null) {
    return this._request({ op: "rpc", method, data }, { retry: false }).then((reply) => reply.result);
  }

  /** One round trip. */
  ping() {
    return this._request({ op: "ping" }, { retry: true }).then(() => undefined);
  }

  /** Send an op of your own (Server.add_op) and get its reply; `retry` resends it after a reconnect. */
  request(op, fields = {}, { retry = false } = {}) {
    return this._request({ ...fields, op }, { retry });
  }

  /** Close the connection (1000) and stop. Resolves once the socket is closed. */
  close() {
    if (!this._closed) this._shutdown(new TrioserveError("closed", "the client was closed"), true);
    return this._closedDone;
  }

  // --- events -----------------------------------------------------------------------------

  _emit(event, ...args) {
    const listeners = this._listeners.get(event);
    if (!listeners) return 0;
    for (const fn of [...listeners]) {
      try {
        fn(...args);
      } catch (err) {
        if (event === "error") queueMicrotask(() => { throw err; });
        else this._report(err);
      }
    }
    return listeners.size;
  }

  /** A user's handler threw: the "error" event, or thrown from a microtask if nobody listens. */
  _report(err) {
    if (!this._emit("error", err)) queueMicrotask(() => { throw err; });
  }

  _setState(state) {
    if (this._state === state) return;
    this._state = state;
    this._emit("state", state);
  }

  _throwIfClosed() {
    if (this._closed) throw this.error;
  }

  // --- connecting -------------------------------------------------------------------------

  async _token() {
    const { getToken, token } = this._options;
    if (!getToken) return token || null;
    const fresh = await getToken();
    if (typeof fresh !== "string") throw new TrioserveError("token", "getToken did not return a string");
    return fresh || null;
  }

  async _connect() {
    this._timer = null;
    if (this._closed || this._socket !== null) return;
    this._setState("connecting");
    let token;
    try {
      token = await this._token();
    } catch (err) {
      if (this._closed) return;
      if (err instanceof TrioserveError && err.code === "unauthorized") {
        this._shutdown(err, false);
        return;
      }
      this._attemptFailed(new TrioserveError("token", `getToken failed: ${err && err.message}`, { cause: err }));
      return;
    }
    if (this._closed) return;
    this._openSocket(token);
  }

  /** One WebSocket connection attempt. (Where an SSE transport would go.) */
  _openSocket(token) {
    const url = new URL(this.url);
    if (token) url.searchParams.set("token", token);
    let socket;
    try {
      socket = new this._WebSocket(url.href);
    } catch (err) {
      this._shutdown(new TrioserveError("bad_url", `cannot open ${this.url}: ${err.message}`), false);
      return;
    }
    this._socket = socket;
    const connectTimer = setTimeout(() => this._drop(socket, 1006, "connect timeout"), this._options.timeout);
    socket.onopen = () => {
      clearTimeout(connectTimer);
      if (this._socket === socket) this._onOpen(socket);
    };
    socket.onmessage = (event) => {
      if (this._socket === socket) this._onMessage(socket, event.data);
    };
    socket.onclose = (event) => {
      clearTimeout(connectTimer);
      if (this._socket === socket) this._onClose(socket, event.code, event.reason || "");
    };
    // The close event follows an error; the ws package throws an error nobody listens to.
    socket.onerror = () => {};
  }

  _onOpen(socket) {
    // The WebSocket is back: it takes the subscriptions over, with `since`.
    this._closeStream();
    this._open = true;
    this._openedAt = Date.now();
    this._failedSinceOpen = false;
    this._lastError = null;
    this._setState("connected");
    if (this._authFailures > 0) {
      // After a 4001: a reply shows that the fresh token was accepted.
      this._request({ op: "ping" }, { retry: false }).catch(() => {});
    }
    for (const sub of this._subs.values()) this._sendSubscribe(sub);
    const queued = this._queue;
    this._queue = [];
    for (const entry of queued) this._send(entry);
    this._lastMessageAt = Date.now();
    this._armPing(socket);
  }

  _onMessage(socket, data) {
    this._lastMessageAt = Date.now();
    if (typeof data !== "string") return; // the protocol is text only
    let msg;
    try {
      msg = JSON.parse(data);
    } catch {
      return;
    }
    if (msg === null || typeof msg !== "object" || Array.isArray(msg)) return;
    if ("ok" in msg) {
      this._onReply(socket, msg);
      return;
    }
    switch (msg.op) {
      case "pub": {
        const sub = this._subs.get(msg.topic);
        if (sub) sub._receive(socket, msg);
        break;
      }
      case "join":
      case "leave": {
        const sub = this._subs.get(msg.topic);
        if (sub) sub._presence(msg);
        break;
      }
      case "refresh_required":
        this._refresh();
        break;
      case "unsubscribed": {
        // The server API removed this client from the topic: end the subscription
        // (onError) rather than subscribe again on the next connection.
        const sub = this._subs.get(msg.topic);
        if (sub) this._unsubscribe(sub, new TrioserveError("unsubscribed", `the server unsubscribed this client from ${msg.topic}`));
        break;
      }
      default:
        break;
    }
  }

  _onReply(socket, msg) {
    if (msg.ok === true) this._authFailures = 0;
    const entry = Number.isInteger(msg.id) ? this._pending.get(msg.id) : undefined;
    if (entry === undefined) return;
    this._pending.delete(msg.id);
    const sub = entry.sub;
    if (sub) {
      if (sub._pendingOn !== socket || !sub._active) return;
      if (msg.ok === true) sub._apply(socket, msg);
      else {
        sub._pendingOn = null; // refused: nothing to unsubscribe from on this socket
        this._unsubscribe(sub, serverError(msg));
      }
      return;
    }
    clearTimeout(entry.timer);
    if (msg.ok === true) entry.resolve(msg);
    else entry.reject(serverError(msg));
  }

  _onClose(socket, code, reason) {
    const wasOpen = this._open;
    this._socket = null;
    this._open = false;
    clearTimeout(this._pingTimer);
    // Requests on this socket: sent again on the next one, or failed.
    const pending = [...this._pending.values()];
    this._pending.clear();
    for (const entry of pending) {
      if (entry.sub) continue;
      if (entry.retry) this._queue.push(entry);
      else {
        clearTimeout(entry.timer);
        entry.reject(new TrioserveError("connection_lost",
          `the connection closed (${code}) before the server answered ${JSON.stringify(entry.msg.op)}`));
      }
    }
    for (const sub of this._subs.values()) {
      sub._pendingOn = null;
      sub._held = [];
    }
    if (this._closed) {
      this._closedResolve?.();
      return;
    }
    if (!wasOpen) {
      this._attemptFailed(new TrioserveError("no_connection", `could not connect to ${this.url} (${code})`));
      return;
    }
    const unauthorized = code === UNAUTHORIZED;
    // After a 4001 a fresh token may help, once: a second 4001 before any reply is final.
    const retry = unauthorized ? Boolean(this._options.getToken) && this._authFailures === 0
                               : RECONNECT_CODES.has(code);
    this._emit("disconnect", { code, reason, reconnect: retry });
    if (!retry) {
      const error = unauthorized
        ? new TrioserveError("unauthorized", `the server refused the token: ${code} ${reason}`, { closeCode: code, reason })
        : new TrioserveError("closed", `the server closed the connection: ${code} ${reason}`, { closeCode: code, reason });
      this._shutdown(error, false);
      return;
    }
    if (unauthorized) this._authFailures += 1;
    if (Date.now() - this._openedAt >= this._options.maxReconnectDelay) this._attempt = 0;
    this._stats.reconnects += 1;
    this._scheduleReconnect(new TrioserveError("disconnected", `${code} ${reason}`.trim(), { closeCode: code, reason }));
  }

  /** Give up on `socket` now, as if it had closed with `code`. */
  _drop(socket, code, reason) {
    if (this._socket !== socket) return;
    socket.onopen = socket.onmessage = socket.onclose = null;
    try {
      socket.close();
    } catch {
      // closing a socket that is still connecting may throw; it is dropped either way
    }
    this._onClose(socket, code, reason);
  }

  _attemptFailed(error) {
    this._stats.failedAttempts += 1;
    this._failedSinceOpen = true;
    this._lastError = error;
    // The WebSocket cannot connect: requests with an HTTP way go that way now.
    const queued = this._queue;
    this._queue = [];
    for (const entry of queued) {
      if (entry.fallback) this._runFallback(entry);
      else this._queue.push(entry);
    }
    this._scheduleReconnect(error);
    this._openStream();
  }

  _scheduleReconnect(error) {
    this._setState("connecting");
    const { minReconnectDelay, maxReconnectDelay } = this._options;
    // Exponential backoff with full jitter.
    const cap = Math.min(maxReconnectDelay, minReconnectDelay * 2 ** Math.min(this._attempt, 60));
    const delay = Math.random() * cap;
    this._attempt += 1;
    this._emit("retry", { attempt: this._attempt, delay, error });
    this._timer = setTimeout(() => this._connect(), delay);
  }

  // --- heartbeat --------------------------------------------------------------------------

  _armPing(socket) {
    const { pingInterval, pingTimeout } = this._options;
    if (!(pingInterval > 0)) return;
    const check = () => {
      if (this._socket !== socket) return;
      const idle = Date.now() - this._lastMessageAt;
      if (idle < pingInterval) {
        this._pingTimer = setTimeout(check, pingInterval - idle);
        return;
      }
      // Browsers do not show the server's ping frames: ask with a message.
      const sentAt = this._lastMessageAt;
      this._sendRaw(socket, { op: "ping" });
      this._pingTimer = setTimeout(() => {
        if (this._lastMessageAt === sentAt) this._drop(socket, 1006, "heartbeat timeout");
        else check();
      }, pingTimeout);
    };
    this._pingTimer = setTimeout(check, pingInterval);
  }

  // --- tokens -----------------------------------------------------------------------------

  async _refresh() {
    if (!this._options.getToken) {
      this._emit("error", new TrioserveError("unauthorized",
        "the server asked for a fresh token, but the client has no getToken to get one"));
      return;
    }
    try {
      const token = await this._token();
      await this._request({ op: "refresh", token }, { retry: false });
    } catch (err) {
      if (!this._closed) this._emit("error", err);
    }
  }

  // --- requests ---------------------------------------------------------------------------

  _request(msg, { retry, fallback = null }) {
    if (this._closed) return Promise.reject(this.error);
    return new Promise((resolve, reject) => {
      const timeout = this._options.timeout;
      const entry = { msg, retry, fallback, resolve, reject, timer: null, sent: false, started: Date.now() };
      entry.timer = setTimeout(() => {
        this._forget(entry);
        const error = this._timeoutError(msg.op, timeout, entry.sent);
        if (entry.fallbackError) error.message += `; ${entry.fallbackError.message}`;
        reject(error);
      }, timeout);
      if (this._open) this._send(entry);
      else if (fallback && this._failedSinceOpen) this._runFallback(entry);
      else if (this._stream !== null && this._stream.up) {
        clearTimeout(entry.timer);
        const why = this._lastError ? ` (${this._lastError.message})` : "";
        reject(new TrioserveError("no_connection", `${JSON.stringify(msg.op)} needs the WebSocket, which cannot `
          + `connect${why}; meanwhile only subscriptions (over /sse) and publish (over POST /api/publish) work`));
      } else this._queue.push(entry);
    });
  }

  _timeoutError(op, timeout, sent) {
    if (sent) return new TrioserveError("timeout", `no reply to ${JSON.stringify(op)} within ${timeout} ms`);
    const why = this._lastError ? `: ${this._lastError.message}` : "";
    return new TrioserveError("no_connection", `not connected within ${timeout} ms for ${JSON.stringify(op)}${why}`);
  }

  _forget(entry) {
    this._fallbacks.delete(entry);
    const i = this._queue.indexOf(entry);
    if (i >= 0) this._queue.splice(i, 1);
    for (const [id, other] of this._pending) if (other === entry) this._pending.delete(id);
  }

  _send(entry) {
    const id = this._nextId++;
    this._pending.set(id, entry);
    entry.sent = true;
    this._sendRaw(this._socket, { ...entry.msg, id });
  }

  _sendRaw(socket, msg) {
    try {
      socket.send(JSON.stringify(msg));
    } catch {
      // the socket is closing: its close event settles what was sent on it
    }
  }

  _runFallback(entry) {
    const left = Math.max(1, this._options.timeout - (Date.now() - entry.started));
    this._fallbacks.add(entry);
    entry.fallback(left).then((reply) => {
      if (!this._fallbacks.delete(entry)) return; // timed out or closed meanwhile
      clearTimeout(entry.timer);
      entry.resolve(reply);
    }, (err) => {
      if (!this._fallbacks.delete(entry)) return;
      if (err.code === "no_connection") {
        // No HTTP API either (the server is restarting?): wait for the WebSocket, until the timeout.
        entry.fallbackError = err;
        if (this._open) this._send(entry);
        else this._queue.push(entry);
        return;
      }
      clearTimeout(entry.timer);
      entry.reject(err);
    });
  }

  async _httpPublish(body, ms) {
    const headers = { "content-type": "application/json" };
    if (this._options.apiKey) headers.authorization = `Bearer ${this._options.apiKey}`;
    const abort = typeof AbortController === "function" ? new AbortController() : null;
    const timer = abort ? setTimeout(() => abort.abort(), ms) : null;
    let res;
    let reply;
    try {
      res = await this._fetch(`${this._httpUrl}/api/publish`, {
        method: "POST", headers, body, signal: abort?.signal,
      });
      reply = await res.json();
    } catch (err) {
      throw new TrioserveError("no_connection", `POST ${this._httpUrl}/api/publish failed too: ${err && err.message}`,
        { cause: err });
    } finally {
      clearTimeout(timer);
    }
    if (!res.ok || !reply || reply.ok !== true) {
      const error = serverError(reply);
      error.status = res.status;
      throw error;
    }
    return reply;
  }

  // --- subscriptions ----------------------------------------------------------------------

  _sendSubscribe(sub) {
    const socket = this._socket;
    if (!sub._active || !this._open || sub._pendingOn === socket) return;
    const msg = { op: "subscribe", topic: sub.topic };
    if (sub._epoch !== null && sub._offset !== null) msg.since = { epoch: sub._epoch, offset: sub._offset };
    sub._pendingOn = socket;
    sub._held = [];
    const id = this._nextId++;
    this._pending.set(id, { sub, msg });
    this._sendRaw(socket, { ...msg, id });
  }

  _unsubscribe(sub, error = null) {
    if (this._subs.get(sub.topic) === sub) this._subs.delete(sub.topic);
    const wasSubscribed = sub._pendingOn !== null || sub._settled;
    sub._end(error || new TrioserveError("unsubscribed", `unsubscribed from ${sub.topic} before the reply`), !error);
    if (wasSubscribed && this._open) this._sendRaw(this._socket, { op: "unsubscribe", topic: sub.topic });
    else if (this._stream !== null) this._restartStream();
  }

  // --- the SSE fallback -------------------------------------------------------------------

  /** Open the event stream for every subscription, if the WebSocket is down and there is one. */
  async _openStream() {
    if (this._closed || this._open || this._stream !== null || !this._EventSource || !this._httpUrl) return;
    if (this._subs.size === 0) return;
    const stream = { es: null, up: false };
    this._stream = stream;
    let token;
    try {
      token = await this._token();
    } catch (err) {
      if (this._stream === stream) this._stream = null;
      this._lastError = new TrioserveError("token", `getToken failed: ${err && err.message}`, { cause: err });
      return;
    }
    if (this._stream !== stream) return; // closed, or the WebSocket came back, meanwhile
    const subs = [...this._subs.values()];
    if (subs.length === 0) {
      this._stream = null;
      return;
    }
    const url = new URL(`${this._httpUrl}/sse`);
    for (const sub of subs) {
      url.searchParams.append("topic", sub.topic);
      // The plain form of a position; EventSource's own reconnects send the cursor (Last-Event-ID).
      if (sub._epoch !== null && sub._offset !== null) {
        url.searchParams.set(`since.${sub.topic}`, `${sub._epoch}:${sub._offset}`);
      }
    }
    if (token) url.searchParams.set("token", token);
    let es;
    try {
      es = new this._EventSource(url.href);
    } catch (err) {
      this._stream = null;
      this._lastError = new TrioserveError("no_connection", `cannot open ${url.origin}/sse: ${err.message}`);
      return;
    }
    stream.es = es;
    for (const sub of subs) {
      sub._pendingOn = stream; // publications wait for the stream's "subscribed" event
      sub._held = [];
    }
    const mine = (fn) => (event) => {
      if (this._stream === stream) fn(event);
    };
    es.onmessage = mine((event) => this._onStreamMessage(stream, event.data));
    es.addEventListener("subscribed", mine((event) => this._onStreamSubscribed(stream, event.data)));
    es.addEventListener("close", mine((event) => {
      // The server ends the stream (drain, slow consumer...); EventSource reconnects by
      // itself, with Last-Event-ID. A token it refused needs a fresh one: a new stream.
      const info = parseJson(event.data) || {};
      this._emit("disconnect", { code: info.code, reason: info.reason || "", reconnect: true, transport: "sse" });
      if (info.code === UNAUTHORIZED) this._restartStream();
    }));
    es.onerror = mine(() => {
      if (es.readyState !== 2) return; // CONNECTING: EventSource retries by itself
      // Refused (an HTTP error): tried again after the next WebSocket attempt.
      this._closeStream();
      this._lastError = new TrioserveError("no_connection",
        `the event stream ${url.origin}/sse failed too (refused; check the token and the topics)`);
    });
  }

  _onStreamMessage(stream, data) {
    const msg = parseJson(data);
    if (msg === null || typeof msg !== "object") return;
    if (msg.op === "pub") this._subs.get(msg.topic)?._receive(stream, msg);
    else if (msg.op === "join" || msg.op === "leave") this._subs.get(msg.topic)?._presence(msg);
    else if (msg.op === "refresh_required") this._restartStream(); // with a fresh token
  }

  /** The stream's start: each topic's position, after its recovered publications. */
  _onStreamSubscribed(stream, data) {
    const info = parseJson(data);
    if (!info || !Array.isArray(info.topics)) return;
    stream.up = true;
    for (const reply of info.topics) {
      const sub = this._subs.get(reply.topic);
      // A reconnect of EventSource's own has no pending subscribe: the summary then
      // tells of a gap (recovered: false) the same way.
      if (sub && sub._active) sub._apply(stream, { ...reply, publications: [] });
    }
  }

  _closeStream() {
    const stream = this._stream;
    if (stream === null) return;
    this._stream = null;
    stream.es?.close();
    for (const sub of this._subs.values()) {
      if (sub._pendingOn === stream) {
        sub._pendingOn = null;
        sub._held = [];
      }
    }
  }

  /** The topics or the token changed: a new stream, from where each subscription is. */
  _restartStream() {
    this._closeStream();
    this._openStream();
  }

  // --- the end ----------------------------------------------------------------------------

  _shutdown(error, quiet) {
    this._closed = true;
    this._closeStream();
    this.error = error;
    clearTimeout(this._timer);
    this._timer = null;
    clearTimeout(this._pingTimer);
    if (typeof globalThis.removeEventListener === "function") {
      globalThis.removeEventListener("online", this._onOnline);
    }
    const socket = this._socket;
    this._closedDone = new Promise((resolve) => {
      this._closedResolve = resolve;
      if (socket === null) resolve();
    });
    for (const entry of [...this._pending.values(), ...this._queue, ...this._fallbacks]) {
      if (entry.sub) continue;
      clearTimeout(entry.timer);
      entry.reject(error);
    }
    this._pending.clear();
    this._queue = [];
    this._fallbacks.clear();
    for (const sub of [...this._subs.values()]) sub._end(error, quiet);
    this._subs.clear();
    if (socket !== null) {
      // Bounded: a server that does not answer the close does not hold it.
      const timer = setTimeout(() => this._drop(socket, 1006, "close timeout"), this._options.timeout);
      socket.onclose = () => {
        clearTimeout(timer);
        if (this._socket === socket) this._onClose(socket, 1000, "");
      };
      try {
        if (socket.readyState === OPEN) socket.close(1000);
        else socket.close();
      } catch {
        this._drop(socket, 1006, "");
      }
    }
    this._setState("disconnected");
    if (!quiet) this._emit("error", error);
  }
}

function parseJson(text) {
  try {
    return JSON.parse(text);
  } catch {
    return null;
  }
}

function httpBase(wsUrl, override) {
  if (typeof override === "string") return override.replace(/\/+$/, "");
  const scheme = wsUrl.protocol === "wss:" ? "https:" : "http:";
  return `${scheme}//${wsUrl.host}`;
}

export default Client;
