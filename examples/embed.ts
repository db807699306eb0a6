// Embedding: attach a derpmesh relay to an HTTP server your application already runs.
//
// Your routes stay yours; the relay takes `/derp` (DERP over `Upgrade: DERP` and WebSocket) and
// its probe endpoints (`/derp/probe`, `/derp/latency-check`, `/generate_204`). Once upgraded, a
// DERP connection is handed to the Rust core and never passes through JavaScript again.
//
//   npm install derpmesh
//   PORT=3000 node embed.js            (this file compiled; or run it with any TS loader)
//
// Then point a DERP client (a Tailscale node, Headscale's DERP map, `derpmesh bench`) at
// http://127.0.0.1:3000/derp. SIGTERM/SIGINT: every client gets a DERP Restarting frame first.
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { Relay } from 'derpmesh';

const relay = new Relay({
  // Only needed when other relays mesh with this one; grants WatchConns and packet forwarding.
  meshKey: process.env.MESH_KEY,
});

// The application that was here before derpmesh.
const server = createServer((req, res) => {
  if (relay.handleRequest(req, res)) return;
  if (req.url === '/relay-metrics') {
    res.setHeader('Content-Type', 'application/json');
    res.end(JSON.stringify(Object.fromEntries(relay.metrics().map((m) => [m.name, m.value]))));
    return;
  }
  res.setHeader('Content-Type', 'text/plain');
  res.end('hello from the application\n');
});

server.on('upgrade', (req, socket, head) => {
  // Hand the socket over synchronously: no `await` between the event and handleUpgrade.
  if (relay.isDerpUpgrade(req)) {
    relay.handleUpgrade(req, socket, head);
    return;
  }
  // Your own WebSocket endpoints would go here.
  socket.end('HTTP/1.1 404 Not Found\r\nConnection: close\r\n\r\n');
});

server.listen(Number(process.env.PORT ?? 3000), process.env.HOST ?? '127.0.0.1', () => {
  const { address, port } = server.address() as AddressInfo;
  console.log(`application and DERP relay listening on http://${address}:${port} (relay ${relay.publicKey})`);
});

let stopping = false;
const stop = async (signal: string) => {
  if (stopping) process.exit(1); // a second signal: leave now
  stopping = true;
  console.log(`${signal}: sending Restarting to DERP clients, then closing`);
  await relay.close({ graceMs: 2_000 });
  server.close(() => process.exit(0));
  server.closeAllConnections();
};
process.on('SIGINT', () => void stop('SIGINT'));
process.on('SIGTERM', () => void stop('SIGTERM'));
