// The napi-rs addon. The generated loader (native/binding.cjs) picks the .node file for this
// platform: a local build (native/derpmesh.<platform>.node) first, then the per-platform npm
// package (derpmesh-<platform>, an optional dependency of the published package). When neither
// loads, the error says which platform was detected, which package was expected and how to build
// from source, instead of a bare "cannot find module".
import { createRequire } from 'node:module';
import type * as Binding from '../native/binding.cjs';
import { DerpmeshError } from './errors.js';
import { version } from './version.js';

const require = createRequire(import.meta.url);

/** The platforms a prebuilt binary is published for (package.json `napi.targets`). */
export const prebuiltPlatforms = [
  'linux-x64-gnu',
  'linux-arm64-gnu',
  'linux-x64-musl',
  'linux-arm64-musl',
  'darwin-x64',
  'darwin-arm64',
  'win32-x64-msvc',
] as const;

/** This process's platform in napi-rs naming: `linux-x64-gnu`, `darwin-arm64`, `win32-x64-msvc`. */
export function detectPlatform(): string {
  const base = `${process.platform}-${process.arch}`;
  if (process.platform === 'win32') return `${base}-msvc`;
  if (process.platform !== 'linux') return base;
  const header = (process.report?.getReport() as { header?: { glibcVersionRuntime?: string } } | undefined)?.header;
  return `${base}-${header?.glibcVersionRuntime ? 'gnu' : 'musl'}`;
}

function causes(err: unknown): string[] {
  const out: string[] = [];
  for (let e = err as { message?: string; cause?: unknown } | undefined; e && out.length < 8; e = e.cause as typeof e) {
    if (e.message) out.push(e.message.split('\n')[0]!);
  }
  return out;
}

function missingBinding(err: unknown): DerpmeshError {
  const platform = detectPlatform();
  const expected = `derpmesh-${platform}`;
  const supported = (prebuiltPlatforms as readonly string[]).includes(platform);
  const lines = [
    `the native relay addon could not be loaded.`,
    `  detected platform: ${platform} (node ${process.version}, ${process.platform}/${process.arch})`,
    supported
      ? `  expected package:  ${expected} (an optional dependency of derpmesh; it was not installed or did not load:` +
        ` npm skips optional dependencies with --omit=optional or --no-optional, and a lockfile made on another platform may lack it)`
      : `  no prebuilt binary is published for this platform; prebuilt: ${prebuiltPlatforms.join(', ')}`,
    `  fix: ${supported ? `npm install ${expected}@${version} (or reinstall derpmesh without --omit=optional), or ` : ''}` +
      `build from source: install Rust (https://rustup.rs) and Node 20+, clone the derpmesh repository, run \`npm install && npm run pack\`,` +
      ` then install the two tarballs it writes to pack/ (npm install ./pack/derpmesh-*.tgz)`,
    `  loader said: ${causes(err).join(' <- ')}`,
  ];
  return new DerpmeshError('DERPMESH_ERR_NATIVE_BINDING', lines.join('\n'), platform);
}

function load(): typeof Binding {
  // dist/src/native.js and src/native.ts both sit two levels below the package root.
  const candidates = ['../../native/binding.cjs', '../native/binding.cjs'];
  for (const path of candidates) {
    try {
      return require(path) as typeof Binding;
    } catch (err) {
      const notThisPath =
        (err as NodeJS.ErrnoException).code === 'MODULE_NOT_FOUND' && String((err as Error).message).includes('binding.cjs');
      if (!notThisPath) throw missingBinding(err);
    }
  }
  throw missingBinding(new Error(`native/binding.cjs is missing next to ${import.meta.url}`));
}

export const native = load();
export type {
  RelayOptions,
  Metric,
  HistogramSnapshot,
  Bridge,
  MeshLinkStatus,
  LinkState,
  LinkErrorCode,
  UpgradeKind,
  MetricKind,
  AcceptRefusal,
  AdmissionEvent,
  AdmissionOutcome,
} from '../native/binding.cjs';
