// How the dashboard shows numbers, times and shares of a limit, the order it lists
// entities in, and el(), its one DOM builder. Pure but for el(), which needs a
// document only when called.

const moneyFormats = {
  small: new Intl.NumberFormat("en-US", { maximumFractionDigits: 4 }),
  large: new Intl.NumberFormat("en-US", { maximumFractionDigits: 2 }),
};
export const intFormat = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });

export function money(value) {
  const n = Number(value);
  return (n !== 0 && Math.abs(n) < 1 ? moneyFormats.small : moneyFormats.large).format(n);
}

/** A decimal as plain digits ("1E-9" → "0.000000001"): how the service takes money
 * in a request. Anything else is answered as given. */
export function plainDecimal(value) {
  const text = String(value).trim();
  const match = /^(-?)([0-9]+)(?:\.([0-9]+))?[eE]([+-]?[0-9]+)$/.exec(text);
  if (!match) return text;
  const [, sign, whole, fraction = "", exponent] = match;
  let digits = whole + fraction;
  let point = whole.length + Number(exponent);
  if (point <= 0) {
    digits = "0".repeat(1 - point) + digits;
    point = 1;
  }
  if (point > digits.length) digits += "0".repeat(point - digits.length);
  const integer = digits.slice(0, point).replace(/^0+(?=[0-9])/, "");
  const rest = digits.slice(point);
  return `${sign}${integer}${rest ? `.${rest}` : ""}`;
}

export function count(value) {
  return intFormat.format(Number(value));
}

export function percent(used, max) {
  const p = max > 0 ? (Number(used) / Number(max)) * 100 : 0;
  if (p === 0) return { p, text: "0%" };
  if (p < 0.1) return { p, text: "<0.1%" };
  return { p, text: `${Math.round(p * 10) / 10}%` };
}

export function level(p) {
  if (p >= 100) return "full";
  if (p >= 75) return "warn";
  return "ok";
}

/** The widths (in % of the bar) of the spent part and of the held part after it:
 * together never more than the whole bar. `held` absent counts as 0. */
export function shares(used, held, max) {
  const whole = Number(max);
  if (!(whole > 0)) return { spent: 0, held: 0 };
  const spent = Math.min(Math.max((Number(used) / whole) * 100, 0), 100);
  const heldShare = Math.max((Number(held || 0) / whole) * 100, 0);
  return { spent, held: Math.min(heldShare, 100 - spent) };
}

export function utcLabel(date) {
  const month = date.toLocaleString("en-US", { month: "short", timeZone: "UTC" });
  const hh = String(date.getUTCHours()).padStart(2, "0");
  const mm = String(date.getUTCMinutes()).padStart(2, "0");
  return `${month} ${date.getUTCDate()}, ${hh}:${mm} UTC`;
}

export function until(date, now = Date.now()) {
  let s = Math.max(0, Math.round((date.getTime() - now) / 1000));
  const d = Math.floor(s / 86400);
  s -= d * 86400;
  const h = Math.floor(s / 3600);
  s -= h * 3600;
  const m = Math.floor(s / 60);
  s -= m * 60;
  if (d > 0) return `${d}d ${h}h`;
  if (h > 0) return `${h}h ${m}m`;
  if (m > 0) return `${m}m ${s}s`;
  return `${s}s`;
}

/** Entities by name, then id: the order of every list and choice on the page. */
export function byName(entities) {
  return [...entities].sort((a, b) => a.name.localeCompare(b.name) || a.id.localeCompare(b.id));
}

export function shortId(id) {
  return id ? id.slice(0, 8) : "";
}

/** An element with a class and children (strings become text; null, undefined
 * and false are skipped). */
export function el(tag, className, ...children) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}
