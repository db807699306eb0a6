// The mesh key: generated once by whichever node gets there first, then read by every node, so all relays
// in the cluster accept each other's mesh links. Never logged.
import { randomBytes } from 'node:crypto';
import type pg from 'pg';
import { DerpmeshError } from '../errors.js';
import { meshKeyLockId } from './locks.js';

/** 32 random bytes as 64 lowercase hex characters. */
const meshKeyPattern = /^[0-9a-f]{64}$/;
const meshKeyConfigKey = 'mesh_key';

export async function getOrCreateMeshKey(pool: pg.Pool): Promise<string> {
  const client = await pool.connect();
  try {
    await client.query('BEGIN');
    await client.query('SELECT pg_advisory_xact_lock($1)', [meshKeyLockId]);
    // ON CONFLICT too, so a node without the lock (an older version) cannot make us fail.
    await client.query('INSERT INTO site_config (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING', [
      meshKeyConfigKey,
      randomBytes(32).toString('hex'),
    ]);
    const result = await client.query<{ value: string }>('SELECT value FROM site_config WHERE key = $1', [meshKeyConfigKey]);
    await client.query('COMMIT');
    const meshKey = result.rows[0]?.value ?? '';
    if (!meshKeyPattern.test(meshKey)) {
      throw new DerpmeshError(
        'DERPMESH_ERR_POSTGRES_DATA',
        `site_config.mesh_key is not 64 hex characters (length ${meshKey.length}); delete the row to have a new key generated, then restart every node`,
      );
    }
    return meshKey;
  } catch (error) {
    await client.query('ROLLBACK').catch(() => {});
    throw error;
  } finally {
    client.release();
  }
}
