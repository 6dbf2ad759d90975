/*
 * realtime — chat page.
 *
 * Room "r" is the channel "chat:r". The connection, the acknowledged
 * requests and keeping the room's messages in sync across reconnects live in
 * realtime-client.js (window.RealtimeClient); this file renders the room:
 * messages in offset order, who is online, the composer.
 *
 * Plain ES2020, no modules, no build step. User text only ever reaches the
 * DOM through textContent.
 */
(function () {
  'use strict';

  const {
    Connection, ChannelStream, createStatusDisplay, requireSocketIo,
    isValidChannel, loadPrefs, savePrefs, MAX_USER_LENGTH,
  } = window.RealtimeClient;

  const CHANNEL_PREFIX = 'chat:';
  const HISTORY_LIMIT = 100;
  const MAX_DATA_BYTES = 64 * 1024;
  const GROUP_WINDOW_MS = 5 * 60 * 1000; // consecutive messages closer than this share a header
  const STICKY_BOTTOM_PX = 80;
  const STORAGE_KEY = 'realtime.chat';

  const $ = (id) => document.getElementById(id);
  const el = {
    badge: $('conn-badge'),
    joinForm: $('join-form'),
    nameInput: $('name-input'),
    roomInput: $('room-input'),
    joinError: $('join-error'),
    joinButton: $('join-button'),
    leaveButton: $('leave-button'),
    presenceCount: $('presence-count'),
    presenceList: $('presence-list'),
    presenceEmpty: $('presence-empty'),
    roomTitle: $('room-title'),
    roomMeta: $('room-meta'),
    notice: $('notice'),
    scroller: $('messages-scroller'),
    emptyState: $('empty-state'),
    messages: $('messages'),
    composer: $('composer'),
    messageInput: $('message-input'),
    sendButton: $('send-button'),
    toasts: $('toasts'),
  };

  const state = {
    room: null,
    renderedMax: -Infinity,
    lastRendered: null,   // last message in the DOM, for header grouping
    presence: new Map(),  // user -> connection count
  };

  const status = createStatusDisplay({ badge: el.badge, notice: el.notice, toasts: el.toasts });

  const connection = new Connection(status);

  // stream.publications holds the room's messages: offset -> {offset, user, data, ts}.
  const stream = new ChannelStream(connection, {
    historyLimit: HISTORY_LIMIT,
    dataTimeKeys: ['ts'], // our own clients put `ts` in data
    texts: {
      subscribeFailed: (message) => `Could not join #${state.room}: ${message}`,
      historyFailed: (message) => `Could not load the history of #${state.room}: ${message}`,
      missed: 'Some messages may have been missed; reloaded.',
    },
    onAdded: renderAdded,
    onRestart: clearRenderedMessages,
    onSubscribed: (isCurrent) => {
      refreshPresence(isCurrent);
      updateComposer();
    },
    onHistorySettled: updateEmptyState,
  });

  connection.on('disconnect', () => {
    renderPresence();
    updateComposer();
  });
  connection.on('join', onJoin);
  connection.on('leave', onLeave);

  // ---------------------------------------------------------------------------
  // Presence requests and events

  function refreshPresence(isCurrent) {
    connection.request('presence', { channel: stream.channel }, (err, resp) => {
      if (!isCurrent()) return;
      if (err) {
        status.showError(`Could not load who is online: ${err.message}`);
        return;
      }
      state.presence = new Map();
      for (const member of Array.isArray(resp.members) ? resp.members : []) {
        if (member && typeof member.user === 'string') {
          state.presence.set(member.user, Math.max(1, Number(member.connections) || 1));
        }
      }
      renderPresence();
    });
  }

  // join/leave are idempotent: our own join may arrive too, and the presence
  // answer replaces the whole list anyway.
  function onJoin(ev) {
    if (!ev || ev.channel !== stream.channel || typeof ev.user !== 'string') return;
    if (!state.presence.has(ev.user)) state.presence.set(ev.user, 1);
    renderPresence();
  }

  function onLeave(ev) {
    if (!ev || ev.channel !== stream.channel || typeof ev.user !== 'string') return;
    state.presence.delete(ev.user);
    renderPresence();
  }

  // ---------------------------------------------------------------------------
  // Messages

  // New messages usually come after the rendered ones and are appended; the
  // list is only rebuilt when something older arrives.
  function renderAdded(added, live) {
    const stick = isNearBottom() || added.some((m) => live && m.user === connection.user);
    if (added[0].offset > state.renderedMax) {
      for (const message of added) appendMessage(message);
    } else {
      renderAll(); // something older than what is shown: rebuild in order
    }
    updateEmptyState();
    if (stick) scrollToBottom();
  }

  function clearRenderedMessages() {
    state.renderedMax = -Infinity;
    state.lastRendered = null;
    el.messages.replaceChildren();
    updateEmptyState();
  }

  function renderAll() {
    const sorted = Array.from(stream.publications.values()).sort((a, b) => a.offset - b.offset);
    el.messages.replaceChildren();
    state.renderedMax = -Infinity;
    state.lastRendered = null;
    for (const message of sorted) appendMessage(message);
    updateEmptyState();
    scrollToBottom();
  }

  function appendMessage(message) {
    const prev = state.lastRendered;
    const continued = prev !== null && prev.user === message.user &&
      (prev.ts === null || message.ts === null || message.ts - prev.ts < GROUP_WINDOW_MS);
    el.messages.appendChild(messageNode(message, continued));
    state.lastRendered = message;
    state.renderedMax = message.offset;
  }

  function messageNode(message, continued) {
    const own = message.user !== null && message.user === connection.user;
    const li = document.createElement('li');
    li.className = 'msg';
    if (own) li.classList.add('msg-own');
    if (message.user === null) li.classList.add('msg-server');
    if (continued) li.classList.add('msg-continued');
    li.dataset.offset = String(message.offset);

    if (!continued) {
      const meta = document.createElement('div');
      meta.className = 'msg-meta';
      const who = document.createElement('span');
      who.className = 'msg-user';
      who.textContent = message.user === null ? 'server' : (own ? `${message.user} (you)` : message.user);
      meta.appendChild(who);
      if (message.ts !== null) meta.appendChild(timeNode(message.ts));
      li.appendChild(meta);
    }

    const bubble = document.createElement('div');
    bubble.className = 'msg-bubble';
    const data = message.data;
    if (data && typeof data === 'object' && typeof data.text === 'string') {
      bubble.textContent = data.text;
    } else if (typeof data === 'string') {
      bubble.textContent = data;
    } else {
      // Not a chat message (e.g. published through the HTTP API): show raw JSON.
      bubble.classList.add('msg-json');
      bubble.textContent = JSON.stringify(data === undefined ? null : data, null, 2);
    }
    if (continued && message.ts !== null) bubble.title = new Date(message.ts).toLocaleString();
    li.appendChild(bubble);
    return li;
  }

  function timeNode(ts) {
    const date = new Date(ts);
    const node = document.createElement('time');
    node.className = 'msg-time';
    node.dateTime = date.toISOString();
    node.title = date.toLocaleString();
    const sameDay = date.toDateString() === new Date().toDateString();
    node.textContent = sameDay
      ? date.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' })
      : date.toLocaleString([], { month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit' });
    return node;
  }

  function isNearBottom() {
    const s = el.scroller;
    return s.scrollHeight - s.scrollTop - s.clientHeight < STICKY_BOTTOM_PX;
  }

  function scrollToBottom() {
    el.scroller.scrollTop = el.scroller.scrollHeight;
  }

  function updateEmptyState() {
    if (!stream.channel) {
      el.emptyState.textContent = 'Pick a name and a room to start chatting.';
      el.emptyState.hidden = false;
    } else if (stream.publications.size === 0) {
      el.emptyState.textContent = stream.subscribed && !stream.historyPending
        ? 'No messages yet. Say hello!'
        : 'Loading…';
      el.emptyState.hidden = false;
    } else {
      el.emptyState.hidden = true;
    }
  }

  // ---------------------------------------------------------------------------
  // Sending

  function sendMessage() {
    const text = el.messageInput.value.trim();
    if (!text || !stream.subscribed) return;
    // `ts` lets every reader show when the message was written (publications
    // have no server timestamp).
    const data = { text, ts: Date.now() };
    if (new TextEncoder().encode(JSON.stringify(data)).length > MAX_DATA_BYTES) {
      status.showError('Message is too long (64 KiB at most).');
      return;
    }
    // Clear right away so the next message can be typed; the message itself
    // comes back as a `message` event. On failure the text is put back
    // (unless the user already typed something else).
    el.messageInput.value = '';
    autosizeInput();
    connection.request('publish', { channel: stream.channel, data }, (err) => {
      if (err) {
        status.showError(`Message not sent: ${err.message}`);
        if (!el.messageInput.value) {
          el.messageInput.value = text;
          autosizeInput();
        }
      }
    });
  }

  function updateComposer() {
    const inRoom = stream.channel !== null;
    el.messageInput.disabled = !inRoom; // stays usable while reconnecting: keep the draft
    el.sendButton.disabled = !stream.subscribed;
    if (!inRoom) el.messageInput.placeholder = 'Join a room to chat';
    else if (!stream.subscribed) el.messageInput.placeholder = 'Waiting for the connection…';
    else el.messageInput.placeholder = `Message #${state.room}`;
    updateEmptyState();
  }

  function autosizeInput() {
    const input = el.messageInput;
    input.style.height = 'auto';
    input.style.height = `${Math.min(input.scrollHeight, 160)}px`;
  }

  // ---------------------------------------------------------------------------
  // Presence

  function renderPresence() {
    const members = Array.from(state.presence.entries()).sort((a, b) => a[0].localeCompare(b[0]));
    el.presenceList.replaceChildren();
    for (const [user, connections] of members) {
      const li = document.createElement('li');
      li.className = 'member';
      const avatar = document.createElement('span');
      avatar.className = 'avatar';
      avatar.textContent = (Array.from(user)[0] || '?').toUpperCase();
      avatar.style.setProperty('--hue', String(hue(user)));
      const name = document.createElement('span');
      name.className = 'member-name';
      name.textContent = user;
      li.append(avatar, name);
      if (user === connection.user) {
        const you = document.createElement('span');
        you.className = 'member-tag';
        you.textContent = 'you';
        li.appendChild(you);
      }
      if (connections > 1) {
        const count = document.createElement('span');
        count.className = 'member-connections';
        count.title = `${connections} connections`;
        count.textContent = `×${connections}`;
        li.appendChild(count);
      }
      el.presenceList.appendChild(li);
    }
    el.presenceCount.textContent = String(members.length);
    el.presenceEmpty.hidden = members.length > 0;
    el.presenceEmpty.textContent = stream.channel ? 'Nobody here yet.' : 'Join a room to see who is online.';
    // While disconnected the list is last known, not live.
    el.presenceList.classList.toggle('stale', Boolean(stream.channel) && !stream.subscribed);
  }

  function hue(text) {
    let h = 0;
    for (let i = 0; i < text.length; i++) h = (h * 31 + text.charCodeAt(i)) % 360;
    return h;
  }

  // ---------------------------------------------------------------------------
  // Rooms (UI side)

  // Shows `room` (null: none) from scratch; the caller subscribes.
  function setRoom(room) {
    state.room = room;
    document.body.classList.toggle('in-room', Boolean(room)); // compacts the form on phones
    if (room) stream.open(CHANNEL_PREFIX + room);
    else stream.close();
    state.presence = new Map();
    clearRenderedMessages();
    status.hideNotice();
    el.roomTitle.textContent = room ? `#${room}` : 'No room';
    el.roomMeta.textContent = room ? `as ${connection.user}` : '';
    el.joinButton.textContent = room ? 'Switch' : 'Join';
    el.leaveButton.hidden = !room;
    document.title = room ? `#${room} — realtime chat` : 'Chat — realtime';
    setRoomInUrl(room);
    renderPresence();
    updateComposer();
  }

  function join(name, room) {
    savePrefs(STORAGE_KEY, { name, room });
    if (connection.socket && connection.user !== name) connection.close(); // new identity, new connection

    if (!connection.socket) {
      connection.open(name); // the "connect" handler subscribes
      setRoom(room);
      return;
    }
    if (room !== state.room) {
      if (stream.subscribed) {
        const old = state.room;
        connection.request('unsubscribe', { channel: stream.channel }, (err) => {
          if (err) status.showError(`Could not leave #${old}: ${err.message}`);
        });
      }
      setRoom(room);
      if (connection.connected) stream.sync();
    }
    // Inactive after the server closed the socket: joining again retries.
    if (!connection.active) {
      status.setConnectionState('connecting');
      connection.reconnect();
    }
  }

  function leave() {
    // Disconnecting drops all subscriptions server-side, so no unsubscribe.
    // An anonymous connection takes its place: the badge keeps telling
    // whether the server is reachable. The name is kept, the room forgotten:
    // a reload after leaving does not join again.
    savePrefs(STORAGE_KEY, { name: connection.user || el.nameInput.value.trim() });
    connection.open(null);
    setRoom(null);
  }

  function onJoinSubmit(event) {
    event.preventDefault();
    const name = el.nameInput.value.trim();
    const room = el.roomInput.value.trim();
    let problem = null;
    if (!name) problem = 'Please enter your name.';
    else if (name.length > MAX_USER_LENGTH) problem = `Names are at most ${MAX_USER_LENGTH} characters.`;
    else if (!room) problem = 'Please enter a room.';
    else if (!isValidChannel(CHANNEL_PREFIX + room)) {
      problem = 'Room names use letters, digits and _ . : @ - only (up to 195).';
    }
    el.joinError.textContent = problem || '';
    el.joinError.hidden = problem === null;
    if (problem) return;
    join(name, room);
    el.messageInput.focus();
  }

  // Keeps ?room= in the address bar so the page can be reloaded or shared.
  function setRoomInUrl(room) {
    const url = new URL(window.location.href);
    if (room) url.searchParams.set('room', room);
    else url.searchParams.delete('room');
    window.history.replaceState(null, '', url);
  }

  // ---------------------------------------------------------------------------
  // Start

  el.joinForm.addEventListener('submit', onJoinSubmit);
  el.leaveButton.addEventListener('click', leave);
  el.composer.addEventListener('submit', (event) => {
    event.preventDefault();
    sendMessage();
  });
  el.messageInput.addEventListener('keydown', (event) => {
    // Enter sends, Shift+Enter adds a line; leave IME composition alone.
    if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      sendMessage();
    }
  });
  el.messageInput.addEventListener('input', autosizeInput);

  const prefs = loadPrefs(STORAGE_KEY);
  const urlRoom = new URLSearchParams(window.location.search).get('room');
  el.nameInput.value = typeof prefs.name === 'string' ? prefs.name : '';
  el.roomInput.value = urlRoom || (typeof prefs.room === 'string' ? prefs.room : '');
  renderPresence();
  updateEmptyState();

  if (!requireSocketIo(status)) {
    status.setConnectionState('offline');
    return;
  }
  // The page connects as soon as it opens, so the badge (which starts at
  // "Connecting…" in the HTML) tells the truth from the first second. A
  // returning user (or a shared ?room= link) goes straight into the room;
  // otherwise an anonymous connection waits until a name is given (join()
  // then opens one under that name).
  if (el.nameInput.value && el.roomInput.value) {
    el.joinForm.requestSubmit();
  } else {
    connection.open(null);
    (el.nameInput.value ? el.roomInput : el.nameInput).focus();
  }
})();
