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

  const {
    Connection, ChannelStream, createStatusDisplay, requireSocketIo,
    isValidChannel, loadPrefs, savePrefs, MAX_USER_LENGTH,
  } = window.RealtimeClient;

  const CHANNEL_PREFIX = 'user:';
  const HISTORY_LIMIT = 50;
  const STORAGE_KEY = 'realtime.notifications';
  const CHAT_STORAGE_KEY = 'realtime.chat'; // reuse the chat name as a default
  const BASE_TITLE = 'Notifications — realtime';

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
    lastReadOffset: 0,    // newest offset the user has seen
  };

  const status = createStatusDisplay({ badge: el.badge, notice: el.notice, toasts: el.toasts });

  const connection = new Connection(status);

  // stream.publications holds the notifications: offset -> {offset, user, data, ts}.
  const stream = new ChannelStream(connection, {
    historyLimit: HISTORY_LIMIT,
    dataTimeKeys: ['ts', 'time'],
    texts: {
      subscribeFailed: (message) => `Could not subscribe to your notifications: ${message}`,
      historyFailed: (message) => `Could not load your notifications: ${message}`,
      missed: 'Some notifications may have been missed; reloaded.',
    },
    // History and recovered publications are rendered once their request settles.
    onAdded: (added, live) => { if (live) render(); },
    onRestart: ({ newEpoch, offset }) => {
      // Same stream: offsets still compare, keep what was read. New stream
      // (or the first subscribe): we can't tell what is new, treat the
      // history as read.
      if (newEpoch) state.lastReadOffset = offset;
    },
    onSubscribed: render,
    onHistorySettled: render,
  });

  connection.on('disconnect', render);

  // ---------------------------------------------------------------------------
  // Connection

  function start(name) {
    connection.open(name); // replaces the connection of the previous name
    stream.open(CHANNEL_PREFIX + name); // the "connect" handler subscribes
    state.lastReadOffset = 0;
    status.hideNotice();
    el.user.textContent = `for ${name}`;
    el.connectButton.textContent = 'Switch';
    el.stopButton.hidden = false;
    render();
  }

  function stop() {
    connection.close();
    stream.close();
    state.lastReadOffset = 0;
    status.hideNotice();
    el.user.textContent = '';
    el.connectButton.textContent = 'Show notifications';
    el.stopButton.hidden = true;
    status.setConnectionState('offline');
    render();
  }

  // Names are user ids, so they must also make a valid channel name.
  function isValidName(name) {
    return name.length <= MAX_USER_LENGTH && isValidChannel(CHANNEL_PREFIX + name);
  }

  // ---------------------------------------------------------------------------
  // Unread

  function unreadCount() {
    let n = 0;
    for (const offset of stream.publications.keys()) if (offset > state.lastReadOffset) n++;
    return n;
  }

  function markAllRead() {
    if (state.lastReadOffset >= stream.lastOffset) return;
    state.lastReadOffset = stream.lastOffset;
    render();
  }

  // ---------------------------------------------------------------------------
  // Rendering (lists are small: rebuild on every change)

  function render() {
    const items = Array.from(stream.publications.values()).sort((a, b) => b.offset - a.offset);
    el.list.replaceChildren(...items.map(itemNode));

    const unread = unreadCount();
    el.unreadCount.textContent = String(unread);
    el.unreadCount.classList.toggle('pill-accent', unread > 0);
    el.markReadButton.disabled = unread === 0;
    document.title = unread > 0 ? `(${unread}) ${BASE_TITLE}` : BASE_TITLE;

    el.empty.hidden = items.length > 0;
    if (!connection.user) {
      el.emptyText.textContent = 'Enter your name to see your notifications.';
      el.emptyExample.hidden = true;
    } else if (!stream.subscribed || stream.historyPending) {
      el.emptyText.textContent = 'Loading…';
      el.emptyExample.hidden = true;
    } else {
      el.emptyText.textContent = 'No notifications yet. Backends can send you one with:';
      el.emptyExample.textContent = 'POST /api/publish\n' + JSON.stringify(
        { channel: stream.channel, data: { title: 'Hello', body: 'Your report is ready.' } });
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
  // Stored name

  function readStoredName() {
    for (const key of [STORAGE_KEY, CHAT_STORAGE_KEY]) {
      const prefs = loadPrefs(key);
      if (typeof prefs.name === 'string' && prefs.name) return prefs.name;
    }
    return '';
  }

  // ---------------------------------------------------------------------------
  // Start

  el.form.addEventListener('submit', (event) => {
    event.preventDefault();
    const name = el.nameInput.value.trim();
    let problem = null;
    if (!name) problem = 'Please enter your name.';
    else if (!isValidName(name)) problem = 'Names use letters, digits and _ . : @ - only (up to 64).';
    el.nameError.textContent = problem || '';
    el.nameError.hidden = problem === null;
    if (problem) return;
    savePrefs(STORAGE_KEY, { name });
    if (name === connection.user && connection.socket) {
      if (!connection.active) connection.reconnect(); // closed by the server: retry
      return;
    }
    start(name);
  });

  el.stopButton.addEventListener('click', stop);

  el.markReadButton.addEventListener('click', markAllRead);
  // Looking at the page counts as reading it.
  window.addEventListener('focus', markAllRead);
  document.addEventListener('visibilitychange', () => {
    if (document.visibilityState === 'visible' && document.hasFocus()) markAllRead();
  });

  el.nameInput.value = readStoredName();
  render();

  if (!requireSocketIo(status)) return;
  if (el.nameInput.value && isValidName(el.nameInput.value)) {
    el.form.requestSubmit();
  } else {
    el.nameInput.focus();
  }
})();
