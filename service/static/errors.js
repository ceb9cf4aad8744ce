// Which field of a form a refused write concerns: the JSON path, in the body that
// was sent, of the value an error answer names. A decoding error carries the path
// in its message (`... - at `$.budgets[0].max_limit``); a rule of the service names
// the value instead (the '1d' budget, token_max_limit, provider 'openai'), and the
// body says where that value is. Pure: no DOM, no requests.

const QUOTED = /'((?:[^'\\]|\\.)*)'|"((?:[^"\\]|\\.)*)"/;
const DURATION = /^[1-9][0-9]*[smhdwMQY]$/;
const MAX_RATE_LIMIT = 2n ** 63n - 1n;

/** The JSON path (e.g. `$.budgets[1].max_limit`) of the value `error` concerns in
 * `body`, or null when it concerns the request as a whole. */
export function errorPath(error, body) {
  const message = (error && error.message) || "";
  const at = /at `(\$[^`]*)`/.exec(message);
  if (at) return at[1] === "$" ? null : at[1];
  const value = quoted(message);
  switch (error && error.code) {
    case "invalid_max_limit":
      return budgetField(body, "max_limit", (b) => b.reset_duration === value, isBadLimit);
    case "invalid_reset_duration":
      return budgetField(body, "reset_duration", (b) => b.reset_duration === value);
    case "invalid_calendar_alignment": {
      const got = /got '([^']*)'/.exec(message);
      const duration = got ? got[1] : value;
      return budgetField(
        body,
        "calendar_aligned",
        (b) => b.calendar_aligned === true && b.reset_duration === duration,
      );
    }
    case "duplicate_reset_duration":
      return duplicateBudget(body, value);
    case "invalid_rate_limit":
      return rateLimitField(body, message);
    case "duplicate_provider":
      return duplicateProvider(body, value);
    case "unknown_reference": {
      const kind = /^(customer|team) /.exec(message);
      return kind ? `$.${kind[1]}_id` : null;
    }
    case "conflicting_owner":
      return "$.team_id";
    case "invalid_request":
      if (/non-empty name/.test(message)) return "$.name";
      if (/non-empty provider/.test(message)) return blankProvider(body);
      return null;
    default:
      return null;
  }
}

function quoted(message) {
  const match = QUOTED.exec(message);
  if (!match) return null;
  return match[1] !== undefined ? match[1] : match[2];
}

function configs(body) {
  return body && Array.isArray(body.provider_configs) ? body.provider_configs : [];
}

/** Every list of budgets in the body with its path: the owner's, then each
 * provider config's. */
function budgetLists(body) {
  const lists = [];
  if (body && Array.isArray(body.budgets)) lists.push(["$.budgets", body.budgets]);
  configs(body).forEach((config, i) => {
    if (config && Array.isArray(config.budgets)) {
      lists.push([`$.provider_configs[${i}].budgets`, config.budgets]);
    }
  });
  return lists;
}

/** `field` of the first budget that `matches`, preferring one that is also `bad`. */
function budgetField(body, field, matches, bad = () => true) {
  const found = [];
  for (const [path, budgets] of budgetLists(body)) {
    budgets.forEach((budget, i) => {
      if (budget && matches(budget)) found.push([`${path}[${i}].${field}`, budget]);
    });
  }
  const best = found.find(([, budget]) => bad(budget[field])) || found[0];
  return best ? best[0] : null;
}

function isBadLimit(value) {
  const text = String(value).trim();
  if (!/^-?[0-9]+(\.[0-9]+)?$/.test(text)) return true;
  const [whole, fraction = ""] = text.replace(/^-/, "").split(".");
  if (text.startsWith("-") || !/[1-9]/.test(text)) return true;
  return whole.replace(/^0+/, "").length > 18 || fraction.replace(/0+$/, "").length > 9;
}

function duplicateBudget(body, duration) {
  for (const [path, budgets] of budgetLists(body)) {
    const seen = new Set();
    for (let i = 0; i < budgets.length; i += 1) {
      const d = budgets[i] && budgets[i].reset_duration;
      if (seen.has(d) && (duration === null || d === duration)) {
        return `${path}[${i}].reset_duration`;
      }
      seen.add(d);
    }
  }
  return null;
}

/** The rate limits in the body with their paths: the owner's, then each config's. */
function rateLimits(body) {
  const found = [];
  if (body && body.rate_limit) found.push(["$.rate_limit", body.rate_limit]);
  configs(body).forEach((config, i) => {
    if (config && config.rate_limit) {
      found.push([`$.provider_configs[${i}].rate_limit`, config.rate_limit]);
    }
  });
  return found;
}

function rateLimitField(body, message) {
  const head = /^(token|request)_(max_limit|reset_duration)(:)?\s*(\S*)/.exec(message);
  if (!head) return null;
  const [, half, named, colon] = head;
  let field = named;
  if (named === "reset_duration" && !colon && /needs a/.test(message)) field = "max_limit";
  else if (named === "max_limit" && /needs a/.test(message)) field = "reset_duration";
  const limits = rateLimits(body);
  const best = limits.find(([, limit]) => isBadHalf(limit, half)) || limits[0];
  return best ? `${best[0]}.${half}_${field}` : null;
}

function isBadHalf(limit, half) {
  const max = limit[`${half}_max_limit`];
  const duration = limit[`${half}_reset_duration`];
  const absent = (v) => v === null || v === undefined;
  if (absent(max)) return !absent(duration);
  if (!Number.isInteger(max) || max <= 0 || BigInt(max) > MAX_RATE_LIMIT) return true;
  return absent(duration) || !DURATION.test(String(duration));
}

function duplicateProvider(body, provider) {
  const seen = new Set();
  const list = configs(body);
  for (let i = 0; i < list.length; i += 1) {
    const name = list[i] && list[i].provider;
    if (seen.has(name) && (provider === null || name === provider)) {
      return `$.provider_configs[${i}].provider`;
    }
    seen.add(name);
  }
  return null;
}

function blankProvider(body) {
  const i = configs(body).findIndex((c) => !c || !String(c.provider || "").trim());
  return i >= 0 ? `$.provider_configs[${i}].provider` : null;
}
