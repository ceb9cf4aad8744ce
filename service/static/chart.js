// A budget's spend per past period: which charts are open, their data from
// GET /api/governance/budgets/{id}/periods (refetched when the snapshot moves), and
// the SVG bar chart itself.

import { read } from "./api.js";
import { el, level, money } from "./format.js";

const PERIODS_SHOWN = 14;
const SVG = "http://www.w3.org/2000/svg";

export const expanded = new Set(); // budget ids whose chart is open
const periods = new Map(); // budget id -> {position, periods}

/** Open or close a budget's chart. */
export function toggle(id) {
  if (expanded.has(id)) expanded.delete(id);
  else expanded.add(id);
}

export function chartBox(budget) {
  const box = el("div", "chart");
  box.dataset.chartFor = budget.id;
  drawChart(box, budget);
  return box;
}

/** Fetch the periods of every open chart for the snapshot at `position`, and draw
 * each one into its box; `find(id)` answers the budget as the snapshot has it. */
export function refreshCharts(position, find) {
  for (const id of expanded) load(id, position, find);
}

async function load(id, position, find) {
  const cached = periods.get(id);
  if (cached && cached.position === position) return;
  periods.set(id, { position, periods: cached ? cached.periods : null });
  const answer = await read(
    `/api/governance/budgets/${encodeURIComponent(id)}/periods?limit=${PERIODS_SHOWN}`,
  );
  if (answer.status === 404) {
    expanded.delete(id);
    return;
  }
  if (answer.error) {
    periods.delete(id);
    return;
  }
  periods.set(id, { position, periods: answer.body.periods });
  const budget = find(id);
  const box = document.querySelector(`.chart[data-chart-for="${CSS.escape(id)}"]`);
  if (budget && box) drawChart(box, budget);
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

function drawChart(box, budget) {
  const entry = periods.get(budget.id);
  const shown = entry && entry.periods;
  const caption = el(
    "div",
    "caption",
    `Spend per ${budget.reset_duration} period (latest ${PERIODS_SHOWN}), limit ${money(budget.max_limit)}`,
  );
  if (!shown) {
    box.replaceChildren(caption, el("div", "muted", "Loading…"));
    return;
  }
  if (shown.length === 0) {
    box.replaceChildren(caption, el("div", "muted", "No spend recorded yet."));
    return;
  }
  const W = 640;
  const H = 120;
  const left = 44;
  const bottom = 18;
  const top = 8;
  const max = Number(budget.max_limit);
  const peak = Math.max(max, ...shown.map((p) => Number(p.spend))) * 1.08;
  const plotH = H - bottom - top;
  const slot = (W - left) / Math.max(shown.length, 7);
  const barW = Math.max(4, Math.min(36, slot * 0.7));
  const y = (v) => top + plotH - (v / peak) * plotH;
  const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img" });
  chart.setAttribute("aria-label", caption.textContent);
  chart.append(svg("line", { class: "axis", x1: left, x2: W, y1: top + plotH, y2: top + plotH }));
  chart.append(svg("line", { class: "limit", x1: left, x2: W, y1: y(max), y2: y(max) }));
  chart.append(
    svg("text", { x: left - 6, y: y(max) + 3.5, "text-anchor": "end" }, money(budget.max_limit)),
  );
  chart.append(svg("text", { x: left - 6, y: top + plotH + 3.5, "text-anchor": "end" }, "0"));
  shown.forEach((p, i) => {
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
    rect.append(svg("title", {}, `${start.toISOString()}: ${money(p.spend)}`));
    chart.append(rect);
    // Every bar labelled when they fit, else every other one, ending on the latest.
    if (shown.length <= 8 || (shown.length - 1 - i) % 2 === 0) {
      const label = start.toLocaleString("en-US", { month: "short", day: "numeric", timeZone: "UTC" });
      chart.append(svg("text", { x: x + barW / 2, y: H - 4, "text-anchor": "middle" }, label));
    }
  });
  box.replaceChildren(caption, chart);
}
