// Every request the page makes: the bearer token (kept for this tab only, in
// sessionStorage), reads that wait for the page's own writes (min_position), the
// page's role, and writes with If-Match and an Idempotency-Key that is reused only
// for the very same request, so a double click or a retry never acts twice.

const TOKEN_KEY = "govledger.token";
// Past any position of the log: a probe of /api/events with it reads no event.
const LAST_POSITION = "9223372036854775807";
// Money stays as the service wrote it (exact decimal text) where the reviver can
// see the source; display code turns it into a number itself.
const MONEY_FIELDS = new Set(["max_limit", "current_usage", "held", "spend"]);

/** The highest log position the page has seen, in a snapshot or a command answer. */
export const seen = { position: 0 };

export function saw(position) {
  if (Number.isSafeInteger(position) && position > seen.position) seen.position = position;
}

export function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

export function keepToken(value) {
  sessionStorage.setItem(TOKEN_KEY, value);
}

export function forgetToken() {
  sessionStorage.removeItem(TOKEN_KEY);
}

export function authHeaders() {
  const t = token();
  return t ? { Authorization: `Bearer ${t}` } : {};
}

function exactMoney(key, value, context) {
  if (MONEY_FIELDS.has(key) && typeof value === "number" && context && context.source) {
    return context.source;
  }
  return value;
}

/** JSON as the service wrote it, money fields as their exact text: every answer and
 * every snapshot of the stream goes through this. */
export function parseExact(text) {
  return JSON.parse(text, exactMoney);
}

/** `{status, body, error}`; `error` is the answer's `{code, message}` when it
 * failed, `network` is true when no answer came at all. */
async function answer(response) {
  const status = response.status;
  let body = null;
  try {
    const text = await response.text();
    if ((response.headers.get("Content-Type") || "").startsWith("application/json")) {
      body = parseExact(text);
    }
  } catch (err) {
    return { status: 0, network: true, body: null, error: networkError() };
  }
  let error = null;
  if (!response.ok) {
    error = body && body.error
      ? body.error
      : { code: `http_${status}`, message: `The service answered ${status}.` };
  }
  return { status, network: false, body, error };
}

function networkError() {
  return {
    code: "network_error",
    message: "The request did not complete: the connection failed.",
  };
}

/** GET `path` as of at least the page's latest known position. */
export async function read(path) {
  const join = path.includes("?") ? "&" : "?";
  const url = seen.position > 0 ? `${path}${join}min_position=${seen.position}` : path;
  try {
    return await answer(await fetch(url, { headers: authHeaders(), cache: "no-store" }));
  } catch (err) {
    return { status: 0, network: true, body: null, error: networkError() };
  }
}

/** "admin" when the token may write, else "reader". /api/events needs the admin
 * right, so a reader's token gets 403 there; `after` past the log reads nothing. */
export async function probeRole({ tries = 5, pauseMs = 1000 } = {}) {
  // Only a refusal says "reader": a 503 or a network error says nothing about the
  // token, so the probe asks again (1, 2, 4, 8 s apart) before it settles on the
  // reader's view, the one that can do no harm.
  for (let attempt = 1; ; attempt += 1) {
    try {
      const response = await fetch(`/api/events?after=${LAST_POSITION}&limit=1`, {
        headers: authHeaders(),
        cache: "no-store",
      });
      await response.arrayBuffer();
      if (response.ok) return "admin";
      if (response.status === 401 || response.status === 403) return "reader";
    } catch (err) {
      // no answer: ask again
    }
    if (attempt >= tries) return "reader";
    await new Promise((resolve) => setTimeout(resolve, pauseMs * 2 ** (attempt - 1)));
  }
}

export function newKey() {
  if (globalThis.crypto && typeof crypto.randomUUID === "function") {
    return crypto.randomUUID();
  }
  // randomUUID needs a secure context; getRandomValues does not.
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** The attempt to send `request`: `previous` again when it is the same request
 * (method, path, If-Match and body), so its Idempotency-Key is reused; else a new
 * attempt with a new key. */
export function attempt(previous, request) {
  const fingerprint = JSON.stringify([
    request.method,
    request.path,
    request.ifMatch ?? null,
    request.body ?? null,
  ]);
  if (previous && previous.fingerprint === fingerprint) return previous;
  return { fingerprint, key: newKey() };
}

/** Send a command: `request` is {method, path, body?, ifMatch?}, `key` its
 * Idempotency-Key. Resolves to `{status, body, error, network, replayed}`. */
export async function write(request, key) {
  const headers = { ...authHeaders(), "Idempotency-Key": key };
  if (request.ifMatch !== undefined && request.ifMatch !== null) {
    headers["If-Match"] = String(request.ifMatch);
  }
  const init = { method: request.method, headers, cache: "no-store" };
  if (request.body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(request.body);
  }
  let response;
  try {
    response = await fetch(request.path, init);
  } catch (err) {
    return { status: 0, network: true, body: null, error: networkError(), replayed: false };
  }
  const result = await answer(response);
  result.replayed = response.headers.get("Idempotent-Replayed") === "true";
  if (result.body && result.body.position !== undefined) saw(Number(result.body.position));
  return result;
}
