// permessage-deflate interop with Node's `ws` (which offers it by default).
//
//   node deflate.mjs URL TOPIC COUNT [TIMEOUT_MS]
//
// A subscriber on TOPIC and a publisher that compresses every message
// (threshold 0). The publisher sends COUNT publications, alternating small and
// about 1.5 KB ones, in one burst; the subscriber reads them all. Prints one
// JSON object on stdout: {extensions, received:[...], publisherExtensions,
// replies}. Exit status: 0 when done, 3 on timeout, 2 on an error.
import WebSocket from 'ws';

const [url, topic, countArg, timeoutArg] = process.argv.slice(2);
const count = Number(countArg);
const timer = setTimeout(() => {
  process.stdout.write(JSON.stringify({ event: 'timeout' }) + '\n');
  process.exit(3);
}, Number(timeoutArg || 15000));

const open = (ws) => new Promise((resolve, reject) => {
  ws.once('open', resolve);
  ws.once('error', reject);
});

function big(i) {
  const entries = [];
  for (let k = 0; k < 12; k++) {
    entries.push({ rank: k + 1, player: `player_${(i * 37 + k) % 9999}`, team: ['red', 'blue'][k % 2],
      score: (i * 131 + k * 977) % 99999, status: 'alive' });
  }
  return { i, entries };
}

try {
  const sub = new WebSocket(url);
  const pub = new WebSocket(url, { perMessageDeflate: { threshold: 0 } });
  await Promise.all([open(sub), open(pub)]);
  const received = [];
  const replies = [];
  const done = new Promise((resolve) => {
    sub.on('message', (data) => {
      const msg = JSON.parse(data.toString('utf8'));
      if (msg.id === 'sub') {
        for (let i = 0; i < count; i++) {
          const data = i % 2 ? { i, small: true } : big(i);
          pub.send(JSON.stringify({ op: 'publish', topic, data, id: i }));
        }
      } else if (msg.op === 'pub') {
        received.push(msg.data);
        if (received.length === count) resolve();
      }
    });
  });
  pub.on('message', (data) => replies.push(JSON.parse(data.toString('utf8'))));
  sub.send(JSON.stringify({ op: 'subscribe', topic, id: 'sub' }));
  await done;
  clearTimeout(timer);
  process.stdout.write(JSON.stringify({
    extensions: sub.extensions, publisherExtensions: pub.extensions, received, replies: replies.length,
  }) + '\n');
  sub.close(1000);
  pub.close(1000);
} catch (err) {
  process.stdout.write(JSON.stringify({ event: 'error', message: String(err) }) + '\n');
  process.exit(2);
}
