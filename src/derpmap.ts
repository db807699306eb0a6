// The DERP map a node serves at /derpmap: the custom map when one is configured (custom relays
// mode), else one region whose only node is this cluster's access URL.
import { readFileSync } from 'node:fs';

import type { ServerConfig } from './config.js';
import { configError } from './errors.js';

/** `stunPort`: where this node answers STUN; -1 (the map's "none") when it does not. */
export async function loadDerpMap(config: ServerConfig, stunPort = -1): Promise<unknown> {
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
  const regions: Record<number, unknown> = {};
  // Coder's CODER_DERP_SERVER_STUN_ADDRESSES: each other STUN server is a STUN-only region of its
  // own, numbered after the relay's region.
  config.stunServers.forEach(({ host, port }, i) => {
    const regionId = config.regionId + i + 1;
    regions[regionId] = {
      RegionID: regionId,
      RegionCode: `derpmesh-stun-${i}`,
      RegionName: `STUN ${host}`,
      Nodes: [{ Name: `${regionId}stun0`, RegionID: regionId, HostName: host, STUNOnly: true, STUNPort: port }],
    };
  });
  if (!config.derpServerEnable) return { Regions: regions };
  const access = config.accessUrl;
  const https = access.protocol === 'https:';
  return {
    Regions: {
      ...regions,
      [config.regionId]: {
        RegionID: config.regionId,
        RegionCode: 'derpmesh',
        RegionName: 'derpmesh embedded relay',
        Nodes: [
          {
            Name: `${config.regionId}a`,
            RegionID: config.regionId,
            HostName: access.hostname,
            DERPPort: Number(access.port || (https ? 443 : 80)),
            STUNPort: stunPort,
            ForceHTTP: !https,
          },
        ],
      },
    },
  };
}
