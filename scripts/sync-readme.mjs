// Regenerates the README's generated tables: configuration (the option declarations of
// src/config.ts) and metrics (the metric definitions of src/metrics.ts, and prom-client's default
// process metrics). test/config.test.ts and test/metrics.test.ts fail when the README differs.
import { readFileSync, writeFileSync } from 'node:fs';
import { optionsMarkdownTable } from '../dist/src/config.js';
import { defaultMetricDefinitions, metricsMarkdownTable } from '../dist/src/metrics.js';

const path = new URL('../README.md', import.meta.url);
const readme = readFileSync(path, 'utf8');
if (!readme.includes('<!-- metrics-table:start -->')) {
  throw new Error('README.md has no <!-- metrics-table:start --> / <!-- metrics-table:end --> markers: add them where the table goes');
}
const updated = readme
  .replace(
    /<!-- config-table:start -->[\s\S]*?<!-- config-table:end -->/,
    `<!-- config-table:start -->\n${optionsMarkdownTable()}\n<!-- config-table:end -->`,
  )
  .replace(
    /<!-- metrics-table:start -->[\s\S]*?<!-- metrics-table:end -->/,
    `<!-- metrics-table:start -->\n${metricsMarkdownTable(await defaultMetricDefinitions())}\n<!-- metrics-table:end -->`,
  );
writeFileSync(path, updated);
