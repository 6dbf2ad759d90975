/*
 * realtime — what the browser pages share (chat and notifications).
 *
 * Loaded as a classic script after /vendor/socket.io.min.js and before the
 * page's own script; exposes one global, window.RealtimeClient:
 *
 *   createStatusDisplay  connection badge, notice banner and error toasts
 *   Connection           one Socket.IO connection per user name, with the
 *                        badge kept up to date and acknowledged requests
 *   ChannelStream        one channel's publications kept in sync across
 *                        reconnects (subscribe, history, recovery)
 *   loadPrefs/savePrefs  small JSON objects in localStorage
 *   isValidChannel, MAX_USER_LENGTH, requireSocketIo
 *
 * Plain ES2020, no modules, no build step. Text only ever reaches the DOM
 * through textContent.
 */
(function () {
  'use strict';

  const CHANNEL_RE = /^[A-Za-z0-9_.:@-]{1,200}$/; // the server's rule for channel names
  const MAX_USER_LENGTH = 64; // longer names make the server fall back to "anon-<sid>"
  const ACK_TIMEOUT_MS = 5000;
  const RETRY_DELAY_MS = 3000;
  const NOTICE_MS = 10000;
  const TOAST_MS = 6000;
  const MAX_TOASTS = 4;
  // Failures that may go away by themselves; the others (bad_request,
  // forbidden, ...) would fail the same way again.
  const RETRYABLE = new Set(['timeout', 'disconnected', 'unavailable', 'rate_limited', 'internal']);
  // The connection badge's states: `connecting` (never connected yet),
  // `online`, `reconnecting` (lost, socket.io retries by itself) and `offline`
  // (not connected and not trying: closed on purpose or refused).
  const BADGE_LABELS = {
    connecting: 'Connecting…',
    online: 'Online',
    reconnecting: 'Reconnecting…',
    offline: 'Offline',
  };

  // ---------------------------------------------------------------------------
  // Status display

  /*
   * The feedback both pages show outside their main content: the connection
   * badge in the top bar, a notice banner that hides itself after a while,
   * and error toasts (click to dismiss, at most MAX_TOASTS at a time).
   */
  function createStatusDisplay({ badge, notice, toasts }) {
    let noticeTimer = null;

    function hideNotice() {
      clearTimeout(noticeTimer);
      notice.hidden = true;
    }

    return {
      // connectionState: one of the keys of BADGE_LABELS.
      setConnectionState(connectionState) {
        badge.dataset.state = connectionState;
        badge.textContent = BADGE_LABELS[connectionState];
      },

      showNotice(text) {
        notice.textContent = text;
        notice.hidden = false;
        clearTimeout(noticeTimer);
        noticeTimer = setTimeout(hideNotice, NOTICE_MS);
      },

      hideNotice,

      showError(text) {
        const toast = document.createElement('div');
        toast.className = 'toast';
        toast.setAttribute('role', 'alert');
        toast.textContent = text;
        toast.title = 'Click to dismiss';
        const remove = () => toast.remove();
        toast.addEventListener('click', remove);
        setTimeout(remove, TOAST_MS);
        toasts.appendChild(toast);
        while (toasts.children.length > MAX_TOASTS) toasts.firstElementChild.remove();
      },
    };
  }

  // Shows an error and returns false when /vendor/socket.io.min.js did not load.
  function requireSocketIo(status) {
    if (typeof io === 'function') return true;
    status.showError('The Socket.IO client could not be loaded (/vendor/socket.io.min.js).');
    return false;
  }

  // ---------------------------------------------------------------------------
  // Connection

  /*
   * The page's connection to the server. open(user) replaces it with a new
   * one authenticated as `user`; close() drops it. Events of a replaced or
   * closed socket are ignored, so late callbacks never touch the page.
   * `status` (from createStatusDisplay) shows the connection state.
   */
  class Connection {
    constructor(status) {
      this.status = status;
      this.handlers = new Map(); // event -> [handler], see on()
      this.socket = null;
      this.user = null;           // the user id we authenticate with; null when closed
      this.everConnected = false; // tells "connecting" from "reconnecting"
    }

    /*
     * Adds a handler, before open(), for "connect" (connected, first time or
     * again), "disconnect" (connection lost; socket.io retries by itself
     * unless `active` is false) or a server→client event such as "message".
     * Handlers run in the order they were added.
     */
    on(event, handler) {
      if (!this.handlers.has(event)) this.handlers.set(event, []);
      this.handlers.get(event).push(handler);
      return this;
    }

    dispatch(event, ...args) {
      for (const handler of this.handlers.get(event) || []) handler(...args);
    }

    get connected() {
      return Boolean(this.socket && this.socket.connected);
    }

    // False once the server (or close()) ended the socket on purpose:
    // socket.io will not retry by itself then.
    get active() {
      return Boolean(this.socket && this.socket.active);
    }

    // `user` null: an anonymous connection (the server names it anon-<sid>),
    // which shows whether the server is reachable before the user says who
    // they are.
    open(user) {
      this.close();
      // forceNew: a new name needs a new handshake (auth is only sent then).
      const socket = io({ auth: user === null ? {} : { user }, forceNew: true });
      this.socket = socket;
      this.user = user;
      this.everConnected = false;
      const setBadge = (connectionState) => this.status.setConnectionState(connectionState);
      setBadge('connecting');

      const mine = (fn) => (...args) => { if (socket === this.socket) fn(...args); };

      socket.on('connect', mine(() => {
        setBadge('online');
        this.everConnected = true;
        this.dispatch('connect');
      }));

      socket.on('disconnect', mine(() => {
        setBadge(socket.active ? 'reconnecting' : 'offline');
        this.dispatch('disconnect');
      }));

      socket.on('connect_error', mine((err) => {
        if (socket.active) {
          setBadge(this.everConnected ? 'reconnecting' : 'connecting');
        } else {
          // Refused by the server's middleware: no automatic retry.
          setBadge('offline');
          this.status.showError(`Connection refused: ${err && err.message ? err.message : 'unknown error'}`);
        }
      }));

      socket.io.on('reconnect_attempt', mine(() => setBadge('reconnecting')));

      for (const event of this.handlers.keys()) {
        if (event === 'connect' || event === 'disconnect') continue; // dispatched above
        socket.on(event, mine((...args) => this.dispatch(event, ...args)));
      }
    }

    // Connects the current socket again after the server closed it.
    reconnect() {
      if (this.socket) this.socket.connect();
    }

    close() {
      const socket = this.socket;
      if (!socket) return;
      this.socket = null; // handlers are bound with mine(): they go quiet now
      this.user = null;
      socket.disconnect(); // the server drops this connection's subscriptions
    }

    /*
     * Emits an acknowledged request and calls done(error, response) directly
     * from the ack; error is {code, message}. Callbacks rather than promises
     * on purpose: with HTTP long-polling a single response can carry an ack
     * and the events that follow it; a promise continuation would only run
     * after those events, so state they depend on (e.g. `subscribed`,
     * `lastOffset`) must be set in the ack.
     */
    request(event, payload, done) {
      const socket = this.socket;
      if (!socket || !socket.connected) {
        // socket.io would buffer the emit until it reconnects; fail fast instead.
        done({ code: 'disconnected', message: 'not connected to the server' });
        return;
      }
      socket.timeout(ACK_TIMEOUT_MS).emit(event, payload, (err, resp) => {
        if (err) {
          const timedOut = /timed out/i.test(String(err.message));
          done({
            code: timedOut ? 'timeout' : 'disconnected',
            message: timedOut ? 'the server did not answer in time' : 'connection lost before the server answered',
          });
        } else if (!resp || typeof resp !== 'object') {
          done({ code: 'internal', message: 'unexpected answer from the server' });
        } else if (resp.ok !== true) {
          const e = resp.error && typeof resp.error === 'object' ? resp.error : {};
          done({ code: String(e.code || 'internal'), message: String(e.message || 'request failed') });
        } else {
          done(null, resp);
        }
      });
    }
  }

  // ---------------------------------------------------------------------------
  // Channel stream

  /*
   * Keeps `publications` (offset -> {offset, user, data, ts}) in sync with one
   * channel over a Connection. Keyed by offset, history, live events and
   * recovered publications merge without duplicates.
   *
   * open(channel) picks the channel; sync() subscribes to it, and runs again
   * on every (re)connect. The first time (no epoch yet) this is a plain subscribe
   * followed by a history load. After a reconnect it passes `since` so the
   * server can send exactly what we missed; if it can't (recovered: false) we
   * drop what we have and reload the history instead; the same when the server
   * sends `reset` (the stream broke while we were connected). Live messages at
   * or below `lastOffset` are ones we already have.
   *
   * `gen` is bumped on channel change, on connection loss and at the start of
   * every sync: callbacks capture it and drop their result when it no longer
   * matches.
   *
   * Errors and the "missed" notice go to the connection's status display.
   *
   * options:
   *   historyLimit   publications to load when (re)loading the history
   *   dataTimeKeys   fields of `data` that may carry the publication's time
   *   texts          {subscribeFailed(message), historyFailed(message), missed}
   * hooks (all optional):
   *   onAdded(added, live)     new publications stored; `added` sorted by offset
   *   onRestart({newEpoch, offset})  stored publications dropped, the stream
   *                            starts over at `offset` (newEpoch: offsets of the
   *                            old stream no longer compare)
   *   onSubscribed(isCurrent)  subscribed; isCurrent() tells later callbacks
   *                            whether this subscription still stands
   *   onHistorySettled()       history loaded, or given up on
   */
  class ChannelStream {
    constructor(connection, options) {
      const noop = () => {};
      this.connection = connection;
      this.status = connection.status;
      this.historyLimit = options.historyLimit;
      this.dataTimeKeys = options.dataTimeKeys || [];
      this.texts = options.texts;
      this.onAdded = options.onAdded || noop;
      this.onRestart = options.onRestart || noop;
      this.onSubscribed = options.onSubscribed || noop;
      this.onHistorySettled = options.onHistorySettled || noop;
      this.publications = new Map();
      this.gen = 0;
      this.reset(null);
      // Pages add their own handlers after creating the stream, so theirs
      // see the stream's state already updated.
      connection.on('connect', () => this.sync());
      connection.on('disconnect', () => this.connectionLost());
      connection.on('message', (msg) => this.receive(msg));
      connection.on('reset', (event) => this.streamReset(event));
    }

    // Forgets the current channel's state and switches to `channel`; sync()
    // subscribes to it.
    open(channel) {
      this.reset(channel);
    }

    close() {
      this.reset(null);
    }

    reset(channel) {
      this.gen++;
      this.channel = channel;
      this.subscribed = false;    // subscribed on the *current* connection
      this.historyPending = false; // a history (re)load is under way
      this.epoch = null;          // history stream of the channel (from subscribe/history)
      this.lastOffset = 0;        // newest offset we are in sync with
      this.publications.clear();
    }

    // The subscription died with the connection; in-flight requests belong to it.
    connectionLost() {
      this.gen++;
      this.subscribed = false;
    }

    sync() {
      if (!this.channel) return;
      const gen = ++this.gen;
      const channel = this.channel;
      const resuming = this.epoch !== null;
      const payload = resuming
        ? { channel, since: { epoch: this.epoch, offset: this.lastOffset } }
        : { channel };

      const socket = this.connection.socket;
      this.connection.request('subscribe', payload, (err, sub) => {
        if (gen !== this.gen) {
          // The channel changed while this was in flight: don't stay
          // subscribed to a channel we no longer show.
          if (!err && socket === this.connection.socket && socket.connected && channel !== this.channel) {
            this.connection.request('unsubscribe', { channel }, (unsubErr) => {
              if (unsubErr) this.status.showError(`Could not leave ${channel}: ${unsubErr.message}`);
            });
          }
          return;
        }
        if (err) {
          this.status.showError(this.texts.subscribeFailed(err.message));
          if (RETRYABLE.has(err.code)) this.retryLater(gen, () => this.sync());
          return;
        }
        this.subscribed = true;
        const offset = toOffset(sub.offset) || 0;
        // Epoch "" means the channel had no stream when we first saw it: a recovery from the
        // stream created since continues it, it does not replace it.
        if (resuming && sub.recovered === true && (sub.epoch === this.epoch || this.epoch === '')) {
          this.epoch = sub.epoch;
          this.add(sub.publications, false);
          this.lastOffset = Math.max(this.lastOffset, offset);
        } else {
          const newEpoch = !resuming || sub.epoch !== this.epoch;
          this.publications.clear();
          this.epoch = sub.epoch;
          this.lastOffset = offset;
          this.historyPending = true;
          this.onRestart({ newEpoch, offset });
          if (resuming) this.status.showNotice(this.texts.missed);
          this.loadHistory(gen);
        }
        this.onSubscribed(() => gen === this.gen);
      });
    }

    loadHistory(gen) {
      this.connection.request('history', { channel: this.channel, limit: this.historyLimit }, (err, hist) => {
        if (gen !== this.gen) return;
        if (err) {
          this.status.showError(this.texts.historyFailed(err.message));
          if (RETRYABLE.has(err.code)) {
            this.retryLater(gen, () => this.loadHistory(gen));
          } else {
            this.historyPending = false;
            this.onHistorySettled();
          }
          return;
        }
        this.historyPending = false;
        if (hist.epoch !== this.epoch && this.epoch === '') {
          // The channel's first publication came after our subscribe: the same stream.
          this.epoch = hist.epoch;
        } else if (hist.epoch !== this.epoch) {
          // The stream was reset between subscribe and history; the history
          // answer is the newer view, so start over from it.
          this.publications.clear();
          this.epoch = hist.epoch;
          this.lastOffset = toOffset(hist.offset) || 0;
          this.onRestart({ newEpoch: true, offset: this.lastOffset });
        }
        this.add(hist.publications, false);
        this.onHistorySettled();
      });
    }

    // Handler for the server's `reset` event: the channel's stream broke (the
    // server could not fill a gap from history: Redis lost it, or the gap was
    // older than history). It now stands at epoch/offset, and live messages
    // continue from offset + 1; what came before may be missing, so drop what
    // we show, reload the history, and say so.
    streamReset(event) {
      if (!event || event.channel !== this.channel || !this.subscribed) return;
      const offset = toOffset(event.offset);
      if (offset === null || typeof event.epoch !== 'string') return;
      const newEpoch = event.epoch !== this.epoch;
      this.publications.clear();
      this.epoch = event.epoch;
      this.lastOffset = offset;
      this.historyPending = true;
      this.onRestart({ newEpoch, offset });
      this.status.showNotice(this.texts.missed);
      this.loadHistory(this.gen);
    }

    // Retries fn while nothing else (channel change, reconnect, new sync) happened.
    retryLater(gen, fn) {
      setTimeout(() => {
        if (gen === this.gen && this.connection.connected) fn();
      }, RETRY_DELAY_MS);
    }

    // Handler for the server's `message` event.
    receive(msg) {
      if (!msg || msg.channel !== this.channel || !this.subscribed) return;
      const offset = toOffset(msg.offset);
      if (offset === null || offset <= this.lastOffset) return; // already have it
      this.add([msg], true);
    }

    add(list, live) {
      if (!Array.isArray(list)) return;
      const added = [];
      for (const pub of list) {
        const offset = pub ? toOffset(pub.offset) : null;
        if (offset === null || this.publications.has(offset)) continue;
        const record = {
          offset,
          user: typeof pub.user === 'string' ? pub.user : null,
          data: pub.data,
          ts: publicationTime(pub, live, this.dataTimeKeys),
        };
        this.publications.set(offset, record);
        added.push(record);
        if (offset > this.lastOffset) this.lastOffset = offset;
      }
      if (added.length === 0) return;
      added.sort((a, b) => a.offset - b.offset);
      this.onAdded(added, live);
    }
  }

  function toOffset(value) {
    return Number.isInteger(value) && value >= 0 ? value : null;
  }

  // Publications carry no server timestamp, so we use one if present (server
  // fields `ts`/`time`, then the given fields of data), else the arrival time
  // for live publications, else none.
  function publicationTime(pub, live, dataTimeKeys) {
    const data = pub.data && typeof pub.data === 'object' ? pub.data : {};
    for (const candidate of [pub.ts, pub.time, ...dataTimeKeys.map((key) => data[key])]) {
      const t = parseTime(candidate);
      if (t !== null) return t;
    }
    return live ? Date.now() : null;
  }

  function parseTime(value) {
    if (typeof value === 'number' && Number.isFinite(value) && value > 0) {
      return value < 1e11 ? value * 1000 : value; // seconds or milliseconds
    }
    if (typeof value === 'string' && value) {
      const t = Date.parse(value);
      return Number.isNaN(t) ? null : t;
    }
    return null;
  }

  // ---------------------------------------------------------------------------
  // Small helpers

  function isValidChannel(channel) {
    return CHANNEL_RE.test(channel);
  }

  // Returns the object stored under `key`, or {} (storage disabled or corrupt:
  // just start empty).
  function loadPrefs(key) {
    try {
      const prefs = JSON.parse(localStorage.getItem(key) || '{}');
      return prefs && typeof prefs === 'object' ? prefs : {};
    } catch (_) {
      return {};
    }
  }

  function savePrefs(key, prefs) {
    try {
      localStorage.setItem(key, JSON.stringify(prefs));
    } catch (_) { /* storage disabled: nothing to remember */ }
  }

  window.RealtimeClient = Object.freeze({
    MAX_USER_LENGTH,
    createStatusDisplay,
    requireSocketIo,
    Connection,
    ChannelStream,
    isValidChannel,
    loadPrefs,
    savePrefs,
  });
})();
