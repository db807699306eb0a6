// A small TCP round-robin load balancer: the access URL of a local cluster. A connection that
// cannot reach its node is retried on the next one, so a dead node is skipped.
//
// It forwards bytes as they arrive: Nagle's algorithm is off on both sides (DERP is many small
// frames; with it on, a small write waits for the previous one's ACK, ~40 ms with delayed ACKs).
// Each direction keeps its own backpressure (pipe), a FIN is passed on as a FIN (half-close), and
// an error or reset on either side closes the other.
import { connect, createServer, type Server, type Socket } from 'node:net';

import { ACCEPT_BACKLOG } from '../http/server.js';

/** A backend: a port on 127.0.0.1, or a host and port. */
export type Backend = number | { host: string; port: number };

export interface Balancer {
  port: number;
  setBackends(backends: Backend[]): void;
  close(): Promise<void>;
}

export async function startBalancer(host: string, port: number, backends: Backend[]): Promise<Balancer> {
  const address = (b: Backend) => (typeof b === 'number' ? { host: '127.0.0.1', port: b } : b);
  let ports = backends.map(address);
  let next = 0;
  const sockets = new Set<Socket>();
  const track = (s: Socket) => {
    sockets.add(s);
    s.once('close', () => sockets.delete(s));
  };
  const server: Server = createServer({ allowHalfOpen: true, pauseOnConnect: true, noDelay: true }, (client) => {
    track(client);
    client.on('error', () => client.destroy());
    const attempt = (tries: number) => {
      if (client.destroyed) return;
      if (tries >= ports.length) {
        client.destroy();
        return;
      }
      const backend = ports[next++ % ports.length]!;
      const upstream = connect({ port: backend.port, host: backend.host, allowHalfOpen: true, noDelay: true });
      track(upstream);
      const retry = () => attempt(tries + 1);
      upstream.once('error', retry);
      upstream.once('connect', () => {
        upstream.off('error', retry);
        splice(client, upstream);
      });
    };
    attempt(0);
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    // The whole cluster's reconnect storm arrives here first: a deep accept queue (see http/server.ts).
    server.listen({ port, host, backlog: ACCEPT_BACKLOG }, () => resolve());
  });
  return {
    port: (server.address() as { port: number }).port,
    setBackends: (b) => {
      ports = b.map(address);
    },
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
}

/** Joins two connected sockets both ways until both directions have ended or either fails. */
function splice(a: Socket, b: Socket): void {
  a.pipe(b); // ends b's write side when a ends (half-close passed on)
  b.pipe(a);
  const closeBoth = () => {
    a.destroy();
    b.destroy();
  };
  a.on('error', closeBoth);
  b.on('error', closeBoth);
  // A socket closes by itself once it has both received and sent its FIN; its partner then finishes
  // writing what it holds (end, not destroy). A reset on either side arrives as an error above.
  a.once('close', () => b.end());
  b.once('close', () => a.end());
  a.setNoDelay(true);
  b.setNoDelay(true);
  a.resume();
}
