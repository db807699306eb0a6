// A real headless Chromium (Debian's, installed by scripts/ensure-chromium.sh when missing) with one
// page whose console errors and failed requests are collected, for the status-page tests.
import { strict as assert } from 'node:assert';
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';

import puppeteer, { type Browser, type Page } from 'puppeteer-core';

const root = fileURLToPath(new URL('../../../', import.meta.url));

export interface WatchedPage {
  browser: Browser;
  page: Page;
  /** Console errors and uncaught page errors. */
  consoleErrors: string[];
  /** Requests that failed or were answered with a status of 400 or more. */
  failedRequests: string[];
}

/** Launches Chromium (with `args` added) and opens a 1440×1200 page. */
export async function openWatchedPage(args: string[] = []): Promise<WatchedPage> {
  // CI: root on a fresh Debian machine, where the script installs the package.
  const ensured = spawnSync(`${root}scripts/ensure-chromium.sh`, { encoding: 'utf8', timeout: 540_000 });
  assert.equal(ensured.status, 0, `scripts/ensure-chromium.sh failed:\n${ensured.stderr}`);
  const chromium = ensured.stdout.trim().split('\n').pop()!;
  const browser = await puppeteer.launch({
    executablePath: chromium,
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', ...args],
  });
  const page = await browser.newPage();
  await page.setViewport({ width: 1440, height: 1200 });
  const consoleErrors: string[] = [];
  const failedRequests: string[] = [];
  page.on('console', (m) => {
    if (m.type() === 'error') consoleErrors.push(m.text());
  });
  page.on('pageerror', (err) => consoleErrors.push(`page error: ${(err as Error).message}`));
  // An event stream cut by the browser closing comes after the last check of these lists.
  page.on('requestfailed', (r) => failedRequests.push(`${r.method()} ${r.url()}: ${r.failure()?.errorText}`));
  page.on('response', (r) => {
    if (r.status() >= 400) failedRequests.push(`${r.request().method()} ${r.url()}: HTTP ${r.status()}`);
  });
  return { browser, page, consoleErrors, failedRequests };
}
