// The official socket.io-client against a node that requires tokens; prints a JSON summary.
//   node token_client.js <url> <channel> <tokens JSON list> [websocket|default]
// Its `auth` is a function, as apps write it: each (re)connection asks for the next token of
// the list. The first token expires while connected: the node must close the session in a way
// that makes the client reconnect by itself, and the reconnection uses the next token. Then the
// client refreshes its token with the third one (`refresh` event).
"use strict";

const path = require("path");
const { io } = require(path.join(__dirname, "..", "..", "..", "static", "node_modules",
                                  "socket.io-client"));

const [url, channel, tokensArg, way] = process.argv.slice(2);
const tokens = JSON.parse(tokensArg);

function fail(message) {
  console.log(JSON.stringify({ error: message }));
  process.exit(1);
}

setTimeout(() => fail("timed out"), 30000).unref();

async function main() {
  let asked = 0;
  const options = {
    auth: (cb) => cb({ token: tokens[Math.min(asked++, tokens.length - 1)] }),
    reconnectionDelay: 100, reconnectionDelayMax: 200,
  };
  if (way === "websocket") options.transports = ["websocket"];
  const socket = io(url, options);
  const connects = [];
  const disconnects = [];
  const messages = [];
  socket.on("message", (message) => messages.push(message));
  socket.on("disconnect", (reason) => disconnects.push(reason));
  const connected = () => new Promise((resolve) => socket.once("connect", resolve));
  await connected();
  connects.push(socket.id);
  const first = await socket.emitWithAck("subscribe", { channel });
  const reconnected = connected();
  await reconnected;  // after the first token expired
  connects.push(socket.id);
  const second = await socket.emitWithAck("subscribe", { channel });
  const refreshed = await socket.emitWithAck("refresh", { token: tokens[2] });
  const published = await socket.emitWithAck("publish", { channel, data: "after refresh" });
  while (!messages.length) await new Promise((resolve) => setTimeout(resolve, 10));
  socket.disconnect();
  console.log(JSON.stringify({ asked, connects, disconnects, first, second, refreshed,
                               published, messages }));
}

main().catch((error) => fail(String(error && error.stack || error)));
