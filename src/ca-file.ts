// `--ca-file PEM` of the commands that connect to a node (bench, ping, status): the CA bundle they
// trust besides the public roots.
import { readFileSync } from 'node:fs';

import { configError } from './errors.js';

/** The PEM bundle `file` holds (undefined without the flag); a clear error when it cannot be read or holds no certificate. */
export function readCaFile(file: string | undefined): Buffer | undefined {
  if (file === undefined) return undefined;
  let pem: Buffer;
  try {
    pem = readFileSync(file);
  } catch (err) {
    throw configError(`--ca-file ${JSON.stringify(file)} cannot be read: ${(err as Error).message}`, file);
  }
  if (!pem.includes('-----BEGIN CERTIFICATE-----')) throw configError(`--ca-file ${JSON.stringify(file)} holds no PEM certificate`, file);
  return pem;
}
