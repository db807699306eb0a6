// The DERP map a node serves at /derpmap: the custom map when one is configured (custom relays
// mode), else one region per region id found among the live replicas in Postgres, each region's
// node(s) being the access URL(s) its replicas announce. The shape is Tailscale's tailcfg.DERPMap.
import { readFileSync } from 'node:fs';

import type { ServerConfig } from './config.js';
import { configError } from './errors.js';
import type { Replica } from './replicas/replica.js';

/** One node of a region in tailcfg.DERPMap. */
export interface DerpNode {
  Name: string;
  RegionID: number;
  HostName: string;
  DERPPort?: number;
  /** -1: no STUN; 0: the default 3478. */
  STUNPort?: number;
  STUNOnly?: boolean;
  ForceHTTP?: boolean;
}

export interface DerpRegion {
  RegionID: number;
  RegionCode: string;
  RegionName: string;
  Nodes: DerpNode[];
}

export interface DerpMap {
  Regions: Record<number, DerpRegion>;
}

/** What the map is computed from on every request: the registry's view of the replicas. */
export interface ReplicaSource {
  readonly self: { id: string };
  replicas(): Replica[];
  isStale(r: Replica): boolean;
}

/** The custom map (CODER_DERP_CONFIG_PATH or _URL), loaded once; undefined when none is configured. */
export async function loadCustomDerpMap(config: ServerConfig): Promise<unknown> {
  if (config.derpConfigPath) {
    try {
      return JSON.parse(readFileSync(config.derpConfigPath, 'utf8'));
    } catch (err) {
      throw configError(
        `CODER_DERP_CONFIG_PATH ${config.derpConfigPath} must be a readable JSON relay map: ${(err as Error).message}`,
        config.derpConfigPath,
      );
    }
  }
  if (config.derpConfigUrl) {
    const res = await fetch(config.derpConfigUrl, { signal: AbortSignal.timeout(10_000) });
    if (!res.ok)
      throw configError(`CODER_DERP_CONFIG_URL answered ${res.status}; it must serve the relay map as JSON`, config.derpConfigUrl.href);
    return res.json();
  }
  return undefined;
}

/**
 * The function /derpmap answers with. A custom map is loaded here, once, and served as it is;
 * otherwise the map is computed on every call from `replicas` (this node's region always included,
 * from its own configuration, so it is complete before the first registry sync).
 * `stunPort`: where this node answers STUN; -1 (the map's "none") when it does not.
 */
export async function derpMapSource(config: ServerConfig, stunPort = -1, replicas?: ReplicaSource): Promise<() => unknown> {
  const custom = await loadCustomDerpMap(config);
  if (custom !== undefined) return () => custom;
  return () => buildDerpMap(config, stunPort, replicas);
}

/** The single-region map of earlier versions (this node's region only), or the custom map. */
export async function loadDerpMap(config: ServerConfig, stunPort = -1): Promise<unknown> {
  return (await derpMapSource(config, stunPort))();
}

interface Announced {
  regionId: number;
  accessUrl: string;
  stunPort: number;
}

export function buildDerpMap(config: ServerConfig, stunPort: number, source?: ReplicaSource): DerpMap {
  const announced: Announced[] = [];
  if (config.derpServerEnable) {
    announced.push({ regionId: config.regionId, accessUrl: config.accessUrl.href, stunPort });
    for (const r of source?.replicas() ?? []) {
      // Heartbeating replicas only: not the registry's grace for stale rows right after a start
      // (a region whose replicas are all dead must not reach clients' maps).
      if (r.id === source!.self.id || r.accessUrl === '' || r.stoppedAt !== null || source!.isStale(r)) continue;
      announced.push({ regionId: r.regionId, accessUrl: r.accessUrl, stunPort: r.stunPort });
    }
  }
  const byRegion = new Map<number, Map<string, Announced>>();
  for (const a of announced) {
    let urls = byRegion.get(a.regionId);
    if (!urls) byRegion.set(a.regionId, (urls = new Map()));
    const key = urlKey(a.accessUrl);
    // Several replicas of a region behind one access URL are one node of the map; the first
    // (this node, then the oldest replica) says its STUN port.
    if (key !== undefined && !urls.has(key)) urls.set(key, a);
  }
  const regions: Record<number, DerpRegion> = {};
  // Coder's CODER_DERP_SERVER_STUN_ADDRESSES: each other STUN server is a STUN-only region of its
  // own, numbered after the highest relay region id (this node's region + 1, ... with one region).
  const stunBase = Math.max(config.regionId, ...byRegion.keys());
  config.stunServers.forEach(({ host, port }, i) => {
    const regionId = stunBase + i + 1;
    regions[regionId] = {
      RegionID: regionId,
      RegionCode: `derpmesh-stun-${i}`,
      RegionName: `STUN ${host}`,
      Nodes: [{ Name: `${regionId}stun0`, RegionID: regionId, HostName: host, STUNOnly: true, STUNPort: port }],
    };
  });
  for (const regionId of [...byRegion.keys()].sort((a, b) => a - b)) {
    // The same order on every node: by access URL.
    const nodes = [...byRegion.get(regionId)!.entries()].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)).map(([, a]) => a);
    regions[regionId] = {
      RegionID: regionId,
      RegionCode: `derpmesh-${regionId}`,
      RegionName: `derpmesh region ${regionId}`,
      Nodes: nodes.map((a, i) => {
        const url = new URL(a.accessUrl);
        const https = url.protocol === 'https:';
        return {
          Name: `${regionId}${nodeLetter(i)}`,
          RegionID: regionId,
          HostName: url.hostname.replace(/^\[(.*)\]$/, '$1'),
          DERPPort: Number(url.port || (https ? 443 : 80)),
          STUNPort: a.stunPort,
          ForceHTTP: !https,
        };
      }),
    };
  }
  return { Regions: regions };
}

/** Scheme, host and port: what a DERP client dials (a path on the access URL does not matter to it). */
function urlKey(text: string): string | undefined {
  try {
    const url = new URL(text);
    return `${url.protocol}//${url.host}`;
  } catch {
    return undefined;
  }
}

/** a, b, ..., z, then 26, 27, ... (Tailscale names a region's nodes "1a", "1b", ...). */
function nodeLetter(i: number): string {
  return i < 26 ? String.fromCharCode(97 + i) : String(i);
}
