// Official clients with the default start (long-polling, then the upgrade) subscribe while a
// publisher streams, so that each upgrade happens in the middle of the fan-out; prints one
// JSON summary: per subscriber, its subscribe ack and every offset it received, with the
// transport each arrived on. Usage:
//   node upgrade_during_fanout.js <url> <channel> <subscribers> <json|msgpack>
"use strict";

const path = require("path");
const modules = path.join(__dirname, "..", "..", "..", "static", "node_modules");
const { io } = require(path.join(modules, "socket.io-client"));

const [url, channel, subscribersArg, parserName] = process.argv.slice(2);
const subscriberCount = Number(subscribersArg);
const MESSAGES_AFTER_UPGRADE = 50;
// The official client probes the WebSocket as soon as long-polling opens, and the upgrade
// usually completes before the first message arrives. Its probe is delayed by this much (the
// only change to the client) so that every upgrade happens while messages stream.
const PROBE_DELAY_MS = 300;

function fail(message) {
  console.log(JSON.stringify({ error: message }));
  process.exit(1);
}

setTimeout(() => fail("timed out"), 40000).unref();

function options(extra) {
  const result = { reconnection: false, forceNew: true, ...extra };
  if (parserName === "msgpack") result.parser = require(path.join(modules, "socket.io-msgpack-parser"));
  return result;
}

function subscriber(i) {
  return new Promise((resolve, reject) => {
    const socket = io(url, options({ auth: { user: `sub-${i}` } }));
    const engine = socket.io.engine;
    const probe = engine._probe.bind(engine);
    engine._probe = (name) => setTimeout(() => probe(name), PROBE_DELAY_MS);
    const state = { socket, ack: null, received: [], upgraded: false };
    socket.on("message", (message) => {
      state.received.push([message.offset, socket.io.engine.transport.name]);
    });
    socket.io.engine.on("upgrade", () => { state.upgraded = true; });
    socket.on("connect_error", (error) => reject(error));
    socket.on("connect", () => {
      // Subscribed while still on long-polling: the upgrade comes during the stream.
      state.transportAtSubscribe = socket.io.engine.transport.name;
      socket.emit("subscribe", { channel }, (ack) => { state.ack = ack; resolve(state); });
    });
  });
}

async function main() {
  const publisher = io(url, options({ transports: ["websocket"], auth: { user: "streamer" } }));
  await new Promise((resolve) => publisher.on("connect", resolve));
  let lastAck = 0;
  let publishing = true;
  (async () => {
    for (let i = 0; publishing; i++) {
      publisher.emit("publish", { channel, data: i }, (ack) => {
        if (ack.ok) lastAck = Math.max(lastAck, ack.offset);
      });
      await new Promise((resolve) => setTimeout(resolve, 2));
    }
  })();
  const subscribers = await Promise.all(Array.from({ length: subscriberCount }, (_, i) => subscriber(i)));
  const afterUpgrade = (s) => s.received.filter(([, transport]) => transport === "websocket").length;
  while (!subscribers.every((s) => s.upgraded && afterUpgrade(s) >= MESSAGES_AFTER_UPGRADE)) {
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
  publishing = false;
  await new Promise((resolve) => setTimeout(resolve, 50));  // the last acks come in
  const last = lastAck;
  while (!subscribers.every((s) => s.received.length && s.received[s.received.length - 1][0] >= last)) {
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
  const summary = subscribers.map((s) => ({
    ack: s.ack, transportAtSubscribe: s.transportAtSubscribe, received: s.received }));
  for (const s of subscribers) s.socket.close();
  publisher.close();
  console.log(JSON.stringify({ last, subscribers: summary }));
}

main().catch((error) => fail(String(error && error.stack || error)));
