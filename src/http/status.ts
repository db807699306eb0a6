// The live status page for operators: every node's traffic, mesh links and health, the latency
// matrix as a heat map, and the last 15 minutes as small charts. One self-contained HTML document
// (inline style and script under a nonce-based Content-Security-Policy, no external asset) that
// renders /api/v2/status and follows /api/v2/status/events (polling /api/v2/status when the event
// stream is unavailable). Every string from the database reaches the DOM as text, never as markup.
import { randomBytes } from 'node:crypto';

import type { ClusterStatus } from '../cluster-status.js';
import type { RouteHandler } from './server.js';

/** JSON for an inline data block: nothing in it can close the <script> element. */
const inlineJson = (value: unknown) =>
  JSON.stringify(value)
    .replace(/</g, '\\u003c')
    .replace(/>/g, '\\u003e')
    .replace(/&/g, '\\u0026')
    .replace(/\u2028/g, '\\u2028')
    .replace(/\u2029/g, '\\u2029');

export function statusPage(status: ClusterStatus): RouteHandler {
  return (req, res) => {
    if ((req.url ?? '').split('?')[0] !== '/status') return false;
    const nonce = randomBytes(16).toString('base64');
    const csp = [
      "default-src 'none'",
      `script-src 'nonce-${nonce}'`,
      `style-src 'nonce-${nonce}'`,
      "connect-src 'self'",
      "img-src 'self' data:",
      "base-uri 'none'",
      "form-action 'none'",
      "frame-ancestors 'none'",
    ].join('; ');
    res
      .writeHead(200, {
        'Content-Type': 'text/html; charset=utf-8',
        'Cache-Control': 'no-store',
        'Content-Security-Policy': csp,
        'X-Content-Type-Options': 'nosniff',
        'Referrer-Policy': 'no-referrer',
      })
      .end(page(nonce, inlineJson(status.document())));
    return true;
  };
}

const FAVICON =
  "data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 16 16'%3E%3Ccircle cx='8' cy='8' r='6' fill='%233b82f6'/%3E%3C/svg%3E";

function page(nonce: string, initial: string): string {
  return `<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>derpmesh cluster status</title>
<link rel="icon" href="${FAVICON}">
<style nonce="${nonce}">${STYLE}</style>
</head><body>
<header><div class="brand">derpmesh</div><div id="summary" class="summary"></div><div id="conn" class="conn"></div></header>
<main>
<noscript><p class="note">This page draws itself with JavaScript; the same data is at <a href="/api/v2/status">/api/v2/status</a>.</p></noscript>
<section id="problems" class="problems"></section>
<section><h2>Nodes</h2><div id="nodes" class="nodes"></div></section>
<section><h2>Round trips</h2><p class="note" id="matrix-note"></p><div id="matrix"></div></section>
</main>
<footer class="note">JSON: <a href="/api/v2/status">/api/v2/status</a> · live stream: <a href="/api/v2/status/events">/api/v2/status/events</a> · <a href="/metrics">/metrics</a></footer>
<script type="application/json" id="initial-status">${initial}</script>
<script nonce="${nonce}">${SCRIPT}</script>
</body></html>
`;
}

const STYLE = `
:root{--bg:#f5f6f8;--card:#fff;--ink:#1f2430;--muted:#6b7280;--line:#e3e6eb;--ok:#1f9d55;--warn:#d97706;--err:#dc2626;--in:#3b82f6;--out:#8b5cf6;--drop:#dc2626}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--ink);font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
header{display:flex;align-items:center;gap:1.2em;padding:.8em 1.5em;background:#1f2430;color:#e5e7eb}
.brand{font-weight:700;font-size:1.15em;letter-spacing:.02em}
.summary{flex:1;display:flex;gap:.8em;align-items:center;flex-wrap:wrap}
.conn{font-size:.85em;color:#9ca3af}
.conn .dot{margin-right:.35em}
main{padding:1em 1.5em;max-width:1500px}
h2{font-size:1em;font-weight:600;margin:1.2em 0 .6em;color:#374151}
.note{color:var(--muted);font-size:.85em;margin:.2em 0 .6em}
footer{padding:0 1.5em 1.5em}
a{color:#2563eb}
.pill{display:inline-block;padding:.05em .6em;border-radius:999px;font-size:.8em;font-weight:600;border:1px solid transparent}
.pill.ok,.pill.live{background:#e7f6ee;color:var(--ok);border-color:#bfe6cf}
.pill.warning{background:#fef3e2;color:var(--warn);border-color:#f8d9a8}
.pill.error,.pill.stale{background:#fde8e8;color:var(--err);border-color:#f6c1c1}
.pill.stopped{background:#eef0f3;color:var(--muted);border-color:#dde1e6}
.dot{display:inline-block;width:.6em;height:.6em;border-radius:50%;background:var(--muted);vertical-align:baseline}
.dot.ok,.dot.up{background:var(--ok)}.dot.warning{background:var(--warn)}.dot.error,.dot.down{background:var(--err)}
.problems ul{margin:.4em 0;padding-left:1.2em}
.problems .box{background:#fff;border:1px solid var(--line);border-left:4px solid var(--err);border-radius:6px;padding:.5em 1em;margin-top:1em}
.problems .box.warn{border-left-color:var(--warn)}
.nodes{display:grid;grid-template-columns:repeat(auto-fill,minmax(400px,1fr));gap:1em}
.node{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:.9em 1em;box-shadow:0 1px 2px rgba(0,0,0,.04)}
.node.stale{border-color:#f6c1c1;background:#fffafa}
.node.stopped{opacity:.65}
.node-head{display:flex;align-items:baseline;gap:.6em;flex-wrap:wrap}
.node-head .name{font-weight:700;font-size:1.05em}
.node-head .meta{color:var(--muted);font-size:.82em}
.stats{display:grid;grid-template-columns:.9fr 1.2fr 1.2fr .9fr;gap:.4em;margin:.7em 0}
.stat{background:#f8f9fb;border-radius:6px;padding:.35em .5em}
.stat .label{color:var(--muted);font-size:.72em;text-transform:uppercase;letter-spacing:.04em}
.stat .value{font-weight:600;font-variant-numeric:tabular-nums}
.stat .value .line{display:block}
.stat .sub{color:var(--muted);font-size:.75em;font-variant-numeric:tabular-nums}
.charts{display:grid;grid-template-columns:1fr 1fr;gap:.5em;margin:.4em 0}
.chart .title{font-size:.72em;color:var(--muted);display:flex;justify-content:space-between;gap:.5em;white-space:nowrap;overflow:hidden}
.chart .title .v{font-variant-numeric:tabular-nums;text-overflow:ellipsis;overflow:hidden}
.chart svg{display:block;width:100%;height:48px;background:#fbfbfd;border:1px solid #eef0f3;border-radius:4px}
.legend{font-size:.72em;color:var(--muted)}
.legend .sw.in{background:var(--in)}.legend .sw.out{background:var(--out)}
.legend .sw{display:inline-block;width:.8em;height:.25em;vertical-align:middle;margin:0 .25em 0 .6em}
.sub-h{font-size:.75em;text-transform:uppercase;letter-spacing:.04em;color:var(--muted);margin:.7em 0 .25em}
table.links,table.sections{width:100%;border-collapse:collapse;font-size:.85em}
table.links td,table.sections td{padding:.15em .3em;border-top:1px solid #f0f1f4;vertical-align:top}
table.links td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.sections td.code{white-space:nowrap;font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:.85em}
td.msg{color:#4b5563;word-break:break-word}
table.links td:first-child,table.sections td:first-child{white-space:nowrap}
table.heat{border-collapse:separate;border-spacing:3px;font-variant-numeric:tabular-nums}
table.heat th{font-weight:600;font-size:.85em;padding:.3em .6em;color:#374151;text-align:center}
table.heat th.row{text-align:right}
table.heat td{min-width:5.5em;text-align:center;padding:.45em .6em;border-radius:4px;background:#eef0f3;color:#1f2430}
table.heat td.self{background:transparent;color:var(--muted)}
table.heat td.na{color:var(--muted)}
table.heat td.over{outline:2px solid var(--err);font-weight:700}
.scale{display:flex;align-items:center;gap:.5em;font-size:.8em;color:var(--muted);margin-top:.6em}
.scale .bar{display:flex;height:10px;width:240px;border-radius:3px;overflow:hidden}
.scale .bar span{flex:1}
`;

// Runs in the browser. Builds the DOM with text nodes only (h(), svg()); never innerHTML.
const SCRIPT = `
'use strict';
(function () {
  var doc = null;
  var lastUpdate = 0;
  var mode = 'connecting';
  function h(tag, attrs) {
    var el = document.createElement(tag);
    if (attrs) for (var k in attrs) { if (attrs[k] !== undefined && attrs[k] !== null) el.setAttribute(k, String(attrs[k])); }
    for (var i = 2; i < arguments.length; i++) add(el, arguments[i]);
    return el;
  }
  function add(el, c) {
    if (c === null || c === undefined || c === false) return;
    if (Array.isArray(c)) { c.forEach(function (x) { add(el, x); }); return; }
    el.appendChild(typeof c === 'object' ? c : document.createTextNode(String(c)));
  }
  var SVGNS = 'http://www.w3.org/2000/svg';
  function svg(tag, attrs) {
    var el = document.createElementNS(SVGNS, tag);
    for (var k in attrs) el.setAttribute(k, String(attrs[k]));
    return el;
  }
  function num(x, digits) {
    if (x === null || x === undefined || !isFinite(x)) return '–';
    var a = Math.abs(x);
    if (a >= 1e9) return (x / 1e9).toFixed(1) + 'G';
    if (a >= 1e6) return (x / 1e6).toFixed(1) + 'M';
    if (a >= 1e4) return (x / 1e3).toFixed(1) + 'k';
    if (a >= 10 || Number.isInteger(x)) return String(Math.round(x));
    return x.toFixed(digits === undefined ? 1 : digits);
  }
  function bytes(x) {
    if (x === null || x === undefined || !isFinite(x)) return '–';
    var units = ['B', 'kB', 'MB', 'GB', 'TB'];
    var i = 0;
    while (Math.abs(x) >= 1000 && i < units.length - 1) { x /= 1000; i++; }
    return (i === 0 ? Math.round(x) : x.toFixed(1)) + ' ' + units[i];
  }
  function ms(x) { return x === null || x === undefined ? '–' : (x < 10 ? x.toFixed(2) : x.toFixed(1)) + ' ms'; }
  function ago(msAgo) {
    if (msAgo < 1500) return 'just now';
    if (msAgo < 90000) return Math.round(msAgo / 1000) + ' s ago';
    return Math.round(msAgo / 60000) + ' min ago';
  }
  function severityLabel(s) { return s === 'ok' ? 'healthy' : s === 'warning' ? 'degraded' : 'unhealthy'; }

  // From the oldest point (at least a minute) up to the whole history kept.
  function chartSpan(t, d) {
    var full = d.historySeconds * 1000;
    if (!t.length) return full;
    return Math.min(full, Math.max(60000, Date.parse(d.generatedAt) - t[0] + d.pointSeconds * 1000));
  }
  function chart(title, series, fmt, d) {
    var W = 300, H = 48, now = Date.parse(d.generatedAt), span = chartSpan(series[0].t, d);
    var max = 0;
    series.forEach(function (s) { s.values.forEach(function (v) { if (v > max) max = v; }); });
    var top = max > 0 ? max * 1.15 : 1;
    var el = svg('svg', { viewBox: '0 0 ' + W + ' ' + H, preserveAspectRatio: 'none', role: 'img', 'aria-label': title });
    [0.5].forEach(function (f) { el.appendChild(svg('line', { x1: 0, x2: W, y1: H * f, y2: H * f, stroke: '#eef0f3', 'stroke-width': 1 })); });
    series.forEach(function (s) {
      var pts = [];
      for (var i = 0; i < s.t.length; i++) {
        var x = W - ((now - s.t[i]) / span) * W;
        if (x < 0) continue;
        pts.push(x.toFixed(1) + ',' + (H - 2 - (s.values[i] / top) * (H - 4)).toFixed(1));
      }
      if (pts.length === 1) pts.push((W).toFixed(1) + ',' + pts[0].split(',')[1]);
      if (pts.length > 0) el.appendChild(svg('polyline', { points: pts.join(' '), fill: 'none', stroke: s.color, 'stroke-width': 1.5, 'vector-effect': 'non-scaling-stroke', 'stroke-linejoin': 'round' }));
    });
    var last = series.map(function (s) { return s.values.length ? fmt(s.values[s.values.length - 1]) : '–'; }).join(' / ');
    return h('div', { class: 'chart', 'data-chart': title },
      h('div', { class: 'title' }, h('span', { class: 't' }, title), h('span', { class: 'v' }, last + ' · max ' + fmt(max))),
      el);
  }

  function stat(label, value, sub, field) {
    return h('div', { class: 'stat' }, h('div', { class: 'label' }, label), h('div', { class: 'value', 'data-field': field }, Array.isArray(value) ? value.map(function (v) { return h('span', { class: 'line' }, v); }) : value), sub ? h('div', { class: 'sub' }, sub) : null);
  }

  function nodeCard(n, d) {
    var t = n.traffic, r = n.rates;
    var head = h('div', { class: 'node-head' },
      h('span', { class: 'name' }, n.hostname),
      h('span', { class: 'pill ' + n.state, 'data-field': 'state' }, n.state === 'live' ? severityLabel(n.severity) : n.state === 'stale' ? 'down · stale' : 'stopped'),
      n.self ? h('span', { class: 'pill stopped' }, 'this node') : null,
      h('span', { class: 'meta' }, 'v' + n.version + ' · region ' + n.region + ' · ' + (n.relayUrl || 'no relay URL') + ' · heartbeat ' + ago(n.heartbeatAgeMs)));
    var card = h('div', { class: 'node ' + n.state, 'data-node': n.hostname, 'data-state': n.state, 'data-severity': n.severity }, head);
    var dropsBy = t ? Object.keys(t.drops).filter(function (k) { return t.drops[k] > 0; }).map(function (k) { return k + ' ' + num(t.drops[k]); }).join(', ') : '';
    card.appendChild(h('div', { class: 'stats' },
      stat('clients', t ? num(t.clients) : '–', t ? num(t.connections) + ' conns, ' + num(t.meshConnections) + ' from peers' : null, 'clients'),
      stat('packets/s', r ? [num(r.packetsIn) + ' in', num(r.packetsOut) + ' out'] : '–', t ? num(t.totals.packetsIn) + ' · ' + num(t.totals.packetsOut) + ' total' : null, 'packets'),
      stat('bytes/s', r ? [bytes(r.bytesIn) + ' in', bytes(r.bytesOut) + ' out'] : '–', t ? bytes(t.totals.bytesIn) + ' · ' + bytes(t.totals.bytesOut) + ' total' : null, 'bytes'),
      stat('drops/s', r ? num(r.drops) : '–', t ? num(t.totals.drops) + ' total' + (dropsBy ? ' (' + dropsBy + ')' : '') : null, 'drops')));
    if (t) {
      card.querySelector('[data-field=packets]').setAttribute('data-in', String(t.totals.packetsIn));
      card.querySelector('[data-field=packets]').setAttribute('data-out', String(t.totals.packetsOut));
    }
    var hs = n.history;
    var minutes = Math.round(chartSpan(hs.t, d) / 60000);
    card.appendChild(h('div', { class: 'legend' }, 'last ' + minutes + ' min', h('span', { class: 'sw in' }), 'in', h('span', { class: 'sw out' }), 'out'));
    card.appendChild(h('div', { class: 'charts' },
      chart('packets/s', [{ t: hs.t, values: hs.packetsIn, color: '#3b82f6' }, { t: hs.t, values: hs.packetsOut, color: '#8b5cf6' }], num, d),
      chart('bytes/s', [{ t: hs.t, values: hs.bytesIn, color: '#3b82f6' }, { t: hs.t, values: hs.bytesOut, color: '#8b5cf6' }], bytes, d),
      chart('clients', [{ t: hs.t, values: hs.clients, color: '#1f9d55' }], num, d),
      chart('drops/s', [{ t: hs.t, values: hs.drops, color: '#dc2626' }], num, d)));
    if (n.meshLinks.length) {
      card.appendChild(h('div', { class: 'sub-h' }, 'mesh links'));
      card.appendChild(h('table', { class: 'links' }, n.meshLinks.map(function (l) {
        return h('tr', { 'data-link': l.peer || l.url, 'data-up': l.up ? '1' : '0' },
          h('td', null, h('span', { class: 'dot ' + (l.up ? 'up' : 'down') }), ' ', l.peer || l.url),
          h('td', null, l.up ? 'up' : l.state),
          h('td', { class: 'num' }, l.rttMs !== undefined ? ms(l.rttMs) : ''),
          h('td', { class: 'num', title: 'keys reachable through this link: clients of that relay, and the other relays meshed into it' }, num(l.forwarders) + ' keys there'),
          h('td', { class: 'msg' }, l.lastError || ''));
      })));
    }
    if (n.sections) {
      card.appendChild(h('div', { class: 'sub-h' }, 'health'));
      var order = ['database', 'relay', 'mesh', 'pubsub'];
      var keys = Object.keys(n.sections).sort(function (a, b) { return (order.indexOf(a) + 1 || 99) - (order.indexOf(b) + 1 || 99); });
      card.appendChild(h('table', { class: 'sections' }, keys.map(function (k) {
        var s = n.sections[k];
        return h('tr', null, h('td', null, h('span', { class: 'dot ' + s.severity }), ' ', k), h('td', { class: 'code' }, s.code), h('td', { class: 'msg' }, s.message));
      })));
    } else if (n.state !== 'stopped') {
      card.appendChild(h('p', { class: 'note' }, 'no health report stored yet'));
    }
    if (n.state === 'stale') card.appendChild(h('p', { class: 'note' }, 'No heartbeat for ' + (n.heartbeatAgeMs / 1000).toFixed(1) + ' s: the node is down or cut off from Postgres. The figures above are its last report.'));
    return card;
  }

  function heatColor(v, threshold) {
    var ratio = Math.min(v / threshold, 1);
    var hue = 140 - 140 * ratio;
    return v > threshold ? 'hsl(0, 75%, 80%)' : 'hsl(' + hue.toFixed(0) + ', 60%, ' + (88 - 8 * ratio).toFixed(0) + '%)';
  }

  function matrix(d) {
    var byId = {};
    d.nodes.forEach(function (n) { byId[n.id] = n; });
    var ids = d.latency.ids;
    var thr = d.thresholdMs;
    function cell(v, self) {
      if (self) return h('td', { class: 'self' }, '—');
      if (v === undefined || v === null) return h('td', { class: 'na', title: 'not measured' }, '?');
      var td = h('td', { class: v > thr ? 'over' : '', title: v > thr ? 'over the ' + thr + ' ms threshold' : '' }, (v > thr ? '▲ ' : '') + ms(v));
      td.style.backgroundColor = heatColor(v, thr);
      return td;
    }
    var head = h('tr', null, h('th', null, 'from ↓ to →'), ids.map(function (id) { return h('th', null, byId[id].hostname); }), h('th', null, 'Postgres'));
    var rows = d.latency.rows.map(function (row) {
      return h('tr', null, h('th', { class: 'row' }, byId[row.from].hostname),
        ids.map(function (id) { return cell(row.to[id], id === row.from); }), cell(row.databaseMs, false));
    });
    var scale = h('div', { class: 'bar' });
    for (var i = 0; i <= 10; i++) { var s = h('span'); s.style.backgroundColor = heatColor((thr * i) / 10, thr); scale.appendChild(s); }
    var over = h('span'); over.style.backgroundColor = heatColor(thr * 2, thr); scale.appendChild(over);
    return [h('table', { class: 'heat', id: 'heatmap', 'data-threshold': thr }, head, rows),
      h('div', { class: 'scale' }, '0 ms', scale, '▲ over ' + thr + ' ms (threshold)')];
  }

  function render(d) {
    doc = d;
    lastUpdate = Date.now();
    var live = d.nodes.filter(function (n) { return n.state === 'live'; }).length;
    var stale = d.nodes.filter(function (n) { return n.state === 'stale'; }).length;
    var sev = d.healthy ? d.severity : 'error';
    var summary = document.getElementById('summary');
    summary.replaceChildren(
      h('span', { class: 'pill ' + sev, id: 'cluster-health' }, 'cluster ' + severityLabel(sev)),
      h('span', null, live + ' live' + (stale ? ', ' + stale + ' stale' : '') + ' · database ' + (d.database.reachable ? ms(d.database.rttMs) : 'unreachable')),
      h('span', { class: 'conn' }, 'answered by ' + d.reportedBy.hostname));
    var problems = document.getElementById('problems');
    var boxes = [];
    if (d.problems.length) boxes.push(h('div', { class: 'box' }, h('strong', null, 'Problems'), h('ul', null, d.problems.map(function (p) { return h('li', null, p); }))));
    if (d.warnings.length) boxes.push(h('div', { class: 'box warn' }, h('strong', null, 'Warnings'), h('ul', null, d.warnings.map(function (p) { return h('li', null, p); }))));
    problems.replaceChildren.apply(problems, boxes);
    var nodes = document.getElementById('nodes');
    nodes.replaceChildren.apply(nodes, d.nodes.map(function (n) { return nodeCard(n, d); }));
    document.getElementById('matrix-note').textContent = 'What each node measured, row → column, and to Postgres; the latency threshold is ' + d.thresholdMs + ' ms.';
    var m = document.getElementById('matrix');
    m.replaceChildren.apply(m, matrix(d));
    showConn();
  }

  function showConn() {
    var c = document.getElementById('conn');
    var age = Date.now() - lastUpdate;
    var state = mode === 'live' && age < 5000 ? 'up' : mode === 'polling' && age < 6000 ? 'warning' : 'down';
    var text = mode === 'live' ? 'live' : mode === 'polling' ? 'polling' : mode;
    c.replaceChildren(h('span', { class: 'dot ' + state }), text + (lastUpdate ? ' · updated ' + ago(age) : ''));
    c.setAttribute('data-mode', mode);
  }

  var pollTimer = null;
  function poll() {
    fetch('/api/v2/status', { cache: 'no-store' }).then(function (r) {
      if (!r.ok) throw new Error('HTTP ' + r.status);
      return r.json();
    }).then(render).catch(function () { showConn(); });
  }
  function startPolling() {
    if (pollTimer) return;
    mode = 'polling';
    poll();
    pollTimer = setInterval(poll, 2000);
  }
  function stopPolling() { if (pollTimer) { clearInterval(pollTimer); pollTimer = null; } }

  function connect() {
    if (typeof EventSource === 'undefined') { startPolling(); return; }
    var es = new EventSource('/api/v2/status/events');
    es.addEventListener('status', function (e) {
      stopPolling();
      mode = 'live';
      try { render(JSON.parse(e.data)); } catch (err) { /* a malformed event: the next one replaces it */ }
    });
    es.onerror = function () {
      // The stream broke: EventSource retries by itself; meanwhile (or for good, once it gave up) poll.
      startPolling();
      if (es.readyState === EventSource.CLOSED) setTimeout(connect, 10000);
    };
  }

  try { render(JSON.parse(document.getElementById('initial-status').textContent)); } catch (err) { /* drawn by the first event */ }
  connect();
  setInterval(showConn, 1000);
})();
`;
