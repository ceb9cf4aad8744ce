// The usage preview of the budget form follows the contract's reconciliation by
// reset_duration ("Budget periods", "Budgets in a PUT").
import assert from "node:assert/strict";
import test from "node:test";

import {
  describe,
  describeDropped,
  describeRemovedProvider,
  reconcile,
} from "../../service/static/budgets.js";

const day = {
  id: "b-day",
  reset_duration: "1d",
  calendar_aligned: false,
  current_usage: "2.5",
  max_limit: "10",
};
const month = {
  id: "b-month",
  reset_duration: "1M",
  calendar_aligned: true,
  current_usage: "40",
  max_limit: "100",
};

const row = (reset_duration, calendar_aligned, max_limit, origin = null) => ({
  reset_duration,
  calendar_aligned,
  max_limit,
  origin,
});

test("a kept duration keeps its usage, whatever the new limit", () => {
  const { rows, dropped } = reconcile([day, month], [row("1d", false, "20", "1d"), row("1M", true, "100", "1M")]);
  assert.deepEqual(
    rows.map((o) => [o.kind, o.budget.id, o.limitChanged]),
    [["kept", "b-day", true], ["kept", "b-month", false]],
  );
  assert.deepEqual(dropped, []);
  assert.equal(
    describe(rows[0]),
    "Usage kept: the current usage (2.5) stays; the limit changes from 10 to 20.",
  );
  assert.equal(describe(rows[1]), "Usage kept: the current usage (40) stays.");
});

test("turning calendar alignment on resets the usage to 0", () => {
  const { rows } = reconcile([day], [row("1d", true, "10", "1d")]);
  assert.equal(rows[0].kind, "reset");
  assert.equal(
    describe(rows[0]),
    "Turning calendar alignment on resets this budget: its usage goes from 2.5 to 0, and its periods follow the calendar from now on.",
  );
});

test("turning calendar alignment off keeps the calendar period's usage", () => {
  const { rows } = reconcile([month], [row("1M", false, "100", "1M")]);
  assert.equal(rows[0].kind, "unaligned");
  assert.equal(
    describe(rows[0]),
    "Turning calendar alignment off keeps the usage of the current calendar period (up to 40) in the new rolling period; usage from before it never counts again.",
  );
});

test("a changed duration is a new budget and the old one is deleted with its usage", () => {
  const { rows, dropped } = reconcile([day, month], [row("2d", false, "10", "1d"), row("1M", true, "100", "1M")]);
  assert.deepEqual(rows.map((o) => o.kind), ["new", "kept"]);
  assert.deepEqual(dropped, [day]);
  assert.equal(
    describe(rows[0]),
    "Changing the reset duration from 1d to 2d makes a new budget: its usage starts at 0, and the 1d budget is deleted with its usage.",
  );
  assert.equal(describeDropped(dropped[0]), "The 1d budget is deleted, with its usage (2.5).");
});

test("swapped durations land on the budgets of those durations, not on the rows' origins", () => {
  const { rows, dropped } = reconcile([day, month], [row("1M", true, "100", "1d"), row("1d", false, "10", "1M")]);
  assert.deepEqual(rows.map((o) => [o.kind, o.budget.id, o.originDropped]), [
    ["kept", "b-month", false],
    ["kept", "b-day", false],
  ]);
  assert.deepEqual(dropped, []);
  assert.equal(describe(rows[0]), "This is the existing 1M budget: its current usage (40) stays.");
});

test("a new row is a new budget, a blank one says nothing, a repeated duration is refused", () => {
  const { rows, dropped } = reconcile([day], [row("1d", false, "10", "1d"), row(" 1w ", false, "5"), row("", false, ""), row("1d", false, "3")]);
  assert.deepEqual(rows.map((o) => o.kind), ["kept", "new", "blank", "duplicate"]);
  assert.deepEqual(dropped, []);
  assert.equal(describe(rows[1]), "A new budget: its usage starts at 0.");
  assert.equal(describe(rows[2]), "");
  assert.equal(
    describe(rows[3]),
    "Another budget already has reset duration 1d: an owner has one budget per reset duration, so this cannot be saved.",
  );
});

test("removing every row drops every budget", () => {
  const { rows, dropped } = reconcile([day, month], []);
  assert.deepEqual(rows, []);
  assert.deepEqual(dropped, [day, month]);
});

test("amounts go through the formatter given", () => {
  const { rows } = reconcile([day], [row("1d", false, "12.5", "1d")]);
  assert.equal(
    describe(rows[0], (v) => `$${v}`),
    "Usage kept: the current usage ($2.5) stays; the limit changes from $10 to $12.5.",
  );
});

test("a provider config left out or renamed is removed with its budgets and usage", () => {
  const openai = {
    provider: "openai",
    budgets: [day, month],
    rate_limit: { token_max_limit: 100, token_reset_duration: "1h" },
  };
  assert.equal(
    describeRemovedProvider(openai),
    "Provider openai is removed: its 1d budget (usage 2.5), its 1M budget (usage 40)" +
      " and its rate limit are deleted with their usage.",
  );
  assert.equal(
    describeRemovedProvider({ provider: "azure", budgets: [day], rate_limit: null }),
    "Provider azure is removed: its 1d budget (usage 2.5) is deleted with its usage.",
  );
  assert.equal(
    describeRemovedProvider({ provider: "local", budgets: [], rate_limit: null }),
    "Provider local is removed.",
  );
});

test("calendar alignment asked of a period the calendar has not is refused before saving", () => {
  const hour = { ...day, id: "b-hour", reset_duration: "1h", calendar_aligned: false };
  const { rows } = reconcile([hour], [row("1h", true, "10", "1h"), row("2d", true, "5")]);
  assert.deepEqual(rows.map((r) => r.kind), ["unalignable", "unalignable"]);
  assert.equal(
    describe(rows[0]),
    "A 1h period is not one of the calendar's (1d, 1w, 1M, 1Q, 1Y): it cannot be" +
      " calendar aligned, so this cannot be saved.",
  );
});

test("a reset or unaligned budget also says when its limit changes, compared exactly", () => {
  const { rows } = reconcile([day, month], [row("1d", true, "20", "1d"), row("1M", false, "100.0", "1M")]);
  assert.equal(
    describe(rows[0]),
    "Turning calendar alignment on resets this budget: its usage goes from 2.5 to 0, and its" +
      " periods follow the calendar from now on; the limit changes from 10 to 20.",
  );
  assert.equal(rows[1].limitChanged, false);
  const big = { ...day, max_limit: "123456789012345678" };
  const [kept] = reconcile([big], [row("1d", false, "123456789012345679", "1d")]).rows;
  assert.equal(kept.limitChanged, true);
});
