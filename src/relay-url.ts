// Relay URLs, parsed one way for everyone who names a relay: the configuration (a node's own relay
// URL, --mesh-with), the node (the URL it registers for its peers) and the DERP client (what it
// dials). A relay is known by its base URL — scheme, host, port and an optional path prefix — and
// speaks DERP at `<base>/derp`.

/** Schemes of a relay's HTTP endpoint. */
export const HTTP_SCHEMES = ['http:', 'https:'] as const;
/** What a DERP client may dial: HTTP, or WebSocket named as such. */
export const CLIENT_SCHEMES = ['http:', 'https:', 'ws:', 'wss:'] as const;

/** A text that is not a usable relay URL; `reason` says why, for the caller's own error. */
export class RelayUrlError extends Error {
  readonly input: string;
  readonly reason: 'syntax' | 'scheme' | 'extras';

  constructor(input: string, reason: RelayUrlError['reason'], message: string) {
    super(message);
    this.name = 'RelayUrlError';
    this.input = input;
    this.reason = reason;
  }
}

/**
 * Parses a relay URL. `schemes` lists the accepted ones; `plain` also refuses user info, a query
 * and a fragment (which a node's registered URL must not carry).
 */
export function relayUrl(
  text: string,
  { schemes = HTTP_SCHEMES, plain = false }: { schemes?: readonly string[]; plain?: boolean } = {},
): URL {
  let url: URL;
  try {
    url = new URL(text);
  } catch {
    throw new RelayUrlError(text, 'syntax', `${JSON.stringify(text)} is not a URL`);
  }
  if (!schemes.includes(url.protocol)) {
    throw new RelayUrlError(
      text,
      'scheme',
      `${JSON.stringify(text)} uses ${url.protocol.replace(':', '')}, expected ${schemes.map((s) => s.replace(':', '')).join(' or ')}`,
    );
  }
  if (plain && (url.username !== '' || url.password !== '' || url.search !== '' || url.hash !== '')) {
    throw new RelayUrlError(text, 'extras', `${JSON.stringify(text)} carries user info, a query or a fragment`);
  }
  return url;
}

/** The relay's base URL: origin and path prefix, without trailing slashes or a final `/derp`. */
export function relayBase(url: URL): string {
  return url.origin + url.pathname.replace(/\/+$/, '').replace(/\/derp$/, '');
}

/** Where a client dials: the URL as given, with an empty path meaning `/derp`. */
export function derpEndpoint(url: URL): URL {
  const endpoint = new URL(url.href);
  if (endpoint.pathname === '' || endpoint.pathname === '/') endpoint.pathname = '/derp';
  return endpoint;
}

/** Equal for two spellings of one URL: scheme, lowercase host, effective port, path without trailing slashes. */
export function sameUrlKey(url: URL): string {
  const port = url.port || (url.protocol === 'https:' || url.protocol === 'wss:' ? '443' : '80');
  return `${url.protocol}//${url.hostname.toLowerCase()}:${port}${url.pathname.replace(/\/+$/, '')}`;
}
