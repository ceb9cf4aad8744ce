// The controls of the governance forms, each with its label and its error line:
// text, checkbox and select fields, the budgets editor (with the usage preview of
// each row), the rate-limit fieldset and the provider-config editor. Every input
// learns the JSON path of its value in the request body when the form is read
// (`data-path`), which is how an error answer finds the field it concerns.

import { describe, describeDropped, describeRemovedProvider, reconcile } from "./budgets.js";
import { el, money, plainDecimal, typedMoney } from "./format.js";

let lastId = 0;
function nextId(prefix) {
  lastId += 1;
  return `${prefix}-${lastId}`;
}

/** A label whose accessible name can carry a scope ("Budget 2 ") that sighted
 * users read from the layout instead. */
function label(forId, text) {
  const node = el("label", null, el("span", "sr-only scope"), text);
  node.htmlFor = forId;
  return node;
}

function errorLine(input) {
  const line = el("p", "field-error");
  line.id = `${input.id}-error`;
  line.hidden = true;
  return line;
}

export function textField(text, { value = "", name, hint, inputmode, list, size } = {}) {
  const input = el("input");
  input.id = nextId(name || "field");
  input.type = "text";
  input.name = name || "";
  input.value = value === null || value === undefined ? "" : String(value);
  input.autocomplete = "off";
  input.spellcheck = false;
  if (inputmode) input.inputMode = inputmode;
  if (list) input.setAttribute("list", list);
  if (size) input.size = size;
  const wrap = el("div", "field", label(input.id, text), input);
  if (hint) {
    const help = el("span", "hint", hint);
    help.id = `${input.id}-hint`;
    input.setAttribute("aria-describedby", help.id);
    wrap.append(help);
  }
  wrap.append(errorLine(input));
  return { wrap, input };
}

export function checkboxField(text, { checked = false, name } = {}) {
  const input = el("input");
  input.id = nextId(name || "check");
  input.type = "checkbox";
  input.name = name || "";
  input.checked = Boolean(checked);
  const wrap = el("div", "field check", input, label(input.id, text), errorLine(input));
  return { wrap, input };
}

/** `options`: [{value, text}] or [{group, options: [...]}]. */
export function selectField(text, options, { value = "", name } = {}) {
  const select = el("select");
  select.id = nextId(name || "select");
  select.name = name || "";
  const option = (o) => {
    const node = el("option", null, o.text);
    node.value = o.value;
    return node;
  };
  for (const o of options) {
    if (o.group) {
      const group = el("optgroup");
      group.label = o.group;
      group.append(...o.options.map(option));
      if (o.options.length) select.append(group);
    } else {
      select.append(option(o));
    }
  }
  select.value = value;
  const wrap = el("div", "field", label(select.id, text), select, errorLine(select));
  return { wrap, input: select };
}

/** The path of a control's value, and the name screen readers hear for it. */
export function place(input, path, scope) {
  if (path) input.dataset.path = path;
  else delete input.dataset.path;
  const span = input.closest(".field")?.querySelector(".scope");
  if (span) span.textContent = scope ? `${scope} ` : "";
}

// --- budgets -------------------------------------------------------------------------

/**
 * The budgets editor of one owner. `current()` gives the owner's budgets as the form
 * was opened (the preview reconciles against them); `budgets` fills the rows.
 * `read(path, owner)` answers the budget specs and places every control (`owner`
 * names the owner to screen readers when it is not the entity itself).
 */
export function budgetsEditor(budgets, current) {
  const list = el("ol", "budget-list");
  const dropped = el("ul", "dropped");
  dropped.setAttribute("aria-live", "polite");
  const add = el("button", "secondary small", "Add budget");
  add.type = "button";
  const legend = el("legend", null, "Budgets");
  const empty = el("p", "muted none", "No budget: spending is not limited here.");
  const box = el("fieldset", "budgets", legend, empty, list, dropped, add);
  const editor = { box, read, refresh };

  function addRow(budget) {
    const limit = textField("Max limit", {
      value: budget ? plainDecimal(budget.max_limit) : "",
      name: "max_limit",
      inputmode: "decimal",
      size: 10,
    });
    const duration = textField("Reset duration", {
      value: budget ? budget.reset_duration : "",
      name: "reset_duration",
      list: "durations",
      size: 6,
    });
    const aligned = checkboxField("Calendar aligned", {
      checked: budget ? budget.calendar_aligned : false,
      name: "calendar_aligned",
    });
    const remove = el("button", "link remove", "Remove");
    remove.type = "button";
    const preview = el("p", "preview");
    preview.setAttribute("aria-live", "polite");
    const row = el("li", "budget-row", limit.wrap, duration.wrap, aligned.wrap, remove, preview);
    row.dataset.origin = budget ? budget.reset_duration : "";
    remove.addEventListener("click", () => {
      const next = row.nextElementSibling || row.previousElementSibling;
      row.remove();
      refresh();
      (next ? next.querySelector("input") : add).focus();
    });
    list.append(row);
    return row;
  }

  function rows() {
    return [...list.children].map((row) => ({
      row,
      limit: row.querySelector('input[name="max_limit"]'),
      duration: row.querySelector('input[name="reset_duration"]'),
      aligned: row.querySelector('input[name="calendar_aligned"]'),
      remove: row.querySelector(".remove"),
      preview: row.querySelector(".preview"),
    }));
  }

  function read(path, owner = "") {
    return rows().map((r, i) => {
      const where = `${path}[${i}]`;
      const who = `${owner ? `${owner} budget` : "Budget"} ${i + 1}`;
      place(r.limit, `${where}.max_limit`, who);
      place(r.duration, `${where}.reset_duration`, who);
      place(r.aligned, `${where}.calendar_aligned`, who);
      r.remove.setAttribute("aria-label", `Remove ${who.toLowerCase()}`);
      return {
        max_limit: typedMoney(r.limit.value),
        reset_duration: r.duration.value.trim(),
        calendar_aligned: r.aligned.checked,
      };
    });
  }

  /** Redraw the usage preview of every row and the list of deleted budgets. */
  function refresh() {
    const shown = rows();
    empty.hidden = shown.length > 0;
    const outcome = reconcile(
      current(),
      shown.map((r) => ({
        max_limit: typedMoney(r.limit.value),
        reset_duration: r.duration.value,
        calendar_aligned: r.aligned.checked,
        origin: r.row.dataset.origin || null,
      })),
    );
    // Only what changed is rewritten: a live region speaks every rewrite.
    shown.forEach((r, i) => {
      const o = outcome.rows[i];
      const text = describe(o, money);
      if (r.preview.textContent !== text) r.preview.textContent = text;
      r.preview.dataset.kind = o.kind;
      r.row.dataset.kind = o.kind;
    });
    showDropped(dropped, outcome.dropped.map((b) => describeDropped(b, money)));
  }

  add.addEventListener("click", () => {
    const row = addRow(null);
    refresh();
    row.querySelector("input").focus();
  });
  box.addEventListener("input", refresh);
  box.addEventListener("change", refresh);
  for (const b of budgets) addRow(b);
  refresh();
  return editor;
}

// --- rate limits ---------------------------------------------------------------------

function integer(text) {
  const t = text.trim();
  if (t === "") return null;
  // Anything else goes as typed: the service names what is wrong with it.
  return /^[0-9]+$/.test(t) && Number.isSafeInteger(Number(t)) ? Number(t) : t;
}

/** `list` shows `texts`, one item each, as what the save deletes; left as it is
 * when they are the same (a screen reader hears the live region only on change). */
function showDropped(list, texts) {
  if ([...list.children].map((item) => item.textContent).join("\n") === texts.join("\n")) {
    return;
  }
  list.replaceChildren(
    ...texts.map((text) => {
      const item = el("li", "preview", text);
      item.dataset.kind = "dropped";
      return item;
    }),
  );
}

/** The rate-limit fieldset: tokens and requests, each a limit and its window. */
export function rateLimitEditor(rateLimit) {
  const r = rateLimit || {};
  const fields = {
    token_max_limit: textField("Token limit", {
      value: r.token_max_limit,
      name: "token_max_limit",
      inputmode: "numeric",
      size: 10,
    }),
    token_reset_duration: textField("Token window", {
      value: r.token_reset_duration,
      name: "token_reset_duration",
      list: "durations",
      size: 5,
    }),
    request_max_limit: textField("Request limit", {
      value: r.request_max_limit,
      name: "request_max_limit",
      inputmode: "numeric",
      size: 10,
    }),
    request_reset_duration: textField("Request window", {
      value: r.request_reset_duration,
      name: "request_reset_duration",
      list: "durations",
      size: 5,
    }),
  };
  const box = el(
    "fieldset",
    "rate-limit",
    el("legend", null, "Rate limit"),
    el(
      "div",
      "pair",
      fields.token_max_limit.wrap,
      fields.token_reset_duration.wrap,
      fields.request_max_limit.wrap,
      fields.request_reset_duration.wrap,
    ),
    el("p", "muted hint", "Leave a limit empty for none. Windows are rolling (e.g. 1m, 1h)."),
  );

  /** `{...}` or null when every field is empty; an empty half is sent as nulls,
   * which removes that half. */
  function read(path, scope = "") {
    const value = {};
    for (const [key, field] of Object.entries(fields)) {
      place(field.input, `${path}.${key}`, scope);
      value[key] = key.endsWith("max_limit")
        ? integer(field.input.value)
        : field.input.value.trim() || null;
    }
    return Object.values(value).every((v) => v === null) ? null : value;
  }

  return { box, read };
}

// --- provider configs ------------------------------------------------------------------

/** The provider configs of a key: each a provider, its allowed models, budgets and
 * rate limit. `current` are the key's configs as the form was opened. */
export function providersEditor(configs, current) {
  const list = el("div", "provider-list");
  const removed = el("ul", "dropped");
  removed.setAttribute("aria-live", "polite");
  const add = el("button", "secondary small", "Add provider");
  add.type = "button";
  const box = el(
    "fieldset",
    "providers",
    el("legend", null, "Provider configs"),
    el("p", "muted hint", "Without any, the key may use every provider; with some, only those."),
    list,
    removed,
    add,
  );
  const entries = [];

  // The configs the save removes: those whose provider no entry names any more.
  function refreshRemoved() {
    const named = new Set(entries.map((e) => e.provider.input.value.trim()));
    showDropped(
      removed,
      current.filter((c) => !named.has(c.provider)).map((c) => describeRemovedProvider(c, money)),
    );
  }

  function addEntry(config) {
    const provider = textField("Provider", {
      value: config ? config.provider : "",
      name: "provider",
      size: 14,
    });
    const models = config ? config.allowed_models : ["*"];
    const all = checkboxField("All models", { checked: models.includes("*"), name: "all_models" });
    const allowed = textField("Allowed models", {
      value: models.includes("*") ? "" : models.join(", "),
      name: "allowed_models",
      hint: "Comma-separated; empty allows none.",
      size: 28,
    });
    allowed.input.disabled = all.input.checked;
    all.input.addEventListener("change", () => {
      allowed.input.disabled = all.input.checked;
    });
    const currentConfig = () =>
      current.find((c) => c.provider === provider.input.value.trim()) || null;
    const budgets = budgetsEditor(config ? config.budgets : [], () => {
      const found = currentConfig();
      return found ? found.budgets : [];
    });
    provider.input.addEventListener("input", () => {
      budgets.refresh();
      refreshRemoved();
    });
    const rate = rateLimitEditor(config ? config.rate_limit : null);
    const remove = el("button", "link remove", "Remove provider");
    remove.type = "button";
    const title = el("h4", null, "Provider");
    const node = el(
      "section",
      "provider",
      el("div", "provider-head", title, remove),
      el("div", "pair", provider.wrap, all.wrap, allowed.wrap),
      budgets.box,
      rate.box,
    );
    const entry = { node, provider, all, allowed, budgets, rate, remove, title };
    remove.addEventListener("click", () => {
      entries.splice(entries.indexOf(entry), 1);
      node.remove();
      refreshRemoved();
      add.focus();
    });
    entries.push(entry);
    list.append(node);
    return entry;
  }

  function read(path) {
    return entries.map((entry, i) => {
      const where = `${path}[${i}]`;
      const name = entry.provider.input.value.trim();
      const scope = `Provider ${i + 1}`;
      entry.title.textContent = name ? `Provider ${name}` : `Provider ${i + 1}`;
      entry.remove.setAttribute("aria-label", `Remove provider ${name || i + 1}`);
      place(entry.provider.input, `${where}.provider`, scope);
      place(entry.all.input, null, scope);
      place(entry.allowed.input, `${where}.allowed_models`, scope);
      const allowed = entry.all.input.checked
        ? ["*"]
        : entry.allowed.input.value.split(",").map((m) => m.trim()).filter(Boolean);
      return {
        provider: name,
        allowed_models: allowed,
        budgets: entry.budgets.read(`${where}.budgets`, scope),
        rate_limit: entry.rate.read(`${where}.rate_limit`, scope),
      };
    });
  }

  add.addEventListener("click", () => {
    const entry = addEntry(null);
    entry.provider.input.focus();
  });
  for (const c of configs) addEntry(c);
  return { box, read };
}
