// The DERP map a node serves at /derpmap: the custom map when one is configured (custom relays
// mode), else one region whose only node is this cluster's access URL.
import { readFileSync } from 'node:fs';

import type { ServerConfig } from './config.js';
import { configError } from './errors.js';

export async function loadDerpMap(config: ServerConfig): Promise<unknown> {
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
  if (!config.derpServerEnable) return { Regions: {} };
  const access = config.accessUrl;
  const https = access.protocol === 'https:';
  return {
    Regions: {
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
            STUNPort: -1,
            ForceHTTP: !https,
          },
        ],
      },
    },
  };
}
