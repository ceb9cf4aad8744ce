// What an administrator can do from the page: create, edit and delete customers,
// teams and keys, activate, deactivate and rotate a key. Each form or confirmation
// remembers the version it was opened with and sends it as If-Match; a 409 says
// someone else changed the entity and offers to reload it. A refused field shows its
// error beside it. The page never shows these controls to a reader.

import { attempt, read, write } from "./api.js";
import { announce, openModal, showSecret } from "./dialogs.js";
import { errorPath } from "./errors.js";
import { el } from "./format.js";
import { entityForm, KINDS } from "./forms.js";

const GROUPS = [["customer", "customers"], ["team", "teams"], ["virtual_key", "keys"]];

// What the rest of the page lends: `nextSnapshot(ms)` resolves at the next
// snapshot (or after ms).
let page = null;

export function enableAdmin(hooks) {
  page = hooks;
  for (const [kind, group] of GROUPS) {
    const head = document.querySelector(`[data-group="${group}"] .group-head`);
    if (head.querySelector("button.new")) continue;
    const button = el("button", "secondary small new", `New ${KINDS[kind].noun}`);
    button.type = "button";
    button.dataset.action = "new";
    button.dataset.kind = kind;
    button.dataset.focusKey = `new:${kind}`;
    head.append(button);
  }
  document.getElementById("board").addEventListener("click", onAction);
}

export function disableAdmin() {
  for (const button of document.querySelectorAll(".group-head button.new")) button.remove();
  document.getElementById("board").removeEventListener("click", onAction);
  for (const id of ["editor", "confirm-dialog", "secret-dialog"]) {
    const dialog = document.getElementById(id);
    if (dialog.open) dialog.close();
  }
}

function onAction(event) {
  const button = event.target.closest("button[data-action]");
  if (!button) return;
  const { action, kind, id } = button.dataset;
  const back = returnTo(button.dataset.focusKey, kind);
  if (action === "new") openEditor(kind, null, back);
  else if (action === "edit") openEditor(kind, id, back);
  else openConfirm(kind, action, id, back);
}

/** Where focus goes back to: the same control if it is still drawn (rows are
 * redrawn on every snapshot), else the group's "New" button. */
function returnTo(focusKey, kind) {
  return () =>
    document.querySelector(`[data-focus-key="${CSS.escape(focusKey)}"]`) ||
    document.querySelector(`[data-focus-key="new:${CSS.escape(kind)}"]`);
}

async function fetchEntity(kind, id) {
  const info = KINDS[kind];
  const answer = await read(`${info.path}/${encodeURIComponent(id)}`);
  if (answer.error) return { error: answer.error, status: answer.status };
  return { entity: answer.body[info.answer] };
}

/** The entity at a version other than `stale`: after a 409 the read model may
 * not have applied the other change yet, so wait for the next snapshots. */
async function latest(kind, id, stale) {
  for (let tries = 0; tries < 10; tries += 1) {
    const found = await fetchEntity(kind, id);
    if (found.error || found.entity.version !== stale) return found;
    await page.nextSnapshot(1000);
  }
  return fetchEntity(kind, id);
}

function cannotOpen(kind, found) {
  const what = KINDS[kind].noun;
  const text = found.status === 404
    ? `That ${what} no longer exists.`
    : `Could not open the ${what}: ${found.error.code}: ${found.error.message}`;
  announce(text, { error: true });
}

// --- the alert of a dialog ---------------------------------------------------------------

/** The alert and the status line of a dialog: announced from inside it, since the
 * rest of the page is inert while a modal is open. */
function dialogMessages(st) {
  st.alert = el("div", "form-alert");
  st.alert.setAttribute("role", "alert");
  st.alert.hidden = true;
  st.note = el("p", "form-note");
  st.note.setAttribute("role", "status");
  return [st.note, st.alert];
}

function showAlert(st, ...content) {
  st.alert.replaceChildren(...content.map((c) => (typeof c === "string" ? el("p", null, c) : c)));
  st.alert.hidden = false;
}

function clearErrors(st) {
  st.alert.hidden = true;
  st.alert.replaceChildren();
  for (const input of st.root.querySelectorAll("[aria-invalid]")) {
    input.removeAttribute("aria-invalid");
    input.closest(".field")?.classList.remove("invalid");
    const line = document.getElementById(`${input.id}-error`);
    if (line) {
      line.textContent = "";
      line.hidden = true;
    }
    const described = (input.getAttribute("aria-describedby") || "")
      .split(" ")
      .filter((ref) => ref && ref !== `${input.id}-error`);
    if (described.length) input.setAttribute("aria-describedby", described.join(" "));
    else input.removeAttribute("aria-describedby");
  }
}

/** The control whose value is at `path`, else the first one inside it. */
function findField(root, path) {
  const controls = [...root.querySelectorAll("[data-path]")];
  const exact = controls.find((c) => c.dataset.path === path || c.dataset.alias === path);
  if (exact) return exact;
  let prefix = path;
  while (prefix.length > 1) {
    const inside = controls.find(
      (c) => c.dataset.path.startsWith(`${prefix}.`) || c.dataset.path.startsWith(`${prefix}[`),
    );
    if (inside) return inside;
    const cut = Math.max(prefix.lastIndexOf("."), prefix.lastIndexOf("["));
    if (cut <= 1) break;
    prefix = prefix.slice(0, cut);
  }
  return null;
}

function markField(input, error) {
  input.setAttribute("aria-invalid", "true");
  input.closest(".field")?.classList.add("invalid");
  const line = document.getElementById(`${input.id}-error`);
  line.replaceChildren(el("code", null, error.code), `: ${error.message}`);
  line.hidden = false;
  const described = (input.getAttribute("aria-describedby") || "").split(" ").filter(Boolean);
  input.setAttribute("aria-describedby", [line.id, ...described].join(" "));
}

function setBusy(st, busy, text) {
  st.busy = busy;
  st.submit.disabled = busy;
  st.submit.setAttribute("aria-busy", String(busy));
  st.submit.textContent = busy ? "Saving…" : text;
}

function networkText() {
  return "The connection failed before an answer came, so it is not known whether" +
    " this was applied. Trying again without changing anything is safe: it sends the" +
    " same request with the same Idempotency-Key, and the service applies it at most once.";
}

function conflictText(noun, version) {
  return `Someone else changed this ${noun} after you opened it (you opened version` +
    ` ${version}). Nothing was changed, so their change is not overwritten. Reload to` +
    " see the latest version; what you entered here is replaced by it.";
}

// --- the editor -------------------------------------------------------------------------------

/** The customers and teams a form may attach its entity to, as of the page's own
 * latest write (the snapshot may not have it yet). */
async function ownerChoices(kind) {
  const wanted = { customer: [], team: ["customers"], virtual_key: ["customers", "teams"] }[kind];
  const choices = { customers: [], teams: [] };
  for (const name of wanted) {
    const answer = await read(`/api/governance/${name}`);
    if (answer.error) return { error: answer.error, status: answer.status };
    choices[name] = answer.body[name];
  }
  return { choices };
}

async function openEditor(kind, id, back) {
  let entity = null;
  if (id) {
    const found = await fetchEntity(kind, id);
    if (found.error) return cannotOpen(kind, found);
    entity = found.entity;
  }
  const owners = await ownerChoices(kind);
  if (owners.error) return cannotOpen(kind, owners);
  const dialog = document.getElementById("editor");
  const st = { kind, id, entity, choices: owners.choices, attempt: null, busy: false, dialog };
  buildEditor(st);
  openModal(dialog, { focus: st.form.first, returnFocus: back });
}

function buildEditor(st) {
  const info = KINDS[st.kind];
  st.form = entityForm(st.kind, st.entity, st.choices);
  const heading = st.entity ? `Edit ${info.noun} ${st.entity.name}` : `New ${info.noun}`;
  const title = el("h2", null, heading);
  title.id = "editor-title";
  const version = st.entity ? el("span", "muted version", `version ${st.entity.version}`) : null;
  const messages = dialogMessages(st);
  const label = st.entity ? "Save" : `Create ${info.noun}`;
  st.submit = el("button", "primary", label);
  st.submit.type = "submit";
  st.submit.dataset.label = label;
  const cancel = el("button", "secondary", "Cancel");
  cancel.type = "button";
  cancel.addEventListener("click", () => st.dialog.close());
  st.root = el(
    "form",
    "editor",
    el("div", "dialog-head", title, version),
    ...messages,
    st.form.node,
    el("div", "dialog-actions", cancel, st.submit),
  );
  st.root.noValidate = true;
  st.root.addEventListener("submit", (event) => {
    event.preventDefault();
    submitEditor(st);
  });
  st.dialog.replaceChildren(st.root);
}

async function submitEditor(st) {
  if (st.busy) return;
  clearErrors(st);
  const info = KINDS[st.kind];
  const body = st.form.read();
  const request = st.entity
    ? { method: "PUT", path: `${info.path}/${st.id}`, body, ifMatch: st.entity.version }
    : { method: "POST", path: info.path, body };
  st.attempt = attempt(st.attempt, request);
  setBusy(st, true);
  const result = await write(request, st.attempt.key);
  setBusy(st, false, st.submit.dataset.label);
  if (!result.error) {
    const saved = result.body[info.answer];
    st.dialog.close();
    const done = `${info.title} ${saved.name} ${st.entity ? "saved" : "created"}.`;
    if (saved.value) {
      // The secret dialog says it first; outside it, the page is inert meanwhile.
      showSecret({
        keyName: saved.name,
        secret: saved.value,
        returnFocus: returnTo(`edit:${saved.id}`, st.kind),
        onClose: () => announce(done),
      });
      delete saved.value;
    } else {
      announce(done);
    }
    return;
  }
  if (result.status === 409 && st.entity) {
    const reload = el("button", "secondary small", "Reload the latest version");
    reload.type = "button";
    reload.addEventListener("click", () => reloadEditor(st));
    showAlert(st, conflictText(info.noun, st.entity.version), reload);
    reload.focus();
    return;
  }
  if (result.network) {
    showAlert(st, networkText());
    st.submit.focus();
    return;
  }
  if (result.status === 404 && st.entity) {
    showAlert(st, `This ${info.noun} no longer exists: someone deleted it.`);
    return;
  }
  const path = errorPath(result.error, body);
  const field = path ? findField(st.root, path) : null;
  if (field) {
    markField(field, result.error);
    showAlert(st, "Not saved: the marked field needs a change.");
    field.focus();
  } else {
    const { code, message } = result.error;
    showAlert(st, el("p", null, "Not saved: ", el("code", null, code), `: ${message}`));
    st.submit.focus();
  }
}

async function reloadEditor(st) {
  const info = KINDS[st.kind];
  const found = await latest(st.kind, st.id, st.entity.version);
  if (found.error) {
    showAlert(st, `Could not reload: ${found.error.code}: ${found.error.message}`);
    return;
  }
  const owners = await ownerChoices(st.kind);
  if (owners.error) {
    showAlert(st, `Could not reload: ${owners.error.code}: ${owners.error.message}`);
    return;
  }
  st.entity = found.entity;
  st.choices = owners.choices;
  st.attempt = null;
  buildEditor(st);
  st.form.first.focus();
  st.note.textContent = `Reloaded: this is ${info.noun} ${st.entity.name} at version` +
    ` ${st.entity.version}.`;
}

// --- confirmations: delete, activate, deactivate, rotate -------------------------------------

const DELETE_NOTES = {
  customer: "Its budgets are deleted. Its teams and virtual keys stay, detached from it.",
  team: "Its budgets are deleted. Its virtual keys stay, detached from it.",
  virtual_key:
    "Its budgets and provider configs are deleted, and its secret stops working at once.",
};

const VERBS = {
  delete: {
    title: (noun, e) => `Delete ${noun} ${e.name}?`,
    note: (kind) => DELETE_NOTES[kind],
    button: "Delete",
    done: "deleted",
    request: (path, e) => ({ method: "DELETE", path, ifMatch: e.version }),
  },
  deactivate: {
    title: (noun, e) => `Deactivate key ${e.name}?`,
    note: () =>
      "Checks for this key answer key_inactive until it is activated again." +
      " Its budgets and usage stay.",
    button: "Deactivate",
    done: "deactivated",
    request: (path, e) => ({ method: "PUT", path, ifMatch: e.version, body: { is_active: false } }),
  },
  activate: {
    title: (noun, e) => `Activate key ${e.name}?`,
    note: () => "Checks for this key are decided by its limits again.",
    button: "Activate",
    done: "activated",
    request: (path, e) => ({ method: "PUT", path, ifMatch: e.version, body: { is_active: true } }),
  },
  rotate: {
    title: (noun, e) => `Rotate the secret of key ${e.name}?`,
    note: () =>
      "The current secret stops working at once. The new secret is shown once, right after.",
    button: "Rotate secret",
    done: "rotated",
    request: (path, e) => ({
      method: "PUT",
      path,
      ifMatch: e.version,
      body: { rotate_value: true },
    }),
  },
};

async function openConfirm(kind, verb, id, back) {
  if (!VERBS[verb]) return;
  const found = await fetchEntity(kind, id);
  if (found.error) return cannotOpen(kind, found);
  const dialog = document.getElementById("confirm-dialog");
  const st = { kind, verb, id, entity: found.entity, attempt: null, busy: false, dialog, back };
  buildConfirm(st);
  openModal(dialog, { focus: st.cancel, returnFocus: back });
}

function buildConfirm(st) {
  const info = KINDS[st.kind];
  const verb = VERBS[st.verb];
  const title = el("h2", null, verb.title(info.noun, st.entity));
  title.id = "confirm-title";
  const messages = dialogMessages(st);
  st.cancel = el("button", "secondary", "Cancel");
  st.cancel.type = "button";
  st.cancel.addEventListener("click", () => st.dialog.close());
  st.submit = el("button", st.verb === "delete" ? "danger" : "primary", verb.button);
  st.submit.type = "submit";
  st.submit.dataset.label = verb.button;
  const note = el("p", null, verb.note(st.kind));
  note.id = "confirm-note";
  st.root = el(
    "form",
    "confirm",
    el("div", "dialog-head", title, el("span", "muted version", `version ${st.entity.version}`)),
    note,
    ...messages,
    el("div", "dialog-actions", st.cancel, st.submit),
  );
  st.root.addEventListener("submit", (event) => {
    event.preventDefault();
    submitConfirm(st);
  });
  st.dialog.replaceChildren(st.root);
}

async function submitConfirm(st) {
  if (st.busy) return;
  clearErrors(st);
  const info = KINDS[st.kind];
  const verb = VERBS[st.verb];
  const request = verb.request(`${info.path}/${st.id}`, st.entity);
  st.attempt = attempt(st.attempt, request);
  setBusy(st, true);
  const result = await write(request, st.attempt.key);
  setBusy(st, false, verb.button);
  if (!result.error) {
    st.dialog.close();
    const done = `${info.title} ${st.entity.name} ${verb.done}.`;
    const saved = result.body[info.answer];
    if (saved && saved.value) {
      showSecret({
        keyName: saved.name,
        secret: saved.value,
        rotated: true,
        returnFocus: st.back,
        onClose: () => announce(done),
      });
      delete saved.value;
    } else {
      announce(done);
    }
    return;
  }
  if (result.status === 409) {
    const reload = el("button", "secondary small", "Reload the latest version");
    reload.type = "button";
    reload.addEventListener("click", async () => {
      const found = await latest(st.kind, st.id, st.entity.version);
      if (found.error) {
        showAlert(st, `Could not reload: ${found.error.code}: ${found.error.message}`);
        return;
      }
      st.entity = found.entity;
      st.attempt = null;
      buildConfirm(st);
      st.cancel.focus();
      st.note.textContent = `Reloaded: this is ${info.noun} ${st.entity.name} at version` +
        ` ${st.entity.version}.`;
    });
    showAlert(st, conflictText(info.noun, st.entity.version), reload);
    reload.focus();
    return;
  }
  if (result.network) {
    showAlert(st, networkText());
  } else if (result.status === 404) {
    showAlert(st, `This ${info.noun} no longer exists: someone deleted it.`);
  } else {
    showAlert(st, el("p", null, el("code", null, result.error.code), `: ${result.error.message}`));
  }
  st.submit.focus();
}
