// Starts a real relay on a loopback port for a test.
import { startHttpServer, type HttpServerOptions } from '../../src/http/server.js';
import { silentLogger } from '../../src/log.js';
import { Relay, type RelayOptions } from '../../src/relay.js';

export interface TestRelay {
  /** http://127.0.0.1:PORT (https with `tls`) */
  url: string;
  port: number;
  relay: Relay;
  /** A relay-core metric or an HTTP counter (e.g. `http_header_timeouts`) by name. */
  metric(name: string): number;
  close(): Promise<void>;
}

export async function startRelay(
  options: RelayOptions & Pick<HttpServerOptions, 'headerTimeoutMs' | 'tls' | 'nodeFront'> = {},
): Promise<TestRelay> {
  const { headerTimeoutMs, tls, nodeFront, ...relayOptions } = options;
  const relay = new Relay(relayOptions);
  const http = await startHttpServer({ relay, host: '127.0.0.1', port: 0, logger: silentLogger, headerTimeoutMs, tls, nodeFront });
  let closed = false;
  return {
    url: http.url,
    port: http.port,
    relay,
    metric: (name) => {
      const counters = http.counters.samples().find((s) => s.name === name);
      return counters ? counters.value : relay.metric(name);
    },
    close: async () => {
      if (closed) return;
      closed = true;
      await relay.close({ graceMs: 1_000 });
      await http.close();
    },
  };
}
