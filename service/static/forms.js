// The form of each governance entity (customer, team, virtual key), filled from the
// entity as it was read, or blank for a new one, and read back into the request
// body the contract takes: budgets and provider configs as complete sets, a cleared
// rate limit as null.

import {
  budgetsEditor,
  checkboxField,
  place,
  providersEditor,
  rateLimitEditor,
  selectField,
  textField,
} from "./fields.js";
import { byName, el } from "./format.js";

/** What the page knows of each kind of entity. */
export const KINDS = {
  customer: {
    noun: "customer",
    title: "Customer",
    path: "/api/governance/customers",
    answer: "customer",
  },
  team: { noun: "team", title: "Team", path: "/api/governance/teams", answer: "team" },
  virtual_key: {
    noun: "virtual key",
    title: "Virtual key",
    path: "/api/governance/virtual-keys",
    answer: "virtual_key",
  },
};

function ownerValue(entity) {
  if (!entity) return "";
  if (entity.team_id) return `team:${entity.team_id}`;
  if (entity.customer_id) return `customer:${entity.customer_id}`;
  return "";
}

/**
 * The fields of a `kind` form for `entity` (null: a new one). `customers` and
 * `teams` fill the owner choices. Answers `{node, read, first}`: `read()` is the
 * request body, and places every control at its path in it.
 */
export function entityForm(kind, entity, { customers, teams }) {
  const opened = entity || {};
  const name = textField("Name", { value: opened.name, name: "name", size: 32 });
  const top = [name.wrap];
  let owner = null;
  if (kind === "team") {
    owner = selectField(
      "Customer",
      [
        { value: "", text: "No customer" },
        ...byName(customers).map((c) => ({ value: c.id, text: c.name })),
      ],
      { value: opened.customer_id || "", name: "customer_id" },
    );
    top.push(owner.wrap);
  }
  let active = null;
  if (kind === "virtual_key") {
    owner = selectField(
      "Belongs to",
      [
        { value: "", text: "No team or customer" },
        {
          group: "Teams",
          options: byName(teams).map((t) => ({ value: `team:${t.id}`, text: t.name })),
        },
        {
          group: "Customers",
          options: byName(customers).map((c) => ({ value: `customer:${c.id}`, text: c.name })),
        },
      ],
      { value: ownerValue(entity), name: "owner" },
    );
    active = checkboxField("Active", {
      checked: entity ? entity.is_active : true,
      name: "is_active",
    });
    top.push(owner.wrap, active.wrap);
  }
  const budgets = budgetsEditor(opened.budgets || [], () => opened.budgets || []);
  const rate = rateLimitEditor(opened.rate_limit);
  const providers =
    kind === "virtual_key"
      ? providersEditor(opened.provider_configs || [], opened.provider_configs || [])
      : null;
  const node = el(
    "div",
    "entity-fields",
    el("div", "pair top", ...top),
    budgets.box,
    rate.box,
    providers ? providers.box : null,
  );

  function read() {
    place(name.input, "$.name");
    const body = { name: name.input.value };
    if (kind === "team") {
      place(owner.input, "$.customer_id");
      body.customer_id = owner.input.value || null;
    }
    if (kind === "virtual_key") {
      // One control for two fields: an error about either lands on it.
      place(owner.input, "$.team_id");
      owner.input.dataset.alias = "$.customer_id";
      const [type, id] = owner.input.value.split(":");
      body.team_id = type === "team" ? id : null;
      body.customer_id = type === "customer" ? id : null;
      place(active.input, "$.is_active");
      body.is_active = active.input.checked;
    }
    body.budgets = budgets.read("$.budgets");
    const rateLimit = rate.read("$.rate_limit");
    // null removes a rate limit the entity had; a new one simply has none.
    if (rateLimit !== null || entity) body.rate_limit = rateLimit;
    if (providers) body.provider_configs = providers.read("$.provider_configs");
    return body;
  }

  // Rows come and go (add, remove): every control knows its path at all times.
  for (const type of ["input", "change", "click"]) node.addEventListener(type, read);
  read();
  return { node, read, first: name.input };
}
