/*
 * realtime — chat page.
 *
 * Talks to the server over Socket.IO (namespace "/"). Every client→server
 * event is an acknowledged emit answering one {ok, ...} object. Room "r" is
 * the channel "chat:r". Messages live in a Map keyed by offset so history,
 * live events and recovered publications merge without duplicates and render
 * in offset order.
 *
 * Plain ES2020, no modules, no build step. User text only ever reaches the
 * DOM through textContent.
 */
(function () {
  'use strict';

  const ROOM_RE = /^[A-Za-z0-9_.:@-]{1,195}$/; // channel charset; 200 minus "chat:"
  const MAX_NAME_LENGTH = 64; // longer names make the server fall back to "anon-<sid>"
  const HISTORY_LIMIT = 100;
  const ACK_TIMEOUT_MS = 5000;
  const RETRY_DELAY_MS = 3000;
  const MAX_DATA_BYTES = 64 * 1024;
  const GROUP_WINDOW_MS = 5 * 60 * 1000; // consecutive messages closer than this share a header
  const STICKY_BOTTOM_PX = 80;
  const STORAGE_KEY = 'realtime.chat';
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
    socket: null,
    user: null,          // our user id (= the name we authenticate with)
    room: null,
    channel: null,
    // Bumped on room change, on disconnect and at the start of every sync:
    // callbacks capture it and drop their result when it no longer matches.
    gen: 0,
    everConnected: false, // tells "connecting" from "reconnecting"
    subscribed: false,    // subscribed on the *current* connection
    historyPending: false, // a history (re)load is under way
    epoch: null,          // history stream of the channel (from subscribe/history)
    lastOffset: 0,        // newest offset we are in sync with
    messages: new Map(),  // offset -> {offset, user, data, ts}
    renderedMax: -Infinity,
    lastRendered: null,   // last message in the DOM, for header grouping
    presence: new Map(),  // user -> connection count
  };

  // ---------------------------------------------------------------------------
  // Requests

  /*
   * Emits an acknowledged request and calls done(error, response) directly
   * from the ack. Callbacks rather than promises on purpose: with HTTP
   * long-polling a single response can carry an ack and the events that follow
   * it; a promise continuation would only run after those events, so state
   * they depend on (e.g. `subscribed`, `lastOffset`) must be set in the ack.
   */
  function request(event, payload, done) {
    const socket = state.socket;
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

  // ---------------------------------------------------------------------------
  // Connection

  function connect(user) {
    // forceNew: a new name needs a new handshake (auth is only sent then).
    const socket = io({ auth: { user }, forceNew: true });
    state.socket = socket;
    state.user = user;
    state.everConnected = false;
    setBadge('connecting');

    const mine = (fn) => (...args) => { if (socket === state.socket) fn(...args); };

    socket.on('connect', mine(() => {
      setBadge('connected');
      state.everConnected = true;
      if (state.channel) syncRoom();
    }));

    socket.on('disconnect', mine(() => {
      state.gen++; // in-flight requests belong to the dead connection
      state.subscribed = false;
      // socket.active is false when the server or we closed the socket on
      // purpose; then socket.io will not retry by itself.
      setBadge(socket.active ? 'reconnecting' : 'disconnected');
      renderPresence();
      updateComposer();
    }));

    socket.on('connect_error', mine((err) => {
      if (socket.active) {
        setBadge(state.everConnected ? 'reconnecting' : 'connecting');
      } else {
        // Refused by the server's middleware: no automatic retry.
        setBadge('disconnected');
        showError(`Connection refused: ${err && err.message ? err.message : 'unknown error'}`);
      }
    }));

    socket.io.on('reconnect_attempt', mine(() => setBadge('reconnecting')));

    socket.on('message', mine(onMessage));
    socket.on('join', mine(onJoin));
    socket.on('leave', mine(onLeave));
  }

  function disconnect() {
    const socket = state.socket;
    if (!socket) return;
    state.socket = null; // handlers are bound with mine(): they go quiet now
    socket.disconnect(); // the server drops this connection's subscriptions
    state.subscribed = false;
    state.gen++;
  }

  // ---------------------------------------------------------------------------
  // Room synchronisation

  /*
   * Subscribes to the current channel. The first time (no epoch yet) this is a
   * plain subscribe followed by a history load. After a reconnect we pass
   * `since` so the server can send exactly what we missed; if it can't
   * (recovered: false) we clear and reload the history instead.
   */
  function syncRoom() {
    const gen = ++state.gen;
    const channel = state.channel;
    const resuming = state.epoch !== null;
    const payload = resuming
      ? { channel, since: { epoch: state.epoch, offset: state.lastOffset } }
      : { channel };

    const socket = state.socket;
    request('subscribe', payload, (err, sub) => {
      if (gen !== state.gen) {
        // The user switched rooms while this was in flight: don't stay
        // subscribed to a room we no longer show.
        if (!err && socket === state.socket && socket.connected && channel !== state.channel) {
          request('unsubscribe', { channel }, (unsubErr) => {
            if (unsubErr) showError(`Could not leave ${channel}: ${unsubErr.message}`);
          });
        }
        return;
      }
      if (err) {
        showError(`Could not join #${state.room}: ${err.message}`);
        if (RETRYABLE.has(err.code)) retryLater(gen, syncRoom);
        return;
      }
      state.subscribed = true;
      if (resuming && sub.recovered === true && sub.epoch === state.epoch) {
        addMessages(sub.publications, false);
        state.lastOffset = Math.max(state.lastOffset, toOffset(sub.offset) || 0);
      } else {
        if (resuming) {
          clearMessages();
          showNotice('Some messages may have been missed; reloaded.');
        }
        state.epoch = sub.epoch;
        state.lastOffset = toOffset(sub.offset) || 0;
        state.historyPending = true;
        loadHistory(gen);
      }
      refreshPresence(gen);
      updateComposer();
    });
  }

  function loadHistory(gen) {
    request('history', { channel: state.channel, limit: HISTORY_LIMIT }, (err, hist) => {
      if (gen !== state.gen) return;
      if (err) {
        showError(`Could not load the history of #${state.room}: ${err.message}`);
        if (RETRYABLE.has(err.code)) {
          retryLater(gen, () => loadHistory(gen));
        } else {
          state.historyPending = false;
          updateEmptyState();
        }
        return;
      }
      state.historyPending = false;
      if (hist.epoch !== state.epoch) {
        // The stream was reset between subscribe and history; the history
        // answer is the newer view, so start over from it.
        clearMessages();
        state.epoch = hist.epoch;
        state.lastOffset = toOffset(hist.offset) || 0;
      }
      addMessages(hist.publications, false);
      updateEmptyState();
    });
  }

  function refreshPresence(gen) {
    request('presence', { channel: state.channel }, (err, resp) => {
      if (gen !== state.gen) return;
      if (err) {
        showError(`Could not load who is online: ${err.message}`);
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

  // Retries fn while nothing else (room change, reconnect, new sync) happened.
  function retryLater(gen, fn) {
    setTimeout(() => {
      if (gen === state.gen && state.socket && state.socket.connected) fn();
    }, RETRY_DELAY_MS);
  }

  // ---------------------------------------------------------------------------
  // Server events

  function onMessage(msg) {
    if (!msg || msg.channel !== state.channel || !state.subscribed) return;
    const offset = toOffset(msg.offset);
    if (offset === null || offset <= state.lastOffset) return; // already have it
    addMessages([msg], true);
  }

  // join/leave are idempotent: our own join may arrive too, and the presence
  // answer replaces the whole list anyway.
  function onJoin(ev) {
    if (!ev || ev.channel !== state.channel || typeof ev.user !== 'string') return;
    if (!state.presence.has(ev.user)) state.presence.set(ev.user, 1);
    renderPresence();
  }

  function onLeave(ev) {
    if (!ev || ev.channel !== state.channel || typeof ev.user !== 'string') return;
    state.presence.delete(ev.user);
    renderPresence();
  }

  // ---------------------------------------------------------------------------
  // Messages

  function toOffset(value) {
    return Number.isInteger(value) && value >= 0 ? value : null;
  }

  // Publications carry no server timestamp, so we use one if present (server
  // field or the `ts` our own clients put in data), else the arrival time for
  // live messages, else none.
  function messageTime(pub, live) {
    const data = pub.data && typeof pub.data === 'object' ? pub.data : {};
    for (const candidate of [pub.ts, pub.time, data.ts]) {
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

  function addMessages(list, live) {
    if (!Array.isArray(list)) return;
    const added = [];
    for (const pub of list) {
      const offset = pub ? toOffset(pub.offset) : null;
      if (offset === null || state.messages.has(offset)) continue;
      const message = {
        offset,
        user: typeof pub.user === 'string' ? pub.user : null,
        data: pub.data,
        ts: messageTime(pub, live),
      };
      state.messages.set(offset, message);
      added.push(message);
      if (offset > state.lastOffset) state.lastOffset = offset;
    }
    if (added.length === 0) return;

    const stick = isNearBottom() || added.some((m) => live && m.user === state.user);
    added.sort((a, b) => a.offset - b.offset);
    if (added[0].offset > state.renderedMax) {
      for (const message of added) appendMessage(message);
    } else {
      renderAll(); // something older than what is shown: rebuild in order
    }
    updateEmptyState();
    if (stick) scrollToBottom();
  }

  function clearMessages() {
    state.messages.clear();
    state.renderedMax = -Infinity;
    state.lastRendered = null;
    el.messages.replaceChildren();
    updateEmptyState();
  }

  function renderAll() {
    const sorted = Array.from(state.messages.values()).sort((a, b) => a.offset - b.offset);
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
    const own = message.user !== null && message.user === state.user;
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
    if (!state.channel) {
      el.emptyState.textContent = 'Pick a name and a room to start chatting.';
      el.emptyState.hidden = false;
    } else if (state.messages.size === 0) {
      el.emptyState.textContent = state.subscribed && !state.historyPending
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
    if (!text || !state.subscribed) return;
    // `ts` lets every reader show when the message was written (publications
    // have no server timestamp).
    const data = { text, ts: Date.now() };
    if (new TextEncoder().encode(JSON.stringify(data)).length > MAX_DATA_BYTES) {
      showError('Message is too long (64 KiB at most).');
      return;
    }
    // Clear right away so the next message can be typed; the message itself
    // comes back as a `message` event. On failure the text is put back
    // (unless the user already typed something else).
    el.messageInput.value = '';
    autosizeInput();
    request('publish', { channel: state.channel, data }, (err) => {
      if (err) {
        showError(`Message not sent: ${err.message}`);
        if (!el.messageInput.value) {
          el.messageInput.value = text;
          autosizeInput();
        }
      }
    });
  }

  function updateComposer() {
    const inRoom = state.channel !== null;
    el.messageInput.disabled = !inRoom; // stays usable while reconnecting: keep the draft
    el.sendButton.disabled = !state.subscribed;
    if (!inRoom) el.messageInput.placeholder = 'Join a room to chat';
    else if (!state.subscribed) el.messageInput.placeholder = 'Waiting for the connection…';
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
      if (user === state.user) {
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
    el.presenceEmpty.textContent = state.channel ? 'Nobody here yet.' : 'Join a room to see who is online.';
    // While disconnected the list is last known, not live.
    el.presenceList.classList.toggle('stale', Boolean(state.channel) && !state.subscribed);
  }

  function hue(text) {
    let h = 0;
    for (let i = 0; i < text.length; i++) h = (h * 31 + text.charCodeAt(i)) % 360;
    return h;
  }

  // ---------------------------------------------------------------------------
  // Rooms (UI side)

  function enterRoom(room) {
    state.gen++;
    state.room = room;
    state.channel = `chat:${room}`;
    state.subscribed = false;
    state.historyPending = false;
    state.epoch = null;
    state.lastOffset = 0;
    state.presence = new Map();
    clearMessages();
    hideNotice();
    el.roomTitle.textContent = `#${room}`;
    el.roomMeta.textContent = `as ${state.user}`;
    el.joinButton.textContent = 'Switch';
    el.leaveButton.hidden = false;
    document.title = `#${room} — realtime chat`;
    setRoomInUrl(room);
    renderPresence();
    updateComposer();
  }

  function resetRoom() {
    state.gen++;
    state.room = null;
    state.channel = null;
    state.subscribed = false;
    state.historyPending = false;
    state.epoch = null;
    state.lastOffset = 0;
    state.presence = new Map();
    clearMessages();
    hideNotice();
    el.roomTitle.textContent = 'No room';
    el.roomMeta.textContent = '';
    el.joinButton.textContent = 'Join';
    el.leaveButton.hidden = true;
    document.title = 'Chat — realtime';
    setRoomInUrl(null);
    renderPresence();
    updateComposer();
  }

  function join(name, room) {
    savePrefs({ name, room });
    if (state.socket && state.user !== name) disconnect(); // new identity, new connection

    if (!state.socket) {
      state.user = name;
      enterRoom(room);
      connect(name); // the "connect" handler subscribes
      return;
    }
    if (room !== state.room) {
      if (state.subscribed) {
        const old = state.room;
        request('unsubscribe', { channel: state.channel }, (err) => {
          if (err) showError(`Could not leave #${old}: ${err.message}`);
        });
      }
      enterRoom(room);
      if (state.socket.connected) syncRoom();
    }
    // socket.active is false after the server closed it: joining again retries.
    if (!state.socket.active) {
      setBadge('connecting');
      state.socket.connect();
    }
  }

  function leave() {
    // Disconnecting drops all subscriptions server-side, so no unsubscribe.
    disconnect();
    resetRoom();
    setBadge('disconnected');
  }

  function onJoinSubmit(event) {
    event.preventDefault();
    const name = el.nameInput.value.trim();
    const room = el.roomInput.value.trim();
    let problem = null;
    if (!name) problem = 'Please enter your name.';
    else if (name.length > MAX_NAME_LENGTH) problem = `Names are at most ${MAX_NAME_LENGTH} characters.`;
    else if (!room) problem = 'Please enter a room.';
    else if (!ROOM_RE.test(room)) problem = 'Room names use letters, digits and _ . : @ - only (up to 195).';
    el.joinError.textContent = problem || '';
    el.joinError.hidden = problem === null;
    if (problem) return;
    join(name, room);
    el.messageInput.focus();
  }

  // ---------------------------------------------------------------------------
  // Small UI helpers

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

  function loadPrefs() {
    try {
      const prefs = JSON.parse(localStorage.getItem(STORAGE_KEY) || '{}');
      return prefs && typeof prefs === 'object' ? prefs : {};
    } catch (_) {
      return {}; // storage disabled or corrupt: just start empty
    }
  }

  function savePrefs(prefs) {
    try {
      localStorage.setItem(STORAGE_KEY, JSON.stringify(prefs));
    } catch (_) { /* storage disabled: nothing to remember */ }
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

  const prefs = loadPrefs();
  const urlRoom = new URLSearchParams(window.location.search).get('room');
  el.nameInput.value = typeof prefs.name === 'string' ? prefs.name : '';
  el.roomInput.value = urlRoom || (typeof prefs.room === 'string' ? prefs.room : '');
  renderPresence();
  updateEmptyState();

  if (typeof io !== 'function') {
    showError('The Socket.IO client could not be loaded (/vendor/socket.io.min.js).');
    return;
  }
  // A returning user (or a shared ?room= link) goes straight into the room.
  if (el.nameInput.value && el.roomInput.value) {
    el.joinForm.requestSubmit();
  } else {
    (el.nameInput.value ? el.roomInput : el.nameInput).focus();
  }
})();
