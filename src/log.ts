// Operator-readable logs: one line per event, `time LEVEL message key=value…`, to stderr.
// `DERPMESH_LOG_FORMAT=json` switches to JSON lines for log collectors.

export type LogLevel = 'debug' | 'info' | 'warn' | 'error';
export type LogFields = Record<string, unknown>;

const levelRank: Record<LogLevel, number> = { debug: 10, info: 20, warn: 30, error: 40 };

export interface Logger {
  debug(message: string, fields?: LogFields): void;
  info(message: string, fields?: LogFields): void;
  warn(message: string, fields?: LogFields): void;
  error(message: string, fields?: LogFields): void;
  child(fields: LogFields): Logger;
}

function formatValue(value: unknown): string {
  if (value instanceof Error) return JSON.stringify(value.message);
  const text = typeof value === 'string' ? value : JSON.stringify(value);
  return /[\s"=]/.test(text) ? JSON.stringify(text) : text;
}

export function createLogger(
  options: { level?: LogLevel; json?: boolean; fields?: LogFields; write?: (line: string) => void } = {},
): Logger {
  const minimum = levelRank[options.level ?? (process.env.DERPMESH_LOG_LEVEL as LogLevel | undefined) ?? 'info'] ?? levelRank.info;
  const json = options.json ?? process.env.DERPMESH_LOG_FORMAT === 'json';
  const write = options.write ?? ((line: string) => process.stderr.write(line + '\n'));
  const base = options.fields ?? {};
  const emit = (level: LogLevel, message: string, fields: LogFields = {}) => {
    if (levelRank[level] < minimum) return;
    const all = { ...base, ...fields };
    const time = new Date().toISOString();
    if (json) {
      write(JSON.stringify({ time, level, msg: message, ...all }, (_k, v: unknown) => (v instanceof Error ? v.message : v)));
      return;
    }
    const pairs = Object.entries(all)
      .filter(([, v]) => v !== undefined)
      .map(([k, v]) => `${k}=${formatValue(v)}`);
    write([time, level.toUpperCase().padEnd(5), message, ...pairs].join(' '));
  };
  return {
    debug: (m, f) => emit('debug', m, f),
    info: (m, f) => emit('info', m, f),
    warn: (m, f) => emit('warn', m, f),
    error: (m, f) => emit('error', m, f),
    child: (fields) => createLogger({ level: options.level, json, write, fields: { ...base, ...fields } }),
  };
}

export const silentLogger: Logger = {
  debug() {},
  info() {},
  warn() {},
  error() {},
  child: () => silentLogger,
};
