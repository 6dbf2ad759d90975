// The bench's browser clients: N official socket.io-client 4.x clients in one Node process,
// with the client's default options (long-polling first, then the upgrade) or WebSocket first,
// with the default parser or socket.io-msgpack-parser. Driven by bench/browser.py:
//
//   node driver.js <url> <clients> <concurrency> <websocket|default> <json|msgpack> <channel>
//
// It connects the clients (<concurrency> at a time; "default" clients count as connected once
// upgraded) and says so, then answers commands, one JSON line each way:
//   {"op": "subscribe"}           -> subscribes every client to <channel>
//   {"op": "stats", "pub": <id>}  -> deliveries of publisher <id>'s bench messages
//   {"op": "close"}               -> closes every client and exits
// Every client logs in as the same user, as the fanout scenario's do: realtime announces a
// user's first subscription to a channel to its subscribers (a `join`), which with distinct
// users would cost N² deliveries while subscribing.
// Bench messages carry {p: publisher, s: sequence, t: send time in ns since the epoch}.
"use strict";

const path = require("path");
const readline = require("readline");

const modules = path.join(__dirname, "..", "..", "static", "node_modules");
const { io } = require(path.join(modules, "socket.io-client"));

const [url, clientsArg, concurrencyArg, way, parserName, channel] = process.argv.slice(2);
const clientCount = Number(clientsArg);
const concurrency = Number(concurrencyArg);
const UPGRADE_TIMEOUT_MS = 20000;
const parser = parserName === "msgpack"
  ? require(path.join(modules, "socket.io-msgpack-parser")) : undefined;

function emit(line) {
  process.stdout.write(JSON.stringify(line) + "\n");
}

// per publisher: deliveries, duplicates, reorderings, latencies (ms), last arrival (ms)
const publishers = new Map();

function record(client, data) {
  if (!data || typeof data.p !== "number") return;
  const arrived = Date.now();
  let stats = publishers.get(data.p);
  if (!stats) {
    stats = { deliveries: 0, duplicated: 0, reordered: 0, latencies: [], lastMs: 0 };
    publishers.set(data.p, stats);
  }
  let seen = client.seen.get(data.p);
  if (!seen) {
    seen = { last: -1, seqs: new Set() };
    client.seen.set(data.p, seen);
  }
  stats.deliveries++;
  stats.lastMs = arrived;
  if (seen.seqs.has(data.s)) {
    stats.duplicated++;
    return;
  }
  seen.seqs.add(data.s);
  if (data.s < seen.last) stats.reordered++;
  seen.last = Math.max(seen.last, data.s);
  stats.latencies.push(arrived - data.t / 1e6);
}

function connectOne(i) {
  const options = { reconnection: false, forceNew: true, auth: { user: "bench-browser" } };
  if (way === "websocket") options.transports = ["websocket"];
  if (parser) options.parser = parser;
  const socket = io(url, options);
  const client = { socket, seen: new Map() };
  socket.on("message", (message) => record(client, message && message.data));
  return new Promise((resolve, reject) => {
    socket.once("connect_error", reject);
    socket.once("connect", () => {
      const engine = socket.io.engine;
      if (way === "websocket" || engine.transport.name === "websocket") {
        resolve(client);
        return;
      }
      const timer = setTimeout(() => reject(new Error("no upgrade")), UPGRADE_TIMEOUT_MS);
      engine.once("upgrade", () => { clearTimeout(timer); resolve(client); });
    });
  });
}

async function inPool(count, task) {
  const results = [];
  let next = 0;
  const errors = {};
  async function worker() {
    while (next < count) {
      const i = next++;
      try {
        results.push(await task(i));
      } catch (error) {
        const reason = String(error && error.message || error).slice(0, 80);
        errors[reason] = (errors[reason] || 0) + 1;
      }
    }
  }
  await Promise.all(Array.from({ length: Math.min(concurrency, count) }, worker));
  return { results, errors };
}

function percentile(sorted, fraction) {
  if (!sorted.length) return null;
  return sorted[Math.min(sorted.length - 1, Math.floor(fraction * sorted.length))];
}

async function main() {
  const started = process.hrtime.bigint();
  const connected = await inPool(clientCount, connectOne);
  const connectS = Number(process.hrtime.bigint() - started) / 1e9;
  const clients = connected.results;
  const transports = {};
  for (const client of clients) {
    const name = client.socket.io.engine.transport.name;
    transports[name] = (transports[name] || 0) + 1;
  }
  emit({ event: "connected", connected: clients.length, connect_s: connectS,
         errors: connected.errors, transports });
  const commands = readline.createInterface({ input: process.stdin });
  for await (const line of commands) {
    const command = JSON.parse(line);
    if (command.op === "subscribe") {
      const started = process.hrtime.bigint();
      const subscribed = await inPool(clients.length, (i) => clients[i].socket
        .timeout(20000).emitWithAck("subscribe", { channel })
        .then((ack) => { if (!ack.ok) throw new Error(ack.error.code); }));
      emit({ event: "subscribed", subscribed: subscribed.results.length,
             subscribe_s: Number(process.hrtime.bigint() - started) / 1e9,
             errors: subscribed.errors });
    } else if (command.op === "stats") {
      const stats = publishers.get(command.pub);
      if (!stats) {
        emit({ event: "stats", deliveries: 0, duplicated: 0, reordered: 0, last_ms: 0,
               p50_ms: null, p99_ms: null });
        continue;
      }
      const sorted = Float64Array.from(stats.latencies).sort();
      emit({ event: "stats", deliveries: stats.deliveries, duplicated: stats.duplicated,
             reordered: stats.reordered, last_ms: stats.lastMs,
             p50_ms: percentile(sorted, 0.5), p99_ms: percentile(sorted, 0.99) });
    } else if (command.op === "close") {
      for (const client of clients) client.socket.close();
      emit({ event: "closed" });
      break;
    }
  }
  process.exit(0);
}

main().catch((error) => {
  emit({ event: "error", error: String(error && error.stack || error) });
  process.exit(1);
});
