// Interop client for trioserve using Node's `ws` package.
//
//   node client.mjs URL TOPIC COUNT
//
// Subscribes to TOPIC, waits for COUNT publications, sends a ping op, closes
// with 1000, and prints one JSON object per line on stdout as it goes:
//   {"event":"subscribed","reply":{...}}   the subscribe reply
//   {"event":"pub","msg":{...}}            each publication, as received
//   {"event":"pong","reply":{...}}         the ping reply
//   {"event":"close","code":N,"reason":"..."}  the close code the server sent
// Exit status: 0 after a close with COUNT publications received, 2 on an
// error, 3 on timeout, 4 if the connection closed early.
import WebSocket from 'ws';

const [url, topic, countArg, timeoutArg] = process.argv.slice(2);
const count = Number(countArg);
if (!url || !topic || !Number.isInteger(count) || count < 0) {
  console.error('usage: node client.mjs URL TOPIC COUNT [TIMEOUT_MS]');
  process.exit(64);
}

const out = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');
// Bounded, so a server that never answers fails the test instead of hanging it.
const timer = setTimeout(() => {
  out({ event: 'timeout' });
  process.exit(3);
}, Number(timeoutArg || 15000));

const ws = new WebSocket(url);
let pubs = 0;

ws.on('open', () => {
  ws.send(JSON.stringify({ op: 'subscribe', topic, id: 1 }));
});

ws.on('message', (data, isBinary) => {
  if (isBinary) {
    out({ event: 'unexpected-binary', length: data.length });
    return;
  }
  const msg = JSON.parse(data.toString('utf8'));
  if (msg.op === 'pub') {
    out({ event: 'pub', msg });
    pubs += 1;
    if (pubs === count) ws.send(JSON.stringify({ op: 'ping', id: 2 }));
  } else if (msg.id === 1) {
    out({ event: 'subscribed', reply: msg });
    if (count === 0) ws.send(JSON.stringify({ op: 'ping', id: 2 }));
  } else if (msg.id === 2) {
    out({ event: 'pong', reply: msg });
    ws.close(1000, 'done');
  } else {
    out({ event: 'unexpected', msg });
  }
});

ws.on('close', (code, reason) => {
  clearTimeout(timer);
  out({ event: 'close', code, reason: reason.toString('utf8') });
  process.exit(pubs === count ? 0 : 4);
});

ws.on('error', (err) => {
  clearTimeout(timer);
  out({ event: 'error', message: String(err) });
  process.exit(2);
});
