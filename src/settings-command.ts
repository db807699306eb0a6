// `derpmesh config list|get|set|unset`: the cluster settings in Postgres (see settings.ts). Every
// node applies a change within moments of it (LISTEN/NOTIFY), without a restart.
import { configError } from './errors.js';
import { createLogger } from './log.js';
import { createPool } from './postgres/pool.js';
import { deleteSetting, isSettingName, parseSetting, readSettings, settings, writeSetting, type SettingSpec } from './settings.js';
import { loadConfig } from './config.js';

export const settingsUsage = `derpmesh config <list | get NAME | set NAME VALUE | unset NAME> [--postgres-url URL] [--state-dir DIR]

Cluster settings, kept in Postgres and applied live by every node (a node's own flags are its
defaults where a setting is not set). The database is --postgres-url / CODER_PG_CONNECTION_URL,
else the embedded Postgres of --state-dir (as \`derpmesh server\` and \`derpmesh cluster\` use it).

Settings:
${Object.entries(settings)
  .map(([name, spec]: [string, SettingSpec]) => `  ${name.padEnd(20)} ${spec.description}`)
  .join('\n')}
`;

export async function settingsCommand(argv: string[]): Promise<void> {
  if (argv.length === 0 || argv.includes('--help') || argv.includes('-h')) {
    process.stdout.write(settingsUsage);
    return;
  }
  // Positional words first, then the connection options `derpmesh server` takes.
  const words: string[] = [];
  let i = 0;
  for (; i < argv.length && !argv[i]!.startsWith('--'); i++) words.push(argv[i]!);
  const flags = argv.slice(i);
  const allowed = new Set(['--postgres-url', '--state-dir', '--log-level']);
  const bad = flags.find((f) => f.startsWith('--') && !allowed.has(f.split('=')[0]!));
  if (bad !== undefined) throw configError(`derpmesh config takes --postgres-url and --state-dir only, got ${bad}`, bad);
  const [action, name, value, ...extra] = words;
  const arity: Record<string, number> = { list: 0, get: 1, set: 2, unset: 1 };
  if (action === undefined || !(action in arity)) {
    throw configError(`derpmesh config: unknown action ${JSON.stringify(action)}; use list, get, set or unset`, action);
  }
  const given = [name, value].filter((w) => w !== undefined).length;
  if (given !== arity[action] || extra.length > 0) {
    throw configError(`derpmesh config ${action} takes ${arity[action]} argument(s): see derpmesh config --help`, words.join(' '));
  }
  if (name !== undefined && !isSettingName(name)) parseSetting(name, ''); // throws: unknown setting, with the list
  if (action === 'set') parseSetting(name!, value!); // validated before touching the database

  const config = loadConfig(flags);
  const logger = createLogger({ level: flags.includes('--log-level') ? config.logLevel : 'warn', json: false });
  let url = config.postgresUrl;
  let release: (() => Promise<void>) | undefined;
  if (!url) {
    const { startEmbeddedPostgres } = await import('./postgres/embedded.js');
    const embedded = await startEmbeddedPostgres({ stateDir: config.stateDir, logger });
    url = embedded.url;
    release = () => embedded.release();
  }
  const pool = createPool({ connectionString: url, logger, max: 1 });
  try {
    const { migrate } = await import('./postgres/migrations.js');
    await migrate(pool, logger);
    switch (action) {
      case 'list': {
        const { values, invalid } = await readSettings(pool);
        for (const n of Object.keys(settings) as (keyof typeof settings)[]) {
          process.stdout.write(
            `${n.padEnd(20)} ${values[n] !== undefined ? String(values[n]) : '(not set: each node uses its own flag)'}\n`,
          );
        }
        for (const problem of invalid) process.stderr.write(`warning: ${problem}\n`);
        return;
      }
      case 'get': {
        const { values } = await readSettings(pool);
        const v = values[name as keyof typeof settings];
        if (v === undefined) {
          process.stderr.write(`${name} is not set in the cluster: each node uses its own flag\n`);
          process.exitCode = 1;
        } else process.stdout.write(`${v}\n`);
        return;
      }
      case 'set': {
        const stored = await writeSetting(pool, name!, value!);
        process.stdout.write(`${name} = ${stored}: every node applies it now\n`);
        return;
      }
      case 'unset': {
        const deleted = await deleteSetting(pool, name!);
        process.stdout.write(deleted ? `${name} unset: each node goes back to its own flag\n` : `${name} was not set\n`);
        return;
      }
    }
  } finally {
    await pool.end();
    await release?.();
  }
}
