// How the dashboard shows numbers, times and shares of a limit, the order it lists
// entities in, and el(), its one DOM builder. Pure but for el(), which needs a
// document only when called.

export const intFormat = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });

/** An amount as the service wrote it (exact decimal text; a number only where no
 * text was kept), every digit shown: the integer part grouped by thousands, the
 * fraction without trailing zeros. Money is exact to the nano; a display that
 * rounds shows 0.999999999 of 1 as "1 / 1" and a limit of 0.000000001 as 0. */
export function money(value) {
  const [sign, whole, fraction] = decimalParts(value);
  const grouped = whole.replace(/\B(?=(\d{3})+(?!\d))/g, ",");
  return `${sign}${grouped}${fraction ? `.${fraction}` : ""}`;
}

/** [sign, integer digits, fraction digits without trailing zeros] of a decimal. */
function decimalParts(value) {
  const text = plainDecimal(typeof value === "number" ? numberText(value) : String(value));
  const match = /^(-?)([0-9]+)(?:\.([0-9]*))?$/.exec(text);
  if (!match) return ["", text, ""];
  const whole = match[2].replace(/^0+(?=[0-9])/, "");
  const fraction = (match[3] || "").replace(/0+$/, "");
  const zero = /^0*$/.test(whole) && !fraction;
  return [zero ? "" : match[1], whole, fraction];
}

function numberText(n) {
  // Up to 9 fractional digits: the finest amount the service keeps.
  return Number.isInteger(n) ? String(n) : n.toFixed(9);
}

/** An amount as typed into a form: the board's own spelling, "1,000.5", is taken
 * as 1000.5 (commas only between groups of three digits); anything else goes as
 * typed, for the service to name what is wrong with it. */
export function typedMoney(text) {
  const t = String(text).trim();
  return /^[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]+)?$/.test(t) ? t.replaceAll(",", "") : t;
}

/** -1, 0 or 1 as decimal a is below, equal to or above b, exactly. */
export function compareDecimal(a, b) {
  const [sa, wa, fa] = decimalParts(a);
  const [sb, wb, fb] = decimalParts(b);
  const signA = sa ? -1 : 1;
  const signB = sb ? -1 : 1;
  const zeroA = wa === "0" && !fa;
  const zeroB = wb === "0" && !fb;
  if (zeroA && zeroB) return 0;
  if (signA !== signB) return signA < signB ? -1 : 1;
  let order = 0;
  if (wa.length !== wb.length) order = wa.length < wb.length ? -1 : 1;
  else if (wa !== wb) order = wa < wb ? -1 : 1;
  else {
    const width = Math.max(fa.length, fb.length);
    const x = fa.padEnd(width, "0");
    const y = fb.padEnd(width, "0");
    if (x !== y) order = x < y ? -1 : 1;
  }
  return signA * order;
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

/** The share of `max` that `used` is, as a number for bars and levels and as the
 * text shown: 100% and the "full" level exactly when used reaches max (compared
 * as decimals, so 0.999999999 of 1 is 99.9%, not 100%), and past 1,000% only
 * ">1000%", which fits the column. */
export function percent(used, max) {
  if (!(Number(max) > 0)) return { p: 0, text: "0%" };
  const reached = compareDecimal(used, max) >= 0;
  let p = (Number(used) / Number(max)) * 100;
  if (reached) p = Math.max(p, 100);
  else p = Math.min(p, 99.9); // below max, however close: not shown as 100%
  if (p === 0) return { p, text: "0%" };
  if (p < 0.1) return { p, text: "<0.1%" };
  if (p > 1000) return { p, text: ">1000%" };
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

/** "Dec 7, 00:00 UTC": the year when it is not the current one (a 1Y budget's
 * reset is next year's), the seconds when they are not 0 (a 15s window's). */
export function utcLabel(date, now = new Date()) {
  const month = date.toLocaleString("en-US", { month: "short", timeZone: "UTC" });
  const year = date.getUTCFullYear() === now.getUTCFullYear() ? "" : ` ${date.getUTCFullYear()}`;
  const hh = String(date.getUTCHours()).padStart(2, "0");
  const mm = String(date.getUTCMinutes()).padStart(2, "0");
  const seconds = date.getUTCSeconds();
  const ss = seconds ? `:${String(seconds).padStart(2, "0")}` : "";
  return `${month} ${date.getUTCDate()}${year}, ${hh}:${mm}${ss} UTC`;
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
