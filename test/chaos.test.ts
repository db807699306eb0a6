// Short versions of the chaos scenarios (bench/chaos.ts, issue 12): a real 3-node cluster on a real
// Postgres behind the access URL's balancer, 30 reconnecting clients exchanging sequence-numbered
// packets, one fault each, every packet accounted for. kill -9, the graceful stop and the reconnect
// storm run again over TLS (a private CA's certificates, https through the balancer).
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import { NetnsLab } from '../bench/chaos/netns.js';
import { runScenario, type ScenarioOptions, type ScenarioReport } from '../bench/chaos/scenarios.js';
import { hasOpenssl } from './helpers/certs.js';

const HEARTBEAT_MS = 500;
const short: ScenarioOptions = {
  clients: 30,
  rate: 20,
  heartbeatMs: HEARTBEAT_MS,
  warmupMs: 2_000,
  afterMs: 3_000,
  pgDownMs: 4_000,
  frozenMs: 4_000,
  faultMs: 4_000,
};
/** Why the namespace scenarios cannot run here (they need root and iproute2), if they cannot. */
const noNetns = NetnsLab.unavailable();
/** The TLS variants make their private CA with the openssl command. */
const noOpenssl = hasOpenssl() ? false : "needs the openssl command (the cluster's private CA)";

function describeReport(r: ScenarioReport): string {
  return JSON.stringify({ unaffected: r.unaffected, affected: r.affected, heal: r.heal, measures: r.measures, notes: r.notes });
}

/** Flows between clients of nodes that did not fail delivered every packet, once and in order. */
function assertUnaffectedIntact(r: ScenarioReport): void {
  assert.ok(r.unaffected.flows > 0, `no flow avoided the failed node: ${describeReport(r)}`);
  assert.ok(r.unaffected.sent > r.unaffected.flows * 20, `too few packets sent: ${describeReport(r)}`);
  assert.equal(r.unaffected.lost, 0, `unaffected flows lost packets: ${describeReport(r)}`);
  assert.equal(r.unaffected.duplicated, 0, `unaffected flows got duplicates: ${describeReport(r)}`);
  assert.equal(r.unaffected.reordered, 0, `unaffected flows got packets out of order: ${describeReport(r)}`);
}

// The node faults, run plain and over TLS (`extra`) with the same short options and assertions.

async function kill9(extra: ScenarioOptions): Promise<void> {
  const r = await runScenario('kill9', { ...short, ...extra });
  assert.equal(r.tls, extra.tls ?? false);
  assertUnaffectedIntact(r);
  assert.ok(r.affected.flows > 0, 'no client was on the killed node');
  assert.equal(r.heal.neverHealed, 0, `some clients of the killed node never delivered again: ${describeReport(r)}`);
  assert.ok(r.heal.p99 <= 3_000, `heal p99 ${r.heal.p99} ms: ${describeReport(r)}`);
  assert.equal(r.placementAfter.at(-1), 0, 'clients still counted on the killed node');
  assert.equal(
    r.placementAfter.reduce((a, b) => a + b, 0),
    30,
    `not every client is connected again: ${r.placementAfter.join('/')}`,
  );
}

async function gracefulStop(extra: ScenarioOptions): Promise<void> {
  const r = await runScenario('sigterm', { ...short, ...extra });
  assert.equal(r.tls, extra.tls ?? false);
  assertUnaffectedIntact(r);
  assert.equal(r.heal.neverHealed, 0, `some clients of the stopped node never delivered again: ${describeReport(r)}`);
  assert.ok(r.heal.p99 <= 1_000, `heal p99 ${r.heal.p99} ms: ${describeReport(r)}`);
  assert.match(r.replicasAfter, /node-2=stopped/);
}

async function storm(extra: ScenarioOptions): Promise<void> {
  // The clients run in two worker processes (each its own cycle of flows), as the 10 000-client
  // benchmark runs them: the counts below are the two groups' added up.
  const r = await runScenario('storm', { ...short, clients: 500, rate: 2, clientProcesses: 2, ...extra });
  assert.equal(r.tls, extra.tls ?? false);
  assert.equal(r.flows, 500);
  assert.equal(r.placementBefore.at(-1), 500, `not every client started on the victim: ${r.placementBefore.join('/')}`);
  assert.equal(r.heal.neverHealed, 0, describeReport(r));
  assert.ok(r.measures.deliveringMs! <= 10_000, `every flow delivering again after ${r.measures.deliveringMs} ms`);
  assert.equal(r.placementAfter.at(-1), 0);
  assert.equal(
    r.placementAfter.reduce((a, b) => a + b, 0),
    500,
  );
}

describe('chaos (3 node processes, 30 clients through the access URL)', { timeout: 240_000 }, () => {
  test('kill -9 of a node: no loss elsewhere, its clients deliver again within 3 s', () => kill9({}));

  test('graceful stop: no loss elsewhere, its clients deliver again within 1 s', () => gracefulStop({}));

  test('Postgres stopped, then back: no packet lost anywhere, discovery back within 2 s', async () => {
    const r = await runScenario('pg-stop', short);
    assert.equal(r.affected.flows, 0);
    assertUnaffectedIntact(r);
    assert.ok(r.measures.meshedMs! <= 2_000, `discovery resumed after ${r.measures.meshedMs} ms`);
  });

  test('Postgres restarted: no packet lost anywhere, discovery back within 2 s', async () => {
    const r = await runScenario('pg-restart', short);
    assertUnaffectedIntact(r);
    assert.ok(r.measures.meshedMs! <= 2_000, `discovery resumed after ${r.measures.meshedMs} ms`);
  });

  test('a frozen node (SIGSTOP): stale within 3 heartbeats, no loss elsewhere, rejoins after SIGCONT', async () => {
    const r = await runScenario('sigstop', short);
    assertUnaffectedIntact(r);
    // Measured from SIGSTOP, sampled every 100 ms: its last heartbeat was at most one interval earlier.
    assert.ok(r.measures.staleMs !== undefined && r.measures.staleMs <= 3 * HEARTBEAT_MS + 250, `stale after ${r.measures.staleMs} ms`);
    assert.ok(r.measures.meshedMs! <= 5_000, `live again ${r.measures.meshedMs} ms after SIGCONT`);
    // Its clients kept their connections through the freeze and deliver again.
    assert.equal(r.heal.neverHealed, 0, describeReport(r));
  });

  test('reconnect storm (500 clients in 2 client processes, all on one node, kill -9): all connected and delivering again within 10 s', () =>
    storm({}));

  test('a node cut off from its peers: no loss between the others, meshed again once healed', { skip: noNetns }, async () => {
    const r = await runScenario('partition', short);
    assertUnaffectedIntact(r);
    // Its clients could not reach the others' while the cut lasted, and can again. A cut this short
    // may lose nothing: the mesh connections outlive it and TCP delivers what it held back once the
    // routes return (late, not lost). Either way the cut-off node's flows were held up.
    assert.ok(
      r.affected.lost > 0 || r.heal.max >= 1_000,
      `the partition neither cost the cut-off node's flows packets nor held them up: ${describeReport(r)}`,
    );
    assert.equal(r.heal.neverHealed, 0, describeReport(r));
    assert.ok(r.measures.meshedMs! <= 5_000, `meshed again ${r.measures.meshedMs} ms after healing`);
  });

  test("one node's links degraded: no loss between the others, its flows deliver", { skip: noNetns }, async () => {
    const r = await runScenario('slow-link', short);
    assertUnaffectedIntact(r);
    assert.ok(r.affected.sent > 0 && r.affected.lost < r.affected.sent / 2, describeReport(r));
    assert.equal(r.heal.neverHealed, 0, describeReport(r));
  });
});

// The production path: every relay serving HTTPS with a private CA's certificate for 127.0.0.1, the
// access URL's balancer passing TLS through, every client verifying against the CA.
describe('chaos over TLS (the same faults, same clients, through https://)', { timeout: 240_000, skip: noOpenssl }, () => {
  test('kill -9 of a node over TLS: no loss elsewhere, its clients deliver again within 3 s', () => kill9({ tls: true }));

  test('graceful stop over TLS: no loss elsewhere, its clients deliver again within 1 s', () => gracefulStop({ tls: true }));

  test('reconnect storm over TLS (500 clients in 2 client processes, all on one node, kill -9): all delivering again within 10 s', () =>
    storm({ tls: true }));
});
