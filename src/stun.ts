// STUN on the node: the relay core answers Binding requests on a UDP address (Tailscale clients
// learn their public address this way), and the DERP map announces its port.
import { DerpmeshError, fromNative } from './errors.js';
import type { Logger } from './log.js';
import type { Snapshot } from './metrics.js';
import { native } from './native.js';

export interface StunListener {
  port: number;
  /** Its counters for /metrics (`derpmesh_stun_*`). */
  metrics(): Snapshot;
  stop(): void;
}

/**
 * Starts answering STUN on `host:port`. A configured address that cannot be bound stops the start;
 * the default one (port 3478 on the listen host) is skipped with a warning when taken.
 */
export function startStun(address: { host: string; port: number; explicit: boolean }, logger: Logger): StunListener | undefined {
  const text = address.host.includes(':') ? `[${address.host}]:${address.port}` : `${address.host}:${address.port}`;
  let server: InstanceType<typeof native.StunServer>;
  try {
    server = native.StunServer.bind(text);
  } catch (err) {
    const error = fromNative(err) as Error;
    if (!address.explicit) {
      logger.warn('STUN is off: its default address is not free; set DERPMESH_STUN_ADDRESS to choose one, or disable to silence this', {
        address: text,
        err: error.message,
      });
      return undefined;
    }
    throw new DerpmeshError(
      'DERPMESH_ERR_LISTEN',
      `${error.message}; set DERPMESH_STUN_ADDRESS (--stun-address) to a free local UDP address, or disable`,
      text,
    );
  }
  logger.info('answering STUN', { address: text, port: server.port });
  return {
    port: server.port,
    metrics: (): Snapshot => {
      const s = server.stats();
      return {
        samples: [
          { name: 'stun_answered_total', value: s.answered },
          { name: 'stun_dropped_total', value: s.malformed, labels: { reason: 'malformed' } },
          { name: 'stun_dropped_total', value: s.notBinding, labels: { reason: 'not_binding' } },
          { name: 'stun_socket_errors_total', value: s.sendErrors, labels: { op: 'send' } },
          { name: 'stun_socket_errors_total', value: s.readErrors, labels: { op: 'read' } },
        ],
      };
    },
    stop: () => server.stop(),
  };
}
