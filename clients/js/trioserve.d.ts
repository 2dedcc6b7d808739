// Type declarations for trioserve.js, the JavaScript client of a trioserve
// push server (docs/client-js.md).

export declare const VERSION: string;

/** A JSON value, as publications carry. */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

/** A position in a topic's stream: pass it as `since` to continue from there. */
export interface StreamPosition {
  epoch: string | null;
  offset: number;
}

export interface Publication<T = any> {
  topic: string;
  offset: number;
  data: T;
}

/** Publications were lost for good: the subscription continues after `offset`. */
export interface GapInfo {
  topic: string;
  recovered: false;
  /** Where the subscription was: its epoch and the last offset delivered. */
  lastEpoch: string | null;
  lastOffset: number;
  /** Where it continues: publications after `offset` are delivered. */
  epoch: string | null;
  offset: number;
}

/** A subscribe reply: the first one resolves `ready`, every one calls `onSubscribed`. */
export interface SubscribedInfo {
  topic: string;
  epoch: string | null;
  /** The topic's position when the server answered. */
  offset: number;
  /** The missed publications came back with the reply. */
  recovered: boolean;
  /** A resubscribe after a reconnect (or to refetch skipped offsets). */
  resubscribed: boolean;
}

export interface ClientInfo {
  client: string;
  conn: string;
  transport: string;
}

export interface PresenceEvent {
  topic: string;
  client: ClientInfo;
}

export interface SubscriptionOptions<T = any> {
  onPublication?(pub: Publication<T>): void;
  onGap?(info: GapInfo): void;
  onSubscribed?(info: SubscribedInfo): void;
  onJoin?(event: PresenceEvent): void;
  onLeave?(event: PresenceEvent): void;
  /** The subscription ended with an error after `ready` (a refused resubscribe, the client failed). */
  onError?(error: TrioserveError): void;
  /** Start after this position instead of at the topic's current end. */
  since?: StreamPosition;
  /** Milliseconds `ready` may take (default: the client's `timeout`); Infinity waits. */
  timeout?: number;
}

export declare class Subscription<T = any> {
  readonly topic: string;
  /** Resolves with the first subscribe reply; rejects if the subscription fails before it. */
  readonly ready: Promise<SubscribedInfo>;
  /** The position of the last publication delivered, or null before the first reply. */
  readonly position: StreamPosition | null;
  readonly active: boolean;
  unsubscribe(): void;
}

/** A minimal WebSocket class: the browser's, or the `ws` package's on Node. */
export interface WebSocketLike {
  readonly readyState: number;
  onopen: ((event: any) => void) | null;
  onmessage: ((event: { data: any }) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
  onerror: ((event: any) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}

/** A minimal EventSource class: the browser's (or Node's, behind --experimental-eventsource). */
export interface EventSourceLike {
  readonly readyState: number;
  onmessage: ((event: { data: string; lastEventId: string }) => void) | null;
  onerror: ((event: any) => void) | null;
  addEventListener(type: string, listener: (event: { data: string; lastEventId: string }) => void): void;
  close(): void;
}

export interface ClientOptions {
  /** A token (JWT), sent as `?token=` on every connection. */
  token?: string;
  /** Called for a fresh token before every connection and on `refresh_required`. */
  getToken?: () => string | Promise<string>;
  /** The WebSocket class; default `globalThis.WebSocket`. */
  WebSocket?: new (url: string) => WebSocketLike;
  /** Milliseconds a request waits for its reply, including for a connection (default 10000); also bounds each connection attempt. */
  timeout?: number;
  /** Reconnect backoff bounds in milliseconds (default 100 and 10000). */
  minReconnectDelay?: number;
  maxReconnectDelay?: number;
  /** Ping a server silent this long (ms, default 30000; 0 turns it off), and give up after pingTimeout more (10000). */
  pingInterval?: number;
  pingTimeout?: number;
  /** Base of the HTTP API for publishing when the WebSocket cannot connect; default from the URL; false: never. */
  httpUrl?: string | false;
  /** The API key for POST /api/publish (server-side code only: never put it in a page). */
  apiKey?: string;
  /** The fetch function; default `globalThis.fetch`. */
  fetch?: typeof fetch;
  /**
   * The EventSource class for the fallback of subscriptions to `GET /sse` when
   * the WebSocket cannot connect; default `globalThis.EventSource`; false: no fallback.
   */
  EventSource?: (new (url: string) => EventSourceLike) | false;
}

export type ClientState = "connecting" | "connected" | "disconnected";

export interface DisconnectInfo {
  code: number;
  reason: string;
  /** Whether the client reconnects after it. */
  reconnect: boolean;
  /** "sse" when the event stream of the fallback was closed by the server. */
  transport?: "sse";
}

export interface RetryInfo {
  /** Consecutive attempts so far, this one included. */
  attempt: number;
  /** Milliseconds until it. */
  delay: number;
  /** Why the last connection ended or the last attempt failed. */
  error: TrioserveError;
}

export interface ClientEvents {
  state: (state: ClientState) => void;
  disconnect: (info: DisconnectInfo) => void;
  retry: (info: RetryInfo) => void;
  error: (error: Error) => void;
}

export interface ClientStatistics {
  state: ClientState;
  subscriptions: number;
  pending: number;
  reconnects: number;
  failedAttempts: number;
  publications: number;
  duplicates: number;
  gaps: number;
}

export interface PublishResult {
  offset: number;
  subscribers: number;
}

export declare class Client {
  constructor(url: string, options?: ClientOptions);
  readonly url: string;
  readonly state: ClientState;
  /** What carries the subscriptions now: the WebSocket, the SSE fallback, or nothing yet. */
  readonly transport: "websocket" | "sse" | null;
  /** What ended the client, once it is "disconnected". */
  readonly error: TrioserveError | null;
  on<E extends keyof ClientEvents>(event: E, listener: ClientEvents[E]): () => void;
  off<E extends keyof ClientEvents>(event: E, listener: ClientEvents[E]): void;
  subscribe<T = any>(topic: string, options?: SubscriptionOptions<T>): Subscription<T>;
  getSubscription(topic: string): Subscription | null;
  publish(topic: string, data: Json | unknown): Promise<PublishResult>;
  presence(topic: string): Promise<ClientInfo[]>;
  /** Call the application's backend (the server's proxy_rpc_url); resolves to its result. */
  rpc<R = any>(method: string, data?: Json | unknown): Promise<R>;
  ping(): Promise<void>;
  request(op: string, fields?: Record<string, unknown>, options?: { retry?: boolean }): Promise<Record<string, any>>;
  statistics(): ClientStatistics;
  close(): Promise<void>;
}

/**
 * Every error the client rejects with. `code` is the server's error code
 * ("forbidden", "bad_request", "unavailable", ...) or the client's own:
 * "timeout", "no_connection", "connection_lost", "closed", "unauthorized",
 * "unsubscribed", "token", "bad_url".
 */
export declare class TrioserveError extends Error {
  constructor(code: string, message: string, details?: Record<string, unknown>);
  readonly code: string;
  /** The HTTP status, for errors of the HTTP API; the backend's code, for "rpc_error". */
  readonly status?: number;
  /** The close code, for "closed" and "unauthorized" after a close. */
  readonly closeCode?: number;
  readonly reason?: string;
  readonly serverMessage?: string;
}

export default Client;
