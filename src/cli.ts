#!/usr/bin/env node
// The `derpmesh` command: server, bench, config-table, --version.
import { loadConfig, optionsHelp, optionsMarkdownTable } from './config.js';
import { DerpmeshError } from './errors.js';
import { createLogger } from './log.js';
import type { DerpmeshNode } from './node.js';
import { onParentGone } from './parent.js';
import { version } from './version.js';

const usage = `derpmesh ${version} — a high-availability DERP relay cluster

Usage:
  derpmesh server [options]     run one node (see \`derpmesh server --help\`)
  derpmesh cluster --nodes N    run a local HA cluster of N node processes on an embedded Postgres
  derpmesh bench [options]      measure a DERP relay (see \`derpmesh bench --help\`)
  derpmesh ping --url URL       packets between every ordered pair of nodes; exit 1 on loss (\`--help\`)
  derpmesh config list|get|set|unset   cluster settings in Postgres, applied live by every node
  derpmesh status [--url URL]   print a running cluster's status; exit 1 when unhealthy (\`--help\`)
  derpmesh config-table         print the configuration table (Markdown)
  derpmesh --version
`;

async function server(argv: string[]): Promise<void> {
  if (argv.includes('--help') || argv.includes('-h')) {
    process.stdout.write(`derpmesh server [options]\n\nOptions (flags override environment):\n${optionsHelp()}\n`);
    return;
  }
  const config = loadConfig(argv);
  const logger = createLogger({ level: config.logLevel, json: config.logFormat === 'json' });
  // Imported here, not at the top: the native addon loads with it, and `--version`, `--help` and
  // `config-table` must work (and a missing addon must be reported cleanly) without it.
  const { startNode } = await import('./node.js');
  // The first signal starts the graceful stop, bounded by the shutdown grace. Further signals (a
  // terminal's Ctrl-C and a wrapper such as npm often both send one) do not cut it short: exiting
  // at once would skip the Restarting frames and strand an embedded Postgres. A stop that still
  // has not finished well after the grace is abandoned, releasing the Postgres first. A signal
  // during the start is kept until the node has started, so what it started is released too.
  let node: DerpmeshNode | undefined;
  let stopReason: string | undefined;
  const beginStop = (n: DerpmeshNode) => {
    const hardStopMs = config.shutdownDrainDelayMs + config.shutdownGraceMs + HARD_STOP_MARGIN_MS;
    setTimeout(() => {
      logger.error('the graceful stop did not finish in time: exiting now', { afterMs: hardStopMs });
      void n.abandon().finally(() => process.exit(1));
    }, hardStopMs).unref();
    void n.close().then(() => process.exit(0));
  };
  const stop = (reason: string) => {
    if (stopReason !== undefined) {
      logger.warn('already stopping: the graceful stop goes on', { reason, graceMs: config.shutdownGraceMs });
      return;
    }
    stopReason = reason;
    logger.info('stopping', { reason });
    if (node) beginStop(node);
    else logger.info('the node is still starting: it stops once started');
  };
  for (const signal of ['SIGINT', 'SIGTERM'] as const) process.on(signal, () => stop(signal));
  // SIGHUP re-reads the TLS certificate (the files are also watched).
  process.on('SIGHUP', () => node?.reloadCertificates('SIGHUP'));
  onParentGone(() => stop('the parent process is gone'));
  node = await startNode(config, logger);
  if (stopReason !== undefined) beginStop(node);
}

/** Time beyond the shutdown grace before a stuck stop is abandoned. */
const HARD_STOP_MARGIN_MS = 5_000;

async function main(argv: string[]): Promise<void> {
  const [command, ...rest] = argv;
  switch (command) {
    case 'server':
      return server(rest);
    case 'bench': {
      const { benchCommand } = await import('./bench.js');
      return benchCommand(rest);
    }
    case 'ping': {
      const { pingCommand } = await import('./ping-command.js');
      return pingCommand(rest);
    }
    case 'cluster': {
      const { clusterCommand } = await import('./cluster/cluster.js');
      return clusterCommand(rest);
    }
    case 'config': {
      const { settingsCommand } = await import('./settings-command.js');
      return settingsCommand(rest);
    }
    case 'status': {
      const { statusCommand } = await import('./status-command.js');
      process.exitCode = await statusCommand(rest);
      return;
    }
    case 'config-table':
      process.stdout.write(optionsMarkdownTable() + '\n');
      return;
    case '--version':
    case '-v':
    case 'version':
      process.stdout.write(version + '\n');
      return;
    case undefined:
    case 'help':
    case '--help':
    case '-h':
      process.stdout.write(usage);
      return;
    default:
      process.stderr.write(`derpmesh: unknown command ${JSON.stringify(command)}\n\n${usage}`);
      process.exitCode = 2;
  }
}

main(process.argv.slice(2)).catch((err: unknown) => {
  if (err instanceof DerpmeshError) {
    process.stderr.write(`derpmesh: ${err.message} [${err.code}]\n`);
    // 2: the invocation or configuration is wrong; 1: the installation is (no native addon).
    process.exitCode = err.code === 'DERPMESH_ERR_NATIVE_BINDING' ? 1 : 2;
  } else {
    process.stderr.write(`derpmesh: ${(err as Error).stack ?? String(err)}\n`);
    process.exitCode = 1;
  }
});
