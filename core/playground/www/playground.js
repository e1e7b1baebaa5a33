// The playground page: calls the engine (wasm_bindgen.validate_json,
// simulate_json, compare_json) and draws what it answers. Plain JS, no
// dependencies; works from file:// because the wasm bytes come inlined
// (SLUICE_PLAYGROUND_WASM, base64, written by the build).
'use strict';

const EXAMPLE_CONFIG = `{
  "rules": [
    {
      "name": "per-client",
      "key": ["client_ip"],
      "limit": {"count": 10, "per": "10s"},
      "algorithm": "token_bucket"
    },
    {
      "name": "login",
      "match": {"path": {"prefix": "/login"}},
      "key": ["client_ip"],
      "limit": {"count": 3, "per": "1m"},
      "algorithm": "fixed_window"
    }
  ]
}`;

const EXAMPLE_TRAFFIC = {
  kind: 'generated',
  duration: '60s',
  clients: [
    { client: '10.0.0.1', method: 'GET', path: '/api', shape: { type: 'steady', rate: 2 } },
    { client: '10.0.0.2', method: 'GET', path: '/api', shape: { type: 'bursts', size: 15, every: '20s' } },
    { client: '10.0.0.3', method: 'POST', path: '/login', shape: { type: 'ramp', from: 0, to: 1 } },
  ],
  list: '0 10.0.0.1 GET /api\n0.5 10.0.0.1 GET /api\n1 10.0.0.2 POST /login\n',
};

const $ = (id) => document.getElementById(id);
const SVG = 'http://www.w3.org/2000/svg';
const CLASSES = ['allowed', 'delayed', 'limited'];

function el(tag, attrs = {}, ...children) {
  const node = tag.startsWith('svg:') ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value !== undefined && value !== null) node.setAttribute(name, value);
  }
  for (const child of children) node.append(child);
  return node;
}

// --- Traffic controls --------------------------------------------------------

function shapeFields(shape) {
  switch (shape.type) {
    case 'steady': return [shape.rate, ''];
    case 'bursts': return [shape.size, shape.every];
    default: return [shape.from, shape.to];
  }
}

function addClient(client) {
  const [first, second] = shapeFields(client.shape);
  const shape = el('select', { class: 'shape' },
    el('option', { value: 'steady' }, 'steady'), el('option', { value: 'bursts' }, 'bursts'), el('option', { value: 'ramp' }, 'ramp'));
  shape.value = client.shape.type;
  const remove = el('button', { type: 'button' }, '×');
  const row = el('tr', {},
    el('td', {}, el('input', { class: 'client', value: client.client })),
    el('td', {}, el('input', { class: 'method', value: client.method || 'GET', size: 5 })),
    el('td', {}, el('input', { class: 'path', value: client.path || '/' })),
    el('td', {}, shape),
    el('td', {}, el('input', { class: 'first', value: first })),
    el('td', {}, el('input', { class: 'second', value: second })),
    el('td', {}, remove));
  remove.addEventListener('click', () => row.remove());
  $('clients').tBodies[0].append(row);
}

function readClients() {
  return [...$('clients').tBodies[0].rows].map((row) => {
    const value = (cls) => row.querySelector('.' + cls).value.trim();
    const type = value('shape');
    const first = value('first');
    const second = value('second');
    const shape = type === 'steady' ? { type, rate: Number(first) }
      : type === 'bursts' ? { type, size: Math.max(0, Math.floor(Number(first))), every: second }
      : { type, from: Number(first), to: Number(second) };
    return { client: value('client'), method: value('method'), path: value('path'), shape };
  });
}

function readTraffic() {
  if ($('traffic-kind').value === 'list') return { kind: 'list', text: $('list').value };
  return { kind: 'generated', duration: $('duration').value.trim(), clients: readClients() };
}

function showTraffic(traffic) {
  $('traffic-kind').value = traffic.kind;
  if (traffic.kind === 'list') {
    $('list').value = traffic.text;
  } else {
    $('duration').value = traffic.duration;
    $('clients').tBodies[0].replaceChildren();
    traffic.clients.forEach(addClient);
    if (traffic.list) $('list').value = traffic.list;
  }
  showKind();
}

function showKind() {
  const list = $('traffic-kind').value === 'list';
  $('list-pane').hidden = !list;
  $('generated').hidden = list;
}

// --- Validation --------------------------------------------------------------

function showProblems(checked) {
  const list = $('problems');
  list.replaceChildren();
  list.className = checked.ok ? 'ok' : '';
  list.dataset.count = checked.ok ? 0 : checked.problems.length;
  if (checked.ok) {
    list.append(el('li', {}, `valid: ${checked.rules} rule${checked.rules === 1 ? '' : 's'}`));
    return;
  }
  for (const p of checked.problems) {
    const where = p.line ? ` (line ${p.line}, column ${p.column})` : '';
    const item = el('li', { 'data-path': p.path, 'data-line': p.line ?? '' },
      el('span', { class: 'path' }, p.path), `: ${p.message}${where}`);
    if (p.line) item.addEventListener('click', () => selectLine(p.line, p.column));
    list.append(item);
  }
}

function selectLine(line, column) {
  const area = $('config');
  const lines = area.value.split('\n');
  let offset = 0;
  for (let i = 0; i < line - 1 && i < lines.length; i++) offset += lines[i].length + 1;
  offset += Math.max(0, column - 1);
  area.focus();
  area.setSelectionRange(offset, offset + 1);
}

function validate() {
  const checked = JSON.parse(wasm_bindgen.validate_json($('config').value));
  showProblems(checked);
  return checked.ok;
}

// --- Results -----------------------------------------------------------------

function countsCells(counts) {
  return CLASSES.map((c) => el('td', { class: 'n' }, String(counts[c])));
}

function showSummary(report) {
  const totals = el('table', {
    id: 'totals', 'data-total': report.total, 'data-allowed': report.totals.allowed,
    'data-delayed': report.totals.delayed, 'data-limited': report.totals.limited, 'data-denied': report.denied,
  },
  el('thead', {}, el('tr', {}, el('th', {}, 'rule'), el('th', {}, 'algorithm'), el('th', {}, 'allowed'), el('th', {}, 'delayed'), el('th', {}, 'limited'), el('th', {}, 'note'))));
  const body = el('tbody');
  body.append(el('tr', { class: 'all' }, el('td', {}, el('b', {}, `all ${report.total} requests`)), el('td'), ...countsCells(report.totals),
    el('td', {}, report.denied ? `${report.denied} denied by the access list` : '')));
  for (const rule of report.rules) {
    const extra = [rule.note, rule.shadow_limited ? `${rule.shadow_limited} over its limit (shadow)` : '',
      rule.degraded ? `${rule.degraded} degraded` : ''].filter(Boolean).join('; ');
    body.append(el('tr', { 'data-rule': rule.name, 'data-allowed': rule.allowed - rule.delayed, 'data-delayed': rule.delayed, 'data-limited': rule.limited },
      el('td', {}, rule.name), el('td', {}, rule.algorithm),
      ...countsCells({ allowed: rule.allowed - rule.delayed, delayed: rule.delayed, limited: rule.limited }), el('td', {}, extra)));
  }
  totals.append(body);
  $('summary').replaceChildren(totals);
}

// A stacked bar per slice, and the remaining budget as a line when given.
function plot(title, slices, sliceMs, capacity, attrs) {
  const width = 560;
  const height = 90;
  const top = 6;
  const bottom = 14;
  const most = Math.max(1, ...slices.map((s) => s.allowed + s.delayed + s.limited));
  const barWidth = width / slices.length;
  const svg = el('svg:svg', { width, height, viewBox: `0 0 ${width} ${height}`, role: 'img', 'aria-label': title });
  const scale = (n) => (n / most) * (height - top - bottom);
  slices.forEach((s, i) => {
    let y = height - bottom;
    for (const c of CLASSES) {
      if (!s[c]) continue;
      const h = scale(s[c]);
      y -= h;
      svg.append(el('svg:rect', { class: c, x: i * barWidth + 0.5, y, width: Math.max(1, barWidth - 1), height: h },
        el('svg:title', {}, `${(i * sliceMs / 1000).toFixed(2)}s: ${s[c]} ${c}`)));
    }
  });
  if (capacity) {
    const points = [];
    slices.forEach((s, i) => {
      if (s.remaining !== null && s.remaining !== undefined) {
        const y = height - bottom - (Math.min(s.remaining, capacity) / capacity) * (height - top - bottom);
        points.push(`${(i + 0.5) * barWidth},${y}`);
      }
    });
    if (points.length) svg.append(el('svg:polyline', { class: 'budget', points: points.join(' ') }));
  }
  svg.append(el('svg:line', { class: 'axis', x1: 0, y1: height - bottom, x2: width, y2: height - bottom }));
  const end = ((slices.length * sliceMs) / 1000).toFixed(1);
  svg.append(el('svg:text', { x: 0, y: height - 2 }, '0s'), el('svg:text', { x: width - 40, y: height - 2 }, `${end}s`),
    el('svg:text', { x: 2, y: top + 8 }, `${most}/slice`));
  const totals = slices.reduce((t, s) => { CLASSES.forEach((c) => { t[c] += s[c]; }); return t; }, { allowed: 0, delayed: 0, limited: 0 });
  return el('div', {
    class: 'plot', ...attrs, 'data-allowed': totals.allowed, 'data-delayed': totals.delayed, 'data-limited': totals.limited,
  }, el('div', { class: 'title' }, title), svg);
}

function showPlots(report) {
  const plots = [plot('all requests', report.slices, report.slice_ms, 0, { 'data-plot': 'all' })];
  for (const lane of report.lanes) {
    const key = lane.key === null ? '(other keys)' : lane.key;
    plots.push(plot(`rule ${lane.rule}, key ${key} — capacity ${lane.capacity}`,
      lane.slices, report.slice_ms, lane.capacity, { 'data-plot': 'lane', 'data-rule': lane.rule, 'data-key': key }));
  }
  $('plots').replaceChildren(...plots);
}

function showRequests(report) {
  const body = $('requests').tBodies[0];
  body.replaceChildren();
  report.requests.forEach((r) => {
    const got = r.class === 'delayed' ? `delayed ${r.held_ms}ms` : r.status === 200 ? 'allowed' : `${r.status} limited`;
    const row = el('tr', { class: r.class, 'data-number': r.number },
      el('td', { class: 'n' }, String(r.number)), el('td', { class: 'n' }, `${(r.at_ms / 1000).toFixed(3)}s`),
      el('td', {}, r.client), el('td', {}, r.request), el('td', {}, got), el('td', {}, r.limited_by || ''));
    row.addEventListener('click', () => selectRequest(r, row));
    body.append(row);
  });
  if (report.total > report.requests.length) {
    body.append(el('tr', {}, el('td', { colspan: 6 }, `… the first ${report.requests.length} of ${report.total} requests are listed`)));
  }
  const first = report.requests.find((r) => r.status !== 200) || report.requests[0];
  if (first) selectRequest(first, body.querySelector(`tr[data-number="${first.number}"]`));
}

function selectRequest(r, row) {
  for (const selected of $('requests').querySelectorAll('tr.selected')) selected.classList.remove('selected');
  if (row) row.classList.add('selected');
  const status = { 200: '200 OK', 403: '403 Forbidden', 429: '429 Too Many Requests' }[r.status];
  const lines = [`#${r.number} ${r.request} from ${r.client} at ${(r.at_ms / 1000).toFixed(3)}s`, '', `HTTP/1.1 ${status}`];
  for (const [name, value] of r.headers) lines.push(`${name}: ${value}`);
  if (!r.headers.length) lines.push('(no rate-limit headers on this response)');
  lines.push('');
  for (const part of r.rules) {
    lines.push(`rule ${part.rule} key ${part.key}: ${part.allowed ? 'allows' : 'refuses'}, ${part.remaining} of ${part.limit} left`);
  }
  $('headers').textContent = lines.join('\n');
  $('headers').dataset.number = r.number;
}

function showError(error) {
  if (error.error === 'config') showProblems({ ok: false, problems: error.problems });
  $('run-status').textContent = error.error === 'config' ? 'the configuration has errors' : `traffic: ${error.message}`;
  $('run-status').dataset.state = 'error';
}

function run() {
  validate();
  const started = performance.now();
  const report = JSON.parse(wasm_bindgen.simulate_json($('config').value, JSON.stringify(readTraffic())));
  if (report.error) return showError(report);
  const ms = performance.now() - started;
  $('run-status').textContent = `${report.total} requests simulated in ${ms.toFixed(0)} ms`;
  $('run-status').dataset.state = 'done';
  showSummary(report);
  showPlots(report);
  showRequests(report);
  $('results').hidden = false;
}

function compare() {
  validate();
  const runs = JSON.parse(wasm_bindgen.compare_json($('config').value, JSON.stringify(readTraffic())));
  if (runs.error) return showError(runs);
  const cards = runs.map(({ algorithm, result }) => {
    if (result.Err) {
      const why = result.Err.error === 'config' ? result.Err.problems.map((p) => `${p.path}: ${p.message}`).join('; ') : result.Err.message;
      return el('div', { 'data-algorithm': algorithm }, el('h3', {}, algorithm), el('p', { class: 'error' }, why));
    }
    const r = result.Ok;
    return el('div', { 'data-algorithm': algorithm, 'data-allowed': r.totals.allowed, 'data-delayed': r.totals.delayed, 'data-limited': r.totals.limited },
      el('h3', {}, algorithm),
      plot(`${r.totals.allowed} allowed · ${r.totals.delayed} delayed · ${r.totals.limited} limited`, r.slices, r.slice_ms, 0, {}));
  });
  $('compared').replaceChildren(...cards);
  $('comparison').hidden = false;
}

// --- Sharing: the scenario in the URL's fragment -----------------------------

function encode(scenario) {
  const bytes = new TextEncoder().encode(JSON.stringify(scenario));
  let text = '';
  bytes.forEach((b) => { text += String.fromCharCode(b); });
  return btoa(text).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
}

function decode(fragment) {
  const text = atob(fragment.replace(/-/g, '+').replace(/_/g, '/'));
  return JSON.parse(new TextDecoder().decode(Uint8Array.from(text, (c) => c.charCodeAt(0))));
}

function share() {
  const scenario = { config: $('config').value, traffic: readTraffic() };
  history.replaceState(null, '', '#s=' + encode(scenario));
  $('run-status').textContent = 'the URL now holds this scenario';
  if (navigator.clipboard) navigator.clipboard.writeText(location.href).catch(() => {});
}

function restore() {
  const match = /^#s=(.+)$/.exec(location.hash);
  if (!match) return false;
  try {
    const scenario = decode(match[1]);
    $('config').value = scenario.config;
    showTraffic(scenario.traffic);
    return true;
  } catch (e) {
    $('run-status').textContent = `the URL's scenario cannot be read: ${e.message}`;
    return false;
  }
}

// --- Start -------------------------------------------------------------------

async function start() {
  $('config').value = EXAMPLE_CONFIG;
  showTraffic(EXAMPLE_TRAFFIC);
  const restored = restore();
  $('traffic-kind').addEventListener('change', showKind);
  $('add-client').addEventListener('click', () => addClient({ client: '10.0.0.9', shape: { type: 'steady', rate: 1 } }));
  try {
    const bytes = Uint8Array.from(atob(SLUICE_PLAYGROUND_WASM), (c) => c.charCodeAt(0));
    await wasm_bindgen({ module_or_path: bytes });
  } catch (e) {
    $('status').textContent = `The engine did not load: ${e.message}`;
    $('status').dataset.state = 'error';
    return;
  }
  let timer;
  $('config').addEventListener('input', () => { clearTimeout(timer); timer = setTimeout(validate, 250); });
  $('run').addEventListener('click', run);
  $('compare').addEventListener('click', compare);
  $('share').addEventListener('click', share);
  validate();
  if (restored) run();
  $('status').textContent = 'Engine loaded: sluice-core, compiled to WebAssembly.';
  $('status').dataset.state = 'ready';
}

start();
