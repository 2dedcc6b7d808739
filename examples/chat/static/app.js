// The chat's browser client, built on trioserve's JavaScript client
// (/trioserve.js, served by every trioserve server; docs/client-js.md). The
// client keeps the connection: it reconnects with backoff, asks /api/login for
// a fresh token each time, and resubscribes every room from the last message
// this page has, so what was missed comes back in order. This file adds the
// chat: its ops "say" and "nick", its route /api/recent, and the page.
//
// Everything people type reaches the page through textContent, never
// innerHTML, so "<script>" in a message is shown as text.

import { Client, TrioserveError } from "/trioserve.js";

const MAX_TEXT = 2000;
const ROOM_RE = /^[a-z0-9_-]{1,32}$/;
const NICK_RE = /^[\p{L}\p{N}_][\p{L}\p{N}_.-]{0,23}$/u;

const $ = (id) => document.getElementById(id);
const ui = {
  status: $("status"), me: $("me"), roomTitle: $("room-title"),
  roomsPanel: $("rooms"), roomList: $("room-list"), joinForm: $("join-form"), joinInput: $("join-input"),
  messages: $("messages"), banner: $("banner"), membersPanel: $("members"), memberList: $("member-list"), memberCount: $("member-count"),
  composer: $("composer"), input: $("message"), counter: $("counter"), send: $("send"),
  nickDialog: $("nick-dialog"), nickForm: $("nick-form"), nickInput: $("nick-input"), nickError: $("nick-error"),
};

class Room {
  constructor(name) {
    this.name = name;
    this.topic = "room." + name;
    this.sub = null; // the trioserve Subscription, while joined
    this.members = new Map(); // connection id -> nick
    this.unread = 0;
    this.problem = null; // the error that kept us out (nick_taken...)
    // While the room loads (its last messages, its members), its live events
    // wait here, so the room shows what came first first.
    this.loading = 0;
    this.queue = [];
    this.log = document.createElement("ol");
    this.log.className = "log";
    this.log.hidden = true;
    ui.messages.append(this.log);
  }
}

const chat = {
  nick: localStorage.getItem("chat.nick") || "",
  rooms: new Map(),
  current: null,
  client: null,
  ws: null, // the client's current WebSocket, handy in the console
  online: false,
  wasOnline: false,
};
window.chat = chat;

// The client takes a WebSocket class: this one just remembers the latest socket in chat.ws.
class TrackedWebSocket extends WebSocket {
  constructor(...args) {
    super(...args);
    chat.ws = this;
  }
}

// --- connection ---------------------------------------------------------------

// The client's getToken: a fresh token for every connection (the server may
// have restarted with a new key) and whenever the server asks for one.
async function login() {
  const res = await fetch("/api/login", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ nick: chat.nick }),
  });
  const body = await res.json();
  if (res.ok) return body.token;
  if (body.error.code === "bad_nick") {
    askNick(body.error.message);
    // "unauthorized" stops the client instead of retrying; the nick dialog starts a new one.
    throw new TrioserveError("unauthorized", body.error.message);
  }
  throw new TrioserveError(body.error.code, body.error.message);
}

function connect() {
  if (chat.client || !chat.nick) return;
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const client = new Client(`${scheme}//${location.host}/ws`, {
    getToken: login,
    WebSocket: TrackedWebSocket,
    minReconnectDelay: 250,
    maxReconnectDelay: 5000,
    // The chat needs the WebSocket (presence, one nick per user): a stream of
    // its own over /sse would count as this user already being in the room
    // when the WebSocket comes back, so no SSE fallback here.
    EventSource: false,
  });
  chat.client = client;
  client.on("state", (state) => {
    chat.online = state === "connected";
    if (chat.online) chat.wasOnline = true;
    if (state === "disconnected") {
      chat.client = null;
      for (const room of chat.rooms.values()) room.sub = null;
      if (client.error && client.error.code !== "unauthorized") {
        errorLine(chat.current, `Disconnected: ${client.error.message}. Reload the page to try again.`);
      }
    }
    setStatus({ connected: "online", connecting: chat.wasOnline ? "reconnecting" : "connecting",
                disconnected: "offline" }[state]);
  });
  client.on("error", (err) => console.warn("trioserve:", err));
  for (const room of chat.rooms.values()) subscribe(room);
}

function subscribe(room) {
  room.problem = null;
  room.sub = chat.client.subscribe(room.topic, {
    onSubscribed: (info) => onSubscribed(room, info),
    onPublication: (pub) => whenLoaded(room, () => showPublication(room, pub)),
    onGap: (gap) => onGap(room, gap),
    onJoin: (event) => whenLoaded(room, () => onPresence(room, "joined", event.client)),
    onLeave: (event) => whenLoaded(room, () => onPresence(room, "left", event.client)),
    onError: (err) => refused(room, err),
    timeout: Infinity, // a page opened while the server is down waits for it
  });
  room.sub.ready.catch((err) => refused(room, err));
}

function refused(room, err) {
  room.sub = null;
  if (err.code === "closed" || err.code === "unsubscribed" || !chat.rooms.has(room.name)) return;
  room.problem = err;
  room.members.clear();
  errorLine(room, err.code === "nick_taken" ? err.serverMessage : `Could not join #${room.name}: ${err.message}`);
  renderRooms();
  renderMembers();
}

function onSubscribed(room, info) {
  // A first join shows the room's last messages, up to where the subscription starts.
  if (!info.resubscribed) load(room, () => showRecent(room, 0, info.offset));
  // The members, again after every reconnect: joins and leaves were missed meanwhile.
  load(room, async () => {
    const clients = await chat.client.presence(room.topic);
    room.members = new Map(clients.map((c) => [c.conn, c.client]));
  });
}

function onGap(room, gap) {
  // History could not fill the gap. Mostly the server restarted and its
  // in-memory history went with it: show what was said since.
  const sameEpoch = gap.epoch === gap.lastEpoch;
  divider(room, sameEpoch ? "some messages could not be recovered"
                          : "the server restarted — here is what was said since");
  load(room, () => showRecent(room, sameEpoch ? gap.lastOffset : 0, gap.offset));
}

async function showRecent(room, after, upto) {
  const recent = await getJSON(`/api/recent?room=${room.name}&upto=${upto}`);
  for (const pub of recent.messages) if (pub.offset > after) showPublication(room, pub);
}

// Run `work` with the room's live events held back until it (and any other load) is done.
async function load(room, work) {
  room.loading += 1;
  try {
    await work();
  } catch (err) {
    if (err.code !== "closed") errorLine(room, `Could not load #${room.name}: ${err.message}`);
  } finally {
    room.loading -= 1;
    if (room.loading === 0) {
      const queued = room.queue;
      room.queue = [];
      for (const event of queued) event();
      renderRooms();
      renderMembers();
    }
  }
}

function whenLoaded(room, event) {
  if (room.loading) room.queue.push(event);
  else event();
}

function onPresence(room, what, client) {
  if (what === "joined") room.members.set(client.conn, client.client);
  else room.members.delete(client.conn);
  notice(room, `${client.client} ${what}`);
  renderMembers();
}

async function getJSON(url) {
  const res = await fetch(url);
  if (!res.ok) throw new Error(`${url}: HTTP ${res.status}`);
  return res.json();
}

// --- commands -------------------------------------------------------------------

const HELP = [
  "/me TEXT — say it as an action",
  "/nick NAME — change your nickname",
  "/join ROOM — join a room (or switch to it)",
  "/part — leave this room",
];

// Returns true when the input can be cleared.
async function submit(text) {
  text = text.trim();
  const room = chat.current;
  if (!text) return false;
  if (!text.startsWith("/")) return say(room, text, false);
  const [command, ...rest] = text.slice(1).split(/\s+/);
  const arg = rest.join(" ").trim();
  switch (command.toLowerCase()) {
    case "me":
      return arg ? say(room, arg, true) : usage(room, "/me TEXT");
    case "nick":
      return arg ? changeNick(arg) : usage(room, "/nick NAME");
    case "join":
      return arg ? joinRoom(arg, true) : usage(room, "/join ROOM");
    case "part":
    case "leave":
      return leaveRoom(room);
    case "help":
      for (const line of HELP) notice(room, line);
      return true;
    default:
      errorLine(room, `There is no /${command}. Try /help.`);
      return false;
  }
}

function usage(room, text) {
  errorLine(room, `Usage: ${text}`);
  return false;
}

async function say(room, text, me) {
  if (text.length > MAX_TEXT) {
    errorLine(room, `Messages are at most ${MAX_TEXT} characters.`);
    return false;
  }
  if (!chat.online) {
    errorLine(room, "Not sent: the chat is reconnecting.");
    return false;
  }
  try {
    await chat.client.request("say", { room: room.name, text, me });
    return true;
  } catch (err) {
    // slow_down, too_long, the connection lost: the text stays in the input to send again.
    errorLine(room, err.serverMessage || (err.code === "connection_lost"
      ? "Not sent: the connection was lost." : err.message));
    return false;
  }
}

async function changeNick(nick) {
  if (!NICK_RE.test(nick)) {
    errorLine(chat.current, "A nick is 1-24 letters, digits, '_', '.' or '-'.");
    return false;
  }
  if (chat.online) {
    try {
      await chat.client.request("nick", { nick });
    } catch (err) {
      errorLine(chat.current, err.serverMessage || err.message);
      return false;
    }
  }
  // The next token (reconnects, refreshes) carries the new nick.
  setNick(nick);
  // Rooms that refused the old nick may take this one.
  for (const room of chat.rooms.values()) if (room.problem && chat.client) subscribe(room);
  return true;
}

function setNick(nick) {
  chat.nick = nick;
  localStorage.setItem("chat.nick", nick);
  ui.me.replaceChildren("as ", Object.assign(document.createElement("b"), { textContent: nick }));
  renderMembers();
}

function joinRoom(name, show) {
  name = name.replace(/^#/, "").toLowerCase();
  if (!ROOM_RE.test(name)) {
    errorLine(chat.current, "A room name is 1-32 of a-z, 0-9, '_' and '-'.");
    return false;
  }
  let room = chat.rooms.get(name);
  if (!room) {
    room = new Room(name);
    chat.rooms.set(name, room);
    saveRooms();
    if (chat.client) subscribe(room);
  }
  if (show || !chat.current) showRoom(room);
  renderRooms();
  return true;
}

function leaveRoom(room) {
  if (chat.rooms.size === 1) {
    errorLine(room, "This is your only room; /join another one first.");
    return false;
  }
  room.sub?.unsubscribe();
  chat.rooms.delete(room.name);
  room.log.remove();
  saveRooms();
  if (chat.current === room) showRoom(chat.rooms.values().next().value);
  renderRooms();
  return true;
}

function saveRooms() {
  localStorage.setItem("chat.rooms", JSON.stringify([...chat.rooms.keys()]));
}

// --- rendering -------------------------------------------------------------------

function setStatus(state) {
  ui.status.dataset.state = state;
  ui.status.textContent = {
    online: "Online", connecting: "Connecting…", reconnecting: "Reconnecting…", offline: "Offline",
  }[state];
  document.body.classList.toggle("offline", state !== "online");
  ui.banner.hidden = state !== "reconnecting";
  ui.send.disabled = state !== "online";
}

function showRoom(room) {
  chat.current = room;
  for (const other of chat.rooms.values()) other.log.hidden = other !== room;
  room.unread = 0;
  ui.roomTitle.textContent = "#" + room.name;
  ui.input.placeholder = `Message #${room.name} — /me, /nick NAME, /join ROOM, /part`;
  document.title = `#${room.name} · trioserve chat`;
  history.replaceState(null, "", "#" + room.name);
  ui.roomsPanel.classList.remove("open");
  renderRooms();
  renderMembers();
  scrollToEnd();
}

function renderRooms() {
  const items = [...chat.rooms.values()].map((room) => {
    const li = document.createElement("li");
    li.classList.toggle("active", room === chat.current);
    li.classList.toggle("problem", room.problem !== null);
    const button = document.createElement("button");
    button.type = "button";
    button.className = "room-button";
    const name = Object.assign(document.createElement("span"), { className: "name", textContent: room.name });
    button.append(name);
    if (room.unread) {
      button.append(Object.assign(document.createElement("span"), { className: "badge", textContent: room.unread }));
    }
    button.addEventListener("click", () => showRoom(room));
    const leave = Object.assign(document.createElement("button"), {
      type: "button", className: "leave", textContent: "×", title: `Leave #${room.name}`,
    });
    leave.addEventListener("click", () => leaveRoom(room));
    li.append(button, leave);
    return li;
  });
  ui.roomList.replaceChildren(...items);
}

function renderMembers() {
  const room = chat.current;
  if (!room) return;
  const nicks = [...room.members.values()].sort((a, b) => a.localeCompare(b, undefined, { sensitivity: "base" }));
  ui.memberCount.textContent = nicks.length ? `· ${nicks.length}` : "";
  ui.memberList.replaceChildren(...nicks.map((nick) => {
    const li = document.createElement("li");
    const avatar = Object.assign(document.createElement("span"), { className: "avatar", textContent: [...nick][0] });
    avatar.style.setProperty("--hue", hue(nick));
    li.append(avatar, Object.assign(document.createElement("span"), { className: "member-name", textContent: nick }));
    li.classList.toggle("self", nick === chat.nick);
    return li;
  }));
}

function showPublication(room, pub) {
  const data = pub.data || {};
  if (data.kind === "msg" || data.kind === "me") {
    const body = line(room, data.kind, data.ts);
    const nick = Object.assign(document.createElement("span"), { className: "nick", textContent: data.nick });
    nick.style.setProperty("--hue", hue(String(data.nick)));
    const text = Object.assign(document.createElement("span"), { className: "text", textContent: data.text });
    body.append(nick, text);
    if (room !== chat.current) {
      room.unread += 1;
      renderRooms();
    }
  } else if (data.kind === "nick") {
    if (room.members.has(data.conn)) room.members.set(data.conn, data.nick);
    notice(room, `${data.old} is now known as ${data.nick}`, data.ts);
    renderMembers();
  }
}

function line(room, kind, ts) {
  const li = document.createElement("li");
  li.className = kind;
  const when = ts ? new Date(ts * 1000) : new Date();
  const time = document.createElement("time");
  time.dateTime = when.toISOString();
  time.textContent = `${String(when.getHours()).padStart(2, "0")}:${String(when.getMinutes()).padStart(2, "0")}`;
  time.title = when.toLocaleString();
  const body = document.createElement("div");
  body.className = "body";
  li.append(time, body);
  const stick = atEnd();
  room.log.append(li);
  if (room === chat.current && stick) scrollToEnd();
  return body;
}

function notice(room, text, ts) {
  line(room, "notice", ts).textContent = text;
}

function errorLine(room, text) {
  if (room) line(room, "error", null).textContent = text;
}

function divider(room, text) {
  const li = Object.assign(document.createElement("li"), { className: "divider", textContent: text });
  room.log.append(li);
}

function atEnd() {
  const m = ui.messages;
  return m.scrollHeight - m.scrollTop - m.clientHeight < 80;
}

function scrollToEnd() {
  ui.messages.scrollTop = ui.messages.scrollHeight;
}

// Well-separated hues, readable on light and dark backgrounds; a nick always gets the same one.
const HUES = [4, 24, 145, 172, 200, 222, 258, 285, 320, 350];

function hue(text) {
  let h = 0x811c9dc5; // FNV-1a
  for (const ch of text) {
    h ^= ch.codePointAt(0);
    h = Math.imul(h, 0x01000193) >>> 0;
  }
  return String(HUES[h % HUES.length]);
}

// --- nick dialog and start-up ---------------------------------------------------

function askNick(error) {
  ui.nickDialog.hidden = false;
  ui.nickError.textContent = error || "";
  ui.nickInput.value = chat.nick;
  ui.nickInput.focus();
}

ui.nickForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const nick = ui.nickInput.value.trim();
  if (!NICK_RE.test(nick)) {
    ui.nickError.textContent = "1-24 letters, digits, '_', '.' or '-', please.";
    return;
  }
  ui.nickDialog.hidden = true;
  setNick(nick);
  connect();
  ui.input.focus();
});

ui.composer.addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = ui.input.value;
  if (await submit(text)) {
    if (ui.input.value === text) ui.input.value = "";
    updateCounter();
  }
  ui.input.focus();
});

function updateCounter() {
  const n = ui.input.value.length;
  ui.counter.textContent = n > MAX_TEXT - 200 ? `${n}/${MAX_TEXT}` : "";
  ui.counter.classList.toggle("over", n >= MAX_TEXT);
}
ui.input.addEventListener("input", updateCounter);

ui.joinForm.addEventListener("submit", (event) => {
  event.preventDefault();
  if (joinRoom(ui.joinInput.value.trim(), true)) ui.joinInput.value = "";
});

$("toggle-rooms").addEventListener("click", () => ui.roomsPanel.classList.toggle("open"));
$("toggle-members").addEventListener("click", () => ui.membersPanel.classList.toggle("open"));

window.addEventListener("hashchange", () => {
  const name = location.hash.slice(1);
  if (name && (!chat.current || name !== chat.current.name)) joinRoom(name, true);
});

function start() {
  let saved = [];
  try {
    saved = JSON.parse(localStorage.getItem("chat.rooms") || "[]");
  } catch {
    // a damaged entry: start with the lobby
  }
  const wanted = location.hash.slice(1).toLowerCase();
  for (const name of saved) if (ROOM_RE.test(name)) joinRoom(name, false);
  if (ROOM_RE.test(wanted)) joinRoom(wanted, true);
  if (!chat.rooms.size) joinRoom("lobby", true);
  setStatus("connecting");
  if (chat.nick) {
    setNick(chat.nick);
    connect();
  } else {
    askNick();
  }
}

start();
