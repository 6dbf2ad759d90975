// The official socket.io-client (the one the browser pages bundle) driven through the client
// protocol; prints one JSON summary on stdout. Usage:
//   node official_client.js <url> <way> <channel> <publishes>
// <way>: websocket | polling | default (polling, then the upgrade), each optionally prefixed
// with "msgpack-" to use the official socket.io-msgpack-parser instead of the default parser.
"use strict";

const path = require("path");
const modules = path.join(__dirname, "..", "..", "..", "static", "node_modules");
const { io } = require(path.join(modules, "socket.io-client"));

const [url, wayArg, channel, countArg] = process.argv.slice(2);
const count = Number(countArg);
const msgpack = wayArg.startsWith("msgpack-");
const way = msgpack ? wayArg.slice("msgpack-".length) : wayArg;
const user = `official-${wayArg}-${process.pid}`;

function fail(message) {
  console.log(JSON.stringify({ error: message }));
  process.exit(1);
}

setTimeout(() => fail("timed out"), 20000).unref();

function options(extra) {
  const result = { auth: { user }, reconnection: false, ...extra };
  if (way === "websocket") result.transports = ["websocket"];
  if (way === "polling") result.transports = ["polling"];
  if (msgpack) result.parser = require(path.join(modules, "socket.io-msgpack-parser"));
  return result;
}

async function refusedNamespace() {
  // A namespace the server does not serve: connect_error, decoded without the parser throwing.
  const socket = io(url + "/admin", options({ forceNew: true }));
  return new Promise((resolve) => {
    socket.on("connect_error", (error) => { socket.close(); resolve(error.message); });
    socket.on("connect", () => { socket.close(); resolve("connected?!"); });
  });
}

async function main() {
  const socket = io(url, options({}));
  const messages = [];
  const joins = [];
  socket.on("message", (message) => messages.push(message));
  socket.on("join", (event) => joins.push(event));
  await new Promise((resolve, reject) => {
    socket.on("connect", resolve);
    socket.on("connect_error", (error) => reject(new Error(`connect_error: ${error.message}`)));
  });
  if (way === "default" && socket.io.engine.transport.name !== "websocket") {
    await new Promise((resolve) => socket.io.engine.once("upgrade", resolve));
  }
  const subscribed = await socket.emitWithAck("subscribe", { channel });
  // Every publish at once, without waiting for acks: the node handles them as one run.
  const acks = await Promise.all(
    Array.from({ length: count }, (_, i) => socket.emitWithAck("publish", { channel, data: { i } })));
  const nullAck = await socket.emitWithAck("publish", { channel, data: null });
  while (messages.length < count + 1) await new Promise((resolve) => setTimeout(resolve, 10));
  const history = await socket.emitWithAck("history", { channel, limit: 3 });
  const presence = await socket.emitWithAck("presence", { channel });
  const unknown = await socket.emitWithAck("no-such-event", {});
  const forbidden = await socket.emitWithAck("publish", { channel: "user:" + user, data: 1 });
  const namespace = await refusedNamespace();
  const transport = socket.io.engine.transport.name;
  // The server disconnects this user on purpose: a Socket.IO DISCONNECT the parser must take.
  const closed = new Promise((resolve) => socket.on("disconnect", resolve));
  const response = await fetch(url + "/api/disconnect", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ user }),
  });
  const disconnected = await response.json();
  const reason = await closed;
  console.log(JSON.stringify({ user, transport, subscribed, acks, nullAck, messages, joins, history,
                               presence, unknown, forbidden, namespace, disconnected, reason }));
}

main().catch((error) => fail(String(error && error.stack || error)));
