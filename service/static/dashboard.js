// govledger governance dashboard: vanilla JS modules, no build step. This entry
// point signs in (a bearer token kept for this tab in sessionStorage), learns the
// token's role, follows the live snapshots and draws them; an administrator also
// gets the editing controls (admin.js).

import { enableAdmin, disableAdmin } from "./dashboard/admin.js";
import { forgetToken, keepToken, probeRole, saw, token } from "./dashboard/api.js";
import { refreshCharts, toggle } from "./dashboard/chart.js";
import { findBudget, refreshReset, renderBoard } from "./dashboard/render.js";
import { follow } from "./dashboard/stream.js";

const $ = (id) => document.getElementById(id);
const state = {
  snapshot: null,
  feed: null,
  role: null, // "admin" | "reader", once known
  generation: 0, // bumped by stop(): a probe answered after it is stale
  waiting: [], // resolvers of nextSnapshot()
};

function draw() {
  const snapshot = state.snapshot;
  if (!snapshot) return;
  // Rows are redrawn whole: keep the keyboard focus on the same control.
  const focused = document.activeElement && document.activeElement.dataset
    ? document.activeElement.dataset.focusKey
    : undefined;
  renderBoard(snapshot, { admin: state.role === "admin", onToggle });
  if (focused) {
    const again = document.querySelector(`[data-focus-key="${CSS.escape(focused)}"]`);
    if (again) again.focus();
  }
  refreshCharts(snapshot.position, (id) => findBudget(state.snapshot, id));
}

function onToggle(budgetId) {
  toggle(budgetId);
  draw();
}

function nextSnapshot(ms) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    state.waiting.push(() => {
      clearTimeout(timer);
      resolve();
    });
  });
}

function onSnapshot(snapshot) {
  state.snapshot = snapshot;
  saw(snapshot.position);
  if (state.role !== null) {
    draw();
    showBoard();
  }
  for (const resolve of state.waiting.splice(0)) resolve();
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
  $("role").hidden = true;
  $("role").textContent = "";
  $("updated").textContent = ""; // the last session's, not this one's
  $("login-error").textContent = message || "";
  setLive("idle", "Not connected");
  $("token").focus();
}

function showBoard() {
  $("login").hidden = true;
  $("board").hidden = false;
  $("signout").hidden = !token();
  const role = $("role");
  role.hidden = false;
  role.textContent = state.role === "admin" ? "Admin" : "Read-only";
  role.title = state.role === "admin"
    ? "This token may change governance"
    : "This token may only read: nothing can be changed from this page";
}

async function connect() {
  stop();
  state.role = null;
  state.feed = follow({
    onSnapshot,
    onStatus: setLive,
    onRefused: (status, message) => {
      const shown = status === 401 && !token() ? "" : message;
      forgetToken();
      stop();
      showLogin(shown);
    },
  });
  const generation = state.generation;
  const role = await probeRole();
  if (generation !== state.generation) return;
  state.role = role;
  if (role === "admin") enableAdmin({ nextSnapshot });
  if (state.snapshot) {
    draw();
    showBoard();
  }
}

function stop() {
  state.generation += 1;
  if (state.feed) state.feed.close();
  state.feed = null;
  state.snapshot = null;
  disableAdmin();
}

function signOut() {
  forgetToken();
  stop();
  state.role = null;
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
    keepToken(value);
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

start();
