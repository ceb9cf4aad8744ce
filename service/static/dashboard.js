// govledger governance dashboard: vanilla JS, no build step.
// Reads GET /api/dashboard/events (Server-Sent Events over fetch, so the bearer token
// can be sent) and renders each snapshot; budgets' past periods come from
// GET /api/governance/budgets/{id}/periods when a budget is clicked.
"use strict";

(() => {
  const TOKEN_KEY = "govledger.token";
  const PERIODS_SHOWN = 14;

  const $ = (id) => document.getElementById(id);
  const state = {
    snapshot: null,
    controller: null,
    retryMs: 1000,
    retryTimer: null,
    expanded: new Set(), // budget ids whose chart is open
    periods: new Map(), // budget id -> {position, periods}
  };

  // --- formatting -----------------------------------------------------------------

  const moneyFormats = {
    small: new Intl.NumberFormat("en-US", { maximumFractionDigits: 4 }),
    large: new Intl.NumberFormat("en-US", { maximumFractionDigits: 2 }),
  };
  const intFormat = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });

  function money(value) {
    const n = Number(value);
    return (n !== 0 && Math.abs(n) < 1 ? moneyFormats.small : moneyFormats.large).format(n);
  }

  function percent(used, max) {
    const p = max > 0 ? (Number(used) / Number(max)) * 100 : 0;
    if (p === 0) return { p, text: "0%" };
    if (p < 0.1) return { p, text: "<0.1%" };
    return { p, text: `${Math.round(p * 10) / 10}%` };
  }

  function level(p) {
    if (p >= 100) return "full";
    if (p >= 75) return "warn";
    return "ok";
  }

  function utcLabel(date) {
    const month = date.toLocaleString("en-US", { month: "short", timeZone: "UTC" });
    const hh = String(date.getUTCHours()).padStart(2, "0");
    const mm = String(date.getUTCMinutes()).padStart(2, "0");
    return `${month} ${date.getUTCDate()}, ${hh}:${mm} UTC`;
  }

  function until(date) {
    let s = Math.max(0, Math.round((date.getTime() - Date.now()) / 1000));
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

  function shortId(id) {
    return id ? id.slice(0, 8) : "";
  }

  // --- DOM building ---------------------------------------------------------------

  function el(tag, className, ...children) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function resetLabel(iso) {
    if (!iso) return el("span", "reset");
    const span = el("span", "reset");
    span.dataset.resetAt = iso;
    refreshReset(span);
    return span;
  }

  function refreshReset(span) {
    const at = new Date(span.dataset.resetAt);
    span.textContent = `resets in ${until(at)} · ${utcLabel(at)}`;
    span.title = `Next reset ${at.toISOString()}`;
  }

  function meter({ label, kind, used, max, fmt, resetAt, budgetId }) {
    const { p, text } = percent(used, max);
    const lvl = level(p);
    const fill = el("div", `fill ${lvl}`);
    fill.style.width = `${Math.min(p, 100)}%`;
    const row = el(
      "div",
      budgetId ? "meter budget" : "meter",
      el("span", "label", el("strong", null, label), el("span", "kind", kind)),
      el("div", "bar", fill),
      el("span", "amount", fmt(used), el("span", "of", ` / ${fmt(max)}`)),
      el("span", `pct ${lvl === "ok" ? "" : lvl}`, text),
      resetLabel(resetAt),
    );
    row.setAttribute("role", "meter");
    row.setAttribute("aria-valuenow", String(Number(used)));
    row.setAttribute("aria-valuemax", String(Number(max)));
    if (budgetId) {
      row.dataset.budgetId = budgetId;
      row.title = "Show spend per period";
      row.addEventListener("click", () => toggleChart(budgetId));
    }
    return row;
  }

  function budgetMeters(budgets) {
    const nodes = [];
    for (const b of budgets) {
      nodes.push(
        meter({
          label: b.reset_duration,
          kind: b.calendar_aligned ? "calendar" : "rolling",
          used: b.current_usage,
          max: b.max_limit,
          fmt: money,
          resetAt: b.next_reset,
          budgetId: b.id,
        }),
      );
      if (state.expanded.has(b.id)) nodes.push(chartBox(b));
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
          max,
          fmt: (v) => intFormat.format(Number(v)),
          resetAt: rateLimit[`${prefix}_next_reset`],
        }),
      );
    }
    return nodes;
  }

  function limits(owner) {
    const nodes = [...budgetMeters(owner.budgets), ...rateMeters(owner.rate_limit)];
    if (owner.budgets.length === 0) {
      nodes.unshift(el("span", "unlimited", "Unlimited · no budget"));
    }
    return nodes;
  }

  // --- names and reasons ----------------------------------------------------------

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

  // --- rows -----------------------------------------------------------------------

  function row({ id, title, meta, meters, status, reason, kind }) {
    const who = el(
      "div",
      "who",
      el("div", "title", title),
      el("div", "meta", ...meta),
      reason ? el("div", "reason", reason) : null,
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
      el("div", "state", kind === "key" ? badges[status] : null),
    );
    r.dataset.id = id;
    r.dataset.status = status;
    return r;
  }

  function idMeta(id) {
    return el("span", "mono", shortId(id));
  }

  function customerRow(c) {
    return row({ id: c.id, title: c.name, meta: [idMeta(c.id)], meters: limits(c), status: "ok" });
  }

  function teamRow(t, byId) {
    const parent = t.customer_id ? byId.get(t.customer_id) : null;
    const meta = [idMeta(t.id), parent ? ` · ${parent.entity.name}` : " · no customer"];
    return row({ id: t.id, title: t.name, meta, meters: limits(t), status: "ok" });
  }

  function keyRow(k, byId) {
    const parentId = k.team_id || k.customer_id;
    const parent = parentId ? byId.get(parentId) : null;
    const meta = [
      el("span", "mono", `…${k.value_hint}`),
      parent ? ` · ${parent.type} ${parent.entity.name}` : " · standalone",
    ];
    const meters = limits(k);
    for (const p of k.provider_configs) {
      const models = p.allowed_models.join(", ");
      const head = el(
        "div",
        "subhead",
        `${p.provider} `,
        el("span", "mono", models === "*" ? "all models" : models || "no models"),
        p.blocked ? el("span", "badge blocked", "Blocked") : null,
      );
      meters.push(head, ...budgetMeters(p.budgets), ...rateMeters(p.rate_limit));
    }
    let status = "ok";
    if (!k.is_active) status = "inactive";
    else if (k.blocked) status = "blocked";
    return row({
      id: k.id,
      title: k.name,
      meta,
      meters,
      status,
      kind: "key",
      reason: k.blocked && k.is_active ? reasonText(k.blocked, byId) : null,
    });
  }

  function fill(container, rows, emptyText) {
    container.replaceChildren(...(rows.length ? rows : [el("div", "empty", emptyText)]));
  }

  function tile(label, value, alert) {
    return el("div", alert ? "tile alert" : "tile", el("div", "label", label), el("div", "value", value));
  }

  function byName(entities) {
    return [...entities].sort((a, b) => a.name.localeCompare(b.name) || a.id.localeCompare(b.id));
  }

  function render(snapshot) {
    state.snapshot = snapshot;
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
    fill($("customers"), byName(snapshot.customers).map(customerRow), "No customers yet.");
    fill($("teams"), byName(snapshot.teams).map((t) => teamRow(t, byId)), "No teams yet.");
    fill($("keys"), byName(keys).map((k) => keyRow(k, byId)), "No virtual keys yet.");
    const at = new Date(snapshot.generated_at);
    $("updated").textContent = `Updated ${at.toLocaleTimeString()} · position ${snapshot.position}`;
    for (const id of state.expanded) loadPeriods(id);
  }

  // --- period charts --------------------------------------------------------------

  function findBudget(id) {
    const s = state.snapshot;
    if (!s) return null;
    const owners = [...s.customers, ...s.teams];
    for (const k of s.virtual_keys) owners.push(k, ...k.provider_configs);
    for (const o of owners) {
      const found = o.budgets.find((b) => b.id === id);
      if (found) return found;
    }
    return null;
  }

  function toggleChart(id) {
    if (state.expanded.has(id)) state.expanded.delete(id);
    else state.expanded.add(id);
    if (state.snapshot) render(state.snapshot);
  }

  function chartBox(budget) {
    const box = el("div", "chart");
    box.dataset.chartFor = budget.id;
    drawChart(box, budget);
    return box;
  }

  async function loadPeriods(id) {
    const position = state.snapshot ? state.snapshot.position : 0;
    const cached = state.periods.get(id);
    if (cached && cached.position === position) return;
    state.periods.set(id, { position, periods: cached ? cached.periods : null });
    try {
      const res = await fetch(
        `/api/governance/budgets/${encodeURIComponent(id)}/periods?limit=${PERIODS_SHOWN}`,
        { headers: authHeaders(), cache: "no-store" },
      );
      if (res.status === 404) {
        state.expanded.delete(id);
        return;
      }
      if (!res.ok) throw new Error(`HTTP ${res.status}`);
      const body = await res.json();
      state.periods.set(id, { position, periods: body.periods });
    } catch (err) {
      state.periods.delete(id);
      return;
    }
    const budget = findBudget(id);
    const box = document.querySelector(`.chart[data-chart-for="${CSS.escape(id)}"]`);
    if (budget && box) drawChart(box, budget);
  }

  const SVG = "http://www.w3.org/2000/svg";

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function drawChart(box, budget) {
    const entry = state.periods.get(budget.id);
    const periods = entry && entry.periods;
    const caption = el(
      "div",
      "caption",
      `Spend per ${budget.reset_duration} period (latest ${PERIODS_SHOWN}), limit ${money(budget.max_limit)}`,
    );
    if (!periods) {
      box.replaceChildren(caption, el("div", "muted", "Loading…"));
      return;
    }
    if (periods.length === 0) {
      box.replaceChildren(caption, el("div", "muted", "No spend recorded yet."));
      return;
    }
    const W = 640;
    const H = 120;
    const left = 44;
    const bottom = 18;
    const top = 8;
    const max = Number(budget.max_limit);
    const peak = Math.max(max, ...periods.map((p) => Number(p.spend))) * 1.08;
    const plotH = H - bottom - top;
    const slot = (W - left) / Math.max(periods.length, 7);
    const barW = Math.max(4, Math.min(36, slot * 0.7));
    const y = (v) => top + plotH - (v / peak) * plotH;
    const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img" });
    chart.append(svg("line", { class: "axis", x1: left, x2: W, y1: top + plotH, y2: top + plotH }));
    chart.append(svg("line", { class: "limit", x1: left, x2: W, y1: y(max), y2: y(max) }));
    chart.append(svg("text", { x: left - 6, y: y(max) + 3.5, "text-anchor": "end" }, money(max)));
    chart.append(svg("text", { x: left - 6, y: top + plotH + 3.5, "text-anchor": "end" }, "0"));
    periods.forEach((p, i) => {
      const spend = Number(p.spend);
      const x = left + i * slot + (slot - barW) / 2;
      const h = Math.max(1, top + plotH - y(spend));
      const rect = svg("rect", {
        class: level(max > 0 ? (spend / max) * 100 : 0),
        x,
        y: top + plotH - h,
        width: barW,
        height: h,
        rx: 2,
      });
      const start = new Date(p.period_start);
      rect.append(svg("title", {}, `${start.toISOString()}: ${money(spend)}`));
      chart.append(rect);
      // Every bar labelled when they fit, else every other one, ending on the latest.
      if (periods.length <= 8 || (periods.length - 1 - i) % 2 === 0) {
        const label = start.toLocaleString("en-US", { month: "short", day: "numeric", timeZone: "UTC" });
        chart.append(svg("text", { x: x + barW / 2, y: H - 4, "text-anchor": "middle" }, label));
      }
    });
    box.replaceChildren(caption, chart);
  }

  // --- the event stream -----------------------------------------------------------

  function token() {
    return sessionStorage.getItem(TOKEN_KEY) || "";
  }

  function authHeaders() {
    const t = token();
    return t ? { Authorization: `Bearer ${t}` } : {};
  }

  function setLive(kind, text) {
    const pill = $("live");
    pill.className = `pill pill-${kind}`;
    pill.textContent = text;
  }

  function showLogin(message) {
    $("login").hidden = false;
    $("board").hidden = true;
    $("signout").hidden = true;
    $("login-error").textContent = message || "";
    setLive("idle", "Not connected");
    $("token").focus();
  }

  function showBoard() {
    $("login").hidden = true;
    $("board").hidden = false;
    $("signout").hidden = !token();
  }

  function scheduleRetry() {
    clearTimeout(state.retryTimer);
    setLive("wait", "Reconnecting…");
    state.retryTimer = setTimeout(connect, state.retryMs);
    state.retryMs = Math.min(state.retryMs * 2, 15000);
  }

  function handleBlock(block) {
    let event = "message";
    const data = [];
    for (const line of block.split("\n")) {
      if (line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "event") event = value;
      else if (field === "data") data.push(value);
    }
    if (event === "snapshot" && data.length) {
      render(JSON.parse(data.join("\n")));
      showBoard();
    }
  }

  async function connect() {
    clearTimeout(state.retryTimer);
    if (state.controller) state.controller.abort();
    const controller = new AbortController();
    state.controller = controller;
    setLive("wait", "Connecting…");
    let res;
    try {
      res = await fetch("/api/dashboard/events", {
        headers: { ...authHeaders(), Accept: "text/event-stream" },
        cache: "no-store",
        signal: controller.signal,
      });
    } catch (err) {
      if (!controller.signal.aborted) scheduleRetry();
      return;
    }
    if (res.status === 401 || res.status === 403) {
      let message = res.status === 401 ? "The token is not known." : "This token may not read.";
      try {
        const body = await res.json();
        if (body && body.error) message = body.error.message;
      } catch (err) {
        // keep the generic message
      }
      if (res.status === 401 && !token()) message = "";
      sessionStorage.removeItem(TOKEN_KEY);
      showLogin(message);
      return;
    }
    if (!res.ok || !res.body) {
      scheduleRetry();
      return;
    }
    state.retryMs = 1000;
    setLive("live", "Live");
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          handleBlock(block);
        }
      }
    } catch (err) {
      // the connection dropped: reconnect below
    }
    if (!controller.signal.aborted) scheduleRetry();
  }

  function signOut() {
    sessionStorage.removeItem(TOKEN_KEY);
    if (state.controller) state.controller.abort();
    state.snapshot = null;
    showLogin("");
  }

  function start() {
    $("token-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const value = $("token").value.trim();
      if (!value) {
        $("login-error").textContent = "Enter a token.";
        return;
      }
      sessionStorage.setItem(TOKEN_KEY, value);
      $("token").value = "";
      $("login-error").textContent = "";
      connect();
    });
    $("signout").addEventListener("click", signOut);
    setInterval(() => {
      for (const span of document.querySelectorAll(".reset[data-reset-at]")) refreshReset(span);
    }, 1000);
    connect();
  }

  document.addEventListener("DOMContentLoaded", start);
})();
