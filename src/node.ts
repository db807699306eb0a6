// One derpmesh node: configuration in, a relay and its HTTP server running, graceful shutdown out.
import { readFileSync } from 'node:fs';

import type { ServerConfig } from './config.js';
import { startHttpServer, type HttpServer } from './http/server.js';
import type { Logger } from './log.js';
import { Relay } from './relay.js';
import { version } from './version.js';

export interface DerpmeshNode {
  relay: Relay;
  http: HttpServer;
  /** URL this node listens on. */
  url: string;
  /** Graceful stop: Restarting to every client, flush, close. */
  close(): Promise<void>;
}

export async function startNode(config: ServerConfig, logger: Logger): Promise<DerpmeshNode> {
  const relay = new Relay({ queueDepth: config.queueDepth });
  const tls =
    config.tlsCertFile && config.tlsKeyFile
      ? { cert: readFileSync(config.tlsCertFile), key: readFileSync(config.tlsKeyFile) }
      : undefined;
  const http = await startHttpServer({
    relay,
    host: config.listenHost,
    port: config.listenPort,
    logger,
    tls,
    routes: [
      (req, res) => {
        if ((req.url ?? '').split('?')[0] !== '/healthz') return false;
        res.writeHead(200, { 'Content-Type': 'text/plain' }).end('OK');
        return true;
      },
    ],
  });
  logger.info('derpmesh node started', {
    version,
    listen: http.url,
    accessUrl: config.accessUrl.href,
    relayUrl: config.relayUrl?.href,
    relayPublicKey: relay.publicKey,
    tls: tls !== undefined,
  });
  let closing: Promise<void> | undefined;
  return {
    relay,
    http,
    url: http.url,
    close: () =>
      (closing ??= (async () => {
        logger.info('shutting down: sending Restarting to clients', { graceMs: config.shutdownGraceMs });
        await relay.close({ graceMs: config.shutdownGraceMs });
        await http.close();
        logger.info('stopped');
      })()),
  };
}
