// The official socket.io-client (the one the browser pages bundle) driven through the client
// protocol; prints one JSON summary on stdout. Usage:
//   node official_client.js <url> <websocket|default> <channel> <publishes>
"use strict";

const path = require("path");
const { io } = require(path.join(__dirname, "..", "..", "static", "node_modules", "socket.io-client"));

const [url, mode, channel, countArg] = process.argv.slice(2);
const count = Number(countArg);

function fail(message) {
  console.log(JSON.stringify({ error: message }));
  process.exit(1);
}

setTimeout(() => fail("timed out"), 20000).unref();

async function main() {
  const options = { auth: { user: "official" }, reconnection: false };
  if (mode === "websocket") options.transports = ["websocket"];
  const socket = io(url, options);
  const messages = [];
  const joins = [];
  socket.on("message", (message) => messages.push(message));
  socket.on("join", (event) => joins.push(event));
  await new Promise((resolve, reject) => {
    socket.on("connect", resolve);
    socket.on("connect_error", (error) => reject(new Error(`connect_error: ${error.message}`)));
  });
  if (mode !== "websocket" && socket.io.engine.transport.name !== "websocket") {
    await new Promise((resolve) => socket.io.engine.once("upgrade", resolve));
  }
  const subscribed = await socket.emitWithAck("subscribe", { channel });
  // Every publish at once, without waiting for acks: the node handles them as one run.
  const acks = await Promise.all(
    Array.from({ length: count }, (_, i) => socket.emitWithAck("publish", { channel, data: { i } })));
  while (messages.length < count) await new Promise((resolve) => setTimeout(resolve, 10));
  const history = await socket.emitWithAck("history", { channel, limit: 3 });
  const presence = await socket.emitWithAck("presence", { channel });
  const unknown = await socket.emitWithAck("no-such-event", {});
  const transport = socket.io.engine.transport.name;
  const closed = new Promise((resolve) => socket.on("disconnect", resolve));
  socket.disconnect();
  const reason = await closed;
  console.log(JSON.stringify({ transport, subscribed, acks, messages, joins, history, presence,
                               unknown, reason }));
}

main().catch((error) => fail(String(error && error.stack || error)));
