// Decodes packets with the official JavaScript parsers, as a browser client would: reads a JSON
// list of {parser: "json"|"msgpack", text?, base64?} on stdin, prints a JSON list of
// {packet} or {error} (the parser threw), in order.
"use strict";

const path = require("path");
const modules = path.join(__dirname, "..", "..", "..", "static", "node_modules");
const jsonParser = require(path.join(modules, "socket.io-parser"));
const msgpackParser = require(path.join(modules, "socket.io-msgpack-parser"));

function decode(parser, data) {
  const decoder = new parser.Decoder();
  let packet = null;
  decoder.on("decoded", (decoded) => { packet = decoded; });
  try {
    decoder.add(data);
  } catch (error) {
    return { error: String(error.message || error) };
  }
  return packet === null ? { error: "no packet" } : { packet };
}

let input = "";
process.stdin.on("data", (chunk) => { input += chunk; });
process.stdin.on("end", () => {
  const results = JSON.parse(input).map((item) => item.parser === "json"
    ? decode(jsonParser, item.text)
    : decode(msgpackParser, Buffer.from(item.base64, "base64")));
  console.log(JSON.stringify(results));
});
