// Shipping: the packed tarballs install like any napi-rs package — prebuilt binary, no Rust
// toolchain, no install scripts — and the installed `derpmesh` runs a relay. Without the platform
// package, it fails with a message that says what is missing and what to do.
import { strict as assert } from 'node:assert';
import { execFileSync, spawnSync } from 'node:child_process';
import { once } from 'node:events';
import {
  accessSync,
  chmodSync,
  constants,
  copyFileSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  rmSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { delimiter, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { after, before, describe, test } from 'node:test';

import { DerpClient } from '../src/client/index.js';
import { detectPlatform, prebuiltPlatforms } from '../src/native.js';
import { checkEmbedExample } from './helpers/embed-example.js';
import { embeddedPostmasterPid, startServerProcess } from './helpers/server-process.js';
import { exchangeOnce } from './helpers/traffic.js';

const repo = fileURLToPath(new URL('../../', import.meta.url));
const repoPackage = JSON.parse(readFileSync(join(repo, 'package.json'), 'utf8')) as { version: string; napi: { targets: string[] } };
const version = repoPackage.version;
// napi-rs names: the platform this test runs on (Linux x64 with glibc here).
const platform =
  process.platform === 'linux'
    ? `linux-${process.arch}-${(process.report.getReport() as { header: { glibcVersionRuntime?: string } }).header.glibcVersionRuntime ? 'gnu' : 'musl'}`
    : `${process.platform}-${process.arch}${process.platform === 'win32' ? '-msvc' : ''}`;
const platformPackage = `derpmesh-${platform}`;

/** The environment of a user without Rust: PATH lacks every directory holding cargo or rustc. */
function userEnv(): NodeJS.ProcessEnv {
  const hasRust = (dir: string) =>
    ['cargo', 'rustc'].some((tool) => {
      try {
        accessSync(join(dir, tool), constants.X_OK);
        return true;
      } catch {
        return false;
      }
    });
  const env: NodeJS.ProcessEnv = {};
  // npm_* variables of the `npm test` around us would steer the user's npm; a user has none.
  for (const [k, v] of Object.entries(process.env)) if (!/^npm_/i.test(k)) env[k] = v;
  env.PATH = (process.env.PATH ?? '')
    .split(delimiter)
    .filter((dir) => dir && !hasRust(dir))
    .join(delimiter);
  return env;
}

const installScript = join(repo, 'scripts/install-packed.sh');

/** The install step of deploy/Dockerfile, run as a user without Rust. */
function install(dir: string, tarballs: string[]): void {
  const r = spawnSync('bash', [installScript, dir, ...tarballs], { env: userEnv(), encoding: 'utf8', timeout: 300_000 });
  assert.equal(r.status, 0, `npm install failed:\n${r.stdout}\n${r.stderr}`);
}

test('the loader knows every declared platform package, and detects this one', () => {
  assert.deepEqual([...prebuiltPlatforms].sort(), readdirSync(join(repo, 'npm')).sort());
  assert.equal(detectPlatform(), platform);
});

test('deploy/Dockerfile builds and installs with the steps this suite runs, and runs as non-root', () => {
  const dockerfile = readFileSync(join(repo, 'deploy/Dockerfile'), 'utf8').replace(/\\\n\s*/g, ' ');
  const runs = [...dockerfile.matchAll(/^RUN (?:--mount=\S+\s+)*(.+)$/gm)].map((m) => m[1]!.trim());
  // Provisioning the build machine and the runtime user is Docker's own business; every other step
  // is one of the commands CI and this test run: .ci/run, scripts/test.sh, then pack and install.
  const provisioning = [/^curl .*sh\.rustup\.rs/, /^groupadd /];
  const tested = [
    'npm ci --no-audit --no-fund',
    'npm run build',
    'node scripts/pack.mjs --out /pack',
    'install-packed.sh /opt/derpmesh /pack/*.tgz',
  ];
  assert.deepEqual(
    runs.filter((r) => !provisioning.some((p) => p.test(r))),
    tested,
  );
  assert.ok(readFileSync(join(repo, '.ci/run'), 'utf8').includes(tested[0]!));
  assert.ok(readFileSync(join(repo, 'scripts/test.sh'), 'utf8').includes(tested[1]!));
  assert.match(dockerfile, /^COPY scripts\/install-packed\.sh \/usr\/local\/bin\/install-packed\.sh$/m);
  const users = [...dockerfile.matchAll(/^USER (\S+)$/gm)].map((m) => m[1]);
  assert.ok(users.length > 0 && !/^(0|root)(:|$)/.test(users.at(-1)!), `final USER is non-root: ${users.join(', ')}`);
  assert.match(dockerfile, /^ENTRYPOINT \["derpmesh"\]\nCMD \["server"\]$/m);
  const stages = [...dockerfile.matchAll(/^FROM (\S+)/gm)].map((m) => m[1]);
  assert.equal(stages.length, 2, 'build stage and runtime stage');
  assert.match(stages[1]!, /^node:/, 'the runtime stage is plain Node: no Rust toolchain');
});

describe('installing the packed tarballs without a Rust toolchain', () => {
  const work = mkdtempSync(join(tmpdir(), 'derpmesh-install-'));
  chmodSync(work, 0o755);
  let rootTarball = '';
  let platformTarball = '';

  before(() => {
    // The same step as `npm run pack` after its build (the test command has built already).
    const out = execFileSync(process.execPath, [join(repo, 'scripts/pack.mjs'), '--out', join(work, 'pack')], {
      encoding: 'utf8',
      timeout: 300_000,
    });
    const tarballs = out.trim().split('\n');
    rootTarball = join(
      process.cwd(),
      tarballs.find((t) => t.endsWith(`derpmesh-${version}.tgz`))!,
    );
    platformTarball = join(
      process.cwd(),
      tarballs.find((t) => t.endsWith(`${platformPackage}-${version}.tgz`))!,
    );
    assert.ok(existsSync(rootTarball) && existsSync(platformTarball), out);
  });
  after(() => rmSync(work, { recursive: true, force: true }));

  test('the user environment has no cargo or rustc', () => {
    const r = spawnSync('sh', ['-c', 'command -v cargo || command -v rustc'], { env: userEnv(), encoding: 'utf8' });
    assert.notEqual(r.status, 0, `found: ${r.stdout}`);
  });

  test('the root package ships the loader, compiled TypeScript and types; the platform package one binary', () => {
    const list = (tarball: string) => execFileSync('tar', ['tzf', tarball], { encoding: 'utf8' }).trim().split('\n');
    const root = list(rootTarball);
    assert.ok(
      root.includes('package/native/binding.cjs') &&
        root.includes('package/dist/src/index.d.ts') &&
        root.includes('package/dist/src/cli.js'),
    );
    const unexpected = root.filter(
      (f) => !/^package\/(dist\/src\/.+\.(js|d\.ts)|native\/binding\.(cjs|d\.cts)|package\.json|README\.md|LICENSE)$/.test(f),
    );
    assert.deepEqual(unexpected, [], 'nothing but the loader, compiled TypeScript, types and docs');
    assert.deepEqual(list(platformTarball).sort(), [
      `package/LICENSE`,
      `package/README.md`,
      `package/derpmesh.${platform}.node`,
      'package/package.json',
    ]);
  });

  describe('root and platform package', () => {
    const app = join(work, 'app');
    before(() => install(app, [rootTarball, platformTarball]));

    test('the root package pins every declared platform package and has no scripts', () => {
      const pkg = JSON.parse(readFileSync(join(app, 'node_modules/derpmesh/package.json'), 'utf8')) as {
        scripts?: unknown;
        optionalDependencies: Record<string, string>;
      };
      assert.equal(pkg.scripts, undefined);
      const platforms = readdirSync(join(repo, 'npm')).sort();
      assert.equal(platforms.length, repoPackage.napi.targets.length);
      assert.deepEqual(pkg.optionalDependencies, Object.fromEntries(platforms.map((p) => [`derpmesh-${p}`, version])));
      const installed = JSON.parse(readFileSync(join(app, `node_modules/${platformPackage}/package.json`), 'utf8')) as {
        os: string[];
        cpu: string[];
      };
      assert.deepEqual([installed.os, installed.cpu], [[process.platform], [process.arch]]);
    });

    test('npx derpmesh --version', () => {
      const out = execFileSync('npx', ['--no-install', 'derpmesh', '--version'], { cwd: app, env: userEnv(), encoding: 'utf8' });
      assert.equal(out.trim(), version);
    });

    test('derpmesh server from the install relays packets between two clients', { timeout: 120_000 }, async () => {
      const server = startServerProcess(
        [join(app, 'node_modules/.bin/derpmesh')],
        ['--http-address', '127.0.0.1:0', '--shutdown-grace', '1s'],
        userEnv(),
        90_000,
      );
      try {
        const url = await server.url;
        // Installed with --ignore-scripts: the embedded Postgres' library links were made by derpmesh.
        assert.match(server.output(), /linked the embedded Postgres shared libraries/);
        const a = await DerpClient.connect({ url });
        const b = await DerpClient.connect({ url });
        await exchangeOnce(a, b);
        await Promise.all([a.close(), b.close()]);
        const exited = once(server.child, 'exit');
        server.child.kill('SIGTERM');
        const [code] = (await exited) as [number];
        assert.equal(code, 0, server.output());
      } finally {
        if (server.child.exitCode === null) server.child.kill('SIGKILL');
      }
    });

    test('examples/embed runs against the installed package', { timeout: 60_000 }, async () => {
      const script = join(app, 'embed.js');
      copyFileSync(join(repo, 'dist/examples/embed.js'), script);
      await checkEmbedExample(script, { cwd: app, env: userEnv() });
    });
  });

  describe('installed as root in a mode-700 directory (issue 14: Postgres runs as its own user, which cannot enter it)', () => {
    const skip = process.getuid?.() === 0 ? false : 'needs root';
    if (skip) console.log('# SKIP installed as root in a mode-700 directory: not running as root');
    const privateDir = join(work, 'private');
    const app = join(privateDir, 'app');
    before(() => {
      if (skip) return;
      mkdirSync(privateDir, { mode: 0o700 });
      chmodSync(privateDir, 0o700);
      install(app, [rootTarball, platformTarball]);
    });

    test(
      'derpmesh server runs the embedded Postgres from a copy in the state directory and relays',
      { skip, timeout: 120_000 },
      async () => {
        const server = startServerProcess(
          [join(app, 'node_modules/.bin/derpmesh')],
          ['--http-address', '127.0.0.1:0', '--shutdown-grace', '1s'],
          userEnv(),
          90_000,
        );
        try {
          const url = await server.url;
          const postmaster = embeddedPostmasterPid(server.stateDir);
          assert.ok(postmaster, server.output());
          const binary = readlinkSync(`/proc/${postmaster}/exe`);
          assert.ok(binary.startsWith(join(server.stateDir, 'postgres', 'binaries')), `the postmaster runs ${binary}`);
          const a = await DerpClient.connect({ url });
          const b = await DerpClient.connect({ url });
          await exchangeOnce(a, b);
          await Promise.all([a.close(), b.close()]);
          const exited = once(server.child, 'exit');
          server.child.kill('SIGTERM');
          const [code] = (await exited) as [number];
          assert.equal(code, 0, server.output());
          assert.doesNotMatch(server.output(), /Unhandled 'error' event|EACCES/);
        } finally {
          if (server.child.exitCode === null) server.child.kill('SIGKILL');
        }
      },
    );
  });

  describe('root package without the platform package', () => {
    const app = join(work, 'app-without-binary');
    before(() => install(app, [rootTarball]));

    test(`${platformPackage} is absent (not published, so npm skipped the optional dependency)`, () => {
      assert.ok(!existsSync(join(app, 'node_modules', platformPackage)));
      assert.ok(existsSync(join(app, 'node_modules/derpmesh/package.json')));
    });

    test('derpmesh --version still answers', () => {
      const out = execFileSync(join(app, 'node_modules/.bin/derpmesh'), ['--version'], { env: userEnv(), encoding: 'utf8' });
      assert.equal(out.trim(), version);
    });

    const expectClearFailure = (text: string) => {
      assert.match(text, /the native relay addon could not be loaded/);
      assert.ok(text.includes(`detected platform: ${platform}`), text);
      assert.ok(text.includes(`expected package:  ${platformPackage}`), text);
      assert.ok(text.includes(`npm install ${platformPackage}@${version}`), text);
      assert.match(text, /build from source: install Rust \(https:\/\/rustup\.rs\)/);
      assert.doesNotMatch(text, /^\s+at /m, 'no stack trace');
    };

    test('derpmesh server fails with the platform, the expected package and how to build from source', { timeout: 30_000 }, () => {
      const r = spawnSync(join(app, 'node_modules/.bin/derpmesh'), ['server', '--http-address', '127.0.0.1:0'], {
        env: userEnv(),
        encoding: 'utf8',
        timeout: 20_000,
      });
      assert.equal(r.status, 1, r.stderr);
      assert.match(r.stderr, /\[DERPMESH_ERR_NATIVE_BINDING\]/);
      expectClearFailure(r.stderr);
    });

    test("import('derpmesh') throws the same error, with its code", () => {
      const r = spawnSync(
        process.execPath,
        [
          '--input-type=module',
          '-e',
          "try { await import('derpmesh') } catch (e) { console.log(JSON.stringify({ code: e.code, message: e.message })) }",
        ],
        { cwd: app, env: userEnv(), encoding: 'utf8' },
      );
      const { code, message } = JSON.parse(r.stdout) as { code: string; message: string };
      assert.equal(code, 'DERPMESH_ERR_NATIVE_BINDING');
      expectClearFailure(message);
    });
  });
});
