// Advisory lock ids, all in one place so two features never share one by accident. Lock ids are scoped to
// the database, so every derpmesh node on the same database contends for the same lock.

/** Held (transaction-scoped) while checking and applying schema migrations. ASCII "derp" + 1. */
export const migrationLockId = 0x64657270_01;

/** Held (transaction-scoped) while reading or creating the mesh key. ASCII "derp" + 2. */
export const meshKeyLockId = 0x64657270_02;
