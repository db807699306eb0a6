// Health report: one section per subsystem, each with a severity and a short stable code.
export type Severity = 'ok' | 'warning' | 'error';

export type HealthCode =
  | 'DB_OK'
  | 'DB_UNREACHABLE'
  | 'DB_SLOW'
  | 'RELAY_OK'
  | 'RELAY_DISABLED'
  | 'RELAY_NO_RELAY_URL'
  | 'MESH_OK'
  | 'MESH_DISABLED'
  | 'MESH_PEER_UNREACHABLE'
  | 'MESH_PEER_SLOW'
  | 'MESH_LINK_DOWN'
  | 'MESH_VERSION_MISMATCH'
  | 'PUBSUB_OK'
  | 'PUBSUB_DISCONNECTED';

export interface HealthSection {
  severity: Severity;
  code: HealthCode;
  message: string;
}

export interface HealthReport {
  replicaId: string;
  hostname: string;
  severity: Severity;
  generatedAt: string;
  sections: { database: HealthSection; relay: HealthSection; mesh: HealthSection; pubsub: HealthSection };
}

const rank: Record<Severity, number> = { ok: 0, warning: 1, error: 2 };

export function worst(severities: Severity[]): Severity {
  return severities.reduce<Severity>((a, b) => (rank[b] > rank[a] ? b : a), 'ok');
}

export function section(severity: Severity, code: HealthCode, message: string): HealthSection {
  return { severity, code, message };
}

/** The most severe of several findings for one section; `fallback` when there are none. */
export function mostSevere(findings: HealthSection[], fallback: HealthSection): HealthSection {
  let best = fallback;
  for (const f of findings) if (rank[f.severity] > rank[best.severity]) best = f;
  return best;
}
