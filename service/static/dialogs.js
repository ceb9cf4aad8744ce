// The page's modal dialogs: opening one keeps the keyboard inside it (Tab wraps,
// Escape closes) and gives focus back on close; the one-time secret dialog; the
// announcements of results to screen readers and sighted users alike.

import { el } from "./format.js";

const FOCUSABLE = [
  "a[href]",
  "button:not([disabled])",
  "input:not([disabled])",
  "select:not([disabled])",
  "textarea:not([disabled])",
  "[tabindex]:not([tabindex='-1'])",
].join(",");

function focusables(dialog) {
  return [...dialog.querySelectorAll(FOCUSABLE)].filter((node) => node.getClientRects().length > 0);
}

/**
 * Open `dialog` as a modal. `focus` is the control to start on (else the first);
 * `returnFocus()` answers where focus goes when it closes (the opener may have been
 * redrawn meanwhile); `onClose` runs after.
 */
export function openModal(dialog, { focus, returnFocus, onClose } = {}) {
  const keep = (event) => {
    if (event.key !== "Tab") return;
    const items = focusables(dialog);
    if (items.length === 0) return;
    const first = items[0];
    const last = items[items.length - 1];
    const inside = dialog.contains(document.activeElement);
    if (event.shiftKey && (document.activeElement === first || !inside)) {
      event.preventDefault();
      last.focus();
    } else if (!event.shiftKey && (document.activeElement === last || !inside)) {
      event.preventDefault();
      first.focus();
    }
  };
  dialog.addEventListener("keydown", keep);
  dialog.addEventListener(
    "close",
    () => {
      dialog.removeEventListener("keydown", keep);
      if (onClose) onClose();
      const target = returnFocus ? returnFocus() : null;
      if (target && target.isConnected) target.focus();
    },
    { once: true },
  );
  dialog.showModal();
  const start = focus || focusables(dialog)[0];
  if (start) start.focus();
}

// --- the one-time secret -------------------------------------------------------------------

async function copyText(input) {
  try {
    await navigator.clipboard.writeText(input.value);
    return true;
  } catch (err) {
    // No clipboard API (an insecure origin) or no permission: the older way.
    input.select();
    try {
      return document.execCommand("copy");
    } catch (fallbackErr) {
      return false;
    }
  }
}

/**
 * Show a key's new secret once, with a copy button and a plain warning. The secret
 * lives only in the dialog's input while it is open: closing it clears the input,
 * and nothing writes it to any storage.
 */
export function showSecret({ keyName, secret, rotated, returnFocus, onClose }) {
  const dialog = document.getElementById("secret-dialog");
  const input = document.getElementById("secret-value");
  const status = document.getElementById("secret-status");
  document.getElementById("secret-title").textContent = rotated
    ? `New secret of key ${keyName}`
    : `Secret of the new key ${keyName}`;
  input.value = secret;
  status.textContent = "";
  const copy = document.getElementById("secret-copy");
  const done = document.getElementById("secret-done");
  const onCopy = async () => {
    const copied = await copyText(input);
    status.textContent = copied
      ? "Copied to the clipboard."
      : "Could not copy: select the secret and copy it by hand.";
  };
  const onDone = () => dialog.close();
  // Shown only this once: Escape does not throw it away, only "Done" does.
  const onCancel = (event) => {
    event.preventDefault();
    status.textContent =
      'Store the secret first, then choose "Done, I have stored it": it is not shown again.';
  };
  copy.addEventListener("click", onCopy);
  done.addEventListener("click", onDone);
  dialog.addEventListener("cancel", onCancel);
  openModal(dialog, {
    focus: copy,
    returnFocus,
    onClose: () => {
      input.value = "";
      status.textContent = "";
      copy.removeEventListener("click", onCopy);
      done.removeEventListener("click", onDone);
      dialog.removeEventListener("cancel", onCancel);
      if (onClose) onClose();
    },
  });
}

// --- announcements -------------------------------------------------------------------------

let toastTimer = null;

/** Say what happened: politely, or at once for an error. */
export function announce(text, { error = false } = {}) {
  const region = document.getElementById(error ? "alert" : "announce");
  const other = document.getElementById(error ? "announce" : "alert");
  other.textContent = "";
  region.textContent = "";
  // A new node, so the same words twice are announced twice.
  region.append(el("span", null, text));
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => {
    region.textContent = "";
  }, 8000);
}
