import { strict as assert } from 'node:assert';
import { readFileSync } from 'node:fs';
import { describe, test } from 'node:test';

import { loadConfig, optionsMarkdownTable } from '../src/config.js';
import { DerpmeshError } from '../src/errors.js';

const expectCode = (fn: () => unknown, code: string, messagePart: RegExp) => {
  assert.throws(fn, (err: unknown) => {
    assert.ok(err instanceof DerpmeshError, `expected DerpmeshError, got ${String(err)}`);
    assert.equal(err.code, code);
    assert.match(err.message, messagePart);
    return true;
  });
};

describe('configuration', () => {
  test('defaults', () => {
    const c = loadConfig([], {});
    assert.equal(c.listenHost, '127.0.0.1');
    assert.equal(c.listenPort, 3000);
    assert.equal(c.accessUrl.href, 'http://127.0.0.1:3000/');
    assert.equal(c.relayUrl, undefined);
    assert.equal(c.derpServerEnable, true);
    assert.equal(c.heartbeatIntervalMs, 5000);
    assert.equal(c.latencyThresholdMs, 10);
    assert.equal(c.queueDepth, 512);
  });

  test('environment names of docs/ha.md, and flags override them', () => {
    const env = {
      CODER_ADDRESS: '*:8080',
      CODER_ACCESS_URL: 'https://derp.example.com',
      CODER_DERP_SERVER_RELAY_URL: 'http://10.0.0.1:8080',
    };
    const c = loadConfig([], env);
    assert.equal(c.listenHost, '0.0.0.0');
    assert.equal(c.listenPort, 8080);
    assert.equal(c.relayUrl?.href, 'http://10.0.0.1:8080/');
    assert.equal(c.sources.relayUrl, 'CODER_DERP_SERVER_RELAY_URL');
    const f = loadConfig(['--http-address', '127.0.0.1:9000', '--derp-server-relay-url=http://10.0.0.2:9000'], env);
    assert.equal(f.listenPort, 9000);
    assert.equal(f.relayUrl?.host, '10.0.0.2:9000');
    assert.equal(loadConfig([], { CODER_HTTP_ADDRESS: '127.0.0.1:1234' }).listenPort, 1234);
  });

  test('a relay URL equal to the access URL is refused with the reason and the fix', () => {
    expectCode(
      () => loadConfig([], { CODER_ACCESS_URL: 'http://lb.example.com', CODER_DERP_SERVER_RELAY_URL: 'http://LB.example.com:80/' }),
      'DERPMESH_ERR_RELAY_URL_IS_ACCESS_URL',
      /Set CODER_DERP_SERVER_RELAY_URL to this node's own address/,
    );
    // Custom relays: the relay URL is ignored, so the same value is not an error.
    assert.doesNotThrow(() =>
      loadConfig([], { CODER_ACCESS_URL: 'http://lb', CODER_DERP_SERVER_RELAY_URL: 'http://lb', CODER_DERP_SERVER_ENABLE: 'false' }),
    );
  });

  test('bad values name the option, the value and the expected form', () => {
    expectCode(() => loadConfig([], { CODER_DERP_SERVER_RELAY_URL: 'ftp://x' }), 'DERPMESH_ERR_CONFIG', /must use http or https.*ftp/);
    expectCode(
      () => loadConfig([], { CODER_DERP_SERVER_RELAY_URL: 'not a url' }),
      'DERPMESH_ERR_CONFIG',
      /CODER_DERP_SERVER_RELAY_URL must be an http\(s\) URL/,
    );
    expectCode(() => loadConfig([], { CODER_ADDRESS: 'localhost' }), 'DERPMESH_ERR_CONFIG', /host:port/);
    expectCode(() => loadConfig([], { CODER_ADDRESS: '1.2.3.4:99999' }), 'DERPMESH_ERR_CONFIG', /99999/);
    expectCode(() => loadConfig([], { DERPMESH_HEARTBEAT_INTERVAL: 'soon' }), 'DERPMESH_ERR_CONFIG', /duration like 500ms/);
    expectCode(() => loadConfig([], { CODER_DERP_SERVER_ENABLE: 'maybe' }), 'DERPMESH_ERR_CONFIG', /true or false/);
    expectCode(() => loadConfig([], { DERPMESH_QUEUE_DEPTH: '0' }), 'DERPMESH_ERR_CONFIG', /positive integer/);
    expectCode(() => loadConfig([], { DERPMESH_LOG_FORMAT: 'xml' }), 'DERPMESH_ERR_CONFIG', /one of text, json/);
    expectCode(() => loadConfig(['--no-such-flag'], {}), 'DERPMESH_ERR_CONFIG', /unknown option --no-such-flag/);
    expectCode(() => loadConfig(['--http-address'], {}), 'DERPMESH_ERR_CONFIG', /needs a value/);
    expectCode(() => loadConfig([], { CODER_TLS_CERT_FILE: '/x.pem' }), 'DERPMESH_ERR_CONFIG', /go together/);
  });

  test("STUN: the listen host on 3478 by default, an IP address when set, disable; Coder's STUN server list", () => {
    assert.deepEqual(loadConfig([], {}).stun, { host: '127.0.0.1', port: 3478, explicit: false });
    assert.deepEqual(loadConfig(['--http-address', '*:80'], {}).stun, { host: '0.0.0.0', port: 3478, explicit: false });
    assert.deepEqual(loadConfig([], { DERPMESH_STUN_ADDRESS: '[::]:3479' }).stun, { host: '::', port: 3479, explicit: true });
    assert.equal(loadConfig(['--stun-address', 'disable'], {}).stun, undefined);
    expectCode(() => loadConfig(['--stun-address', 'localhost:3478'], {}), 'DERPMESH_ERR_CONFIG', /--stun-address.*IP address and port/);
    expectCode(() => loadConfig(['--stun-address', '3478'], {}), 'DERPMESH_ERR_CONFIG', /DERPMESH_STUN_ADDRESS/);
    // Coder's CODER_DERP_SERVER_STUN_ADDRESSES: other STUN servers to announce, or disable for none at all.
    const coder = loadConfig([], { CODER_DERP_SERVER_STUN_ADDRESSES: 'stun.example.com:3478, 192.0.2.1:19302' });
    assert.deepEqual(coder.stunServers, [
      { host: 'stun.example.com', port: 3478 },
      { host: '192.0.2.1', port: 19302 },
    ]);
    const off = loadConfig([], { CODER_DERP_SERVER_STUN_ADDRESSES: 'disable', DERPMESH_STUN_ADDRESS: '127.0.0.1:3478' });
    assert.equal(off.stun, undefined);
    assert.deepEqual(off.stunServers, []);
    expectCode(() => loadConfig([], { CODER_DERP_SERVER_STUN_ADDRESSES: 'stun.example.com' }), 'DERPMESH_ERR_CONFIG', /must be host:port/);
  });

  test('--tls-self-signed: host names or IP addresses, not with a certificate file', () => {
    assert.deepEqual(loadConfig(['--tls-self-signed', '203.0.113.7, derp.example.com'], {}).tlsSelfSigned, [
      '203.0.113.7',
      'derp.example.com',
    ]);
    expectCode(
      () => loadConfig(['--tls-self-signed', 'not a host'], {}),
      'DERPMESH_ERR_CONFIG',
      /--tls-self-signed.*host names or IP addresses.*"not a host"/,
    );
    expectCode(() => loadConfig(['--tls-self-signed', ','], {}), 'DERPMESH_ERR_CONFIG', /host names or IP addresses/);
    expectCode(
      () => loadConfig(['--tls-self-signed', 'a.example', '--tls-cert-file', 'c.pem', '--tls-key-file', 'k.pem'], {}),
      'DERPMESH_ERR_CONFIG',
      /exclude each other/,
    );
  });

  test('the README configuration table is generated from the declarations', () => {
    const readme = readFileSync(new URL('../../README.md', import.meta.url), 'utf8');
    assert.ok(
      readme.includes(optionsMarkdownTable()),
      'README table is stale: run `node scripts/sync-readme.mjs` after `npm run build:ts`',
    );
  });
});
