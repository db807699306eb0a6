// A status page for operators: the cluster's replicas and the latency matrix, as plain HTML.
import type { ReplicaRegistry } from '../replicas/registry.js';
import type { RouteHandler } from './server.js';

const escape = (text: string) => text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

export function statusPage(registry: ReplicaRegistry, thresholdMs: number, warnings: () => string[]): RouteHandler {
  return (req, res) => {
    if ((req.url ?? '').split('?')[0] !== '/status') return false;
    const replicas = registry.replicas().filter((r) => r.stoppedAt === null && !registry.isStale(r));
    const cell = (us: number | undefined) => {
      if (us === undefined) return '<td class="na">?</td>';
      const ms = us / 1000;
      return `<td class="${ms > thresholdMs ? 'slow' : 'ok'}">${ms.toFixed(2)}</td>`;
    };
    const header = replicas.map((r) => `<th>${escape(r.hostname)}</th>`).join('');
    const rows = replicas
      .map((from) => {
        const cells = replicas.map((to) => (to.id === from.id ? '<td>–</td>' : cell(from.peerLatenciesUs[to.id]))).join('');
        return `<tr><th>${escape(from.hostname)}</th>${cells}${cell(from.databaseLatencyUs)}</tr>`;
      })
      .join('\n');
    const nodes = replicas
      .map(
        (r) =>
          `<tr><td>${escape(r.hostname)}${r.id === registry.self.id ? ' (this node)' : ''}</td><td>${escape(r.relayUrl || '—')}</td><td>${escape(r.version)}</td><td>${escape(r.error || 'ok')}</td></tr>`,
      )
      .join('\n');
    const warningList = warnings()
      .map((w) => `<li>${escape(w)}</li>`)
      .join('');
    const html = `<!doctype html><html><head><meta charset="utf-8"><meta http-equiv="refresh" content="5"><title>derpmesh cluster</title>
<style>body{font-family:system-ui,sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:2em}td,th{border:1px solid #ccc;padding:.3em .7em;text-align:right}.slow{background:#fdd}.ok{background:#dfd}.na{color:#999}</style></head>
<body><h1>derpmesh cluster: ${replicas.length} live replica${replicas.length === 1 ? '' : 's'}</h1>
${warningList ? `<ul class="warnings">${warningList}</ul>` : ''}
<table><tr><th>node</th><th>relay URL</th><th>version</th><th>error</th></tr>
${nodes}</table>
<h2>Round trips (ms), row → column; last column: Postgres. Threshold ${thresholdMs} ms.</h2>
<table><tr><th></th>${header}<th>Postgres</th></tr>
${rows}</table></body></html>
`;
    res.writeHead(200, { 'Content-Type': 'text/html; charset=utf-8', 'Cache-Control': 'no-store' }).end(html);
    return true;
  };
}
