// Regenerates the README's configuration table from the option declarations (src/config.ts).
import { readFileSync, writeFileSync } from 'node:fs';
import { optionsMarkdownTable } from '../dist/src/config.js';

const path = new URL('../README.md', import.meta.url);
const readme = readFileSync(path, 'utf8');
const updated = readme.replace(
  /<!-- config-table:start -->[\s\S]*?<!-- config-table:end -->/,
  `<!-- config-table:start -->\n${optionsMarkdownTable()}\n<!-- config-table:end -->`,
);
writeFileSync(path, updated);
