// STUN on the node: the relay core answers Binding requests on a UDP address (Tailscale clients
// learn their public address this way), and the DERP map announces its port.
import { DerpmeshError, fromNative } from './errors.js';
import type { Logger } from './log.js';
import type { MetricSample } from './metrics.js';
import { native } from './native.js';

export interface StunListener {
  port: number;
  metrics(): MetricSample[];
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
  const counter = (name: string, help: string, value: number): MetricSample => ({ name, kind: 'counter', help, value });
  return {
    port: server.port,
    metrics: () => {
      const s = server.stats();
      return [
        counter('stun_answered', 'STUN Binding requests answered.', s.answered),
        counter(
          'stun_malformed',
          'UDP datagrams on the STUN port dropped: not STUN, or not a request a Tailscale client sends.',
          s.malformed,
        ),
        counter('stun_not_binding', 'STUN messages dropped: well-formed but not a Binding request.', s.notBinding),
        counter('stun_send_errors', 'STUN answers the socket refused to send.', s.sendErrors),
        counter('stun_read_errors', 'Receive errors on the STUN socket.', s.readErrors),
      ];
    },
    stop: () => server.stop(),
  };
}
