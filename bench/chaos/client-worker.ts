// One group of the chaos harness's clients (client-group.ts) in a process of its own, for storms of
// more clients than one process can handshake fast enough. Started with the group's options as its
// argument; reads `{id, cmd, arg}` lines on stdin and answers `{id, value}` or `{id, error}` lines.
// Times it reports are epoch milliseconds (performance.timeOrigin based), comparable across processes.
import { performance } from 'node:perf_hooks';
import { createInterface } from 'node:readline';

import { ClientGroup, type GroupOptions } from './client-group.js';

const group = new ClientGroup(JSON.parse(process.argv[2]!) as GroupOptions);

const commands: Record<string, (arg: unknown) => unknown> = {
  connect: () => group.connect(),
  keys: (arg) => group.setNodeKeys(arg as [string, number][]),
  traffic: () => group.startTraffic(),
  stop: () => group.stopTraffic(),
  // The fault began at `arg` (epoch ms) in the harness.
  fault: (arg) => void group.beginFault((arg as number) - performance.timeOrigin),
  state: () => group.state(),
  partial: (arg) => group.partial(arg as number | undefined),
  close: () => group.close(),
};

const lines = createInterface({ input: process.stdin });
lines.on('line', (line) => {
  const { id, cmd, arg } = JSON.parse(line) as { id: number; cmd: string; arg?: unknown };
  const run = commands[cmd];
  Promise.resolve()
    .then(() => {
      if (!run) throw new Error(`unknown command ${cmd}`);
      return run(arg);
    })
    .then(
      (value) => process.stdout.write(JSON.stringify({ id, value: value ?? null }) + '\n'),
      (err: unknown) => process.stdout.write(JSON.stringify({ id, error: (err as Error).message ?? String(err) }) + '\n'),
    );
});
lines.on('close', () => {
  void group.close().finally(() => process.exit(0));
});
