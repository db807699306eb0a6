// A small TCP round-robin load balancer: the access URL of a local cluster. A connection that
// cannot reach its node is retried on the next one, so a dead node is skipped.
import { connect, createServer, type Server, type Socket } from 'node:net';

export interface Balancer {
  port: number;
  setBackends(ports: number[]): void;
  close(): Promise<void>;
}

export async function startBalancer(host: string, port: number, backends: number[]): Promise<Balancer> {
  let ports = [...backends];
  let next = 0;
  const sockets = new Set<Socket>();
  const server: Server = createServer((client) => {
    sockets.add(client);
    client.on('close', () => sockets.delete(client));
    client.on('error', () => client.destroy());
    client.pause();
    const attempt = (tries: number) => {
      if (tries >= ports.length) {
        client.destroy();
        return;
      }
      const backendPort = ports[next++ % ports.length]!;
      const upstream = connect(backendPort, '127.0.0.1');
      upstream.once('connect', () => {
        sockets.add(upstream);
        upstream.on('close', () => sockets.delete(upstream));
        client.pipe(upstream);
        upstream.pipe(client);
        client.resume();
        upstream.on('error', () => client.destroy());
        client.on('close', () => upstream.destroy());
        upstream.on('close', () => client.destroy());
      });
      upstream.once('error', () => {
        if (upstream.connecting || !sockets.has(upstream)) attempt(tries + 1);
      });
    };
    attempt(0);
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => resolve());
  });
  return {
    port: (server.address() as { port: number }).port,
    setBackends: (p) => {
      ports = [...p];
    },
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
}
