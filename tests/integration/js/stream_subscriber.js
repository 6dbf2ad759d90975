// One official socket.io-client subscriber of numbered streams, for the reliability tests
// (tests/integration/streams.py). Usage:
//   node stream_subscriber.js <url> <way> <user> <channel,channel,...>
// <way>: websocket | polling | default (long-polling, then the upgrade), each optionally
// prefixed with "msgpack-" for socket.io-msgpack-parser.
//
// The client keeps the official client's default options (reconnection on, its default delays)
// and behaves as an app should: on every connect it subscribes to each channel, with `since`
// set to the last position it holds (none the first time), and moves its position on every
// subscribe ack, `message` and `reset`. It prints every event it gets, one JSON object per line:
//   {"kind": "connect", "sid", "transport"}      {"kind": "upgrade", "transport"}
//   {"kind": "subscribed", "channel", "since", "ack"}
//   {"kind": "message", "channel", "offset", "data", "user"}
//   {"kind": "reset", "channel", "epoch", "offset"}
//   {"kind": "disconnect", "reason"}             {"kind": "connect_error", "message"}
//   {"kind": "paused"} / {"kind": "resumed"}     {"kind": "bye"}
// Commands, one per line on stdin: "pause" stops reading the WebSocket's TCP connection (the
// client falls behind as a stalled browser tab would), "resume" reads again, "quit" closes the
// client and exits. End of stdin also quits, so the client never outlives its test.
"use strict";

const path = require("path");
const readline = require("readline");

const modules = path.join(__dirname, "..", "..", "..", "static", "node_modules");
const { io } = require(path.join(modules, "socket.io-client"));

const [url, wayArg, user, channelsArg] = process.argv.slice(2);
const channels = channelsArg.split(",");
const msgpack = wayArg.startsWith("msgpack-");
const way = msgpack ? wayArg.slice("msgpack-".length) : wayArg;
// How long to wait before asking again when a subscribe is refused (e.g. `unavailable` while
// Redis is down): an app retries, it does not give up on the channel.
const SUBSCRIBE_RETRY_MS = 200;
// How long to wait before connecting again after the server refused the Socket.IO CONNECT (the
// official client does not retry that by itself; transport failures it retries on its own).
const CONNECT_RETRY_MS = 500;

function out(record) {
  process.stdout.write(JSON.stringify(record) + "\n");
}

const options = { auth: { user } };
if (way === "websocket") options.transports = ["websocket"];
if (way === "polling") options.transports = ["polling"];
if (msgpack) options.parser = require(path.join(modules, "socket.io-msgpack-parser"));

const socket = io(url, options);
// channel -> {epoch, offset}: where this client stands in each stream.
const positions = new Map();
let paused = null; // the TCP socket whose reading is paused

function subscribe(channel) {
  const since = positions.get(channel);
  const payload = since ? { channel, since: { ...since } } : { channel };
  const connection = socket.id;
  socket.emit("subscribe", payload, (ack) => {
    out({ kind: "subscribed", channel, since: since ? { ...since } : null, ack });
    if (ack && ack.ok) {
      // Recovered or not, the client now stands where the ack says (the recovered
      // publications, delivered in the ack, end there).
      positions.set(channel, { epoch: ack.epoch, offset: ack.offset });
    } else if (socket.connected && socket.id === connection) {
      setTimeout(() => {
        if (socket.connected && socket.id === connection) subscribe(channel);
      }, SUBSCRIBE_RETRY_MS);
    }
  });
}

socket.on("connect", () => {
  const engine = socket.io.engine;
  out({ kind: "connect", sid: engine.id, transport: engine.transport.name });
  engine.once("upgrade", (transport) => out({ kind: "upgrade", transport: transport.name }));
  for (const channel of channels) subscribe(channel);
});

socket.on("message", (message) => {
  out({ kind: "message", channel: message.channel, offset: message.offset, data: message.data,
        user: message.user });
  const position = positions.get(message.channel);
  if (position) position.offset = message.offset;
});

socket.on("reset", (reset) => {
  out({ kind: "reset", channel: reset.channel, epoch: reset.epoch, offset: reset.offset });
  positions.set(reset.channel, { epoch: reset.epoch, offset: reset.offset });
});

socket.on("disconnect", (reason) => out({ kind: "disconnect", reason }));

socket.on("connect_error", (error) => {
  out({ kind: "connect_error", message: String(error && error.message) });
  if (!socket.active) setTimeout(() => socket.connect(), CONNECT_RETRY_MS);
});

function tcpSocket() {
  const transport = socket.io.engine && socket.io.engine.transport;
  // engine.io-client's Node WebSocket transport wraps a `ws` WebSocket, which reads from a
  // net.Socket of its own.
  return transport && transport.name === "websocket" && transport.ws ? transport.ws._socket : null;
}

function quit() {
  out({ kind: "bye" });
  socket.close();
  process.exit(0);
}

const commands = readline.createInterface({ input: process.stdin });
commands.on("line", (line) => {
  const command = line.trim();
  if (command === "pause") {
    paused = tcpSocket();
    if (paused) paused.pause();
    out({ kind: "paused", ok: Boolean(paused) });
  } else if (command === "resume") {
    if (paused) paused.resume();
    paused = null;
    out({ kind: "resumed" });
  } else if (command === "quit") {
    quit();
  }
});
commands.on("close", quit);
