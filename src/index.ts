// The library API: embed a relay in your own Node server, run a node, speak DERP as a client.
export { Relay, type RelayOptions, type ShutdownOptions, type AdmissionOptions, type AdmissionEvent } from './relay.js';
export { startHttpServer, type HttpServer, type HttpServerOptions } from './http/server.js';
export { startNode, type DerpmeshNode } from './node.js';
export { loadConfig, options as configOptions, type ServerConfig } from './config.js';
export { DerpmeshError, type DerpmeshErrorCode } from './errors.js';
export { createLogger, type Logger } from './log.js';
export { runLoad, type LoadOptions, type LoadReport } from './bench.js';
export { version } from './version.js';
export * from './client/index.js';
export { ReplicaRegistry, type PeerLatency } from './replicas/registry.js';
export type { Replica } from './replicas/replica.js';
export type { HealthReport, HealthSection, HealthCode, Severity } from './health.js';
