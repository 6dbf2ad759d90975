/*
 * realtime — notifications page.
 *
 * Shows what backends publish to the channel "user:<name>" through the HTTP
 * API (POST /api/publish), newest first. Only user <name> may subscribe to
 * that channel, so we authenticate with the same name.
 *
 * Unread tracking: everything up to `lastReadOffset` has been seen. It starts
 * at the channel's offset when we first subscribe (the initial history is not
 * "new"), and moves to the newest offset on "mark all read" or page focus, so
 * the unread count is simply the number of notifications above it. That also
 * makes notifications recovered after a reconnect count as unread.
 *
 * Plain ES2020, no modules, no build step. User data only reaches the DOM
 * through textContent.
 */
(function () {
  'use strict';

  const NAME_RE = /^[A-Za-z0-9_.:@-]{1,64}$/; // must form a valid channel name
  const HISTORY_LIMIT = 50;
  const ACK_TIMEOUT_MS = 5000;
  const RETRY_DELAY_MS = 3000;
  const STORAGE_KEY = 'realtime.notifications';
  const CHAT_STORAGE_KEY = 'realtime.chat'; // reuse the chat name as a default
  const BASE_TITLE = 'Notifications — realtime';
  const RETRYABLE = new Set(['timeout', 'disconnected', 'unavailable', 'rate_limited', 'internal']);
  const BADGE_LABELS = {
    connecting: 'Connecting…',
    connected: 'Connected',
    reconnecting: 'Reconnecting…',
    disconnected: 'Disconnected',
  };

  const $ = (id) => document.getElementById(id);
  const el = {
    badge: $('conn-badge'),
    form: $('name-form'),
    nameInput: $('name-input'),
    nameError: $('name-error'),
    connectButton: $('connect-button'),
    stopButton: $('stop-button'),
    unreadCount: $('unread-count'),
    user: $('notif-user'),
    markReadButton: $('mark-read-button'),
    notice: $('notice'),
    empty: $('notif-empty'),
    emptyText: $('notif-empty-text'),
    emptyExample: $('notif-empty-example'),
    list: $('notif-list'),
    toasts: $('toasts'),
  };

  const state = {
    socket: null,
    user: null,
    channel: null,
    gen: 0,               // see chat.js: invalidates stale callbacks
    everConnected: false,
    subscribed: false,
    historyPending: false, // a history (re)load is under way
    epoch: null,
    lastOffset: 0,        // newest offset we are in sync with
    lastReadOffset: 0,    // newest offset the user has seen
    items: new Map(),     // offset -> {offset, user, data, ts}
  };

  // ---------------------------------------------------------------------------
  // Requests (same contract as chat.js: done(error, response) called from the
  // ack itself so state is updated before any event in the same packet batch)

  function request(event, payload, done) {
    const socket = state.socket;
    if (!socket || !socket.connected) {
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

  // ---------------------------------------------------------------------------
  // Connection

  function start(name) {
    stop();
    state.user = name;
    state.channel = `user:${name}`;
    state.epoch = null;
    state.historyPending = false;
    state.lastOffset = 0;
    state.lastReadOffset = 0;
    state.items = new Map();
    hideNotice();
    el.user.textContent = `for ${name}`;
    el.connectButton.textContent = 'Switch';
    el.stopButton.hidden = false;
    render();

    const socket = io({ auth: { user: name }, forceNew: true });
    state.socket = socket;
    state.everConnected = false;
    setBadge('connecting');
    const mine = (fn) => (...args) => { if (socket === state.socket) fn(...args); };

    socket.on('connect', mine(() => {
      setBadge('connected');
      state.everConnected = true;
      syncChannel();
    }));
    socket.on('disconnect', mine(() => {
      state.gen++;
      state.subscribed = false;
      setBadge(socket.active ? 'reconnecting' : 'disconnected');
      render();
    }));
    socket.on('connect_error', mine((err) => {
      if (socket.active) {
        setBadge(state.everConnected ? 'reconnecting' : 'connecting');
      } else {
        setBadge('disconnected');
        showError(`Connection refused: ${err && err.message ? err.message : 'unknown error'}`);
      }
    }));
    socket.io.on('reconnect_attempt', mine(() => setBadge('reconnecting')));
    socket.on('message', mine(onMessage));
  }

  function stop() {
    const socket = state.socket;
    if (!socket) return;
    state.socket = null; // handlers check this and go quiet
    state.subscribed = false;
    state.gen++;
    socket.disconnect();
  }

  // ---------------------------------------------------------------------------
  // Channel synchronisation (same scheme as the chat page)

  function syncChannel() {
    const gen = ++state.gen;
    const resuming = state.epoch !== null;
    const payload = resuming
      ? { channel: state.channel, since: { epoch: state.epoch, offset: state.lastOffset } }
      : { channel: state.channel };

    request('subscribe', payload, (err, sub) => {
      if (gen !== state.gen) return;
      if (err) {
        showError(`Could not subscribe to your notifications: ${err.message}`);
        if (RETRYABLE.has(err.code)) retryLater(gen, syncChannel);
        return;
      }
      state.subscribed = true;
      const offset = toOffset(sub.offset) || 0;
      if (resuming && sub.recovered === true && sub.epoch === state.epoch) {
        addItems(sub.publications, false);
        state.lastOffset = Math.max(state.lastOffset, offset);
      } else {
        if (resuming) {
          showNotice('Some notifications may have been missed; reloaded.');
          // Same stream: offsets still compare, keep what was read. New
          // stream: we can't tell what is new, treat the history as read.
          if (sub.epoch !== state.epoch) state.lastReadOffset = offset;
        } else {
          state.lastReadOffset = offset;
        }
        state.items = new Map();
        state.epoch = sub.epoch;
        state.lastOffset = offset;
        state.historyPending = true;
        loadHistory(gen);
      }
      render();
    });
  }

  function loadHistory(gen) {
    request('history', { channel: state.channel, limit: HISTORY_LIMIT }, (err, hist) => {
      if (gen !== state.gen) return;
      if (err) {
        showError(`Could not load your notifications: ${err.message}`);
        if (RETRYABLE.has(err.code)) {
          retryLater(gen, () => loadHistory(gen));
        } else {
          state.historyPending = false;
          render();
        }
        return;
      }
      state.historyPending = false;
      if (hist.epoch !== state.epoch) {
        // Stream reset between subscribe and history: start over from history.
        state.items = new Map();
        state.epoch = hist.epoch;
        state.lastOffset = toOffset(hist.offset) || 0;
        state.lastReadOffset = state.lastOffset;
      }
      addItems(hist.publications, false);
      render();
    });
  }

  function retryLater(gen, fn) {
    setTimeout(() => {
      if (gen === state.gen && state.socket && state.socket.connected) fn();
    }, RETRY_DELAY_MS);
  }

  function onMessage(msg) {
    if (!msg || msg.channel !== state.channel || !state.subscribed) return;
    const offset = toOffset(msg.offset);
    if (offset === null || offset <= state.lastOffset) return; // already have it
    addItems([msg], true);
    render();
  }

  // ---------------------------------------------------------------------------
  // Data

  function toOffset(value) {
    return Number.isInteger(value) && value >= 0 ? value : null;
  }

  function addItems(list, live) {
    if (!Array.isArray(list)) return;
    for (const pub of list) {
      const offset = pub ? toOffset(pub.offset) : null;
      if (offset === null || state.items.has(offset)) continue;
      state.items.set(offset, {
        offset,
        user: typeof pub.user === 'string' ? pub.user : null,
        data: pub.data,
        ts: itemTime(pub, live),
      });
      if (offset > state.lastOffset) state.lastOffset = offset;
    }
  }

  // No server timestamp in publications: use one from the payload if any,
  // else the arrival time for live notifications.
  function itemTime(pub, live) {
    const data = pub.data && typeof pub.data === 'object' ? pub.data : {};
    for (const value of [pub.ts, pub.time, data.ts, data.time]) {
      if (typeof value === 'number' && Number.isFinite(value) && value > 0) {
        return value < 1e11 ? value * 1000 : value; // seconds or milliseconds
      }
      if (typeof value === 'string' && value && !Number.isNaN(Date.parse(value))) {
        return Date.parse(value);
      }
    }
    return live ? Date.now() : null;
  }

  function unreadCount() {
    let n = 0;
    for (const offset of state.items.keys()) if (offset > state.lastReadOffset) n++;
    return n;
  }

  function markAllRead() {
    if (state.lastReadOffset >= state.lastOffset) return;
    state.lastReadOffset = state.lastOffset;
    render();
  }

  // ---------------------------------------------------------------------------
  // Rendering (lists are small: rebuild on every change)

  function render() {
    const items = Array.from(state.items.values()).sort((a, b) => b.offset - a.offset);
    el.list.replaceChildren(...items.map(itemNode));

    const unread = unreadCount();
    el.unreadCount.textContent = String(unread);
    el.unreadCount.classList.toggle('pill-accent', unread > 0);
    el.markReadButton.disabled = unread === 0;
    document.title = unread > 0 ? `(${unread}) ${BASE_TITLE}` : BASE_TITLE;

    el.empty.hidden = items.length > 0;
    if (!state.user) {
      el.emptyText.textContent = 'Enter your name to see your notifications.';
      el.emptyExample.hidden = true;
    } else if (!state.subscribed || state.historyPending) {
      el.emptyText.textContent = 'Loading…';
      el.emptyExample.hidden = true;
    } else {
      el.emptyText.textContent = 'No notifications yet. Backends can send you one with:';
      el.emptyExample.textContent = 'POST /api/publish\n' + JSON.stringify(
        { channel: state.channel, data: { title: 'Hello', body: 'Your report is ready.' } });
      el.emptyExample.hidden = false;
    }
  }

  function itemNode(item) {
    const li = document.createElement('li');
    li.className = 'notif';
    if (item.offset > state.lastReadOffset) li.classList.add('unread');

    const data = item.data;
    const isObject = data !== null && typeof data === 'object' && !Array.isArray(data);
    if (isObject && ('title' in data || 'body' in data)) {
      if (data.title !== undefined && data.title !== null) {
        const title = document.createElement('div');
        title.className = 'notif-title';
        title.textContent = String(data.title);
        li.appendChild(title);
      }
      if (data.body !== undefined && data.body !== null) {
        const body = document.createElement('p');
        body.className = 'notif-body';
        body.textContent = String(data.body);
        li.appendChild(body);
      }
    } else {
      const pre = document.createElement('pre');
      pre.className = 'notif-json';
      pre.textContent = JSON.stringify(data === undefined ? null : data, null, 2);
      li.appendChild(pre);
    }

    const meta = document.createElement('div');
    meta.className = 'notif-meta';
    if (item.ts !== null) {
      const date = new Date(item.ts);
      const time = document.createElement('time');
      time.dateTime = date.toISOString();
      time.textContent = date.toLocaleString([], {
        month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit',
      });
      meta.appendChild(time);
    }
    const source = document.createElement('span');
    source.textContent = item.user === null ? 'via API' : `from ${item.user}`;
    const offset = document.createElement('span');
    offset.textContent = `#${item.offset}`;
    meta.append(source, offset);
    li.appendChild(meta);
    return li;
  }

  // ---------------------------------------------------------------------------
  // UI helpers

  function setBadge(connectionState) {
    el.badge.dataset.state = connectionState;
    el.badge.textContent = BADGE_LABELS[connectionState];
  }

  let noticeTimer = null;
  function showNotice(text) {
    el.notice.textContent = text;
    el.notice.hidden = false;
    clearTimeout(noticeTimer);
    noticeTimer = setTimeout(hideNotice, 10000);
  }

  function hideNotice() {
    clearTimeout(noticeTimer);
    el.notice.hidden = true;
  }

  function showError(text) {
    const toast = document.createElement('div');
    toast.className = 'toast';
    toast.setAttribute('role', 'alert');
    toast.textContent = text;
    toast.title = 'Click to dismiss';
    const remove = () => toast.remove();
    toast.addEventListener('click', remove);
    setTimeout(remove, 6000);
    el.toasts.appendChild(toast);
    while (el.toasts.children.length > 4) el.toasts.firstElementChild.remove();
  }

  function readStoredName() {
    for (const key of [STORAGE_KEY, CHAT_STORAGE_KEY]) {
      try {
        const prefs = JSON.parse(localStorage.getItem(key) || '{}');
        if (prefs && typeof prefs.name === 'string' && prefs.name) return prefs.name;
      } catch (_) { /* storage disabled or corrupt */ }
    }
    return '';
  }

  function storeName(name) {
    try {
      localStorage.setItem(STORAGE_KEY, JSON.stringify({ name }));
    } catch (_) { /* storage disabled: nothing to remember */ }
  }

  // ---------------------------------------------------------------------------
  // Start

  el.form.addEventListener('submit', (event) => {
    event.preventDefault();
    const name = el.nameInput.value.trim();
    let problem = null;
    if (!name) problem = 'Please enter your name.';
    else if (!NAME_RE.test(name)) problem = 'Names use letters, digits and _ . : @ - only (up to 64).';
    el.nameError.textContent = problem || '';
    el.nameError.hidden = problem === null;
    if (problem) return;
    storeName(name);
    if (name === state.user && state.socket) {
      if (!state.socket.active) state.socket.connect(); // closed by the server: retry
      return;
    }
    start(name);
  });

  el.stopButton.addEventListener('click', () => {
    stop();
    state.user = null;
    state.channel = null;
    state.epoch = null;
    state.items = new Map();
    state.lastOffset = 0;
    state.lastReadOffset = 0;
    hideNotice();
    el.user.textContent = '';
    el.connectButton.textContent = 'Show notifications';
    el.stopButton.hidden = true;
    setBadge('disconnected');
    render();
  });

  el.markReadButton.addEventListener('click', markAllRead);
  // Looking at the page counts as reading it.
  window.addEventListener('focus', markAllRead);
  document.addEventListener('visibilitychange', () => {
    if (document.visibilityState === 'visible' && document.hasFocus()) markAllRead();
  });

  el.nameInput.value = readStoredName();
  render();

  if (typeof io !== 'function') {
    showError('The Socket.IO client could not be loaded (/vendor/socket.io.min.js).');
    return;
  }
  if (el.nameInput.value && NAME_RE.test(el.nameInput.value)) {
    el.form.requestSubmit();
  } else {
    el.nameInput.focus();
  }
})();
