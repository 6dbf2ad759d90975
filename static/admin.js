/*
 * realtime — admin page (read-only).
 *
 * Polls GET /api/stats every POLL_MS (falls back to GET /api/info on a server
 * without it) and shows the cluster: nodes with their connections,
 * subscriptions and uptime, live charts of publications/s, deliveries/s and
 * connections per node, the busiest channels and disconnects by reason.
 *
 * Access: the HTTP API answers loopback clients when no API key is
 * configured, so the page first asks without a key and shows the sign-in form
 * only on 401/403. The key is kept in this tab's sessionStorage (never
 * localStorage, never a cookie) and sent as "Authorization: apikey <KEY>".
 *
 * Rates are counter deltas over time deltas between two polls, per node; a
 * counter that went down means the node restarted, and its new value is what
 * it counted since.
 *
 * Plain ES2020, no modules, no build step, no libraries: the charts are drawn
 * on canvases. Server data only reaches the DOM through textContent.
 */
(function () {
  'use strict';

  const POLL_MS = 2000;
  const CHART_POINTS = 90; // 3 minutes of samples at POLL_MS
  const MAX_CHANNELS = 10;
  const KEY_STORAGE = 'realtime.admin.apiKey';
  const PALETTE = ['#4f5bd5', '#1d9a5f', '#d4443f', '#c98400', '#b15fd5', '#1a8fb8', '#e0663a', '#6a7287'];
  const STATUS_LABELS = {
    connecting: 'Loading…',
    online: 'Live',
    offline: 'Unreachable',
    signedout: 'Signed out',
  };

  const $ = (id) => document.getElementById(id);
  const el = {
    status: $('admin-status'),
    signOut: $('sign-out-button'),
    loginForm: $('login-form'),
    keyInput: $('api-key-input'),
    loginError: $('login-error'),
    dashboard: $('dashboard'),
    notice: $('stats-notice'),
    totalNodes: $('total-nodes'),
    totalConnections: $('total-connections'),
    totalSubscriptions: $('total-subscriptions'),
    totalPublicationsRate: $('total-publications-rate'),
    totalDeliveriesRate: $('total-deliveries-rate'),
    nodesCount: $('nodes-count'),
    nodesBody: document.querySelector('#nodes-table tbody'),
    legend: $('chart-legend'),
    channelsList: $('channels-list'),
    channelsEmpty: $('channels-empty'),
    disconnectsList: $('disconnects-list'),
    disconnectsEmpty: $('disconnects-empty'),
    updatedAt: $('updated-at'),
  };
  const charts = [
    { canvas: $('chart-publications'), metric: 'publicationsRate', rate: true },
    { canvas: $('chart-deliveries'), metric: 'deliveriesRate', rate: true },
    { canvas: $('chart-connections'), metric: 'connections', rate: false },
  ];

  const state = {
    key: readKey(),
    timer: null,
    polling: false,
    hasStats: true,        // false once /api/stats answered 404: use /api/info
    counters: new Map(),   // node -> {publications, deliveries, at, publicationsRate, deliveriesRate}
    samples: [],           // [{at, nodes: Map node -> {publicationsRate, deliveriesRate, connections}}]
    colors: new Map(),     // node -> colour, stable for the page's life
  };

  // ---------------------------------------------------------------------------
  // The API key (this tab only)

  function readKey() {
    try {
      return sessionStorage.getItem(KEY_STORAGE) || null;
    } catch (_) {
      return null;
    }
  }

  function storeKey(key) {
    state.key = key;
    try {
      if (key) sessionStorage.setItem(KEY_STORAGE, key);
      else sessionStorage.removeItem(KEY_STORAGE);
    } catch (_) { /* storage disabled: the key lives in memory only */ }
    el.signOut.hidden = !key;
  }

  // ---------------------------------------------------------------------------
  // Polling

  class HttpError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  async function getJson(path) {
    const headers = { Accept: 'application/json' };
    if (state.key) headers.Authorization = `apikey ${state.key}`;
    const response = await fetch(path, { headers, cache: 'no-store', credentials: 'omit' });
    let body = null;
    try {
      body = await response.json();
    } catch (_) { /* not JSON: the status says enough */ }
    if (!response.ok) {
      const message = body && body.error && body.error.message ? String(body.error.message) : response.statusText;
      throw new HttpError(response.status, message);
    }
    return body;
  }

  // One poll: returns the normalised snapshot {time, nodes, channels, full}.
  async function fetchSnapshot() {
    if (state.hasStats) {
      try {
        return normaliseStats(await getJson('/api/stats'), true);
      } catch (err) {
        if (!(err instanceof HttpError) || err.status !== 404) throw err;
        state.hasStats = false; // an older server: /api/info has the nodes at least
      }
    }
    return normaliseStats(await getJson('/api/info'), false);
  }

  async function poll() {
    clearTimeout(state.timer);
    if (state.polling) return;
    state.polling = true;
    let next = true;
    try {
      const snapshot = await fetchSnapshot();
      showDashboard();
      render(snapshot);
      setStatus('online');
    } catch (err) {
      if (err instanceof HttpError && (err.status === 401 || err.status === 403)) {
        next = false;
        askForKey(err);
      } else {
        setStatus('offline');
        el.updatedAt.textContent = `Could not reach the API (${err.message || err}); retrying…`;
      }
    } finally {
      state.polling = false;
    }
    if (next) state.timer = setTimeout(poll, POLL_MS);
  }

  function askForKey(err) {
    const hadKey = Boolean(state.key);
    storeKey(null);
    setStatus('signedout');
    el.dashboard.hidden = true;
    el.loginForm.hidden = false;
    let problem = null;
    if (err.status === 401 && hadKey) problem = 'That API key was refused.';
    else if (err.status === 403) problem = `${err.message}.`;
    el.loginError.textContent = problem || '';
    el.loginError.hidden = problem === null;
    el.keyInput.focus();
  }

  function showDashboard() {
    el.loginForm.hidden = true;
    el.dashboard.hidden = false;
  }

  function setStatus(name) {
    el.status.dataset.state = name;
    el.status.textContent = STATUS_LABELS[name];
  }

  // ---------------------------------------------------------------------------
  // Data

  function num(value) {
    return typeof value === 'number' && Number.isFinite(value) ? value : null;
  }

  // Both answers in one shape; `full` is false for /api/info (no counters,
  // transports, channels or disconnects there).
  function normaliseStats(body, full) {
    const nodes = [];
    for (const raw of body && Array.isArray(body.nodes) ? body.nodes : []) {
      if (!raw || typeof raw !== 'object') continue;
      const id = typeof raw.node === 'string' ? raw.node : raw.node_id;
      if (typeof id !== 'string') continue;
      const transports = raw.transports && typeof raw.transports === 'object' ? raw.transports : {};
      nodes.push({
        node: id,
        uptime: num(raw.uptime) ?? num(raw.uptime_s),
        connections: num(raw.connections) ?? 0,
        websocket: num(transports.websocket),
        polling: num(transports.polling),
        subscriptions: num(raw.subscriptions) ?? 0,
        channels: num(raw.channels),
        publications: num(raw.publications),
        deliveries: num(raw.deliveries),
        disconnects: raw.disconnects && typeof raw.disconnects === 'object' ? raw.disconnects : {},
        updated: num(raw.updated),
      });
    }
    nodes.sort((a, b) => a.node.localeCompare(b.node, undefined, { numeric: true }));
    const channels = [];
    for (const raw of body && Array.isArray(body.channels) ? body.channels : []) {
      if (raw && typeof raw.channel === 'string') {
        channels.push({ channel: raw.channel, subscribers: num(raw.subscribers) ?? 0 });
      }
    }
    channels.sort((a, b) => b.subscribers - a.subscribers || a.channel.localeCompare(b.channel));
    const time = num(body && body.time) ?? Date.now() / 1000;
    return { time, nodes, channels, full };
  }

  // Per node: rate = counter delta / time delta since the previous poll. The
  // time is the node's own `updated` (when its counters were read) if it
  // sends one; unchanged counters with an unchanged time keep the last rate.
  function updateRates(snapshot) {
    const seen = new Set();
    for (const node of snapshot.nodes) {
      seen.add(node.node);
      const at = node.updated ?? snapshot.time;
      const prev = state.counters.get(node.node);
      const current = {
        publications: node.publications, deliveries: node.deliveries, at,
        publicationsRate: null, deliveriesRate: null,
      };
      if (prev && node.publications !== null) {
        current.publicationsRate = rate(prev.publications, node.publications, prev.at, at, prev.publicationsRate);
        current.deliveriesRate = rate(prev.deliveries, node.deliveries, prev.at, at, prev.deliveriesRate);
      }
      node.publicationsRate = current.publicationsRate;
      node.deliveriesRate = current.deliveriesRate;
      state.counters.set(node.node, current);
    }
    for (const id of Array.from(state.counters.keys())) if (!seen.has(id)) state.counters.delete(id);
  }

  function rate(before, after, t0, t1, lastRate) {
    if (before === null || after === null) return null;
    const dt = t1 - t0;
    if (dt <= 0) return lastRate; // no newer reading of this node's counters
    const delta = after >= before ? after - before : after; // went down: restarted, counted since
    return delta / dt;
  }

  function colorOf(node) {
    if (!state.colors.has(node)) state.colors.set(node, PALETTE[state.colors.size % PALETTE.length]);
    return state.colors.get(node);
  }

  // ---------------------------------------------------------------------------
  // Rendering

  function render(snapshot) {
    updateRates(snapshot);
    const sample = { at: snapshot.time, nodes: new Map() };
    for (const node of snapshot.nodes) {
      sample.nodes.set(node.node, {
        publicationsRate: node.publicationsRate,
        deliveriesRate: node.deliveriesRate,
        connections: node.connections,
      });
    }
    state.samples.push(sample);
    if (state.samples.length > CHART_POINTS) state.samples.shift();

    renderTotals(snapshot);
    renderNodes(snapshot.nodes);
    renderLegend(snapshot.nodes);
    renderCharts();
    renderBars(el.channelsList, el.channelsEmpty,
      snapshot.channels.slice(0, MAX_CHANNELS).map((c) => [c.channel, c.subscribers]), 'subscribers');
    renderBars(el.disconnectsList, el.disconnectsEmpty, disconnectsByReason(snapshot.nodes), 'disconnects');

    el.notice.hidden = snapshot.full;
    el.notice.textContent = snapshot.full ? '' :
      'This server has no /api/stats: showing nodes from /api/info only (no rates, channels or disconnects).';
    el.updatedAt.textContent = `Updated ${new Date(snapshot.time * 1000).toLocaleTimeString()} · every ${POLL_MS / 1000} s`;
  }

  function renderTotals(snapshot) {
    const sum = (key) => snapshot.nodes.reduce((total, node) => total + (node[key] || 0), 0);
    const hasRates = snapshot.nodes.some((node) => node.publicationsRate !== null);
    el.totalNodes.textContent = String(snapshot.nodes.length);
    el.totalConnections.textContent = formatCount(sum('connections'));
    el.totalSubscriptions.textContent = formatCount(sum('subscriptions'));
    el.totalPublicationsRate.textContent = hasRates ? formatRate(sum('publicationsRate')) : '–';
    el.totalDeliveriesRate.textContent = hasRates ? formatRate(sum('deliveriesRate')) : '–';
  }

  function renderNodes(nodes) {
    el.nodesCount.textContent = String(nodes.length);
    el.nodesBody.replaceChildren(...nodes.map((node) => {
      const tr = document.createElement('tr');
      tr.dataset.node = node.node;
      const name = document.createElement('th');
      name.scope = 'row';
      const dot = document.createElement('span');
      dot.className = 'dot';
      dot.style.background = colorOf(node.node);
      name.append(dot, document.createTextNode(node.node));
      tr.appendChild(name);
      const transports = node.websocket === null && node.polling === null
        ? '–' : `${formatCount(node.websocket || 0)} / ${formatCount(node.polling || 0)}`;
      for (const [text, label] of [
        [formatCount(node.connections), 'connections'],
        [transports, 'transports'],
        [formatCount(node.subscriptions), 'subscriptions'],
        [node.channels === null ? '–' : formatCount(node.channels), 'channels'],
        [node.uptime === null ? '–' : formatUptime(node.uptime), 'uptime'],
      ]) {
        const td = document.createElement('td');
        td.className = 'num';
        td.dataset.label = label;
        td.textContent = text;
        tr.appendChild(td);
      }
      return tr;
    }));
  }

  function renderLegend(nodes) {
    el.legend.replaceChildren(...nodes.map((node) => {
      const li = document.createElement('li');
      const dot = document.createElement('span');
      dot.className = 'dot';
      dot.style.background = colorOf(node.node);
      li.append(dot, document.createTextNode(node.node));
      return li;
    }));
  }

  function disconnectsByReason(nodes) {
    const totals = new Map();
    for (const node of nodes) {
      for (const [reason, count] of Object.entries(node.disconnects)) {
        const n = num(count);
        if (n) totals.set(reason, (totals.get(reason) || 0) + n);
      }
    }
    return Array.from(totals.entries()).sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0]));
  }

  // A list of [label, value] as horizontal bars relative to the largest value.
  function renderBars(list, empty, rows, unit) {
    const max = rows.reduce((m, row) => Math.max(m, row[1]), 0) || 1;
    list.replaceChildren(...rows.map(([label, value]) => {
      const li = document.createElement('li');
      li.className = 'bar-row';
      li.title = `${label}: ${value} ${unit}`;
      const name = document.createElement('span');
      name.className = 'bar-label';
      name.textContent = label;
      const count = document.createElement('span');
      count.className = 'bar-value';
      count.textContent = formatCount(value);
      const bar = document.createElement('span');
      bar.className = 'bar';
      bar.style.width = `${Math.max(2, (value / max) * 100)}%`;
      li.append(name, count, bar);
      return li;
    }));
    empty.hidden = rows.length > 0;
  }

  function renderCharts() {
    for (const chart of charts) drawChart(chart);
  }

  // A line per node over the last CHART_POINTS samples; x is time, y starts at 0.
  function drawChart({ canvas, metric, rate: isRate }) {
    const width = canvas.clientWidth;
    const height = canvas.clientHeight;
    if (!width || !height) return; // hidden
    const ratio = window.devicePixelRatio || 1;
    if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
      canvas.width = Math.round(width * ratio);
      canvas.height = Math.round(height * ratio);
    }
    const ctx = canvas.getContext('2d');
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);

    const style = getComputedStyle(document.documentElement);
    const muted = style.getPropertyValue('--muted').trim() || '#6a7287';
    const grid = style.getPropertyValue('--border').trim() || '#e2e5ee';
    const pad = { left: 44, right: 8, top: 8, bottom: 18 };
    const plotW = width - pad.left - pad.right;
    const plotH = height - pad.top - pad.bottom;

    const samples = state.samples;
    let max = 0;
    for (const sample of samples) {
      for (const values of sample.nodes.values()) {
        const v = values[metric];
        if (v !== null && v > max) max = v;
      }
    }
    const top = niceCeiling(isRate ? max : Math.max(max, 4));
    const span = POLL_MS / 1000 * (CHART_POINTS - 1);
    const newest = samples.length ? samples[samples.length - 1].at : 0;
    const x = (at) => pad.left + plotW * (1 - Math.min(span, newest - at) / span);
    const y = (v) => pad.top + plotH * (1 - v / top);

    ctx.font = '11px system-ui, sans-serif';
    ctx.fillStyle = muted;
    ctx.strokeStyle = grid;
    ctx.lineWidth = 1;
    ctx.textBaseline = 'middle';
    ctx.textAlign = 'right';
    for (let i = 0; i <= 4; i++) {
      const v = (top / 4) * i;
      const gy = Math.round(y(v)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(pad.left, gy);
      ctx.lineTo(width - pad.right, gy);
      ctx.stroke();
      ctx.fillText(formatTick(v), pad.left - 6, gy);
    }
    ctx.textBaseline = 'alphabetic';
    ctx.textAlign = 'left';
    ctx.fillText(`−${Math.round(span / 60)} min`, pad.left, height - 4);
    ctx.textAlign = 'right';
    ctx.fillText('now', width - pad.right, height - 4);

    if (samples.length === 0) return;
    const nodes = new Set();
    for (const sample of samples) for (const id of sample.nodes.keys()) nodes.add(id);
    ctx.lineWidth = 2;
    ctx.lineJoin = 'round';
    for (const id of nodes) {
      ctx.strokeStyle = colorOf(id);
      ctx.beginPath();
      let drawing = false;
      for (const sample of samples) {
        const values = sample.nodes.get(id);
        const v = values ? values[metric] : null;
        if (v === null || v === undefined) {
          drawing = false; // a gap: node absent or no rate yet
          continue;
        }
        if (drawing) ctx.lineTo(x(sample.at), y(v));
        else ctx.moveTo(x(sample.at), y(v));
        drawing = true;
      }
      ctx.stroke();
    }
  }

  // The smallest of 1, 2, 4, 6, 8 × 10^n at or above `value` (at least 1):
  // its quarters, the grid lines, are round numbers.
  function niceCeiling(value) {
    if (!(value > 1)) return 1;
    const magnitude = 10 ** Math.floor(Math.log10(value));
    for (const step of [1, 2, 4, 6, 8, 10]) if (step * magnitude >= value) return step * magnitude;
    return 10 * magnitude;
  }

  // Grid-line labels: quarters of a nice ceiling, so at most two decimals.
  function formatTick(v) {
    return Number.isInteger(v) ? v.toLocaleString() : String(Number(v.toFixed(2)));
  }

  function formatCount(n) {
    return Math.round(n).toLocaleString();
  }

  function formatRate(r) {
    if (r >= 100) return Math.round(r).toLocaleString();
    if (r >= 10) return r.toFixed(1);
    return r.toFixed(r === 0 ? 0 : 2);
  }

  function formatUptime(seconds) {
    const s = Math.floor(seconds);
    const d = Math.floor(s / 86400);
    const h = Math.floor((s % 86400) / 3600);
    const m = Math.floor((s % 3600) / 60);
    if (d > 0) return `${d}d ${h}h`;
    if (h > 0) return `${h}h ${String(m).padStart(2, '0')}m`;
    if (m > 0) return `${m}m ${String(s % 60).padStart(2, '0')}s`;
    return `${s}s`;
  }

  // ---------------------------------------------------------------------------
  // Start

  el.loginForm.addEventListener('submit', (event) => {
    event.preventDefault();
    const key = el.keyInput.value.trim();
    if (!key) {
      el.loginError.textContent = 'Please enter the API key.';
      el.loginError.hidden = false;
      return;
    }
    el.keyInput.value = '';
    storeKey(key);
    setStatus('connecting');
    poll();
  });

  el.signOut.addEventListener('click', () => {
    storeKey(null);
    state.samples = [];
    state.counters.clear();
    poll(); // without a key: works where the API answers loopback clients, else asks
  });

  let resizeFrame = 0;
  window.addEventListener('resize', () => {
    cancelAnimationFrame(resizeFrame);
    resizeFrame = requestAnimationFrame(renderCharts);
  });

  el.signOut.hidden = !state.key;
  setStatus('connecting');
  poll();
})();
