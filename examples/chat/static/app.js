"use strict";
// The chat's browser client. It speaks trioserve's push protocol over one
// WebSocket (docs/protocol.md), plus the chat's own ops "say" and "nick" and
// its routes /api/login and /api/recent. No framework and no build step.
//
// Everything people type reaches the page through textContent, never
// innerHTML, so "<script>" in a message is shown as text.

const MAX_TEXT = 2000;
const ROOM_RE = /^[a-z0-9_-]{1,32}$/;
const NICK_RE = /^[\p{L}\p{N}_][\p{L}\p{N}_.-]{0,23}$/u;
const BACKOFF_FIRST = 250;
const BACKOFF_MAX = 5000;

const $ = (id) => document.getElementById(id);
const ui = {
  status: $("status"), me: $("me"), roomTitle: $("room-title"),
  roomsPanel: $("rooms"), roomList: $("room-list"), joinForm: $("join-form"), joinInput: $("join-input"),
  messages: $("messages"), banner: $("banner"), membersPanel: $("members"), memberList: $("member-list"), memberCount: $("member-count"),
  composer: $("composer"), input: $("message"), counter: $("counter"), send: $("send"),
  nickDialog: $("nick-dialog"), nickForm: $("nick-form"), nickInput: $("nick-input"), nickError: $("nick-error"),
};

class ChatError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

class Room {
  constructor(name) {
    this.name = name;
    this.topic = "room." + name;
    // Where this page is in the room's stream: kept across reconnects, so
    // resubscribing with "since" brings back exactly what was missed.
    this.epoch = null;
    this.offset = 0;
    this.members = new Map(); // connection id -> nick
    this.unread = 0;
    this.problem = null; // the error that kept us out (nick_taken...)
    // While a (re)subscribe is being applied, live events wait here, so the
    // room shows its history first and then what came after, in order.
    this.loading = false;
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
  ws: null,
  online: false,
  connecting: false,
  attempt: 0,
  timer: null,
  nextId: 1,
  pending: new Map(), // request id -> {resolve, reject}
};
window.chat = chat; // handy in the console

// --- connection ---------------------------------------------------------------

async function login() {
  const res = await fetch("/api/login", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ nick: chat.nick }),
  });
  const body = await res.json();
  if (!res.ok) throw new ChatError(body.error.code, body.error.message);
  return body.token;
}

async function connect() {
  clearTimeout(chat.timer);
  chat.timer = null;
  if (chat.ws || chat.connecting || !chat.nick) return;
  chat.connecting = true;
  setStatus(chat.attempt ? "reconnecting" : "connecting");
  let token;
  try {
    // A fresh token for every connection: the server may have restarted with a new key.
    token = await login();
  } catch (err) {
    chat.connecting = false;
    if (err.code === "bad_nick") askNick(err.message);
    else scheduleReconnect();
    return;
  }
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(`${scheme}//${location.host}/ws?token=${encodeURIComponent(token)}`);
  chat.ws = ws;
  chat.connecting = false;
  ws.onopen = () => {
    chat.online = true;
    setStatus("online");
    for (const room of chat.rooms.values()) subscribe(room);
  };
  ws.onmessage = (event) => {
    let msg;
    try {
      msg = JSON.parse(event.data);
    } catch {
      return;
    }
    onMessage(msg);
  };
  ws.onclose = () => {
    if (chat.ws !== ws) return;
    chat.ws = null;
    if (chat.online) chat.attempt = 0; // it was up: start the backoff over
    chat.online = false;
    for (const { reject } of chat.pending.values()) reject(new ChatError("offline", "the connection was lost"));
    chat.pending.clear();
    setStatus("reconnecting");
    scheduleReconnect();
  };
}

function scheduleReconnect() {
  if (chat.timer) return;
  // Full jitter: after a restart, every page must not come back in the same instant.
  const delay = Math.random() * Math.min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** chat.attempt);
  chat.attempt = Math.min(chat.attempt + 1, 16);
  chat.timer = setTimeout(connect, delay);
}

window.addEventListener("online", () => {
  chat.attempt = 0;
  connect();
});

function send(msg) {
  if (!chat.ws || chat.ws.readyState !== WebSocket.OPEN) return false;
  chat.ws.send(JSON.stringify(msg));
  return true;
}

function request(msg) {
  return new Promise((resolve, reject) => {
    const id = chat.nextId++;
    if (!send({ ...msg, id })) {
      reject(new ChatError("offline", "not connected; the chat is reconnecting"));
      return;
    }
    chat.pending.set(id, { resolve, reject });
  });
}

function onMessage(msg) {
  if (msg.id !== undefined && chat.pending.has(msg.id)) {
    const { resolve, reject } = chat.pending.get(msg.id);
    chat.pending.delete(msg.id);
    if (msg.ok) resolve(msg);
    else reject(new ChatError(msg.error.code, msg.error.message));
    return;
  }
  if (msg.op === "refresh_required") {
    login().then((token) => request({ op: "refresh", token })).catch(() => {});
    return;
  }
  const room = typeof msg.topic === "string" && chat.rooms.get(msg.topic.slice("room.".length));
  if (!room) return;
  if (room.loading) room.queue.push(msg);
  else onRoomEvent(room, msg);
}

function onRoomEvent(room, msg) {
  if (msg.op === "pub") {
    onPublication(room, msg);
  } else if (msg.op === "join" || msg.op === "leave") {
    const { client: nick, conn } = msg.client;
    if (msg.op === "join") room.members.set(conn, nick);
    else room.members.delete(conn);
    notice(room, `${nick} ${msg.op === "join" ? "joined" : "left"}`);
    renderMembers();
  }
}

function onPublication(room, pub) {
  if (pub.offset <= room.offset) return; // seen already
  room.offset = pub.offset;
  showPublication(room, pub);
}

async function subscribe(room) {
  room.loading = true;
  const msg = { op: "subscribe", topic: room.topic };
  if (room.epoch !== null) msg.since = { epoch: room.epoch, offset: room.offset };
  try {
    const reply = await request(msg);
    room.problem = null;
    if (reply.recovered) {
      for (const pub of reply.publications) onPublication(room, pub);
    } else {
      // A first join, or a gap history cannot fill (the server restarted and
      // its in-memory history went with it): show the room's latest messages.
      const sameEpoch = room.epoch === reply.epoch;
      if (room.epoch !== null) {
        divider(room, sameEpoch ? "some messages could not be recovered"
                                : "the server restarted — here is what was said since");
      }
      const after = sameEpoch ? room.offset : 0;
      room.epoch = reply.epoch;
      const recent = await getJSON(`/api/recent?room=${room.name}&upto=${reply.offset}`);
      for (const pub of recent.messages) if (pub.offset > after) showPublication(room, pub);
      room.offset = reply.offset;
    }
    const presence = await request({ op: "presence", topic: room.topic });
    room.members = new Map(presence.clients.map((c) => [c.conn, c.client]));
  } catch (err) {
    // Offline: the next connection subscribes again.
    if (err.code !== "offline" && chat.online) {
      room.problem = err;
      room.members.clear();
      errorLine(room, err.code === "nick_taken" ? err.message : `Could not join #${room.name}: ${err.message}`);
    }
  } finally {
    room.loading = false;
    const queued = room.queue;
    room.queue = [];
    for (const msg of queued) onRoomEvent(room, msg);
    renderRooms();
    renderMembers();
  }
}

async function getJSON(url) {
  const res = await fetch(url);
  if (!res.ok) throw new ChatError("http", `${url}: HTTP ${res.status}`);
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
  try {
    await request({ op: "say", room: room.name, text, me });
    return true;
  } catch (err) {
    // slow_down, too_long, offline: the text stays in the input to send again.
    errorLine(room, err.code === "offline" ? "Not sent: the chat is reconnecting." : err.message);
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
      await request({ op: "nick", nick });
    } catch (err) {
      errorLine(chat.current, err.message);
      return false;
    }
  }
  setNick(nick);
  // Rooms that refused the old nick may take this one.
  for (const room of chat.rooms.values()) if (room.problem && chat.online) subscribe(room);
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
    if (chat.online) subscribe(room);
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
  send({ op: "unsubscribe", topic: room.topic });
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
  ui.status.textContent = { online: "Online", connecting: "Connecting…", reconnecting: "Reconnecting…" }[state];
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
