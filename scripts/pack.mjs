#!/usr/bin/env node
// `npm run pack`: the release tarballs, as they would be published.
//
//   pack/derpmesh-<version>.tgz                  the root package: loader, compiled TypeScript, types
//   pack/derpmesh-<platform>-<version>.tgz       one per built binary (native/derpmesh.<platform>.node)
//
// The root package lists every declared platform package (package.json `napi.targets`) as an
// optionalDependency pinned to the exact version, so npm installs only the one whose os/cpu/libc
// match. They are added here, at pack time, and not in the repository's package.json: `npm ci`
// cannot lock packages that are not published yet (this is what `napi pre-publish` does too).
// Run after `npm run build` (the `pack` npm script does both).
import { execFileSync } from 'node:child_process';
import { cpSync, existsSync, mkdirSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
// `--out DIR`: where the tarballs go (default pack/; the install test packs into its own directory).
const outFlag = process.argv.indexOf('--out');
if (outFlag > 0 && !process.argv[outFlag + 1]) {
  process.stderr.write('pack: --out needs a directory\n');
  process.exit(2);
}
const out = outFlag > 0 ? resolve(process.argv[outFlag + 1]) : join(root, 'pack');
const stage = join(out, 'stage');
const readJson = (path) => JSON.parse(readFileSync(path, 'utf8'));
const writeJson = (path, value) => writeFileSync(path, JSON.stringify(value, null, 2) + '\n');
const fail = (message) => {
  process.stderr.write(`pack: ${message}\n`);
  process.exit(1);
};

const pkg = readJson(join(root, 'package.json'));
const platformDirs = readdirSync(join(root, 'npm')).sort();
const binaries = readdirSync(join(root, 'native')).filter((f) => /^derpmesh\..+\.node$/.test(f));
if (binaries.length === 0) fail('no native/derpmesh.<platform>.node: run `npm run build` first (it needs Rust)');
if (!existsSync(join(root, 'dist/src/cli.js'))) fail('no dist/src/cli.js: run `npm run build` first');

// A binary older than the Rust sources (a cross build from an earlier commit) would ship stale code.
const newestSource = ['native/relay/src', 'native/node/src']
  .flatMap((dir) => readdirSync(join(root, dir), { recursive: true }).map((f) => join(root, dir, String(f))))
  .reduce((newest, f) => Math.max(newest, statSync(f).mtimeMs), 0);
for (const binary of binaries) {
  if (statSync(join(root, 'native', binary)).mtimeMs < newestSource) {
    process.stderr.write(`pack: warning: native/${binary} is older than the Rust sources; rebuild it before a release\n`);
  }
}

rmSync(out, { recursive: true, force: true });
mkdirSync(stage, { recursive: true });

function npmPack(dir) {
  const report = JSON.parse(execFileSync('npm', ['pack', '--json', '--pack-destination', out], { cwd: dir, encoding: 'utf8' }));
  return join(out, report[0].filename);
}

const tarballs = [];
const optionalDependencies = {};
for (const platform of platformDirs) {
  const platformPkg = readJson(join(root, 'npm', platform, 'package.json'));
  if (platformPkg.version !== pkg.version)
    fail(`npm/${platform}/package.json has version ${platformPkg.version}, package.json ${pkg.version}: run \`npx napi version\``);
  optionalDependencies[platformPkg.name] = pkg.version;
  const binary = `derpmesh.${platform}.node`;
  if (!binaries.includes(binary)) continue; // declared, not built on this machine
  const dir = join(stage, platform);
  cpSync(join(root, 'npm', platform), dir, { recursive: true });
  cpSync(join(root, 'native', binary), join(dir, binary));
  cpSync(join(root, 'LICENSE'), join(dir, 'LICENSE'));
  tarballs.push(npmPack(dir));
}

// The root package: no scripts (nothing runs at install), no devDependencies.
const rootDir = join(stage, 'derpmesh');
const shipped = ['dist/src', 'native/binding.cjs', 'native/binding.d.cts', 'README.md', 'LICENSE'];
for (const path of shipped) {
  cpSync(join(root, path), join(rootDir, path), { recursive: true, filter: (src) => !src.endsWith('.map') });
}
const { scripts: _scripts, devDependencies: _dev, ...published } = pkg;
writeJson(join(rootDir, 'package.json'), { ...published, files: shipped, optionalDependencies });
tarballs.unshift(npmPack(rootDir));

rmSync(stage, { recursive: true, force: true });
for (const tarball of tarballs) process.stdout.write(relative(process.cwd(), tarball) + '\n');
