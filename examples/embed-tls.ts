// Embedding over TLS: your application and a derpmesh relay on one TLS port, with TLS terminated
// by the relay's Rust core.
//
// Every TCP connection goes to the relay before anything is read from it. The core does the TLS
// handshake, serves `/derp` (DERP over `Upgrade: DERP` and WebSocket) and the probe endpoints
// (`/derp/probe`, `/derp/latency-check`, `/generate_204`) itself, and hands every other request
// back to your HTTP server as an already-decrypted socket. DERP traffic never enters JavaScript.
//
//   npm install derpmesh
//   TLS_CERT=cert.pem TLS_KEY=key.pem PORT=443 node embed-tls.js
//
// SIGHUP re-reads the certificate files (new handshakes only); SIGTERM/SIGINT send every DERP
// client a Restarting frame first. (Linux and macOS: the relay takes the socket's descriptor.)
import { readFileSync } from 'node:fs';
import { createServer as createHttpServer } from 'node:http';
import { createServer as createNetServer, type AddressInfo } from 'node:net';
import { Relay } from 'derpmesh';

const certificate = () => ({ cert: readFileSync(process.env.TLS_CERT ?? 'cert.pem'), key: readFileSync(process.env.TLS_KEY ?? 'key.pem') });

const relay = new Relay({ meshKey: process.env.MESH_KEY });
relay.setCertificate(certificate());

// The application: an ordinary HTTP server that does not listen itself; it gets the requests the
// relay does not answer, decrypted.
const app = createHttpServer((req, res) => {
  if (req.url === '/relay-metrics') {
    res.setHeader('Content-Type', 'application/json');
    res.end(JSON.stringify(Object.fromEntries(relay.metrics().map((m) => [m.name, m.value]))));
    return;
  }
  res.setHeader('Content-Type', 'text/plain');
  res.end('hello from the application\n');
});
relay.onHttpConnection((socket) => app.emit('connection', socket));

// The one port: raw TCP, paused so that nothing is read before the relay takes the socket.
const listener = createNetServer({ pauseOnConnect: true }, (socket) => {
  if (!relay.handleConnection(socket)) socket.destroy();
});
listener.listen(Number(process.env.PORT ?? 443), process.env.HOST ?? '127.0.0.1', () => {
  const { address, port } = listener.address() as AddressInfo;
  console.log(`application and DERP relay listening on https://${address}:${port} (relay ${relay.publicKey})`);
});

process.on('SIGHUP', () => {
  try {
    relay.setCertificate(certificate());
    console.log('certificate reloaded');
  } catch (err) {
    console.error(`certificate not reloaded, the current one stays: ${(err as Error).message}`);
  }
});

let stopping = false;
const stop = async (signal: string) => {
  if (stopping) return; // already stopping; the stop is bounded by the grace below
  stopping = true;
  console.log(`${signal}: sending Restarting to DERP clients, then closing`);
  listener.close();
  await relay.close({ graceMs: 2_000 });
  app.closeAllConnections();
  process.exit(0);
};
process.on('SIGINT', () => void stop('SIGINT'));
process.on('SIGTERM', () => void stop('SIGTERM'));
