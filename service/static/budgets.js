// What saving a budget form does to each budget's usage, before it is saved: the
// contract's reconciliation by reset_duration ("Budget periods", "Budgets in a PUT").
// Pure: no DOM, no requests.

import { compareDecimal, plainDecimal } from "./format.js";

// The periods a calendar has: one day, week, month, quarter or year (the service
// refuses calendar alignment for any other duration).
const ALIGNABLE = /^0*1[dwMQY]$/;

/**
 * The outcome of replacing an owner's budgets `current` by the form's `rows`.
 *
 * `current`: the budgets as the form was opened, `{id, reset_duration,
 * calendar_aligned, current_usage, max_limit}`. `rows`: the form's budgets in order,
 * `{reset_duration, calendar_aligned, max_limit, origin}`, `origin` being the
 * reset_duration the row was opened with (null for a row added in the form).
 *
 * Answers `{rows: [outcome per row], dropped: [budget]}`. An outcome's `kind`:
 * - "blank": no reset_duration yet;
 * - "duplicate": an earlier row has the same reset_duration (the service refuses it);
 * - "unalignable": calendar aligned, but not a calendar period (refused too);
 * - "new": no budget has this reset_duration: a new budget, usage 0;
 * - "kept": the budget with this reset_duration keeps its id and its usage;
 * - "reset": kept, but calendar_aligned turns false → true: usage back to 0;
 * - "unaligned": kept, calendar_aligned turns true → false: the usage of the
 *   current calendar period stays, earlier usage never counts again.
 * with `budget` (the current budget it lands on, for every kind but blank, duplicate
 * and new), `origin`, `originDropped` (the budget the row was opened with is
 * deleted) and `limitChanged`.
 */
export function reconcile(current, rows) {
  const byDuration = new Map(current.map((b) => [b.reset_duration, b]));
  const taken = new Set();
  const outcomes = rows.map((row) => {
    const duration = (row.reset_duration || "").trim();
    const origin = row.origin || null;
    if (!duration) return { kind: "blank", origin };
    if (taken.has(duration)) return { kind: "duplicate", duration, origin };
    taken.add(duration);
    const aligned = Boolean(row.calendar_aligned);
    if (aligned && !ALIGNABLE.test(duration)) return { kind: "unalignable", duration, origin };
    const budget = byDuration.get(duration);
    if (!budget) return { kind: "new", duration, origin };
    const limit = String(row.max_limit ?? "").trim();
    const limitChanged =
      /^[0-9]+(?:\.[0-9]+)?$/.test(plainDecimal(limit)) &&
      compareDecimal(limit, budget.max_limit) !== 0;
    let kind = "kept";
    if (aligned && !budget.calendar_aligned) kind = "reset";
    else if (!aligned && budget.calendar_aligned) kind = "unaligned";
    return { kind, duration, origin, budget, limit, limitChanged };
  });
  const dropped = current.filter((b) => !taken.has(b.reset_duration));
  const gone = new Set(dropped.map((b) => b.reset_duration));
  for (const outcome of outcomes) outcome.originDropped = gone.has(outcome.origin);
  return { rows: outcomes, dropped };
}

/** One sentence for a row's outcome; `money` formats an amount. */
export function describe(outcome, money = String) {
  const { kind, duration, origin, budget } = outcome;
  const moved = origin && origin !== duration;
  const usage = budget ? money(budget.current_usage) : "";
  switch (kind) {
    case "blank":
      return "";
    case "duplicate":
      return `Another budget already has reset duration ${duration}: an owner has one` +
        " budget per reset duration, so this cannot be saved.";
    case "unalignable":
      return `A ${duration} period is not one of the calendar's (1d, 1w, 1M, 1Q, 1Y):` +
        " it cannot be calendar aligned, so this cannot be saved.";
    case "new": {
      if (!moved) return "A new budget: its usage starts at 0.";
      const deleted = outcome.originDropped
        ? `, and the ${origin} budget is deleted with its usage`
        : "";
      return `Changing the reset duration from ${origin} to ${duration} makes a new` +
        ` budget: its usage starts at 0${deleted}.`;
    }
    case "kept": {
      const what = moved ? `This is the existing ${duration} budget: its` : "Usage kept: the";
      return `${what} current usage (${usage}) stays${limitChange(outcome, money)}.`;
    }
    case "reset":
      return "Turning calendar alignment on resets this budget: its usage goes from" +
        ` ${usage} to 0, and its periods follow the calendar from now on` +
        `${limitChange(outcome, money)}.`;
    case "unaligned":
      return "Turning calendar alignment off keeps the usage of the current calendar" +
        ` period (up to ${usage}) in the new rolling period; usage from before it` +
        ` never counts again${limitChange(outcome, money)}.`;
    default:
      return "";
  }
}

function limitChange(outcome, money) {
  return outcome.limitChanged
    ? `; the limit changes from ${money(outcome.budget.max_limit)} to ${money(outcome.limit)}`
    : "";
}

/** One sentence for a budget the save deletes. */
export function describeDropped(budget, money = String) {
  const usage = money(budget.current_usage);
  return `The ${budget.reset_duration} budget is deleted, with its usage (${usage}).`;
}

/** One sentence for a provider config the save removes (left out of the list, or
 * renamed): its budgets and rate limit go with it, their usage too. */
export function describeRemovedProvider(config, money = String) {
  const parts = config.budgets.map(
    (b) => `its ${b.reset_duration} budget (usage ${money(b.current_usage)})`,
  );
  if (config.rate_limit) parts.push("its rate limit");
  if (!parts.length) return `Provider ${config.provider} is removed.`;
  const list = parts.length === 1
    ? parts[0]
    : `${parts.slice(0, -1).join(", ")} and ${parts[parts.length - 1]}`;
  const deleted = parts.length === 1 ? "is deleted with its usage" : "are deleted with their usage";
  return `Provider ${config.provider} is removed: ${list} ${deleted}.`;
}
