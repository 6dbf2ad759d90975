// The Node peer of realtime's benchmark: socket.io 4.8 with @socket.io/redis-adapter, as their
// documentation sets them up, serving the same events as realtime as far as the bench uses them:
//
//   subscribe {channel}        -> socket.join(channel), ack {ok: true, channel}
//   publish {channel, data}    -> io.to(channel).emit("message", {channel, data, user}), ack {ok}
//   POST /api/publish {channel, data} -> the same emit, answers {ok: true}
//   GET /readyz                -> 200 once both Redis connections are up
//
// Usage: node server.js --port 5002 --redis redis://127.0.0.1:6390/0
"use strict";

const http = require("http");
const { Server } = require("socket.io");
const { createAdapter } = require("@socket.io/redis-adapter");
const { createClient } = require("redis");

function option(name, fallback) {
  const at = process.argv.indexOf(name);
  return at >= 0 && at + 1 < process.argv.length ? process.argv[at + 1] : fallback;
}

const host = option("--host", "127.0.0.1");
const port = Number(option("--port", "5002"));
const redisUrl = option("--redis", "redis://127.0.0.1:6379/0");
let ready = false;
let io = null;

function answer(res, status, body) {
  const text = JSON.stringify(body);
  res.writeHead(status, { "Content-Type": "application/json",
                          "Content-Length": Buffer.byteLength(text) });
  res.end(text);
}

const httpServer = http.createServer((req, res) => {
  if (req.method === "GET" && req.url === "/readyz") {
    answer(res, ready ? 200 : 503, { status: ready ? "ready" : "not ready" });
  } else if (req.method === "POST" && req.url === "/api/publish") {
    const chunks = [];
    req.on("data", (chunk) => chunks.push(chunk));
    req.on("end", () => {
      let body;
      try {
        body = JSON.parse(Buffer.concat(chunks).toString());
      } catch (err) {
        answer(res, 400, { error: { code: "bad_request", message: String(err) } });
        return;
      }
      io.to(body.channel).emit("message", { channel: body.channel, data: body.data, user: null });
      answer(res, 200, { ok: true });
    });
  } else {
    answer(res, 404, { error: { code: "not_found", message: "not found" } });
  }
});

async function main() {
  const pubClient = createClient({ url: redisUrl });
  const subClient = pubClient.duplicate();
  for (const client of [pubClient, subClient]) {
    client.on("error", (err) => console.error("redis:", err.message));
  }
  await Promise.all([pubClient.connect(), subClient.connect()]);
  io = new Server(httpServer, { adapter: createAdapter(pubClient, subClient), serveClient: false });
  io.on("connection", (socket) => {
    const auth = socket.handshake.auth || {};
    const user = typeof auth.user === "string" ? auth.user : null;
    socket.on("subscribe", (payload, ack) => {
      socket.join(payload.channel);
      if (typeof ack === "function") ack({ ok: true, channel: payload.channel });
    });
    socket.on("publish", (payload, ack) => {
      io.to(payload.channel).emit("message",
                                  { channel: payload.channel, data: payload.data, user });
      if (typeof ack === "function") ack({ ok: true });
    });
  });
  httpServer.listen(port, host, () => {
    ready = true;
    console.log(`node peer on http://${host}:${port} (redis ${redisUrl})`);
  });
}

for (const signal of ["SIGTERM", "SIGINT"]) {
  process.on(signal, () => process.exit(0));
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
