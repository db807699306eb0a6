// A TCP proxy on 127.0.0.1 in front of a local port that delays every chunk by `delayMs / 2` in each
// direction, so the injected round trip is `delayMs`. Order is preserved (a chunk never overtakes an
// earlier one, even when the delay shrinks), `setDelay()` changes the delay live, `close()` ends it.
import { connect, createServer, type Server, type Socket } from 'node:net';

export interface DelayProxy {
  port: number;
  /** http://127.0.0.1:PORT */
  url: string;
  /** The injected round trip now (ms). */
  delayMs(): number;
  /** Changes the injected round trip for every chunk read from now on. */
  setDelay(ms: number): void;
  close(): Promise<void>;
}

export async function startDelayProxy(targetPort: number, delayMs = 0): Promise<DelayProxy> {
  let delay = delayMs;
  const sockets = new Set<Socket>();

  /** Copies `from` to `to`, each chunk held until `delay / 2` after it was read, in order. */
  const pump = (from: Socket, to: Socket) => {
    const queue: { at: number; chunk: Buffer }[] = [];
    let lastAt = 0;
    let ended = false;
    let timer: NodeJS.Timeout | undefined;
    const flush = () => {
      timer = undefined;
      const now = Date.now();
      while (queue.length > 0 && queue[0]!.at <= now) {
        if (!to.destroyed) to.write(queue.shift()!.chunk);
        else queue.shift();
      }
      if (queue.length > 0) timer = setTimeout(flush, queue[0]!.at - now);
      else if (ended && !to.destroyed) to.end();
    };
    from.on('data', (chunk: Buffer) => {
      const at = Math.max(Date.now() + delay / 2, lastAt);
      lastAt = at;
      queue.push({ at, chunk });
      if (!timer) flush();
    });
    from.on('end', () => {
      ended = true;
      if (!timer) flush();
    });
    to.on('close', () => clearTimeout(timer));
  };

  // Half-open on both sides: a FIN is passed on (after the chunks queued before it), an error or reset
  // tears both connections down.
  const server: Server = createServer({ allowHalfOpen: true }, (client) => {
    const upstream = connect({ port: targetPort, host: '127.0.0.1', allowHalfOpen: true });
    for (const s of [client, upstream]) {
      sockets.add(s);
      s.setNoDelay(true);
      s.on('close', () => sockets.delete(s));
    }
    const destroyBoth = () => {
      client.destroy();
      upstream.destroy();
    };
    client.on('error', destroyBoth);
    upstream.on('error', destroyBoth);
    client.on('close', (hadError) => hadError && upstream.destroy());
    upstream.on('close', (hadError) => hadError && client.destroy());
    pump(client, upstream);
    pump(upstream, client);
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve());
  });
  const port = (server.address() as { port: number }).port;
  return {
    port,
    url: `http://127.0.0.1:${port}`,
    delayMs: () => delay,
    setDelay: (ms) => {
      delay = ms;
    },
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
}
