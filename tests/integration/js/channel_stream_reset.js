// The pages' ChannelStream (static/realtime-client.js) under a `reset` event, with a fake
// connection: prints a JSON summary of what it did, for test_page_scripts.py to check.
'use strict';
const path = require('path');

global.window = {};
require(path.join(__dirname, '..', '..', '..', 'static', 'realtime-client.js'));
const { ChannelStream } = window.RealtimeClient;

class FakeConnection {
  constructor() {
    this.handlers = new Map();
    this.requests = [];
    this.notices = [];
    this.errors = [];
    this.socket = { connected: true };
    this.connected = true;
    this.status = {
      showNotice: (text) => this.notices.push(text),
      showError: (text) => this.errors.push(text),
    };
  }
  on(event, handler) {
    if (!this.handlers.has(event)) this.handlers.set(event, []);
    this.handlers.get(event).push(handler);
  }
  dispatch(event, ...args) {
    for (const handler of this.handlers.get(event) || []) handler(...args);
  }
  request(event, payload, done) {
    this.requests.push({ event, payload, done });
  }
  answer(event, response) {
    const index = this.requests.findIndex((r) => r.event === event);
    if (index < 0) throw new Error(`no pending ${event} request`);
    const [request] = this.requests.splice(index, 1);
    request.done(null, { ok: true, ...response });
  }
}

const channel = 'chat:reset';
const connection = new FakeConnection();
const restarts = [];
const stream = new ChannelStream(connection, {
  historyLimit: 50,
  texts: { subscribeFailed: (m) => m, historyFailed: (m) => m, missed: 'missed' },
  onRestart: (restart) => restarts.push(restart),
});
const message = (offset, data) => ({ channel, offset, data, user: 'u' });
const shown = () => [...stream.publications.values()].map((p) => [p.offset, p.data]);

stream.open(channel);
connection.dispatch('connect');
connection.answer('subscribe', { channel, epoch: 'e1', offset: 0, recovered: false, publications: [] });
connection.answer('history', { epoch: 'e1', offset: 0, publications: [] });
connection.dispatch('message', message(1, 'old 1'));
connection.dispatch('message', message(2, 'old 2'));
const beforeReset = shown();

// Redis lost the stream: the node says so, then the new stream's messages follow.
connection.dispatch('reset', { channel, epoch: 'e2', offset: 0 });
const historyAfterReset = connection.requests.filter((r) => r.event === 'history').length;
connection.dispatch('message', message(1, 'new 1'));
connection.answer('history', { epoch: 'e2', offset: 1, publications: [message(1, 'new 1')] });
connection.dispatch('message', message(2, 'new 2'));
connection.dispatch('reset', { channel: 'chat:other', epoch: 'x', offset: 9 }); // not ours

console.log(JSON.stringify({
  beforeReset,
  afterReset: shown(),
  historyAfterReset,
  restarts,
  notices: connection.notices,
  errors: connection.errors,
  epoch: stream.epoch,
  lastOffset: stream.lastOffset,
}));
