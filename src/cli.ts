#!/usr/bin/env node
// The `derpmesh` command: server, bench, config-table, --version.
import { loadConfig, optionsHelp, optionsMarkdownTable } from './config.js';
import { DerpmeshError } from './errors.js';
import { createLogger } from './log.js';
import { version } from './version.js';

const usage = `derpmesh ${version} — a high-availability DERP relay cluster

Usage:
  derpmesh server [options]     run one node (see \`derpmesh server --help\`)
  derpmesh cluster --nodes N    run a local HA cluster of N node processes on an embedded Postgres
  derpmesh bench [options]      measure a DERP relay (see \`derpmesh bench --help\`)
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
  const node = await startNode(config, logger);
  let signals = 0;
  const stop = (signal: string) => {
    signals++;
    if (signals > 1) {
      logger.warn('second signal: exiting now', { signal });
      process.exit(1);
    }
    logger.info('signal received', { signal });
    void node.close().then(() => process.exit(0));
  };
  process.on('SIGINT', () => stop('SIGINT'));
  process.on('SIGTERM', () => stop('SIGTERM'));
}

async function main(argv: string[]): Promise<void> {
  const [command, ...rest] = argv;
  switch (command) {
    case 'server':
      return server(rest);
    case 'bench': {
      const { benchCommand } = await import('./bench.js');
      return benchCommand(rest);
    }
    case 'cluster': {
      const { clusterCommand } = await import('./cluster/cluster.js');
      return clusterCommand(rest);
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
