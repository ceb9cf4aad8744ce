// The board drawn from one snapshot: the tiles, and a row per customer, team and
// key with its budget and rate-limit meters (spent, and held by open reservations
// in a lighter shade), why a key is blocked and, for an administrator, the row's
// edit actions.

import { chartBox, expanded } from "./chart.js";
import {
  byName,
  count,
  el,
  intFormat,
  level,
  money,
  percent,
  shares,
  shortId,
  until,
  utcLabel,
} from "./format.js";

const $ = (id) => document.getElementById(id);

function resetLabel(iso) {
  const span = el("span", "reset");
  if (!iso) return span;
  span.dataset.resetAt = iso;
  refreshReset(span);
  return span;
}

export function refreshReset(span) {
  const at = new Date(span.dataset.resetAt);
  span.textContent = `resets in ${until(at)} · ${utcLabel(at)}`;
  span.title = `Next reset ${at.toISOString()}`;
}

function meter({ label, kind, used, held, max, fmt, resetAt, budgetId, onToggle }) {
  const { p, text } = percent(used, max);
  const lvl = level(p);
  const part = shares(used, held, max);
  const fill = el("div", `fill ${lvl}`);
  fill.style.width = `${part.spent}%`;
  const bar = el("div", "bar", fill);
  const hasHeld = held !== undefined && held !== null && Number(held) > 0;
  if (hasHeld) {
    const shade = el("div", "fill held");
    shade.style.width = `${part.held}%`;
    bar.append(shade);
  }
  const strong = el("strong", null, label);
  const name = budgetId ? el("button", "meter-name", strong) : strong;
  if (budgetId) {
    name.type = "button";
    name.setAttribute("aria-expanded", String(expanded.has(budgetId)));
    name.setAttribute("aria-label", `${label} ${kind} budget: show spend per period`);
    name.dataset.focusKey = `chart:${budgetId}`;
  }
  const row = el(
    "div",
    budgetId ? "meter budget" : "meter",
    el("span", "label", name, el("span", "kind", kind)),
    bar,
    el(
      "span",
      "amount",
      fmt(used),
      hasHeld ? el("span", "held-amount", ` + ${fmt(held)} held`) : null,
      el("span", "of", ` / ${fmt(max)}`),
    ),
    el("span", `pct ${lvl === "ok" ? "" : lvl}`, text),
    resetLabel(resetAt),
  );
  // The bar is the meter: a meter's children are presentational, and the name
  // beside it is a button.
  bar.setAttribute("role", "meter");
  bar.setAttribute("aria-label", `${label} ${kind}`);
  bar.setAttribute("aria-valuemin", "0");
  bar.setAttribute("aria-valuenow", String(Number(used)));
  bar.setAttribute("aria-valuemax", String(Number(max)));
  bar.setAttribute(
    "aria-valuetext",
    `${fmt(used)} of ${fmt(max)}${hasHeld ? `, ${fmt(held)} held` : ""}`,
  );
  if (budgetId) {
    row.dataset.budgetId = budgetId;
    row.title = "Show spend per period";
    row.addEventListener("click", () => onToggle(budgetId));
  }
  return row;
}

function budgetMeters(budgets, onToggle) {
  const nodes = [];
  for (const b of budgets) {
    nodes.push(
      meter({
        label: b.reset_duration,
        kind: b.calendar_aligned ? "calendar" : "rolling",
        used: b.current_usage,
        held: b.held,
        max: b.max_limit,
        fmt: money,
        resetAt: b.next_reset,
        budgetId: b.id,
        onToggle,
      }),
    );
    if (expanded.has(b.id)) nodes.push(chartBox(b));
  }
  return nodes;
}

function rateMeters(rateLimit) {
  if (!rateLimit) return [];
  const nodes = [];
  for (const [prefix, name] of [["token", "tokens"], ["request", "requests"]]) {
    const max = rateLimit[`${prefix}_max_limit`];
    if (max === null || max === undefined) continue;
    nodes.push(
      meter({
        label: name,
        kind: `per ${rateLimit[`${prefix}_reset_duration`]}`,
        used: rateLimit[`${prefix}_current_usage`],
        held: rateLimit[`${prefix}_held`],
        max,
        fmt: count,
        resetAt: rateLimit[`${prefix}_next_reset`],
      }),
    );
  }
  return nodes;
}

function limits(owner, onToggle) {
  const nodes = [...budgetMeters(owner.budgets, onToggle), ...rateMeters(owner.rate_limit)];
  if (owner.budgets.length === 0) {
    // Under a team or customer its budgets still apply (the reason says which).
    const above = owner.team_id || owner.customer_id;
    const text = above ? "No budget of its own" : "Unlimited · no budget";
    nodes.unshift(el("span", "unlimited", text));
  }
  return nodes;
}

// --- names and reasons -------------------------------------------------------------------

function index(snapshot) {
  const byId = new Map();
  for (const c of snapshot.customers) byId.set(c.id, { type: "customer", entity: c });
  for (const t of snapshot.teams) byId.set(t.id, { type: "team", entity: t });
  for (const k of snapshot.virtual_keys) {
    byId.set(k.id, { type: "virtual key", entity: k });
    for (const p of k.provider_configs) {
      byId.set(p.id, { type: "provider", entity: { ...p, name: p.provider } });
    }
  }
  return byId;
}

function reasonText(blocked, byId) {
  if (blocked.reason === "key_inactive") return "Key is inactive";
  const owner = byId.get(blocked.owner_id);
  const who = owner ? `${owner.type} ${owner.entity.name}` : blocked.owner_type;
  if (blocked.reason === "rate_limited") {
    return `Rate limited: ${who} ${blocked.rate_limit} ` +
      `(${intFormat.format(blocked.current_usage)} / ${intFormat.format(blocked.max_limit)})`;
  }
  let budget = "budget";
  if (owner) {
    const found = owner.entity.budgets.find((b) => b.id === blocked.budget_id);
    if (found) budget = `${found.reset_duration} budget`;
  }
  return `Budget exceeded: ${who} ${budget} ` +
    `(${money(blocked.current_usage)} / ${money(blocked.max_limit)})`;
}

// --- rows --------------------------------------------------------------------------------

function action(kind, verb, entity, text, label) {
  const button = el("button", `link action ${verb}`, text);
  button.type = "button";
  button.dataset.action = verb;
  button.dataset.kind = kind;
  button.dataset.id = entity.id;
  button.dataset.focusKey = `${verb}:${entity.id}`;
  button.setAttribute("aria-label", `${label} ${entity.name}`);
  return button;
}

function actions(kind, entity) {
  const noun = { customer: "customer", team: "team", virtual_key: "key" }[kind];
  const buttons = [action(kind, "edit", entity, "Edit", `Edit ${noun}`)];
  if (kind === "virtual_key") {
    buttons.push(
      entity.is_active
        ? action(kind, "deactivate", entity, "Deactivate", "Deactivate key")
        : action(kind, "activate", entity, "Activate", "Activate key"),
      action(kind, "rotate", entity, "Rotate secret", "Rotate the secret of key"),
    );
  }
  buttons.push(action(kind, "delete", entity, "Delete", `Delete ${noun}`));
  return el("div", "actions", ...buttons);
}

function row({ entity, kind, meta, meters, status, reason, admin }) {
  const who = el(
    "div",
    "who",
    el("div", "title", entity.name),
    el("div", "meta", ...meta),
    reason ? el("div", "reason", reason) : null,
    admin ? actions(kind, entity) : null,
  );
  const badges = {
    ok: el("span", "badge ok", "Active"),
    blocked: el("span", "badge blocked", "Blocked"),
    inactive: el("span", "badge inactive", "Inactive"),
  };
  const r = el(
    "div",
    `row ${status === "ok" ? "" : status}`,
    who,
    el("div", "meters", ...meters),
    el("div", "state", kind === "virtual_key" ? badges[status] : null),
  );
  r.dataset.id = entity.id;
  r.dataset.status = status;
  r.dataset.version = String(entity.version);
  return r;
}

function idMeta(id) {
  return el("span", "mono", shortId(id));
}

function keyRow(k, byId, admin, onToggle) {
  const parentId = k.team_id || k.customer_id;
  const parent = parentId ? byId.get(parentId) : null;
  const meta = [
    el("span", "mono", `…${k.value_hint}`),
    parent ? ` · ${parent.type} ${parent.entity.name}` : " · standalone",
  ];
  const meters = limits(k, onToggle);
  for (const p of k.provider_configs) {
    const models = p.allowed_models.join(", ");
    const head = el(
      "div",
      "subhead",
      `${p.provider} `,
      el("span", "mono", models === "*" ? "all models" : models || "no models"),
      p.blocked ? el("span", "badge blocked", "Blocked") : null,
    );
    meters.push(head, ...budgetMeters(p.budgets, onToggle), ...rateMeters(p.rate_limit));
  }
  let status = "ok";
  if (!k.is_active) status = "inactive";
  else if (k.blocked) status = "blocked";
  return row({
    entity: k,
    kind: "virtual_key",
    meta,
    meters,
    status,
    admin,
    reason: k.blocked && k.is_active ? reasonText(k.blocked, byId) : null,
  });
}

function fill(container, rows, emptyText) {
  container.replaceChildren(...(rows.length ? rows : [el("div", "empty", emptyText)]));
}

function tile(label, value, alert) {
  return el("div", alert ? "tile alert" : "tile", el("div", "label", label), el("div", "value", value));
}

/** Draw the whole board from `snapshot`; `admin` adds the edit actions, and a
 * click on a budget calls `onToggle(budgetId)`. */
export function renderBoard(snapshot, { admin, onToggle }) {
  const byId = index(snapshot);
  const keys = snapshot.virtual_keys;
  const blocked = keys.filter((k) => k.is_active && k.blocked).length;
  $("tiles").replaceChildren(
    tile("Customers", snapshot.customers.length),
    tile("Teams", snapshot.teams.length),
    tile("Virtual keys", keys.length),
    tile("Blocked keys", blocked, blocked > 0),
  );
  $("customers-count").textContent = String(snapshot.customers.length);
  $("teams-count").textContent = String(snapshot.teams.length);
  $("keys-count").textContent = String(keys.length);
  fill(
    $("customers"),
    byName(snapshot.customers).map((c) =>
      row({
        entity: c,
        kind: "customer",
        meta: [idMeta(c.id)],
        meters: limits(c, onToggle),
        status: "ok",
        admin,
      })),
    "No customers yet.",
  );
  fill(
    $("teams"),
    byName(snapshot.teams).map((t) => {
      const parent = t.customer_id ? byId.get(t.customer_id) : null;
      const meta = [idMeta(t.id), parent ? ` · ${parent.entity.name}` : " · no customer"];
      return row({ entity: t, kind: "team", meta, meters: limits(t, onToggle), status: "ok", admin });
    }),
    "No teams yet.",
  );
  fill($("keys"), byName(keys).map((k) => keyRow(k, byId, admin, onToggle)), "No virtual keys yet.");
  const at = new Date(snapshot.generated_at);
  $("updated").textContent = `Updated ${at.toLocaleTimeString()} · position ${snapshot.position}`;
}

/** The budget with this id as `snapshot` has it, wherever it is. */
export function findBudget(snapshot, id) {
  if (!snapshot) return null;
  const owners = [...snapshot.customers, ...snapshot.teams];
  for (const k of snapshot.virtual_keys) owners.push(k, ...k.provider_configs);
  for (const o of owners) {
    const found = o.budgets.find((b) => b.id === id);
    if (found) return found;
  }
  return null;
}
