// One instance of the access URL's balancer in a process of its own, for runs with more clients than
// one process has descriptors for (a balanced connection takes two): the harness starts several, as
// a load balancer tier has several instances. It prints `port N` once listening, then reads backend
// lists from stdin, one JSON array of `{host, port}` per line, and exits when stdin closes.
import { createInterface } from 'node:readline';

import { startBalancer, type Backend } from '../../src/cluster/balancer.js';

const balancer = await startBalancer('127.0.0.1', 0, []);
process.stdout.write(`port ${balancer.port}\n`);
const lines = createInterface({ input: process.stdin });
lines.on('line', (line) => {
  try {
    balancer.setBackends(JSON.parse(line) as Backend[]);
    process.stdout.write('ok\n');
  } catch (err) {
    process.stdout.write(`error ${(err as Error).message}\n`);
  }
});
lines.on('close', () => void balancer.close().then(() => process.exit(0)));
